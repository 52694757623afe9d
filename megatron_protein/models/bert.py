"""The protein BERT: ProteinLM's pre-LN Megatron BERT, built from the parallel core's layers.

Architecture (ProteinLM, Xiao et al. 2021, arXiv:2108.07435, following Megatron-LM, Shoeybi et al. 2019,
arXiv:1909.08053; pre-LN as in Xiong et al. 2020, arXiv:2002.04745)::

    x   = dropout(word_embeddings[tokens] + position_embeddings[position_ids])     (no token types, no embedding LN)
    per layer:
      h = x + dropout(attention_dense(self_attention(input_layernorm(x))))
      x = h + dropout(dense_4h_to_h(gelu(dense_h_to_4h(post_attention_layernorm(h)))))
    y   = final_layernorm(x)
    MLM = (layernorm(gelu(dense(y)))) @ word_embeddings.T + bias                      (decoder tied to the embedding)

GeLU is the exact erf form everywhere. Attention is softmax(QK^T / sqrt(d) + mask) V; the fused QKV projection's
output rows are laid out per head as ``[num_heads, 3, head_dim]`` (Megatron checkpoint_version >= 2), so a
column-parallel split of that projection hands each tensor-parallel rank whole heads, q, k and v together.

Parallelism comes only from the core's layers (Megatron's Figure 3): the QKV and ``dense_h_to_4h`` projections are
column parallel, the attention output and ``dense_4h_to_h`` projections are row parallel (one all-reduce each in
forward and backward), the word embedding and the MLM decoder are split along the vocabulary. A pipeline stage is
a :class:`ProteinBertModel` with ``pre_process`` (embedding) on the first stage, ``post_process`` (final LN and MLM
head) on the last, and the layers of that stage numbered locally from 0, as Megatron stores them. With pp > 1 the
last stage keeps its own copy of the word embedding (``word_embeddings_for_head``) whose gradient is summed with
the first stage's every step (:meth:`ProteinBertModel.shared_embedding_weight`).

``state_dict()`` yields Megatron's key names directly (``language_model.embedding.word_embeddings.weight``,
``language_model.encoder.layers.0.self_attention.query_key_value.weight``, ``lm_head.bias``, ...);
:meth:`ProteinBertModel.state_dict_for_save_checkpoint` nests them as Megatron-LM's BERT saves them, and
:meth:`ProteinBertModel.load_state_dict` reads that nested form, the names of other Megatron-LM and ProteinLM
versions and the flat keys alike (:mod:`megatron_protein.models.megatron_layout`).

Weights are drawn per block (embedding, each global layer, head) from a local ``torch.Generator`` seeded with
``init_seed + block index`` (:func:`seeded_init`), and the core's layers keep their shard of the full weight, so a
model built at any TP x PP layout holds exactly the slices of the single-process model, on every data-parallel
replica alike. Building the model neither reads nor changes the process's generators (CPU or CUDA), so the
dropout seeds of :func:`~megatron_protein.parallel.random.model_parallel_seed` hold on every device.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from megatron_protein import kernels
from megatron_protein.models import megatron_layout
from megatron_protein.parallel import scg
from megatron_protein.parallel import tensor_parallel as tp_layers
from megatron_protein.parallel.collectives import (all_gather, copy_to_group, group_rank, group_size,
                                                   scatter_to_group)
from megatron_protein.parallel.pipeline import stage_layer_range, virtual_stage_layer_range

#: TAPE IUPAC vocabulary size (<pad> <mask> <cls> <sep> <unk> A..Z without J).
IUPAC_VOCAB_SIZE = 30


@dataclass
class BertConfig:
    """Shape and behaviour of the protein BERT (Megatron argument names)."""

    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: Optional[int] = None  # 4 * hidden_size when None
    max_position_embeddings: int = 512
    vocab_size: int = IUPAC_VOCAB_SIZE
    make_vocab_size_divisible_by: int = 8
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    init_seed: int = 1234
    # Kernel choices (Megatron's --no-*-fusion flags); made when the model is built, never per call.
    masked_softmax_fusion: bool = True
    bias_gelu_fusion: bool = True
    bias_dropout_fusion: bool = True
    layernorm_fusion: bool = True
    # Activation recompute of every transformer layer (Megatron's --checkpoint-activations / full recompute).
    checkpoint_activations: bool = False
    # Megatron's --sequence-parallel: LayerNorm, dropout and residual regions on a 1/tp slice of the sequence.
    sequence_parallel: bool = False
    # --compile-layers: training steps on CPU run each layer through one torch.compile'd chain
    # (megatron_protein.kernels.compiled); the same function and the same dropout masks as the eager layer.
    compile_layers: bool = False

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp_size: int) -> int:
        return tp_layers.pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp_size)

    def check_parallel(self, tp_size: int, pp_size: int) -> None:
        """Raise a clear error when the model cannot be split tp x pp ways."""
        if self.num_attention_heads % tp_size:
            raise ValueError(f"tensor-model-parallel size {tp_size} does not divide num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.ffn_hidden_size % tp_size:
            raise ValueError(f"tensor-model-parallel size {tp_size} does not divide ffn_hidden_size "
                             f"{self.ffn_hidden_size}")
        if self.num_layers < pp_size:
            raise ValueError(f"pipeline-model-parallel size {pp_size} exceeds num_layers {self.num_layers}: every "
                             f"stage needs at least one layer")


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, std) initialiser (Megatron's init_method_normal), drawing from :func:`init_generator` inside
    :func:`seeded_init` (tensors on the CPU, where every weight is built)."""
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std, generator=init_generator())
    return init_


