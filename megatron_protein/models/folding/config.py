"""One dataclass config for the folding model and its training, with three presets.

``FoldingConfig`` groups the settings by concern (``model``, ``data``, ``loss``, ``train``); every field is a plain
number, string or bool, so a config round-trips through :meth:`FoldingConfig.to_dict` / :meth:`from_dict` into a
checkpoint and back, and any single value can be overridden from the command line with a dotted path
(``--override model.evoformer.num_blocks=4``; see :meth:`FoldingConfig.override`).

Presets (:func:`preset`):

``initial_training``  AlphaFold2's monomer model and initial-training set-up (supplement 1.11, Tables 4-5):
                      c_m 256, c_z 128, c_s 384, c_e 64, 48 Evoformer blocks, 4 extra-MSA blocks, 8 structure
                      module layers; crop 256, 128 MSA clusters, 1,024 extra sequences; Adam lr 1e-3 with 1,000
                      warm-up steps, gradient clipping 0.1.
``finetuning``        the same model with the fine-tuning crops: 384 residues, 512 clusters, 5,120 extra
                      sequences; lr 5e-4.
``tiny``              a model that trains on 2 CPU cores in minutes (``bash scripts/train_folding.sh``); its sizes
                      were chosen by measurement (docs/folding.md, "Choosing the tiny preset").

Only what the code builds is here: there are no template, side-chain, torsion or violation settings because those
parts are not built (docs/folding.md, "Not built yet").
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A config value is out of range, or an override names a field that does not exist."""


@dataclass
class EvoformerConfig:
    """The Evoformer stack (supplement Algorithm 6, 48 blocks in AF2). Head sizes follow supplement Table 1."""

    num_blocks: int = 48
    c_hidden_msa_att: int = 32      # per head, MSA row and column attention (Algorithms 7, 8)
    num_heads_msa: int = 8
    c_hidden_opm: int = 32          # outer product mean (Algorithm 10)
    c_hidden_mul: int = 128         # triangle multiplication (Algorithms 11, 12)
    c_hidden_pair_att: int = 32     # per head, triangle attention (Algorithms 13, 14)
    num_heads_pair: int = 4
    transition_n: int = 4           # MSA and pair transitions (Algorithms 9, 15)
    msa_dropout: float = 0.15       # row-wise dropout after MSA row attention
    pair_dropout: float = 0.25      # row/column-wise dropout in the pair stack
    outer_product_mean_position: str = "middle"   # AF2 monomer; 'end' = Parallel Evoformer (needed by BP)
    recompute: bool = False         # activation recompute per block in training (torch.utils.checkpoint)


@dataclass
class ExtraMSAConfig:
    """The extra-MSA stack (supplement Algorithm 18 with global column attention, Algorithm 19)."""

    num_blocks: int = 4
    c_hidden_msa_att: int = 8
    num_heads_msa: int = 8
    c_hidden_opm: int = 32
    c_hidden_mul: int = 128
    c_hidden_pair_att: int = 32
    num_heads_pair: int = 4
    transition_n: int = 4
    msa_dropout: float = 0.15
    pair_dropout: float = 0.25
    outer_product_mean_position: str = "middle"
    recompute: bool = False


@dataclass
class StructureModuleConfig:
    """Supplement Algorithm 20 with invariant point attention (Algorithm 22) and the backbone update (23)."""

    num_layers: int = 8             # layers sharing one set of weights
    c_ipa: int = 16                 # per head, scalar queries/keys/values
    num_heads_ipa: int = 12
    num_qk_points: int = 4
    num_v_points: int = 8
    num_transition_layers: int = 1  # each: Linear-ReLU-Linear-ReLU-Linear (the supplement's "3 layers")
    dropout: float = 0.1
    position_scale: float = 10.0    # translations inside the module are in nm; x10 gives Angstrom
    # Frames the first layer starts from: 'identity' (AF2's black hole) or an ideal 'extended' / 'helix' chain.
    initial_frames: str = "identity"


@dataclass
class HeadsConfig:
    """Distogram (1.9.8), masked MSA (1.9.9) and pLDDT (Algorithm 29) heads."""

    distogram_bins: int = 64
    distogram_first_break: float = 2.3125   # Angstrom; 63 breaks from here to last_break, on pseudo-beta
    distogram_last_break: float = 21.6875
    plddt_bins: int = 50
    c_hidden_plddt: int = 128


