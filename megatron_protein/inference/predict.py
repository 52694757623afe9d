"""``folding/predict.py``: FASTA (+ optional MSA or sequence database) + checkpoint -> PDB with pLDDT, and a JSON
summary.

    python folding/predict.py --fasta F --checkpoint DIR --output OUT.pdb [--msa M.a3m | --database DB.fasta]
                              [--chunk_size N] [--num_recycles K] [--device cpu|cuda]
    torchrun --nproc_per_node N folding/predict.py --dap_degree N ...   # a long chain's activations over N ranks

- One record: ``OUT.pdb`` and ``OUT.json``. Several records: ``--output`` is a directory that receives
  ``<record>.pdb`` per record and ``summary.json``.
- pLDDT (0-100, per residue) is written into the B-factor column of every atom of the residue.
- MSA: ``--msa`` (A3M or Stockholm; one record only, its query must be the record's sequence), or ``--database``
  (jackhmmer, in process, against a FASTA of sequences; one MSA per record), or neither: single-sequence mode.
  Single-sequence mode is what a bare ``--fasta`` gives, and the default model is trained for it too (a fraction
  ``data.profile_dropout`` of its training examples have neither MSA nor profile; docs/folding.md reports its
  held-out accuracy in this mode beside the profile mode).
- The model and its config come from the checkpoint directory (the Megatron layout that ``folding/train.py``
  writes: ``latest_checkpointed_iteration.txt`` and ``iter_*/mp_rank_00/model_optim_rng.pt``).

Bad input (letters that are not amino acids, an empty FASTA, an MSA whose query is another sequence, a checkpoint
that is not a folding checkpoint or whose weights do not fit its config) is one line ``error: <file>[: record
...]: <what was expected>`` on stderr and exit status 2, reported before anything is written; every output file
is written to a temporary name and renamed, so no half-written file is left behind.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


class PredictionInputError(ValueError):
    """Input the user can fix; the message starts with the file (and record)."""


@dataclass
class Query:
    name: str
    sequence: str
    location: str


def read_queries(path: str) -> list[Query]:
    """FASTA records with amino-acid letters only (X allowed, and IUPAC's B, Z, J, U, O read as X)."""
    from megatron_protein.data.msa import MsaError, validate_sequence
    from megatron_protein.data.readers import InputFormatError, read_fasta

    if not os.path.exists(path):
        raise PredictionInputError(f"{path}: no such file; expected a FASTA file of protein sequences")
    try:
        records = list(read_fasta(path))
    except InputFormatError as exc:
        raise PredictionInputError(str(exc)) from None
    except UnicodeDecodeError:
        raise PredictionInputError(f"{path}: not a text file; expected a FASTA file of protein sequences") from None
    if not records:
        raise PredictionInputError(f"{path}: no FASTA records; expected at least one '>name' line followed by a "
                                   "protein sequence")
    queries, seen = [], set()
    for number, record in enumerate(records, start=1):
        name = record.name or f"record_{number}"
        try:
            sequence = validate_sequence(record.sequence, path, name)
        except MsaError as exc:
            raise PredictionInputError(str(exc)) from None
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        if safe in seen:
            raise PredictionInputError(f"{path}: record {name!r}: the name occurs twice (as {safe!r}); expected "
                                       "distinct record names, one output file each")
        seen.add(safe)
        queries.append(Query(safe, sequence, record.location))
    return queries


def load_folding_checkpoint(path: str, device):
    """(model in eval mode, config, iteration) from a folding checkpoint directory."""
    from megatron_protein.models.folding.config import ConfigError, FoldingConfig
    from megatron_protein.models.folding.model import AlphaFold
    from megatron_protein.parallel import scg
    from megatron_protein.training import checkpointing

    if not os.path.isdir(path):
        raise PredictionInputError(f"{path}: no such directory; expected a folding checkpoint directory (the "
                                   "--model_dir of folding/train.py)")
    groups = scg.current()
    try:
        state, file = checkpointing.load_state(path, groups)
    except checkpointing.CheckpointError as exc:
        raise PredictionInputError(str(exc).splitlines()[0]) from None
    saved_args = state.get("args")
    values = getattr(saved_args, "folding_config", None)
    if not isinstance(values, dict):
        raise PredictionInputError(f"{file}: not a folding checkpoint (its args hold no folding_config); expected "
                                   "a checkpoint written by folding/train.py")
    try:
        config = FoldingConfig.from_dict(values)
    except (ConfigError, TypeError) as exc:
        raise PredictionInputError(f"{file}: its folding config cannot be read ({exc})") from None
    model = AlphaFold(config)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])
        raise PredictionInputError(f"{file}: its weights do not fit its config ({config.preset!r}): "
                                   f"{detail[:300]}") from None
    model.to(device).eval()
    return model, config, state.get("iteration", 0)