def scaled_normal_init(std: float, num_layers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, std / sqrt(2 num_layers)) for the two projections that write into the residual stream
    (Megatron's scaled_init_method_normal, after GPT-2: each layer adds two residual branches)."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


_INIT_GENERATOR: list[torch.Generator] = []


def init_generator() -> Optional[torch.Generator]:
    """The generator of the innermost :func:`seeded_init` block (None outside one)."""
    return _INIT_GENERATOR[-1] if _INIT_GENERATOR else None


@contextlib.contextmanager
def seeded_init(seed: int):
    """Draw the weights initialised inside from a local CPU generator seeded with ``seed``.

    The initialisers here (:func:`normal_init`) take their numbers from that generator, never from the process's
    generators: ``torch.manual_seed`` would also reseed every CUDA device and undo the per-stage and per-replica
    dropout seeds. The default initialisation that ``nn.Linear``/``nn.Embedding`` run in their constructors (and
    that :func:`normal_init` then overwrites) still draws from the CPU default generator; ``fork_rng(devices=[])``
    puts its state back afterwards."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    _INIT_GENERATOR.append(generator)
    try:
        with torch.random.fork_rng(devices=[]):
            yield generator
    finally:
        _INIT_GENERATOR.pop()


class BertEmbedding(nn.Module):
    """word_embeddings[tokens] + position_embeddings[position_ids], then dropout. No token types, no LayerNorm.

    With sequence parallelism the sum (replicated over tp by the vocab-parallel lookup) is cut to this rank's slice
    of the sequence before the dropout, which then draws its mask from the model-parallel RNG stream: every slice
    its own mask (Megatron-LM's embedding does the same)."""

    def __init__(self, config: BertConfig, groups: scg.ParallelGroups):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.tp_group = groups.group("tp")
        init = normal_init(config.init_method_std)
        self.word_embeddings = tp_layers.VocabParallelEmbedding(
            config.padded_vocab_size(groups.size("tp")), config.hidden_size, init_method=init, groups=groups)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        init(self.position_embeddings.weight.data)
        self.position_embeddings.weight.tensor_model_parallel = False
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.max_position_embeddings = config.max_position_embeddings

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # tokens, position_ids: [b, s] -> [b, s, h] (replicated across tp: the vocab-parallel lookup all-reduces)
        if position_ids.numel() and int(position_ids.max()) >= self.max_position_embeddings:
            raise ValueError(f"position id {int(position_ids.max())} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}; raise --max-position-embeddings or shorten "
                             f"--seq-length")
        embeddings = self.word_embeddings(tokens) + self.position_embeddings(position_ids)
        if not self.sequence_parallel:
            return self.embedding_dropout(embeddings)
        embeddings = scatter_to_group(embeddings, 1, self.tp_group)  # [b, s, h] -> [b, s/tp, h]
        with tp_layers.get_rng_tracker().fork():
            return self.embedding_dropout(embeddings)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused, column-parallel QKV projection and a row-parallel output.

    Each tp rank holds ``num_heads / tp`` whole heads; the output projection's all-reduce sums their parts.
    The dense bias is returned unadded so that bias-dropout-add can fuse it with the residual.
    """

    def __init__(self, config: BertConfig, groups: scg.ParallelGroups, output_init):
        super().__init__()
        tp = groups.size("tp")
        self.head_dim = config.head_dim
        self.local_heads = config.num_attention_heads // tp
        init = normal_init(config.init_method_std)
        sp = config.sequence_parallel
        self.sequence_parallel = sp
        self.query_key_value = tp_layers.ColumnParallelLinear(
            config.hidden_size, 3 * config.hidden_size, gather_output=False, init_method=init, groups=groups,
            sequence_parallel=sp)
        self.core_attention = kernels.CoreAttention(self.head_dim, config.attention_dropout,
                                                    fused=config.masked_softmax_fusion)
        self.dense = tp_layers.RowParallelLinear(
            config.hidden_size, config.hidden_size, input_is_parallel=True, init_method=output_init,
            groups=groups, skip_bias_add=True, sequence_parallel=sp)
        self.tp_group = groups.group("tp")

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], query_index: Optional[torch.Tensor] = None):
        if query_index is not None:
            return self._forward_at(x, mask, query_index)
        # [b, s, h] (sequence parallel: [b, s/tp, h], gathered by the projection) -> [b, s, heads/tp * 3 * d]
        # -> [b, s, heads/tp, 3, d] (per-head q, k, v rows)
        qkv = self.query_key_value(x)
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, self.local_heads, 3, self.head_dim)
        # each of q, k, v: [b, heads/tp, s, d], strided views of qkv. unbind (not three index-selects): its backward
        # stacks the three gradients into one tensor instead of zero-filling a full qkv-sized gradient per slice.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))
        # Attention dropout acts on a tensor split over tp: its mask must differ across tp ranks (and match
        # across dp ranks), so it draws from the model-parallel RNG stream.
        with tp_layers.get_rng_tracker().fork():
            context = self.core_attention(q, k, v, mask)
        # [b, heads/tp, s, d] -> [b, s, heads/tp * d]
        context = context.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        return self.dense(context)

    def _forward_at(self, x: torch.Tensor, mask: Optional[torch.Tensor], query_index: torch.Tensor):
        """Attention output at the positions ``query_index`` [b, m] only: queries there, keys and values from every
        position. The query rows and the key/value rows of the fused projection are applied separately, so no
        query is projected that is not used. With sequence parallelism ``x`` is this rank's slice of the sequence
        (all-gathered here, as the projection would) and the output this rank's slice of the m queries."""
        if self.sequence_parallel:
            x = all_gather(x, 1, self.tp_group)  # what ColumnParallelLinear(sequence_parallel) does to its input
        else:
            x = copy_to_group(x, self.tp_group)  # what ColumnParallelLinear does to its input: all-reduce dx over tp
        b, s, hidden = x.shape
        m = query_index.shape[1]
        # The rows of the fused weight are [heads, 3 (q, k, v), d]: split (not index) so that backward
        # concatenates the two gradients instead of zero-filling a full-size one per slice.
        w_q, w_kv = (w.reshape(-1, hidden) for w in self.query_key_value.weight.view(
            self.local_heads, 3, self.head_dim, hidden).split([1, 2], dim=1))
        b_q = b_kv = None
        if self.query_key_value.bias is not None:
            b_q, b_kv = (b_.reshape(-1) for b_ in self.query_key_value.bias.view(
                self.local_heads, 3, self.head_dim).split([1, 2], dim=1))
        q = torch.nn.functional.linear(gather_positions(x, query_index), w_q, b_q)
        kv = torch.nn.functional.linear(x, w_kv, b_kv)
        q = q.view(b, m, self.local_heads, self.head_dim).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in kv.view(b, s, self.local_heads, 2, self.head_dim).unbind(dim=3))
        with tp_layers.get_rng_tracker().fork():
            context = self.core_attention(q, k, v, mask_rows_at(mask, query_index))
        context = context.transpose(1, 2).reshape(b, m, self.local_heads * self.head_dim)
        return self.dense(context)


class MLP(nn.Module):
    """h -> 4h (column parallel) -> exact GeLU -> h (row parallel); the output bias is returned unadded."""

    def __init__(self, config: BertConfig, groups: scg.ParallelGroups, output_init):
        super().__init__()
        init = normal_init(config.init_method_std)
        sp = config.sequence_parallel
        self.dense_h_to_4h = tp_layers.ColumnParallelLinear(
            config.hidden_size, config.ffn_hidden_size, gather_output=False, init_method=init, groups=groups,
            skip_bias_add=True, sequence_parallel=sp)
        self.bias_gelu = kernels.BiasGeLU(fused=config.bias_gelu_fusion)
        self.dense_4h_to_h = tp_layers.RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, input_is_parallel=True, init_method=output_init,
            groups=groups, skip_bias_add=True, sequence_parallel=sp)

    def forward(self, x: torch.Tensor):
        intermediate, bias = self.dense_h_to_4h(x)
        return self.dense_4h_to_h(self.bias_gelu(intermediate, bias))


