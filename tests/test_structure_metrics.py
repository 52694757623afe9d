"""Structure metrics (megatron_protein.structure.metrics) against biotite and tmtools on real chains.

Real chains: the PDB files of data/structures/pdb/dssp_pdb (CA atoms), and a few CA traces of the chains.npz
format from the repo's embedded sample (data/structures/chains_sample.npz). Perturbed copies: Gaussian noise on every
CA (sigma 1 and 3 A) and a hinge motion (the C-terminal half rotated 40 degrees about a point in the chain),
always followed by a random rotation and translation.

Tolerances and conventions:
- lDDT-CA vs biotite.structure.lddt (CA atoms only, default parameters: 15 A radius, 0.5/1/2/4 A, pairs within a
  residue excluded = self pairs for CA): 1e-6. biotite counts ``<=`` at the radius and the thresholds where AF2
  counts ``<``; with real-valued coordinates no distance falls exactly on a boundary, so the values agree. Both
  run on the same float32 coordinates (biotite stores float32).
- TM-score vs tmtools (TM-align) given the identity alignment (``alignment=[seq, seq]``, TM-align's -I mode: the
  same residue correspondence): 0.01 (the issue's tolerance; observed differences are < 1e-4). And biotite's
  ``tm_score`` of our superposed coordinates equals ours to 1e-5 (same formula and d0; biotite rounds
  coordinates to float32).
- RMSD vs biotite's Kabsch ``superimpose`` + ``rmsd``: 1e-4 A.
- GDT has no reference implementation on PyPI here: checked by its defining property (not below the fraction
  under the all-residue or TM-score superposition, for every cutoff) and on the hinge, where the larger rigid
  half must be found whole.
"""
import glob
import os

import numpy as np
import pytest
import torch

from megatron_protein.structure import metrics as M
from megatron_protein.structure.io import read_chain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PDB_FILES = sorted(glob.glob(os.path.join(REPO, "data", "structures", "pdb", "dssp_pdb", "*.pdb")))


