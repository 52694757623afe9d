"""Folding data: real chains with their MSAs, served as AlphaFold2 training examples (cropped) and evaluation
examples (whole chains), deterministically, with a resumable data position and a padding collate.

Where chains come from (:class:`ChainRecord` each):

* :class:`NpzChains`: the embedded sample ``data/structures/chains_sample.npz`` (the default; 360 train / 40 valid
  chains, see data/structures/PROVENANCE.md) or the full ``chains.npz`` it was cut from (same keys; N, CA, C, O, CB
  coordinates and HHblits-derived profiles).
* :class:`StructureFileChains`: a folder (or list) of PDB/mmCIF files, read by
  :mod:`megatron_protein.structure.io` (one chain per file: the first protein chain unless told otherwise).

MSAs: :class:`MsaDirectory` looks for ``<chain id>.a3m`` (or ``.sto``) in one or more folders (the embedded
``data/structures/msas/`` by default); a chain without one is in single-sequence mode. An MSA whose query is not the
chain's sequence is an error naming the file.

Determinism: the training stream is a sequence of *samples*; sample ``k`` belongs to epoch ``k // n_chains``, takes
the chain at position ``k % n_chains`` of that epoch's permutation (``default_rng([seed, 2, epoch])``), and draws
its MSA sampling, masking, profile dropout and crop from ``default_rng([seed, 0, k])``. Evaluation example ``i``
uses ``default_rng([seed, 1, i])``, the whole chain and the profile. So the same ``(seed, k)`` gives the same
example in any process, with any number of loader workers, and a resumed run continues from ``consumed_samples``
(:meth:`FoldingBatches.state_dict`). Data-parallel rank ``r`` of ``D`` takes samples
``consumed + r*B .. consumed + (r+1)*B - 1`` of each global batch of ``D*B`` samples (Megatron's convention).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_protein.data import folding_features as ff
from megatron_protein.data.msa import Msa, MsaError, read_msa
from megatron_protein.structure import residue_constants as rc

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CHAINS = os.path.join(REPO_ROOT, "data", "structures", "chains_sample.npz")
DEFAULT_MSA_DIR = os.path.join(REPO_ROOT, "data", "structures", "msas")


class FoldingDataError(MsaError):
    """Bad folding input (a chains file, a structure file, an MSA); the message names the file and record."""


@dataclass
class ChainRecord:
    """One chain: sequence, numbering, atom37 coordinates and masks, optional profile (restype order)."""
    chain_id: str
    sequence: str
    residue_index: np.ndarray  # int64 [L]
    all_atom_positions: np.ndarray  # float32 [L, 37, 3], Angstrom
    all_atom_mask: np.ndarray  # float32 [L, 37]
    profile: Optional[np.ndarray] = None  # float32 [L, 20], columns in rc.restypes order
    source: str = ""

    def __post_init__(self):
        length = len(self.sequence)
        expect = {"residue_index": (length,), "all_atom_positions": (length, rc.atom_type_num, 3),
                  "all_atom_mask": (length, rc.atom_type_num)}
        if self.profile is not None:
            expect["profile"] = (length, 20)
        for key, shape in expect.items():
            if getattr(self, key).shape != shape:
                raise FoldingDataError(f"{self.source}: chain {self.chain_id!r}: {key} has shape "
                                       f"{getattr(self, key).shape}; expected {shape}")


# ------------------------------------------------------------------------------------------------ sources
class NpzChains:
    """Chains of a ``chains.npz``-format file (keys of ../shared/data README section 3; optional ``split``).

    ``split``: keep only chains whose ``split`` value is this (``train``/``valid``); the file must then have a
    ``split`` key. Arrays are loaded once; a :class:`ChainRecord` (atom37) is built when asked for.
    """

    REQUIRED = ("ids", "sequence", "start_resnum", "lengths", "offsets", "coords", "atom_names")

    def __init__(self, path: str = DEFAULT_CHAINS, split: Optional[str] = None):
        self.path = path
        if not os.path.exists(path):
            raise FoldingDataError(f"{path}: no such file; expected a chains.npz-format file")
        try:
            data = np.load(path, allow_pickle=False)
            arrays = {key: data[key] for key in data.files}
        except (ValueError, OSError, EOFError) as error:
            raise FoldingDataError(f"{path}: not a readable .npz file ({error}); expected a chains.npz-format "
                                   "file") from error
        missing = [key for key in self.REQUIRED if key not in arrays]
        if missing:
            raise FoldingDataError(f"{path}: missing keys {missing}; expected the keys of chains.npz "
                                   f"({', '.join(self.REQUIRED)}, optional profile, profile_alphabet, split)")
        atom_names = [str(a) for a in arrays["atom_names"]]
        unknown = [a for a in atom_names if a not in rc.atom_order]
        if unknown:
            raise FoldingDataError(f"{path}: atom_names {unknown} are not atom37 names")
        self._atom37_index = np.array([rc.atom_order[a] for a in atom_names], dtype=np.int64)
        self._arrays = arrays
        if split is None:
            self.indices = np.arange(len(arrays["ids"]))
        else:
            if "split" not in arrays:
                raise FoldingDataError(f"{path}: no 'split' key, so split={split!r} cannot be chosen; expected "
                                       "a file with a split (e.g. data/structures/chains_sample.npz) or split=None")
            self.indices = np.flatnonzero(arrays["split"] == split)
            if len(self.indices) == 0:
                raise FoldingDataError(f"{path}: no chain has split {split!r}; the file has "
                                       f"{sorted(set(arrays['split'].tolist()))}")
        self._profile_order = None
        if "profile" in arrays:
            alphabet = [str(a) for a in arrays.get("profile_alphabet", np.array(list(rc.restypes)))]
            if sorted(alphabet) != sorted(rc.restypes):
                raise FoldingDataError(f"{path}: profile_alphabet {''.join(alphabet)!r}; expected the 20 amino acids")
            self._profile_order = np.array([alphabet.index(aa) for aa in rc.restypes], dtype=np.int64)
        self.split = split

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def ids(self) -> List[str]:
        return [str(self._arrays["ids"][i]) for i in self.indices]

    @property
    def lengths(self) -> np.ndarray:
        return self._arrays["lengths"][self.indices].astype(np.int64)

    def __getitem__(self, i: int) -> ChainRecord:
        a = self._arrays
        j = int(self.indices[i])
        start, end = int(a["offsets"][j]), int(a["offsets"][j + 1])
        chain_id, sequence = str(a["ids"][j]), str(a["sequence"][j])
        where = f"{self.path}: chain {chain_id!r}"
        if end - start != len(sequence) or int(a["lengths"][j]) != len(sequence):
            raise FoldingDataError(f"{where}: {end - start} coordinate rows, length {int(a['lengths'][j])}, "
                                   f"sequence of {len(sequence)}; expected them equal")
        coords = a["coords"][start:end].astype(np.float32)
        positions = np.zeros((len(sequence), rc.atom_type_num, 3), np.float32)
        mask = np.zeros((len(sequence), rc.atom_type_num), np.float32)
        positions[:, self._atom37_index] = coords
        mask[:, self._atom37_index] = np.isfinite(coords).all(-1)
        positions[~np.isfinite(positions)] = 0.0
        # Only atoms the residue type has (promod3 stores a CB for glycine too; glycine has none).
        aatype = rc.sequence_to_aatype(sequence)
        mask *= rc.restype_atom37_mask()[aatype]
        profile = None
        if self._profile_order is not None:
            profile = a["profile"][start:end][:, self._profile_order].astype(np.float32)
        residue_index = int(a["start_resnum"][j]) + np.arange(len(sequence), dtype=np.int64)
        return ChainRecord(chain_id, sequence, residue_index, positions, mask, profile, source=self.path)


def increasing_residue_index(author_numbers: np.ndarray) -> np.ndarray:
    """Author residue numbers made strictly increasing, keeping the gaps of missing residues.

    The relative-position encoding (supplement 1.6.4) reads ``residue_index`` differences, so two residues must
    never share an index: insertion codes (52, 52A, 52B) and numbering that restarts would give them one. Each
    step is ``max(1, number[i] - number[i-1])``; the first residue keeps its number. Files with plain increasing
    numbering are unchanged.
    """
    numbers = np.asarray(author_numbers, np.int64)
    if len(numbers) == 0:
        return numbers
    steps = np.maximum(1, np.diff(numbers))
    return np.concatenate([numbers[:1], numbers[0] + np.cumsum(steps)]).astype(np.int64)


class StructureFileChains:
    """Chains read from PDB/mmCIF files (gzipped too) by :func:`megatron_protein.structure.io.read_chain`.

    ``paths``: a folder (every ``*.pdb``, ``*.cif``, ``*.ent`` and their ``.gz``), a glob, or a list of files.
    ``chain``: the chain to take from every file (default: the first protein chain). The chain id of a record is
    the file name without extensions, plus ``_<chain>`` (e.g. ``5PTI_A``), which is the name its MSA must have.
    ``residue_index`` is the author numbering made strictly increasing (:func:`increasing_residue_index`).
    Files are read when first asked for and kept; a bad file raises the structure reader's error naming it.
    """

    PATTERNS = ("*.pdb", "*.cif", "*.ent", "*.mmcif", "*.pdb.gz", "*.cif.gz", "*.ent.gz", "*.mmcif.gz")

    def __init__(self, paths: Union[str, Sequence[str]], chain: Optional[str] = None):
        if isinstance(paths, str):
            if os.path.isdir(paths):
                files = sorted(f for pattern in self.PATTERNS for f in glob.glob(os.path.join(paths, pattern)))
            else:
                files = sorted(glob.glob(paths)) or [paths]
        else:
            files = list(paths)
        if not files:
            raise FoldingDataError(f"{paths}: no PDB/mmCIF files; expected files named {', '.join(self.PATTERNS)}")
        self.files = files
        self.chain = chain
        self._records: Dict[int, ChainRecord] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> ChainRecord:
        if i not in self._records:
            from megatron_protein.structure import io as structure_io

            path = self.files[i]
            protein = structure_io.read_chain(path, chain=self.chain)
            stem = os.path.basename(path)
            for extension in (".gz", ".pdb", ".cif", ".ent", ".mmcif"):
                if stem.endswith(extension):
                    stem = stem[: -len(extension)]
            self._records[i] = ChainRecord(
                chain_id=f"{stem}_{protein.chain_id}", sequence=protein.sequence,
                residue_index=increasing_residue_index(protein.residue_index),
                all_atom_positions=np.asarray(protein.atom_positions, np.float32),
                all_atom_mask=np.asarray(protein.atom_mask, np.float32), profile=None, source=path)
        return self._records[i]

    @property
    def ids(self) -> List[str]:
        return [self[i].chain_id for i in range(len(self))]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(self[i].sequence) for i in range(len(self))], dtype=np.int64)


class MsaDirectory:
    """MSAs by chain id: ``<dir>/<chain_id>.a3m`` (or ``.sto``), first folder that has one wins."""

    EXTENSIONS = (".a3m", ".a3m.gz", ".sto")

    def __init__(self, directories: Union[None, str, Sequence[str]] = DEFAULT_MSA_DIR):
        if directories is None:
            directories = []
        elif isinstance(directories, str):
            directories = [directories]
        self.directories = [d for d in directories if d]
        for d in self.directories:
            if not os.path.isdir(d) and d != DEFAULT_MSA_DIR:
                raise FoldingDataError(f"{d}: no such folder; expected a folder of <chain id>.a3m files")

    def path(self, chain_id: str) -> Optional[str]:
        for d in self.directories:
            for extension in self.EXTENSIONS:
                candidate = os.path.join(d, chain_id + extension)
                if os.path.exists(candidate):
                    return candidate
        return None

    def get(self, chain_id: str, sequence: str) -> Msa:
        path = self.path(chain_id)
        if path is None:
            return Msa.single_sequence(sequence, chain_id)
        msa = read_msa(path)
        msa.check_query(sequence, f"chain {chain_id!r}")
        return msa


# ------------------------------------------------------------------------------------------------ dataset
class FoldingDataset:
    """AlphaFold2 examples of a set of chains (see the module docstring for the determinism contract)."""

    def __init__(self, chains=None, msas: Union[None, str, Sequence[str], MsaDirectory] = DEFAULT_MSA_DIR,
                 config: ff.FeatureConfig = ff.FeatureConfig(), seed: int = 0):
        self.chains = NpzChains() if chains is None else chains
        self.msas = msas if isinstance(msas, MsaDirectory) else MsaDirectory(msas)
        self.config = config
        self.seed = int(seed)
        self._raw: Dict[int, Tuple[ff.Features, ff.Features, ff.Features, Optional[np.ndarray], int]] = {}
        if len(self.chains) == 0:
            raise FoldingDataError("no chains; expected at least one")

    def __len__(self) -> int:
        return len(self.chains)

    def check_msas(self) -> int:
        """Parse every chain's MSA file and check its query against the chain (nothing is kept: the examples
        read them again when they are built). Training calls it before its first step, on
        every rank, so a bad MSA file stops every rank with the same error instead of one rank mid-run while the
        others wait in a collective. Returns the number of chains that have an MSA file."""
        found = 0
        for i in range(len(self.chains)):
            chain = self.chains[i]
            if self.msas.path(chain.chain_id) is not None:
                self.msas.get(chain.chain_id, chain.sequence)
                found += 1
        return found

    def chain_id(self, i: int) -> str:
        return self.chains[i].chain_id

    def msa_depth(self, i: int) -> int:
        """Rows of chain ``i``'s MSA after removing identical ones (1 in single-sequence mode)."""
        return self.raw_features(i)[4]

    def raw_features(self, i: int):
        """(sequence features, MSA features, targets, profile, MSA depth) of chain ``i``, computed once."""
        if i not in self._raw:
            chain = self.chains[i]
            sequence_feats = ff.sequence_features(chain.sequence, chain.residue_index)
            msa = self.msas.get(chain.chain_id, chain.sequence)
            msa_feats = ff.msa_features(msa, self.config.max_msa_sequences)
            targets = {"all_atom_positions": chain.all_atom_positions, "all_atom_mask": chain.all_atom_mask}
            targets.update(ff.structure_targets(sequence_feats["aatype"], chain.all_atom_positions,
                                                chain.all_atom_mask))
            self._raw[i] = (sequence_feats, msa_feats, targets, chain.profile, msa_feats["msa"].shape[0])
        return self._raw[i]

    def _example(self, i: int, rng: np.random.Generator, crop: bool, drop_profile: Optional[bool]) -> ff.Features:
        sequence_feats, msa_feats, targets, profile, _ = self.raw_features(i)
        return ff.make_example(sequence_feats, msa_feats, targets, self.config, rng, crop=crop, profile=profile,
                               drop_profile=drop_profile)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of chains in ``epoch``."""
        return np.random.default_rng([self.seed, 2, int(epoch)]).permutation(len(self))

    def sample_chain(self, sample_index: int) -> int:
        epoch, position = divmod(int(sample_index), len(self))
        return int(self.epoch_order(epoch)[position])

    def train_example(self, sample_index: int) -> ff.Features:
        """Training sample ``sample_index`` of the stream: cropped, masked, profile dropped at the configured rate."""
        rng = np.random.default_rng([self.seed, 0, int(sample_index)])
        return self._example(self.sample_chain(sample_index), rng, crop=True, drop_profile=None)

    def eval_example(self, i: int, use_profile: bool = True) -> ff.Features:
        """Chain ``i`` whole (no crop), with (or without) its profile; the same for every call."""
        rng = np.random.default_rng([self.seed, 1, int(i)])
        return self._example(i, rng, crop=False, drop_profile=not use_profile)


# ------------------------------------------------------------------------------------------------- collate
def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def collate_features(examples: Sequence[ff.Features], pad_residues: Optional[int] = None,
                     pad_msa_rows: Optional[int] = None, pad_extra_rows: Optional[int] = None,
                     multiple_of: int = 1):
    """Stack examples into torch tensors with a leading batch dim, padding every axis to a common size.

    Residue axis: to ``pad_residues`` (e.g. the crop size) or the longest example; cluster rows: to
    ``pad_msa_rows`` or the most in the batch; extra rows: to ``pad_extra_rows`` or the most (at least 1, so an
    extra-MSA stack always has a row; padded rows have ``extra_msa_mask`` 0). Each padded size is rounded up to
    ``multiple_of`` (e.g. the DAP degree, so every rank gets an equal slice). Padding is 0 (masks 0 there) except
    ``backbone_rigid_tensor``, which is padded with identity frames so that inverting a padded frame is harmless.
    """
    import torch

    if not examples:
        raise ValueError("collate_features needs at least one example")
    keys = list(examples[0])
    for n, example in enumerate(examples[1:], start=1):
        if set(example) != set(keys):
            raise ValueError(f"example {n} has features {sorted(example)}; expected {sorted(keys)}")
    length = max(e["aatype"].shape[0] for e in examples)
    if pad_residues is not None:
        if pad_residues < length:
            raise ValueError(f"pad_residues={pad_residues} is below the longest example ({length} residues)")
        length = pad_residues
    rows = pad_msa_rows if pad_msa_rows is not None else max(e["msa"].shape[0] for e in examples)
    extra = pad_extra_rows if pad_extra_rows is not None else max(1, max(e["extra_msa"].shape[0] for e in examples))
    length, rows, extra = (_round_up(v, multiple_of) for v in (length, rows, extra))
    batch = {}
    for key in keys:
        padded = []
        for example in examples:
            value = example[key]
            target = list(value.shape)
            axis = ff.RESIDUE_AXIS.get(key)
            if axis is not None:
                target[axis] = length
            if key in ff.CLUSTER_ROW_KEYS:
                target[0] = rows
            elif key in ff.EXTRA_ROW_KEYS:
                target[0] = extra
            if any(t < s for t, s in zip(target, value.shape)):
                raise ValueError(f"feature {key!r} of shape {value.shape} does not fit the padded shape {target}")
            if key == "backbone_rigid_tensor":
                out = np.broadcast_to(np.eye(4, dtype=value.dtype), tuple(target)).copy()
            else:
                out = np.zeros(target, dtype=value.dtype)
            out[tuple(slice(0, s) for s in value.shape)] = value
            padded.append(out)
        batch[key] = torch.from_numpy(np.stack(padded))
    return batch


# ----------------------------------------------------------------------------------------------- batching
class FoldingBatches:
    """Training batches of one data-parallel rank, resumable at sample granularity.

    Each step consumes a global batch of ``batch_size * dp_world_size`` samples of the stream; this rank
    collates its ``batch_size`` of them (``pad_residues`` defaults to the crop size, so every batch has the same
    residue dimension; MSA rows are padded to the batch's largest, or with ``fixed_msa_rows`` to the config's
    ``max_msa_clusters`` / ``max_extra_msa``). ``state_dict()`` / ``load_state_dict()`` save and restore ``consumed_samples`` (the count
    of samples of every rank before the next batch), so a resumed run sees exactly the batches it would have seen.
    ``num_workers`` > 0 builds examples in a torch DataLoader's worker processes; the order is the same.
    """

    def __init__(self, dataset: FoldingDataset, batch_size: int, dp_rank: int = 0, dp_world_size: int = 1,
                 consumed_samples: int = 0, pad_residues: Optional[int] = None, multiple_of: int = 1,
                 num_workers: int = 0, fixed_msa_rows: bool = False):
        if batch_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"batch_size={batch_size}, dp_rank={dp_rank}, dp_world_size={dp_world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.consumed_samples = int(consumed_samples)
        self.pad_residues = dataset.config.crop_size if pad_residues is None else pad_residues
        self.multiple_of = multiple_of
        self.num_workers = num_workers
        # Fixed shapes (the config's maxima) instead of the batch's largest MSA: every step and rank the same.
        self.pad_msa_rows = dataset.config.max_msa_clusters if fixed_msa_rows else None
        self.pad_extra_rows = max(1, dataset.config.max_extra_msa) if fixed_msa_rows else None
        self._iterator = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.dp_world_size

    def sample_indices(self, consumed_samples: int) -> List[int]:
        """This rank's sample indices of the global batch that starts at ``consumed_samples``."""
        first = consumed_samples + self.dp_rank * self.batch_size
        return list(range(first, first + self.batch_size))

    def collate(self, examples):
        return collate_features(examples, pad_residues=self.pad_residues, pad_msa_rows=self.pad_msa_rows,
                                pad_extra_rows=self.pad_extra_rows, multiple_of=self.multiple_of)

    def _batches(self) -> Iterator[Dict]:
        if self.num_workers == 0:
            while True:
                indices = self.sample_indices(self.consumed_samples)
                yield self.collate([self.dataset.train_example(k) for k in indices])
        else:
            import torch.utils.data

            start = self.consumed_samples
            outer = self

            class _Samples(torch.utils.data.Dataset):
                def __getitem__(self, k):
                    return outer.dataset.train_example(k)

                def __len__(self):
                    return 1 << 62

            class _BatchSampler:
                def __iter__(self):
                    consumed = start
                    while True:
                        yield outer.sample_indices(consumed)
                        consumed += outer.global_batch_size

            loader = torch.utils.data.DataLoader(_Samples(), batch_sampler=_BatchSampler(),
                                                 collate_fn=self.collate, num_workers=self.num_workers)
            yield from loader

    def __iter__(self):
        return self

    def __next__(self) -> Dict:
        if self._iterator is None:
            self._iterator = self._batches()
        batch = next(self._iterator)
        self.consumed_samples += self.global_batch_size
        return batch

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.dataset.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state.get("seed", self.dataset.seed)) != self.dataset.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this dataset has seed "
                             f"{self.dataset.seed}; the stream would differ")
        self.consumed_samples = int(state["consumed_samples"])
        self._iterator = None


