"""Frozen building blocks for trainers: modules built from the library's ops."""

from .frozen_linear import FrozenLinear
from .mlp import FrozenActivation, FrozenGatedMLP
from .norm import FrozenLayerNorm, FrozenRMSNorm
from .recompute import RECOMPUTE_MODES, RecomputeError, apply_recompute, recompute_mode, remove_recompute

__all__ = [
    "RECOMPUTE_MODES",
    "FrozenActivation",
    "FrozenGatedMLP",
    "FrozenLayerNorm",
    "FrozenLinear",
    "FrozenRMSNorm",
    "RecomputeError",
    "apply_recompute",
    "recompute_mode",
    "remove_recompute",
]
