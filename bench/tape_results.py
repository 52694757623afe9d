#!/usr/bin/env python
"""The TAPE results table: a pretrained protein BERT, the same network from random weights, and one-hot inputs.

    bash scripts/pretrain_pfam.sh                     # the default pretraining run (TP=2, 2 CPU processes)
    python bench/tape_results.py                      # converts runs/pfam_tiny/checkpoints, then 15 runs
    python bench/tape_results.py --checkpoint SAVE_DIR --data_dir /work/shared/data/tape --budget default

For each TAPE task (Rao et al. 2019, "Evaluating Protein Transfer Learning with TAPE") three models are finetuned
with the same budget and evaluated on the same test records:

* ``pretrained``: the Megatron checkpoint of the pretraining run, converted to a TAPE model directory by the
  converter's API (:func:`megatron_protein.conversion.to_tape.convert`, which also checks the written model against
  the Megatron model before publishing it);
* ``random_init``: the same architecture (the converted ``config.json``) with TAPE's random initialisation;
* ``onehot``: TAPE's baseline, the task head on one-hot residues.

Contacts are also scored without finetuning, the way users of protein language models read them: the frozen
network's attention maps, symmetrised and APC-corrected, and an L1 logistic regression fitted on 20 training
proteins (Rao et al. 2021; ESM's contact head; :mod:`tape_tasks.attention_contacts`), for the pretrained and the
random-init network (one-hot has no attention). Beside the table, the pretrained model's masked-position
perplexity on the pretraining run's held-out sets, measured on the converted model by
:mod:`megatron_protein.evaluate_mlm`, against the unigram perplexity of the same residues.

Training and evaluation are ``tape_tasks``' ``run_train`` / ``run_eval`` (what ``finetune/tape_train.py`` and
``finetune/tape_eval.py`` run): AdamW, linear warm-up then constant learning rate, the whole network finetuned, and
the checkpoint with the best validation loss kept (``--save_freq improvement``, TAPE's early-stopping practice).

The CPU budget forces three departures, all applied alike to the three models and written into the table:

* training sets are subsampled and training stops after a fixed number of optimizer steps (:data:`BUDGETS`);
* the pretrained model's learned position table bounds the protein length (``max_position_embeddings`` - 2
  residues, 126 for the default run). Secondary structure is per residue, so every chain is cut into consecutive
  windows of at most that length and every test residue is still scored; for remote homology and contacts,
  whose labels belong to the whole chain, longer chains are left out (the table gives the counts that remain);
* validation sets are capped (they only choose the checkpoint).

Outputs: JSON (printed, and written to ``OUT_DIR/tape_results.json``) and a markdown table
(``OUT_DIR/tape_results.md``); per-run model directories, the derived data and TensorBoard logs under
``WORK_DIR``. See docs/tape_results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from tape_tasks.datasets import open_split  # noqa: E402
from tape_tasks.training import EvalConfig, TrainConfig, run_eval, run_train  # noqa: E402

logger = logging.getLogger("tape_results")

MODELS = ("pretrained", "random_init", "onehot")


@dataclass(frozen=True)
class TaskBudget:
    """How one task is trained and scored within the CPU budget."""

    task: str
    title: str                  # what the table calls the task (stand-ins say so)
    train_examples: int         # cap on training records after the length policy (0 = all)
    valid_examples: int         # cap on validation records (0 = all)
    max_steps: int              # optimizer steps
    batch_size: int
    learning_rate: float
    warmup_steps: int
    test_splits: tuple[str, ...]
    metrics: tuple[str, ...]    # passed to run_eval
    reported: tuple[tuple[str, str, str], ...]   # (split, metric key, what the table calls the metric)
    length_policy: str          # 'window' (per-residue labels) or 'filter' (per-chain labels)
    test_examples: int = 0      # cap on each test split (0 = all)


P_AT_L5_MEDIUM_LONG = "precision_at_l5[medium_long 12+]"
P_AT_L5_ALL = "precision_at_l5[all 6+]"

#: The default budget, for the default (tiny) pretrained model: the 15 runs took 36 minutes on 2 cores shared with
#: six other jobs (load average 10 falling to 3), a fraction of that on an idle machine. One learning rate and schedule
#: for all three models of a task. Test caps count chains (chosen before windowing, so whole chains are scored).
BUDGETS: dict[str, TaskBudget] = {b.task: b for b in (
    TaskBudget("secondary_structure", "Secondary structure (3-class)", train_examples=1600, valid_examples=200,
               max_steps=100, batch_size=16, learning_rate=1e-3, warmup_steps=10, test_splits=("test",),
               metrics=("accuracy",), reported=(("test", "accuracy", "accuracy per residue (Q3)"),),
               length_policy="window", test_examples=250),
    TaskBudget("remote_homology", "Remote homology (fold)", train_examples=0, valid_examples=200, max_steps=150,
               batch_size=16, learning_rate=1e-3, warmup_steps=15,
               test_splits=("test_fold_holdout", "test_superfamily_holdout", "test_family_holdout"),
               metrics=("accuracy",),
               reported=(("test_fold_holdout", "accuracy", "top-1 fold accuracy"),
                         ("test_superfamily_holdout", "accuracy", "top-1 fold accuracy"),
                         ("test_family_holdout", "accuracy", "top-1 fold accuracy")),
               length_policy="filter"),
    TaskBudget("contact_prediction", "Contact prediction (CB-CB < 8 A)", train_examples=0, valid_examples=0,
               max_steps=100, batch_size=8, learning_rate=1e-3, warmup_steps=10, test_splits=("test",),
               metrics=("precision_at_l5",),
               reported=(("test", P_AT_L5_MEDIUM_LONG, "P@L/5, medium+long range (separation >= 12)"),
                         ("test", P_AT_L5_ALL, "P@L/5, all ranges (separation >= 6)")),
               length_policy="filter"),
    TaskBudget("fluorescence", "Fluorescence stand-in: GB1 double-mutant fitness (Olson 2014)",
               train_examples=3200, valid_examples=300, max_steps=100, batch_size=32, learning_rate=1e-3,
               warmup_steps=10, test_splits=("test",), metrics=("spearmanr", "mse"),
               reported=(("test", "spearmanr", "Spearman rho"),), length_policy="filter", test_examples=2000),
    TaskBudget("stability", "Stability stand-in: GB1 single-mutant stability (Nisthal 2019)", train_examples=0,
               valid_examples=0, max_steps=100, batch_size=32, learning_rate=1e-3, warmup_steps=10,
               test_splits=("test",), metrics=("spearmanr", "mse"),
               reported=(("test", "spearmanr", "Spearman rho"),), length_policy="filter"),
)}

#: A smaller budget for a loaded machine: the same tasks and test records as ``default``, a third of the finetuning
#: steps (every model alike).
SMALL = {name: dataclasses.replace(b, max_steps=max(10, b.max_steps // 3), warmup_steps=max(1, b.warmup_steps // 3))
         for name, b in BUDGETS.items()}

#: Training proteins the attention-contact regression is fitted on (Rao et al. 2021 fit theirs on 20).
ATTENTION_CONTACT_PROTEINS = 20
ATTENTION_CONTACT_RANGES = ("medium_long", "long", "all")

#: A few steps on a few records per task: checks the whole script end to end in a couple of minutes.
SMOKE = {name: dataclasses.replace(b, train_examples=48, valid_examples=16, max_steps=3, warmup_steps=1,
                                   test_examples=24)
         for name, b in BUDGETS.items()}

FOLDERS = {"secondary_structure": "secondary_structure", "remote_homology": "remote_homology",
           "contact_prediction": "proteinnet", "fluorescence": "fluorescence", "stability": "stability"}


# ----------------------------------------------------------------------------------------------------------------
# Data: the budgeted TAPE-format copy


def _read_split(data_dir: str, folder: str, split: str) -> list[dict]:
    """One TAPE JSON split through the package's reader (its errors name the file and list the splits found)."""
    records = open_split(data_dir, folder, folder, split, data_format="json")
    return [records[i] for i in range(len(records))]


