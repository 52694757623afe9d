"""No code runs from an untrusted file: crafted pickles for every loader of the protein-LM path.

Each crafted file holds an object whose unpickling calls ``os.system("touch MARKER")`` (what an attacker's
checkpoint or LMDB record would do). For every entry point (pretraining ``--load``, the converter,
``converter/reshard.py``, ``tape_train.py --resume_from_checkpoint`` and TAPE model weights, preprocess's LMDB input
and the TAPE LMDB datasets) the file is refused with an error naming the global and the file, and MARKER does not
exist afterwards. Files that real training stacks write (NumPy RNG state, ``argparse.Namespace``, Megatron's enums
and fp16 loss scaler) still load; ``--trust-checkpoint`` loads a file whose extra class is not on the allow-list.
"""
from __future__ import annotations

import argparse
import fractions
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from pfam_fixtures import REPO
from test_converter import full_megatron_state, megatron_args, save_megatron, shard_by_hand
from test_pretrain_parallel import make_tiny_data, tiny_argv, train_run

from megatron_protein.utils.safe_load import UnsafeFileError, load_record, load_torch_file


class Payload:
    """Unpickling this runs ``touch MARKER``: the classic malicious pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


REFUSED = r"refused to .*'(posix|os)\.system'"


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD_RAN"
    yield str(path)
    assert not path.exists(), "code from the crafted file ran"


def _evil_megatron_checkpoint(root, marker, tp=1):
    """A Megatron save directory whose partitions are correct except for one extra pickled payload."""
    state = full_megatron_state(padded_vocab=32)
    save = save_megatron(str(root), shard_by_hand(state, tp, 1), megatron_args(tp, 1, 32))
    path = os.path.join(save, "iter_0000100", "mp_rank_00", "model_optim_rng.pt")
    checkpoint = load_torch_file(path)
    checkpoint["optimizer"] = {"note": Payload(marker)}
    torch.save(checkpoint, path)
    return save, path


# -------------------------------------------------------------------------------------------- checkpoints
def test_pretrain_load_refuses_a_crafted_checkpoint(tmp_path, marker):
    data = make_tiny_data(str(tmp_path / "data"), train=40, valid=8)
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(data, extra=["--save", save])
    argv[argv.index("--train-iters") + 1] = "1"
    train_run(argv)
    path = os.path.join(save, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    state = load_torch_file(path)
    state["rng_state"][0]["payload"] = Payload(marker)
    torch.save(state, path)
    resume = tiny_argv(data, extra=["--load", save])
    with pytest.raises(UnsafeFileError, match=re.escape(path) + ": " + REFUSED + r".*--trust-checkpoint"):
        train_run(resume)


def test_converter_and_reshard_refuse_a_crafted_checkpoint(tmp_path, marker):
    from megatron_protein.conversion.reshard import reshard
    from megatron_protein.conversion.to_tape import convert

    save, path = _evil_megatron_checkpoint(tmp_path / "save", marker, tp=2)
    with pytest.raises(UnsafeFileError, match=re.escape(path) + ": " + REFUSED):
        convert(save, str(tmp_path / "tape"), table_file=None)
    with pytest.raises(UnsafeFileError, match=re.escape(path) + ": " + REFUSED):
        reshard(save, str(tmp_path / "tp1"), 1, 1)
    assert not os.path.exists(tmp_path / "tape") and not os.path.exists(tmp_path / "tp1")
    # Through the command line too: one line, exit status 2.
    proc = subprocess.run([sys.executable, os.path.join(REPO, "converter", "reshard.py"), "--src", save, "--out",
                           str(tmp_path / "tp1"), "--tp", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(r"error: " + re.escape(path) + ": " + REFUSED + r"[^\n]*\n", proc.stderr), proc.stderr


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_protocol_4_pickles_and_unlisted_callables_are_refused(tmp_path, marker):
    """Opcodes torch.save never writes, and harmless-looking callables (builtins.eval, getattr) are refused too."""
    path = tmp_path / "p4.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload(marker)}, f, protocol=4)
    with pytest.raises(UnsafeFileError, match="refused"):
        load_torch_file(str(path))

    class Eval:
        def __reduce__(self):
            return eval, (f"__import__('os').system('touch {marker}')",)

    torch.save({"x": Eval()}, tmp_path / "eval.pt")
    with pytest.raises(UnsafeFileError, match=r"'builtins\.eval'"):
        load_torch_file(str(tmp_path / "eval.pt"))


def test_what_megatron_checkpoints_hold_still_loads(tmp_path):
    """args (with a torch dtype and a megatron.* enum), NumPy's RNG state, Python's, torch's, an fp16 loss scaler of
    Megatron-LM 1.x, sets: loaded by the weights-only loader, training-stack classes as inert stand-ins."""
    import enum
    import random
    import types

    names = ["megatron", "megatron.core", "megatron.core.enums", "megatron.fp16", "megatron.fp16.loss_scaler"]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    model_type = enum.Enum("ModelType", "encoder_or_decoder retro", module="megatron.core.enums")
    sys.modules["megatron.core.enums"].ModelType = model_type
    scaler = type("DynamicLossScaler", (), {"__module__": "megatron.fp16.loss_scaler"})
    sys.modules["megatron.fp16.loss_scaler"].DynamicLossScaler = scaler
    try:
        loss_scaler = scaler()
        loss_scaler.cur_scale = 4096.0
        state = {"args": argparse.Namespace(params_dtype=torch.float16, model_type=model_type.encoder_or_decoder,
                                            data_path=["1.0", "/data/pfam"], tags={"a", "b"}),
                 "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                                "torch_rng_state": torch.get_rng_state(),
                                "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}],
                 "optimizer": {"loss_scaler": loss_scaler, "fp32_from_fp16_params": [[torch.ones(3)]]},
                 "model": {"language_model": {"embedding": {"word_embeddings": {"weight": torch.ones(2, 2)}}}}}
        for legacy in (False, True):
            torch.save(state, tmp_path / "m.pt", _use_new_zipfile_serialization=not legacy)
            for name in names:
                sys.modules.pop(name)
            try:
                loaded = load_torch_file(str(tmp_path / "m.pt"))
            finally:
                for name in names:
                    sys.modules[name] = types.ModuleType(name)
                sys.modules["megatron.core.enums"].ModelType = model_type
                sys.modules["megatron.fp16.loss_scaler"].DynamicLossScaler = scaler
            assert loaded["args"].params_dtype is torch.float16 and loaded["args"].tags == {"a", "b"}
            assert "megatron.core.enums.ModelType" in repr(loaded["args"].model_type)
            assert loaded["optimizer"]["loss_scaler"].state == {"cur_scale": 4096.0}
            np_state = loaded["rng_state"][0]["np_rng_state"]
            assert np_state[0] == "MT19937" and np_state[1].dtype == np.uint32
            np.random.set_state(np_state)  # usable as is
    finally:
        for name in names:
            sys.modules.pop(name, None)


def test_trust_checkpoint_is_the_escape_hatch(tmp_path):
    """A class outside the allow-list (here a harmless fractions.Fraction in args) is refused by default and loaded
    with --trust-checkpoint, through pretraining's flag."""
    data = make_tiny_data(str(tmp_path / "data"), train=40, valid=8)
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(data, extra=["--save", save])
    argv[argv.index("--train-iters") + 1] = "1"
    train_run(argv)
    path = os.path.join(save, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    state = load_torch_file(path)
    state["args"].learning_rate_fraction = fractions.Fraction(1, 3)
    torch.save(state, path)
    resume = tiny_argv(data, extra=["--load", save])
    resume[resume.index("--train-iters") + 1] = "2"
    with pytest.raises(UnsafeFileError, match=r"'fractions\.Fraction'"):
        train_run(resume)
    assert len(train_run(resume + ["--trust-checkpoint"])["losses"]) == 1


def test_tape_resume_and_model_weights_refuse_crafted_files(tmp_path, marker):
    from test_tape_train import TINY, _small_copy

    from tape_tasks.cli import train_main
    from tape_tasks.config import ProteinBertConfig
    from tape_tasks.model import ProteinBertForMaskedLM

    data = _small_copy(str(tmp_path / "data"))
    pretrained = str(tmp_path / "pretrained")
    ProteinBertForMaskedLM(ProteinBertConfig(**TINY)).save_pretrained(pretrained)
    torch.save({"optimizer": Payload(marker), "lr_scheduler": {}, "epoch": 0, "step": 0, "best_valid_loss": 1.0},
               os.path.join(pretrained, "checkpoint.bin"))
    args = ["transformer", "masked_language_modeling", "--data_dir", data, "--output_dir", str(tmp_path / "runs"),
            "--log_dir", str(tmp_path / "logs"), "--batch_size", "4", "--max_steps", "1", "--from_pretrained",
            pretrained, "--time_or_name", "evil"]
    with pytest.raises(UnsafeFileError, match=re.escape(os.path.join(pretrained, "checkpoint.bin")) + ": " + REFUSED):
        train_main(args + ["--resume_from_checkpoint"])
    weights = os.path.join(pretrained, "pytorch_model.bin")
    state = load_torch_file(weights)
    state["bert.payload"] = Payload(marker)
    torch.save(state, weights)
    with pytest.raises(UnsafeFileError, match=re.escape(weights) + ": " + REFUSED):
        train_main(args)


# ----------------------------------------------------------------------------------------------- records
def _evil_lmdb(path, marker, where="record"):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24, subdir=True)
    with env.begin(write=True) as txn:
        good = {"primary": "MKVLA", "protein_length": 5, "family": 1, "clan": 1}
        txn.put(b"0", pickle.dumps(good))
        txn.put(b"1", pickle.dumps(Payload(marker) if where == "record" else good))
        txn.put(b"num_examples", pickle.dumps(Payload(marker) if where == "count" else 2))
    env.close()


