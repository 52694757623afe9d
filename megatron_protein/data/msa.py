"""Multiple sequence alignments for folding: A3M and Stockholm readers, an A3M writer, and jackhmmer in process.

An MSA here is what AlphaFold2's data pipeline feeds the model (supplement 1.2.2-1.2.3): the query first, then its
homologues aligned to the query's columns, plus a *deletion matrix* that counts, for every sequence and query
column, how many residues the sequence had inserted (relative to the query) just before that column. Such
insertions are not columns of the MSA; they become the deletion features of ``msa_feat`` (supplement 1.2.9).

:class:`Msa` keeps every row in A3M form, the form that holds both: upper-case letters and ``-`` are the query's
columns, lower-case letters are residues inserted relative to the query (HHsuite's A3M). A row's aligned sequence
is its non-lower-case characters; its deletion count at column j is the number of lower-case letters between
column j-1 and column j (AlphaFold2's ``parse_a3m``; insertions after the last column are dropped as there).

Readers:

* :func:`read_a3m` reads A3M with a small reader of its own. Easel (pyhmmer) reads A2M, whose insert columns are
  lower case *and* padded with ``.`` in every other row so that all rows have the same length; A3M leaves that
  padding out, so rows differ in length and easel rejects the file (or, in A2M mode, would need the dots). The
  reader reuses the project's FASTA reader (:func:`megatron_protein.data.readers.read_fasta`) for the records.
* :func:`read_stockholm` reads Stockholm through ``pyhmmer.easel.MSAFile`` (text mode, so case and ``.`` are kept),
  then converts to A3M form as AlphaFold2's ``parse_stockholm`` does: the query's gap columns are dropped, and a
  residue of another sequence in a dropped column counts as a deletion before the next kept column.

:class:`JackhmmerMsaBuilder` runs ``pyhmmer.hmmer.jackhmmer`` (HMMER3's jackhmmer, in process) against a FASTA
sequence database and turns the final iteration's included domains into A3M rows, query first, identical rows
removed, at most ``max_sequences`` rows; results are cached per query (a hash of the query, the database's content
and the search settings) under a cache directory, written atomically. Without any MSA, :meth:`Msa.single_sequence`
gives AlphaFold2's single-sequence mode (an MSA of depth 1).

Bad input raises :class:`MsaError` (a :class:`~megatron_protein.data.readers.InputFormatError`) whose message names
the file and record and says what was expected; the command line turns it into one ``error: ...`` line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_protein.data.readers import InputFormatError, read_fasta
from megatron_protein.structure import residue_constants as rc

#: Letters accepted in a sequence: the 20 amino acids and IUPAC's extra amino-acid codes (X unknown, B/Z/J
#: ambiguous, U selenocysteine, O pyrrolysine), i.e. every letter A-Z; the extra ones are read as X (20) in
#: ``aatype`` and the MSA. Digits, ``*``, gaps and other symbols are errors.
AMINO_ACID_LETTERS = frozenset("ACDEFGHIKLMNPQRSTVWYXBZJUO")
SINGLE_SEQUENCE_SOURCE = "<single-sequence>"


class MsaError(InputFormatError):
    """Malformed MSA or sequence input. The message names the file (and record) and what was expected."""


class MsaQueryMismatchError(MsaError):
    """The MSA's query (first row, gaps removed) is not the sequence it is used for."""


# 256-entry lookup tables: byte -> MSA id (upper case and '-'), and which bytes may appear where.
_MSA_ID = np.full(256, rc.unk_restype_index, dtype=np.int64)
for _letter, _index in rc.restype_order.items():
    _MSA_ID[ord(_letter)] = _index
_MSA_ID[ord("-")] = rc.msa_gap_index
_IS_MATCH = np.zeros(256, dtype=bool)  # a query column: upper-case amino-acid letter or gap
_IS_INSERT = np.zeros(256, dtype=bool)  # an insertion: lower-case amino-acid letter
for _letter in AMINO_ACID_LETTERS:
    _IS_MATCH[ord(_letter)] = True
    _IS_INSERT[ord(_letter.lower())] = True
_IS_MATCH[ord("-")] = True
_IS_PAD = np.zeros(256, dtype=bool)  # A2M's '.' (gap in an insert column): not a column, not a residue
_IS_PAD[ord(".")] = True


