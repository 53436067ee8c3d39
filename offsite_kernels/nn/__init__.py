"""Frozen building blocks for trainers: modules built from the library's ops."""

from .alibi_attention import AlibiSdpaAttention
from .compiled_blocks import COMPILE_MODES, CompileError, apply_compile, compile_mode, remove_compile
from .cuda_graphs import GraphError, apply_cuda_graphs, cuda_graphs_enabled, remove_cuda_graphs, reset_cuda_graphs
from .experts import FrozenExperts
from .frozen_linear import FrozenLinear
from .mlp import FrozenActivation, FrozenFusedGatedMLP, FrozenGatedMLP
from .norm import FrozenLayerNorm, FrozenRMSNorm
from .recompute import RECOMPUTE_MODES, RecomputeError, apply_recompute, recompute_mode, remove_recompute

__all__ = [
    "COMPILE_MODES",
    "RECOMPUTE_MODES",
    "AlibiSdpaAttention",
    "CompileError",
    "FrozenActivation",
    "FrozenExperts",
    "FrozenFusedGatedMLP",
    "FrozenGatedMLP",
    "FrozenLayerNorm",
    "FrozenLinear",
    "FrozenRMSNorm",
    "GraphError",
    "RecomputeError",
    "apply_compile",
    "apply_cuda_graphs",
    "apply_recompute",
    "compile_mode",
    "cuda_graphs_enabled",
    "recompute_mode",
    "remove_compile",
    "remove_cuda_graphs",
    "remove_recompute",
    "reset_cuda_graphs",
]
