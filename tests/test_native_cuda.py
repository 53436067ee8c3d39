"""The native extension's CUDA kernels (csrc/cuda/) on a GPU: quantize, pack, unpack and dequantize bit-exact with
the PyTorch reference (run on the CPU), the skinny GEMM against float64, bad input. Marked ``gpu``: skipped without
a CUDA GPU, and without an extension built with its CUDA part."""

import pytest
import torch
from conftest import gen

import offsite_kernels as ok
from offsite_kernels import native
from offsite_kernels.quant import QuantizationError
from offsite_kernels.quant import formats as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and native.has_cuda()), reason="needs a GPU and the CUDA part of the extension"
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def C():
    return native.get()


def cpu_ref_quantize(w, bits, group_size=32):
    return ref.quantize_int8(w.cpu()) if bits == 8 else ref.quantize_int4(w.cpu(), group_size)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (37, 203), (64, 1000), (300, 4096)])
def test_cuda_quantize_is_bit_exact(C, shape, dtype, group_size):
    w = torch.randn(*shape, generator=gen(shape[1])).to(dtype)
    w[0, 0] = w[0, -1]  # a tie or two
    q, scales = C.quantize_int8(w.cuda())
    expected = ref.quantize_int8(w)
    assert torch.equal(q.cpu(), expected.data) and torch.equal(scales.cpu(), expected.scales)
    data, scales, zeros = C.quantize_int4(w.cuda(), group_size)
    expected = ref.quantize_int4(w, group_size)
    assert torch.equal(data.cpu(), expected.data)
    assert torch.equal(scales.cpu(), expected.scales) and torch.equal(zeros.cpu(), expected.zeros)


def test_cuda_quantize_weight_and_non_finite(C, monkeypatch):
    monkeypatch.delenv("OFFSITE_BACKEND", raising=False)
    w = torch.randn(16, 300, generator=gen(1)).cuda()
    for bits in (8, 4):
        qw = ok.quantize_weight(w, bits=bits, group_size=64)
        assert qw.device.type == "cuda"
        expected = cpu_ref_quantize(w, bits, 64)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(qw.tensors().values(), expected.tensors().values(), strict=True))
        bad = w.clone()
        bad[3, 5] = float("nan")
        with pytest.raises(QuantizationError, match="NaN or infinite"):
            ok.quantize_weight(bad, bits=bits, group_size=64)


@pytest.mark.parametrize("shape", [(1, 2), (29, 66), (300, 4096)])
def test_cuda_pack_unpack_are_bit_exact(C, shape):
    q = torch.randint(0, 16, shape, generator=gen(shape[1]), dtype=torch.uint8)
    packed = C.pack_int4(q.cuda())
    assert torch.equal(packed.cpu(), ref.pack_int4(q))
    out = torch.full(shape, 99, dtype=torch.uint8, device="cuda")
    C.unpack_int4(packed, out)
    assert torch.equal(out.cpu(), q)
    q[0, 1] = 16
    with pytest.raises(RuntimeError, match=r"in \[0, 15\]"):
        C.pack_int4(q.cuda())


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (37, 203), (256, 4096)])
def test_cuda_dequantize_is_bit_exact(C, shape, dtype, bits, monkeypatch):
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")
    qw = ok.quantize_weight(torch.randn(*shape, generator=gen(7)), bits=bits, group_size=32)
    expected = ref.dequantize_fields(qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, qw.shape, dtype)
    g = qw.to("cuda")
    out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    data = g.data.view(torch.uint8) if bits == "fp8" else g.data
    C.dequantize(g.format, data, g.scales, g.zeros, g.group_size, out)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("n, k", [(53, 203), (130, 256), (1000, 4096), (7, 32)])
def test_skinny_gemm_matches_float64(C, bits, dtype, m, n, k):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFSITE_BACKEND", "torch")
        qw = ok.quantize_weight(torch.randn(n, k, generator=gen(n + k)), bits=bits, group_size=32 if k % 64 else 64)
    w64 = qw.dequantize().double()
    g = qw.to("cuda")
    x = torch.randn(m, k, generator=gen(m)).to(dtype)
    bias = torch.randn(n, generator=gen(n)).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    C.skinny_gemm(x.cuda(), g.format, g.data, g.scales, g.zeros, bias.cuda(), g.group_size, out)
    y = out.cpu()
    assert not torch.isnan(y).any(), "an output element was not written"
    expected = x.double() @ w64.T + bias.double()
    assert float((y.double() - expected).abs().max() / expected.abs().max()) < TOLERANCE[dtype]


def test_skinny_gemm_runs_through_frozen_linear_when_forced(C, monkeypatch):
    calls = []
    real = native.skinny_gemm
    monkeypatch.setattr(native, "skinny_gemm", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setenv("OFFSITE_BACKEND", "native")
    qw = ok.quantize_weight(torch.randn(64, 256, device="cuda"), bits=4, group_size=64)
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.bfloat16)
    y = ok.frozen_linear(x, qw)
    assert calls == [torch.Size([6, 256])]
    expected = x.double() @ qw.dequantize().double().T
    assert float((y.double() - expected).abs().max() / expected.abs().max()) < 1e-2


def test_skinny_gemm_bad_inputs(C):
    qw = ok.quantize_weight(torch.randn(8, 64, device="cuda"), bits=4, group_size=32)
    out = torch.empty(3, 8, device="cuda")
    with pytest.raises(ValueError, match="M <= 16"):
        C.skinny_gemm(
            torch.randn(17, 64, device="cuda"), "int4", qw.data, qw.scales, qw.zeros, None, 32, torch.empty(17, 8, device="cuda")
        )
    with pytest.raises(RuntimeError, match="is on cpu"):
        C.skinny_gemm(torch.randn(3, 64, device="cuda"), "int4", qw.data.cpu(), qw.scales, qw.zeros, None, 32, out)
    with pytest.raises(ValueError, match="fp8"):
        C.skinny_gemm(torch.randn(3, 64, device="cuda"), "fp8", qw.data, qw.scales, None, None, 32, out)
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        C.skinny_gemm(
            torch.randn(3, 64, device="cuda"), "int4", qw.data, qw.scales, qw.zeros, torch.randn(8, device="cuda").half(), 32, out
        )
