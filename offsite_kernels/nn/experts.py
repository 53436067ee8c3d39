"""``FrozenExperts``: the expert MLPs of a mixture of experts, frozen, dense or low-bit, run as two grouped GEMMs."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.grouped_linear import grouped_frozen_linear_from_fields
from ..quant.formats import quantize_weight
from ..quant.weight import QuantizedWeight
from .frozen_linear import FrozenLinear
from .mlp import _gated_activation


def _stacked_quantized(weights: torch.Tensor, bits: int | str, group_size: int) -> QuantizedWeight:
    """The experts' ``[E, N, K]`` weights as one ``[E * N, K]`` quantized weight, quantized expert by expert (the
    same values as quantizing the stacked matrix: scales and groups are per row; smaller temporaries)."""
    parts = [quantize_weight(w, bits=bits, group_size=group_size) for w in weights]
    first = parts[0]

    def cat(field: str) -> torch.Tensor | None:
        return None if getattr(first, field) is None else torch.cat([getattr(p, field) for p in parts])

    n, k = first.shape
    return QuantizedWeight(
        first.format, cat("data"), cat("scales"), cat("zeros"), first.group_size, (len(parts) * n, k), first.dtype
    )


class FrozenExperts(nn.Module):
    """Gated expert MLPs ``down_e(act(gate_e(x)) * up_e(x))`` with frozen weights, called as Hugging Face's fused
    experts module is (Mixtral, Qwen MoE, OLMoE): ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``
    returns ``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden[t])`` for each token ``t``; an index
    equal to the number of experts means no expert.

    Dense weights are buffers under Hugging Face's names (``gate_up_proj`` ``[E, 2I, H]``, gate first, and
    ``down_proj`` ``[E, H, I]``), so the block's state dict does not change. Low-bit weights are two
    :class:`FrozenLinear` of the experts' weights stacked (``gate_up_experts`` ``[E * 2I, H]``, ``down_experts``
    ``[E * H, I]``; per-row scales and groups make this each expert's own quantization).

    The (token, expert) pairs are sorted by expert on the device, and each projection is one grouped frozen linear
    over all experts (:func:`~offsite_kernels.ops.grouped_linear.grouped_frozen_linear`): on a GPU that runs Triton,
    with bf16/fp16 activations and no other backend forced, one Triton launch each way and no host synchronisation
    (CUDA graphs capture it); elsewhere expert by expert, reading the token counts on the host (a CUDA graph capture
    of that fails, and the library's graphs then run those blocks eagerly, with a warning). Between them, the gated
    activation is one fused op that saves only the projection's output (as :class:`FrozenFusedGatedMLP`); the
    projections save no input.
    """

    def __init__(self, gate_up: torch.Tensor | nn.Module, down: torch.Tensor | nn.Module, activation: str = "silu") -> None:
        super().__init__()
        if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
            if gate_up.dim() != 3 or down.dim() != 3:
                raise ValueError(
                    f"expert weights must be 3-D [experts, out, in], got {tuple(gate_up.shape)} and {tuple(down.shape)}"
                )
            (experts, two_inner, hidden), down_shape = gate_up.shape, tuple(down.shape[1:])
            experts = experts if down.shape[0] == experts else 0  # refused below
            self.register_buffer("gate_up_proj", gate_up.detach())
            self.register_buffer("down_proj", down.detach())
            self.low_bit = False
        elif isinstance(gate_up, nn.Module) and isinstance(down, nn.Module):
            hidden = gate_up.in_features
            experts = down.out_features // max(hidden, 1)
            two_inner = gate_up.out_features // max(experts, 1)
            down_shape = (down.out_features // max(experts, 1), down.in_features)
            if experts * hidden != down.out_features or experts * two_inner != gate_up.out_features:
                experts = 0  # refused below
            self.gate_up_experts, self.down_experts = gate_up, down
            self.low_bit = True
        else:
            raise TypeError(
                "gate_up and down must both be 3-D tensors (dense) or both stacked low-bit modules ([E * 2I, H], [E * H, I])"
            )
        if experts < 1 or two_inner % 2 or down_shape != (hidden, two_inner // 2):
            shapes = [
                tuple(getattr(t, "shape", (getattr(t, "out_features", "?"), getattr(t, "in_features", "?"))))
                for t in (gate_up, down)
            ]
            raise ValueError(
                f"expert projections of shapes {shapes[0]} (gate_up) and {shapes[1]} (down) do not fit together: expected "
                "[E, 2I, H] and [E, H, I] (dense), or [E * 2I, H] and [E * H, I] (low-bit, stacked)"
            )
        self.num_experts, self.hidden_size, self.inner_size = experts, hidden, two_inner // 2
        self.act = _gated_activation(activation)

    @classmethod
    def from_module(
        cls, experts: nn.Module, activation: str, bits: int | str | None = None, group_size: int = 128
    ) -> FrozenExperts:
        """From a Hugging Face fused experts module (``gate_up_proj``, ``down_proj``: 3-D, no biases) or a dense
        :class:`FrozenExperts`; ``bits`` 8, 4 or "fp8" stores the experts' projections low-bit."""
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            raise ValueError(f"{type(experts).__name__} has biases or transposed weights, which FrozenExperts does not hold")
        if getattr(experts, "low_bit", False):
            raise ValueError("these experts are low-bit already")
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if bits is None:
            return cls(gate_up, down, activation)
        return cls(
            FrozenLinear(_stacked_quantized(gate_up, bits, group_size)),
            FrozenLinear(_stacked_quantized(down, bits, group_size)),
            activation,
        )

    @classmethod
    def low_bit_skeleton(cls, experts: nn.Module, activation: str) -> FrozenExperts:
        """Low-bit experts shaped as ``experts`` with placeholder projections on the meta device, each to be replaced
        by its stored :class:`FrozenLinear` (an emulator package being loaded)."""
        n, two_inner, hidden = experts.gate_up_proj.shape
        return cls(
            nn.Linear(hidden, n * two_inner, bias=False, device="meta"),
            nn.Linear(two_inner // 2, n * hidden, bias=False, device="meta"),
            activation,
        )

    def _project(self, which: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``x``'s rows, sorted by expert at ``offsets``, through each expert's ``which`` projection."""
        if self.low_bit:
            m = getattr(self, f"{which}_experts")
            stored = (m.weight_data, m.weight_scales, m.weight_zeros)
            shape, fmt, group = (m.out_features, m.in_features), m.format, m.group_size
        else:
            w = getattr(self, f"{which}_proj")
            stored, shape, fmt, group = (
                (w.reshape(-1, w.shape[-1]), None, None),
                (w.shape[0] * w.shape[1], w.shape[2]),
                "dense",
                0,
            )
        return grouped_frozen_linear_from_fields(x, offsets, self.num_experts, shape, fmt, stored, group)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        k = top_k_index.shape[-1]
        with torch.no_grad():  # the routing, on the device: no count reaches the host
            chosen = top_k_index.reshape(-1).clamp(0, self.num_experts)
            order = torch.argsort(chosen, stable=True)  # (token, slot) pairs grouped by expert, in token order
            counts = torch.zeros(self.num_experts + 1, dtype=torch.int32, device=chosen.device)
            counts.scatter_add_(0, chosen, torch.ones_like(chosen, dtype=torch.int32))
            offsets = torch.cat([counts.new_zeros(1), counts[: self.num_experts].cumsum(0, dtype=torch.int32)])
            tokens = order // k
        inner = self.act.gated_packed(self._project("gate_up", hidden_states[tokens], offsets))
        expert_out = self._project("down", inner, offsets) * top_k_weights.reshape(-1)[order][:, None]
        return torch.zeros_like(hidden_states).index_add_(0, tokens, expert_out.to(hidden_states.dtype))

    def extra_repr(self) -> str:
        storage = "low-bit" if self.low_bit else "dense"
        return (
            f"experts={self.num_experts}, hidden={self.hidden_size}, inner={self.inner_size}, "
            f"activation={self.act.name!r}, {storage}"
        )
