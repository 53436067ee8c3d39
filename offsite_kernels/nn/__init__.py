"""Frozen building blocks for trainers: modules built from the library's ops."""

from .frozen_linear import FrozenLinear
from .norm import FrozenLayerNorm, FrozenRMSNorm

__all__ = ["FrozenLayerNorm", "FrozenLinear", "FrozenRMSNorm"]
