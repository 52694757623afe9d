"""The AlphaFold2-style folding model: config presets, embedders, Evoformer, structure module, heads, losses.

``from megatron_protein.models.folding import AlphaFold, preset`` -- ``AlphaFold`` is imported on first use so that
importing a submodule (the Evoformer's, say) does not build the whole model's import graph.
"""
from megatron_protein.models.folding.config import PRESETS, ConfigError, FoldingConfig, preset

__all__ = ["AlphaFold", "FoldingConfig", "ConfigError", "PRESETS", "preset", "alphafold_loss"]


def __getattr__(name):
    if name == "AlphaFold":
        from megatron_protein.models.folding.model import AlphaFold
        return AlphaFold
    if name == "alphafold_loss":
        from megatron_protein.models.folding.losses import alphafold_loss
        return alphafold_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
