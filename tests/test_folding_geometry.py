"""Geometry of the folding model: invariance of FAPE and invariant point attention under a global rigid motion,
ideal backbone atoms from true frames, the trivial baselines, and the structure module's shapes and gradients."""
import math

import numpy as np
import pytest
import torch

from folding_helpers import CHAINS, random_rigid_motion
from megatron_protein.models.folding.baselines import baseline_structure, ideal_backbone
from megatron_protein.models.folding.losses import backbone_fape, fape
from megatron_protein.models.folding.structure_module import (InvariantPointAttention, StructureModule,
                                                              backbone_atoms, dihedral)
from megatron_protein.structure import residue_constants as rc
from megatron_protein.structure.rigid import Rigid, quat_to_rot


def _random_frames(shape, seed, scale=10.0):
    g = torch.Generator().manual_seed(seed)
    return Rigid(quat_to_rot(torch.randn(*shape, 4, generator=g, dtype=torch.float64)),
                 scale * torch.randn(*shape, 3, generator=g, dtype=torch.float64))


def _moved(frames: Rigid, rot, trans) -> Rigid:
    motion = Rigid(rot.expand(*frames.shape, 3, 3), trans.expand(*frames.shape, 3))
    return motion.compose(frames)


@pytest.mark.parametrize("clamp", [10.0, None])
def test_fape_invariant_to_global_motion_of_either_structure(clamp):
    pred, true = _random_frames((2, 9), 0), _random_frames((2, 9), 1)
    mask = torch.ones(2, 9, dtype=torch.float64)
    mask[1, -3:] = 0
    reference = fape(pred, true, mask, pred.trans, true.trans, mask, 10.0, clamp)
    for seed, target in ((2, "pred"), (3, "true"), (4, "both")):
        rot, trans = random_rigid_motion(seed)
        p = _moved(pred, rot, trans) if target in ("pred", "both") else pred
        t = _moved(true, *random_rigid_motion(seed + 10)) if target in ("true", "both") else true
        moved = fape(p, t, mask, p.trans, t.trans, mask, 10.0, clamp)
        torch.testing.assert_close(moved, reference, rtol=0, atol=1e-10)
    assert (reference > 0).all()


def test_fape_zero_for_identical_structures_and_clamped():
    frames = _random_frames((1, 12), 5)
    mask = torch.ones(1, 12, dtype=torch.float64)
    same = fape(frames, frames, mask, frames.trans, frames.trans, mask, 10.0, 10.0)
    assert float(same) == pytest.approx(math.sqrt(1e-4) / 10.0, abs=1e-9)  # only the sqrt's eps remains
    far = Rigid(frames.rots, frames.trans * 100.0)
    assert float(fape(far, frames, mask, far.trans, frames.trans, mask, 10.0, 10.0)) <= 1.0 + 1e-9


def test_backbone_fape_on_4x4_layer_stack_matches_rigid_form():
    pred = torch.stack([_random_frames((2, 7), s).to_tensor_4x4() for s in (6, 7, 8)])   # [L, B, R, 4, 4]
    true = _random_frames((2, 7), 9)
    mask = torch.ones(2, 7, dtype=torch.float64)
    per_layer = backbone_fape(pred, true.to_tensor_4x4(), mask, 10.0, 10.0)
    assert per_layer.shape == (3, 2)
    layer = Rigid.from_tensor_4x4(pred[1])
    torch.testing.assert_close(per_layer[1], fape(layer, true, mask, layer.trans, true.trans, mask, 10.0, 10.0))


def test_ipa_invariant_to_global_motion():
    torch.manual_seed(0)
    ipa = InvariantPointAttention(c_s=16, c_z=8, c_hidden=8, num_heads=3, num_qk_points=4, num_v_points=5).double()
    for p in ipa.parameters():  # the zero-initialised output projection would make the test vacuous
        torch.nn.init.normal_(p, std=0.3)
    s = torch.randn(2, 10, 16, dtype=torch.float64)
    z = torch.randn(2, 10, 10, 8, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.float64)
    mask[0, -2:] = 0
    frames = _random_frames((2, 10), 11, scale=3.0)
    reference = ipa(s, z, frames, mask)
    rot, trans = random_rigid_motion(12, shift=20.0)
    moved = ipa(s, z, _moved(frames, rot, trans), mask)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(moved, reference, rtol=0, atol=1e-9)
    # ... and it does depend on the frames (a motion of one residue's frame changes the output)
    other = Rigid(frames.rots.clone(), frames.trans.clone())
    other.trans[0, 0] += 5.0
    assert (ipa(s, z, other, mask) - reference).abs().max() > 1e-3


def test_ipa_float32_invariance_tolerance():
    torch.manual_seed(1)
    ipa = InvariantPointAttention(16, 8, 8, 4, 4, 8)
    for p in ipa.parameters():
        torch.nn.init.normal_(p, std=0.2)
    s, z = torch.randn(1, 20, 16), torch.randn(1, 20, 20, 8)
    frames = _random_frames((1, 20), 13, scale=2.0).to(dtype=torch.float32)
    rot, trans = random_rigid_motion(14, shift=10.0)
    mask = torch.ones(1, 20)
    reference = ipa(s, z, frames, mask)
    moved = ipa(s, z, _moved(frames, rot.float(), trans.float()), mask)
    torch.testing.assert_close(moved, reference, rtol=0, atol=2e-4)


