"""The TAPE side of megatron_protein: finetune and evaluate a converted protein BERT on the five TAPE tasks.

``model`` (ProteinBertConfig in ``config``, ProteinBertModel, ProteinBertForMaskedLM, OneHotModel: TAPE's file
format, pre-LN layers), ``tokenizer`` (TAPE's ``iupac`` ids), ``registry`` (the tasks, listed explicitly),
``datasets`` (TAPE's LMDB and JSON files), ``heads``, ``metrics`` and ``training`` (what ``finetune/tape_*.py``
call). Usage: docs/tape.md.
"""
from .config import ModelFileError, ProteinBertConfig
from .model import OneHotModel, ProteinBertForMaskedLM, ProteinBertModel
from .tokenizer import TAPETokenizer

__all__ = ["ModelFileError", "OneHotModel", "ProteinBertConfig", "ProteinBertForMaskedLM", "ProteinBertModel",
           "TAPETokenizer"]