def _write_json(path: str, value: Any, indent: Optional[int] = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(value, f, indent=indent, separators=None if indent else (",", ":"))
        if indent:
            f.write("\n")
    os.replace(f"{path}.tmp", path)


def windows(record: dict, max_residues: int) -> list[dict]:
    """Cut a chain into ceil(L / max_residues) consecutive, nearly equal windows; per-residue fields are sliced.

    Every residue lands in exactly one window, so a per-residue metric over the windows scores every residue once
    (each with the context of its own window only).
    """
    length = len(record["primary"])
    if length <= max_residues:
        return [record]
    pieces = math.ceil(length / max_residues)
    bounds = [round(i * length / pieces) for i in range(pieces + 1)]
    out = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        piece = {}
        for key, value in record.items():
            if isinstance(value, (list, str)) and len(value) == length:
                piece[key] = value[start:stop]
            else:
                piece[key] = value
        piece["id"] = f"{record.get('id')}/{start + 1}-{stop}"
        piece["protein_length"] = stop - start
        out.append(piece)
    return out


def _subsample(records: list, cap: int, seed: int) -> list:
    """A seeded random subset of ``cap`` records in their original order (all of them when cap is 0)."""
    if not cap or len(records) <= cap:
        return records
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), cap))]


def prepare_split(records: list[dict], policy: str, max_residues: int, cap: int, seed: int,
                  cap_chains_first: bool = False) -> tuple[list, dict]:
    """Apply the length policy and keep a seeded random subset of ``cap`` records (0 = all).

    With ``cap_chains_first`` the chains are sampled before windowing (test sets: whole chains are scored);
    otherwise the cap counts records after the policy (training and validation windows).
    """
    if cap_chains_first:
        records = _subsample(records, cap, seed)
        cap = 0
    if policy == "window":
        kept = [w for r in records for w in windows(r, max_residues)]
    elif policy == "filter":
        kept = [r for r in records if len(r["primary"]) <= max_residues]
    else:
        raise ValueError(f"unknown length policy {policy!r}")
    after_policy = len(kept)
    kept = _subsample(kept, cap, seed)
    stats = {"chains_sampled": len(records) if cap_chains_first else None, "after_length_policy": after_policy,
             "used": len(kept),
             "residues": sum(len(r["primary"]) for r in kept)}
    return kept, stats