class TransformerLayer(nn.Module):
    """One pre-LN layer: four sub-modules, two residual connections (ProteinLM / Megatron BERT).

    With sequence parallelism (Korthikanti et al. 2022) ``x`` and the output are this tp rank's slice of the
    sequence ``[b, s/tp, h]``: the LayerNorms, both bias-dropout-adds and the residuals run on the slice (their
    parameters' gradients are summed over tp after backward), the QKV and ``dense_h_to_4h`` projections all-gather
    the sequence and the two row-parallel outputs reduce-scatter it; the hidden dropout then draws from the
    model-parallel RNG stream, so every slice gets its own mask."""

    def __init__(self, config: BertConfig, groups: scg.ParallelGroups):
        super().__init__()
        output_init = scaled_normal_init(config.init_method_std, config.num_layers)
        eps, fused_ln = config.layernorm_epsilon, config.layernorm_fusion
        self.input_layernorm = kernels.LayerNorm(config.hidden_size, eps=eps, fused=fused_ln)
        self.self_attention = SelfAttention(config, groups, output_init)
        self.post_attention_layernorm = kernels.LayerNorm(config.hidden_size, eps=eps, fused=fused_ln)
        self.mlp = MLP(config, groups, output_init)
        self.bias_dropout_add = kernels.BiasDropoutAdd(config.hidden_dropout, fused=config.bias_dropout_fusion)
        self.sequence_parallel = config.sequence_parallel
        self.tp_group = groups.group("tp")
        if self.sequence_parallel:
            tp_layers.mark_sequence_parallel(*self.input_layernorm.parameters(),
                                             *self.post_attention_layernorm.parameters())
        self.compile_layer = config.compile_layers

    def _dropout_rng(self):
        """Hidden dropout on sequence slices draws per tp rank; on replicated activations from the default
        generator (the same mask on every tp rank, as the replicated values need)."""
        return tp_layers.get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                query_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [b, s, h], replicated across tp ([b, s/tp, h] with sequence parallelism). With query_index [b, m] the
        # output is [b, m, h] ([b, m/tp, h]), the layer's output at those positions only (every position still
        # serves as a key and value).
        if self.compile_layer and query_index is None and torch.is_grad_enabled() and x.device.type == "cpu":
            return self._compiled_forward(x, mask)
        attention_out, attention_bias = self.self_attention(self.input_layernorm(x), mask, query_index)
        if query_index is None:
            residual = x
        elif self.sequence_parallel:
            # This rank's slice of the m queries, read from the whole sequence (gathered: every rank reads other
            # rows of it, so its backward sums their gradients).
            m_local = query_index.shape[1] // max(1, self._tp_size())
            rows = query_index[:, group_rank(self.tp_group) * m_local:(group_rank(self.tp_group) + 1) * m_local]
            residual = gather_positions(all_gather(x, 1, self.tp_group), rows)
        else:
            residual = gather_positions(x, query_index)
        with self._dropout_rng():
            h = self.bias_dropout_add(attention_out, attention_bias, residual)
        mlp_out, mlp_bias = self.mlp(self.post_attention_layernorm(h))
        with self._dropout_rng():
            return self.bias_dropout_add(mlp_out, mlp_bias, h)

    def _tp_size(self) -> int:
        return group_size(self.tp_group)

    def _compiled_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer as one compiled chain (:func:`megatron_protein.kernels.compiled.bert_layer_body`). The dropout
        masks are drawn here, eagerly, as the eager layer draws them: the attention mask from the model-parallel
        stream (CoreAttention's CPU training path), then the two hidden masks from the default generator (from
        the model-parallel stream on sequence slices), with the same function and shapes."""
        from megatron_protein.kernels import attention as attention_kernels
        from megatron_protein.kernels import bias_dropout_add as bda
        from megatron_protein.kernels import compiled
        attn, mlp = self.self_attention, self.mlp
        seq = x.shape[1] * (self._tp_size() if self.sequence_parallel else 1)
        p_attention, p_hidden = attn.core_attention.dropout_p, self.bias_dropout_add.p
        keep_attention = keep_attention_output = keep_mlp_output = None
        if self.training and p_attention > 0.0:
            with tp_layers.get_rng_tracker().fork():
                keep_attention = attention_kernels.attention_keep_mask(
                    (x.shape[0], attn.local_heads, seq, seq), p_attention, x.device)
        if self.training and p_hidden > 0.0:
            with self._dropout_rng():
                keep_attention_output = bda.dropout_keep_mask(x.shape, p_hidden, (), x.device)
            with self._dropout_rng():
                keep_mlp_output = bda.dropout_keep_mask(x.shape, p_hidden, (), x.device)
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        body = compiled.compiled("bert_layer", compiled.bert_layer_body)
        return body(x, mask, keep_attention, keep_attention_output, keep_mlp_output,
                    ln1.weight, ln1.bias, attn.query_key_value.weight, attn.query_key_value.bias,
                    attn.dense.weight, attn.dense.bias, ln2.weight, ln2.bias,
                    mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias, mlp.dense_4h_to_h.weight,
                    mlp.dense_4h_to_h.bias, ln1.eps, attn.local_heads, attn.head_dim, p_attention, p_hidden,
                    self.tp_group, self.sequence_parallel)


class TransformerEncoder(nn.Module):
    """The layers of one pipeline stage (indexed locally from 0) and, on the last stage, the final LayerNorm."""

    def __init__(self, config: BertConfig, groups: scg.ParallelGroups, first_layer: int, num_local_layers: int,
                 post_process: bool):
        super().__init__()
        self.first_layer = first_layer
        layers = []
        for local in range(num_local_layers):
            with seeded_init(config.init_seed + 1 + first_layer + local):
                layers.append(TransformerLayer(config, groups))
        self.layers = nn.ModuleList(layers)
        if post_process:
            self.final_layernorm = kernels.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                                     fused=config.layernorm_fusion)
            if config.sequence_parallel:
                tp_layers.mark_sequence_parallel(*self.final_layernorm.parameters())
        else:
            self.final_layernorm = None
        self.checkpoint_activations = config.checkpoint_activations

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                query_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[b, s, h] -> [b, s, h]; with ``query_index`` [b, m] (last stage only) -> [b, m, h], the last layer
        computed at those positions only. With sequence parallelism every ``s`` (and ``m``) is this rank's
        1/tp slice."""
        for number, layer in enumerate(self.layers):
            args = (x, mask) if query_index is None or number < len(self.layers) - 1 else (x, mask, query_index)
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = recompute(layer, *args)
            else:
                x = layer(*args)
        if query_index is not None and not self.layers:
            x = gather_positions(x, query_index)
        return self.final_layernorm(x) if self.final_layernorm is not None else x


