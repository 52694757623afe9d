"""The whole TAPE path on one model: pretrain at TP=2, save (Megatron layout), convert, finetune, evaluate.

Two gloo ranks pretrain a tiny protein BERT (2 layers, hidden 32, 4 heads, dropout off) for 4 steps on real Pfam
sequences with the project's pretraining code (``megatron_protein.training.train_loop.Pretrainer``) and save a
TP=2 Megatron checkpoint. While still in the parallel job, the *in-memory* trained model (not a reload) runs a
forward pass over a fixed probe batch; the vocab-parallel logits are gathered over tp. That is "the Megatron model's
output", the reference.

The main process then converts the checkpoint with the converter's API
(:func:`megatron_protein.conversion.to_tape.convert`), requires the TAPE ``ProteinBertForMaskedLM`` to reproduce
the final-LN sequence output and the MLM logits at real tokens (padded vocabulary rows dropped), finetunes the
converted model on the stability task for 2 optimizer steps with ``tape_tasks``' ``run_train`` (what
``finetune/tape_train.py`` calls) and evaluates it with ``run_eval`` (``finetune/tape_eval.py``). Checked: the run
directory holds the TAPE model files, the finetuned backbone starts from the converted weights (close to them,
unlike a fresh initialisation, but moved by training), and the evaluation JSON holds a finite Spearman over every
test record.

Tolerance for the converted model: the TP=2 model sums partial products in another order than the one-matrix TAPE
model, so atol 1e-5 + rtol 1e-4 (observed differences ~1e-6). The position table has 64 rows while pretraining
uses 32-token windows (Megatron allows ``--max-position-embeddings`` > ``--seq-length``), so the 55-residue
stability proteins (57 tokens with <cls>/<sep>) fit the converted model.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import pfam_fixtures
from harness import run_distributed
from pfam_fixtures import write_pretraining_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAPE_DATA = os.path.join(REPO, "data", "tape")
SEQ_LENGTH = 32
MAX_POSITIONS = 64
TRAIN_ITERS = 4
ATOL, RTOL = 1e-5, 1e-4


def probe_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three real Pfam domains of 30, 17 and 6 residues."""
    return pfam_fixtures.probe_batch(SEQ_LENGTH, (SEQ_LENGTH - 2, 17, 6), skip=200)


def pretraining_argv(data_prefix: str, save: str) -> list[str]:
    return ["--data-path", data_prefix, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", str(SEQ_LENGTH), "--max-position-embeddings", str(MAX_POSITIONS),
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(TRAIN_ITERS),
            "--lr", "2e-3", "--lr-warmup-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--eval-iters", "0", "--log-interval", "1", "--seed", "7", "--tensor-model-parallel-size", "2",
            "--save", save]


