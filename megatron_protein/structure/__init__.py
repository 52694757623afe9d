"""Structures for folding: residue chemistry, rigid frames, structure I/O and metrics.

- ``residue_constants``: amino-acid alphabets (AF2 order), the MSA alphabet, atom37, ideal backbone geometry.
- ``rigid``: ``Rigid`` frames in torch (AF2 supplement Algorithms 21 and 23), fp32 math for any caller dtype.
- ``metrics``: lDDT-CA, TM-score, GDT-TS/HA, RMSD (numpy; a batched torch lDDT-CA for the pLDDT target).
- ``io``: PDB/mmCIF reading into ``ProteinChain`` and writing with pLDDT in the B-factor column (biotite).
- ``ideal_chain``: ideal backbones of constant dihedrals (NeRF): the helix and strand of the folding baselines.

Submodules are imported on use (``from megatron_protein.structure import rigid``), so importing the package
does not pull in torch or biotite.
"""