def prepare_task_data(budget: TaskBudget, data_dir: str, out_dir: str, max_residues: int, seed: int) -> dict:
    """Write the budgeted splits of one task as TAPE JSON under ``out_dir`` (TAPE's file names); returns counts."""
    folder = FOLDERS[budget.task]
    stats = {}
    caps = {"train": budget.train_examples, "valid": budget.valid_examples,
            **{s: budget.test_examples for s in budget.test_splits}}
    for offset, (split, cap) in enumerate(caps.items()):
        records = _read_split(data_dir, folder, split)
        kept, stats[split] = prepare_split(records, budget.length_policy, max_residues, cap, seed + offset,
                                           cap_chains_first=split in budget.test_splits)
        stats[split]["source_records"] = len(records)
        if not kept:
            raise ValueError(f"{data_dir}/{folder}/{folder}_{split}.json: no record left after the length policy "
                             f"({budget.length_policy}, <= {max_residues} residues)")
        _write_json(os.path.join(out_dir, folder, f"{folder}_{split}.json"), kept)
    label_maps = os.path.join(data_dir, folder, f"{folder}_label_maps.json")
    if os.path.exists(label_maps):
        shutil.copyfile(label_maps, os.path.join(out_dir, folder, os.path.basename(label_maps)))
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Models


def convert_pretrained(checkpoint: str, out: str) -> dict:
    """Convert the Megatron checkpoint (any TP/PP) to a TAPE directory; returns what the table says about it."""
    from megatron_protein.conversion.to_tape import convert, load_merged_bert

    merged = load_merged_bert(checkpoint)
    args = merged.args
    if os.path.isdir(out):
        shutil.rmtree(out)
    convert(checkpoint, out, formats=("tape",), table_file=None)
    info = {"checkpoint": os.path.abspath(checkpoint), "source": merged.source, "iteration": merged.iteration,
            "tensor_model_parallel_size": merged.tp_size, "pipeline_model_parallel_size": merged.pp_size,
            "num_layers": merged.shape.num_layers, "hidden_size": merged.shape.hidden_size,
            "num_attention_heads": merged.shape.num_attention_heads,
            "max_position_embeddings": merged.shape.max_position_embeddings,
            "parameters": sum(t.numel() for t in merged.full.values())}
    for name in ("seq_length", "global_batch_size", "lr", "data_path", "train_iters"):
        if args is not None and getattr(args, name, None) is not None:
            info[name] = getattr(args, name)
    if "global_batch_size" in info and "seq_length" in info and merged.iteration:
        info["tokens_seen"] = int(merged.iteration) * int(info["global_batch_size"]) * int(info["seq_length"])
    return info


