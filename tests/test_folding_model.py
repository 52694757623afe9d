"""The AlphaFold module: shapes, recycling semantics (gradients through the last iteration only), the recycle draw,
chunked == unchunked, bf16 autocast, and the losses on real examples."""
import math

import pytest
import torch

from folding_helpers import micro_config, real_batch
from megatron_protein.models.folding.losses import alphafold_loss, aux_loss_factor, distogram_loss
from megatron_protein.models.folding.model import AlphaFold, sample_num_recycles


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = micro_config(model__use_profile=True)
    model = AlphaFold(cfg).eval()
    for name, p in model.named_parameters():  # leave the zero-initialised residual updates: a non-trivial model
        if p.dim() == 2 and float(p.detach().abs().sum()) == 0.0:
            torch.nn.init.normal_(p, std=0.05)
    return cfg, model, real_batch(cfg)


def test_output_shapes(setup):
    cfg, model, batch = setup
    with torch.no_grad():
        out = model(batch, num_recycles=1)
    B, R = batch["aatype"].shape
    S = batch["msa_feat"].shape[1]
    assert out["frames"].shape == (cfg.model.structure_module.num_layers, B, R, 4, 4)
    assert out["positions"].shape == (B, R, 37, 3)
    assert out["distogram_logits"].shape == (B, R, R, 64)
    assert out["masked_msa_logits"].shape == (B, S, R, 23)
    assert out["plddt_logits"].shape == (B, R, 50) and out["plddt"].shape == (B, R)
    assert ((out["plddt"] >= 0) & (out["plddt"] <= 100)).all()
    torch.testing.assert_close(out["distogram_logits"], out["distogram_logits"].transpose(1, 2))


def test_gradients_flow_only_through_the_last_recycling_iteration(setup):
    """Algorithm 2 with stopped gradients: the full forward's gradients equal those of one differentiable
    iteration fed with the (no-grad) outputs of the earlier iterations."""
    cfg, model, batch = setup
    model.zero_grad()
    out = model(batch, num_recycles=2)
    loss, _ = alphafold_loss(out, batch, cfg)
    loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    from megatron_protein.models.folding.embedders import pseudo_beta_from_atom37
    model.zero_grad()
    B, R = batch["aatype"].shape
    prev = (torch.zeros(B, R, cfg.model.c_m), torch.zeros(B, R, R, cfg.model.c_z), torch.zeros(B, R, 3))
    with torch.no_grad():
        for _ in range(2):
            o = model.iteration(batch, prev, None)
            prev = (o["msa"][..., 0, :, :], o["pair"], pseudo_beta_from_atom37(batch["aatype"], o["positions"]))
    o = model.iteration(batch, prev, None)
    o["distogram_logits"] = model.distogram_head(o["pair"])
    o["masked_msa_logits"] = model.masked_msa_head(o["msa"])
    o["plddt_logits"] = model.plddt_head(o["single"])
    manual, _ = alphafold_loss(o, batch, cfg)
    manual.backward()
    torch.testing.assert_close(manual, loss.detach())
    assert set(full) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in full.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-5, atol=1e-7)
    # and recycling changes the result (the recycled inputs are used)
    with torch.no_grad():
        assert not torch.allclose(model(batch, num_recycles=0)["positions"], out["positions"].detach())


def test_recycle_draw_is_a_function_of_seed_and_step():
    draws = [sample_num_recycles(3, seed=7, step=s) for s in range(400)]
    assert draws == [sample_num_recycles(3, seed=7, step=s) for s in range(400)]
    assert set(draws) == {0, 1, 2, 3}
    assert all(abs(draws.count(k) / 400 - 0.25) < 0.08 for k in range(4))
    assert draws != [sample_num_recycles(3, seed=8, step=s) for s in range(400)]


def test_chunked_inference_equals_unchunked(setup):
    cfg, model, batch = setup
    with torch.no_grad():
        plain = model(batch, num_recycles=1)
        chunked = model(batch, num_recycles=1, chunk_size=5)
    for key in ("positions", "plddt", "distogram_logits"):
        torch.testing.assert_close(chunked[key], plain[key], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_keeps_geometry_and_losses_fp32(setup):
    cfg, model, batch = setup
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(batch, num_recycles=0)
        loss, terms = alphafold_loss(out, batch, cfg)
    assert out["positions"].dtype == torch.float32 and out["frames"].dtype == torch.float32
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))
    with torch.no_grad():
        reference = model(batch, num_recycles=0)["positions"]
    assert (out["positions"] - reference).abs().max() < 1.0  # Angstrom: bf16 trunk, fp32 structure module


def test_distogram_loss_prefers_the_true_bins():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 3) * 8
    mask = torch.ones(1, 12)
    breaks = torch.linspace(2.3125, 21.6875, 63)
    d = (x[:, :, None] - x[:, None]).norm(dim=-1)
    true_bins = (d[..., None] > breaks).sum(-1)
    perfect = torch.nn.functional.one_hot(true_bins, 64).float() * 20
    uniform = torch.zeros(1, 12, 12, 64)
    assert float(distogram_loss(perfect, x, mask, 2.3125, 21.6875)) < 1e-6
    assert float(distogram_loss(uniform, x, mask, 2.3125, 21.6875)) == pytest.approx(math.log(64), rel=1e-5)


def test_aux_loss_warmup_factor():
    cfg = micro_config(loss__aux_warmup_start=10, loss__aux_warmup_steps=4)
    assert [aux_loss_factor(cfg, s) for s in (0, 9, 10, 13, 14, 100)] == [0.0, 0.0, 0.2, 0.8, 1.0, 1.0]
    assert aux_loss_factor(micro_config(), 0) == 1.0 and aux_loss_factor(cfg, None) == 1.0


@pytest.mark.parametrize("kind", ["helix", "extended"])
def test_structure_module_can_start_from_an_ideal_chain(kind):
    """``initial_frames``: a fresh module (zero-initialised backbone update) returns exactly the baseline chain of
    that kind (same CA-CA distances as models.folding.baselines), centred; 'identity' is AF2's black hole."""
    import numpy as np

    from megatron_protein.models.folding.baselines import baseline_structure
    from megatron_protein.structure import metrics

    cfg = micro_config(model__structure_module__initial_frames=kind)
    batch = real_batch(cfg)
    with torch.no_grad():
        out = AlphaFold(cfg).eval()(batch, num_recycles=0)
    aatype = batch["aatype"][0].numpy()
    ca = out["positions"][0, :, 1].numpy()
    expected, _ = baseline_structure(aatype, kind)
    d_pred = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
    d_true = np.linalg.norm(expected[:, None, 1] - expected[None, :, 1], axis=-1)
    assert np.abs(d_pred - d_true).max() < 1e-3
    assert np.abs(ca.mean(0)).max() < 1e-3
    assert metrics.lddt_ca(ca, expected[:, 1]) == pytest.approx(1.0)
    identity = micro_config()
    assert identity.model.structure_module.initial_frames == "identity"
    with torch.no_grad():
        black_hole = AlphaFold(identity).eval()(batch, num_recycles=0)
    assert float(black_hole["positions"][0, :, 1].abs().max()) < 1e-5
