"""``FrozenLinear``: a linear layer whose weight is frozen and stored in a low-bit format."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.frozen_linear import FrozenLinearInputError, frozen_linear_from_fields
from ..quant.formats import check_stored, quantize_weight, stored_layout
from ..quant.weight import COMPUTE_DTYPES, QuantizedWeight


def _linear_weight(layer: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a Hugging Face ``Conv1D`` (stored ``[in, out]``)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return layer.weight.detach().t()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


class FrozenLinear(nn.Module):
    """A frozen linear layer: weight in dense/int8/int4/fp8 storage, gradient for the input only.

    The stored tensors are buffers, not parameters: they move with ``.to()``, are saved in the
    state dict, and never collect a ``.grad``. A dtype cast of the module (``.to(torch.bfloat16)``,
    ``.half()``, DeepSpeed's bf16 engine) casts a dense weight and the bias, never a quantized weight:
    its data (fp8 is a floating-point type) and scales stay as they were quantized.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dtype not in COMPUTE_DTYPES:
            raise FrozenLinearInputError(
                f"a frozen linear runs in float32, float16 or bfloat16, and this weight is {weight.dtype}: "
                "cast the layer or the model first (.float() or .to(torch.bfloat16))"
            )
        check_stored(weight)  # a hand-built weight with the wrong dtypes would reach the kernels
        self.format = weight.format
        self.group_size = weight.group_size
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.weight_dtype = weight.dtype
        self.register_buffer("weight_data", weight.data.detach())
        self.register_buffer("weight_scales", None if weight.scales is None else weight.scales.detach())
        self.register_buffer("weight_zeros", None if weight.zeros is None else weight.zeros.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())

    def _apply(self, fn, recurse: bool = True):  # nn.Module._apply, then the quantized tensors' dtypes back
        kept = {"weight_scales": self.weight_scales}
        if self.format != "dense":  # fp8 data is a floating-point tensor that a cast would convert
            kept["weight_data"] = self.weight_data
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if before is not None and after is not None and after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))  # the values as quantized, not re-rounded
        if self.format == "dense":
            self.weight_dtype = self.weight_data.dtype  # a dense weight is what the cast made it
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """As ``nn.Module``'s, refusing stored tensors of another format: ``copy_`` would convert int8 codes into fp8
        values (or floats into int8 codes) of the same shape without a word."""
        layout = stored_layout(self.format, (self.out_features, self.in_features), self.group_size)
        refused = []
        for field, (_, dtype) in layout.items():
            given = state_dict.get(f"{prefix}weight_{field}")
            if not isinstance(given, torch.Tensor):
                continue
            if (given.dtype != dtype) if dtype is not None else not given.is_floating_point():
                refused.append(
                    f"{prefix}weight_{field}: this FrozenLinear holds a {self.format} weight, whose {field} is "
                    f"{dtype or 'floating point'}, but the state dict's is {given.dtype} (a weight of another format); "
                    "build the layer with the format the state dict was saved with (FrozenLinear.from_linear(..., bits=))"
                )
        if refused:  # nothing of this layer is loaded (torch copies the other tensors before it raises)
            error_msgs.extend(refused)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int | str | None = 4, group_size: int = 128) -> FrozenLinear:
        """Quantize an ``nn.Linear`` (or HF ``Conv1D``): ``bits`` 8, 4, "fp8" or None (dense)."""
        bias = getattr(linear, "bias", None)
        return cls(
            quantize_weight(_linear_weight(linear), bits=bits, group_size=group_size), None if bias is None else bias.detach()
        )

    @property
    def weight(self) -> QuantizedWeight:
        """The stored weight as a :class:`QuantizedWeight`."""
        return QuantizedWeight(
            self.format,
            self.weight_data,
            self.weight_scales,
            self.weight_zeros,
            self.group_size,
            (self.out_features, self.in_features),
            self.weight_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the stored tensors as they are: no QuantizedWeight built per call
        stored = (self.weight_data, self.weight_scales, self.weight_zeros)
        shape = (self.out_features, self.in_features)
        return frozen_linear_from_fields(x, shape, self.format, stored, self.group_size, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.format == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{group}, bias={self.bias is not None}"
