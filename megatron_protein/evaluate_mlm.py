"""Masked-position perplexity of any protein BERT on any FASTA, beside the unigram baselines, as JSON.

    python -m megatron_protein.evaluate_mlm runs/pfam_tiny/checkpoints data/pfam/pfam_sample.fasta
    python -m megatron_protein.evaluate_mlm models/out held_out.fasta --train-data runs/pfam_tiny/data/pfam_sample
    python -m megatron_protein.evaluate_mlm models/out/hf-esm held_out.fasta --passes 4 --seed 7

The model is a Megatron checkpoint (a ``--save`` directory, an ``iter_*`` directory or one ``model_optim_rng.pt``;
any TP/PP layout, merged and converted in memory by ``megatron_protein.conversion``), a TAPE model directory
written by the converter (``config.json`` + ``pytorch_model.bin`` with the ``mlm.*`` head), or its Hugging Face
``EsmForMaskedLM`` export (``config.json`` with ``model_type`` ``esm``; needs ``transformers``). The sequences
are a FASTA (or Stockholm, TAPE LMDB/JSON: any input of ``preprocess``) or an indexed-dataset prefix.

Masking is the one pretraining evaluates with (``megatron_protein.data.mlm_dataset.MLMDataset``: BERT's 15% of
the residues, 80% shown as ``<mask>``, 10% random, 10% kept; ``--mask-prob`` etc. to change it), drawn from
``--seed``, so a second call gives the same numbers; ``--passes N`` scores every sequence N times with other
masks. A sequence longer than the model's positions (``max_position_embeddings - 2`` residues) is cropped to a
window drawn from the same seed; the JSON counts how many were.

Output (stdout, and ``--output FILE``): the model and data, and ``metrics``, the
:meth:`~megatron_protein.training.mlm_metrics.MLMMetrics.summary` of every predicted position: loss, perplexity
and count at ``<mask>``, randomised and kept positions and over all of them, and for each the unigram perplexity
of the same residues from their own frequencies and, with training data (``--train-data``; for a Megatron
checkpoint its ``data_path``'s ``_train`` split is used when it exists), from the training frequencies.
``masked_below_unigram_own`` is the headline: how far the masked-position perplexity is below the best
context-free model of those residues.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from megatron_protein.data.mlm_dataset import MLMDataset
from megatron_protein.training.mlm_metrics import MLMMetrics, training_frequencies
from megatron_protein.utils import strict_json

logger = logging.getLogger("megatron_protein.evaluate_mlm")

VOCAB_SIZE = 30  # TAPE's IUPAC vocabulary: every supported format predicts these ids


class EvaluationError(ValueError):
    """The model or the data cannot be evaluated as asked; the message says which file and why."""


# ----------------------------------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A masked LM as a function ``(tokens [b, s], padding_mask [b, s]) -> logits [b, s, >= 30]``."""

    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    max_positions: int
    format: str
    source: str
    info: dict


def _is_megatron(path: str) -> bool:
    if os.path.isfile(path):
        return path.endswith(".pt")
    return (os.path.exists(os.path.join(path, "latest_checkpointed_iteration.txt"))
            or any(name.startswith("mp_rank_") for name in os.listdir(path))
            or any(name.startswith("iter_") or name == "release" for name in os.listdir(path)))


