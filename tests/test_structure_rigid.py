"""Rigid frames (megatron_protein.structure.rigid) and residue constants.

Checked: Algorithm 21 frames are orthonormal with det 1 and put the three points where the algorithm says
(C on +x, N in the xy plane with y > 0); invert gives the identity; compose is associative; apply/invert_apply
round-trip; Algorithm 23 updates stay rotations; quat <-> rot round-trip; 4x4 round-trip; gradients pass
torch.autograd.gradcheck in float64; bf16 inputs (and autocast regions) give float32 results close to fp32 ones.
"""
import math

import numpy as np
import pytest
import torch

from megatron_protein.structure import residue_constants as rc
from megatron_protein.structure.rigid import Rigid, quat_to_rot, rot_to_quat


def _random_rigid(shape, generator, dtype=torch.float32):
    quat = torch.randn(*shape, 4, generator=generator, dtype=torch.float64)
    rots = quat_to_rot(quat)
    trans = torch.randn(*shape, 3, generator=generator, dtype=torch.float64) * 10
    return Rigid(rots.to(dtype), trans.to(dtype))


def _backbone_points(shape, generator, dtype=torch.float64):
    """Random N, CA, C triples that are not colinear."""
    ca = torch.randn(*shape, 3, generator=generator, dtype=dtype) * 10
    n = ca + torch.randn(*shape, 3, generator=generator, dtype=dtype)
    c = ca + torch.randn(*shape, 3, generator=generator, dtype=dtype)
    return n, ca, c


def test_from_3_points_orthonormal_det1_and_alg21_axes():
    g = torch.Generator().manual_seed(0)
    n, ca, c = _backbone_points((4, 7), g)
    frames = Rigid.from_3_points(p_neg_x_axis=n, origin=ca, p_xy_plane=c)
    r = frames.rots
    eye = torch.eye(3, dtype=r.dtype).expand_as(r)
    assert torch.allclose(r.transpose(-1, -2) @ r, eye, atol=1e-10)
    assert torch.allclose(torch.linalg.det(r), torch.ones(r.shape[:-2], dtype=r.dtype), atol=1e-10)
    assert torch.allclose(frames.trans, ca)
    local_c = frames.invert_apply(c)
    local_n = frames.invert_apply(n)
    # Algorithm 21: e1 along C - CA (C on +x), N in the xy plane on the +y side.
    assert torch.allclose(local_c[..., 1:], torch.zeros_like(local_c[..., 1:]), atol=1e-10)
    assert (local_c[..., 0] > 0).all()
    assert torch.allclose(local_n[..., 2], torch.zeros_like(local_n[..., 2]), atol=1e-10)
    assert (local_n[..., 1] > 0).all()


def test_ideal_backbone_is_in_alg21_frame():
    """Frames from the ideal N, CA, C of every residue are the identity: the constants use Algorithm 21's frame."""
    pos, mask = rc.ideal_backbone_atom37(frame_group=0)
    n = torch.tensor(pos[:20, rc.atom_order["N"]], dtype=torch.float64)
    ca = torch.tensor(pos[:20, rc.atom_order["CA"]], dtype=torch.float64)
    c = torch.tensor(pos[:20, rc.atom_order["C"]], dtype=torch.float64)
    frames = Rigid.from_3_points(n, ca, c)
    assert torch.allclose(frames.rots, torch.eye(3, dtype=torch.float64).expand(20, 3, 3), atol=1e-6)
    assert mask[rc.restype_order["G"], rc.atom_order["CB"]] == 0
    assert mask[rc.restype_order["A"], rc.atom_order["CB"]] == 1


def test_ideal_geometry_matches_engh_huber():
    """The ideal positions reproduce the bond lengths and angles of the tables within the tables' standard
    deviations (AF2's positions carry residue-specific values: N-CA-C is 113.2 degrees for glycine and
    109.8 for the beta-branched ILE/VAL against the generic 111.2, CA-CB is 1.545 A for ILE against 1.530,
    N-CA-CB is 103.3 degrees for proline)."""

    def close(value, key):
        mean, std = (rc.bond_length if len(key) == 2 else rc.bond_angle)[key]
        return abs(value - mean) < std

    def angle(a, b, c):
        return math.degrees(math.acos(np.dot(a - b, c - b) / np.linalg.norm(a - b) / np.linalg.norm(c - b)))

    for aa in rc.restypes:
        table = {k: v[1].astype(np.float64) for k, v in rc.ideal_backbone_positions(rc.restype_1to3[aa]).items()}
        n, ca, c = table["N"], table["CA"], table["C"]
        assert close(np.linalg.norm(n - ca), ("N", "CA")) and close(np.linalg.norm(c - ca), ("CA", "C"))
        assert close(angle(n, ca, c), ("N", "CA", "C"))
        if aa != "G":
            assert close(np.linalg.norm(table["CB"] - ca), ("CA", "CB"))
        if aa not in "GP":  # proline's ring closes N-CA-CB to 103 degrees (Engh & Huber's proline value)
            assert close(angle(n, ca, table["CB"]), ("N", "CA", "CB"))
            assert close(angle(c, ca, table["CB"]), ("C", "CA", "CB"))
        # O in the backbone frame through the psi frame: C=O length and CA-C-O angle.
        rot, trans = rc.psi_frame_in_backbone_frame(rc.restype_1to3[aa], psi=0.3)
        o = rot.astype(np.float64) @ table["O"] + trans
        assert close(np.linalg.norm(o - c), ("C", "O")) and close(angle(ca, c, o), ("CA", "C", "O"))
        # Dihedral N-CA-C-O = psi + 180 degrees.
        b1 = (c - ca) / np.linalg.norm(c - ca)
        v, w = (n - ca) - np.dot(n - ca, b1) * b1, (o - c) - np.dot(o - c, b1) * b1
        dihedral = math.degrees(math.atan2(np.dot(np.cross(b1, v), w), np.dot(v, w)))
        assert abs((dihedral - math.degrees(0.3) - 180.0 + 180.0) % 360.0 - 180.0) < 1e-3