@dataclass
class ModelConfig:
    """Channel sizes, embedders (Algorithms 3-5, 32) and the parts above."""

    c_m: int = 256
    c_z: int = 128
    c_s: int = 384
    c_e: int = 64
    target_feat_dim: int = 22       # 21 aatype one-hot + 1 (CONTRACTS: target_feat)
    msa_feat_dim: int = 49          # 23 cluster one-hot, has_deletion, deletion_value, 23 profile, deletion_mean
    extra_msa_feat_dim: int = 25    # 23 one-hot, has_deletion, deletion_value
    relpos_k: int = 32              # relative position clip (Algorithm 4): 2k + 1 bins
    use_profile: bool = False       # embed the ``profile`` feature into the query row (not AF2; embedders.py)
    recycle_min_bin: float = 3.25   # Algorithm 32: 15 bins of the previous pseudo-beta distances
    recycle_max_bin: float = 20.75
    recycle_num_bins: int = 15
    max_recycling_iters: int = 3    # recycles at inference; training samples 0..this many per step
    fused_kernels: bool = True      # build through megatron_protein.kernels' fused paths (reference on CPU)
    evoformer: EvoformerConfig = field(default_factory=EvoformerConfig)
    extra_msa: ExtraMSAConfig = field(default_factory=ExtraMSAConfig)
    structure_module: StructureModuleConfig = field(default_factory=StructureModuleConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)


@dataclass
class DataConfig:
    """Cropping and MSA sampling of training examples (supplement 1.2.5-1.2.8), read by the feature pipeline."""

    crop_size: int = 256
    max_msa_clusters: int = 128
    max_extra_msa: int = 1024
    masked_msa_fraction: float = 0.15
    # Fraction of training examples whose MSA/profile information is removed (query row only, no profile), so
    # the model also learns to fold from a bare sequence, which is what ``predict.py --fasta`` alone gives it.
    profile_dropout: float = 0.0


@dataclass
class LossConfig:
    """AlphaFold2's loss weights (supplement 1.9, Eq. 7): 0.5 FAPE + 0.5 aux + 0.3 distogram + 2 MSA + 0.01 pLDDT.

    FAPE here is backbone FAPE only (no side-chain frames exist yet): ``fape_weight`` multiplies the final
    layer's backbone FAPE (the supplement's L_FAPE without side chains) and ``aux_weight`` the mean of the
    backbone FAPE over all structure-module layers (L_aux without the torsion term).
    """

    fape_weight: float = 0.5
    aux_weight: float = 0.5
    fape_clamp: float = 10.0        # Angstrom
    fape_length_scale: float = 10.0  # Angstrom
    fape_clamp_fraction: float = 0.9  # fraction of training steps with clamped FAPE (1.11.5); 1.0 at eval
    distogram_weight: float = 0.3
    masked_msa_weight: float = 2.0
    plddt_weight: float = 0.01
    plddt_cutoff: float = 15.0      # lDDT inclusion radius (Angstrom)
    # Warm-up of the distogram and masked-MSA weights: 0 until step ``aux_warmup_start``, then linearly to full
    # weight over ``aux_warmup_steps`` (0 and 0: AF2, full weight from the start). Not in AF2 and off in every
    # preset: an option for small models whose auxiliary heads take the trunk's gradient from FAPE early on; the
    # tiny preset drops the masked-MSA loss instead (docs/folding_tiny.md has the measurements).
    aux_warmup_start: int = 0
    aux_warmup_steps: int = 0


@dataclass
class TrainConfig:
    """Optimiser and loop (supplement 1.11.3: Adam, beta 0.9/0.999, eps 1e-6, warm-up, clip 0.1)."""

    train_step: int = 10_000
    batch_size: int = 1
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = "constant"  # constant (AF2: constant after warm-up) | linear | cosine
    warmup_steps: int = 1000
    grad_clip: float = 0.1            # global gradient norm
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    seed: int = 1234
    precision: str = "fp32"           # fp32 | bf16 (autocast; geometry and losses stay fp32)
    log_step: int = 10
    eval_step: int = 1000
    save_step: int = 1000
    max_consecutive_skips: int = 10   # stop after this many non-finite steps in a row


