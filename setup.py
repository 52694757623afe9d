"""megatron_protein: protein language models and protein folding on one Megatron-style parallel core."""
from setuptools import find_packages, setup

# torch is pinned to the build this project is tested with. The same pin serves CUDA builds of 2.13.0.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "numpy>=1.24",
    "sentencepiece>=0.2",
    "tensorboard>=2.14",
    "matplotlib>=3.7",  # curves for the docs (bench/pretrain_curves.py)
    "tqdm>=4.66",
    "lmdb>=1.4",
    "scipy>=1.11",
    # tape_tasks.attention_contacts: the L1 logistic regression on attention maps (Rao et al. 2020, as ESM fits it)
    "scikit-learn>=1.3",
    # MSAs: jackhmmer in process and easel's Stockholm reader (megatron_protein/data/msa.py).
    "pyhmmer>=0.10",
    # Structures: PDB/mmCIF reading and writing, sequence alignment, reference metrics (megatron_protein.structure).
    "biotite>=1.1",  # lddt, tm_score (used by the tests) arrived in 1.1; tested with 1.6.0
    # The TM-score/GDT search runs thousands of tiny GEMMs: one BLAS thread is several times faster there.
    "threadpoolctl>=3.1",
]

EXTRAS = {
    # tmtools (TM-align's C++ code) is the reference the structure metrics are checked against.
    "test": ["pytest>=8", "pytest-timeout>=2.3", "tmtools>=0.2"],
    # Triton runs the fused kernels on CUDA; on CPU its interpreter (TRITON_INTERPRET=1) checks them.
    "kernels": ["triton==3.9.0"],
    # Peers for benchmarks and the Hugging Face export of the converter.
    "hf": ["transformers>=4.40", "fair-esm>=2.0"],
}

setup(
    name="megatron_protein",
    version="0.1.0",
    description="Protein BERT pretraining (Pfam), TAPE finetuning and Evoformer folding on one Megatron-style parallel core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_protein", "megatron_protein.*", "tape_tasks", "tape_tasks.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