def test_invert_compose_associative_round_trip():
    g = torch.Generator().manual_seed(1)
    a, b, c = (_random_rigid((3, 5), g, torch.float64) for _ in range(3))
    ident = a.compose(a.invert())
    assert torch.allclose(ident.rots, torch.eye(3, dtype=torch.float64).expand(3, 5, 3, 3), atol=1e-12)
    assert torch.allclose(ident.trans, torch.zeros(3, 5, 3, dtype=torch.float64), atol=1e-12)
    left, right = a.compose(b).compose(c), a.compose(b.compose(c))
    assert torch.allclose(left.rots, right.rots, atol=1e-12)
    assert torch.allclose(left.trans, right.trans, atol=1e-10)
    pts = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(a.invert_apply(a.apply(pts)), pts, atol=1e-12)
    assert torch.allclose(a.compose(b).apply(pts), a.apply(b.apply(pts)), atol=1e-10)
    assert torch.allclose(a.invert().apply(pts), a.invert_apply(pts), atol=1e-12)
    # Broadcast: one frame per residue applied to many points per residue.
    many = torch.randn(3, 5, 8, 3, generator=g, dtype=torch.float64)
    out = a.unsqueeze(-1).apply(many)
    assert out.shape == (3, 5, 8, 3)
    assert torch.allclose(out[:, :, 2], a.apply(many[:, :, 2]), atol=1e-12)


def test_quaternion_update_and_conversions():
    g = torch.Generator().manual_seed(2)
    start = Rigid.identity((2, 6), dtype=torch.float64)
    upd = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    new = start.compose_q_update_vec(upd)
    r = new.rots
    assert torch.allclose(r.transpose(-1, -2) @ r, torch.eye(3, dtype=r.dtype).expand_as(r), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(2, 6, dtype=r.dtype), atol=1e-12)
    # Algorithm 23: quaternion (1, b, c, d) normalised; translation t.
    q = torch.cat([torch.ones(2, 6, 1, dtype=torch.float64), upd[..., :3]], -1)
    q = q / q.norm(dim=-1, keepdim=True)
    assert torch.allclose(new.to_quat(), q, atol=1e-10)  # w = 1/|q| > 0, so the canonical sign agrees
    assert torch.allclose(new.trans, upd[..., 3:])
    # quat -> rot -> quat for all four Shepperd branches (rotations by ~pi about x, y, z hit the small-trace cases).
    quats = torch.randn(200, 4, generator=g, dtype=torch.float64)
    quats = torch.cat([quats, torch.tensor([[1e-4, 1, 0, 0], [1e-4, 0, 1, 0], [1e-4, 0, 0, 1]], dtype=torch.float64)])
    quats = quats / quats.norm(dim=-1, keepdim=True)
    quats = torch.where(quats[..., :1] < 0, -quats, quats)
    assert torch.allclose(rot_to_quat(quat_to_rot(quats)), quats, atol=1e-10)
    four = new.to_tensor_4x4()
    assert four.shape == (2, 6, 4, 4)
    back = Rigid.from_tensor_4x4(four)
    assert torch.equal(back.rots, new.rots) and torch.equal(back.trans, new.trans)
    assert torch.equal(four[..., 3, :], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(2, 6, 4))


