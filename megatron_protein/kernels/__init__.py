"""Fused layers for the protein BERT and the Evoformer: a Triton kernel for CUDA and a PyTorch reference for each
op, chosen by one dispatcher (:mod:`megatron_protein.kernels.dispatch`).

Build-time choice, as Megatron's ``FusedScaleMaskSoftmax``: every module takes ``fused=True|False`` in its
constructor and never in ``forward``. ``fused=True`` runs Triton on CUDA tensors when triton is installed and the
fast PyTorch reference otherwise; ``fused=False`` runs the plain composition of torch ops.
"""
from megatron_protein.kernels import dispatch
from megatron_protein.kernels.attention import CoreAttention
from megatron_protein.kernels.bias_dropout_add import BiasDropoutAdd
from megatron_protein.kernels.bias_gelu import BiasGeLU
from megatron_protein.kernels.config import FusionConfig
from megatron_protein.kernels.gated_attention import GatedSelfAttention
from megatron_protein.kernels.layer_norm import LayerNorm
from megatron_protein.kernels.softmax import PairBiasSoftmax, ScaleMaskSoftmax, masked_softmax
from megatron_protein.kernels.tiled_attention import tiled_attention

__all__ = [
    "dispatch",
    "LayerNorm",
    "ScaleMaskSoftmax",
    "PairBiasSoftmax",
    "masked_softmax",
    "BiasGeLU",
    "BiasDropoutAdd",
    "CoreAttention",
    "GatedSelfAttention",
    "tiled_attention",
    "FusionConfig",
]