@dataclass
class FoldingConfig:
    """Everything a folding run needs, by concern. ``preset`` names where the values started from."""

    preset: str = "initial_training"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        m, d, t = self.model, self.data, self.train
        positive = {"model.c_m": m.c_m, "model.c_z": m.c_z, "model.c_s": m.c_s, "model.c_e": m.c_e,
                    "model.structure_module.num_layers": m.structure_module.num_layers,
                    "model.structure_module.num_heads_ipa": m.structure_module.num_heads_ipa,
                    "data.crop_size": d.crop_size, "data.max_msa_clusters": d.max_msa_clusters,
                    "train.batch_size": t.batch_size, "train.log_step": t.log_step}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name, value in {"loss.aux_warmup_start": self.loss.aux_warmup_start,
                            "loss.aux_warmup_steps": self.loss.aux_warmup_steps,
                            "model.evoformer.num_blocks": m.evoformer.num_blocks,
                            "model.extra_msa.num_blocks": m.extra_msa.num_blocks,
                            "model.max_recycling_iters": m.max_recycling_iters,
                            "data.max_extra_msa": d.max_extra_msa, "train.train_step": t.train_step,
                            "train.warmup_steps": t.warmup_steps, "train.eval_step": t.eval_step,
                            "train.save_step": t.save_step}.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        for name, value in {"data.profile_dropout": d.profile_dropout,
                            "data.masked_msa_fraction": d.masked_msa_fraction,
                            "loss.fape_clamp_fraction": self.loss.fape_clamp_fraction}.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        for section in ("evoformer", "extra_msa"):
            position = getattr(m, section).outer_product_mean_position
            if position not in ("middle", "end", "first"):
                raise ConfigError(f"model.{section}.outer_product_mean_position must be middle, end or first, "
                                  f"got {position!r}")
        if m.structure_module.initial_frames not in ("identity", "extended", "helix"):
            raise ConfigError("model.structure_module.initial_frames must be identity, extended or helix, got "
                              f"{m.structure_module.initial_frames!r}")
        if t.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16, got {t.precision!r}")
        if t.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ConfigError(f"train.lr_decay_style must be constant, linear or cosine, got {t.lr_decay_style!r}")
        if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
            raise ConfigError(f"train.lr must be > 0 and train.min_lr in [0, lr], got lr {t.lr}, min_lr {t.min_lr}")
        if m.heads.distogram_bins < 2 or m.heads.plddt_bins < 2 or m.recycle_num_bins < 2:
            raise ConfigError("distogram, pLDDT and recycling bin counts must be >= 2")

    # ------------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "FoldingConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise (a config from a newer version must not load silently)."""
        return _from_dict(cls, values, "")

    def copy(self) -> "FoldingConfig":
        return copy.deepcopy(self)

    # ------------------------------------------------------------------------------------------ overrides
    def override(self, path: str, value: Any) -> None:
        """Set one field by its dotted path (``'model.evoformer.num_blocks'``); strings are converted to the
        field's type, so the command line can pass ``key=value`` text. Re-validates."""
        parts = path.split(".")
        target: Any = self
        for i, part in enumerate(parts[:-1]):
            if not dataclasses.is_dataclass(target) or part not in _field_names(target):
                raise ConfigError(f"unknown config section {'.'.join(parts[:i + 1])!r}; sections: "
                                  f"{', '.join(_sections(self))}")
            target = getattr(target, part)
        name = parts[-1]
        if not dataclasses.is_dataclass(target) or name not in _field_names(target):
            known = ", ".join(sorted(_field_names(target))) if dataclasses.is_dataclass(target) else ""
            raise ConfigError(f"unknown config field {path!r}" + (f"; fields here: {known}" if known else ""))
        hint = get_type_hints(type(target))[name]
        if dataclasses.is_dataclass(getattr(target, name)):
            raise ConfigError(f"{path!r} is a section; set one of its fields, e.g. {path}."
                              f"{next(iter(_field_names(getattr(target, name))))}=...")
        setattr(target, name, _convert(value, hint, path))
        self.validate()

    def apply_overrides(self, assignments) -> None:
        """Apply ``['a.b=1', 'c.d=x', ...]`` in order."""
        for item in assignments or ():
            if "=" not in item:
                raise ConfigError(f"config override {item!r} is not of the form section.field=value")
            key, value = item.split("=", 1)
            self.override(key.strip(), value.strip())

    # ------------------------------------------------------------------------------------------ comparison
    def architecture(self) -> dict:
        """The fields that decide the parameters' names and shapes (what a checkpoint must agree on)."""
        m = self.to_dict()["model"]
        for key in ("max_recycling_iters", "fused_kernels"):
            m.pop(key)
        for section in ("evoformer", "extra_msa"):
            for key in ("msa_dropout", "pair_dropout", "recompute"):
                m[section].pop(key)
        m["structure_module"].pop("dropout")
        return m