def _real_chain(i=3):
    data = np.load(CHAINS)
    a, b = data["offsets"][i], data["offsets"][i + 1]
    xyz = torch.tensor(data["coords"][a:b])  # N, CA, C, O, CB
    aatype = torch.tensor(rc.sequence_to_aatype(str(data["sequence"][i])))
    return xyz, aatype


def test_backbone_atoms_from_true_frames_reproduce_real_backbone():
    xyz, aatype = _real_chain()
    frames = Rigid.from_3_points(xyz[:, 0], xyz[:, 1], xyz[:, 2])
    positions, mask = backbone_atoms(frames, aatype, torch.arange(len(aatype)))
    for k, name in enumerate(("N", "CA", "C", "O", "CB")):
        present = mask[:, rc.atom_order[name]] > 0
        error = (positions[:, rc.atom_order[name]] - xyz[:, k]).norm(dim=-1)[present]
        if name == "O":
            error = error[:-1]  # the last residue's O has no next N to fix psi
        assert float(error.mean()) < 0.1 and float(error.max()) < 0.35, (name, float(error.mean()))
    assert (mask[aatype == rc.restype_order["G"], rc.atom_order["CB"]] == 0).all()


def test_baselines_have_ideal_geometry():
    xyz = torch.tensor(ideal_backbone(12, -57.0, -47.0))
    phi = dihedral(xyz[4, 2], xyz[5, 0], xyz[5, 1], xyz[5, 2])
    psi = dihedral(xyz[5, 0], xyz[5, 1], xyz[5, 2], xyz[6, 0])
    assert math.degrees(float(phi)) == pytest.approx(-57.0, abs=1e-6)
    assert math.degrees(float(psi)) == pytest.approx(-47.0, abs=1e-6)
    helix, _ = baseline_structure(np.zeros(30, dtype=np.int64), "helix")
    strand, _ = baseline_structure(np.zeros(30, dtype=np.int64), "extended")
    ca_h, ca_e = helix[:, rc.atom_order["CA"]], strand[:, rc.atom_order["CA"]]
    assert np.linalg.norm(ca_h[1:] - ca_h[:-1], axis=-1) == pytest.approx(3.80, abs=0.02)
    # alpha-helix: 1.5 A rise per residue; i, i+4 about 6.2 A. Strand: about 3.3-3.4 A per residue.
    assert np.linalg.norm(ca_h[29] - ca_h[0]) == pytest.approx(29 * 1.5, rel=0.05)
    assert np.linalg.norm(ca_h[4:] - ca_h[:-4], axis=-1).mean() == pytest.approx(6.2, abs=0.3)
    assert np.linalg.norm(ca_e[29] - ca_e[0]) / 29 == pytest.approx(3.35, abs=0.15)


def test_structure_module_outputs_and_rotation_gradient_stop():
    torch.manual_seed(0)
    sm = StructureModule(c_s=16, c_z=8, c_ipa=8, num_heads_ipa=2, num_qk_points=4, num_v_points=4, num_layers=3,
                         num_transition_layers=1, dropout=0.0, position_scale=10.0)
    for p in sm.backbone_update.parameters():  # leave the black hole so that gradients are not trivially zero
        torch.nn.init.normal_(p, std=0.1)
    s = torch.randn(2, 6, 16, requires_grad=True)
    z = torch.randn(2, 6, 6, 8)
    aatype = torch.randint(0, 20, (2, 6))
    out = sm(s, z, aatype, torch.ones(2, 6))
    assert out["frames"].shape == (3, 2, 6, 4, 4)
    assert out["positions"].shape == (2, 6, 37, 3) and out["atom37_mask"].shape == (2, 6, 37)
    assert out["positions"].dtype == torch.float32
    rots = out["frames"][..., :3, :3]
    eye = torch.eye(3).expand_as(rots)
    torch.testing.assert_close(rots @ rots.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    out["positions"][..., rc.atom_order["CA"], :].sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_lddt_separation_bands_and_radius_of_gyration():
    """The local (|i-j| < 12) and non-local (>= 12) lDDT-Ca partition the scored pairs, so their pair-weighted mean
    is the standard score; a chain shrunk about its centroid has the radius-of-gyration ratio of the shrink."""
    from megatron_protein.structure import metrics

    rng = np.random.default_rng(0)
    steps = rng.normal(size=(80, 3))
    true = np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)
    pred = true + rng.normal(0, 1.5, size=true.shape)
    whole = metrics.lddt_ca(pred, true)
    local = metrics.lddt_ca(pred, true, max_separation=11)
    nonlocal_ = metrics.lddt_ca(pred, true, min_separation=12)
    d = np.linalg.norm(true[:, None] - true[None], axis=-1)
    sep = np.abs(np.arange(80)[:, None] - np.arange(80)[None])
    n_local = ((d < 15) & (sep >= 1) & (sep < 12)).sum()
    n_nonlocal = ((d < 15) & (sep >= 12)).sum()
    assert n_local > 0 and n_nonlocal > 0
    assert (local * n_local + nonlocal_ * n_nonlocal) / (n_local + n_nonlocal) == pytest.approx(whole, abs=1e-12)
    assert metrics.lddt_ca(pred, true, min_separation=1) == whole
    centre = true.mean(0)
    shrunk = centre + 0.5 * (true - centre)
    assert metrics.radius_of_gyration(shrunk) / metrics.radius_of_gyration(true) == pytest.approx(0.5)
    mask = np.ones(80, dtype=bool)
    mask[:10] = False
    assert metrics.radius_of_gyration(true, mask) == pytest.approx(metrics.radius_of_gyration(true[10:]))