def _where(source: str, record: Optional[str]) -> str:
    return f"{source}: record {record!r}" if record else source


def validate_sequence(sequence: str, source: str = "<sequence>", record: Optional[str] = None) -> str:
    """Upper-cases ``sequence`` and checks that every letter is an amino-acid code (:data:`AMINO_ACID_LETTERS`).

    Raises :class:`MsaError` naming ``source``/``record``, the position and the letter otherwise (e.g. a digit, a
    ``*``, a gap in what should be a plain sequence, or an empty sequence).
    """
    upper = sequence.strip().upper()
    if not upper:
        raise MsaError(f"{_where(source, record)}: empty sequence; expected amino-acid letters")
    for position, letter in enumerate(upper):
        if letter not in AMINO_ACID_LETTERS:
            raise MsaError(f"{_where(source, record)}: letter {letter!r} at position {position + 1} is not an "
                           "amino acid; expected letters A-Z (the 20 amino acids, X, and IUPAC's B, Z, J, U, O)")
    return upper


def _parse_a3m_row(row: str, source: str, record: str) -> Tuple[np.ndarray, np.ndarray]:
    """One A3M row -> (MSA ids [L] int64, deletion counts [L] int64); raises on characters that are not allowed."""
    codes = np.frombuffer(row.encode("latin-1", errors="replace"), dtype=np.uint8)  # one byte per character
    match, insert, pad = _IS_MATCH[codes], _IS_INSERT[codes], _IS_PAD[codes]
    bad = ~(match | insert | pad)
    if bad.any():
        position = int(np.argmax(bad))
        raise MsaError(f"{_where(source, record)}: character {row[position]!r} at position {position + 1} is not "
                       "allowed in an A3M row; expected amino-acid letters (upper case: aligned to the query, "
                       "lower case: insertions), '-' or '.'")
    match_positions = np.flatnonzero(match)
    inserted_before = np.cumsum(insert)[match_positions] if len(match_positions) else np.zeros(0, np.int64)
    deletions = np.diff(inserted_before, prepend=0)
    return _MSA_ID[codes[match_positions]], deletions.astype(np.int64)