def pretrain_and_probe(data_prefix: str, save: str, tokens: torch.Tensor, padding_mask: torch.Tensor):
    """On each of 2 ranks (TP=2): pretrain and save, then the trained model's forward on the probe batch.

    Returns (sequence output [b, s, h], full logits [b, s, padded vocab], losses) on tp rank 0, None elsewhere.
    """
    import torch.distributed as dist
    from megatron_protein.models.bert import padding_attention_mask
    from megatron_protein.parallel import scg
    from megatron_protein.training.arguments import configs_from_args, parse_args
    from megatron_protein.training.train_loop import Pretrainer

    config = configs_from_args(parse_args(pretraining_argv(data_prefix, save)))
    groups = scg.init_process_group(config.parallel.degrees())
    trainer = Pretrainer(config, groups)
    result = trainer.train()
    model = trainer.model.eval()
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        hidden = model.language_model.embedding(tokens, positions)
        hidden = model.language_model.encoder(hidden, padding_attention_mask(padding_mask))
        logits_shard = model.lm_head(hidden, model.decoder_weight())
    shards = [torch.empty_like(logits_shard) for _ in range(groups.size("tp"))]
    dist.all_gather(shards, logits_shard.contiguous(), group=groups.group("tp"))
    if not groups.is_first("tp"):
        return None
    return hidden, torch.cat(shards, dim=-1), result.losses


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(root, converted TAPE model directory, Megatron reference outputs, probe batch)."""
    from megatron_protein.conversion.to_tape import convert
    root = tmp_path_factory.mktemp("tape_e2e")
    save = str(root / "megatron_save")
    tokens, padding_mask = probe_batch()
    per_rank = run_distributed(pretrain_and_probe, 2, write_pretraining_data(str(root)), save, tokens,
                               padding_mask, timeout=240)
    reference = per_rank[0]
    assert reference is not None and per_rank[1] is None
    assert os.path.isfile(os.path.join(save, "iter_%07d" % TRAIN_ITERS, "mp_rank_01", "model_optim_rng.pt"))
    out = str(root / "tape_model")
    convert(save, out, formats=("tape",), table_file=None)
    return root, out, reference, tokens, padding_mask


def test_converted_model_reproduces_the_megatron_model(converted):
    from tape_tasks.model import ProteinBertForMaskedLM
    _, out, (ref_sequence, ref_logits, losses), tokens, padding_mask = converted
    assert len(losses) == TRAIN_ITERS and all(math.isfinite(x) for x in losses)
    model = ProteinBertForMaskedLM.from_pretrained(out).eval()
    assert model.config.max_position_embeddings == MAX_POSITIONS and model.config.num_hidden_layers == 2
    with torch.no_grad():
        sequence, _ = model.bert(tokens, padding_mask.long())
        logits = model.mlm(sequence)[0]
    assert logits.shape[-1] == 30 and ref_logits.shape[-1] == 32  # Megatron's padded rows are dropped
    torch.testing.assert_close(sequence[padding_mask], ref_sequence[padding_mask], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits[padding_mask], ref_logits[..., :30][padding_mask], atol=ATOL, rtol=RTOL)


def test_converted_model_finetunes_and_evaluates_on_tape(converted):
    from tape_tasks.heads import ProteinModelForTask
    from tape_tasks.training import EvalConfig, TrainConfig, run_eval, run_train
    root, out, _, _, _ = converted
    result = run_train(TrainConfig(
        "transformer", "stability", from_pretrained=out, data_dir=TAPE_DATA, output_dir=str(root / "results"),
        log_dir=str(root / "logs"), time_or_name="e2e", batch_size=8, learning_rate=1e-3, warmup_steps=1,
        num_train_epochs=1, max_steps=2, seed=3))
    run_dir = result.save_dir
    assert result.steps == 2 and run_dir == str(root / "results" / "stability_transformer_e2e")
    for name in ("config.json", "pytorch_model.bin", "checkpoint.bin", "args.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert os.listdir(root / "logs" / "stability_transformer_e2e")  # TensorBoard events

    # The finetuned backbone started from the converted weights: near them (a fresh initialisation is ~100% away),
    # yet moved by the two steps.
    pretrained = ProteinModelForTask.from_pretrained(out, head="value", num_labels=1).state_dict()
    finetuned = ProteinModelForTask.from_pretrained(run_dir, head="value", num_labels=1).state_dict()
    backbone = [k for k in pretrained if k.startswith("bert.")]
    assert backbone
    moved = sum(float((finetuned[k] - pretrained[k]).norm()) for k in backbone)
    scale = sum(float(pretrained[k].norm()) for k in backbone)
    assert 0.0 < moved < 0.1 * scale, (moved, scale)

    results = run_eval(EvalConfig("transformer", "stability", run_dir, data_dir=TAPE_DATA, split=["test"],
                                  metrics=["spearmanr", "mse"]))
    with open(os.path.join(TAPE_DATA, "stability", "stability_test.json")) as f:
        num_test = len(json.load(f))
    with open(os.path.join(run_dir, "tape_eval_stability.json")) as f:
        written = json.load(f)
    assert written["splits"]["test"]["num_examples"] == num_test == results["test"]["num_examples"]
    assert -1.0 <= written["splits"]["test"]["spearmanr"] <= 1.0 and math.isfinite(written["splits"]["test"]["mse"])
