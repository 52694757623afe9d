"""Models built on the parallel core: the protein BERT (``bert``); the folding model lives in ``folding/``."""
from megatron_protein.models.bert import BertConfig, ProteinBertModel, masked_lm_loss, padding_attention_mask

__all__ = ["BertConfig", "ProteinBertModel", "masked_lm_loss", "padding_attention_mask"]
