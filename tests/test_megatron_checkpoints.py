"""Checkpoints move between Megatron-LM, ProteinLM and this trainer.

- Ours is Megatron-LM's: ``model`` is the nested dict Megatron-LM's legacy ``BertModel.state_dict_for_save_checkpoint``
  writes (``megatron/legacy/model/bert_model.py``, ``language_model.py``: ``language_model`` -> ``embedding`` ->
  ``word_embeddings``/``position_embeddings`` -> ``weight``; ``encoder`` and ``lm_head`` flat below their names;
  ``word_embeddings_for_head`` on the last stage), the schedule is also under ``opt_param_scheduler`` with Megatron's
  keys, ``rng_state`` is a list.
- Megatron-LM's is ours: a checkpoint written with Megatron-LM's key structure (its newest names: ``input_norm``,
  ``post_attention_norm``, ``final_norm``, ``lm_head.norm``; token types, pooler and binary head; a fp16
  optimizer state and CUDA RNG states this CPU run cannot use) loads with ``--load`` (weights; the optimizer and
  RNG refused with a message naming the flag to pass) and with ``--finetune``, and trains; the weights are those of
  the file (outputs equal a plain-torch forward of them).
- ProteinLM's (nested, ``transformer``/``attention`` names, a 31-token vocabulary padded to 128) fine-tunes, its
  rows moved to our ids.
- Our older flat checkpoints still resume.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

from test_converter import (EPS, FFN, HEADS, HIDDEN, LAYERS, MAX_POS, full_megatron_state, megatron_reference,
                            proteinlm_checkpoint)
from test_pretrain_parallel import make_tiny_data, train_run

from megatron_protein.conversion import megatron_checkpoint as mc
from megatron_protein.conversion.vocabulary import PROTEINLM_VOCAB, TAPE_VOCAB
from megatron_protein.models.bert import BertConfig, ProteinBertModel
from megatron_protein.models.megatron_layout import flatten_state_dict, nest_bert_state
from megatron_protein.parallel import scg
from megatron_protein.parallel.tensor_parallel import model_parallel_seed
from megatron_protein.training import checkpointing


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp("pfam")))


def argv_for(data_prefix, load=None, extra=()):
    """The model of test_converter's checkpoints (4 layers, hidden 16, 4 heads, ffn 32, 24 positions)."""
    argv = ["--data-path", data_prefix, "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN),
            "--num-attention-heads", str(HEADS), "--ffn-hidden-size", str(FFN), "--seq-length", str(MAX_POS),
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-3",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0", "--log-interval", "1",
            "--seed", "7"]
    if load:
        argv += ["--load", load]
    return argv + list(extra)


def megatron_lm_model_entry(full: dict) -> dict:
    """``model`` as Megatron-LM's legacy BertModel.state_dict_for_save_checkpoint builds it, written out from its
    code's key structure (not from ours), with the names of its releases since late 2023."""
    def rename(key):
        return (key.replace(".input_layernorm.", ".input_norm.")
                .replace(".post_attention_layernorm.", ".post_attention_norm.")
                .replace("final_layernorm.", "final_norm."))
    embedding = {"word_embeddings": {"weight": full[mc.WORD_EMBEDDINGS]},
                 "position_embeddings": {"weight": full[mc.POSITION_EMBEDDINGS]}}
    if mc.TOKENTYPE_EMBEDDINGS in full:
        embedding["tokentype_embeddings"] = {"weight": full[mc.TOKENTYPE_EMBEDDINGS]}
    encoder = {rename(k[len("language_model.encoder."):]): v for k, v in full.items()
               if k.startswith("language_model.encoder.")}
    lm_head = {k[len("lm_head."):].replace("layernorm.", "norm."): v for k, v in full.items()
               if k.startswith("lm_head.")}
    return {"language_model": {"embedding": embedding, "encoder": encoder,
                               "pooler": {"dense.weight": torch.zeros(HIDDEN, HIDDEN),
                                          "dense.bias": torch.zeros(HIDDEN)}},
            "lm_head": lm_head,
            "binary_head": {"weight": torch.zeros(2, HIDDEN), "bias": torch.zeros(2)}}


