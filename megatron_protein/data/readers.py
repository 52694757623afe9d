"""Streaming readers for protein sequence files: FASTA (Pfam-A.fasta headers), Stockholm, TAPE Pfam LMDB and JSON.

Every reader is a generator of :class:`SequenceRecord` and holds at most one record (FASTA, LMDB, JSON) or one
alignment (Stockholm, whose interleaved blocks must be joined) in memory, so memory does not grow with the file.
Malformed input raises :class:`InputFormatError` with ``file:line`` (or ``file:record``) and what was expected.
Gzip input is recognised by its magic bytes, whatever the file name.

Pfam-A.fasta headers look like ``>A0A0A0MRZ7_9ARAB/67-118 A0A0A0MRZ7.1 PF00001.21;7tm_1;``: the domain's
protein and envelope, the protein accession, then the family accession and name; :func:`parse_pfam_header`
extracts them, and the family (accession without version) is what ``preprocess --split-by-family`` holds out.
The envelope says how many residues the record holds (``END - START + 1``): a Pfam record (FASTA with such a
header, or a Stockholm alignment with a ``#=GF AC PF...`` accession and ``NAME/START-END`` names) whose residues
(gaps ``-``/``.`` not counted) disagree is an error, so a file cut in the middle of a record is not read as a
shorter protein.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

from megatron_protein.utils import lmdb_envs
from megatron_protein.utils.errors import UserError
from megatron_protein.utils.safe_load import load_record

FORMATS = ("fasta", "stockholm", "tape-lmdb", "tape-json")


class InputFormatError(UserError, ValueError):
    """Malformed input; the message starts with ``path:line:`` (or ``path: record N:``)."""


@dataclass
class SequenceRecord:
    name: str
    sequence: str  # as in the file (may hold gaps and lower case; the tokenizer normalises)
    family: str | None = None  # Pfam accession without version (PF00001) or TAPE's family id, when known
    family_name: str | None = None
    location: str = ""  # "path:line" of the record's first line, for error messages


_PFAM_HEADER = re.compile(
    r"^(?P<name>\S+?)/(?P<start>\d+)-(?P<end>\d+)\s+(?P<protein>\S+)\s+"
    r"(?P<accession>PF\d+)(?:\.(?P<version>\d+))?;(?P<family_name>[^;]*);")


@dataclass
class PfamHeader:
    name: str  # protein id as written before "/START-END"
    start: int
    end: int
    protein_accession: str
    family_accession: str  # PF00001
    family_version: int | None
    family_name: str


def parse_pfam_header(header: str) -> PfamHeader | None:
    """Parse a Pfam-A.fasta header (with or without the leading ``>``); None when it is not in that form."""
    match = _PFAM_HEADER.match(header.lstrip(">").strip())
    if match is None:
        return None
    version = match.group("version")
    return PfamHeader(match.group("name"), int(match.group("start")), int(match.group("end")),
                      match.group("protein"), match.group("accession"),
                      int(version) if version is not None else None, match.group("family_name"))


_ENVELOPE = re.compile(r"/(\d+)-(\d+)$")


def check_envelope(name: str, sequence: str, location: str, start: int | None = None,
                   end: int | None = None) -> None:
    """Raise :class:`InputFormatError` if the residues of a Pfam record contradict its envelope START-END (taken
    from ``name`` = ``NAME/START-END`` unless given)."""
    if start is None or end is None:
        match = _ENVELOPE.search(name)
        if match is None:
            return
        start, end = int(match.group(1)), int(match.group(2))
    expected = end - start + 1
    residues = len(sequence) - sequence.count("-") - sequence.count(".")
    if residues != expected and expected > 0:
        raise InputFormatError(f"{location}: record {name} has {residues} residues, but its Pfam envelope "
                               f"{start}-{end} says {expected}; the record is truncated or its header is wrong")


def open_text(path: str) -> io.TextIOBase:
    """Open a text file, transparently gunzipping it when it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="latin-1")
    return open(path, "r", encoding="latin-1")


@dataclass
class ByteRange:
    """A part of an uncompressed file that starts at a record boundary: ``[start, end)`` in bytes, and the line
    number of its first line, so that errors inside the part still name the line of the whole file."""
    start: int
    end: int
    first_line: int = 1


