"""Frozen building blocks for trainers: modules built from the library's ops."""

from .frozen_linear import FrozenLinear

__all__ = ["FrozenLinear"]
