"""Read and write protein chains: PDB and mmCIF (plain or gzipped) through biotite, into AF2's atom37 layout.

Reading (:func:`read_chain`) follows the choices of AlphaFold2's data pipeline (supplement 1.2.1, "Parsing"):
one model (the first), one chain (the first protein chain unless told), alternate locations resolved to the
highest occupancy (biotite's ``altloc="occupancy"``), selenomethionine (MSE) read as methionine (its SE as SD),
other non-standard residues mapped to their parent amino acid (our table, then the one-letter code of biotite's
copy of the PDB Chemical Component Dictionary) or to ``X``, hydrogens dropped, atoms that are not in the residue's
atom37 set dropped. Missing atoms are zeros in ``atom_mask``; residues absent from the coordinates keep their gap
in ``residue_index`` (author numbering), and for mmCIF ``include_unobserved=True`` inserts them from the SEQRES
scheme (``pdbx_poly_seq_scheme``) with an all-zero mask, as AF2 builds its training targets. Insertion codes are
kept per residue (``insertion_code``; residue 52A has ``residue_index`` 52).

Writing (:func:`write_pdb`, :func:`write_mmcif`) puts per-residue pLDDT (0-100) in the B-factor column, as
AlphaFold's models do, so PyMOL (``spectrum b``) and ChimeraX (``color bfactor``) colour by confidence. Files are
written to a temporary name in the target directory and renamed, so a reader never sees half a file.

Errors are :class:`StructureError` with the message ``<file>[:<line>]: <what was expected>``.
"""
from __future__ import annotations

import gzip
import io
import os
import tempfile
import warnings
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import numpy as np

from . import residue_constants as rc


class StructureError(ValueError):
    """Bad structure input; the message names the file (and line) and what was expected."""

    def __init__(self, path: str, what: str, line: Optional[int] = None):
        self.path, self.line, self.what = str(path), line, what
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {what}")


@dataclass
class ProteinChain:
    """One protein chain in AF2's atom37 layout (Angstrom).

    ``aatype`` int64 [L] (restype order, X = 20); ``residue_index`` int64 [L] (author residue numbers);
    ``atom_positions`` float32 [L, 37, 3]; ``atom_mask`` float32 [L, 37]; ``insertion_code`` str [L] ('' if none);
    ``b_factors`` float32 [L, 37] when read from a file (pLDDT for AF2-style models).
    """

    sequence: str
    aatype: np.ndarray
    residue_index: np.ndarray
    atom_positions: np.ndarray
    atom_mask: np.ndarray
    chain_id: str
    source_path: str = ""
    b_factors: Optional[np.ndarray] = None
    insertion_code: Optional[np.ndarray] = None
    residue_names: Optional[List[str]] = None  # as in the file (e.g. MSE), for reporting

    def __post_init__(self):
        n = len(self.sequence)
        if self.insertion_code is None:
            self.insertion_code = np.array([""] * n, dtype=object)
        for name, arr, shape in (
            ("aatype", self.aatype, (n,)),
            ("residue_index", self.residue_index, (n,)),
            ("atom_positions", self.atom_positions, (n, rc.atom_type_num, 3)),
            ("atom_mask", self.atom_mask, (n, rc.atom_type_num)),
            ("insertion_code", self.insertion_code, (n,)),
        ):
            if np.shape(arr) != shape:
                raise ValueError(f"ProteinChain.{name} has shape {np.shape(arr)}, expected {shape}")

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def ca_positions(self) -> np.ndarray:
        return self.atom_positions[:, rc.atom_order["CA"]]

    @property
    def ca_mask(self) -> np.ndarray:
        return self.atom_mask[:, rc.atom_order["CA"]]

    def residue_labels(self) -> List[str]:
        """Author residue labels, e.g. ``['51', '52', '52A']`` (number plus insertion code)."""
        return [f"{int(i)}{c}" for i, c in zip(self.residue_index, self.insertion_code)]


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------

_PDB_SUFFIXES = (".pdb", ".ent", ".pdb1")
_CIF_SUFFIXES = (".cif", ".mmcif")


def _read_text(path: str) -> str:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
                return fh.read()
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except FileNotFoundError:
        raise StructureError(path, "no such file; expected a PDB or mmCIF file") from None
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise StructureError(path, f"cannot be read ({err}); expected a PDB or mmCIF file") from None