def model_arguments(model: str, pretrained_dir: str) -> dict:
    """``TrainConfig`` fields that select the model."""
    if model == "pretrained":
        return {"model_type": "transformer", "from_pretrained": pretrained_dir}
    if model == "random_init":
        return {"model_type": "transformer", "model_config_file": os.path.join(pretrained_dir, "config.json")}
    if model == "onehot":
        return {"model_type": "onehot"}
    raise ValueError(f"unknown model {model!r}; models: {list(MODELS)}")


# ----------------------------------------------------------------------------------------------------------------
# Runs


def run_one(budget: TaskBudget, model: str, pretrained_dir: str, data_dir: str, work_dir: str, seed: int) -> dict:
    """Finetune one model on one task, then evaluate its best-validation checkpoint on the test splits."""
    started = time.monotonic()
    result = run_train(TrainConfig(
        task=budget.task, data_dir=data_dir, output_dir=os.path.join(work_dir, "runs"),
        log_dir=os.path.join(work_dir, "tensorboard"), time_or_name=model, batch_size=budget.batch_size,
        learning_rate=budget.learning_rate, warmup_steps=budget.warmup_steps, max_steps=budget.max_steps,
        num_train_epochs=10 ** 6, save_freq="improvement", eval_freq=1, seed=seed,
        **model_arguments(model, pretrained_dir)))
    train_seconds = time.monotonic() - started
    started = time.monotonic()
    scores = run_eval(EvalConfig(
        model_type=model_arguments(model, pretrained_dir)["model_type"], task=budget.task,
        from_pretrained=result.save_dir, data_dir=data_dir, split=list(budget.test_splits),
        metrics=list(budget.metrics), contact_ranges=("medium_long", "all"), batch_size=32, seed=seed))
    return {"task": budget.task, "model": model, "run_dir": result.save_dir,
            "train": {"steps": result.steps, "epochs": result.epochs, "batch_size": budget.batch_size,
                      "learning_rate": budget.learning_rate, "warmup_steps": budget.warmup_steps,
                      "best_valid_loss": result.best_valid_loss, "train_losses": result.train_losses,
                      "valid_losses": result.valid_losses, "wall_seconds": round(train_seconds, 1)},
            "eval_wall_seconds": round(time.monotonic() - started, 1), "test": scores}


def run_attention_contacts(model: str, pretrained_dir: str, data_dir: str, seed: int, proteins: int) -> dict:
    """Unsupervised contacts of the frozen network (``pretrained`` weights or TAPE's random init of the same
    config): L1 logistic regression on its attention maps, fitted on ``proteins`` training chains of the budgeted
    contact data, scored on its test chains with the task's precision metric."""
    from tape_tasks.attention_contacts import AttentionContactRegression, protein_features
    from tape_tasks.config import ProteinBertConfig
    from tape_tasks.datasets import ProteinnetDataset
    from tape_tasks.metrics import contact_metrics
    from tape_tasks.model import ProteinBertModel

    started = time.monotonic()
    if model == "pretrained":
        backbone = ProteinBertModel.from_pretrained(pretrained_dir)
    else:
        torch.manual_seed(seed)
        backbone = ProteinBertModel(ProteinBertConfig.from_pretrained(pretrained_dir))
    folder = FOLDERS["contact_prediction"]
    train = ProteinnetDataset(open_split(data_dir, folder, folder, "train", data_format="json"))
    test = ProteinnetDataset(open_split(data_dir, folder, folder, "test", data_format="json"))
    chosen = sorted(random.Random(seed).sample(range(len(train)), min(proteins, len(train))))
    features, targets, _ = protein_features(backbone, train, chosen)
    regression = AttentionContactRegression().fit(features, targets, seed=seed)
    features, targets, lengths = protein_features(backbone, test, range(len(test)))
    predictions = [regression.predict(f) for f in features]
    scores = contact_metrics(predictions, targets, lengths, names=("precision_at_l5", "precision_at_l"),
                             ranges=ATTENTION_CONTACT_RANGES)
    scores["num_examples"] = len(predictions)
    return {"task": "attention_contacts", "model": model, "fitted_on": regression.fitted_on, "test": {"test": scores},
            "wall_seconds": round(time.monotonic() - started, 1)}


