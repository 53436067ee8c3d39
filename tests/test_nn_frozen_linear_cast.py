"""A dtype cast of a module holding ``FrozenLinear`` layers (``.to(bf16)``, DeepSpeed's bf16 engine)
keeps the quantized weights' scales at the precision they were quantized with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from offsite_kernels.nn import FrozenLinear


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
def test_cast_keeps_the_scales(bits, cast):
    torch.manual_seed(0)
    linear = nn.Linear(96, 37)
    model = nn.Sequential(FrozenLinear.from_linear(linear, bits=bits, group_size=32))
    layer = model[0]
    scales = layer.weight_scales.clone()
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    x = torch.randn(5, 96, dtype=dtype)
    before = layer(x).double()

    model.to(dtype) if cast == "to" else getattr(model, cast)()

    assert layer.weight_scales.dtype == scales.dtype and torch.equal(layer.weight_scales, scales)
    assert layer.bias.dtype == dtype  # the bias follows the cast
    after = layer(x).double()
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)  # only the bias' rounding differs
    assert torch.equal(layer.weight_data, FrozenLinear.from_linear(linear, bits=bits, group_size=32).weight_data)


def test_device_moves_still_move_the_scales():
    layer = FrozenLinear.from_linear(nn.Linear(64, 16), bits=4, group_size=32)
    moved = layer.to("meta")
    assert moved.weight_scales.device.type == "meta" and moved.weight_scales.dtype == torch.float32


def test_a_cast_dense_layer_reports_the_dtype_it_now_holds():
    layer = FrozenLinear.from_linear(nn.Linear(64, 16), bits=None)
    layer.to(torch.bfloat16)
    assert layer.weight_dtype == torch.bfloat16 and layer.weight.dequantize().dtype == torch.bfloat16
    quantized = FrozenLinear.from_linear(nn.Linear(64, 16), bits=8).to(torch.bfloat16)
    assert quantized.weight_dtype == torch.float32  # a quantized weight keeps the dtype it was quantized from
