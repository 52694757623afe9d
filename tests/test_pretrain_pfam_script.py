"""scripts/pretrain_pfam.sh, the default run shortened: the model learns something about held-out families.

Runs the real script (set-up, preprocessing of the embedded Pfam sample with whole families held out, TP=2 on 2
local CPU processes through torchrun) with only ``TRAIN_ITERS`` changed (100 instead of the default 600; the
cosine schedule then ends at 100), and requires the held-out perplexity at the end to be below the unigram
perplexity of the validation residues: the exp-entropy of the validation set's own residue frequencies, the best
any context-free model can do there. Both numbers are printed and put in the failure message.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_RUN_ITERS = 100


@pytest.mark.slow
def test_default_script_beats_unigram_perplexity_on_held_out_families(tmp_path, record_property):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "TP", "PP", "MODEL", "DATA_PREFIX")}
    env.update(OUTPUT_DIR=str(out), TRAIN_ITERS=str(SHORT_RUN_ITERS))
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "pretrain_pfam.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    unigram = float(re.search(r"unigram perplexity of the validation residues: ([0-9.]+)", log).group(1))
    evaluations = re.findall(r"valid at iteration (\d+) \| loss ([0-9.]+) \| ppl ([0-9.]+)", log)
    assert evaluations, log[-4000:]
    last_iteration, _, held_out = evaluations[-1]
    held_out = float(held_out)
    record_property("valid_unigram_perplexity", unigram)
    record_property("valid_model_perplexity", held_out)
    print(f"held-out perplexity after {last_iteration} iterations: {held_out:.3f}; "
          f"unigram perplexity of the validation residues: {unigram:.3f}")
    assert int(last_iteration) == SHORT_RUN_ITERS
    assert "tp=2(rank 0)" in log, "the default run must use tensor parallelism of degree 2"
    assert held_out < unigram, (f"held-out perplexity {held_out:.3f} is not below the unigram perplexity "
                                f"{unigram:.3f} of the validation residues")

    checkpoint = out / "checkpoints"
    assert (checkpoint / "latest_checkpointed_iteration.txt").read_text().strip() == str(SHORT_RUN_ITERS)
    assert sorted(os.listdir(checkpoint / f"iter_{SHORT_RUN_ITERS:07d}")) == ["mp_rank_00", "mp_rank_01"]
    events = [f for f in os.listdir(out / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard event file"
    assert f"checkpoints (Megatron layout): {checkpoint}" in log