def recompute(module: nn.Module, *args):
    """Run ``module`` without keeping its activations; recompute them in backward (Chen et al. 2016,
    arXiv:1604.06174; Megatron's full activation recompute). The default RNG is restored by
    torch.utils.checkpoint; the model-parallel RNG tracker's streams are saved here and restored for the
    recomputation, so dropout draws the same masks twice (Megatron's CheckpointFunction does the same)."""
    tracker = tp_layers.get_rng_tracker()
    saved = tracker.get_states()

    @contextlib.contextmanager
    def replay_tracker():
        current = tracker.get_states()
        tracker.set_states(saved)
        try:
            yield
        finally:
            tracker.set_states(current)

    return torch.utils.checkpoint.checkpoint(
        module, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), replay_tracker()))


class LanguageModel(nn.Module):
    """Embedding (first stage) and encoder; attribute names give Megatron's ``language_model.*`` keys."""

    def __init__(self, config: BertConfig, groups: scg.ParallelGroups, pre_process: bool, post_process: bool,
                 first_layer: int, num_local_layers: int):
        super().__init__()
        if pre_process:
            with seeded_init(config.init_seed):
                self.embedding = BertEmbedding(config, groups)
        else:
            self.embedding = None
        self.encoder = TransformerEncoder(config, groups, first_layer, num_local_layers, post_process)