def _random_rotation(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _move(x, rng):
    return x @ _random_rotation(rng).T + rng.normal(0, 30, size=3)


def _hinge(ca, rng, degrees=40.0):
    half = len(ca) // 2
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    out = ca.copy()
    out[half:] = (ca[half:] - ca[half]) @ rot.T + ca[half]
    return out


def _chains(n, max_len=220):
    out = []
    for path in PDB_FILES:
        chain = read_chain(path)
        ca = chain.ca_positions[chain.ca_mask > 0].astype(np.float32).astype(np.float64)
        if len(ca) <= max_len:
            seq = "".join(s for s, m in zip(chain.sequence, chain.ca_mask) if m > 0)
            out.append((os.path.basename(path), ca, seq))
        if len(out) == n:
            break
    return out


def _cases(n_chains):
    rng = np.random.default_rng(12)
    for name, ca, seq in _chains(n_chains):
        for kind in ("noise1", "noise3", "hinge"):
            if kind == "hinge":
                pred = _hinge(ca, rng)
            else:
                pred = ca + rng.normal(0, float(kind[-1]), size=ca.shape)
            yield f"{name}-{kind}", _move(pred, rng).astype(np.float32).astype(np.float64), ca, seq


def _ca_atoms(coords):
    import biotite.structure as struc

    atoms = struc.AtomArray(len(coords))
    atoms.coord = coords.astype(np.float32)
    atoms.res_id = np.arange(1, len(coords) + 1)
    atoms.res_name[:] = "ALA"
    atoms.atom_name[:] = "CA"
    atoms.element[:] = "C"
    atoms.chain_id[:] = "A"
    return atoms


def test_real_chains_available():
    assert len(PDB_FILES) == 40


def test_identical_structures_score_perfectly_and_rigid_motion_changes_nothing():
    rng = np.random.default_rng(0)
    _, ca, _ = _chains(1)[0]
    moved = _move(ca, rng)
    for pred in (ca, moved):
        assert M.lddt_ca(pred, ca) == pytest.approx(1.0, abs=1e-12)
        assert M.tm_score(pred, ca) == pytest.approx(1.0, abs=1e-6)
        assert M.gdt_ts_ha(pred, ca) == pytest.approx((1.0, 1.0), abs=1e-12)
        assert M.rmsd(pred, ca) == pytest.approx(0.0, abs=1e-4)
    noisy = ca + rng.normal(0, 2.0, size=ca.shape)
    again = _move(noisy, rng)
    for fn in (M.lddt_ca, M.tm_score, M.gdt_ts_ha, M.rmsd):
        assert fn(again, ca) == pytest.approx(fn(noisy, ca), abs=1e-6), fn.__name__
    # Not superposition-free: without the superposition the moved copy is far off.
    assert M.rmsd(moved, ca, superpose_first=False) > 5.0


def test_lddt_ca_matches_biotite_global_and_per_residue():
    import biotite.structure as struc

    n = 0
    for name, pred, ca, _ in _cases(8):
        ref = _ca_atoms(ca)
        pred32 = pred.astype(np.float32)
        ours = M.lddt_ca(pred32, ref.coord)
        theirs = struc.lddt(ref, pred32)
        assert ours == pytest.approx(float(theirs), abs=1e-6), name
        per_res = M.lddt_ca(pred32, ref.coord, per_residue=True)
        theirs_res = struc.lddt(ref, pred32, aggregation="residue")
        np.testing.assert_allclose(per_res, theirs_res, atol=1e-6, err_msg=name)
        n += 1
    assert n == 24


def test_lddt_ca_torch_batched_matches_numpy_with_masks():
    cases = list(_cases(3))[:4]
    length = max(len(c[2]) for c in cases)
    b = len(cases)
    pred = torch.zeros(b, length, 3)
    true = torch.zeros(b, length, 3)
    mask = torch.zeros(b, length)
    rng = np.random.default_rng(3)
    holes = []
    for i, (_, p, t, _) in enumerate(cases):
        n = len(t)
        pred[i, :n] = torch.from_numpy(p).float()
        true[i, :n] = torch.from_numpy(t).float()
        m = np.ones(n)
        m[rng.choice(n, size=n // 10, replace=False)] = 0  # unresolved reference residues
        mask[i, :n] = torch.from_numpy(m).float()
        holes.append(m)
    per_res = M.lddt_ca_torch(pred.bfloat16(), true, mask, per_residue=True)
    assert per_res.dtype == torch.float32 and per_res.shape == (b, length)
    per_res = M.lddt_ca_torch(pred, true, mask, per_residue=True)
    glob_ = M.lddt_ca_torch(pred, true, mask, per_residue=False)
    for i, (_, p, t, _) in enumerate(cases):
        n = len(t)
        ref = M.lddt_ca(p.astype(np.float32), t.astype(np.float32), mask=holes[i], per_residue=True)
        has = ~np.isnan(ref)
        np.testing.assert_allclose(per_res[i, :n].numpy()[has], ref[has], atol=1e-5)
        # AF2's eps convention: rows with no scored pair (masked or padding) are 1.
        assert torch.allclose(per_res[i, n:], torch.ones(length - n))
        assert float(glob_[i]) == pytest.approx(M.lddt_ca(p, t, mask=holes[i]), abs=1e-5)
    assert not per_res.requires_grad


def test_tm_score_matches_tmtools_with_the_same_correspondence():
    import biotite.structure as struc
    import tmtools

    worst = 0.0
    for name, pred, ca, seq in _cases(6):
        ours, sup = M.tm_score(pred, ca, return_superposition=True)
        ref = tmtools.tm_align(pred, ca, seq, seq, alignment=[seq, seq])
        worst = max(worst, abs(ours - ref.tm_norm_chain2))
        assert ours == pytest.approx(ref.tm_norm_chain2, abs=0.01), name
        # Our formula and d0 are biotite's: its tm_score of our superposed coordinates is our value.
        moved = pred @ sup.rotation.T + sup.translation
        idx = np.arange(len(ca))
        assert float(struc.tm_score(_ca_atoms(ca), _ca_atoms(moved), idx, idx, reference_length="reference")) == pytest.approx(ours, abs=1e-5)
        # The superposition TM-align found scores no higher under our formula: ours is the maximum found.
        theirs = pred @ np.asarray(ref.u).T + np.asarray(ref.t)
        assert float(struc.tm_score(_ca_atoms(ca), _ca_atoms(theirs), idx, idx, reference_length="reference")) <= ours + 1e-5
    assert worst < 0.01


def test_tm_score_normalises_by_reference_length():
    rng = np.random.default_rng(5)
    _, ca, _ = _chains(1)[0]
    pred = ca + rng.normal(0, 1.0, size=ca.shape)
    mask = np.ones(len(ca), dtype=bool)
    mask[: len(ca) // 4] = False  # the prediction lacks the first quarter
    partial = M.tm_score(pred, ca, mask, reference_length=len(ca))
    assert partial < M.tm_score(pred, ca, mask) * 0.8
    assert M.tm_d0(15) == 0.5 and M.tm_d0(100) == pytest.approx(1.24 * 85 ** (1 / 3) - 1.8)


def test_rmsd_matches_biotite_superimpose():
    import biotite.structure as struc

    for name, pred, ca, _ in _cases(6):
        fitted, _ = struc.superimpose(ca, pred)
        assert M.rmsd(pred, ca) == pytest.approx(float(struc.rmsd(ca, fitted)), abs=1e-4), name


def test_gdt_is_the_maximum_over_superpositions():
    for name, pred, ca, _ in list(_cases(2)):
        l_ref = len(ca)
        kabsch_fit = M.superpose(pred, ca)
        _, sup = M.tm_score(pred, ca, return_superposition=True)
        tm_fit = pred @ sup.rotation.T + sup.translation
        fractions = M.gdt_fractions(pred, ca)
        for c, ours in fractions.items():
            for fit in (kabsch_fit, tm_fit):
                assert ours >= (np.linalg.norm(fit - ca, axis=-1) < c).sum() / l_ref - 1e-12, (name, c)
        ts, ha = M.gdt_ts_ha(pred, ca)
        assert ts == pytest.approx(np.mean([fractions[c] for c in M.GDT_TS_CUTOFFS]))
        assert ha == pytest.approx(np.mean([fractions[c] for c in M.GDT_HA_CUTOFFS]))
        assert 0.0 <= ha <= ts <= 1.0
        if name.endswith("hinge"):
            # Each half is rigid: at 1 A the larger half (at least half the chain) is found whole.
            assert fractions[1.0] >= (l_ref - l_ref // 2) / l_ref - 1e-12


EMBEDDED_CHAINS = os.path.join(REPO, "data", "structures", "chains_sample.npz")


@pytest.mark.skipif(not os.path.exists(EMBEDDED_CHAINS), reason="embedded chains.npz sample not in this checkout")
def test_chains_npz_ca_traces_against_tmtools_and_biotite():
    """The same checks on CA traces of the chains.npz format (the repo's embedded sample of the shared set)."""
    import biotite.structure as struc
    import tmtools

    z = np.load(EMBEDDED_CHAINS)
    ca_col = [str(a) for a in z["atom_names"]].index("CA")
    rng = np.random.default_rng(21)
    for i in range(4):
        a, b = int(z["offsets"][i]), int(z["offsets"][i + 1])
        ca = z["coords"][a:b, ca_col].astype(np.float64)
        seq = str(z["sequence"][i])
        pred = _move(ca + rng.normal(0, 2.0, size=ca.shape), rng).astype(np.float32).astype(np.float64)
        ref = tmtools.tm_align(pred, ca, seq, seq, alignment=[seq, seq])
        assert M.tm_score(pred, ca) == pytest.approx(ref.tm_norm_chain2, abs=0.01)
        atoms = _ca_atoms(ca)
        assert M.lddt_ca(pred.astype(np.float32), atoms.coord) == pytest.approx(
            float(struc.lddt(atoms, pred.astype(np.float32))), abs=1e-6)
