"""A dtype cast of a module holding ``FrozenLinear`` layers (``.to(bf16)``, DeepSpeed's bf16 engine)
keeps the quantized weights' scales at the precision they were quantized with."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from offsite_kernels import quantize_weight
from offsite_kernels.nn import FrozenLinear
from offsite_kernels.quant.formats import QuantizationError


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


@pytest.mark.parametrize(("saved", "built"), [(8, "fp8"), ("fp8", 8), (None, 8), (4, 4)])
def test_a_state_dict_of_another_format_is_refused(saved, built):
    """int8 and fp8 store [N, K] codes and [N] scales: without a check, loading one into the other converts the
    codes as numbers (a wrong layer, all keys matched)."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 24)
    source = FrozenLinear.from_linear(linear, bits=saved, group_size=32)
    target = FrozenLinear.from_linear(nn.Linear(64, 24), bits=built, group_size=64 if saved == built else 32)
    state = source.state_dict()
    if saved == built:  # int4 in groups of 32 into groups of 64: shapes differ, torch names them
        with pytest.raises(RuntimeError, match="size mismatch for weight_scales"):
            target.load_state_dict(state)
        return
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for assign in (False, True):
        with pytest.raises(RuntimeError, match=r"weight_data: this FrozenLinear holds a \w+ weight, whose data is"):
            target.load_state_dict(state, strict=False, assign=assign)
        after = target.state_dict()  # nothing of the refused state dict was copied in
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    same = FrozenLinear.from_linear(nn.Linear(64, 24), bits=saved, group_size=32)
    same.load_state_dict(state)
    x = torch.randn(3, 64)
    torch.testing.assert_close(same(x), source(x), rtol=0, atol=0)


def test_a_hand_built_weight_with_wrong_dtypes_is_refused():
    qw = quantize_weight(nn.Linear(64, 8).weight.detach(), bits=8)
    bad = dataclasses.replace(qw, scales=qw.scales.half())
    with pytest.raises(QuantizationError, match=r"the scales of a int8 weight of shape \[8, 64\] must be \[8\] torch.float32"):
        FrozenLinear(bad)
