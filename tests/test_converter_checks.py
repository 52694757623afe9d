"""The converter refuses shards that disagree or hold non-finite values (unless told otherwise), naming the file
and the tensor. A bit flip in a tensor replicated over tensor-parallel ranks is what this catches: the shards were
written by ranks that held the same values."""
from __future__ import annotations

import os
import re
import struct

import pytest
import torch

from test_converter import full_megatron_state, megatron_args, save_megatron, shard_by_hand

from megatron_protein.conversion import megatron_checkpoint as mc
from megatron_protein.conversion.reshard import reshard
from megatron_protein.conversion.to_tape import convert
from megatron_protein.utils.errors import run_cli
from megatron_protein.utils.safe_load import load_torch_file

REPLICATED = "language_model.encoder.layers.1.input_layernorm.weight"


def _flip_exponent_bit(value: float) -> float:
    """The float32 whose top exponent bit is flipped: 1.0 -> 3.4e38 (what a flipped bit in memory does)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return struct.unpack("<f", struct.pack("<I", bits ^ 0x40000000))[0]


def _tampered_checkpoint(root, change):
    """A TP=2 checkpoint whose tp rank 1 partition is changed by ``change(model_state)``."""
    save = save_megatron(str(root), shard_by_hand(full_megatron_state(32), 2, 1), megatron_args(2, 1, 32))
    path = os.path.join(save, "iter_0000100", "mp_rank_01", "model_optim_rng.pt")
    state = load_torch_file(path)
    change(state["model"])
    torch.save(state, path)
    return save, path


def test_a_bit_flip_in_a_replicated_tensor_is_refused(tmp_path, caplog):
    def flip(model):
        model[REPLICATED][3] = _flip_exponent_bit(float(model[REPLICATED][3]))

    save, path = _tampered_checkpoint(tmp_path / "save", flip)
    with pytest.raises(mc.CheckpointError, match=rf"{path}: {REPLICATED} must equal tp rank 0's copy in .*mp_rank_00.* "
                                                 rf"differs by up to 3\.\d+e\+38 \(tolerance 1e-06\).*"
                                                 rf"--allow-replicated-mismatch"):
        convert(save, str(tmp_path / "tape"), table_file=None)
    assert not os.path.exists(tmp_path / "tape")
    with pytest.raises(mc.CheckpointError, match="must equal tp rank 0's copy"):
        reshard(save, str(tmp_path / "tp1"), 1, 1)
    # Told otherwise: tp rank 0's copy is used, with a warning, and the result verifies against it.
    convert(save, str(tmp_path / "tape"), table_file=None, allow_replicated_mismatch=True)
    assert re.search(r"differs across tp ranks by up to 3\.\d+e\+38; using tp rank 0.s", caplog.text)
    assert os.path.isfile(tmp_path / "tape" / "pytorch_model.bin")


def test_nan_in_one_copy_is_a_mismatch_and_non_finite_weights_are_refused(tmp_path):
    def nan_in_one_copy(model):
        model[REPLICATED][0] = float("nan")

    save, path = _tampered_checkpoint(tmp_path / "one", nan_in_one_copy)
    with pytest.raises(mc.CheckpointError, match=rf"{path}: tensor {REPLICATED} holds 1 non-finite value"):
        convert(save, str(tmp_path / "tape"), table_file=None, allow_replicated_mismatch=True)

    def inf_in_a_shard(model):
        model["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"][0, 0] = float("inf")

    save, path = _tampered_checkpoint(tmp_path / "two", inf_in_a_shard)
    with pytest.raises(mc.CheckpointError, match=rf"{path}: tensor language_model\.encoder\.layers\.0\.mlp\."
                                                 rf"dense_h_to_4h\.weight holds 1 non-finite value"):
        convert(save, str(tmp_path / "tape"), table_file=None)
    assert not os.path.exists(tmp_path / "tape")


def test_cli_flag_allow_replicated_mismatch(tmp_path, capsys):
    import importlib.util

    from pfam_fixtures import REPO

    def flip(model):
        model[REPLICATED][3] = _flip_exponent_bit(float(model[REPLICATED][3]))

    save, path = _tampered_checkpoint(tmp_path / "save", flip)
    spec = importlib.util.spec_from_file_location("mc_cli", os.path.join(REPO, "converter", "megatron-converter.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert run_cli(cli.main, ["--src", save, "--out", str(tmp_path / "tape"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: {REPLICATED} must equal")
    assert run_cli(cli.main, ["--src", save, "--out", str(tmp_path / "tape"), "--quiet",
                              "--allow-replicated-mismatch"]) == 0
