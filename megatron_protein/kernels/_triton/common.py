"""Helpers shared by the Triton kernels: launch sizes and broadcast strides."""
from __future__ import annotations

import torch
import triton
import triton.language as tl  # noqa: F401 - must be visible to the @triton.jit helper below

MAX_BROADCAST_DIMS = 5


def broadcast_strides_5d(t: torch.Tensor, shape: torch.Size) -> list[int]:
    """Strides (in elements) of ``t`` expanded to ``shape``, left-padded to 5 dims; broadcast dims get stride 0."""
    if len(shape) > MAX_BROADCAST_DIMS:
        raise ValueError(f"Triton kernels take tensors of at most {MAX_BROADCAST_DIMS} dims, got shape {tuple(shape)}")
    expanded = t.expand(shape)
    strides = [0] * (MAX_BROADCAST_DIMS - len(shape)) + list(expanded.stride())
    return [0 if size == 1 else s for size, s in zip(pad_shape_5d(shape), strides)]


def pad_shape_5d(shape: torch.Size) -> list[int]:
    return [1] * (MAX_BROADCAST_DIMS - len(shape)) + list(shape)


@triton.jit
def broadcast_offset_5d(index, d1, d2, d3, d4, s0, s1, s2, s3, s4):
    """Offset of row-major flat ``index`` of a [d0, d1, d2, d3, d4] tensor with strides s0..s4 (0 = broadcast)."""
    i4 = index % d4
    rest = index // d4
    i3 = rest % d3
    rest = rest // d3
    i2 = rest % d2
    rest = rest // d2
    i1 = rest % d1
    i0 = rest // d1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4


def block_size(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))
