"""The non-matmul work of a transformer layer as one ``torch.compile``d chain on CPU (``--compile-layers``).

Why: in a bf16 training step on a CPU with AMX/AVX512-BF16 the matmuls run several times faster than in fp32, and
what remains is memory traffic: LayerNorm (computed in fp32 under CPU autocast) and the cast of its output to bf16,
bias + GeLU, bias + dropout + residual, scale + mask + softmax + dropout of the ``[b, h, s, s]`` scores, the
attention's head transposes, and the backward of each. Eager PyTorch runs every one of these as its own pass over
memory. Inductor (``torch.compile``) fuses each chain between two matmuls into one generated C++ loop, forward and
backward (AOTAutograd's min-cut partitioner also decides which intermediates to keep and which to recompute).

What is compiled: :func:`bert_layer_body`, one pre-LN BERT layer written in plain torch ops (the textbook
composition, which is what inductor fuses best), compiled once per process (``dynamic=False``) and shared by every
layer of the same shapes: the layers' parameters are graph inputs, so 12 layers cost one compilation of the forward
and one of the backward. The tensor-parallel collectives stay outside the graphs (``torch.compiler.disable``): at
tp = 1 there are none and the layer is one graph; at tp > 1 (and with sequence parallelism) the graph breaks at
each of them and inductor compiles the pieces in between.

Dropout masks are drawn *outside* the compiled graph, by the same function (:func:`~megatron_protein.kernels.
bias_dropout_add.bernoulli_keep_mask`), from the same generators (the default one for hidden dropout on replicated
activations, the tensor-parallel RNG tracker's stream for attention dropout and for hidden dropout on sequence
slices) and in the same order as the eager layer draws them, and passed in as bool tensors: a compiled layer drops
exactly the units the eager layer drops, so the two compute the same function with dropout on as well (to
rounding), and recompute (``--recompute-activations``) replays the masks as for the eager layer.

Where it runs: training steps on CPU tensors (``torch.is_grad_enabled()``); evaluation and CUDA tensors run the
eager layer (on CUDA the Triton kernels are the fused path), as does the last layer under sparse prediction (its
query count changes every batch). The first training step pays the compilation; :data:`COMPILE_SECONDS` records
the time of each first call (forward compilation plus one forward) and ``bench/pretrain.py`` reports compile time
and the number of steps after which it has paid for itself.

``MEGATRON_PROTEIN_COMPILE_BACKEND`` (default ``inductor``) picks ``torch.compile``'s backend; ``aot_eager`` traces
and differentiates the same graphs without generating code (seconds instead of a minute per graph), which the
multi-process tests use to check the graph breaks at the collectives.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_protein.parallel import collectives

#: Wall seconds of the first call of each compiled function in this process (compilation + one run).
COMPILE_SECONDS: dict[str, float] = {}

_COMPILED: dict[str, Callable] = {}


@torch.compiler.disable
def _copy_to_group(x, group):
    return collectives.copy_to_group(x, group)


@torch.compiler.disable
def _all_gather_sequence(x, group):
    return collectives.all_gather(x, -2, group)


@torch.compiler.disable
def _reduce_from_group(x, group):
    return collectives.reduce_from_group(x, group)


@torch.compiler.disable
def _reduce_scatter_sequence(x, group):
    return collectives.reduce_scatter_to_group(x, -2, group)


def _column_input(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    if group is None:
        return x
    return _all_gather_sequence(x, group) if sequence_parallel else _copy_to_group(x, group)


def _row_output(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    if group is None:
        return x
    return _reduce_scatter_sequence(x, group) if sequence_parallel else _reduce_from_group(x, group)


def _dropout(y: torch.Tensor, keep: Optional[torch.Tensor], p: float) -> torch.Tensor:
    return y if keep is None else torch.where(keep, y, 0.0) * (1.0 / (1.0 - p))


def bert_layer_body(x: torch.Tensor, mask: Optional[torch.Tensor], keep_attention: Optional[torch.Tensor],
                    keep_attention_output: Optional[torch.Tensor], keep_mlp_output: Optional[torch.Tensor],
                    ln1_weight, ln1_bias, qkv_weight, qkv_bias, dense_weight, dense_bias,
                    ln2_weight, ln2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                    eps: float, local_heads: int, head_dim: int, attention_dropout: float, hidden_dropout: float,
                    group=None, sequence_parallel: bool = False) -> torch.Tensor:
    """One pre-LN BERT layer (``models.bert.TransformerLayer``) in plain torch ops, for ``torch.compile``.

    ``x`` [b, s, h] (this rank's [b, s/tp, h] slice with sequence parallelism), ``mask`` bool [b|1, 1|heads, s|1,
    s] (True = masked out) or None, keep masks bool or None (no dropout): ``keep_attention`` [b, heads/tp, s, s],
    the two hidden ones shaped like ``x``. The weights are this tp rank's shards; the fused QKV rows are laid out
    per head ``[heads/tp, 3, head_dim]``. The same numerics as the eager layer: softmax accumulates in fp32 and
    returns the scores' dtype (bf16 under autocast), a query row whose keys are all masked gives a zero context,
    the row-parallel biases join the residual stream in its dtype.
    """
    hidden = x.shape[-1]
    y = F.layer_norm(x, (hidden,), ln1_weight, ln1_bias, eps)
    y = _column_input(y, group, sequence_parallel)
    qkv = F.linear(y, qkv_weight, qkv_bias)
    b, s = qkv.shape[0], qkv.shape[1]
    q, k, v = (t.transpose(1, 2) for t in qkv.view(b, s, local_heads, 3, head_dim).unbind(dim=3))
    scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-1, -2))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    if mask is not None:
        probs = probs.masked_fill(mask.all(dim=-1, keepdim=True), 0.0)
    probs = _dropout(probs, keep_attention, attention_dropout)
    context = torch.matmul(probs, v.to(probs.dtype)).transpose(1, 2).reshape(b, s, local_heads * head_dim)
    attention = _row_output(F.linear(context, dense_weight), group, sequence_parallel)
    h = x + _dropout(attention + dense_bias, keep_attention_output, hidden_dropout)
    z = F.layer_norm(h, (hidden,), ln2_weight, ln2_bias, eps)
    z = _column_input(z, group, sequence_parallel)
    intermediate = F.linear(z, fc1_weight)
    z = F.gelu(intermediate + fc1_bias.to(intermediate.dtype))
    mlp = _row_output(F.linear(z, fc2_weight), group, sequence_parallel)
    return h + _dropout(mlp + fc2_bias, keep_mlp_output, hidden_dropout)


def compiled(name: str, fn: Callable) -> Callable:
    """``torch.compile(fn)`` made once per process under ``name``; the first call's wall time is recorded in
    :data:`COMPILE_SECONDS`."""
    if name not in _COMPILED:
        backend = os.environ.get("MEGATRON_PROTEIN_COMPILE_BACKEND", "inductor")   # read when first compiled
        compiled_fn = torch.compile(fn, dynamic=False, backend=backend)

        def timed_first_call(*args, **kwargs):
            started = time.perf_counter()
            result = compiled_fn(*args, **kwargs)
            COMPILE_SECONDS.setdefault(name, time.perf_counter() - started)
            _COMPILED[name] = compiled_fn
            return result

        _COMPILED[name] = timed_first_call
    return _COMPILED[name]


def compile_modules(modules, name: str, training_only: bool = True) -> None:
    """Run every module of ``modules`` (one class, e.g. the layers of TAPE's encoder) through one ``torch.compile``
    of that class's ``forward``: the compiled code is shared (parameters are graph inputs), so the layers cost one
    compilation per input shape (after the first change of shape, one with dynamic shapes) and grad mode. With
    ``training_only`` calls without autograd (evaluation) run the eager forward, as the BERT layers do. The first
    call's time goes to :data:`COMPILE_SECONDS` under ``name``. Dropout inside such a module draws from inductor's
    own generator (other masks than eager; the same distribution)."""
    modules = list(modules)
    if not modules:
        return
    cls = type(modules[0])
    if any(type(m) is not cls for m in modules):
        raise TypeError(f"compile_modules: the modules must share one class, got "
                        f"{sorted({type(m).__name__ for m in modules})}")
    eager = cls.forward
    # The compiled code must not see the wrapper: compile the class's own forward, called with the module.
    compiled_forward = compiled(name, lambda module, *args, **kwargs: eager(module, *args, **kwargs))

    def forward(self, *args, **kwargs):
        if training_only and not torch.is_grad_enabled():
            return eager(self, *args, **kwargs)
        return compiled_forward(self, *args, **kwargs)

    for module in modules:
        module.forward = forward.__get__(module, cls)