class MLMHead(nn.Module):
    """dense h -> h, exact GeLU, LayerNorm, then logits against the (tied) vocab-parallel word embedding + bias."""

    def __init__(self, config: BertConfig, groups: scg.ParallelGroups):
        super().__init__()
        self.groups = groups
        self.sequence_parallel = config.sequence_parallel
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        normal_init(config.init_method_std)(self.dense.weight.data)
        nn.init.zeros_(self.dense.bias.data)
        self.layernorm = kernels.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                           fused=config.layernorm_fusion)
        vocab_shard = config.padded_vocab_size(groups.size("tp")) // groups.size("tp")
        # The output bias is split over tp along the vocabulary, like the decoder (tied embedding) rows.
        self.bias = nn.Parameter(torch.zeros(vocab_shard))
        self.bias.tensor_model_parallel = True
        self.bias.partition_dim = 0
        for p in (self.dense.weight, self.dense.bias):
            p.tensor_model_parallel = False
        if self.sequence_parallel:   # dense, GeLU and LayerNorm run on the sequence slice (as in Megatron-LM)
            tp_layers.mark_sequence_parallel(self.dense.weight, self.dense.bias, *self.layernorm.parameters())

    def forward(self, hidden: torch.Tensor, word_embeddings_weight: torch.Tensor) -> torch.Tensor:
        # hidden [b, s, h] -> logits shard [b, s, padded_vocab / tp]; with sequence parallelism hidden is the
        # [b, s/tp, h] slice, gathered before the vocabulary-parallel product (every rank scores every position).
        hidden = self.layernorm(torch.nn.functional.gelu(self.dense(hidden)))
        return tp_layers.vocab_parallel_logits(hidden, word_embeddings_weight, self.bias, groups=self.groups,
                                               sequence_parallel=self.sequence_parallel)


