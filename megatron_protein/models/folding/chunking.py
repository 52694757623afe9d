"""Memory options of the Evoformer: chunked inference (supplement 1.11.8) and per-block activation recompute.

* :func:`chunk_layer` runs a layer over slices of its batch-like dimensions and writes each slice's result into one
  output tensor, so the layer's intermediates (attention logits, the 4x-wide transition hidden, the outer product)
  exist for one chunk at a time. It is exact: every module it is used on treats those dimensions independently
  (MSA rows in row attention, columns in column attention, positions in the transitions, the first residue in the
  outer product mean, pair rows in triangle attention), so chunked and unchunked results are the same function.
  The modules take ``chunk_size`` in ``forward`` (OpenFold's and AlphaFold's inference knob, ``--chunk_size``);
  ``None`` means no chunking, the training default.
* :func:`checkpoint_block` recomputes a block's activations in backward (``torch.utils.checkpoint``,
  non-reentrant, RNG state preserved so dropout draws the same masks): gradients equal those without recompute.
* Tiled attention for long sequences is a kernel choice (``FusionConfig(attention_tile_size=...)``), made when the
  block is built; it changes memory, not results.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence

import torch
import torch.utils.checkpoint


def autocast_state(t: torch.Tensor) -> tuple:
    """The autocast setting in force for ``t``'s device, for a custom autograd function to save in forward."""
    device_type = t.device.type
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def autocast_as(state: tuple):
    """``with autocast_as(ctx.autocast):`` in backward recomputes under the forward's autocast setting (bf16
    training recomputes in bf16, as its forward ran), the way ``torch.amp.custom_bwd`` does for one device type."""
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _batch_shape(inputs: Sequence[Optional[torch.Tensor]], num_batch_dims: int) -> torch.Size:
    shapes = []
    for t in inputs:
        if t is None:
            continue
        if t.dim() < num_batch_dims:
            raise ValueError(f"chunk_layer: an input of shape {tuple(t.shape)} has fewer than the "
                             f"{num_batch_dims} batch dimensions being chunked")
        shapes.append(t.shape[:num_batch_dims])
    if not shapes:
        raise ValueError("chunk_layer: no tensor inputs")
    return torch.broadcast_shapes(*shapes)


def chunk_layer(fn: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]], chunk_size: int,
                num_batch_dims: int) -> torch.Tensor:
    """``fn(*inputs)`` computed ``chunk_size`` entries of the last of the leading ``num_batch_dims`` dims at a time.

    Every input carries those leading dims (size 1 where it is shared, e.g. a bias broadcast over MSA rows; such a
    dim is never sliced); ``None`` inputs pass through. ``fn`` must map inputs of batch shape ``[1.., n]`` to one
    tensor with that leading batch shape. The chunks are views (nothing is copied or expanded, so a bias shared
    over rows stays one tensor); with several leading batch entries (a batch of proteins) each is chunked in turn.
    Each chunk's result is written into one preallocated output, so no list of pieces is concatenated at the end.
    """
    if chunk_size is None or chunk_size <= 0:
        raise ValueError(f"chunk_layer: chunk_size must be a positive int, got {chunk_size!r}")
    if num_batch_dims < 1:
        raise ValueError(f"chunk_layer: num_batch_dims must be at least 1, got {num_batch_dims}")
    batch_shape = _batch_shape(inputs, num_batch_dims)
    last = num_batch_dims - 1
    length = batch_shape[last]
    if length <= chunk_size and math.prod(batch_shape[:last]) == 1:
        return fn(*inputs)

    def select(t: Optional[torch.Tensor], lead: tuple, start: int, end: int) -> Optional[torch.Tensor]:
        if t is None:
            return None
        index = tuple(slice(i, i + 1) if t.shape[d] != 1 else slice(None) for d, i in enumerate(lead))
        t = t[index]
        return t if t.shape[last] == 1 else t.narrow(last, start, end - start)

    out = None
    for lead in itertools.product(*(range(n) for n in batch_shape[:last])):
        for start in range(0, length, chunk_size):
            end = min(start + chunk_size, length)
            y = fn(*(select(t, lead, start, end) for t in inputs))
            if out is None:
                out = y.new_empty((*batch_shape, *y.shape[num_batch_dims:]))
            out[tuple(slice(i, i + 1) for i in lead)].narrow(last, start, end - start).copy_(y)
            del y
    return out


#: Batch chunks of the recomputed attention core hold about this many logits (32 MiB in float32).
ATTENTION_CHUNK_ELEMENTS = 1 << 23


def attention_recompute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                        mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``softmax(scale q k^T + bias, masked) v`` for ``q, k, v [*, B, H, Q, c]``, keeping no probabilities.

    float32/float64 on CPU: :func:`~megatron_protein.kernels.flash_attention_cpu.flash_attention_cpu` (PyTorch's
    fused CPU flash kernel forward, probabilities recomputed from its log-sum-exp in backward), B in chunks of about
    :data:`ATTENTION_CHUNK_ELEMENTS` logits. Otherwise (half precision, other devices) the batch dim B is cut into
    chunks of that size and each chunk goes through the kernels'
    :func:`~megatron_protein.kernels.tiled_attention` with one tile spanning all queries and keys, which also saves
    only its output and log-sum-exp (FlashAttention's backward, Dao et al. 2022). Both are the same function as the
    plain core; training memory O(chunk H Q K) instead of O(B H Q K) saved probabilities plus as much again for
    their gradient. ``bias`` (``[*, 1, H, Q, K]``, shared over B) and ``mask`` (``[*, B|1, 1|H, 1|Q, K]``)
    broadcast as usual.
    """
    from megatron_protein.kernels import flash_attention_cpu, tiled_attention
    if flash_attention_cpu.available(q) and q.dim() >= 4:
        return flash_attention_cpu.flash_attention_cpu(q, k, v, bias, mask, scale,
                                                       chunk_elements=ATTENTION_CHUNK_ELEMENTS)
    n_q, n_k = q.shape[-2], k.shape[-2]
    per_row = q.shape[-3] * n_q * n_k
    rows = max(1, ATTENTION_CHUNK_ELEMENTS // max(1, per_row))

    def core(q_, k_, v_, bias_, mask_):
        return tiled_attention(q_, k_, v_, bias_, mask_, scale, q_tile=n_q, k_tile=n_k)

    return chunk_layer(core, (q, k, v, bias, mask), rows, num_batch_dims=q.dim() - 3)


def checkpoint_block(fn: Callable[..., tuple], *args, **kwargs):
    """``fn(*args, **kwargs)`` with its activations recomputed in backward (non-reentrant checkpoint).

    Only when autograd is recording; otherwise (inference) ``fn`` just runs. The RNG state is saved and restored
    for the recompute, so dropout masks are the same and so are the gradients.
    """
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