def write_megatron_lm_checkpoint(save: str, full: dict, iteration: int = 1000) -> str:
    """A whole Megatron-LM save directory as megatron/training/checkpointing.py writes it at tp = pp = 1."""
    args = argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        seq_length=MAX_POS, max_position_embeddings=MAX_POS, padded_vocab_size=32, vocab_size=30,
        make_vocab_size_divisible_by=8, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        layernorm_epsilon=EPS, micro_batch_size=4, global_batch_size=8, consumed_train_samples=8 * iteration,
        data_path=["/megatron/data/pfam_text_sentence"], tokenizer_type="BertWordPieceLowerCase",
        bert_binary_head=True, num_tokentypes=2, fp16=True, data_parallel_random_init=False)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
             "model": megatron_lm_model_entry(full),
             # Float16OptimizerWithFloat16Params: the inner optimizer over fp32 master copies, in its own groups.
             "optimizer": {"optimizer": {"state": {0: {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                                         "param_groups": [{"params": [0], "wd_mult": 1.0, "lr_mult": 1.0}]},
                           "grad_scaler": {"scale": 4096.0}, "fp32_from_fp16_params": [[torch.zeros(3)]]},
             "opt_param_scheduler": {"max_lr": 1e-4, "lr_warmup_steps": 800, "num_steps": 8 * iteration,
                                     "lr_decay_style": "linear", "lr_decay_steps": 80000, "min_lr": 1e-5,
                                     "start_wd": 0.01, "end_wd": 0.01, "wd_incr_style": "constant",
                                     "wd_incr_steps": 80000},
             "rng_state": [{"random_rng_state": __import__("random").getstate(),
                            "np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state(),
                            "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
                            "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}}]}
    path = os.path.join(save, f"iter_{iteration:07d}", "mp_rank_00", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path))
    torch.save(state, path)
    with open(os.path.join(save, checkpointing.TRACKER_FILENAME), "w") as f:
        f.write(str(iteration))
    return save


def build_model(**overrides) -> ProteinBertModel:
    groups = scg.init_process_group([("dp", None)])
    model_parallel_seed(7, groups)
    values = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                  max_position_embeddings=MAX_POS, hidden_dropout=0.0, attention_dropout=0.0,
                  layernorm_fusion=False)
    values.update(overrides)
    return ProteinBertModel(BertConfig(**values), groups).eval()


def test_our_save_is_megatrons_nested_layout_and_round_trips():
    model = build_model()
    nested = model.state_dict_for_save_checkpoint()
    assert list(nested) == ["language_model", "lm_head"]
    assert list(nested["language_model"]) == ["embedding", "encoder"]
    assert nested["language_model"]["embedding"]["word_embeddings"].keys() == {"weight"}
    assert nested["language_model"]["embedding"]["position_embeddings"].keys() == {"weight"}
    assert "layers.3.self_attention.query_key_value.weight" in nested["language_model"]["encoder"]
    assert "final_layernorm.bias" in nested["language_model"]["encoder"]
    assert set(nested["lm_head"]) == {"bias", "dense.weight", "dense.bias", "layernorm.weight", "layernorm.bias"}
    assert flatten_state_dict(nested).keys() == model.state_dict().keys()
    other = build_model(init_method_std=0.5)
    other.load_state_dict(nested)  # strict
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    with pytest.raises(ValueError, match="no place for it"):
        nest_bert_state({"decoder.layers.0.weight": torch.zeros(1)})


def test_megatron_lm_checkpoint_loads_with_load_and_finetune_and_trains(data_prefix, tmp_path):
    full = full_megatron_state(padded_vocab=32, seed=4, tokentypes=2)
    save = write_megatron_lm_checkpoint(str(tmp_path / "megatron"), full)

    # --load: Megatron's binary head and token types do not exist here; the message points at --finetune.
    with pytest.raises(checkpointing.CheckpointError, match=r"unexpected .*binary_head.*loads with --finetune"):
        train_run(argv_for(data_prefix, save, ["--allow-data-path-change"]))

    # --finetune: the weights (token type 0 folded into the positions, pooler and binary head dropped), iteration 0.
    model = build_model()
    position = checkpointing.load_checkpoint(save, model, None, None, _args_for(model), finetune=True)
    assert position["iteration"] == 0 and position["args"].bert_binary_head
    tokens = torch.randint(5, 30, (2, 11), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, 11, dtype=torch.bool)
    padding[1, 8:] = False
    _, expected = megatron_reference(full, tokens, padding)  # the file's function, in plain torch
    with torch.no_grad():
        logits = model(tokens, (~padding)[:, None, None, :])
    torch.testing.assert_close(logits[padding], expected[padding], rtol=1e-5, atol=1e-5)
    finetuned = train_run(argv_for(data_prefix, save, ["--finetune"]))
    assert len(finetuned["losses"]) == 3 and np.all(np.isfinite(finetuned["losses"]))


def test_megatron_lm_weights_resume_with_load_when_optimizer_and_rng_are_left_out(data_prefix, tmp_path):
    """A Megatron-LM checkpoint of a model this trainer builds exactly (no token types, no binary head): --load
    takes the weights, the iteration and the data position; its fp16 optimizer and CUDA RNG states are refused
    by name until --no-load-optim/--no-load-rng (with --no-load-optim the schedule restarts too, as in
    Megatron-LM)."""
    full = full_megatron_state(padded_vocab=32, seed=5)
    save = str(tmp_path / "megatron")
    write_megatron_lm_checkpoint(save, full, iteration=2)
    path = os.path.join(save, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, weights_only=False)
    for key in ("pooler",):
        del state["model"]["language_model"][key]
    del state["model"]["binary_head"]
    torch.save(state, path)
    base = argv_for(data_prefix, save, ["--allow-data-path-change", "--train-iters", "4"])
    with pytest.raises(checkpointing.CheckpointError, match="optimizer state cannot be resumed.*--no-load-optim"):
        train_run(base)
    with pytest.raises(checkpointing.CheckpointError, match="saved on another kind of device.*--no-load-rng"):
        train_run(base + ["--no-load-optim"])
    resumed = train_run(base + ["--no-load-optim", "--no-load-rng"])
    assert len(resumed["losses"]) == 2  # iterations 3 and 4 of 4
    assert np.all(np.isfinite(resumed["losses"]))


def test_proteinlm_checkpoint_finetunes_with_its_vocabulary_moved_to_our_ids(tmp_path):
    full = full_megatron_state(padded_vocab=128, seed=3, tokentypes=2)
    src = proteinlm_checkpoint(tmp_path, full)  # tmp/proteinlm/model_optim_rng.pt (one partition, no save dir)
    save = str(tmp_path / "proteinlm_save")
    os.makedirs(os.path.join(save, "release", "mp_rank_00"))
    os.replace(src, os.path.join(save, "release", "mp_rank_00", "model_optim_rng.pt"))
    with open(os.path.join(save, checkpointing.TRACKER_FILENAME), "w") as f:
        f.write("release")
    model = build_model()
    checkpointing.load_checkpoint(save, model, None, None, _args_for(model), finetune=True)
    ours = model.state_dict()[mc.WORD_EMBEDDINGS]
    for tape_id, token in enumerate(TAPE_VOCAB):
        name = {"<pad>": "[PAD]", "<mask>": "[MASK]", "<cls>": "[CLS]", "<sep>": "[SEP]", "<unk>": "[UNK]"}.get(token,
                                                                                                           token)
        assert torch.equal(ours[tape_id], full[mc.WORD_EMBEDDINGS][PROTEINLM_VOCAB.index(name)]), token
    assert torch.count_nonzero(ours[30:]) == 0  # padding rows
    assert torch.equal(model.state_dict()[mc.POSITION_EMBEDDINGS],
                       full[mc.POSITION_EMBEDDINGS] + full[mc.TOKENTYPE_EMBEDDINGS][0])


def test_our_older_flat_checkpoint_still_resumes(data_prefix, tmp_path):
    """A checkpoint written before the nested layout (flat keys, the schedule in iterations under lr_scheduler)
    resumes on the same losses as the run that wrote it would have continued with."""
    save = str(tmp_path / "ckpt")
    argv = argv_for(data_prefix, save, ["--save", save, "--train-iters", "4", "--hidden-dropout", "0.1"])
    full_run = train_run(argv_for(data_prefix, None, ["--train-iters", "4", "--hidden-dropout", "0.1"]))["losses"]
    first = train_run(argv + ["--exit-interval", "2"])["losses"]
    path = os.path.join(save, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, weights_only=False)
    state["model"] = flatten_state_dict(state["model"])        # the old layout
    schedule = state.pop("opt_param_scheduler")
    state["lr_scheduler"] = {"max_lr": schedule["max_lr"], "min_lr": schedule["min_lr"],  # the old keys
                             "warmup_steps": 0, "decay_steps": 4, "decay_style": "linear", "num_steps": 2}
    torch.save(state, path)
    rest = train_run(argv)["losses"]
    assert first + rest == full_run


def _args_for(model) -> argparse.Namespace:
    config = model.config
    return argparse.Namespace(num_layers=config.num_layers, hidden_size=config.hidden_size,
                              num_attention_heads=config.num_attention_heads, ffn_hidden_size=config.ffn_hidden_size,
                              max_position_embeddings=config.max_position_embeddings,
                              padded_vocab_size=config.padded_vocab_size(1), tensor_model_parallel_size=1,
                              pipeline_model_parallel_size=1)