def architecture_differences(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    """``['model.c_m: checkpoint 32, this run 256', ...]`` for two :meth:`FoldingConfig.architecture` dicts."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(architecture_differences(a, b, f"{prefix}.{key}"))
        elif a != b:
            diffs.append(f"{prefix}.{key}: checkpoint {a}, this run {b}")
    return diffs


def _field_names(obj) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _sections(cfg: FoldingConfig) -> list[str]:
    out = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out.append(prefix + f.name)
                walk(value, prefix + f.name + ".")
    walk(cfg, "")
    return out


def _convert(value: Any, hint: Any, path: str) -> Any:
    text = str(value)
    optional = "Optional" in str(hint) or "None" in str(hint)
    if optional and text.lower() in ("none", "null", ""):
        return None
    base = hint
    if optional:
        args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
        base = args[0] if args else str
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(text)
            return int(float(text)) if ("e" in text.lower() or "." in text) else int(text)
        if base is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"{path}: cannot read {text!r} as {getattr(base, '__name__', base)}") from None


def _from_dict(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix or '<root>'} must be a dict, got {type(values).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(sorted(prefix + k for k in unknown))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------

def initial_training() -> FoldingConfig:
    """AlphaFold2's monomer model and initial-training set-up (the dataclass defaults)."""
    return FoldingConfig(preset="initial_training")


def finetuning() -> FoldingConfig:
    """AlphaFold2's fine-tuning crops and learning rate on the same model (supplement Table 4)."""
    cfg = FoldingConfig(preset="finetuning")
    cfg.data.crop_size = 384
    cfg.data.max_msa_clusters = 512
    cfg.data.max_extra_msa = 5120
    cfg.train.lr = 5e-4
    cfg.validate()
    return cfg


def tiny() -> FoldingConfig:
    """Trains on one CPU core in about 9 minutes (``bash scripts/train_folding.sh``) and ends above the ideal helix
    and the extended strand on the 40 held-out chains (mean lDDT-Calpha 0.31 against 0.26 and 0.12).
    docs/folding_tiny.md has the measurements behind each choice; the departures from AlphaFold2's training set-up,
    each measured there by one run without it, are:

    - FAPE is clamped in every step (AF2: 90%). With AF2's 10% unclamped steps: 0.22.
    - No masked-MSA loss (AF2: weight 2). Most embedded chains have no MSA, so the masked query residue is in the
      profile and the task is nearly a copy; at weight 2 its gradient dominates the trunk's: 0.17.
    - The chain's profile is embedded into the query row (``model.use_profile``; not in AF2).
    - No recycling, crops of 48 residues and a cosine decay of the learning rate (speed on two CPU cores).
    The IPA has AF2's 12 heads and 8 value points.
    """
    cfg = FoldingConfig(preset="tiny")
    m = cfg.model
    m.c_m, m.c_z, m.c_s, m.c_e = 32, 32, 64, 16
    m.max_recycling_iters = 0
    m.use_profile = True
    e = m.evoformer
    e.num_blocks, e.c_hidden_msa_att, e.num_heads_msa = 2, 8, 4
    e.c_hidden_opm, e.c_hidden_mul, e.c_hidden_pair_att, e.num_heads_pair, e.transition_n = 8, 32, 8, 2, 2
    e.msa_dropout, e.pair_dropout = 0.0, 0.0
    x = m.extra_msa
    x.num_blocks = 0
    x.c_hidden_msa_att, x.num_heads_msa, x.c_hidden_opm, x.c_hidden_mul = 4, 2, 8, 16
    x.c_hidden_pair_att, x.num_heads_pair, x.transition_n = 8, 2, 2
    x.msa_dropout, x.pair_dropout = 0.0, 0.0
    s = m.structure_module
    s.num_layers, s.c_ipa, s.num_heads_ipa, s.num_qk_points, s.num_v_points = 4, 16, 12, 4, 8
    s.dropout = 0.0
    m.heads.c_hidden_plddt = 32
    d = cfg.data
    d.crop_size, d.max_msa_clusters, d.max_extra_msa = 48, 8, 0
    d.profile_dropout = 0.2
    lo = cfg.loss
    lo.fape_clamp_fraction = 1.0
    lo.masked_msa_weight = 0.0
    t = cfg.train
    t.train_step, t.batch_size, t.lr, t.warmup_steps, t.grad_clip = 3000, 2, 1e-3, 50, 1.0
    t.lr_decay_style, t.min_lr = "cosine", 1e-4
    t.log_step, t.eval_step, t.save_step = 10, 1000, 500
    cfg.validate()
    return cfg


PRESETS = {"tiny": tiny, "initial_training": initial_training, "finetuning": finetuning}


def preset(name: str) -> FoldingConfig:
    """A fresh config of the named preset (``tiny``, ``initial_training``, ``finetuning``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown config preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
