"""Rigid frames (rotation + translation) in torch: batched, differentiable, fp32 math.

A frame ``T = (R, t)`` maps local coordinates to global ones, ``x_global = R x_local + t`` (AlphaFold2 supplement
section 1.1, "Rigid transformations", and section 1.8). The structure module (Algorithms 20-23) and FAPE
(Algorithm 28) are written in terms of the few operations here: frames from three points (Algorithm 21),
composition, inversion, application to points, and the quaternion backbone update (Algorithm 23).

Precision. Rotations are products and sums of O(1) numbers whose errors compound over the eight structure-module
iterations; in bf16 (8 bits of mantissa) a composed rotation drifts visibly from orthonormal after one step. So
every operation here computes in float32 at least: tensors of a lower precision (bf16, fp16) are upcast on entry,
and results are float32. float64 inputs stay float64 (the gradient checks use it). Products are written as
elementwise multiply-and-sum, which ``torch.autocast`` leaves alone, so an autocast region cannot pull the
geometry back to bf16 either. Callers that want bf16 downstream cast the result themselves.

Shapes: ``rots [*, 3, 3]``, ``trans [*, 3]``; ``*`` is any batch shape (e.g. ``[B, L]``), and operations
broadcast over it like torch tensors do.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 (and integer) tensors to float32; keep float32/float64 as they are."""
    if x.dtype in _LOW_PRECISION or not x.is_floating_point():
        return x.float()
    return x


