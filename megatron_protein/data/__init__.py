"""Pfam data pipeline: tokenizer (TAPE IUPAC ids), readers, Megatron indexed dataset, preprocess, MLM samples.

The MLM dataset (which needs torch) is imported on first use, so the preprocess worker processes start without
importing torch.
"""
from .indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder, best_fitting_dtype
from .tokenizer import IUPACTokenizer, SentencePieceTokenizer, build_tokenizer

__all__ = ["IUPACTokenizer", "SentencePieceTokenizer", "build_tokenizer", "MMapIndexedDataset",
           "MMapIndexedDatasetBuilder", "best_fitting_dtype", "MLMDataset", "attention_mask_from_segments"]


def __getattr__(name):
    if name in ("MLMDataset", "attention_mask_from_segments"):
        from . import mlm_dataset

        return getattr(mlm_dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
