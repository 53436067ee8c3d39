"""Frozen building blocks for trainers: modules built from the library's ops."""

from .alibi_attention import AlibiSdpaAttention
from .cuda_graphs import GraphError, apply_cuda_graphs, cuda_graphs_enabled, remove_cuda_graphs, reset_cuda_graphs
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
    "GraphError",
    "RecomputeError",
    "apply_cuda_graphs",
    "apply_recompute",
    "cuda_graphs_enabled",
    "recompute_mode",
    "remove_cuda_graphs",
    "remove_recompute",
    "reset_cuda_graphs",
]