def _numbered_lines(path: str, part: ByteRange | None) -> Iterator[tuple[int, str]]:
    """(line number, line) of the whole file, or of the lines that start inside ``part``."""
    if part is None:
        with open_text(path) as f:
            yield from enumerate(f, start=1)
        return
    with open(path, "rb") as f:
        f.seek(part.start)
        position = part.start
        for line_no, raw in enumerate(f, start=part.first_line):
            if position >= part.end:
                return
            position += len(raw)
            yield line_no, raw.decode("latin-1")


_RECORD_MARKERS = {"fasta": b"\n>", "stockholm": b"\n# STOCKHOLM"}


def partition_file(path: str, input_format: str, parts: int, chunk_size: int = 1 << 24) -> list[ByteRange]:
    """Cut an uncompressed FASTA or Stockholm file into about ``parts`` byte ranges at record (alignment) starts.

    Used by ``preprocess --workers N`` so that each worker parses its own range (Megatron's preprocess splits its
    input into partitions the same way). One pass counts newlines so that each range knows its first line number.
    """
    if input_format not in _RECORD_MARKERS:
        raise ValueError(f"cannot partition {input_format} input; only {sorted(_RECORD_MARKERS)}")
    marker = _RECORD_MARKERS[input_format]
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            target = max(size * k // parts, cuts[-1] + 1)
            if target >= size:
                break
            f.seek(target - 1)
            window, offset = b"", target - 1
            while True:
                more = f.read(1 << 16)
                if not more:
                    found = -1
                    break
                window += more
                found = window.find(marker)
                if found >= 0:
                    break
                window = window[-len(marker):]
                offset = f.tell() - len(window)
            if found < 0:
                break
            start = offset + found + 1  # the record starts after the newline
            if start > cuts[-1] and start < size:
                cuts.append(start)
        cuts.append(size)
        ranges, line = [], 1
        f.seek(0)
        for start, end in zip(cuts[:-1], cuts[1:]):
            ranges.append(ByteRange(start, end, line))
            remaining = end - start
            while remaining:
                block = f.read(min(chunk_size, remaining))
                line += block.count(b"\n")
                remaining -= len(block)
    return ranges


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


# ------------------------------------------------------------------------------------------------------ FASTA
def read_fasta(path: str, part: ByteRange | None = None) -> Iterator[SequenceRecord]:
    """Records of a FASTA file (or of one :class:`ByteRange` of it); the family comes from a Pfam-A.fasta header
    when the header has that form."""
    header, header_line, chunks = None, 0, []

    def emit():
        if not chunks:
            raise InputFormatError(f"{path}:{header_line}: empty record {header.split()[0] if header else ''!r}: "
                                   "a '>' header must be followed by at least one sequence line")
        words = header.split(None, 3)
        family = family_name = None
        sequence = "".join(chunks)
        if len(words) >= 3 and words[2].startswith("PF"):  # fast path for ">NAME/S-E ACC PFxxxxx.v;Name;"
            pfam = parse_pfam_header(header)
            if pfam is not None:
                family, family_name = pfam.family_accession, pfam.family_name
                check_envelope(words[0], sequence, f"{path}:{header_line}", pfam.start, pfam.end)
        return SequenceRecord(name=words[0] if words else "", sequence=sequence, family=family,
                              family_name=family_name, location=f"{path}:{header_line}")

    for line_no, line in _numbered_lines(path, part):
        line = line.strip()
        if not line:
            continue
        if line[0] == ">":
            if header is not None:
                yield emit()
            header, header_line, chunks = line[1:], line_no, []
        elif line[0] == ";":  # old FASTA comment lines
            continue
        elif header is None:
            raise InputFormatError(f"{path}:{line_no}: sequence line before any '>' header "
                                   f"(starts with {line[:20]!r}); expected a FASTA header line first")
        else:
            chunks.append(line)
    if header is not None:
        yield emit()


# -------------------------------------------------------------------------------------------------- Stockholm
def read_stockholm(path: str, part: ByteRange | None = None) -> Iterator[SequenceRecord]:
    """Sequences of every alignment in a Stockholm file (one or many alignments, interleaved blocks, gzip).

    Each alignment starts with ``# STOCKHOLM 1.0`` and ends with ``//``; its family is ``#=GF AC`` (without the
    version) or, failing that, ``#=GF ID``. Sequences keep their gaps here; the tokenizer removes them.
    """
    in_alignment, start_line = False, 0
    sequences: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    gf: dict[str, str] = {}
    line_no = 0
    for line_no, raw in _numbered_lines(path, part):
        line = raw.rstrip("\n\r")
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("# STOCKHOLM"):
            if in_alignment:
                raise InputFormatError(
                    f"{path}:{line_no}: new '# STOCKHOLM' header but the alignment started at line "
                    f"{start_line} was not closed with '//'")
            in_alignment, start_line = True, line_no
            sequences, first_line, gf = {}, {}, {}
            continue
        if not in_alignment:
            raise InputFormatError(f"{path}:{line_no}: expected '# STOCKHOLM 1.0' to open an alignment, "
                                   f"found {stripped[:40]!r}")
        if stripped == "//":
            accession = gf.get("AC", "").split(".")[0].strip() or gf.get("ID", "").strip() or None
            pfam = gf.get("AC", "").strip().startswith("PF")
            for name, chunks in sequences.items():
                sequence = "".join(chunks)
                if pfam:
                    check_envelope(name, sequence, f"{path}:{first_line[name]}")
                yield SequenceRecord(name=name, sequence=sequence, family=accession,
                                     family_name=gf.get("ID", "").strip() or None,
                                     location=f"{path}:{first_line[name]}")
            in_alignment, sequences = False, {}
            continue
        if stripped.startswith("#"):
            if stripped.startswith("#=GF"):
                parts = stripped.split(None, 2)
                if len(parts) >= 3 and parts[1] in ("AC", "ID") and parts[1] not in gf:
                    gf[parts[1]] = parts[2]
            continue  # #=GS, #=GR, #=GC and comments carry no residues
        parts = stripped.split()
        if len(parts) != 2:
            raise InputFormatError(f"{path}:{line_no}: expected '<name> <aligned sequence>' in the alignment "
                                   f"started at line {start_line}, found {len(parts)} fields")
        name, residues = parts
        if name not in sequences:
            sequences[name], first_line[name] = [], line_no
        sequences[name].append(residues)
    if in_alignment:
        raise InputFormatError(f"{path}:{line_no}: end of file inside the alignment started at line {start_line}; "
                               "expected '//' to close it")


# ------------------------------------------------------------------------------------------------------- TAPE
def read_tape_lmdb(path: str) -> Iterator[SequenceRecord]:
    """TAPE's Pfam LMDB (``pfam_train.lmdb`` ...): keys ``str(i)``, pickled dicts with ``primary``, ``family``,
    ``clan``, ``protein_length``; ``num_examples`` gives the count. Records are unpickled by the restricted
    unpickler of :func:`megatron_protein.utils.safe_load.load_record` (builtin values and NumPy arrays only), so a
    crafted record cannot run code."""

    if not os.path.exists(path):
        raise FileNotFoundError(f"LMDB {path} does not exist")
    env = lmdb_envs.acquire(path)  # shared with any other reader of the file in this process
    try:
        with env.begin(write=False) as txn:
            raw = txn.get(b"num_examples")
            if raw is None:
                raise InputFormatError(f"{path}: no 'num_examples' key; expected a TAPE LMDB")
            count = load_record(raw, f"{path}: num_examples")
            if not isinstance(count, int) or count < 0:
                raise InputFormatError(f"{path}: num_examples: expected a record count, found {count!r}")
            for i in range(count):
                value = txn.get(str(i).encode())
                if value is None:
                    raise InputFormatError(f"{path}: record {i}: missing (num_examples says {count})")
                yield _tape_record(load_record(value, f"{path}: record {i}"), f"{path}: record {i}", str(i))
    finally:
        lmdb_envs.release(env)


def _tape_record(item: dict, location: str, default_name: str) -> SequenceRecord:
    if not isinstance(item, dict) or "primary" not in item:
        raise InputFormatError(f"{location}: expected a dict with a 'primary' sequence, found "
                               f"{type(item).__name__} with keys {sorted(item) if isinstance(item, dict) else '-'}")
    family = item.get("family")
    return SequenceRecord(name=str(item.get("id", default_name)), sequence=str(item["primary"]),
                          family=None if family is None else str(family),
                          family_name=None if item.get("clan") is None else f"clan {item['clan']}",
                          location=location)


def read_tape_json(path: str, chunk_size: int = 1 << 16) -> Iterator[SequenceRecord]:
    """TAPE-schema JSON (a list of records with ``primary``), parsed incrementally one record at a time.

    JSON Lines (one record per line) is accepted too. The buffer holds one chunk plus at most one record.
    """
    decoder = json.JSONDecoder()

    class _Cursor:  # buffer, position in it, and the line number of that position
        buffer, position, line, counted_upto, eof = "", 0, 1, 0, False

    c = _Cursor()

    def advance_line_count(upto: int) -> int:
        c.line += c.buffer.count("\n", c.counted_upto, upto)
        c.counted_upto = upto
        return c.line

    def fill() -> None:
        more = f.read(chunk_size)
        c.eof = not more
        advance_line_count(c.position)
        c.buffer, c.position, c.counted_upto = c.buffer[c.position:] + more, 0, 0

    def skip_space() -> None:
        while True:
            while c.position < len(c.buffer) and c.buffer[c.position] in " \t\r\n":
                c.position += 1
            if c.position < len(c.buffer) or c.eof:
                return
            fill()

    with open_text(path) as f:
        skip_space()
        in_list = c.position < len(c.buffer) and c.buffer[c.position] == "["
        if in_list:
            c.position += 1
        index = 0
        while True:
            skip_space()
            if c.position >= len(c.buffer):
                if in_list:
                    raise InputFormatError(f"{path}:{advance_line_count(c.position)}: end of file inside the "
                                           "JSON list; expected ']'")
                return
            if in_list and c.buffer[c.position] == "]":
                return
            while True:
                try:
                    item, end = decoder.raw_decode(c.buffer, c.position)
                    break
                except json.JSONDecodeError as err:
                    if c.eof:
                        raise InputFormatError(f"{path}:{advance_line_count(err.pos)}: invalid JSON in record "
                                               f"{index}: {err.msg}") from None
                    fill()
            yield _tape_record(item, f"{path}:{advance_line_count(c.position)}", str(index))
            index += 1
            c.position = end
            skip_space()
            if c.position < len(c.buffer):
                if in_list and c.buffer[c.position] == ",":
                    c.position += 1
                elif in_list and c.buffer[c.position] != "]":
                    raise InputFormatError(f"{path}:{advance_line_count(c.position)}: expected ',' or ']' after "
                                           f"record {index - 1}, found {c.buffer[c.position]!r}")


# ------------------------------------------------------------------------------------------------- dispatcher
_EXTENSIONS = {".fasta": "fasta", ".fa": "fasta", ".faa": "fasta", ".fas": "fasta", ".sto": "stockholm",
               ".stk": "stockholm", ".sth": "stockholm", ".stockholm": "stockholm", ".seed": "stockholm",
               ".lmdb": "tape-lmdb", ".json": "tape-json", ".jsonl": "tape-json"}


def detect_format(path: str) -> str:
    """Format from the file name (``.gz`` ignored), else from the first bytes."""
    name = path.rstrip("/")
    if name.endswith(".gz"):
        name = name[:-3]
    ext = os.path.splitext(name)[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "data.mdb")):
        return "tape-lmdb"
    with open_text(path) as f:
        head = f.read(256).lstrip()
    if head.startswith(">"):
        return "fasta"
    if head.startswith("# STOCKHOLM"):
        return "stockholm"
    if head[:1] in "[{":
        return "tape-json"
    raise InputFormatError(f"{path}: cannot tell the format from the name or the first bytes; pass "
                           f"--input-format one of {', '.join(FORMATS)}")


def read_records(path: str, input_format: str | None = None) -> Iterator[SequenceRecord]:
    """Stream the records of ``path`` in ``input_format`` (detected when None)."""
    fmt = input_format or detect_format(path)
    readers = {"fasta": read_fasta, "stockholm": read_stockholm, "tape-lmdb": read_tape_lmdb,
               "tape-json": read_tape_json}
    if fmt not in readers:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return readers[fmt](path)
