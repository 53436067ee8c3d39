"""Ops: one file per op family (Triton kernels, launchers, torch reference, autograd, custom op)."""

from .frozen_linear import FrozenLinearInputError, frozen_linear, frozen_linear_torch

__all__ = ["FrozenLinearInputError", "frozen_linear", "frozen_linear_torch"]