def build_msas(queries: list[Query], msa_path: Optional[str], database: Optional[str], cpus: int):
    """One :class:`~megatron_protein.data.msa.Msa` per query (single-sequence without ``--msa``/``--database``)."""
    from megatron_protein.data.msa import JackhmmerMsaBuilder, Msa, MsaError, read_msa

    if msa_path is not None:
        if len(queries) != 1:
            raise PredictionInputError(f"{msa_path}: --msa gives one MSA but the FASTA has {len(queries)} records; "
                                       "use --database to build one MSA per record, or one record per FASTA")
        if not os.path.exists(msa_path):
            raise PredictionInputError(f"{msa_path}: no such file; expected an A3M or Stockholm MSA")
        try:
            msa = read_msa(msa_path)
            msa.check_query(queries[0].sequence, f"FASTA record {queries[0].name!r}")
        except MsaError as exc:
            raise PredictionInputError(str(exc)) from None
        return [msa]
    if database is not None:
        try:
            builder = JackhmmerMsaBuilder(database, cpus=cpus)
            return builder.build_many([(q.name, q.sequence) for q in queries])
        except MsaError as exc:
            raise PredictionInputError(str(exc)) from None
    return [Msa.single_sequence(q.sequence, q.name) for q in queries]


def prediction_features(query: Query, msa, config) -> dict:
    """The model's input features of one query (no structure targets), batched [1, ...] as torch tensors."""
    from megatron_protein.data import folding_features as ff
    from megatron_protein.data.folding_dataset import collate_features
    from megatron_protein.training.folding_trainer import feature_config

    sequence_feats = ff.sequence_features(query.sequence)
    msa_feats = ff.msa_features(msa)
    rng = np.random.default_rng(0)
    features_config = feature_config(config)
    # Inference: no BERT masking of the MSA (AF2 masks only in training); every row is a cluster centre up to the
    # configured number of clusters, the rest the extra MSA.
    from dataclasses import replace
    features_config = replace(features_config, masked_msa_fraction=0.0, profile_dropout=0.0)
    example = ff.make_example(sequence_feats, msa_feats, None, features_config, rng, crop=False)
    return collate_features([example])