def pretrained_mlm_metrics(checkpoint_info: dict, pretrained_dir: str, seed: int = 1234, passes: int = 2) -> dict:
    """Masked-position perplexity of the converted model on the pretraining run's held-out test sets (held-out
    families, held-out sequences of training families), by ``megatron_protein.evaluate_mlm``."""
    from megatron_protein.data.indexed_dataset import MMapIndexedDataset, dataset_exists
    from megatron_protein.evaluate_mlm import evaluate, load_model
    from megatron_protein.training.pretrain_data import residue_counts

    prefix = checkpoint_info.get("data_path")
    if isinstance(prefix, (list, tuple)):  # Megatron's --data-path list: one prefix, or a blend (none to use)
        prefix = prefix[0] if len(prefix) == 1 else None
    if not prefix or not dataset_exists(f"{prefix}_train"):
        return {}
    model = load_model(pretrained_dir)
    counts = residue_counts(MMapIndexedDataset(f"{prefix}_train"))
    out = {}
    for split, title in (("test", "held-out families"), ("test_infamily", "held-out sequences of training families")):
        if dataset_exists(f"{prefix}_{split}"):
            result = evaluate(model, MMapIndexedDataset(f"{prefix}_{split}"), seed=seed, passes=passes,
                              train_counts=counts)
            out[split] = {"title": title, "sequences": result["sequences"], "passes": passes,
                          **{k: v for k, v in result["metrics"].items() if k.startswith("masked_")}}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def markdown(report: dict) -> str:
    runs = {(r["task"], r["model"]): r for r in report["runs"]}
    pre = report["pretrained"]
    lines = [
        f"TAPE tasks on `{report['data_dir']}` (TAPE-format data derived from packaged sources; see "
        f"docs/tape_results.md), "
        f"{report['date']}, {report['machine']}. Numbers as measured by `python bench/tape_results.py` "
        f"(budget `{report['budget']}`, seed {report['seed']}); higher is better everywhere.",
        "",
        "| task | metric | test set (records used) | pretrained (converted) | random init | one-hot |",
        "|---|---|---|---|---|---|",
    ]
    attention = {r["model"]: r for r in report.get("attention_contacts", [])}
    for name, budget in report["budgets"].items():
        data = report["data"][name]
        if name == "contact_prediction" and attention:
            any_run = next(iter(attention.values()))
            for key, label in ((P_AT_L5_MEDIUM_LONG, "P@L/5, medium+long range (separation >= 12)"),
                               ("precision_at_l5[long 24+]", "P@L/5, long range (separation >= 24)")):
                cells = [_fmt(attention[m]["test"]["test"].get(key)) if m in attention else
                         ("n/a (no attention)" if m == "onehot" else "not run") for m in MODELS]
                lines.append(f"| Contacts, unsupervised: L1 logistic regression on APC-corrected attention maps "
                             f"(Rao et al. 2021), fitted on {any_run['fitted_on']['proteins']} training chains, "
                             f"network frozen | {label} | test ({any_run['test']['test']['num_examples']:,} chains) | "
                             + " | ".join(cells) + " |")
        for split, key, label in budget["reported"]:
            cells = []
            for model in MODELS:
                run = runs.get((name, model))
                cells.append(_fmt(run["test"].get(split, {}).get(key)) if run else "not run")
            used, source = data[split]["used"], data[split]["source_records"]
            if budget["length_policy"] == "window":
                detail = f"{data[split]['chains_sampled']:,} of {source:,} chains -> {used:,} windows"
            else:
                detail = f"{used:,} of {source:,}"
            lines.append(f"| {budget['title']} | {label} | {split} ({detail}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Pretrained model: `{pre['checkpoint']}`, {pre['num_layers']} layers, hidden "
        f"{pre['hidden_size']}, {pre['num_attention_heads']} heads, {pre['parameters']:,} parameters, "
        f"{pre.get('iteration')} iterations x {pre.get('global_batch_size', '?')} sequences x "
        f"{pre.get('seq_length', '?')} tokens"
        + (f" ({pre['tokens_seen']:,} tokens)" if "tokens_seen" in pre else "")
        + f", saved at TP={pre['tensor_model_parallel_size']}, PP={pre['pipeline_model_parallel_size']} and "
        f"converted with the converter (output checked against the Megatron model). Random init: the same "
        f"`config.json`, TAPE initialisation. One-hot: TAPE's baseline.",
        "",
    ]
    for split, m in (pre.get("mlm") or {}).items():
        lines.append(
            f"Pretrained model's masked-position perplexity on the pretraining run's {m['title']} ({split}, "
            f"{m['sequences']:,} sequences, {m['masked_tokens']:,} `<mask>` positions over {m['passes']} maskings, "
            f"`python -m megatron_protein.evaluate_mlm` on the converted model): {m['masked_perplexity']:.3f} "
            f"against a unigram perplexity of {m['masked_unigram_own_perplexity']:.3f} (the residues' own "
            f"frequencies) / {m['masked_unigram_train_perplexity']:.3f} (training frequencies): "
            f"{100 * m['masked_below_unigram_own']:.1f}% / {100 * m['masked_below_unigram_train']:.1f}% below.")
    if pre.get("mlm"):
        lines.append("")
    lines += [
        "Finetuning budget (the same for the three models; whole network trained; AdamW, linear warm-up then "
        "constant lr; the checkpoint with the best validation loss is scored). Proteins longer than "
        f"{report['max_residues']} residues (the pretrained position table) are cut into windows (secondary "
        "structure) or left out (other tasks):",
        "",
        "| task | train records used (of those within the length limit) | valid | steps x batch | lr (warm-up) | epochs | "
        "wall time per model (train + test): pretrained / random / one-hot |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, budget in report["budgets"].items():
        data = report["data"][name]
        epochs, walls = [], []
        for model in MODELS:
            run = runs.get((name, model))
            if run:
                epochs.append(str(run["train"]["epochs"]))
                walls.append(_minutes(run["train"]["wall_seconds"] + run["eval_wall_seconds"]))
            else:
                walls.append("-")
        lines.append(
            f"| {name} | {data['train']['used']:,} ({data['train']['after_length_policy']:,}) | "
            f"{data['valid']['used']:,} | {budget['max_steps']} x {budget['batch_size']} | "
            f"{budget['learning_rate']:g} ({budget['warmup_steps']}) | {'/'.join(sorted(set(epochs), key=int)) or '-'} | "
            f"{' / '.join(walls)} |")
    load = report["load_average_1min"]
    lines += ["", f"Total wall time: {_minutes(report['wall_seconds'])} ({report['threads']} torch threads; 1-minute "
                  f"load average {load['start']} at the start, {load['end']} at the end: the machine was shared)."]
    if not report["complete"]:
        lines += ["", "**Incomplete: the job stopped before every run finished; the rows marked 'not run' are "
                      "missing.**"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "runs", "pfam_tiny", "checkpoints"),
                        help="Megatron save directory of the pretraining run (default: where "
                             "scripts/pretrain_pfam.sh saves)")
    parser.add_argument("--data_dir", default="/work/shared/data/tape",
                        help="TAPE-format data (JSON splits); the repository's data/tape also works")
    parser.add_argument("--out_dir", default=None,
                        help="where tape_results.json and tape_results.md go (default: bench/results; with "
                             "--budget smoke: WORK_DIR/smoke, so a smoke run never replaces the table)")
    parser.add_argument("--work_dir", default=os.path.join(REPO, "runs", "tape_results"),
                        help="converted model, derived data, finetuned runs, TensorBoard logs")
    parser.add_argument("--budget", choices=["default", "small", "smoke"], default="default",
                        help="default: the table's budget (BUDGETS); small: a third of its steps (SMALL); smoke: a "
                             "few steps per run")
    parser.add_argument("--attention-contact-proteins", type=int, default=ATTENTION_CONTACT_PROTEINS,
                        help="training chains the unsupervised attention-contact regression is fitted on "
                             "(0: skip it)")
    parser.add_argument("--tasks", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.exists(args.checkpoint):
        raise SystemExit(f"tape_results: no pretraining checkpoint at {args.checkpoint}; run "
                         f"'bash scripts/pretrain_pfam.sh' first or pass --checkpoint SAVE_DIR")
    budgets = {"default": BUDGETS, "small": SMALL, "smoke": SMOKE}[args.budget]
    if args.out_dir is None:
        args.out_dir = (os.path.join(REPO, "bench", "results") if args.budget != "smoke"
                        else os.path.join(args.work_dir, "smoke"))
    started = time.monotonic()
    os.makedirs(args.work_dir, exist_ok=True)

    pretrained_dir = os.path.join(args.work_dir, "pretrained_tape")
    logger.info("converting %s -> %s", args.checkpoint, pretrained_dir)
    pretrained = convert_pretrained(args.checkpoint, pretrained_dir)
    max_residues = pretrained["max_position_embeddings"] - 2
    pretrained["mlm"] = pretrained_mlm_metrics(pretrained, pretrained_dir)
    for split, m in pretrained["mlm"].items():
        logger.info("pretrained model on %s (%s): masked-position perplexity %.3f, unigram %.3f (own) / %.3f "
                    "(training frequencies)", split, m["title"], m["masked_perplexity"],
                    m["masked_unigram_own_perplexity"], m["masked_unigram_train_perplexity"])

    data_dir = os.path.join(args.work_dir, "data")
    data_stats = {}
    for name in args.tasks:
        data_stats[name] = prepare_task_data(budgets[name], args.data_dir, data_dir, max_residues, args.seed)
        logger.info("%s: %s", name, ", ".join(f"{split} {s['used']}" for split, s in data_stats[name].items()))

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(args.work_dir, "tensorboard", "tape_results"))
    runs: list[dict] = []
    attention_runs: list[dict] = []
    load_at_start = os.getloadavg()[0]

    def write_report(complete: bool) -> tuple[dict, str]:
        """Both outputs, rewritten (atomically) after every run, so an interrupted job keeps what it measured."""
        report = {
            "benchmark": "tape_results", "complete": complete, "date": time.strftime("%Y-%m-%d"),
            "budget": args.budget, "seed": args.seed,
            "machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {platform.python_implementation()} "
                       f"{platform.python_version()}",
            "threads": torch.get_num_threads(),
            "load_average_1min": {"start": round(load_at_start, 1), "end": round(os.getloadavg()[0], 1)},
            "data_dir": os.path.abspath(args.data_dir), "max_residues": max_residues, "pretrained": pretrained,
            "budgets": {name: dataclasses.asdict(budgets[name]) for name in args.tasks}, "data": data_stats,
            "runs": runs, "attention_contacts": attention_runs, "wall_seconds": round(time.monotonic() - started, 1),
        }
        table = markdown(report)
        _write_json(os.path.join(args.out_dir, "tape_results.json"), report, indent=2)
        md_path = os.path.join(args.out_dir, "tape_results.md")
        with open(f"{md_path}.tmp", "w") as f:
            f.write(table)
        os.replace(f"{md_path}.tmp", md_path)
        return report, table

    if "contact_prediction" in args.tasks and args.attention_contact_proteins > 0:
        for model in [m for m in args.models if m != "onehot"]:
            run = run_attention_contacts(model, pretrained_dir, data_dir, args.seed, args.attention_contact_proteins)
            attention_runs.append(run)
            logger.info("attention contacts / %s (fitted on %d chains, %d non-zero coefficients): %s in %s", model,
                        run["fitted_on"]["proteins"], run["fitted_on"]["nonzero_coefficients"],
                        "; ".join(f"{k} {_fmt(v)}" for k, v in run["test"]["test"].items() if "l5" in k),
                        _minutes(run["wall_seconds"]))
            write_report(complete=False)

    plan = [(name, model) for name in args.tasks for model in args.models]
    for index, (name, model) in enumerate(plan):
        logger.info("[%d/%d] %s / %s: %d steps x batch %d", index + 1, len(plan), name, model,
                    budgets[name].max_steps, budgets[name].batch_size)
        run = run_one(budgets[name], model, pretrained_dir, data_dir, args.work_dir, args.seed)
        runs.append(run)
        for split, scores in run["test"].items():
            for key, value in scores.items():
                writer.add_scalar(f"{name}/{split}/{key}/{model}", value, 0)
        write_report(complete=False)
        elapsed = time.monotonic() - started
        eta = elapsed / (index + 1) * (len(plan) - index - 1)
        logger.info("[%d/%d] %s / %s done in %s: %s | elapsed %s, ETA %s", index + 1, len(plan), name, model,
                    _minutes(run["train"]["wall_seconds"] + run["eval_wall_seconds"]),
                    "; ".join(f"{split} {key} {_fmt(run['test'][split].get(key))}"
                              for split, key, _ in budgets[name].reported),
                    _minutes(elapsed), _minutes(eta))
    writer.close()
    report, table = write_report(complete=True)
    print(json.dumps(report, indent=2))
    print(table)
    return report


if __name__ == "__main__":
    main()