class Msa:
    """An MSA aligned to its query (first row): rows in A3M form, their names, and where it came from.

    ``msa`` (int64 [N, L], ids of :mod:`~megatron_protein.structure.residue_constants`: 0-19 amino acids, 20 X,
    21 gap) and ``deletion_matrix`` (int64 [N, L]) are computed once from the rows and cached.
    """

    def __init__(self, rows: Sequence[str], names: Sequence[str], source: str,
                 locations: Optional[Sequence[str]] = None):
        """``locations``: per row, where it is (e.g. ``path:line``) for error messages; ``source`` otherwise."""
        if not rows:
            raise MsaError(f"{source}: no sequences; expected the query and its aligned homologues")
        if len(rows) != len(names):
            raise ValueError(f"{source}: {len(rows)} rows but {len(names)} names")
        self.rows: Tuple[str, ...] = tuple(rows)
        self.names: Tuple[str, ...] = tuple(names)
        self.source = source
        where = list(locations) if locations is not None else [source] * len(self.rows)
        ids, deletions = [], []
        for row, name, location in zip(self.rows, self.names, where):
            row_ids, row_deletions = _parse_a3m_row(row, location, name)
            if ids and len(row_ids) != len(ids[0]):
                raise MsaError(f"{_where(location, name)}: {len(row_ids)} aligned columns (upper case and '-'); "
                               f"expected {len(ids[0])}, the length of the query {self.names[0]!r}")
            ids.append(row_ids)
            deletions.append(row_deletions)
        if len(ids[0]) == 0:
            raise MsaError(f"{_where(where[0], self.names[0])}: the query has no aligned columns")
        if (ids[0] == rc.msa_gap_index).any() or deletions[0].any():
            raise MsaError(f"{_where(where[0], self.names[0])}: the query (first record) has gaps or insertions; "
                           "expected the query sequence itself as the first row")
        self.msa = np.stack(ids)
        self.deletion_matrix = np.stack(deletions)

    # --------------------------------------------------------------------------------------------- construction
    @classmethod
    def single_sequence(cls, sequence: str, name: str = "query") -> "Msa":
        """AlphaFold2's single-sequence mode: an MSA that holds only the query."""
        return cls([validate_sequence(sequence, SINGLE_SEQUENCE_SOURCE, name)], [name], SINGLE_SEQUENCE_SOURCE)

    # ------------------------------------------------------------------------------------------------ accessors
    @property
    def depth(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return self.msa.shape[1]

    def __len__(self) -> int:
        return self.depth

    @property
    def query(self) -> str:
        """The query sequence (first row; it has no gaps or insertions)."""
        return self.rows[0]

    def aligned(self, i: int) -> str:
        """Row ``i`` restricted to the query's columns (insertions removed): L characters."""
        return "".join(c for c in self.rows[i] if not (c.islower() or c == "."))

    def __repr__(self) -> str:
        return f"Msa(depth={self.depth}, length={self.length}, source={self.source!r})"

    # --------------------------------------------------------------------------------------------- operations
    def check_query(self, sequence: str, what: str = "the chain") -> None:
        """Raise :class:`MsaQueryMismatchError` unless the query equals ``sequence`` (the residues ``what`` has).

        X in either sequence matches any residue (a structure may hold unknown residues that the MSA names).
        """
        sequence = sequence.upper()
        query = self.query.upper()
        where = _where(self.source, self.names[0])
        if len(query) != len(sequence):
            raise MsaQueryMismatchError(f"{where}: the MSA's query has {len(query)} residues but {what} has "
                                        f"{len(sequence)}; expected the same sequence")
        for i, (a, b) in enumerate(zip(query, sequence)):
            if a != b and "X" not in (a, b):
                raise MsaQueryMismatchError(
                    f"{where}: the MSA's query differs from {what} at residue {i + 1} ({a!r} in the MSA, {b!r} "
                    f"expected); expected the same sequence")

    def unique_rows(self) -> List[int]:
        """Indices of the rows whose aligned sequence (query columns) did not occur before (the query first)."""
        seen, keep = set(), []
        for i in range(self.depth):
            key = self.msa[i].tobytes()
            if key not in seen:
                seen.add(key)
                keep.append(i)
        return keep

    def deduplicate(self) -> "Msa":
        """Rows whose aligned sequence (query columns) already occurred are dropped, the first one kept (as
        AlphaFold2's ``make_msa_features`` does); the query stays first."""
        return self.select(self.unique_rows())

    def select(self, indices: Iterable[int]) -> "Msa":
        indices = list(indices)
        if not indices or indices[0] != 0:
            raise ValueError("a selection of MSA rows must start with the query (row 0)")
        out = Msa.__new__(Msa)
        out.rows = tuple(self.rows[i] for i in indices)
        out.names = tuple(self.names[i] for i in indices)
        out.source = self.source
        out.msa = self.msa[indices]
        out.deletion_matrix = self.deletion_matrix[indices]
        return out

    def truncate(self, max_sequences: int) -> "Msa":
        """The first ``max_sequences`` rows (query included)."""
        return self.select(range(min(self.depth, max(1, max_sequences))))


# ---------------------------------------------------------------------------------------------------- readers
def _check_not_empty(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise MsaError(f"{path}: no such file; expected {what}")
    if os.path.getsize(path) == 0:
        raise MsaError(f"{path}: empty file; expected {what}")


def read_a3m(path: str, query: Optional[str] = None) -> Msa:
    """Read an A3M file (FASTA records; upper case and ``-`` aligned to the first record, lower case inserted).

    ``query``: when given, the first record must be this sequence (else :class:`MsaQueryMismatchError`).
    """
    _check_not_empty(path, "an A3M alignment")
    rows, names, locations = [], [], []
    for record in read_fasta(path):
        rows.append(record.sequence)
        names.append(record.name or record.location)
        locations.append(record.location)
    if not rows:
        raise MsaError(f"{path}: no FASTA records; expected an A3M alignment ('>' header lines and sequences)")
    msa = Msa(rows, names, path, locations)
    if query is not None:
        msa.check_query(query)
    return msa


def stockholm_to_a3m_rows(aligned: Sequence[str], query_index: int = 0) -> List[str]:
    """Rows of equal length (Stockholm/A2M, gaps ``-`` or ``.``) -> A3M rows aligned to row ``query_index``.

    As AlphaFold2's ``parse_stockholm``: a column where the query has a gap is not a column of the result; another
    row's residue in such a column becomes a lower-case insertion before the next kept column. Kept columns are
    upper-cased (Pfam writes residues in insert columns in lower case; relative to the query they are aligned).
    """
    query = aligned[query_index]
    keep = np.array([c not in "-." for c in query], dtype=bool)
    rows = []
    for row in aligned:
        out = []
        for c, kept in zip(row, keep):
            if kept:
                out.append("-" if c in "-." else c.upper())
            elif c not in "-.":
                out.append(c.lower())
        rows.append("".join(out))
    return rows


def iter_stockholm(path: str) -> Iterator[Tuple[str, Msa]]:
    """``(alignment name, Msa)`` for every alignment of a Stockholm file (read by easel; query = first row)."""
    from pyhmmer import easel

    _check_not_empty(path, "a Stockholm alignment")
    count = 0
    try:
        with easel.MSAFile(path, digital=False, format="stockholm") as handle:
            for index, text_msa in enumerate(handle):
                name = text_msa.name or text_msa.accession or f"alignment {index + 1}"
                if isinstance(name, bytes):
                    name = name.decode()
                names = [n.decode() if isinstance(n, bytes) else n for n in text_msa.names]
                rows = stockholm_to_a3m_rows(list(text_msa.alignment))
                count += 1
                yield name, Msa(rows, names, f"{path}: alignment {name}")
    except (ValueError, OSError, EOFError) as error:
        if isinstance(error, MsaError):
            raise
        raise MsaError(f"{path}: not a readable Stockholm alignment ({error}); expected '# STOCKHOLM 1.0', "
                       "sequence lines and '//'") from error
    if count == 0:
        raise MsaError(f"{path}: no alignment; expected a Stockholm alignment")


def read_stockholm(path: str, alignment: Optional[str] = None, query: Optional[str] = None) -> Msa:
    """One alignment of a Stockholm file as an :class:`Msa` (query = its first sequence).

    ``alignment``: the ``#=GF ID`` (or accession) of the alignment to take from a multi-alignment file; the
    first one by default. ``query``: when given, the first sequence must be it (gaps removed).
    """
    found = []
    for name, msa in iter_stockholm(path):
        found.append(name)
        if alignment is None or alignment == name:
            if query is not None:
                msa.check_query(query)
            return msa
    raise MsaError(f"{path}: no alignment named {alignment!r}; the file has {found}")


def read_msa(path: str, query: Optional[str] = None) -> Msa:
    """Read an MSA by file name: ``.sto``/``.stockholm`` as Stockholm, anything else as A3M."""
    if path.endswith((".sto", ".stockholm", ".sto.gz")):
        return read_stockholm(path, query=query)
    return read_a3m(path, query=query)


def write_a3m(msa: Msa, path: str, descriptions: Optional[Sequence[str]] = None) -> None:
    """Write ``msa`` as A3M (one line per row), atomically: a temporary file in the same folder, then renamed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as out:
            for i, (name, row) in enumerate(zip(msa.names, msa.rows)):
                extra = f" {descriptions[i]}" if descriptions and descriptions[i] else ""
                out.write(f">{name}{extra}\n{row}\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------- jackhmmer
@dataclass(frozen=True)
class JackhmmerSettings:
    """Search settings; every one enters the cache key.

    ``evalue`` is used for reporting and inclusion, per sequence and per domain (jackhmmer's ``-E``, ``--incE``,
    ``--domE``, ``--incdomE``), so what is reported is what the next iteration's profile is built from.
    AlphaFold2 ran jackhmmer with ``-N 1 -E 0.0001`` against UniRef90 (supplement 1.2.2); on a small database
    more iterations recover remote homologues that one iteration misses.
    """
    iterations: int = 3
    evalue: float = 1e-3
    max_sequences: int = 1000


def _sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hits_to_a3m_rows(hits, query_length: int) -> Tuple[List[str], List[str], List[str]]:
    """A pyhmmer ``TopHits`` of a jackhmmer iteration -> (A3M rows, names, descriptions) of its included domains.

    Each domain's alignment covers model positions ``hmm_from..hmm_to``; jackhmmer's model has one match state per
    query residue, so model position k is query column k. A target residue against a model insert state (``.`` in
    the model line) is an insertion (lower case); ``-`` in the target is a gap at that column; columns outside the
    domain are gaps. Rows are in the order of the hits (best E-value first).
    """
    rows, names, descriptions = [], [], []
    for hit in hits:
        if not hit.included:
            continue
        for domain in hit.domains:
            if not domain.included:
                continue
            ali = domain.alignment
            if ali.hmm_length != query_length:
                raise RuntimeError(f"jackhmmer model has {ali.hmm_length} match states for a query of "
                                   f"{query_length} residues; cannot map its columns to the query")
            out = ["-"] * (ali.hmm_from - 1)
            for model_char, target_char in zip(ali.hmm_sequence, ali.target_sequence):
                if model_char == ".":
                    if target_char != "-":
                        out.append(target_char.lower())
                else:
                    out.append("-" if target_char == "-" else target_char.upper())
            out.extend("-" * (query_length - ali.hmm_to))
            rows.append("".join(out))
            name = hit.name.decode() if isinstance(hit.name, bytes) else hit.name
            names.append(f"{name}/{ali.target_from}-{ali.target_to}")
            description = hit.description.decode() if isinstance(hit.description, bytes) else hit.description
            descriptions.append(f"E={domain.i_evalue:.3g} {description or ''}".strip())
    return rows, names, descriptions


class JackhmmerMsaBuilder:
    """MSAs by jackhmmer (pyhmmer, in process) of each query against one FASTA sequence database.

    The database is read once into memory (digital sequences). :meth:`build_many` searches all queries that are
    not cached yet in one ``pyhmmer.hmmer.jackhmmer`` call on ``cpus`` threads and writes one A3M per query into
    ``cache_dir`` (``<key[:2]>/<key>.a3m``; key = sha256 of the query, the database's sha256 and the settings),
    each written to a temporary name and renamed, so a killed run leaves only complete files behind and a rerun
    searches only what is missing.
    """

    def __init__(self, database: str, settings: JackhmmerSettings = JackhmmerSettings(),
                 cache_dir: Optional[str] = None, cpus: int = 2):
        _check_not_empty(database, "a FASTA sequence database")
        self.database = database
        self.settings = settings
        self.cache_dir = cache_dir
        self.cpus = cpus
        self._database_sha256: Optional[str] = None
        self._sequences = None

    @property
    def database_sha256(self) -> str:
        if self._database_sha256 is None:
            self._database_sha256 = _sha256_of_file(self.database)
        return self._database_sha256

    def _load_database(self):
        if self._sequences is None:
            from pyhmmer import easel

            try:
                with easel.SequenceFile(self.database, digital=True, alphabet=easel.Alphabet.amino(),
                                        format="fasta") as handle:
                    self._sequences = handle.read_block()
            except (ValueError, OSError) as error:
                raise MsaError(f"{self.database}: not a readable protein FASTA database ({error})") from error
            if len(self._sequences) == 0:
                raise MsaError(f"{self.database}: no sequences; expected a protein FASTA database")
        return self._sequences

    def cache_key(self, sequence: str) -> str:
        import pyhmmer

        blob = json.dumps({"query": sequence, "database_sha256": self.database_sha256,
                           "iterations": self.settings.iterations, "evalue": self.settings.evalue,
                           "max_sequences": self.settings.max_sequences, "pyhmmer": pyhmmer.__version__},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def cache_path(self, sequence: str) -> Optional[str]:
        if self.cache_dir is None:
            return None
        key = self.cache_key(sequence)
        return os.path.join(self.cache_dir, key[:2], f"{key}.a3m")

    def build(self, sequence: str, name: str = "query") -> Msa:
        return self.build_many([(name, sequence)])[0]

    def build_many(self, queries: Sequence[Tuple[str, str]], progress=None) -> List[Msa]:
        """MSAs (query first) for ``queries`` = [(name, sequence), ...], in order; cached ones are read back.

        ``progress``: optional callable ``(done, total)`` after each searched query (e.g. a tqdm update).
        """
        from pyhmmer import easel, hmmer

        queries = [(name, validate_sequence(sequence, "<query>", name)) for name, sequence in queries]
        results: List[Optional[Msa]] = [None] * len(queries)
        todo = []
        for i, (name, sequence) in enumerate(queries):
            path = self.cache_path(sequence)
            if path is not None and os.path.exists(path):
                cached = read_a3m(path, query=sequence)
                results[i] = Msa(cached.rows, [name] + list(cached.names[1:]), path)
            else:
                todo.append(i)
        if not todo:
            return results  # type: ignore[return-value]
        alphabet = easel.Alphabet.amino()
        digital = [easel.TextSequence(name=queries[i][0], sequence=queries[i][1]).digitize(alphabet) for i in todo]
        evalue = self.settings.evalue
        searches = hmmer.jackhmmer(digital, self._load_database(), max_iterations=self.settings.iterations,
                                   E=evalue, incE=evalue, domE=evalue, incdomE=evalue, cpus=self.cpus)
        for done, (i, result) in enumerate(zip(todo, searches), start=1):
            name, sequence = queries[i]
            rows, names, descriptions = hits_to_a3m_rows(result.hits, len(sequence))
            msa = Msa([sequence] + rows, [name] + names, f"jackhmmer:{name}")
            all_descriptions = [f"jackhmmer iterations={result.iteration} converged={result.converged}"]
            keep = msa.unique_rows()[:max(1, self.settings.max_sequences)]
            msa = msa.select(keep)
            kept = [(all_descriptions + descriptions)[k] for k in keep]
            path = self.cache_path(sequence)
            if path is not None:
                write_a3m(msa, path, kept)
                msa = Msa(msa.rows, msa.names, path)
            results[i] = msa
            if progress is not None:
                progress(done, len(todo))
        return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- CLI
def _cli_build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    queries = [(r.name, validate_sequence(r.sequence, r.location, r.name)) for r in read_fasta(args.queries)]
    if not queries:
        raise MsaError(f"{args.queries}: no FASTA records; expected query sequences")
    builder = JackhmmerMsaBuilder(args.database, JackhmmerSettings(args.iterations, args.evalue,
                                                                   args.max_sequences),
                                  cache_dir=args.cache_dir, cpus=args.cpus)
    start = time.time()
    bar = tqdm(total=len(queries), desc="jackhmmer", unit="query")
    msas = builder.build_many(queries, progress=lambda done, total: bar.update(1))
    bar.close()
    os.makedirs(args.out_dir, exist_ok=True)
    for (name, _), msa in zip(queries, msas):
        write_a3m(msa, os.path.join(args.out_dir, f"{name}.a3m"))
    depths = [m.depth - 1 for m in msas]
    print(json.dumps({"queries": len(queries), "with_homologues": sum(d > 0 for d in depths),
                      "median_homologues": float(np.median(depths)), "seconds": round(time.time() - start, 1)}))
    return 0


def _cli_info(args: argparse.Namespace) -> int:
    msa = read_msa(args.msa)
    query = None
    if args.sequence:
        query = validate_sequence(args.sequence, "--sequence")
        msa.check_query(query, "--sequence")
    print(json.dumps({"file": args.msa, "depth": msa.depth, "length": msa.length,
                      "rows_with_deletions": int((msa.deletion_matrix > 0).any(axis=1).sum())}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_protein.data.msa", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="jackhmmer every query of a FASTA file against a FASTA database")
    build.add_argument("--queries", required=True, help="FASTA of query sequences (record names name the A3Ms)")
    build.add_argument("--database", required=True, help="FASTA sequence database")
    build.add_argument("--out-dir", required=True, help="one <name>.a3m per query is written here")
    build.add_argument("--cache-dir", default=None, help="per-query cache (default: none)")
    build.add_argument("--iterations", type=int, default=JackhmmerSettings.iterations)
    build.add_argument("--evalue", type=float, default=JackhmmerSettings.evalue)
    build.add_argument("--max-sequences", type=int, default=JackhmmerSettings.max_sequences)
    build.add_argument("--cpus", type=int, default=2)
    info = sub.add_parser("info", help="read an A3M/Stockholm MSA and print its depth")
    info.add_argument("msa")
    info.add_argument("--sequence", default=None, help="check that the query is this sequence")
    args = parser.parse_args(argv)
    try:
        return _cli_build(args) if args.command == "build" else _cli_info(args)
    except InputFormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