@pytest.mark.parametrize("where", ["record", "count"])
def test_preprocess_refuses_a_crafted_lmdb_record(tmp_path, marker, where):
    from megatron_protein.data.preprocess import preprocess

    source = tmp_path / "pfam_train.lmdb"
    _evil_lmdb(source, marker, where)
    out = tmp_path / "out"
    out.mkdir()
    record = "record 1" if where == "record" else "num_examples"
    with pytest.raises(UnsafeFileError, match=re.escape(f"{source}: {record}") + r": refused to unpickle: the record "
                                                                                 r"references '(posix|os)\.system'"):
        preprocess([str(source)], str(out / "pfam"), progress=False)
    assert os.listdir(out) == []


def test_tape_lmdb_dataset_refuses_a_crafted_record(tmp_path, marker):
    from tape_tasks.registry import get_task

    (tmp_path / "pfam").mkdir()
    _evil_lmdb(tmp_path / "pfam" / "pfam_valid.lmdb", marker)
    dataset = get_task("masked_language_modeling").dataset(str(tmp_path), "valid", data_format="lmdb")
    with pytest.raises(UnsafeFileError, match=r"pfam_valid\.lmdb: record 1: refused to unpickle"):
        dataset.validate()


def test_records_with_numpy_arrays_load_in_every_protocol():
    record = {"primary": "MKV", "tertiary": np.zeros((3, 3), dtype=np.float32), "protein_length": np.int64(3),
              "valid_mask": np.array([True, False, True]), "tags": {"x"}}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = load_record(pickle.dumps(record, protocol=protocol), "r")
        assert loaded["primary"] == "MKV" and loaded["tertiary"].shape == (3, 3)
        assert loaded["protein_length"] == 3 and loaded["valid_mask"].tolist() == [True, False, True]


# ------------------------------------------------------------------------------------------------ the code
def test_no_unrestricted_unpickling_outside_tests():
    """The repository's own check: no `weights_only=False` and no `pickle.load(s)(` outside tests/."""
    pattern = re.compile(r"weights_only *= *False|pickle\.loads?\(")
    offenders = []
    for top in ("megatron_protein", "tape_tasks", "converter", "pretrain", "finetune", "bench", "scripts"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith((".py", ".sh")):
                    path = os.path.join(root, name)
                    with open(path, encoding="utf-8") as f:
                        for number, line in enumerate(f, 1):
                            if pattern.search(line):
                                offenders.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
