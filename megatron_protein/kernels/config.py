"""One config for every fusion choice, for models that want to carry them as a unit (the folding model's
equivalent of Megatron's ``--no-masked-softmax-fusion``, ``--no-bias-gelu-fusion``, ``--no-bias-dropout-fusion``).

The protein BERT keeps these four flags on its own ``BertConfig`` (Megatron names); the Evoformer can hold a
``FusionConfig`` and build its layers through the factory methods, so a fused/unfused switch is one field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from megatron_protein.kernels.attention import CoreAttention
from megatron_protein.kernels.bias_dropout_add import BiasDropoutAdd
from megatron_protein.kernels.bias_gelu import BiasGeLU
from megatron_protein.kernels.gated_attention import GatedSelfAttention
from megatron_protein.kernels.layer_norm import LayerNorm
from megatron_protein.kernels.softmax import PairBiasSoftmax, ScaleMaskSoftmax


@dataclass(frozen=True, kw_only=True, slots=True)
class FusionConfig:
    masked_softmax_fusion: bool = True   # softmax, core attention and the gated-attention core
    bias_gelu_fusion: bool = True
    bias_dropout_fusion: bool = True
    layernorm_fusion: bool = True
    attention_tile_size: Optional[int] = None  # tiled (memory-efficient) gated attention on the reference path
    compile_elementwise: bool = False  # torch.compile the reference bias-GeLU / bias-dropout-add math

    def __post_init__(self):
        if self.attention_tile_size is not None and self.attention_tile_size <= 0:
            raise ValueError(f"FusionConfig: attention_tile_size must be positive or None, got "
                             f"{self.attention_tile_size}")

    @classmethod
    def unfused(cls) -> "FusionConfig":
        """Every op as the plain composition of torch ops (all --no-*-fusion flags)."""
        return cls(masked_softmax_fusion=False, bias_gelu_fusion=False, bias_dropout_fusion=False,
                   layernorm_fusion=False)

    def layer_norm(self, hidden_size: int, eps: float = 1e-5) -> LayerNorm:
        return LayerNorm(hidden_size, eps=eps, fused=self.layernorm_fusion)

    def scale_mask_softmax(self, scale: float) -> ScaleMaskSoftmax:
        return ScaleMaskSoftmax(scale, fused=self.masked_softmax_fusion)

    def pair_bias_softmax(self, scale: float = 1.0) -> PairBiasSoftmax:
        return PairBiasSoftmax(scale, fused=self.masked_softmax_fusion)

    def core_attention(self, head_dim: int, dropout_p: float = 0.0) -> CoreAttention:
        return CoreAttention(head_dim, dropout_p, fused=self.masked_softmax_fusion)

    def gated_self_attention(self, c_in: int, c_hidden: int, num_heads: int, gating: bool = True
                             ) -> GatedSelfAttention:
        return GatedSelfAttention(c_in, c_hidden, num_heads, gating=gating, fused=self.masked_softmax_fusion,
                                  tile_size=self.attention_tile_size)

    def bias_gelu(self) -> BiasGeLU:
        return BiasGeLU(fused=self.bias_gelu_fusion, compiled=self.compile_elementwise)

    def bias_dropout_add(self, p: float, broadcast_dim: Union[int, Sequence[int], None] = None) -> BiasDropoutAdd:
        return BiasDropoutAdd(p, fused=self.bias_dropout_fusion, broadcast_dim=broadcast_dim,
                              compiled=self.compile_elementwise)