class ProteinBertModel(nn.Module):
    """One pipeline stage of the protein BERT (the whole model when pp == 1).

    ``forward(tokens | hidden, attention_mask, position_ids)`` returns the hidden states [b, s, h] on every stage
    but the last, and the vocab-parallel MLM logits shard [b, s, padded_vocab / tp] on the last.
    ``attention_mask`` is boolean, True = masked out, broadcastable to [b, heads, s, s] (see
    :func:`padding_attention_mask` and ``data.mlm_dataset.attention_mask_from_segments``).

    Sparse prediction: given ``prediction_mask`` ([b, s] bool, True where the masked-LM loss scores a prediction),
    the last stage returns the logits of those positions only, ``[n, padded_vocab / tp]`` in row-major order (so
    ``labels[prediction_mask]`` lines up with them, see :func:`predicted_labels`), and its last transformer layer
    computes queries, attention output, MLP and residuals only there; keys and values still come from every
    position. With dropout off (``hidden_dropout = attention_dropout = 0``, or in eval) the loss and every gradient
    are those of the dense model (the MLM loss reads nothing else). With dropout on they are not: the last layer
    draws its masks for ``[b, m, ...]`` tensors instead of ``[b, s, ...]`` ones, so the masks at the predicted
    positions come from other random numbers (the same distribution, another sample; the streams after that
    layer differ too). The
    last layer's and the head's work shrink to the masked fraction (15%), which saves about 0.7 / L of a step
    for L layers. (The MLM head at masked positions only is the "sparse prediction" of Geiping & Goldstein 2023,
    Cramming, arXiv:2212.14034; the last layer's queries follow from the same argument.)
    """

    #: Checkpoints hold Megatron BERT weights (``training.checkpointing`` loads any Megatron BERT into it).
    megatron_bert = True

    def __init__(self, config: BertConfig, groups: Optional[scg.ParallelGroups] = None,
                 pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                 layers: Optional[range] = None):
        super().__init__()
        groups = groups if groups is not None else scg.current()
        tp, pp = groups.size("tp"), groups.size("pp")
        config.check_parallel(tp, pp)
        self.config = config
        self.groups = groups
        self.pre_process = groups.is_first("pp") if pre_process is None else pre_process
        self.post_process = groups.is_last("pp") if post_process is None else post_process
        if layers is None:  # this rank's pipeline stage (a model chunk of the interleaved schedule passes its own)
            layers = stage_layer_range(config.num_layers, pp, groups.rank_in("pp"))
        self.first_layer = layers.start
        self.language_model = LanguageModel(config, groups, self.pre_process, self.post_process,
                                            layers.start, len(layers))
        if self.post_process:
            with seeded_init(config.init_seed + 1 + config.num_layers):
                self.lm_head = MLMHead(config, groups)
            if not self.pre_process:
                # Last stage of a pipeline: its own copy of the word embedding for the tied decoder, drawn from
                # the embedding's seed so it starts equal to the first stage's; gradients are summed over the
                # 'pp_ends' group so the two copies stay equal (Megatron's word_embeddings_for_head).
                with seeded_init(config.init_seed):
                    head_embedding = tp_layers.VocabParallelEmbedding(
                        config.padded_vocab_size(tp), config.hidden_size,
                        init_method=normal_init(config.init_method_std), groups=groups)
                self.word_embeddings_for_head = head_embedding
                # Counted once in the global gradient norm: the first stage's copy is the one that counts.
                self.word_embeddings_for_head.weight.shared = True
        else:
            self.lm_head = None

    def state_dict_for_save_checkpoint(self, state_dict: Optional[dict] = None) -> dict:
        """This stage's weights in Megatron-LM's nested BERT layout (``{'language_model': {'embedding': ...,
        'encoder': ...}, 'lm_head': ..., 'word_embeddings_for_head': ...}``), what Megatron-LM's
        ``BertModel.load_state_dict`` reads. Tensors are detached copies (not views of the data-parallel flat
        buffer), so each is saved alone. ``state_dict``: a flat state of this model to nest instead of its own
        (the optimizer's float32 main parameters of a bf16 run)."""
        state = self.state_dict() if state_dict is None else state_dict
        return megatron_layout.nest_bert_state({key: value.detach().clone() for key, value in state.items()})

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also takes Megatron-LM's nested layout and the key names of other
        Megatron-LM and ProteinLM versions (:func:`megatron_layout.canonical_bert_state`)."""
        return super().load_state_dict(megatron_layout.canonical_bert_state(state_dict), strict=strict,
                                       assign=assign)

    def shared_embedding_weight(self) -> Optional[torch.Tensor]:
        """The word-embedding copy whose gradient must be summed across the pipeline ends (None when pp == 1
        or on a middle stage)."""
        if self.groups.size("pp") == 1:
            return None
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        if self.post_process:
            return self.word_embeddings_for_head.weight
        return None

    def decoder_weight(self) -> torch.Tensor:
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        return self.word_embeddings_for_head.weight

    def forward(self, input_: torch.Tensor, attention_mask: Optional[torch.Tensor],
                position_ids: Optional[torch.Tensor] = None,
                prediction_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pre_process:
            tokens = input_
            if position_ids is None:
                position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            hidden = self.language_model.embedding(tokens, position_ids)
        else:
            hidden = input_
        if not self.post_process:
            return self.language_model.encoder(hidden, attention_mask)
        if prediction_mask is None:
            hidden = self.language_model.encoder(hidden, attention_mask)
        elif not self.config.sequence_parallel:
            if prediction_mask.shape != hidden.shape[:2]:
                raise ValueError(f"prediction_mask must be [b, s] = {tuple(hidden.shape[:2])}, got "
                                 f"{tuple(prediction_mask.shape)}")
            query_index, valid = prediction_positions(prediction_mask)
            hidden = self.language_model.encoder(hidden, attention_mask, query_index)[valid]  # [n, h]
        else:
            # Sequence parallel: the last layer's m queries are split over tp after attention (m padded to a
            # multiple of tp), the head scores this rank's slice and gathers the logits of all m.
            tp = self.groups.size("tp")
            if prediction_mask.shape[0] != hidden.shape[0] or prediction_mask.shape[1] != hidden.shape[1] * tp:
                raise ValueError(f"prediction_mask must be [b, s] = {(hidden.shape[0], hidden.shape[1] * tp)}, got "
                                 f"{tuple(prediction_mask.shape)}")
            query_index, valid = prediction_positions(prediction_mask, multiple_of=tp)
            hidden = self.language_model.encoder(hidden, attention_mask, query_index)  # [b, m/tp, h]
            return self.lm_head(hidden, self.decoder_weight())[valid]                  # [n, V/tp]
        return self.lm_head(hidden, self.decoder_weight())



class ProteinBertChunks(nn.Module):
    """The model chunks of one pipeline rank under the interleaved 1F1B schedule (Megatron-LM's
    ``--num-layers-per-virtual-pipeline-stage``; Narayanan et al. 2021, section 2.2.2).

    Chunk c of pipeline rank r is virtual stage ``c * pp + r`` (:func:`~megatron_protein.parallel.pipeline.
    virtual_stage_layer_range`): a :class:`ProteinBertModel` with those layers, numbered locally from 0 as Megatron
    stores them, the embedding only in chunk 0 of the first rank and the final LayerNorm, MLM head and (pp > 1) the
    tied ``word_embeddings_for_head`` copy only in the last chunk of the last rank. Checkpoints hold one entry per
    chunk, ``model0``, ``model1``, ... (:meth:`state_dicts_for_save_checkpoint`), each in the nested layout of one
    Megatron BERT, as Megatron-LM saves a list of model chunks; the converter reads them
    (:mod:`megatron_protein.conversion.megatron_checkpoint`). Parameters register chunk by chunk, so the flat
    data-parallel buffers and the optimizer see chunk 0's first.
    """

    megatron_bert = True

    def __init__(self, config: BertConfig, groups: Optional[scg.ParallelGroups] = None, num_chunks: int = 2):
        super().__init__()
        groups = groups if groups is not None else scg.current()
        pp, rank = groups.size("pp"), groups.rank_in("pp")
        if num_chunks < 2:
            raise ValueError(f"ProteinBertChunks holds at least 2 model chunks, got {num_chunks}; use "
                             f"ProteinBertModel for one")
        if pp < 2:
            raise ValueError(f"{num_chunks} model chunks (virtual pipeline stages) need pipeline-model-parallel size "
                             f">= 2, got {pp}")
        self.config, self.groups, self.num_chunks = config, groups, num_chunks
        self.chunks = nn.ModuleList(
            ProteinBertModel(config, groups, pre_process=rank == 0 and c == 0,
                             post_process=rank == pp - 1 and c == num_chunks - 1,
                             layers=virtual_stage_layer_range(config.num_layers, pp, num_chunks, rank, c))
            for c in range(num_chunks))

    def shared_embedding_weight(self) -> Optional[torch.Tensor]:
        """This rank's copy of the tied word embedding (chunk 0 of the first rank, the last chunk of the last)."""
        weights = [w for w in (chunk.shared_embedding_weight() for chunk in self.chunks) if w is not None]
        return weights[0] if weights else None

    def state_dicts_for_save_checkpoint(self) -> dict[str, dict]:
        """``{'model0': ..., 'model1': ...}``: each chunk in Megatron-LM's nested BERT layout."""
        return {f"model{c}": chunk.state_dict_for_save_checkpoint() for c, chunk in enumerate(self.chunks)}

    def forward(self, *args, **kwargs):
        raise TypeError("ProteinBertChunks is run chunk by chunk by the pipeline schedule: call model.chunks[c]")