def _common(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    a, b = _at_least_fp32(a), _at_least_fp32(b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def rot_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for rotation matrices ``[*, 3, 3]`` (broadcast), in fp32 at least, outside autocast's reach."""
    a, b = _common(a, b)
    return (a[..., :, :, None] * b[..., None, :, :]).sum(dim=-2)


def rot_vec_mul(r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``r @ v`` for ``r [*, 3, 3]`` and ``v [*, 3]`` (broadcast), in fp32 at least."""
    r, v = _common(r, v)
    return (r * v[..., None, :]).sum(dim=-1)


def quat_to_rot(quat: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Quaternion ``(w, x, y, z) [*, 4]`` -> rotation matrix ``[*, 3, 3]`` (supplement Algorithm 23, line 3).

    With ``normalize`` the quaternion is divided by its norm first, so any non-zero 4-vector gives a rotation.
    """
    q = _at_least_fp32(quat)
    if normalize:
        q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    w, x, y, z = q.unbind(dim=-1)
    rows = (
        (w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z),
    )
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def rot_to_quat(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrix ``[*, 3, 3]`` -> unit quaternion ``(w, x, y, z) [*, 4]`` with ``w >= 0``.

    Shepperd's method: of the four algebraically equivalent formulas, use the one whose pivot
    (``1 + trace`` or ``1 + 2 R_ii - trace``) is largest, which avoids dividing by a small number.
    """
    r = _at_least_fp32(rot)
    m00, m01, m02 = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
    m10, m11, m12 = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
    m20, m21, m22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
    pivots = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )
    # Candidate i is 4*q_i times q; take it from the row with the largest pivot 4*q_i^2.
    candidates = torch.stack(
        [
            torch.stack([pivots[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, pivots[..., 1], m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, pivots[..., 2], m21 + m12], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, pivots[..., 3]], dim=-1),
        ],
        dim=-2,
    )
    best = pivots.argmax(dim=-1)
    chosen = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = chosen / (2 * torch.sqrt(torch.gather(pivots, -1, best[..., None]).clamp_min(1e-12)))
    return torch.where(q[..., :1] < 0, -q, q)


class Rigid:
    """A batch of rigid transformations ``T = (R, t)``; immutable: every method returns a new ``Rigid``.

    ``rots [*, 3, 3]`` (orthonormal, det 1), ``trans [*, 3]``; ``x_global = R x_local + t``. Stored in float32
    (float64 kept if given); see the module docstring for why.
    """

    __slots__ = ("rots", "trans")

    def __init__(self, rots: torch.Tensor, trans: torch.Tensor):
        rots, trans = _common(rots, trans)
        if rots.shape[-2:] != (3, 3) or trans.shape[-1] != 3:
            raise ValueError(f"Rigid expects rots [*, 3, 3] and trans [*, 3], got {tuple(rots.shape)} and {tuple(trans.shape)}")
        if rots.shape[:-2] != trans.shape[:-1]:
            shape = torch.broadcast_shapes(rots.shape[:-2], trans.shape[:-1])
            rots = rots.expand(*shape, 3, 3)
            trans = trans.expand(*shape, 3)
        self.rots = rots
        self.trans = trans

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def identity(
        cls,
        shape: Sequence[int],
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[str, torch.device]] = None,
        requires_grad: bool = False,
    ) -> "Rigid":
        """Identity frames of batch shape ``shape`` (the structure module's start, Algorithm 20 line 4)."""
        dtype = torch.float32 if dtype is None or dtype in _LOW_PRECISION else dtype
        rots = torch.eye(3, dtype=dtype, device=device).expand(*shape, 3, 3).clone()
        trans = torch.zeros(*shape, 3, dtype=dtype, device=device)
        rots.requires_grad_(requires_grad)
        trans.requires_grad_(requires_grad)
        return cls(rots, trans)

    @classmethod
    def from_3_points(
        cls,
        p_neg_x_axis: torch.Tensor,
        origin: torch.Tensor,
        p_xy_plane: torch.Tensor,
        eps: float = 1e-12,
    ) -> "Rigid":
        """Frames from three points by Gram-Schmidt: supplement Algorithm 21, ``rigidFrom3Points(x1, x2, x3)``.

        Called as ``from_3_points(p_neg_x_axis=N, origin=CA, p_xy_plane=C)`` for backbone frames (the keyword
        names are OpenFold's; the construction is Algorithm 21's): with ``x1 = p_neg_x_axis``, ``x2 = origin``,
        ``x3 = p_xy_plane``,

            e1 = (x3 - x2) / |x3 - x2|                  (x axis along CA->C: C lies on +x)
            u2 = (x1 - x2) - e1 <e1, x1 - x2>,  e2 = u2 / |u2|   (N in the xy plane, y > 0; x < 0 for N-CA-C > 90)
            e3 = e1 x e2,   R = [e1 e2 e3] (columns),   t = x2.

        This is the frame of AF2's ideal coordinates (residue_constants: C on +x, N at (-0.525, 1.363, 0) for ALA).
        Note that OpenFold's ``Rigid.from_3_points`` with the same arguments puts the x axis along N->CA instead:
        the two frames differ by a rotation about z. ``eps`` is a floor on the squared norms, so coincident points
        (padding) give finite values and gradients instead of NaN.
        """
        x1, x2 = _common(p_neg_x_axis, origin)
        x3 = _at_least_fp32(p_xy_plane).to(x1.dtype)
        v1 = x3 - x2
        v2 = x1 - x2
        # Norms are clamped (not shifted) by eps: exact unit vectors for real points, finite gradients (zero) for
        # coincident ones such as padding rows.
        e1 = v1 / torch.sqrt(torch.clamp_min((v1 * v1).sum(-1, keepdim=True), eps))
        u2 = v2 - e1 * (e1 * v2).sum(-1, keepdim=True)
        e2 = u2 / torch.sqrt(torch.clamp_min((u2 * u2).sum(-1, keepdim=True), eps))
        e3 = torch.cross(e1, e2, dim=-1)
        rots = torch.stack([e1, e2, e3], dim=-1)
        return cls(rots, x2)

    @classmethod
    def from_tensor_4x4(cls, t: torch.Tensor) -> "Rigid":
        """Homogeneous matrices ``[*, 4, 4]`` (rotation top-left, translation in the last column) -> ``Rigid``."""
        if t.shape[-2:] != (4, 4):
            raise ValueError(f"from_tensor_4x4 expects [*, 4, 4], got {tuple(t.shape)}")
        return cls(t[..., :3, :3], t[..., :3, 3])

    @staticmethod
    def cat(rigids: Sequence["Rigid"], dim: int) -> "Rigid":
        """Concatenate along batch dimension ``dim`` (counted in the batch shape, negative allowed)."""
        rots = torch.cat([r.rots for r in rigids], dim=dim if dim >= 0 else dim - 2)
        trans = torch.cat([r.trans for r in rigids], dim=dim if dim >= 0 else dim - 1)
        return Rigid(rots, trans)

    @staticmethod
    def stack(rigids: Sequence["Rigid"], dim: int) -> "Rigid":
        """Stack along a new batch dimension ``dim`` (counted in the batch shape, negative allowed)."""
        rots = torch.stack([r.rots for r in rigids], dim=dim if dim >= 0 else dim - 2)
        trans = torch.stack([r.trans for r in rigids], dim=dim if dim >= 0 else dim - 1)
        return Rigid(rots, trans)

    # -- algebra ------------------------------------------------------------------------------------------------

    def compose(self, other: "Rigid") -> "Rigid":
        """``self ∘ other``: apply ``other`` first, then ``self`` (``R = R1 R2``, ``t = R1 t2 + t1``)."""
        return Rigid(rot_matmul(self.rots, other.rots), rot_vec_mul(self.rots, other.trans) + self.trans)

    def invert(self) -> "Rigid":
        """``T^-1 = (R^T, -R^T t)``."""
        rots_t = self.rots.transpose(-1, -2)
        return Rigid(rots_t, -rot_vec_mul(rots_t, self.trans))

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """``R x + t`` for points ``[*, 3]`` broadcast against the batch shape; float32 (or float64) result."""
        return rot_vec_mul(self.rots, points) + self.trans

    def invert_apply(self, points: torch.Tensor) -> torch.Tensor:
        """``R^T (x - t)``: global points into the local frame (FAPE, Algorithm 28 line 2)."""
        points = _at_least_fp32(points)
        return rot_vec_mul(self.rots.transpose(-1, -2), points - self.trans)

    def compose_q_update_vec(self, update: torch.Tensor) -> "Rigid":
        """Backbone update of supplement Algorithm 23, composed onto ``self`` (Algorithm 20, line 10).

        ``update [*, 6] = (b, c, d, t_x, t_y, t_z)``: the non-unit quaternion ``(1, b, c, d)`` is normalised to a
        rotation ``R_u`` and ``t_u = (t_x, t_y, t_z)``; the result is ``self ∘ (R_u, t_u)``.
        """
        update = _at_least_fp32(update)
        bcd, t_u = update[..., :3], update[..., 3:]
        quat = torch.cat([torch.ones_like(bcd[..., :1]), bcd], dim=-1)
        return self.compose(Rigid(quat_to_rot(quat, normalize=True), t_u))

    def stop_rot_gradient(self) -> "Rigid":
        """Same frames with the rotation detached: AF2 stops the rotation gradient between structure-module
        iterations for stability (supplement 1.8.1 and Algorithm 20, line 20)."""
        return Rigid(self.rots.detach(), self.trans)

    def scale_translation(self, factor: float) -> "Rigid":
        """Translation times ``factor`` (AF2 works in nm inside the structure module: factor 10 to Angstrom)."""
        return Rigid(self.rots, self.trans * factor)

    def to_tensor_4x4(self) -> torch.Tensor:
        """Homogeneous matrices ``[*, 4, 4]``; the ``backbone_rigid_tensor`` feature uses this layout."""
        out = self.rots.new_zeros(*self.shape, 4, 4)
        out[..., :3, :3] = self.rots
        out[..., :3, 3] = self.trans
        out[..., 3, 3] = 1.0
        return out

    def to_quat(self) -> torch.Tensor:
        """Rotations as unit quaternions ``(w, x, y, z) [*, 4]``."""
        return rot_to_quat(self.rots)

    # -- tensor-like --------------------------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return self.trans.shape[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.trans.dtype

    @property
    def device(self) -> torch.device:
        return self.trans.device

    def __getitem__(self, index) -> "Rigid":
        """Index the batch dimensions, e.g. ``rigid[:, 3]`` or ``rigid[..., None]``."""
        if not isinstance(index, tuple):
            index = (index,)
        return Rigid(self.rots[index + (slice(None), slice(None))], self.trans[index + (slice(None),)])

    def unsqueeze(self, dim: int) -> "Rigid":
        """New batch dimension at ``dim`` (counted in the batch shape; negative counts from its end)."""
        if dim < 0:
            dim = len(self.shape) + 1 + dim
        return Rigid(self.rots.unsqueeze(dim), self.trans.unsqueeze(dim))

    def reshape(self, *shape: int) -> "Rigid":
        return Rigid(self.rots.reshape(*shape, 3, 3), self.trans.reshape(*shape, 3))

    def map_tensor_fn(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Rigid":
        """Apply ``fn`` (acting on the last batch dimension, e.g. a masked sum) to each component."""
        rots = torch.stack([fn(c) for c in self.rots.flatten(-2).unbind(-1)], dim=-1)
        trans = torch.stack([fn(c) for c in self.trans.unbind(-1)], dim=-1)
        return Rigid(rots.unflatten(-1, (3, 3)), trans)

    def detach(self) -> "Rigid":
        return Rigid(self.rots.detach(), self.trans.detach())

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Rigid":
        """Move (and optionally cast; lower precisions than fp32 are refused by the constructor's upcast)."""
        return Rigid(self.rots.to(device=device, dtype=dtype), self.trans.to(device=device, dtype=dtype))

    def __repr__(self) -> str:
        return f"Rigid(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"