def eval_batches(dataset: FoldingDataset, batch_size: int = 1, use_profile: bool = True,
                 multiple_of: int = 1) -> Iterator[Tuple[List[str], Dict]]:
    """(chain ids, batch) over every chain of ``dataset`` whole, padded to the longest chain of each batch."""
    for first in range(0, len(dataset), batch_size):
        indices = range(first, min(first + batch_size, len(dataset)))
        examples = [dataset.eval_example(i, use_profile=use_profile) for i in indices]
        yield [dataset.chain_id(i) for i in indices], collate_features(examples, multiple_of=multiple_of)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check a folding data set end to end and print a JSON summary: every chain read, its MSA found and checked
    against its sequence, one training and one evaluation example built. Bad input: one ``error:`` line, exit 2."""
    import argparse
    import json
    import sys
    import time

    from megatron_protein.data.readers import InputFormatError
    from megatron_protein.structure.io import StructureError

    parser = argparse.ArgumentParser(prog="python -m megatron_protein.data.folding_dataset",
                                     description=main.__doc__.split(".")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--chains", default=None, help=f"chains.npz-format file (default: {DEFAULT_CHAINS})")
    source.add_argument("--structures", default=None, help="folder, glob or file of PDB/mmCIF structures")
    parser.add_argument("--split", default=None, help="train or valid (chains.npz files with a split key)")
    parser.add_argument("--chain", default=None, help="chain id to read from every structure file")
    parser.add_argument("--msas", nargs="*", default=[DEFAULT_MSA_DIR],
                        help="folders of <chain id>.a3m[.gz]/.sto files (none: single-sequence mode)")
    parser.add_argument("--crop-size", type=int, default=ff.FeatureConfig.crop_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        chains = (StructureFileChains(args.structures, chain=args.chain) if args.structures
                  else NpzChains(args.chains or DEFAULT_CHAINS, split=args.split))
        dataset = FoldingDataset(chains, msas=args.msas, config=ff.FeatureConfig(crop_size=args.crop_size),
                                 seed=args.seed)
        start = time.time()
        depths = np.array([dataset.msa_depth(i) for i in range(len(dataset))])
        lengths = np.array([len(chains[i].sequence) for i in range(len(dataset))])
        read_seconds = time.time() - start
        start = time.time()
        for i in range(len(dataset)):
            ff.check_example(dataset.train_example(i))
            ff.check_example(dataset.eval_example(i))
        example_seconds = (time.time() - start) / (2 * len(dataset))
    except (InputFormatError, StructureError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with_msa = depths[depths > 1]
    print(json.dumps({
        "chains": len(dataset), "residues": int(lengths.sum()),
        "length": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())},
        "with_msa": int(len(with_msa)), "median_msa_depth_of_those": float(np.median(with_msa)) if len(with_msa)
        else 0.0, "max_msa_depth": int(depths.max()), "read_seconds": round(read_seconds, 2),
        "seconds_per_example": round(example_seconds, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
