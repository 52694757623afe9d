"""Our invariant point attention (Algorithm 22) and backbone FAPE (Algorithm 28) against OpenFold's, with the same
weights copied across (OpenFold's parameter layouts differ: fused k/v projections and points stored x-block,
y-block, z-block). Skipped when OpenFold is not unpacked (see /work/shared/peers/README.md)."""
import pytest
import torch

from test_evoformer_common import import_openfold
from megatron_protein.models.folding.losses import fape
from megatron_protein.models.folding.structure_module import InvariantPointAttention
from megatron_protein.structure.rigid import Rigid, quat_to_rot



def _openfold_has(module: str) -> bool:
    if import_openfold() is None:
        return False
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - e.g. dm-tree or ml_collections missing
        return False
    return True


needs_structure_module = pytest.mark.skipif(
    not _openfold_has("openfold.model.structure_module"),
    reason="OpenFold's structure module is not importable (peers README; pip install -e .[bench])")
needs_loss = pytest.mark.skipif(not _openfold_has("openfold.utils.loss"),
                                reason="OpenFold's losses are not importable (they need ml_collections)")


def _point_rows(heads, points, xyz_blocks_total, offset=0):
    """Row indices into an OpenFold point projection (x-block, y-block, z-block; each [H, P_total]) in our
    (h, p, xyz) order, for points offset..offset+points of each head."""
    rows = []
    per_head = xyz_blocks_total // heads
    for h in range(heads):
        for p in range(points):
            for x in range(3):
                rows.append(x * xyz_blocks_total + h * per_head + offset + p)
    return torch.tensor(rows)


@needs_structure_module
def test_ipa_matches_openfold_with_copied_weights():
    from openfold.model.structure_module import InvariantPointAttention as OFIPA
    from openfold.utils.rigid_utils import Rigid as OFRigid, Rotation

    torch.manual_seed(0)
    c_s, c_z, c, H, Pq, Pv, L = 16, 8, 6, 3, 4, 5, 11
    theirs = OFIPA(c_s, c_z, c, H, Pq, Pv).double()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = InvariantPointAttention(c_s, c_z, c, H, Pq, Pv).double()
    with torch.no_grad():
        ours.linear_q.weight.copy_(theirs.linear_q.weight)
        ours.linear_q.bias.copy_(theirs.linear_q.bias)
        kv_w, kv_b = theirs.linear_kv.weight.view(H, 2 * c, c_s), theirs.linear_kv.bias.view(H, 2 * c)
        ours.linear_k.weight.copy_(kv_w[:, :c].reshape(H * c, c_s))
        ours.linear_k.bias.copy_(kv_b[:, :c].reshape(-1))
        ours.linear_v.weight.copy_(kv_w[:, c:].reshape(H * c, c_s))
        ours.linear_v.bias.copy_(kv_b[:, c:].reshape(-1))
        q_rows = _point_rows(H, Pq, H * Pq)
        ours.linear_q_points.weight.copy_(theirs.linear_q_points.linear.weight[q_rows])
        ours.linear_q_points.bias.copy_(theirs.linear_q_points.linear.bias[q_rows])
        k_rows = _point_rows(H, Pq, H * (Pq + Pv))
        v_rows = _point_rows(H, Pv, H * (Pq + Pv), offset=Pq)
        kv_points = theirs.linear_kv_points.linear
        ours.linear_k_points.weight.copy_(kv_points.weight[k_rows])
        ours.linear_k_points.bias.copy_(kv_points.bias[k_rows])
        ours.linear_v_points.weight.copy_(kv_points.weight[v_rows])
        ours.linear_v_points.bias.copy_(kv_points.bias[v_rows])
        ours.linear_b.weight.copy_(theirs.linear_b.weight)
        ours.linear_b.bias.copy_(theirs.linear_b.bias)
        ours.head_weights.copy_(theirs.head_weights)
        # linear_out input: OpenFold (o, o_pt x [H*Pv], y, z, |o_pt|, o_pair); ours (o, o_pt (h, p, xyz), |o_pt|,
        # o_pair).
        hc, hp = H * c, H * Pv
        cols = list(range(hc))
        cols += [hc + x * hp + i for i in range(hp) for x in range(3)]
        cols += list(range(hc + 3 * hp, hc + 4 * hp + H * c_z))
        ours.linear_out.weight.copy_(theirs.linear_out.weight[:, cols])
        ours.linear_out.bias.copy_(theirs.linear_out.bias)

    s = torch.randn(2, L, c_s, dtype=torch.float64)
    z = torch.randn(2, L, L, c_z, dtype=torch.float64)
    mask = torch.ones(2, L, dtype=torch.float64)
    mask[1, -3:] = 0
    rots = quat_to_rot(torch.randn(2, L, 4, dtype=torch.float64))
    trans = torch.randn(2, L, 3, dtype=torch.float64) * 2
    expected = theirs(s, z, OFRigid(Rotation(rot_mats=rots), trans), mask)
    got = ours(s, z, Rigid(rots, trans), mask)
    assert expected.abs().max() > 0.1
    # Equal to 1e-6 in float64 (OpenFold casts parts of its rigid algebra to float32).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_loss
def test_fape_matches_openfold():
    from openfold.utils.loss import compute_fape
    from openfold.utils.rigid_utils import Rigid as OFRigid, Rotation

    torch.manual_seed(1)
    shape = (2, 9)
    r1, r2 = (quat_to_rot(torch.randn(*shape, 4, dtype=torch.float64)) for _ in range(2))
    t1, t2 = (torch.randn(*shape, 3, dtype=torch.float64) * 8 for _ in range(2))
    mask = torch.ones(shape, dtype=torch.float64)
    mask[0, :2] = 0
    for clamp in (10.0, None):
        expected = compute_fape(OFRigid(Rotation(rot_mats=r1), t1), OFRigid(Rotation(rot_mats=r2), t2), mask, t1, t2,
                                mask, length_scale=10.0, l1_clamp_distance=clamp, eps=1e-4)
        got = fape(Rigid(r1, t1), Rigid(r2, t2), mask, t1, t2, mask, 10.0, clamp, eps=1e-4)
        # OpenFold divides by (eps + frames) and then by (eps + positions); ours is the exact mean over the
        # masked pairs (Algorithm 28). Undo OpenFold's two epsilons, then the two agree to float64 rounding.
        count = mask.sum(-1)
        expected_exact = expected * (1e-4 + count) * (1e-4 + count) / (count * count)
        assert not torch.allclose(got, expected, rtol=1e-6, atol=1e-8)  # the epsilons are visible ...
        torch.testing.assert_close(got, expected_exact, rtol=1e-7, atol=1e-10)  # ... and the only difference
