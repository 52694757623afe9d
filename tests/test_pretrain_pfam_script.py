"""scripts/pretrain_pfam.sh, the default run shortened: the whole path runs and reports the honest numbers.

Runs the real script (set-up, preprocessing of the embedded Pfam sample with whole families and in-family
sequences held out, TP=2 on 2 local CPU processes through torchrun) with only ``TRAIN_ITERS`` changed (100
instead of the default; the cosine schedule then ends at 100) and checks what a user reads at the end: the final
summary line with the masked-position perplexity and both unigram baselines for both held-out sets.

100 iterations are still on the plateau where a masked LM has learned the residue frequencies and to read a
visible residue, but little context (docs/pretraining.md shows the whole curve). So the learning asserted here is
that: at ``<mask>`` positions the model is within 3% of the unigram perplexity of the same residues and below a
uniform guess (20 residues), and at kept positions (input = answer) it already does better than at ``<mask>``
ones (measured at 100 iterations: 16.9 against 17.8; copying the visible residue is learned within the next few
hundred). Beating the unigram at ``<mask>`` is what the full default run measures; it is reported in the README and
docs, not asserted by a shortened run.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_RUN_ITERS = 100
NUMBER = r"([0-9.]+)"


@pytest.mark.slow
def test_default_script_reports_masked_position_perplexity_for_both_held_out_sets(tmp_path, record_property):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "TP", "PP", "MODEL", "DATA_PREFIX")}
    env.update(OUTPUT_DIR=str(out), TRAIN_ITERS=str(SHORT_RUN_ITERS))
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "pretrain_pfam.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "tp=2(rank 0)" in log, "the default run must use tensor parallelism of degree 2"

    summary = re.search(r"summary at iteration (\d+) .*", log)
    assert summary, log[-4000:]
    assert int(summary.group(1)) == SHORT_RUN_ITERS
    line = summary.group(0)
    print(line)
    found = {}
    for title in ("held-out families", "held-out sequences of training families"):
        match = re.search(re.escape(title) + r" \((test\w*), [\d,]+ <mask> positions\): masked-position ppl "
                          + NUMBER + r" \| unigram " + NUMBER + r" \(training frequencies\) / " + NUMBER + r" \(own\)",
                          line)
        assert match, f"no {title} in the summary line: {line}"
        split, model, unigram_train, unigram_own = match.group(1), *map(float, match.groups()[1:])
        found[title] = (split, model, unigram_train, unigram_own)
        record_property(f"{split}_masked_perplexity", model)
        record_property(f"{split}_unigram_own", unigram_own)
        assert unigram_own <= unigram_train, "the own-frequency unigram is the lower bound of unigram models"
        assert model < 1.03 * unigram_own, f"{title}: masked-position ppl {model} vs unigram {unigram_own}"
        assert model < 19.0, f"{title}: masked-position ppl {model} is no better than a uniform guess"
    assert found["held-out families"][0] == "test" and found["held-out sequences of training families"][0] == \
        "test_infamily"
    kept = [float(k) for k in re.findall(r"test\w* at iteration \d+ .*? kept \([\d,]+\): ppl " + NUMBER, log)]
    masked = [found["held-out families"][1], found["held-out sequences of training families"][1]]
    assert len(kept) == 2 and all(k < m for k, m in zip(kept, masked)), (kept, masked)

    checkpoint = out / "checkpoints"
    assert (checkpoint / "latest_checkpointed_iteration.txt").read_text().strip() == str(SHORT_RUN_ITERS)
    assert sorted(os.listdir(checkpoint / f"iter_{SHORT_RUN_ITERS:07d}")) == ["mp_rank_00", "mp_rank_01"]
    events = [f for f in os.listdir(out / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard event file"
    assert f"checkpoints (Megatron layout): {checkpoint}" in log
    assert re.search(r"\[pretrain_pfam\] done in \d+ min \d+ s", log)