def _atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def predict(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_protein.parallel import dap, scg
    try:
        return _predict(args)
    except (PredictionInputError, scg.ParallelConfigError, dap.DAPHookError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def prediction_groups(dap_degree: int):
    """The DAP process groups of a ``--dap_degree N`` prediction (None for one process).

    Every rank predicts the same chains together, each holding 1/N of the MSA and pair activations inside the
    Evoformer; rank 0 writes the outputs. It runs on exactly N processes (no data parallelism: the chains are not
    shared out), launched by torchrun; every check raises on every rank before any collective.
    """
    from megatron_protein.parallel import scg

    if dap_degree < 1:
        raise PredictionInputError(f"--dap_degree: must be >= 1, got {dap_degree}")
    if dap_degree == 1:
        return None
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise PredictionInputError(f"--dap_degree {dap_degree}: RANK/WORLD_SIZE are not set; launch with torchrun "
                                   f"--nproc_per_node {dap_degree} folding/predict.py --dap_degree {dap_degree} ...")
    # Inference draws no random numbers in the model (eval mode); the seed only satisfies the rule that every rank
    # of a dap group starts from the same generator state.
    return scg.init_process_group(parallel_degree=[("dap", dap_degree)], seed=0)


def _predict(args: argparse.Namespace) -> int:
    import torch

    from megatron_protein.parallel import scg
    from megatron_protein.structure import io as structure_io

    if args.msa is not None and args.database is not None:
        raise PredictionInputError(f"{args.msa}: give --msa or --database, not both")
    if args.chunk_size is not None and args.chunk_size <= 0:
        raise PredictionInputError(f"--chunk_size: must be positive, got {args.chunk_size}")
    if args.num_recycles is not None and args.num_recycles < 0:
        raise PredictionInputError(f"--num_recycles: must be >= 0, got {args.num_recycles}")
    # Everything is read and checked before the model runs or a file is written.
    groups = prediction_groups(args.dap_degree)
    writer = groups is None or groups.rank == 0
    queries = read_queries(args.fasta)
    device = torch.device(args.device) if args.device else scg.default_device()
    model, config, iteration = load_folding_checkpoint(args.checkpoint, device)
    model.trunk.check_parallel()
    msas = build_msas(queries, args.msa, args.database, args.cpus)
    several = len(queries) > 1
    if several:
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise PredictionInputError(f"{args.output}: exists and is not a directory; with {len(queries)} FASTA "
                                       "records --output names a directory (one PDB per record)")
        if writer:
            os.makedirs(args.output, exist_ok=True)
    else:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise PredictionInputError(f"{args.output}: the directory {parent} does not exist")
    num_recycles = config.model.max_recycling_iters if args.num_recycles is None else args.num_recycles

    summaries = []
    for query, msa in zip(queries, msas):
        started = time.monotonic()
        batch = {k: v.to(device) for k, v in prediction_features(query, msa, config).items()}
        with torch.no_grad():
            out = model(batch, num_recycles=num_recycles, chunk_size=args.chunk_size)
        plddt = out["plddt"][0].float().cpu().numpy()
        chain = structure_io.chain_from_prediction(batch["aatype"][0], out["positions"][0], out["atom37_mask"][0],
                                                   residue_index=np.arange(1, len(query.sequence) + 1))
        pdb_path = os.path.join(args.output, f"{query.name}.pdb") if several else args.output
        if not writer:
            continue
        structure_io.write_structure(chain, pdb_path, plddt=np.clip(plddt, 0.0, 100.0))
        summary = {"name": query.name, "length": len(query.sequence), "mean_plddt": float(plddt.mean()),
                   "seconds": round(time.monotonic() - started, 3), "num_recycles": num_recycles,
                   "msa_depth": int(msa.depth) if hasattr(msa, "depth") else len(msa.rows),
                   "msa_source": "single-sequence" if (args.msa is None and args.database is None)
                   else (args.msa or args.database),
                   "pdb": os.path.abspath(pdb_path), "checkpoint": os.path.abspath(args.checkpoint),
                   "checkpoint_iteration": iteration, "config_preset": config.preset, "device": str(device),
                   "dap_degree": args.dap_degree}
        summaries.append(summary)
        if not several:
            _atomic_write_text(os.path.splitext(args.output)[0] + ".json", json.dumps(summary, indent=1) + "\n")
        print(f"{query.name}: {len(query.sequence)} residues, mean pLDDT {summary['mean_plddt']:.1f}, "
              f"{summary['seconds']:.2f} s -> {pdb_path}")
    if several and writer:
        _atomic_write_text(os.path.join(args.output, "summary.json"), json.dumps(summaries, indent=1) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="folding/predict.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fasta", required=True, help="protein sequence(s), FASTA")
    p.add_argument("--checkpoint", required=True, help="folding checkpoint directory (folding/train.py --model_dir)")
    p.add_argument("--output", required=True,
                   help="PDB file (one record; .cif for mmCIF) or directory (several records)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--msa", default=None, help="MSA of the one record (A3M or Stockholm), query first")
    g.add_argument("--database", default=None, help="FASTA database to build an MSA per record with jackhmmer")
    p.add_argument("--chunk_size", type=int, default=None, help="chunk the Evoformer (less memory, same result)")
    p.add_argument("--num_recycles", type=int, default=None, help="recycles (default: the model's, 3 in AF2)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: CUDA when available)")
    p.add_argument("--cpus", type=int, default=2, help="threads of the jackhmmer search (--database)")
    p.add_argument("--dap_degree", type=int, default=1,
                   help="split the Evoformer's activations over N processes (dynamic axial parallelism; launch "
                        "with torchrun --nproc_per_node N; docs/parallel_folding.md)")
    return p