def load_model(path: str) -> LoadedModel:
    """A Megatron checkpoint, a TAPE model directory or a Hugging Face ESM directory (see the module doc)."""
    if not os.path.exists(path):
        raise EvaluationError(f"{path}: no such model (expected a Megatron checkpoint, a TAPE model directory or a "
                              f"Hugging Face ESM directory)")
    if _is_megatron(path):
        return _load_megatron(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise EvaluationError(f"{path}: neither a Megatron checkpoint (latest_checkpointed_iteration.txt, iter_*/, "
                              f"mp_rank_*/) nor a model directory with config.json")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except ValueError as err:
            raise EvaluationError(f"{config_path}: not JSON ({err})") from None
    if config.get("model_type") == "esm":
        return _load_hf_esm(path)
    return _load_tape_directory(path)


def _tape_model_from_state(state: dict, config: dict, source: str):
    from tape_tasks.config import ProteinBertConfig
    from tape_tasks.model import ProteinBertForMaskedLM, load_checked

    model = ProteinBertForMaskedLM(ProteinBertConfig.from_dict(config))
    missing_head = [k for k in ("mlm.bias", "mlm.transform.dense.weight") if k not in state]
    if missing_head:
        raise EvaluationError(f"{source}: no masked-LM head ({missing_head[0]} missing): a task model cannot be "
                              f"scored on masked residues")
    load_checked(model, state, source)
    return model.eval()


def _tape_logits(model) -> Callable:
    def logits(tokens, padding_mask):
        return model(tokens, padding_mask.long())[0]
    return logits


def _load_tape_directory(path: str) -> LoadedModel:
    from tape_tasks.config import ProteinBertConfig
    from tape_tasks.model import ProteinBertForMaskedLM

    config = ProteinBertConfig.from_pretrained(path)
    if config.model_type != "transformer":
        raise EvaluationError(f"{path}: model_type {config.model_type!r} has no masked-LM head")
    weights = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    if "mlm.bias" not in weights:
        raise EvaluationError(f"{path}/pytorch_model.bin: no masked-LM head (mlm.* weights): a finetuned task "
                              f"model cannot be scored on masked residues")
    model = ProteinBertForMaskedLM.from_pretrained(path).eval()
    return LoadedModel(_tape_logits(model), config.max_position_embeddings, "tape", os.path.abspath(path),
                       {"num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                        "num_attention_heads": config.num_attention_heads})


def _load_megatron(path: str) -> LoadedModel:
    from megatron_protein.conversion.to_tape import check_complete, load_merged_bert, megatron_to_tape

    merged = load_merged_bert(path)
    conversion = megatron_to_tape(merged)
    check_complete(conversion, merged.source)
    model = _tape_model_from_state(conversion.state, conversion.config, merged.source)
    info = {"iteration": merged.iteration, "tensor_model_parallel_size": merged.tp_size,
            "pipeline_model_parallel_size": merged.pp_size, "num_layers": merged.shape.num_layers,
            "hidden_size": merged.shape.hidden_size, "num_attention_heads": merged.shape.num_attention_heads}
    args = merged.args
    if args is not None:
        data_path = getattr(args, "data_path", None)
        if isinstance(data_path, (list, tuple)):  # Megatron's nargs='*' list: one prefix, or a blend (no one prefix)
            data_path = data_path[0] if len(data_path) == 1 else None
        info["data_path"] = data_path
        for name in ("global_batch_size", "seq_length"):
            if getattr(args, name, None) is not None:
                info[name] = getattr(args, name)
        if merged.iteration and "global_batch_size" in info and "seq_length" in info:
            info["tokens_seen"] = int(merged.iteration) * int(info["global_batch_size"]) * int(info["seq_length"])
    return LoadedModel(_tape_logits(model), merged.shape.max_position_embeddings, "megatron", merged.source, info)


def _load_hf_esm(path: str) -> LoadedModel:
    try:
        from transformers import EsmForMaskedLM
    except ImportError:
        raise EvaluationError(f"{path} is a Hugging Face ESM directory: install transformers "
                              f"(pip install -e .[hf]) to evaluate it") from None
    model = EsmForMaskedLM.from_pretrained(path).eval()

    def logits(tokens, padding_mask):
        return model(input_ids=tokens, attention_mask=padding_mask.long()).logits

    # ESM numbers positions from padding_idx + 1 (see conversion/to_hf_esm.py): one row fewer for tokens.
    return LoadedModel(logits, model.config.max_position_embeddings - 1, "hf-esm", os.path.abspath(path),
                       {"num_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
                        "num_attention_heads": model.config.num_attention_heads})


# ------------------------------------------------------------------------------------------------------- data
class SequenceSource:
    """Token-id arrays in memory with the reader interface :class:`MLMDataset` uses (``sizes``, ``[i]``, ``get``)."""

    def __init__(self, sequences: list[np.ndarray], name: str):
        self.sequences = sequences
        self.sizes = np.array([len(s) for s in sequences], dtype=np.int64)
        self.name = name
        self.prefix = None  # nothing on disk: MLMDataset keeps its index map in memory

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.sequences[index]

    def get(self, index: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        sequence = self.sequences[index]
        return sequence[offset:] if length is None else sequence[offset:offset + length]


def read_sequences(path: str):
    """An indexed-dataset prefix (``PATH.bin``/``.idx``) as it is, or any preprocess input read and tokenized."""
    from megatron_protein.data.indexed_dataset import MMapIndexedDataset, dataset_exists
    from megatron_protein.data.readers import read_records
    from megatron_protein.data.tokenizer import IUPACTokenizer

    if dataset_exists(path):
        return MMapIndexedDataset(path)
    if not os.path.exists(path):
        raise EvaluationError(f"{path}: no such sequence file (nor an indexed dataset {path}.bin/.idx)")
    tokenizer = IUPACTokenizer()
    sequences = []
    for record in read_records(path):
        ids, _ = tokenizer.encode_array(record.sequence)
        if ids.size:
            sequences.append(ids.astype(np.int64))
    if not sequences:
        raise EvaluationError(f"{path}: no sequence with residues")
    return SequenceSource(sequences, os.path.basename(path))


def training_residue_counts(path: str) -> np.ndarray:
    from megatron_protein.training.pretrain_data import residue_counts
    source = read_sequences(path)
    if isinstance(source, SequenceSource):
        return np.bincount(np.concatenate(source.sequences), minlength=VOCAB_SIZE)
    return residue_counts(source)


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: LoadedModel, source, seed: int = 1234, passes: int = 1, batch_size: int = 32,
             seq_length: Optional[int] = None, num_samples: Optional[int] = None, mask_prob: float = 0.15,
             mask_token_prob: float = 0.8, random_token_prob: float = 0.1,
             train_counts: Optional[np.ndarray] = None) -> dict:
    """Score ``passes`` maskings of every sequence of ``source`` (or ``num_samples`` samples); the
    :meth:`MLMMetrics.summary` plus what was scored."""
    longest = int(np.max(source.sizes)) + 2
    if seq_length is None:
        seq_length = min(longest, model.max_positions)
    if seq_length > model.max_positions:
        raise EvaluationError(f"--seq-length {seq_length} exceeds the model's {model.max_positions} positions")
    samples = num_samples if num_samples is not None else passes * len(source)
    dataset = MLMDataset(source, seq_length, samples, seed, mask_prob=mask_prob, cache_dir=None,
                         mask_token_prob=mask_token_prob, random_token_prob=random_token_prob,
                         name=getattr(source, "name", None) or os.path.basename(source.prefix))
    metrics = MLMMetrics(VOCAB_SIZE)
    started = time.monotonic()
    for start in range(0, samples, batch_size):
        batch = [dataset[i] for i in range(start, min(samples, start + batch_size))]
        tokens = torch.stack([b["tokens"] for b in batch])
        padding = torch.stack([b["padding_mask"] for b in batch])
        labels = torch.stack([b["labels"] for b in batch])
        kinds = torch.stack([b["prediction_kind"] for b in batch])
        logits = model.logits(tokens, padding).float()[..., :VOCAB_SIZE]
        per_token = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), labels.reshape(-1), ignore_index=-100,
                                    reduction="none")
        metrics.add(per_token, labels.reshape(-1), kinds.reshape(-1))
        done = start + len(batch)
        if done == samples or (start // batch_size) % 20 == 0:
            rate = done / max(time.monotonic() - started, 1e-9)
            logger.info("scored %d/%d samples (%.1f samples/s, ETA %.0f s)", done, samples, rate,
                        (samples - done) / max(rate, 1e-9))
    frequencies = training_frequencies(train_counts, VOCAB_SIZE) if train_counts is not None else None
    cropped = int(np.sum(np.asarray(source.sizes) > seq_length - 2))
    return {"samples": samples, "sequences": len(source), "residues": int(np.sum(source.sizes)),
            "cropped_sequences": cropped, "seq_length": seq_length, "metrics": metrics.summary(frequencies)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_protein.evaluate_mlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Megatron checkpoint, TAPE model directory or Hugging Face ESM directory")
    p.add_argument("sequences", help="FASTA (or Stockholm, TAPE LMDB/JSON) or an indexed-dataset prefix")
    p.add_argument("--train-data", default=None,
                   help="training sequences (same formats) for the training-frequency unigram baseline; default for "
                        "a Megatron checkpoint: its data_path's _train split, when it exists")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--passes", type=int, default=1, help="maskings of every sequence")
    p.add_argument("--num-samples", type=int, default=None, help="score this many samples instead of passes")
    p.add_argument("--seq-length", type=int, default=None,
                   help="sample length in tokens (default: the longest sequence + 2, at most the model's positions)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--mask-token-prob", type=float, default=0.8)
    p.add_argument("--random-token-prob", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--output", default=None, help="also write the JSON here")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if args.passes < 1 or args.batch_size < 1:
        raise SystemExit("evaluate_mlm: --passes and --batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model)
        source = read_sequences(args.sequences)
        train_data = args.train_data
        if train_data is None and model.info.get("data_path"):
            from megatron_protein.data.indexed_dataset import dataset_exists
            candidate = f"{model.info['data_path']}_train"
            train_data = candidate if dataset_exists(candidate) else None
        counts = training_residue_counts(train_data) if train_data else None
        result = evaluate(model, source, seed=args.seed, passes=args.passes, batch_size=args.batch_size,
                          seq_length=args.seq_length, num_samples=args.num_samples, mask_prob=args.mask_prob,
                          mask_token_prob=args.mask_token_prob, random_token_prob=args.random_token_prob,
                          train_counts=counts)
    except (EvaluationError, ValueError, OSError) as err:
        raise SystemExit(f"evaluate_mlm: {err}") from None
    report = {"model": model.source, "model_format": model.format, "model_info": model.info,
              "sequences_file": os.path.abspath(args.sequences),
              "train_data": os.path.abspath(train_data) if train_data else None, "seed": args.seed,
              "passes": args.passes if args.num_samples is None else None,
              "masking": {"mask_prob": args.mask_prob, "mask_token_prob": args.mask_token_prob,
                          "random_token_prob": args.random_token_prob}, **result}
    report = strict_json.finite(report)
    text = json.dumps(report, indent=2, allow_nan=False)
    print(text)
    if args.output:
        tmp = f"{args.output}.tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.output)
    return report


if __name__ == "__main__":
    main()
