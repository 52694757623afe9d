"""With dropout on (AF2's rates: MSA 0.15, pair 0.25, structure module 0.1), dap = 2 and bp = 2 still train exactly
like one process with the same seed: every shared dropout mask is drawn at its full, unsplit shape from generators
the seed keeps in step across the ranks (dap), and each BP branch draws from its own generator seeded before the
branches (bp). Same model, steps and tolerances as tests/test_folding_parallel.py.

DAP pads N_seq / N_res that do not divide the degree, and a mask drawn at the padded size is another sample (of the
same distribution) than the one-process mask: the DAP case therefore uses sizes that divide (N_res 14, N_seq 6,
N_extra 4) and the BP case, which never pads, the uneven ones (13, 5, 3)."""
from __future__ import annotations

import pytest

from harness import run_distributed
from megatron_protein.data import folding_features as ff
from megatron_protein.data.folding_dataset import FoldingDataset
from megatron_protein.parallel import dp, scg
from test_folding_parallel import STEPS, _check, tiny_config, train

SIZES = {"dap2": (14, 6, 4), "bp2": (13, 5, 3)}   # N_res, N_seq, N_extra
LAYOUTS = {"dap2": ([("dp", None), ("dap", 2), ("bp", 1)], "middle"),
           "bp2": ([("dp", None), ("dap", 1), ("bp", 2)], "end")}


def dropout_config(opm_position: str):
    cfg = tiny_config(opm_position)
    for section in (cfg.model.evoformer, cfg.model.extra_msa):
        section.msa_dropout, section.pair_dropout = 0.15, 0.25
    cfg.model.structure_module.dropout = 0.1
    return cfg


def sized_batches(n_res, n_seq, n_extra):
    dataset = FoldingDataset(config=ff.FeatureConfig(crop_size=n_res, max_msa_clusters=n_seq,
                                                     max_extra_msa=n_extra), seed=0)
    out, sample = [], 0
    while len(out) < STEPS:
        example = dataset.train_example(sample)
        if (example["msa_feat"].shape[0], example["extra_msa"].shape[0], example["aatype"].shape[0]) == (
                n_seq, n_extra, n_res):
            out.append([example])
        sample += 1
    return out


def _worker(case):
    layout, opm_position = LAYOUTS[case]
    pg = scg.init_process_group(parallel_degree=layout, seed=0)
    out = train(dropout_config(opm_position), sized_batches(*SIZES[case]), pg)
    out["dp_rank"] = dp.get_rank_in_group(pg)
    return {"dropout": out}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dap2", "bp2"])
def test_training_with_dropout_equals_one_process(case):
    with scg.as_single_process() as pg:
        ref = train(dropout_config(LAYOUTS[case][1]), sized_batches(*SIZES[case]), pg)
    results = run_distributed(_worker, 2, case, timeout=300)
    _check(results, ref, {"dropout": {}})
