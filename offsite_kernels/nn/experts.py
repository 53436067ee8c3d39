"""``FrozenExperts``: the expert MLPs of a mixture of experts, frozen, with each expert's activation fused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import _gated_activation


class FrozenExperts(nn.Module):
    """Gated expert MLPs ``down_e(act(gate_e(x)) * up_e(x))`` with frozen weights, called as Hugging Face's fused
    experts module is (Mixtral, Qwen MoE, OLMoE): ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``
    returns ``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden[t])`` for each token ``t``.

    The weights are buffers under Hugging Face's names (``gate_up_proj`` ``[E, 2I, H]``, gate first, and
    ``down_proj`` ``[E, H, I]``), so the block's state dict does not change. Per expert, the activation and the
    product are one fused op that saves only the projection's output (as :class:`FrozenFusedGatedMLP`); the frozen
    projections save no input. Tokens are grouped by expert with one host synchronisation per call (the count of
    tokens per expert), as Hugging Face's own loop does; an index equal to the number of experts means no expert.
    """

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activation: str = "silu") -> None:
        super().__init__()
        if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
            raise ValueError(
                f"expert weights must be 3-D [experts, out, in], got {tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
            )
        experts, two_inner, hidden = gate_up_proj.shape
        if two_inner % 2 or tuple(down_proj.shape) != (experts, hidden, two_inner // 2):
            raise ValueError(
                f"gate_up_proj {tuple(gate_up_proj.shape)} and down_proj {tuple(down_proj.shape)} do not fit together: "
                "expected [E, 2I, H] and [E, H, I]"
            )
        self.num_experts = experts
        self.register_buffer("gate_up_proj", gate_up_proj.detach())
        self.register_buffer("down_proj", down_proj.detach())
        self.act = _gated_activation(activation)

    @classmethod
    def from_module(cls, experts: nn.Module, activation: str) -> FrozenExperts:
        """From a Hugging Face fused experts module (``gate_up_proj``, ``down_proj``: 3-D, no biases)."""
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            raise ValueError(f"{type(experts).__name__} has biases or transposed weights, which FrozenExperts does not hold")
        return cls(experts.gate_up_proj, experts.down_proj, activation)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[-1]
        with torch.no_grad():
            chosen = top_k_index.reshape(-1)
            order = torch.argsort(chosen, stable=True)  # (token, slot) pairs grouped by expert, in token order
            counts = torch.bincount(chosen, minlength=self.num_experts)[: self.num_experts].tolist()
            tokens_in_order = order // k
        weights_in_order = top_k_weights.reshape(-1)[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens, weights = tokens_in_order[start : start + count], weights_in_order[start : start + count]
            start += count
            inner = self.act.gated_packed(F.linear(hidden_states[tokens], self.gate_up_proj[expert]))
            expert_out = F.linear(inner, self.down_proj[expert]) * weights[:, None]
            out.index_add_(0, tokens, expert_out.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        experts, two_inner, hidden = self.gate_up_proj.shape
        return f"experts={experts}, hidden={hidden}, inner={two_inner // 2}, activation={self.act.name!r}"
