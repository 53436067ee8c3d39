"""Frozen building blocks for trainers: modules built from the library's ops."""

from .alibi_attention import AlibiSdpaAttention
from .frozen_linear import FrozenLinear
from .mlp import FrozenActivation, FrozenGatedMLP
from .norm import FrozenLayerNorm, FrozenRMSNorm
from .recompute import RECOMPUTE_MODES, RecomputeError, apply_recompute, recompute_mode, remove_recompute

__all__ = [
    "RECOMPUTE_MODES",
    "AlibiSdpaAttention",
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
