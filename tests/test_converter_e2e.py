"""A tiny protein BERT pretrained with TP=2, PP=2 and TP=2 x PP=2 converts to TAPE and to Hugging Face ESM with
the same outputs.

One 4-process gloo run pretrains the same tiny model (2 layers, hidden 32, 4 heads, dropout off) for 5 steps on
real Pfam sequences under each layout with the project's pretraining code, saving Megatron checkpoints at steps 3
and 5. Each
layout then reloads its own checkpoint into a fresh parallel model with the pretraining's loader and runs a
forward pass over a fixed batch (the pipeline stages hand hidden states over point to point, the vocab-parallel
logits are gathered over tp): that is "the Megatron model's output". The main process converts each checkpoint
and requires the TAPE ``ProteinBertForMaskedLM`` (and the ``EsmForMaskedLM`` export) to reproduce the final-LN
sequence output and the MLM logits at real tokens. The parallel model sums partial products in another order
than the single-matrix TAPE model, so we allow atol 1e-5 + rtol 1e-4 (observed differences are ~1e-6).

Resharding is checked the same way (TP=2 x PP=2 -> TP=1 loads into the pretraining's model with unchanged
outputs) and by resuming: the step-3 checkpoint of the TP=2 x PP=2 run, resharded to TP=1 with its optimizer
state, continues in one process to the same step-4 and step-5 losses as the uninterrupted parallel run.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pfam_fixtures
from harness import run_distributed
from pfam_fixtures import write_pretraining_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = ((2, 1), (1, 2), (2, 2))
ATOL, RTOL = 1e-5, 1e-4
SEQ_LENGTH = 32


def make_data(directory: str) -> str:
    return write_pretraining_data(directory, train=100, valid=20)


def probe_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three real sequences of different lengths (so padding is exercised)."""
    return pfam_fixtures.probe_batch(SEQ_LENGTH, (SEQ_LENGTH - 2, 20, 9), skip=197)


def argv_for(data_prefix: str, save: str, tp: int, pp: int) -> list[str]:
    return ["--data-path", data_prefix, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", str(SEQ_LENGTH), "--micro-batch-size", "4", "--global-batch-size", "8",
            "--train-iters", "5", "--lr", "1e-3", "--lr-warmup-iters", "1", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--eval-iters", "0", "--log-interval", "1", "--seed", "11",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--save", save, "--save-interval", "3"]


def _forward_parallel(model, groups, tokens, padding_mask):
    """Forward through this rank's stage; returns (sequence output, full logits) on the last stage's tp rank 0."""
    import torch.distributed as dist
    from megatron_protein.models.bert import padding_attention_mask
    mask = padding_attention_mask(padding_mask)
    hidden = None
    if groups.is_first("pp"):
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        hidden = model.language_model.embedding(tokens, positions)
    else:
        hidden = torch.empty(tokens.shape[0], tokens.shape[1], model.config.hidden_size)
        dist.recv(hidden, src=groups.ranks("pp")[groups.rank_in("pp") - 1])
    hidden = model.language_model.encoder(hidden, mask)
    if not groups.is_last("pp"):
        dist.send(hidden.contiguous(), dst=groups.ranks("pp")[groups.rank_in("pp") + 1])
        return None
    logits_shard = model.lm_head(hidden, model.decoder_weight())
    if groups.size("tp") > 1:
        shards = [torch.empty_like(logits_shard) for _ in range(groups.size("tp"))]
        dist.all_gather(shards, logits_shard.contiguous(), group=groups.group("tp"))
        logits = torch.cat(shards, dim=-1)
    else:
        logits = logits_shard
    return (hidden, logits) if groups.is_first("tp") and groups.is_first("dp") else None


def pretrain_then_reload(data_prefix: str, saves: dict, tokens, padding_mask) -> dict:
    """Every layout in turn on the 4 ranks: pretrain and save, then reload into a fresh model and run forward."""
    from megatron_protein.models.bert import ProteinBertModel
    from megatron_protein.parallel import scg
    from megatron_protein.training import checkpointing
    from megatron_protein.training.arguments import configs_from_args, parse_args
    from megatron_protein.training.train_loop import pretrain

    outputs = {}
    for (tp, pp), save in saves.items():
        config = configs_from_args(parse_args(argv_for(data_prefix, save, tp, pp)))
        groups = scg.init_process_group(config.parallel.degrees())
        losses = pretrain(config, groups).losses
        model = ProteinBertModel(config.model, groups).eval()
        checkpointing.load_checkpoint(save, model, None, None, config.args, groups=groups, load_optim=False,
                                      load_rng=False)
        with torch.no_grad():
            result = _forward_parallel(model, groups, tokens, padding_mask)
        if result is not None:
            outputs[(tp, pp)] = result + (losses,)
    return outputs


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data_prefix = make_data(str(root))
    saves = {layout: str(root / f"save_tp{layout[0]}_pp{layout[1]}") for layout in LAYOUTS}
    tokens, padding_mask = probe_batch()
    per_rank = run_distributed(pretrain_then_reload, 4, data_prefix, saves, tokens, padding_mask, timeout=300)
    reference = {}
    for result in per_rank:
        reference.update(result)
    assert set(reference) == set(LAYOUTS)
    return root, saves, reference, tokens, padding_mask


def _close_at_real_tokens(actual, expected, padding_mask):
    torch.testing.assert_close(actual[padding_mask], expected[padding_mask], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"tp{layout[0]}pp{layout[1]}")
