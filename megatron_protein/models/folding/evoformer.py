"""The Evoformer trunk (AlphaFold2 supplement, Algorithm 6) and the extra-MSA stack (Algorithm 18).

One block, with ``m [*, S, R, c_m]`` the MSA and ``z [*, R, R, c_z]`` the pair representation::

    m += DropoutRowwise_0.15(MSARowAttentionWithPairBias(m, z))         Alg 7
    m += MSAColumnAttention(m)          (MSAColumnGlobalAttention, Alg 19, in the extra-MSA stack)   Alg 8
    m += MSATransition(m)                                               Alg 9
    z += OuterProductMean(m)                                            Alg 10
    z += DropoutRowwise_0.25(TriangleMultiplicationOutgoing(z))         Alg 11
    z += DropoutRowwise_0.25(TriangleMultiplicationIncoming(z))         Alg 12
    z += DropoutRowwise_0.25(TriangleAttentionStartingNode(z))          Alg 13
    z += DropoutColumnwise_0.25(TriangleAttentionEndingNode(z))         Alg 14
    z += PairTransition(z)                                              Alg 15

``outer_product_mean_position`` moves the outer product mean: ``'middle'`` (above, AlphaFold2 monomer),
``'first'`` (before the row attention, AlphaFold-Multimer), ``'end'`` (HelixFold's Parallel Evoformer: the pair
branch reads the block's input z, and the OPM of the *new* MSA is added at the end, so the MSA branch and the pair
branch are independent and branch parallelism can run them on two devices).

The dropouts are the kernels' bias-dropout-add with the mask shared along rows (``broadcast_dim=-3``) or columns
(``-2``) (supplement 1.11.6). The stack returns ``m``, ``z`` and the single representation ``s = Linear(m[0])``.

Parallel hooks (CONTRACTS.md; the identity at degree 1): the stack is entered in row layout (MSA split along S,
pair along i); each layout switch of FastFold's DAP (FOLDING.md) is one ``dap.row_to_col`` / ``dap.col_to_row``
line below, the all-gathers of biases and projections are inside the modules, and the 'end' block is two branch
functions joined by ``bp.run_branches``. Masks stay whole on every rank; ``dap.local_slice`` takes the rank's part.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding.chunking import checkpoint_block
from megatron_protein.models.folding.msa import (MSAColumnAttention, MSAColumnGlobalAttention,
                                                 MSARowAttentionWithPairBias)
from megatron_protein.models.folding.outer_product_mean import OuterProductMean
from megatron_protein.models.folding.primitives import Linear, bp, check_masks, dap
from megatron_protein.models.folding.transition import Transition
from megatron_protein.models.folding.triangle_attention import TriangleAttention
from megatron_protein.models.folding.triangle_multiplication import TriangleMultiplicativeUpdate

OPM_POSITIONS = ("middle", "end", "first")


@dataclass(frozen=True, kw_only=True)
class EvoformerConfig:
    """Sizes and switches of an Evoformer (or extra-MSA) stack; the defaults are AlphaFold2's main stack."""

    c_m: int = 256
    c_z: int = 128
    c_s: int = 384  # single representation (the main stack's output Linear(m[0])); unused by the extra-MSA stack
    num_blocks: int = 48
    c_hidden_msa_att: int = 32  # per head
    num_heads_msa: int = 8
    c_hidden_opm: int = 32
    c_hidden_mul: int = 128
    c_hidden_pair_att: int = 32  # per head
    num_heads_pair: int = 4
    transition_n: int = 4
    msa_dropout: float = 0.15
    pair_dropout: float = 0.25
    outer_product_mean_position: str = "middle"
    global_column_attention: bool = False  # the extra-MSA stack's Algorithm 19
    opm_eps: float = 1e-3
    global_attention_eps: float = 1e-10
    recompute: bool = False  # activation recompute of every block (training memory)
    # Training memory: attention probabilities and the transitions' 4x hidden recomputed in backward instead of kept
    # (same gradients; a few % more compute). The triangle updates and the outer product mean always recompute
    # their (cheap) projections.
    lean_training: bool = True
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self):
        if self.outer_product_mean_position not in OPM_POSITIONS:
            raise ValueError(f"EvoformerConfig: outer_product_mean_position must be one of {OPM_POSITIONS}, got "
                             f"{self.outer_product_mean_position!r}")
        for name in ("c_m", "c_z", "c_s", "c_hidden_msa_att", "num_heads_msa", "c_hidden_opm", "c_hidden_mul",
                     "c_hidden_pair_att", "num_heads_pair", "transition_n"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EvoformerConfig: {name} must be positive, got {getattr(self, name)}")
        if self.num_blocks < 0:
            raise ValueError(f"EvoformerConfig: num_blocks must be >= 0, got {self.num_blocks}")
        for name in ("msa_dropout", "pair_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"EvoformerConfig: {name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def extra_msa(cls, **overrides) -> "EvoformerConfig":
        """AlphaFold2's extra-MSA stack: 4 blocks at c_e 64, row attention 8 heads x 8, global column attention."""
        base = dict(c_m=64, c_z=128, num_blocks=4, c_hidden_msa_att=8, num_heads_msa=8, c_hidden_opm=32,
                    c_hidden_mul=128, c_hidden_pair_att=32, num_heads_pair=4, global_column_attention=True)
        base.update(overrides)
        return cls(**base)

    def with_(self, **changes) -> "EvoformerConfig":
        return replace(self, **changes)


class EvoformerBlock(torch.nn.Module):
    """Algorithm 6 (one iteration): ``(m [*, S, R, c_m], z [*, R, R, c_z], msa_mask [*, S, R], pair_mask
    [*, R, R]) -> (m, z)``; see the module docstring. ``chunk_size`` chunks every module for inference."""

    #: This block calls the DAP/BP hooks, so it may run on split activations (``dap.require_hooks``).
    parallel_hooks = True

    def __init__(self, config: EvoformerConfig):
        super().__init__()
        c, f = config, config.fusion
        self.config = config
        self.opm_position = c.outer_product_mean_position
        ar = c.lean_training
        self.msa_att_row = MSARowAttentionWithPairBias(c.c_m, c.c_z, c.c_hidden_msa_att, c.num_heads_msa, fusion=f,
                                                       attention_recompute=ar)
        if c.global_column_attention:
            self.msa_att_col = MSAColumnGlobalAttention(c.c_m, c.c_hidden_msa_att, c.num_heads_msa,
                                                        eps=c.global_attention_eps, fusion=f)
        else:
            self.msa_att_col = MSAColumnAttention(c.c_m, c.c_hidden_msa_att, c.num_heads_msa, fusion=f,
                                                  attention_recompute=ar)
        self.msa_transition = Transition(c.c_m, c.transition_n, fusion=f, recompute=ar)
        self.outer_product_mean = OuterProductMean(c.c_m, c.c_z, c.c_hidden_opm, eps=c.opm_eps, fusion=f)
        self.tri_mul_out = TriangleMultiplicativeUpdate(c.c_z, c.c_hidden_mul, outgoing=True, fusion=f)
        self.tri_mul_in = TriangleMultiplicativeUpdate(c.c_z, c.c_hidden_mul, outgoing=False, fusion=f)
        self.tri_att_start = TriangleAttention(c.c_z, c.c_hidden_pair_att, c.num_heads_pair, starting=True, fusion=f,
                                               attention_recompute=ar)
        self.tri_att_end = TriangleAttention(c.c_z, c.c_hidden_pair_att, c.num_heads_pair, starting=False, fusion=f,
                                             attention_recompute=ar)
        self.pair_transition = Transition(c.c_z, c.transition_n, fusion=f, recompute=ar)
        # Row-/column-shared dropout fused with the residual add (supplement 1.11.6).
        self.msa_dropout_rowwise = f.bias_dropout_add(c.msa_dropout, broadcast_dim=-3)
        self.pair_dropout_rowwise = f.bias_dropout_add(c.pair_dropout, broadcast_dim=-3)
        self.pair_dropout_columnwise = f.bias_dropout_add(c.pair_dropout, broadcast_dim=-2)

    # -- residual updates ---------------------------------------------------------------------------------------
    def _update(self, module, dropout, x: torch.Tensor, *args) -> torch.Tensor:
        """``x + dropout(module(x, *args))``. In inference, when this call owns ``x`` (created it, or was given it
        with ``inplace=True``), the update is added in place (``module.add_into``: chunk by chunk for the pair
        modules, so no second pair representation is ever allocated)."""
        dropping = dropout is not None and dropout.training and dropout.p > 0.0
        if not dropping and self._owned(x):
            if hasattr(module, "add_into"):
                return module.add_into(x, *args)
            return x.add_(module(x, *args))
        update = module(x, *args)
        return self._new(dropout(update, None, x) if dropping else x + update)

    def _owned(self, t: torch.Tensor) -> bool:
        return not torch.is_grad_enabled() and any(t is o for o in self._created)

    def _new(self, t: torch.Tensor) -> torch.Tensor:
        self._created.append(t)
        return t

    def _switch(self, layout_switch, x: torch.Tensor) -> torch.Tensor:
        """A DAP layout switch; its result is a new tensor this call owns unless it is ``x`` itself (degree 1)."""
        y = layout_switch(x)
        if y is not x and any(x is o for o in self._created):
            self._new(y)
        return y

    # -- the two halves of the block --------------------------------------------------------------------------
    def msa_stack(self, m, z, msa_mask, chunk_size):
        """Row attention (MSA row layout), column attention and transition (column layout). Returns m in column
        layout ``[*, S, R/n, c_m]``."""
        mask_row = dap.local_slice(msa_mask, -2)  # [*, S/n, R]
        mask_col = dap.local_slice(msa_mask, -1)  # [*, S, R/n]
        m = self._update(self.msa_att_row, self.msa_dropout_rowwise, m, z, mask_row, chunk_size)
        m = self._switch(dap.row_to_col, m)  # [*, S/n, R, c_m] -> [*, S, R/n, c_m]
        m = self._update(self.msa_att_col, None, m, mask_col, chunk_size)
        m = self._update(self.msa_transition, None, m, mask_col, chunk_size)
        return m

    def add_opm(self, z, m_col, msa_mask, chunk_size):
        """``z + OuterProductMean(m)`` with m in column layout; the update lands on the local pair rows."""
        mask_col = dap.local_slice(msa_mask, -1)
        if self._owned(z):
            return self.outer_product_mean.add_into(z, m_col, mask_col, chunk_size)
        return self._new(z + self.outer_product_mean(m_col, mask_col, chunk_size))

    def pair_stack(self, z, pair_mask, chunk_size):
        """Triangle updates, triangle attention and the pair transition; z enters and leaves in row layout."""
        mask_row = dap.local_slice(pair_mask, -2)  # [*, R/n, R]
        mask_col = dap.local_slice(pair_mask, -1)  # [*, R, R/n]
        z = self._update(self.tri_mul_out, self.pair_dropout_rowwise, z, mask_row)
        z = self._incoming(z, mask_col)
        z = self._update(self.tri_att_start, self.pair_dropout_rowwise, z, mask_row, chunk_size)
        z = self._switch(dap.row_to_col, z)  # [*, R/n, R, c_z] -> [*, R, R/n, c_z]
        z = self._update(self.tri_att_end, self.pair_dropout_columnwise, z, mask_col, chunk_size)
        z = self._update(self.pair_transition, None, z, mask_col, chunk_size)
        z = self._switch(dap.col_to_row, z)
        return z

    def msa_branch(self, m, z, msa_mask, chunk_size):
        """Parallel Evoformer, MSA branch: ``(m, z) -> (m_new, opm_update)`` (m_new in row layout)."""
        m = self.msa_stack(m, z, msa_mask, chunk_size)
        opm_update = self.outer_product_mean(m, dap.local_slice(msa_mask, -1), chunk_size)
        return dap.col_to_row(m), opm_update

    def _incoming(self, z, mask_col):
        """Triangle multiplication incoming, in column layout. With dropout its update goes back to row layout before
        the row-wise dropout-add, so the mask shared along rows is drawn at its full [1, R, c_z] on every rank (in
        column layout each rank would draw [1, R/n, c_z] and the ranks' column blocks would repeat one pattern);
        without dropout z itself switches (and is updated in place in inference). Same all_to_all count."""
        dropout = self.pair_dropout_rowwise
        if dropout.training and dropout.p > 0.0:
            update = dap.col_to_row(self.tri_mul_in(dap.row_to_col(z), mask_col))  # [*, R/n, R, c_z]
            return self._new(dropout(update, None, z))
        z = self._update(self.tri_mul_in, None, self._switch(dap.row_to_col, z), mask_col)
        return self._switch(dap.col_to_row, z)

    def pair_branch(self, z, pair_mask, chunk_size):
        """Parallel Evoformer, pair branch: ``z -> z_new`` without the block's outer product mean."""
        return self.pair_stack(z, pair_mask, chunk_size)

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                pair_mask: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                inplace: bool = False):
        """``inplace=True`` (inference only; ignored when autograd records) lets the block overwrite ``m`` and ``z``
        instead of allocating new ones, as OpenFold's ``inplace_safe``."""
        if not dap.is_enabled():  # under DAP m and z are row-layout slices; the stack checked the whole shapes
            check_masks("EvoformerBlock", m, z, msa_mask, pair_mask)
        else:  # every rank slices the whole masks (dap.local_slice); None means all real
            if msa_mask is None:
                msa_mask = m.new_ones(*m.shape[:-3], m.shape[-3] * dap.get_world_size(), m.shape[-2])
            if pair_mask is None:
                pair_mask = z.new_ones(*z.shape[:-3], z.shape[-2], z.shape[-2])
        self._created: list[torch.Tensor] = [m, z] if inplace else []
        try:
            if self.opm_position == "end":
                return bp.run_branches(lambda m_, z_: self.msa_branch(m_, z_, msa_mask, chunk_size),
                                       lambda z_: self.pair_branch(z_, pair_mask, chunk_size), m, z)
            if self.opm_position == "first":
                z = self.add_opm(z, dap.row_to_col(m), msa_mask, chunk_size)
            m = self.msa_stack(m, z, msa_mask, chunk_size)
            if self.opm_position == "middle":
                z = self.add_opm(z, m, msa_mask, chunk_size)
            m, m_handle = dap.col_to_row_async(m)  # overlapped with the pair stack (FastFold's duality async)
            z = self.pair_stack(z, pair_mask, chunk_size)
            return m_handle.wait(), z
        finally:
            self._created = []


class EvoformerStack(torch.nn.Module):
    """Algorithm 6, the loop: ``(m, z, msa_mask, pair_mask, chunk_size) -> (m, z, s)`` with the single
    representation ``s = Linear(m[..., 0, :, :])`` ``[*, R, c_s]`` (Algorithm 2 line 17)."""

    def __init__(self, config: EvoformerConfig):
        super().__init__()
        self.config = config
        self.blocks = torch.nn.ModuleList(EvoformerBlock(config) for _ in range(config.num_blocks))
        self.linear = Linear(config.c_m, config.c_s)

    def run_blocks(self, m, z, msa_mask, pair_mask, chunk_size, inplace: bool = False, return_msa: bool = True):
        """Scatter to row layout, run the blocks, gather. Sizes must divide the dap degree (the trunk,
        ``DistEmbeddingsAndEvoformer``, pads them). With the Parallel Evoformer the blocks sit between
        ``bp.enter_stack`` and ``bp.exit_stack`` (the MSA stays on the MSA-branch rank inside the stack).
        ``return_msa=False`` (the extra-MSA stack) skips gathering an MSA nobody reads and returns ``(None, z)``.
        In inference every block after the first may overwrite what the previous block returned (``inplace``: the
        first one too)."""
        check_masks(type(self).__name__, m, z, msa_mask, pair_mask)
        m = dap.scatter(m, dim=-3)  # row layout: [*, S/n, R, c_m]
        z = dap.scatter(z, dim=-3)  # [*, R/n, R, c_z]
        branched = self.config.outer_product_mean_position == "end"
        if branched:
            m, z = bp.enter_stack(m, z)
        for index, block in enumerate(self.blocks):
            if self.config.recompute and torch.is_grad_enabled():
                m, z = checkpoint_block(block, m, z, msa_mask, pair_mask, chunk_size)
            else:
                m, z = block(m, z, msa_mask, pair_mask, chunk_size, inplace=inplace or index > 0)
        if not return_msa:
            return None, dap.gather(z, dim=-3)
        if branched:
            m = bp.exit_stack(m)
        return dap.gather(m, dim=-3), dap.gather(z, dim=-3)

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                pair_mask: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                inplace: bool = False):
        """``inplace=True``: in inference the stack may overwrite ``m`` and ``z`` (the caller's tensors)."""
        m, z = self.run_blocks(m, z, msa_mask, pair_mask, chunk_size, inplace)
        return m, z, self.linear(m[..., 0, :, :])


class ExtraMSABlock(EvoformerBlock):
    """Algorithm 18's block: the Evoformer block with global column attention (Algorithm 19)."""

    def __init__(self, config: EvoformerConfig):
        super().__init__(config.with_(global_column_attention=True))


class ExtraMSAStack(EvoformerStack):
    """Algorithm 18: ``(e [*, S_extra, R, c_e], z, extra_msa_mask, pair_mask, chunk_size) -> z``; the extra MSA
    updates only the pair representation (its own representation is dropped, and there is no single output)."""

    def __init__(self, config: EvoformerConfig):
        torch.nn.Module.__init__(self)
        self.config = config.with_(global_column_attention=True)
        self.blocks = torch.nn.ModuleList(ExtraMSABlock(self.config) for _ in range(config.num_blocks))

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                pair_mask: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                inplace: bool = False) -> torch.Tensor:
        _, z = self.run_blocks(m, z, msa_mask, pair_mask, chunk_size, inplace, return_msa=False)
        return z


def openfold_key(key: str) -> str:
    """The name in our Evoformer of an OpenFold ``EvoformerBlock``/``EvoformerStack``/``ExtraMSAStack`` parameter
    (OpenFold commit ce0029e). Same tensors, same shapes; only the module paths differ:
    ``pair_stack.`` is flattened into the block, attention cores are ``attention`` (OpenFold's ``mha``), and
    the column attentions' inner wrappers (``_msa_att``, ``global_attention``) are folded into their module."""
    key = "." + key
    key = key.replace(".pair_stack.", ".")
    key = key.replace("._msa_att.", ".").replace(".global_attention.", ".")
    return key.replace(".mha.", ".attention.")[1:]


def load_openfold_state_dict(module: torch.nn.Module, state_dict: dict, strict: bool = True):
    """Load the weights of an OpenFold Evoformer module (block or stack) into ours; see :func:`openfold_key`."""
    return module.load_state_dict({openfold_key(k): v for k, v in state_dict.items()}, strict=strict)