def test_stop_rot_gradient_indexing_and_cat():
    g = torch.Generator().manual_seed(3)
    rigid = _random_rigid((4, 5), g)
    rigid = Rigid(rigid.rots.requires_grad_(), rigid.trans.requires_grad_())
    stopped = rigid.stop_rot_gradient()
    assert not stopped.rots.requires_grad and stopped.trans.requires_grad
    assert rigid[1].shape == (5,) and rigid[:, 2:4].shape == (4, 2) and rigid[..., None].shape == (4, 5, 1)
    assert Rigid.cat([rigid, rigid[:, :2]], dim=-1).shape == (4, 7)
    assert Rigid.cat([rigid, rigid[:1]], dim=0).shape == (5, 5)
    assert Rigid.stack([rigid, rigid], dim=-1).shape == (4, 5, 2)
    assert torch.allclose(rigid.scale_translation(10.0).trans, rigid.trans * 10)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    n, ca, c = _backbone_points((3,), g)
    pts = torch.randn(3, 3, generator=g, dtype=torch.float64)
    upd = torch.randn(3, 6, generator=g, dtype=torch.float64) * 0.3
    for t in (n, ca, c, pts, upd):
        t.requires_grad_()

    def fape_like(n, ca, c, pts, upd):
        frames = Rigid.from_3_points(n, ca, c).compose_q_update_vec(upd)
        return frames.invert_apply(frames.invert().apply(pts)), frames.to_quat()

    assert torch.autograd.gradcheck(fape_like, (n, ca, c, pts, upd))
    quats = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: quat_to_rot(q), (quats,))


def test_gradients_finite_for_degenerate_points():
    """Coincident points (padding rows) give finite gradients thanks to eps, not NaN."""
    zeros = torch.zeros(2, 3, requires_grad=True)
    frames = Rigid.from_3_points(zeros, zeros, zeros)
    frames.apply(torch.ones(2, 3)).sum().backward()
    assert torch.isfinite(zeros.grad).all()


def test_bf16_inputs_give_fp32_results():
    g = torch.Generator().manual_seed(5)
    n, ca, c = (t.float() for t in _backbone_points((64,), g))
    upd = torch.randn(64, 6, generator=g) * 0.1
    pts = torch.randn(64, 3, generator=g) * 10
    ref = Rigid.from_3_points(n, ca, c).compose_q_update_vec(upd)
    ref_out = ref.invert_apply(pts)
    bf_in = [t.bfloat16() for t in (n, ca, c, upd, pts)]
    bf = Rigid.from_3_points(*bf_in[:3]).compose_q_update_vec(bf_in[3])
    out = bf.invert_apply(bf_in[4])
    assert bf.dtype == torch.float32 and out.dtype == torch.float32
    r = bf.rots
    # Built in fp32 from bf16 values: orthonormal to fp32 precision (a bf16 product would be off by ~1e-2).
    assert torch.allclose(r.transpose(-1, -2) @ r, torch.eye(3).expand_as(r), atol=1e-5)
    # Same as the fp32 computation on the same (bf16-rounded) values: the only error is the inputs' rounding.
    same_values = Rigid.from_3_points(*(t.float() for t in bf_in[:3])).compose_q_update_vec(bf_in[3].float())
    assert torch.allclose(out, same_values.invert_apply(bf_in[4].float()), atol=1e-5)
    # (Against the unrounded fp32 inputs the difference is the inputs' own rounding: bf16 keeps 8 bits, 0.06 A
    # at 10 A, which tilts a 1.5 A bond by ~0.04 rad; that is the caller's choice of input dtype, not ours.)
    assert not torch.equal(out, ref_out)
    # Inside a CPU autocast region the math stays fp32 and equals the plain fp32 result exactly.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = Rigid.from_3_points(n, ca, c).compose_q_update_vec(upd)
        auto_out = auto.invert_apply(pts)
        composed = auto.compose(ref)
    assert auto_out.dtype == torch.float32 and composed.dtype == torch.float32
    assert torch.equal(auto_out, ref_out)


def test_residue_constants_orders():
    assert "".join(rc.restypes) == "ARNDCQEGHILKMFPSTWYV"
    assert rc.restypes_with_x[20] == "X" and rc.unk_restype_index == 20
    assert rc.atom_types[:5] == ("N", "CA", "C", "CB", "O") and rc.atom_type_num == 37
    assert rc.atom_types[-1] == "OXT"
    assert rc.msa_alphabet[21] == "-" and rc.msa_gap_index == 21 and rc.msa_mask_index == 22
    assert rc.msa_num_classes == 23
    assert rc.msa_letter_to_id("-") == 21 and rc.msa_letter_to_id("W") == 17 and rc.msa_letter_to_id("B") == 20
    assert rc.nonstandard_parent["MSE"] == "MET"
    assert rc.aatype_to_sequence(rc.sequence_to_aatype("ACDXZ")) == "ACDXX"
    mask = rc.restype_atom37_mask()
    assert mask.shape == (21, 37) and mask[20].sum() == 0
    assert mask[rc.restype_order["W"]].sum() == 14 and mask[rc.restype_order["G"]].sum() == 4
    for three, atoms in rc.residue_atoms.items():
        assert set(atoms) <= set(rc.atom_types), three
    assert rc.restype_3to1["TRP"] == "W" and rc.restype_1to3["X"] == "UNK"