def build_model(config: BertConfig, groups: Optional[scg.ParallelGroups] = None, num_chunks: int = 1):
    """This rank's part of the protein BERT: a :class:`ProteinBertModel` (its pipeline stage), or with
    ``num_chunks > 1`` the :class:`ProteinBertChunks` of the interleaved schedule. ``model_chunks(model)`` lists
    the chunks either way."""
    if num_chunks > 1:
        return ProteinBertChunks(config, groups, num_chunks)
    return ProteinBertModel(config, groups)


def model_chunks(model: nn.Module) -> list[nn.Module]:
    """The model chunks of ``model`` in virtual-stage order: ``model.chunks`` or ``[model]``."""
    return list(model.chunks) if isinstance(model, ProteinBertChunks) else [model]

def prediction_positions(prediction_mask: torch.Tensor, multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, s] bool -> (index [b, m] long, valid [b, m] bool), m = max(1, most predictions in a row), rounded up to
    ``multiple_of`` (at most s; sequence parallelism splits the m queries over tp).

    Row i's first ``count_i`` entries of ``index`` are its predicted positions in increasing order; the rest
    (``valid`` False) are other positions of the row, computed and then dropped, so that every row has m queries
    (one [b, m] batch instead of ragged rows; m >= 1 keeps shapes non-empty)."""
    prediction_mask = prediction_mask.bool()
    counts = prediction_mask.sum(dim=1)
    m = max(1, int(counts.max())) if counts.numel() else 1
    m = min(prediction_mask.shape[1], -(-m // multiple_of) * multiple_of)
    # A stable sort of "not predicted" (0 before 1) lists each row's predicted positions first, in order.
    order = torch.argsort((~prediction_mask).to(torch.int8), dim=1, stable=True)
    index = order[:, :m]
    valid = torch.arange(index.shape[1], device=index.device)[None, :] < counts[:, None]
    return index, valid


def predicted_labels(labels: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels and loss mask that line up with the sparse logits of ``forward(..., prediction_mask=loss_mask)``:
    (labels[loss_mask] [n], ones [n])."""
    selected = loss_mask.bool()
    labels = labels[selected]
    return labels, torch.ones_like(labels, dtype=torch.float32)


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [b, s, h], index [b, m] -> x at those positions [b, m, h] (backward scatters the gradient back)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def mask_rows_at(mask: Optional[torch.Tensor], index: torch.Tensor) -> Optional[torch.Tensor]:
    """The attention mask [b|1, heads|1, s|1, s] of the queries at ``index`` [b, m]: its query rows gathered
    (a mask that is the same for every query, [..., 1, s], is returned as it is)."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    b, m = index.shape
    mask = mask.expand(b, *mask.shape[1:])
    return torch.gather(mask, 2, index[:, None, :, None].expand(b, mask.shape[1], m, mask.shape[-1]))


def padding_attention_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] bool (True at real tokens) -> [b, 1, 1, s] bool, True where the key is padding (masked out)."""
    return (~padding_mask.bool())[:, None, None, :]


def masked_lm_loss(logits_shard: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   groups: Optional[scg.ParallelGroups] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the positions chosen for prediction, from the vocab-parallel logits shard.

    Returns (loss, number of predicted tokens). Labels are -100 where nothing is predicted (ignored through
    ``loss_mask``). The logits are never gathered across tp (Megatron's vocab_parallel_cross_entropy).
    """
    per_token = tp_layers.vocab_parallel_cross_entropy(logits_shard, labels, groups=groups, ignore_index=-100)
    loss_mask = loss_mask.float()
    count = loss_mask.sum()
    return (per_token * loss_mask).sum() / count.clamp(min=1.0), count