def test_pretrained_checkpoint_converts_to_tape_and_hf_esm(pretrained, layout):
    from megatron_protein.conversion.to_tape import convert
    from tape_tasks.model import ProteinBertForMaskedLM
    root, saves, reference, tokens, padding_mask = pretrained
    ref_sequence, ref_logits, _ = reference[layout]
    out = root / f"tape_tp{layout[0]}_pp{layout[1]}"
    formats = ("tape", "hf-esm") if _has_transformers() else ("tape",)
    if layout == (2, 2):
        # The one-command path, as a user runs it (the pretraining's save directory as the only argument);
        # TAPE only, to spare the subprocess the transformers import (the other layouts check the HF export).
        formats = ("tape",)
        script = os.path.join(REPO, "scripts", "megatron-tape-generator.sh")
        env = dict(os.environ, PYTHON=sys.executable, TAPE_OUT=str(out), FORMAT="tape")
        run = subprocess.run(["bash", script, saves[layout]], capture_output=True, text=True, env=env,
                             timeout=240, cwd=str(root))
        assert run.returncode == 0, run.stdout + run.stderr
        assert "verified TAPE ProteinBertForMaskedLM" in run.stdout and "tape_train.py" in run.stdout
    else:
        convert(saves[layout], str(out), formats=formats, table_file=None)

    model = ProteinBertForMaskedLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        sequence, _ = model.bert(tokens, padding_mask.long())
        logits = model.mlm(sequence)[0]
    assert logits.shape[-1] == 30 and ref_logits.shape[-1] == 32  # padded vocabulary rows dropped
    _close_at_real_tokens(sequence, ref_sequence, padding_mask)
    _close_at_real_tokens(logits, ref_logits[..., :30], padding_mask)
    # Trained for 3 steps: the checkpoint is not the initialisation (the comparison is not of two fresh models).
    assert not torch.allclose(model.mlm.bias, torch.zeros_like(model.mlm.bias))

    if "hf-esm" in formats:
        from transformers import EsmForMaskedLM
        esm = EsmForMaskedLM.from_pretrained(str(out / "hf-esm")).eval()
        with torch.no_grad():
            result = esm(input_ids=tokens, attention_mask=padding_mask.long(), output_hidden_states=True)
        _close_at_real_tokens(result.hidden_states[-1], ref_sequence, padding_mask)
        _close_at_real_tokens(result.logits, ref_logits[..., :30], padding_mask)


def test_resharded_checkpoint_loads_into_the_pretraining_model(pretrained):
    """TP=2 x PP=2 -> TP=1: the pretraining's own loader accepts the files, and its outputs are unchanged."""
    from megatron_protein.conversion.reshard import reshard
    from megatron_protein.models.bert import ProteinBertModel
    from megatron_protein.parallel import scg
    from megatron_protein.parallel.tensor_parallel import model_parallel_seed
    from megatron_protein.training import checkpointing
    from megatron_protein.training.arguments import configs_from_args, parse_args

    root, saves, reference, tokens, padding_mask = pretrained
    out = str(root / "resharded_tp1")
    reshard(saves[(2, 2)], out, tp=1, pp=1)
    config = configs_from_args(parse_args(argv_for("unused", out, 1, 1)))
    config.args.padded_vocab_size = config.model.padded_vocab_size(1)
    groups = scg.init_process_group(config.parallel.degrees())
    model_parallel_seed(11, groups)  # the attention's RNG stream (dropout is off; the stream must exist)
    model = ProteinBertModel(config.model, groups).eval()
    checkpointing.load_checkpoint(out, model, None, None, config.args, groups=groups, load_optim=False,
                                  load_rng=False)
    with torch.no_grad():
        sequence, logits = _forward_parallel(model, groups, tokens, padding_mask)
    ref_sequence, ref_logits, _ = reference[(2, 2)]
    _close_at_real_tokens(sequence, ref_sequence, padding_mask)
    _close_at_real_tokens(logits, ref_logits, padding_mask)


def test_resharded_checkpoint_resumes_on_the_same_loss_curve(pretrained):
    """Step-3 checkpoint of TP=2 x PP=2, resharded with its AdamW state to TP=1, resumed for steps 4 and 5."""
    from megatron_protein.conversion.reshard import reshard
    from megatron_protein.parallel import scg
    from megatron_protein.training.arguments import configs_from_args, parse_args
    from megatron_protein.training.train_loop import pretrain

    root, saves, reference, _, _ = pretrained
    out = str(root / "resharded_step3_tp1")
    reshard(os.path.join(saves[(2, 2)], "iter_0000003"), out, tp=1, pp=1)
    argv = argv_for(str(root / "pfam"), str(root / "resumed_save"), 1, 1) + ["--load", out, "--no-load-rng"]
    config = configs_from_args(parse_args(argv))
    groups = scg.init_process_group(config.parallel.degrees())
    result = pretrain(config, groups)
    assert result.start_iteration == 3 and len(result.losses) == 2
    uninterrupted = reference[(2, 2)][2]
    assert len(uninterrupted) == 5
    for resumed, original in zip(result.losses, uninterrupted[3:]):
        assert abs(resumed - original) <= 1e-5 + 1e-4 * abs(original), (result.losses, uninterrupted)


def test_generator_script_reports_a_missing_checkpoint(tmp_path):
    script = os.path.join(REPO, "scripts", "megatron-tape-generator.sh")
    run = subprocess.run(["bash", script, str(tmp_path / "nothing")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable, TAPE_OUT=str(tmp_path / "out")), timeout=60)
    assert run.returncode == 2 and "no checkpoint at" in run.stderr
    assert not os.path.exists(tmp_path / "out")


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False
