"""``FrozenExperts``: the expert MLPs of a mixture of experts, frozen, dense or low-bit, each expert's activation fused."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.formats import quantize_weight
from .frozen_linear import FrozenLinear
from .mlp import _gated_activation


class FrozenExperts(nn.Module):
    """Gated expert MLPs ``down_e(act(gate_e(x)) * up_e(x))`` with frozen weights, called as Hugging Face's fused
    experts module is (Mixtral, Qwen MoE, OLMoE): ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``
    returns ``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden[t])`` for each token ``t``.

    Dense weights are buffers under Hugging Face's names (``gate_up_proj`` ``[E, 2I, H]``, gate first, and
    ``down_proj`` ``[E, H, I]``), so the block's state dict does not change. Low-bit weights are one
    :class:`FrozenLinear` per expert and projection (``gate_up_experts.<e>``, ``down_experts.<e>``). Per expert, the
    activation and the product are one fused op that saves only the projection's output (as
    :class:`FrozenFusedGatedMLP`); the frozen projections save no input. Tokens are grouped by expert with one host
    synchronisation per call (the count of tokens per expert, as Hugging Face's eager loop has; its grouped-GEMM
    path has none), then the experts run one after another; an index equal to the number of experts means no expert.
    """

    def __init__(
        self,
        gate_up: torch.Tensor | Sequence[nn.Module],
        down: torch.Tensor | Sequence[nn.Module],
        activation: str = "silu",
    ) -> None:
        super().__init__()
        if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
            shapes = [tuple(gate_up.shape[1:])] * len(gate_up), [tuple(down.shape[1:])] * len(down)
            if gate_up.dim() != 3 or down.dim() != 3:
                raise ValueError(
                    f"expert weights must be 3-D [experts, out, in], got {tuple(gate_up.shape)} and {tuple(down.shape)}"
                )
            self.register_buffer("gate_up_proj", gate_up.detach())
            self.register_buffer("down_proj", down.detach())
            self.low_bit = False
        elif not isinstance(gate_up, torch.Tensor) and not isinstance(down, torch.Tensor):
            shapes = [(m.out_features, m.in_features) for m in gate_up], [(m.out_features, m.in_features) for m in down]
            self.gate_up_experts, self.down_experts = nn.ModuleList(gate_up), nn.ModuleList(down)
            self.low_bit = True
        else:
            raise TypeError("gate_up and down must both be 3-D tensors (dense) or both lists of per-expert modules (low-bit)")
        (gate_up_shapes, down_shapes) = shapes
        if (
            len(gate_up_shapes) != len(down_shapes)
            or len(set(gate_up_shapes)) > 1
            or len(set(down_shapes)) > 1
            or not gate_up_shapes
            or gate_up_shapes[0][0] % 2
            or down_shapes[0] != (gate_up_shapes[0][1], gate_up_shapes[0][0] // 2)
        ):
            raise ValueError(
                f"expert projections {sorted(set(gate_up_shapes))} (gate_up) and {sorted(set(down_shapes))} (down) for "
                f"{len(gate_up_shapes)} and {len(down_shapes)} experts do not fit together: expected E of [2I, H] and "
                "E of [H, I]"
            )
        self.num_experts = len(gate_up_shapes)
        self.hidden_size, self.inner_size = gate_up_shapes[0][1], gate_up_shapes[0][0] // 2
        self.act = _gated_activation(activation)

    @classmethod
    def from_module(
        cls, experts: nn.Module, activation: str, bits: int | str | None = None, group_size: int = 128
    ) -> FrozenExperts:
        """From a Hugging Face fused experts module (``gate_up_proj``, ``down_proj``: 3-D, no biases) or a dense
        :class:`FrozenExperts`; ``bits`` 8, 4 or "fp8" stores each expert's projections low-bit."""
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            raise ValueError(f"{type(experts).__name__} has biases or transposed weights, which FrozenExperts does not hold")
        if getattr(experts, "low_bit", False):
            raise ValueError("these experts are low-bit already")
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if bits is None:
            return cls(gate_up, down, activation)
        return cls(
            [FrozenLinear(quantize_weight(w, bits=bits, group_size=group_size)) for w in gate_up],
            [FrozenLinear(quantize_weight(w, bits=bits, group_size=group_size)) for w in down],
            activation,
        )

    @classmethod
    def low_bit_skeleton(cls, experts: nn.Module, activation: str) -> FrozenExperts:
        """Low-bit experts shaped as ``experts`` with placeholder projections on the meta device, each to be replaced
        by its stored :class:`FrozenLinear` (an emulator package being loaded)."""
        n, two_inner, hidden = experts.gate_up_proj.shape

        def placeholder(out_features: int, in_features: int) -> nn.Module:
            return nn.Linear(in_features, out_features, bias=False, device="meta")

        return cls(
            [placeholder(two_inner, hidden) for _ in range(n)],
            [placeholder(hidden, two_inner // 2) for _ in range(n)],
            activation,
        )

    def _project(self, which: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        if self.low_bit:
            return getattr(self, f"{which}_experts")[expert](x)
        return F.linear(x, getattr(self, f"{which}_proj")[expert])

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
            inner = self.act.gated_packed(self._project("gate_up", expert, hidden_states[tokens]))
            expert_out = self._project("down", expert, inner) * weights[:, None]
            out.index_add_(0, tokens, expert_out.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        storage = "low-bit" if self.low_bit else "dense"
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, inner={self.inner_size}, "
            f"activation={self.act.name!r}, {storage}"
        )
