"""Weight formats: packing and dequantization bit-exact, quantization quality in dB, bad input."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import offsite_kernels as ok
from offsite_kernels.ops.frozen_linear import FrozenLinearInputError
from offsite_kernels.quant import QuantizationError, pack_int4, snr_db, unpack_int4


def gaussian(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_int4_nibble_layout_is_low_first():
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 3, 12]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x0F], [0x87, 0xC3]]


def test_pack_unpack_round_trip_is_exact():
    q = torch.randint(0, 16, (29, 66), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def elementwise_int4_reference(qw):
    """An independent, element-by-element dequantization of packed int4 (float32 arithmetic)."""
    n, k = qw.shape
    out = torch.empty(n, k, dtype=torch.float32)
    data, scales, zeros = qw.data.tolist(), qw.scales, qw.zeros
    for i in range(n):
        for j in range(k):
            byte = data[i][j // 2]
            q = (byte >> 4) if j % 2 else (byte & 0xF)
            g = j // qw.group_size
            out[i, j] = (torch.tensor(float(q)) - zeros[i, g].float()) * scales[i, g]
    return out


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_dequantization_is_bit_exact_with_odd_k(group_size):
    w = gaussian(5, 2 * group_size + 7, seed=group_size)  # K not a multiple of the group or of 2
    qw = ok.quantize_weight(w, bits=4, group_size=group_size)
    assert qw.data.dtype == torch.uint8 and qw.data.shape == (5, 3 * group_size // 2)
    assert qw.scales.shape == qw.zeros.shape == (5, 3)
    assert int(qw.zeros.max()) <= 15
    assert torch.equal(qw.dequantize(), elementwise_int4_reference(qw))


@pytest.mark.parametrize("bits", [8, "fp8"])
def test_per_channel_dequantization_is_bit_exact(bits):
    w = gaussian(7, 45, seed=2)
    qw = ok.quantize_weight(w, bits=bits)
    expected = torch.stack([qw.data[i].float() * qw.scales[i] for i in range(7)])
    assert torch.equal(qw.dequantize(), expected)
    if bits == 8:
        assert qw.data.dtype == torch.int8 and int(qw.data.abs().max()) == 127
        # the largest entry of each row maps to +-127 exactly
        assert torch.equal(qw.data.abs().amax(dim=1), torch.full((7,), 127, dtype=torch.int8))
    else:
        assert qw.data.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize(
    "bits, group_size, floor_db",
    [(8, 128, 40.0), (4, 32, 21.0), (4, 64, 20.0), (4, 128, 19.0), ("fp8", 128, 30.0)],
)
def test_quantization_snr_floor(bits, group_size, floor_db):
    w = gaussian(256, 1000, seed=3)
    qw = ok.quantize_weight(w, bits=bits, group_size=group_size)
    measured = snr_db(w, qw.dequantize())
    assert measured >= floor_db, f"{bits}/{group_size}: {measured:.2f} dB below the {floor_db} dB floor"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_returns_original_shape_and_dtype(dtype):
    w = gaussian(9, 70, seed=4).to(dtype)
    for bits in (8, 4, "fp8", None):
        d = ok.quantize_weight(w, bits=bits, group_size=32).dequantize()
        assert d.shape == w.shape and d.dtype == dtype


def test_storage_size_per_format():
    w = gaussian(64, 256, seed=5)
    sizes = {b: ok.quantize_weight(w, bits=b, group_size=128).nbytes() for b in (None, 8, 4)}
    assert sizes[None] == 64 * 256 * 4
    assert sizes[8] == 64 * 256 + 64 * 4
    assert sizes[4] == 64 * 128 + 64 * 2 * (4 + 1)


def test_fields_survive_safetensors_and_device_moves(tmp_path):
    qw = ok.quantize_weight(gaussian(11, 100, seed=6), bits=4, group_size=32)
    save_file(qw.tensors(), str(tmp_path / "w.safetensors"))
    back = load_file(str(tmp_path / "w.safetensors"))
    assert back.keys() == qw.tensors().keys()
    assert all(torch.equal(back[k], v) for k, v in qw.tensors().items())
    on_meta = qw.to("meta")
    assert on_meta.device.type == "meta" and on_meta.format == "int4" and on_meta.shape == qw.shape


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=3), "unsupported bits=3"),
        (dict(bits=4, group_size=48), "group_size must be one of"),
        (dict(bits=True), "unsupported bits"),
    ],
)
def test_bad_format_requests(kwargs, message):
    with pytest.raises(QuantizationError, match=message):
        ok.quantize_weight(gaussian(4, 64, seed=7), **kwargs)


def test_bad_weights():
    with pytest.raises(QuantizationError, match="2-D"):
        ok.quantize_weight(torch.randn(8), bits=8)
    with pytest.raises(QuantizationError, match="floating-point"):
        ok.quantize_weight(torch.ones(4, 4, dtype=torch.int32), bits=8)
    w = gaussian(4, 64, seed=8)
    w[1, 3] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        ok.quantize_weight(w, bits=4, group_size=32)
    for bits in (8, 4, "fp8", None):
        for shape in ((4, 0), (0, 8)):
            with pytest.raises(QuantizationError, match=r"the weight is empty \(shape"):
                ok.quantize_weight(torch.zeros(shape), bits=bits, group_size=32)


@pytest.mark.parametrize("bits", [8, 4, "fp8", None])
def test_float64_weights_quantize_by_the_reference_but_no_frozen_linear_takes_them(bits):
    from offsite_kernels.quant.formats import dequantize_fields, quantize_fp8, quantize_int4, quantize_int8

    w = gaussian(6, 40, seed=9).double()
    qw = ok.quantize_weight(w, bits=bits, group_size=32)  # the same on every backend: float64 runs the reference
    reference = {8: quantize_int8, 4: lambda t: quantize_int4(t, 32), "fp8": quantize_fp8, None: lambda t: None}[bits](w)
    if reference is not None:
        assert all(torch.equal(a, b) for a, b in zip(qw.tensors().values(), reference.tensors().values(), strict=True))
    fields = (qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, qw.shape, qw.dtype)
    assert qw.dtype == torch.float64 and torch.equal(qw.dequantize(), dequantize_fields(*fields))
    with pytest.raises(FrozenLinearInputError, match=r"runs in float32, float16 or bfloat16, and this weight is torch\.float64"):
        ok.nn.FrozenLinear(qw)


def test_a_float64_model_is_refused_by_make_emulator_with_bits_and_named():
    from offsite_kernels.tiny import tiny_model

    with pytest.raises(ok.LayoutError, match=r"is torch.float64; .* cast the model first"):
        ok.make_emulator(tiny_model("llama", dtype=torch.float64), bottom=1, top=1, emulator_layers=2, bits=4, group_size=32)


def test_quantized_weight_moves_between_devices_but_refuses_a_dtype_cast():
    qw = ok.quantize_weight(gaussian(6, 64, seed=1), bits=4, group_size=32)
    moved = qw.to("meta")
    assert moved.data.device.type == "meta" and moved.scales.dtype == torch.float32 and moved.zeros.dtype == torch.uint8
    with pytest.raises(QuantizationError, match="would corrupt them"):
        qw.to(torch.bfloat16)


def test_frozen_linear_refuses_a_bias_that_is_not_a_float_tensor():
    qw = ok.quantize_weight(gaussian(6, 64, seed=1), bits=8)
    for bias in ([0.0] * 6, torch.zeros(6, dtype=torch.int32)):
        with pytest.raises(FrozenLinearInputError, match="bias must be a floating-point tensor"):
            ok.frozen_linear(torch.randn(2, 64), qw, bias)


def test_a_float8_weight_quantizes_from_its_values():
    w8 = gaussian(6, 64, seed=2).to(torch.float8_e4m3fn)
    qw = ok.quantize_weight(w8, bits=8)
    assert torch.equal(qw.data, ok.quantize_weight(w8.float(), bits=8).data)
    w8[2, 5] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        ok.quantize_weight(w8, bits=8)
