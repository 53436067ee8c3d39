"""The native extension's CPU kernels (csrc/cpu/) against the PyTorch reference: quantize, pack, unpack and
dequantize bit-exact; the tiled frozen linear against float64; odd shapes, poisoned outputs, 1 and 2 threads,
bad input. Skipped where the extension is not built (test_native_build.py covers that case)."""

import importlib

import pytest
import torch
from conftest import forward_saving_only_weights, gen

import offsite_kernels as ok
from offsite_kernels import native
from offsite_kernels.quant import QuantizationError
from offsite_kernels.quant import formats as ref

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native extension: {native.unavailable_reason()}")

fl_ops = importlib.import_module("offsite_kernels.ops.frozen_linear")
SHAPES = [(1, 1), (5, 7), (37, 203), (64, 1000), (3, 20)]  # K below, across and not a multiple of every group size
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def C():
    return native.get()


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def weight(shape, dtype, seed, kind="gaussian"):
    g = gen(seed)
    if kind == "gaussian":
        w = torch.randn(*shape, generator=g)
    elif kind == "ties":  # many values exactly half-way between two quantization steps
        w = torch.randint(-40, 41, shape, generator=g).float() / 2
    elif kind == "constant_rows":  # zero range: the scale clamps to the smallest normal float
        w = torch.randn(shape[0], 1, generator=g).expand(shape).contiguous()
    elif kind == "wide":  # magnitudes from 1e-30 to 1e30 (1e-4 to 1e4 in float16)
        e = 4 if dtype == torch.float16 else 30
        w = torch.randn(*shape, generator=g) * torch.logspace(-e, e, shape[1])
    else:
        raise ValueError(kind)
    return w.to(dtype)


