"""Ops: one file per op family (Triton kernels, launchers, torch reference, autograd, custom op)."""

from .activation import ActivationInputError, activation_by_name, bias_gelu, bias_relu, bias_silu, geglu, swiglu
from .frozen_linear import FrozenLinearInputError, frozen_linear, frozen_linear_torch
from .fused_head import FusedHeadInputError, fused_linear_cross_entropy, linear_cross_entropy_torch
from .grouped_linear import grouped_frozen_linear
from .norm import NormInputError, layer_norm, layer_norm_torch, rms_norm, rms_norm_torch

__all__ = [
    "ActivationInputError",
    "FrozenLinearInputError",
    "FusedHeadInputError",
    "NormInputError",
    "activation_by_name",
    "bias_gelu",
    "bias_relu",
    "bias_silu",
    "frozen_linear",
    "frozen_linear_torch",
    "fused_linear_cross_entropy",
    "geglu",
    "grouped_frozen_linear",
    "layer_norm",
    "layer_norm_torch",
    "linear_cross_entropy_torch",
    "rms_norm",
    "rms_norm_torch",
    "swiglu",
]