def _format_of(path: str, text: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.lower().endswith(_CIF_SUFFIXES):
        return "cif"
    if name.lower().endswith(_PDB_SUFFIXES):
        return "pdb"
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")), "")
    return "cif" if first.startswith("data_") else "pdb"


def _check_pdb_records(path: str, text: str) -> None:
    """Locate the first broken ATOM/HETATM record (biotite's errors do not name the line)."""
    n_atoms = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith(("ATOM  ", "HETATM")):
            try:
                float(line[30:38]), float(line[38:46]), float(line[46:54])
            except ValueError:
                raise StructureError(path, "expected x, y, z in columns 31-54 of an ATOM/HETATM record", number) from None
            n_atoms += 1
    if n_atoms == 0:
        raise StructureError(path, "no ATOM/HETATM records; expected a PDB or mmCIF structure", 1)


def read_atoms(path: str):
    """All atoms of the first model as a biotite ``AtomArray`` (author chain ids and numbering, altlocs resolved
    to the highest occupancy, b_factor and occupancy annotations)."""
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    path = str(path)
    text = _read_text(path)
    if not text.strip():
        raise StructureError(path, "empty file; expected a PDB or mmCIF structure")
    fmt = _format_of(path, text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "elements were guessed from atom name"
        try:
            if fmt == "pdb":
                _check_pdb_records(path, text)
                atoms = pdb.PDBFile.read(io.StringIO(text)).get_structure(
                    model=1, altloc="occupancy", extra_fields=["b_factor", "occupancy"]
                )
            else:
                cif = pdbx.CIFFile.read(io.StringIO(text))
                if "atom_site" not in cif.block:
                    raise StructureError(path, "no atom_site category; expected an mmCIF structure with coordinates")
                atoms = pdbx.get_structure(
                    cif, model=1, altloc="occupancy", extra_fields=["b_factor", "occupancy"], use_author_fields=True
                )
        except StructureError:
            raise
        except Exception as err:  # biotite's parser errors come in several types
            raise StructureError(path, f"expected a {'PDB' if fmt == 'pdb' else 'mmCIF'} structure ({err})") from None
    if atoms.array_length() == 0:
        raise StructureError(path, "no atoms in the first model; expected a PDB or mmCIF structure")
    return atoms


def _parent_resname(res_name: str) -> str:
    """Standard three-letter parent of a residue name, or ``UNK``."""
    if res_name in rc.restype_3to1:
        return res_name
    if res_name in rc.nonstandard_parent:
        return rc.nonstandard_parent[res_name]
    import biotite.structure.info as info

    try:
        letter = info.one_letter_code(res_name)
    except Exception:
        letter = None
    if letter and letter in rc.restype_order:
        return rc.restype_1to3[letter]
    return "UNK"


def _protein_mask(atoms) -> np.ndarray:
    import biotite.structure as struc

    return struc.filter_amino_acids(atoms)


def protein_chain_ids(atoms) -> List[str]:
    """Author chain ids that contain amino-acid residues, in file order."""
    ids = atoms.chain_id[_protein_mask(atoms)]
    return list(dict.fromkeys(ids.tolist()))


def read_chain(path: str, chain: Optional[str] = None, include_unobserved: bool = False) -> ProteinChain:
    """Read one protein chain of a PDB/mmCIF file (``.gz`` too) into a :class:`ProteinChain`.

    ``chain``: author chain id (default: the first chain with amino acids). ``include_unobserved`` (mmCIF only):
    also the SEQRES residues that have no coordinates, with a zero mask.
    """
    import biotite.structure as struc

    path = str(path)
    atoms = read_atoms(path)
    chains = protein_chain_ids(atoms)
    if not chains:
        raise StructureError(path, "no protein chain (no amino-acid residues); expected a protein structure")
    if chain is None:
        chain = chains[0]
    elif chain not in chains:
        all_ids = list(dict.fromkeys(atoms.chain_id.tolist()))
        what = f"no protein chain '{chain}'; protein chains in the file: {', '.join(chains)}"
        if chain in all_ids:
            what = f"chain '{chain}' has no amino acids; protein chains in the file: {', '.join(chains)}"
        raise StructureError(path, what)
    sel = atoms[(atoms.chain_id == chain) & _protein_mask(atoms)]
    sel = sel[sel.element != "H"]
    sel = sel[sel.element != "D"]

    starts = struc.get_residue_starts(sel)
    ends = np.append(starts[1:], sel.array_length())
    n = len(starts)
    positions = np.zeros((n, rc.atom_type_num, 3), dtype=np.float32)
    mask = np.zeros((n, rc.atom_type_num), dtype=np.float32)
    bfac = np.zeros((n, rc.atom_type_num), dtype=np.float32)
    aatype = np.zeros(n, dtype=np.int64)
    resnum = np.zeros(n, dtype=np.int64)
    icode = np.empty(n, dtype=object)
    names: List[str] = []
    allowed = {three: set(atoms_) for three, atoms_ in rc.residue_atoms.items()}
    allowed["UNK"] = {"N", "CA", "C", "O", "CB"}
    for i, (s, e) in enumerate(zip(starts, ends)):
        res_name = str(sel.res_name[s])
        parent = _parent_resname(res_name)
        names.append(res_name)
        aatype[i] = rc.restype_order.get(rc.restype_3to1.get(parent, "X"), rc.unk_restype_index)
        resnum[i] = int(sel.res_id[s])
        icode[i] = str(sel.ins_code[s])
        keep = allowed[parent] | {"OXT"}
        for j in range(s, e):
            name = str(sel.atom_name[j])
            if res_name == "MSE" and name == "SE":
                name = "SD"  # selenomethionine as methionine (AF2 supplement 1.2.1)
            if name not in keep:
                continue
            k = rc.atom_order[name]
            positions[i, k] = sel.coord[j]
            mask[i, k] = 1.0
            bfac[i, k] = sel.b_factor[j]
    result = ProteinChain(
        sequence=rc.aatype_to_sequence(aatype),
        aatype=aatype,
        residue_index=resnum,
        atom_positions=positions,
        atom_mask=mask,
        chain_id=str(chain),
        source_path=path,
        b_factors=bfac,
        insertion_code=icode,
        residue_names=names,
    )
    if include_unobserved:
        result = _with_unobserved(path, result)
    return result


def _with_unobserved(path: str, chain: ProteinChain) -> ProteinChain:
    """Insert the SEQRES residues without coordinates (mmCIF ``pdbx_poly_seq_scheme``) with zero masks."""
    import biotite.structure.io.pdbx as pdbx

    text = _read_text(path)
    if _format_of(path, text) != "cif":
        raise StructureError(path, "include_unobserved needs an mmCIF file (SEQRES scheme); got PDB")
    block = pdbx.CIFFile.read(io.StringIO(text)).block
    if "pdbx_poly_seq_scheme" not in block:
        raise StructureError(path, "no pdbx_poly_seq_scheme category; expected an mmCIF file with its SEQRES scheme")
    scheme = block["pdbx_poly_seq_scheme"]
    strand = scheme["pdb_strand_id"].as_array(str)
    rows = np.flatnonzero(strand == chain.chain_id)
    mon = scheme["mon_id"].as_array(str)[rows]
    num = scheme["pdb_seq_num"].as_array(str)[rows]
    ins = scheme["pdb_ins_code"].as_array(str)[rows]
    observed = {label: i for i, label in enumerate(chain.residue_labels())}
    n = len(rows)
    out_pos = np.zeros((n, rc.atom_type_num, 3), dtype=np.float32)
    out_mask = np.zeros((n, rc.atom_type_num), dtype=np.float32)
    out_b = np.zeros((n, rc.atom_type_num), dtype=np.float32)
    aatype = np.zeros(n, dtype=np.int64)
    resnum = np.zeros(n, dtype=np.int64)
    icode = np.empty(n, dtype=object)
    names = []
    for k in range(n):
        code = "" if ins[k] in (".", "?") else ins[k]
        label = f"{int(num[k])}{code}"
        parent = _parent_resname(mon[k])
        aatype[k] = rc.restype_order.get(rc.restype_3to1.get(parent, "X"), rc.unk_restype_index)
        resnum[k], icode[k] = int(num[k]), code
        names.append(str(mon[k]))
        if label in observed:
            i = observed.pop(label)
            out_pos[k], out_mask[k], out_b[k] = chain.atom_positions[i], chain.atom_mask[i], chain.b_factors[i]
    if observed:
        raise StructureError(path, f"residues {sorted(observed)} of chain {chain.chain_id} are not in pdbx_poly_seq_scheme")
    return replace(
        chain,
        sequence=rc.aatype_to_sequence(aatype),
        aatype=aatype,
        residue_index=resnum,
        atom_positions=out_pos,
        atom_mask=out_mask,
        b_factors=out_b,
        insertion_code=icode,
        residue_names=names,
    )


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------


def chain_to_atoms(chain: ProteinChain, plddt: Optional[Sequence[float]] = None):
    """biotite ``AtomArray`` of the masked atoms; B-factor = per-residue pLDDT (0-100) when given, else the
    chain's own B-factors (0 if none). Residue names are the parents (MET for MSE), occupancy 1."""
    import biotite.structure as struc

    n = len(chain)
    if plddt is not None:
        plddt = np.asarray(plddt, dtype=np.float32).reshape(-1)
        if plddt.shape[0] != n:
            raise ValueError(f"plddt has {plddt.shape[0]} values for {n} residues")
        if not np.all(np.isfinite(plddt)) or plddt.min() < 0 or plddt.max() > 100:
            raise ValueError("plddt must be finite and in [0, 100] (AF2's scale)")
    res_i, atom_k = np.nonzero(chain.atom_mask > 0)
    atoms = struc.AtomArray(len(res_i))
    atoms.coord = chain.atom_positions[res_i, atom_k].astype(np.float32)
    atoms.chain_id[:] = chain.chain_id or "A"
    atoms.res_id = np.asarray(chain.residue_index)[res_i].astype(int)
    atoms.ins_code = np.array([chain.insertion_code[i] or "" for i in res_i], dtype="U1")
    atoms.res_name = np.array([rc.resnames[int(chain.aatype[i])] for i in res_i], dtype="U5")
    atoms.atom_name = np.array([rc.atom_types[k] for k in atom_k], dtype="U6")
    atoms.element = np.array([rc.atom_element[rc.atom_types[k]] for k in atom_k], dtype="U2")
    atoms.hetero = np.zeros(len(res_i), dtype=bool)
    if plddt is not None:
        b = plddt[res_i]
    elif chain.b_factors is not None:
        b = chain.b_factors[res_i, atom_k]
    else:
        b = np.zeros(len(res_i), dtype=np.float32)
    atoms.set_annotation("b_factor", np.asarray(b, dtype=np.float32))
    atoms.set_annotation("occupancy", np.ones(len(res_i), dtype=np.float32))
    return atoms


def _atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``; the temporary file is removed on failure."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_pdb(chain: ProteinChain, path: str, plddt: Optional[Sequence[float]] = None) -> None:
    """Write ``chain`` as PDB (pLDDT in the B-factor column if given), atomically."""
    import biotite.structure.io.pdb as pdb

    atoms = chain_to_atoms(chain, plddt)

    def write(tmp):
        f = pdb.PDBFile()
        f.set_structure(atoms)
        f.write(tmp)

    _atomic_write(path, write)


def write_mmcif(chain: ProteinChain, path: str, plddt: Optional[Sequence[float]] = None, name: str = "prediction") -> None:
    """Write ``chain`` as mmCIF (pLDDT in ``B_iso_or_equiv`` if given), atomically."""
    import biotite.structure.io.pdbx as pdbx

    atoms = chain_to_atoms(chain, plddt)

    def write(tmp):
        f = pdbx.CIFFile()
        pdbx.set_structure(f, atoms, data_block=name)
        f.write(tmp)

    _atomic_write(path, write)


def write_structure(chain: ProteinChain, path: str, plddt: Optional[Sequence[float]] = None) -> None:
    """PDB or mmCIF by the file name (``.cif``/``.mmcif`` -> mmCIF, anything else PDB)."""
    if str(path).lower().endswith(_CIF_SUFFIXES):
        write_mmcif(chain, path, plddt)
    else:
        write_pdb(chain, path, plddt)


def chain_from_prediction(
    aatype,
    atom_positions,
    atom_mask,
    residue_index=None,
    chain_id: str = "A",
) -> ProteinChain:
    """A :class:`ProteinChain` from model outputs (numpy or torch, atom37), for the writers."""
    def to_np(x, dtype):
        if hasattr(x, "detach"):
            x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
        return np.asarray(x).astype(dtype)

    aatype = to_np(aatype, np.int64)
    n = len(aatype)
    residue_index = np.arange(1, n + 1) if residue_index is None else to_np(residue_index, np.int64)
    return ProteinChain(
        sequence=rc.aatype_to_sequence(aatype),
        aatype=aatype,
        residue_index=residue_index,
        atom_positions=to_np(atom_positions, np.float32),
        atom_mask=to_np(atom_mask, np.float32),
        chain_id=chain_id,
    )
