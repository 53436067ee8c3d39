"""Frozen MLP pieces built from the fused activation ops."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.activation import FusedActivation, activation_by_name


class FrozenActivation(nn.Module):
    """``act(x)`` for a Hugging Face activation name through the fused op (saves only ``x``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.act: FusedActivation = activation_by_name(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)

    def extra_repr(self) -> str:
        return f"{self.act.name!r} ({self.act.kind})"


def _gated_activation(activation: str) -> FusedActivation:
    """The fused activation of a gated MLP: one with a fused gated kernel."""
    act = activation_by_name(activation)
    if not act.has_gated:
        raise ValueError(
            f"no fused gated kernel for activation {activation!r}; the SiLU (SwiGLU) and GELU (GeGLU) forms have one"
        )
    return act


class FrozenGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the gate's activation and the product fused (SwiGLU, GeGLU).

    The three projections are kept as given (``nn.Linear`` or ``FrozenLinear``), under the
    names Hugging Face uses, so the state dict of the block does not change.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, activation: str = "silu") -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act = _gated_activation(activation)

    @classmethod
    def from_module(cls, mlp: nn.Module, activation: str) -> FrozenGatedMLP:
        """From a Hugging Face gated MLP (``gate_proj``, ``up_proj``, ``down_proj``: Llama, Mistral, Qwen, Gemma)."""
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act.gated(self.gate_proj(x), self.up_proj(x)))


class FrozenFusedGatedMLP(nn.Module):
    """``down(act(gate) * up)`` where one projection gives ``[gate, up]`` side by side (Phi-3's ``gate_up_proj``);
    the activation and the product fused as in :class:`FrozenGatedMLP`, reading the two halves in place, and the
    backward writing the projection's output gradient as one tensor (no concatenation of two halves)."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, activation: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.act = _gated_activation(activation)

    @classmethod
    def from_module(cls, mlp: nn.Module, activation: str) -> FrozenFusedGatedMLP:
        """From a Hugging Face MLP with ``gate_up_proj`` (gate first) and ``down_proj`` (Phi-3)."""
        return cls(mlp.gate_up_proj, mlp.down_proj, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act.gated_packed(self.gate_up_proj(x)))
