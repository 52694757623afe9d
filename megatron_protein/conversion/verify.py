"""Check a conversion before it is published: the converted model must compute what the Megatron model computes.

The reference is this project's own Megatron BERT (``megatron_protein.models.bert.ProteinBertModel``) built in one
process (tp = pp = 1) and loaded, strictly, with the merged checkpoint; the candidates are the TAPE
``ProteinBertForMaskedLM`` loaded by ``tape_tasks`` from the written directory and, when exported, the Hugging
Face ``EsmForMaskedLM``. All run with dropout off on a fixed probe batch of random residues with <cls>, <sep> and
padding, and their final-LN sequence outputs and MLM logits over the 30 TAPE tokens must agree at real tokens.

Only checkpoints our model can hold are verified: TAPE-id vocabularies without token-type embeddings (a
ProteinLM checkpoint is checked by the test suite against an independent reference instead).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_protein.conversion import megatron_checkpoint as mc
from megatron_protein.utils.errors import UserError

logger = logging.getLogger(__name__)

#: Float32 outputs of the same weights computed by differently structured code (fused QKV vs three matrices,
#: native vs composed LayerNorm) agree to ~1e-6; an error in the mapping shows up at the 1e-1 scale.
DEFAULT_ATOL = 1e-4


class VerificationError(UserError, ValueError):
    """The converted model does not reproduce the Megatron model's outputs; nothing was written."""


@dataclass
class VerificationReport:
    sequence_max_abs_diff: float
    logits_max_abs_diff: float
    model: str

    def __str__(self) -> str:
        return (f"verified {self.model}: max |diff| sequence output {self.sequence_max_abs_diff:.2e}, "
                f"MLM logits {self.logits_max_abs_diff:.2e}")


def can_verify(full: dict[str, torch.Tensor], vocab_name: str) -> Optional[str]:
    """None if the merged checkpoint fits our model; otherwise the reason it does not."""
    if vocab_name != "tape":
        return f"the source vocabulary is '{vocab_name}', not TAPE's ids"
    if mc.TOKENTYPE_EMBEDDINGS in full:
        return "the checkpoint has token-type embeddings"
    extra = [k for k in full if not (k.startswith(("language_model.embedding.", "language_model.encoder."))
                                     or k.startswith("lm_head."))]
    if extra:
        return f"the checkpoint has tensors our model lacks ({extra[:3]})"
    if not any(k.startswith("lm_head.") for k in full) or mc.FINAL_LAYERNORM + ".weight" not in full:
        return "the checkpoint has no final LayerNorm or MLM head (taken from --dst)"
    return None


def probe_batch(max_positions: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, L] tokens (<cls> residues <sep> <pad>...) of three lengths, and the bool padding mask."""
    length = min(max_positions, 48)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(3, length, dtype=torch.long)
    padding_mask = torch.zeros(3, length, dtype=torch.bool)
    for row, real in enumerate((length, max(3, length * 2 // 3), 3)):
        tokens[row, 0], tokens[row, real - 1] = 2, 3
        tokens[row, 1:real - 1] = torch.randint(5, 30, (real - 2,), generator=g)
        padding_mask[row, :real] = True
    return tokens, padding_mask


@contextlib.contextmanager
def _inference_rng_stream():
    """Our attention forks the model-parallel RNG stream (for dropout); make one exist, and restore after."""
    from megatron_protein.parallel.random import MODEL_PARALLEL_RNG, get_rng_tracker
    tracker = get_rng_tracker()
    saved = tracker.get_states()
    try:
        if MODEL_PARALLEL_RNG not in tracker.names():
            tracker.add(MODEL_PARALLEL_RNG, 2718)
        yield
    finally:
        tracker.set_states(saved)


def megatron_outputs(full: dict[str, torch.Tensor], shape: mc.BertShape, tokens: torch.Tensor,
                     padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final-LN sequence output, MLM logits over the padded vocabulary) of our Megatron BERT on ``full``."""
    from megatron_protein.models.bert import BertConfig, ProteinBertModel, padding_attention_mask
    from megatron_protein.parallel import scg
    config = BertConfig(num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                        num_attention_heads=shape.num_attention_heads, ffn_hidden_size=shape.ffn_hidden_size,
                        max_position_embeddings=shape.max_position_embeddings,
                        make_vocab_size_divisible_by=shape.padded_vocab_size,
                        layernorm_epsilon=shape.layernorm_epsilon, hidden_dropout=0.0, attention_dropout=0.0)
    single = scg.ParallelGroups(axes=("dp",), degrees={"dp": 1})
    model = ProteinBertModel(config, single, pre_process=True, post_process=True).eval()
    model.load_state_dict(full, strict=True)
    mask = padding_attention_mask(padding_mask)
    with torch.no_grad(), _inference_rng_stream():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        sequence = model.language_model.encoder(model.language_model.embedding(tokens, positions), mask)
        logits = model.lm_head(sequence, model.decoder_weight())
    return sequence, logits


def _max_diff(a: torch.Tensor, b: torch.Tensor, padding_mask: torch.Tensor) -> float:
    return (a.float()[padding_mask] - b.float()[padding_mask]).abs().max().item()


def verify_outputs(full: dict[str, torch.Tensor], shape: mc.BertShape, tape_dir: str,
                   hf_dir: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                   atol: float = DEFAULT_ATOL) -> list[VerificationReport]:
    """Compare the models written to ``tape_dir`` (and ``hf_dir``) with our Megatron model on ``full``.

    Everything computes in float32. When the files were written in a lower precision (``dtype``), the reference
    weights are rounded through that dtype too, so the comparison stays at float32 resolution and still catches
    a wrong mapping rather than the rounding the user asked for.
    """
    from tape_tasks.model import ProteinBertForMaskedLM
    tokens, padding_mask = probe_batch(shape.max_position_embeddings)
    full32 = {k: (v.to(dtype) if dtype is not None else v).float() for k, v in full.items()}
    ref_sequence, ref_logits = megatron_outputs(full32, shape, tokens, padding_mask)
    ref_logits = ref_logits[..., :30]
    reports = []
    tape = ProteinBertForMaskedLM.from_pretrained(tape_dir).float().eval()
    with torch.no_grad():
        sequence, _ = tape.bert(tokens, padding_mask.long())
        logits = tape.mlm(sequence)[0]
    reports.append(VerificationReport(_max_diff(sequence, ref_sequence, padding_mask),
                                      _max_diff(logits, ref_logits, padding_mask), "TAPE ProteinBertForMaskedLM"))
    if hf_dir is not None:
        from transformers import EsmForMaskedLM
        esm = EsmForMaskedLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            out = esm(input_ids=tokens, attention_mask=padding_mask.long(), output_hidden_states=True)
        reports.append(VerificationReport(_max_diff(out.hidden_states[-1], ref_sequence, padding_mask),
                                          _max_diff(out.logits, ref_logits, padding_mask),
                                          "Hugging Face EsmForMaskedLM"))
    for report in reports:
        if max(report.sequence_max_abs_diff, report.logits_max_abs_diff) > atol:
            raise VerificationError(f"{report}: exceeds the tolerance {atol:g}; the conversion is wrong and was "
                                    f"not written")
        logger.info("%s", report)
    return reports