def rel_error(actual, reference):
    assert not torch.isnan(actual).any(), "NaN in output (an element was not written)"
    return float((actual.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


# --- quantize / pack / unpack / dequantize: bit-exact ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "ties", "constant_rows", "wide"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_int8_is_bit_exact(C, threads, shape, dtype, kind):
    w = weight(shape, dtype, seed=shape[0] * 1000 + shape[1], kind=kind)
    q, scales = C.quantize_int8(w)
    expected = ref.quantize_int8(w)
    assert torch.equal(q, expected.data) and torch.equal(scales, expected.scales)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("kind", ["gaussian", "ties", "constant_rows", "wide"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_int4_is_bit_exact(C, threads, shape, dtype, kind, group_size):
    w = weight(shape, dtype, seed=shape[0] * 7 + shape[1], kind=kind)
    data, scales, zeros = C.quantize_int4(w, group_size)
    expected = ref.quantize_int4(w, group_size)
    assert torch.equal(data, expected.data), "packed bytes differ (padding included)"
    assert torch.equal(scales, expected.scales) and torch.equal(zeros, expected.zeros)


def test_quantize_weight_uses_the_native_kernels(monkeypatch):
    calls = []
    module = native.get()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(module, name)

    monkeypatch.setattr(native, "get", lambda: Spy())
    monkeypatch.delenv("OFFSITE_BACKEND", raising=False)
    w = torch.randn(16, 70, generator=gen(3))
    for bits in (8, 4):
        qw = ok.quantize_weight(w, bits=bits, group_size=32)
        expected = ref.quantize_int8(w) if bits == 8 else ref.quantize_int4(w, 32)
        assert all(torch.equal(a, b) for a, b in zip(qw.tensors().values(), expected.tensors().values(), strict=True))
        assert qw.dtype == w.dtype and qw.shape == (16, 70)
    assert calls == ["quantize_int8", "quantize_int4"]
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")
    calls.clear()
    ok.quantize_weight(w, bits=4, group_size=32)
    assert calls == []


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(C, bits, bad):
    w = torch.randn(6, 100, generator=gen(5))
    w[4, 77] = bad
    with pytest.raises(QuantizationError, match="NaN or infinite"):
        ok.quantize_weight(w, bits=bits, group_size=32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        C.quantize_int8(w) if bits == 8 else C.quantize_int4(w, 32)


@pytest.mark.parametrize("shape", [(1, 2), (29, 66), (3, 1000)])
def test_pack_and_unpack_are_bit_exact(C, threads, shape):
    q = torch.randint(0, 16, shape, generator=gen(shape[1]), dtype=torch.uint8)
    packed = C.pack_int4(q)
    assert torch.equal(packed, ref.pack_int4(q))
    out = torch.full(shape, 99, dtype=torch.uint8)  # poisoned: 99 is no 4-bit value
    assert C.unpack_int4(packed, out) is out
    assert torch.equal(out, ref.unpack_int4(packed)) and torch.equal(native.unpack_int4(packed), q)


def test_pack_refuses_values_above_15(C):
    q = torch.randint(0, 16, (4, 10), generator=gen(1), dtype=torch.uint8)
    q[2, 3] = 16
    with pytest.raises(RuntimeError, match=r"in \[0, 15\]"):
        C.pack_int4(q)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("bits", [8, 4, "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (37, 203), (3, 20)])
def test_dequantize_is_bit_exact_and_writes_every_element(C, threads, shape, dtype, bits, group_size):
    w = weight(shape, torch.float32, seed=11 + shape[1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFSITE_BACKEND", "torch")
        qw = ok.quantize_weight(w, bits=bits, group_size=group_size)
    expected = ref.dequantize_fields(qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, qw.shape, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype)
    data = qw.data.view(torch.uint8) if bits == "fp8" else qw.data
    C.dequantize(qw.format, data, qw.scales, qw.zeros, qw.group_size, out)
    assert torch.equal(out, expected)
    assert torch.equal(native.dequantize(qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, shape, dtype), expected)


def test_public_dequantize_runs_native_and_matches(monkeypatch):
    monkeypatch.delenv("OFFSITE_BACKEND", raising=False)
    qw = ok.quantize_weight(torch.randn(9, 70, generator=gen(2)), bits=4, group_size=32)
    seen = []
    real = native.dequantize
    monkeypatch.setattr(native, "dequantize", lambda *a: seen.append(a[0]) or real(*a))
    assert torch.equal(qw.dequantize(), ref.dequantize_fields("int4", qw.data, qw.scales, qw.zeros, 32, qw.shape, qw.dtype))
    assert seen == ["int4"]


# --- frozen linear -------------------------------------------------------------------------------------------------
@pytest.fixture(params=["tiles-default", "tiles-small", "tiles-odd"])
def tiles(request, C):
    """The default tiles, and tiny ones so that odd shapes span several tiles and reduction chunks (odd chunks
    start int4 tiles on a high nibble)."""
    before = C.get_tiles()
    if request.param == "tiles-small":
        C.set_tiles(7, 48, 16, 24)
    elif request.param == "tiles-odd":
        C.set_tiles(5, 33, 16, 19)
    yield request.param
    C.set_tiles(*before)


@pytest.fixture(params=[True, False], ids=["blas", "at-mm"])
def blas(request, C):
    """Both GEMM paths: torch's sgemm_ called directly, and at::mm_out on views."""
    before = C.set_external_blas(request.param)
    yield request.param
    C.set_external_blas(before)


def quantized(n, k, bits, seed, group_size=32):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFSITE_BACKEND", "torch")
        return ok.quantize_weight(torch.randn(n, k, generator=gen(seed)), bits=bits, group_size=group_size)


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 53, 203), (37, 53, 203), (16, 5, 3), (70, 130, 300)])
def test_frozen_linear_kernels_match_float64(C, threads, tiles, blas, bits, dtype, m, n, k):
    qw = quantized(n, k, bits, seed=m + n + k)
    w64 = ref.dequantize_fields(qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, qw.shape, dtype).double()
    data = qw.data.view(torch.uint8) if bits == "fp8" else qw.data
    x = torch.randn(m, k, generator=gen(m)).to(dtype)
    bias = torch.randn(n, generator=gen(n)).to(dtype)
    y = torch.full((m, n), float("nan"), dtype=dtype)
    assert C.frozen_linear_fwd(x, qw.format, data, qw.scales, qw.zeros, bias, qw.group_size, y) is y
    assert rel_error(y, x.double() @ w64.T + bias.double()) < TOLERANCE[dtype]
    dy = torch.randn(m, n, generator=gen(m + 1)).to(dtype)
    dx = torch.full((m, k), float("nan"), dtype=dtype)
    C.frozen_linear_bwd(dy, qw.format, data, qw.scales, qw.zeros, qw.group_size, dx)
    assert rel_error(dx, dy.double() @ w64) < TOLERANCE[dtype]


def test_frozen_linear_int4_with_k_below_one_group(C, threads):
    qw = quantized(9, 20, 4, seed=1, group_size=128)  # one padded group: the padding must be masked off
    x, dy = torch.randn(3, 20, generator=gen(2)), torch.randn(3, 9, generator=gen(3))
    w64 = qw.dequantize().double()
    assert rel_error(native.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, None, "int4", 128, 9), x.double() @ w64.T) < 1e-5
    assert rel_error(native.frozen_linear_bwd(dy, qw.data, qw.scales, qw.zeros, "int4", 128, 20), dy.double() @ w64) < 1e-5


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_frozen_linear_dispatches_to_native_on_cpu(monkeypatch, bits):
    calls = []
    for name in ("frozen_linear_fwd", "frozen_linear_bwd"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    qw = quantized(24, 70, bits, seed=4)
    for forced in (None, "native"):
        if forced:
            monkeypatch.setenv("OFFSITE_BACKEND", forced)
        else:
            monkeypatch.delenv("OFFSITE_BACKEND", raising=False)
        calls.clear()
        x = torch.randn(2, 5, 70, generator=gen(5), requires_grad=True)
        y = ok.frozen_linear(x, qw)
        y.backward(torch.ones_like(y))
        assert calls == ["frozen_linear_fwd", "frozen_linear_bwd"]
        assert rel_error(x.grad, torch.ones(2, 5, 24).double() @ qw.dequantize().double()) < 1e-5
    # a dense weight has nothing to dequantize: F.linear (the reference) even when native is forced
    calls.clear()
    ok.frozen_linear(torch.randn(3, 70), torch.randn(24, 70))
    assert calls == []


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_native_autograd_saves_no_activation(monkeypatch, bits):
    monkeypatch.setenv("OFFSITE_BACKEND", "native")
    layer = ok.nn.FrozenLinear.from_linear(torch.nn.Linear(70, 24), bits=bits, group_size=32)
    x = torch.randn(3, 11, 70, requires_grad=True)
    y = forward_saving_only_weights(layer, x)
    y.sum().backward()
    assert x.grad is not None and list(layer.parameters()) == []


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_opcheck_with_native_forced(monkeypatch, bits):
    monkeypatch.setenv("OFFSITE_BACKEND", "native")
    qw = quantized(24, 70, bits, seed=6)
    x = torch.randn(2, 5, 70, requires_grad=True)
    data = fl_ops._to_op_storage(qw.format, qw.data)
    torch.library.opcheck(fl_ops._frozen_linear_op, (x, data, qw.scales, qw.zeros, torch.randn(24), qw.format, qw.group_size, 24))
    grad_args = (torch.randn(2, 5, 24), data, qw.scales, qw.zeros, qw.format, qw.group_size, 70)
    torch.library.opcheck(fl_ops._frozen_linear_input_grad_op, grad_args)


def test_empty_and_degenerate_shapes(C):
    qw = quantized(8, 64, 4, seed=7)
    y = native.frozen_linear_fwd(torch.randn(0, 64), qw.data, qw.scales, qw.zeros, None, "int4", 32, 8)
    assert y.shape == (0, 8)
    dx = native.frozen_linear_bwd(torch.randn(0, 8), qw.data, qw.scales, qw.zeros, "int4", 32, 64)
    assert dx.shape == (0, 64)


# --- bad input: a clear Python exception, never a crash or a silent wrong answer ------------------------------------
def test_bad_inputs_raise_clear_errors(C):
    qw = quantized(8, 64, 4, seed=8)
    q8 = quantized(8, 64, 8, seed=9)
    x = torch.randn(3, 64)
    out = torch.empty(3, 8)

    def fwd(x=x, data=qw.data, scales=qw.scales, zeros=qw.zeros, bias=None, group=32, out=out, fmt="int4"):
        return C.frozen_linear_fwd(x, fmt, data, scales, zeros, bias, group, out)

    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        fwd(x=x.double())
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        fwd(x=torch.randn(64, 3).t())
    with pytest.raises(ValueError, match=r"int4 data must have shape \[8, 48\] for a \[8, 65\] weight"):
        fwd(x=torch.randn(3, 65))
    with pytest.raises(ValueError, match=r"out must have shape \[3, 8\]"):
        fwd(out=torch.empty(4, 8))
    with pytest.raises(TypeError, match="out must be Float"):
        fwd(out=torch.empty(3, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="int4 data must be uint8"):
        fwd(data=qw.data.view(torch.int8))
    with pytest.raises(ValueError, match=r"int4 scales must have shape \[8, 2\]"):
        fwd(scales=qw.scales[:, :1].contiguous())
    with pytest.raises(ValueError, match="int4 needs zeros"):
        fwd(zeros=None)
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        fwd(group=48)
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        fwd(bias=torch.randn(9))
    with pytest.raises(ValueError, match="fmt must be 'int8', 'int4' or 'fp8'"):
        fwd(fmt="int3")
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        fwd(x=torch.randn(3, 64, device="meta"))
    with pytest.raises(RuntimeError, match="scales must be contiguous"):
        fwd(fmt="int8", data=q8.data, scales=torch.randn(16)[::2], zeros=None)
    with pytest.raises(ValueError, match="zeros must be None for int8"):
        fwd(fmt="int8", data=q8.data, scales=q8.scales, zeros=qw.zeros)
    with pytest.raises(TypeError, match="int8 data must be int8"):
        fwd(fmt="int8", data=q8.data.view(torch.uint8), scales=q8.scales, zeros=None)
    with pytest.raises(ValueError, match=r"int4 data must have shape \[8, 64\] for a \[8, 100\] weight"):
        C.frozen_linear_bwd(torch.randn(3, 8), "int4", qw.data, qw.scales, qw.zeros, 32, torch.empty(3, 100))
    with pytest.raises(ValueError, match=r"out must have shape \[3, 64\]"):
        C.frozen_linear_bwd(torch.randn(3, 8), "int4", qw.data, qw.scales, qw.zeros, 32, torch.empty(2, 64))
    with pytest.raises(ValueError, match="w must be 2-D"):
        C.quantize_int8(torch.randn(8))
    with pytest.raises(TypeError, match="w must be float32"):
        C.quantize_int4(torch.ones(4, 64, dtype=torch.int32), 32)
    with pytest.raises(RuntimeError, match="w must be contiguous"):
        C.quantize_int4(torch.randn(64, 4).t(), 32)
    with pytest.raises(ValueError, match="the weight is empty"):
        C.quantize_int8(torch.randn(0, 4))
    with pytest.raises(RuntimeError, match="not supported"):
        C.quantize_int8(torch.randn(4, 4, device="meta"))
    with pytest.raises(ValueError, match="even number of columns"):
        C.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"out must have shape \[2, 6\]"):
        C.unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), torch.empty(2, 5, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match=r"no CUDA kernels|runs on a CUDA GPU"):
        C.skinny_gemm(x, "int4", qw.data, qw.scales, qw.zeros, None, 32, out)
    # a bias that is not a plain dense vector, an output that is also an input, sizes out of range
    with pytest.raises(RuntimeError, match="bias must be contiguous"):
        fwd(bias=torch.randn(16)[::2])
    with pytest.raises(RuntimeError, match="bias must be a dense"):
        fwd(bias=torch.randn(8).to_sparse())
    square = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="out shares memory with x"):
        C.frozen_linear_fwd(square, "int8", q8.data[:, :8].contiguous(), q8.scales, None, None, 0, square)
    shared = torch.zeros(8, 64)
    with pytest.raises(RuntimeError, match="out shares memory with scales"):
        C.dequantize("int8", q8.data, shared.view(-1)[:8], None, 0, shared)
    with pytest.raises(RuntimeError, match="out shares memory with scales"):
        fwd(fmt="int8", data=q8.data, scales=shared.view(-1)[:8], zeros=None, out=shared.view(-1)[:24].view(3, 8))
    with pytest.raises(RuntimeError, match="out shares memory with grad_y"):
        C.frozen_linear_bwd(square, "int8", q8.data[:, :8].contiguous(), q8.scales, None, 0, square)
    with pytest.raises(ValueError, match="out of range"):
        C.dequantize(
            "int4",
            torch.empty(0, 0, dtype=torch.uint8),
            torch.empty(0, 0),
            torch.empty(0, 0, dtype=torch.uint8),
            128,
            torch.empty(0, 2**62),
        )
    with pytest.raises(ValueError, match="at most 2\\^40"):
        C.unpack_int4(torch.empty(0, 2**62, dtype=torch.uint8), torch.empty(0, 0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="tile sizes must be at most"):
        C.set_tiles(2**62, 64, 64, 64)


def test_build_info(C):
    info = C.build_info()
    assert info["openmp"] is True and info["torch"].startswith(torch.__version__.split("+")[0][:4])
    assert set(info) >= {"cuda", "openmp", "torch", "external_blas"}


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_weights_quantized_from_a_transposed_view(monkeypatch, bits):
    monkeypatch.delenv("OFFSITE_BACKEND", raising=False)
    w = torch.randn(70, 24, generator=gen(40)).t()  # as HF Conv1D weights are
    qw = ok.quantize_weight(w, bits=bits, group_size=32)
    x = torch.randn(5, 70, generator=gen(41), requires_grad=True)
    y = ok.frozen_linear(x, qw)
    w64 = ref.dequantize_fields(qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, qw.shape, qw.dtype).double()
    assert rel_error(y.detach(), x.detach().double() @ w64.T) < 1e-5
    y.backward(torch.ones_like(y))
    assert rel_error(x.grad, torch.ones(5, 24).double() @ w64) < 1e-5
