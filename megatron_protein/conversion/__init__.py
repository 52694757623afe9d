"""Checkpoint conversion: Megatron protein BERT checkpoints (ours, Megatron-LM's, ProteinLM's) to TAPE and
Hugging Face ESM, and resharding between tensor/pipeline-parallel layouts.

* :mod:`.megatron_checkpoint`: find, load and merge the ``mp_rank_*`` partitions of a checkpoint.
* :mod:`.vocabulary`: the source vocabulary (TAPE ids or ProteinLM's 31 tokens) and its rows in TAPE order.
* :mod:`.to_tape`: the TAPE model directory (``converter/megatron-converter.py``).
* :mod:`.to_hf_esm`: the Hugging Face ``EsmForMaskedLM`` export (``--format hf-esm``).
* :mod:`.reshard`: rewrite a checkpoint for other TP/PP degrees (``converter/reshard.py``).
"""
