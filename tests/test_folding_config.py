"""Folding config presets and command-line overrides."""
import pytest

from megatron_protein.models.folding.config import (ConfigError, FoldingConfig, architecture_differences, preset)
from megatron_protein.training.folding_arguments import parse_args


def test_alphafold2_presets_have_the_papers_sizes():
    for name, crop, clusters, extra in (("initial_training", 256, 128, 1024), ("finetuning", 384, 512, 5120)):
        cfg = preset(name)
        m = cfg.model
        assert (m.c_m, m.c_z, m.c_s, m.c_e) == (256, 128, 384, 64)
        assert m.evoformer.num_blocks == 48 and m.extra_msa.num_blocks == 4
        assert m.structure_module.num_layers == 8 and m.structure_module.num_heads_ipa == 12
        assert (cfg.data.crop_size, cfg.data.max_msa_clusters, cfg.data.max_extra_msa) == (crop, clusters, extra)
        assert m.heads.distogram_bins == 64 and m.heads.plddt_bins == 50
        assert (cfg.loss.fape_clamp, cfg.loss.fape_length_scale) == (10.0, 10.0)
        assert (cfg.loss.distogram_weight, cfg.loss.masked_msa_weight, cfg.loss.plddt_weight) == (0.3, 2.0, 0.01)
        assert m.max_recycling_iters == 3
    assert preset("initial_training").train.lr == 1e-3 and preset("finetuning").train.lr == 5e-4


def test_alphafold2_preset_builds_with_about_93m_parameters():
    import torch

    from megatron_protein.models.folding.model import AlphaFold

    with torch.device("meta"):
        model = AlphaFold(preset("initial_training"))
    n = sum(p.numel() for p in model.parameters())
    # AF2's monomer model has about 93M parameters including templates (~2M) and the side-chain module: without
    # them it must still be in that range.
    assert 80e6 < n < 95e6, n


def test_round_trip_and_overrides():
    cfg = preset("tiny")
    again = FoldingConfig.from_dict(cfg.to_dict())
    assert again == cfg
    cfg.override("model.evoformer.num_blocks", "3")
    cfg.override("train.lr", "2e-4")
    cfg.override("train.precision", "bf16")
    assert cfg.model.evoformer.num_blocks == 3 and cfg.train.lr == 2e-4 and cfg.train.precision == "bf16"
    with pytest.raises(ConfigError, match="unknown config field 'model.evoformer.num_block'"):
        cfg.override("model.evoformer.num_block", "3")
    with pytest.raises(ConfigError, match="cannot read 'x' as int"):
        cfg.override("data.crop_size", "x")
    with pytest.raises(ConfigError, match="data.crop_size must be positive"):
        cfg.override("data.crop_size", "0")
    with pytest.raises(ConfigError, match="unknown config field"):
        FoldingConfig.from_dict({**cfg.to_dict(), "templates": {}})


def test_architecture_differences_name_the_fields():
    a, b = preset("tiny"), preset("tiny")
    b.model.c_z = 64
    b.train.lr = 1.0  # not architecture
    b.model.evoformer.msa_dropout = 0.5  # not architecture
    assert architecture_differences(a.architecture(), b.architecture()) == ["model.c_z: checkpoint 32, this run 64"]


def test_command_line_flags_override_the_preset(tmp_path):
    args, cfg, run = parse_args(["--config_preset", "tiny", "--crop_size", "32", "--max_msa_clusters", "4",
                                 "--train_step", "7", "--batch_size", "3", "--lr", "5e-4", "--warmup_steps", "2",
                                 "--grad_clip", "0.1", "--seed", "9", "--precision", "bf16", "--log_step", "2",
                                 "--eval_step", "3", "--save_step", "4", "--model_dir", str(tmp_path),
                                 "--chunk_size", "8", "--no_dropout",
                                 "--override", "model.structure_module.num_layers=2"])
    assert (cfg.data.crop_size, cfg.data.max_msa_clusters) == (32, 4)
    t = cfg.train
    assert (t.train_step, t.batch_size, t.lr, t.warmup_steps, t.grad_clip, t.seed, t.precision) == (
        7, 3, 5e-4, 2, 0.1, 9, "bf16")
    assert (t.log_step, t.eval_step, t.save_step) == (2, 3, 4)
    assert cfg.model.structure_module.num_layers == 2 and cfg.model.structure_module.dropout == 0.0
    assert run.chunk_size == 8 and run.model_dir == str(tmp_path)
    default_args, default_cfg, _ = parse_args([])
    assert default_cfg.preset == "tiny"


def test_bad_flag_values_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--override", "model.nope=1"])
    assert exc.value.code == 2
    assert "unknown config field 'model.nope'" in capsys.readouterr().err


def test_the_presets_table_in_docs_is_the_code():
    """Every row of docs/folding.md's presets table (``| `a.b` / `c` | tiny | initial_training | finetuning |``)
    holds the values the presets have, so the table cannot drift from config.py."""
    import os
    import re

    docs = os.path.join(os.path.dirname(__file__), "..", "docs", "folding.md")
    configs = [preset(name).to_dict() for name in ("tiny", "initial_training", "finetuning")]

    def lookup(config, dotted):
        for key in dotted.split("."):
            config = config[key]
        return config

    rows = 0
    for line in open(docs):
        if not line.startswith("| `") or line.count("|") != 5:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        if "." not in names[0]:
            continue
        prefix = names[0].rsplit(".", 1)[0]
        fields = [names[0]] + [f"{prefix}.{n}" for n in names[1:]]
        for column, config in enumerate(configs):
            written = re.split(r" / | x ", re.sub(r" \(.*\)", "", cells[1 + column]))
            actual = [lookup(config, f) for f in fields]
            assert len(written) == len(actual), (line, written, actual)
            for value, text in zip(actual, written):
                same = str(value) == text or (isinstance(value, float) and float(text) == value)
                assert same, f"docs/folding.md: {fields} column {column + 1} says {text}, the preset has {value}"
        rows += 1
    assert rows >= 45
