"""Frozen RMSNorm / LayerNorm (optionally fused with the residual add): both backends against float64 math,
the Hugging Face and torch modules they replace, what autograd saves, bad inputs, and an AOT compile of
every Triton launch configuration for sm_80 and sm_90."""

import importlib
import zlib

import pytest
import torch
from conftest import gen
from torch import nn

import offsite_kernels as ok
from offsite_kernels.ops.norm import NormInputError, layer_norm, rms_norm

norm_ops = importlib.import_module("offsite_kernels.ops.norm")  # the package re-exports the functionals
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |error| / max |reference|: the output's own rounding dominates for fp16 and bf16
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
M, N, N_LARGE = 37, 203, 1000  # odd rows and features: partial row blocks, masked columns (BLOCK_N 256 / 1024)
RMS_EPS, LN_EPS = 1e-6, 1e-5


def seed_of(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode()) % 10_000  # stable across processes, unlike hash()


def make_input(case, dtype, seed, n):
    g = gen(seed)
    if case == "2d":
        t = torch.randn(M, n, generator=g)
    elif case == "3d":
        t = torch.randn(3, 5, n, generator=g)
    elif case == "transposed":  # strides (1, M): columns are not contiguous
        t = torch.randn(n, M, generator=g).t()
    elif case == "strided3d":  # every other feature of a wider tensor
        t = torch.randn(2, 7, 2 * n, generator=g)[..., ::2]
    else:
        raise ValueError(case)
    return (1.5 * t + 0.3).to(dtype)  # a non-zero mean: LayerNorm has something to subtract


def rel_error(actual, reference):
    assert not torch.isnan(actual).any(), "NaN in output"
    reference = reference.detach()
    return float((actual.detach().double() - reference).abs().max() / reference.abs().max())


# --- float64 reference of the math, written out independently of the library -------------------
def ref_rms(h, w, eps, offset=0.0):
    h = h.double()
    y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    return y if w is None else y * (w.double() + offset)


def ref_ln(h, w, b, eps):
    h = h.double()
    d = h - h.mean(-1, keepdim=True)
    y = d * torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)
    y = y if w is None else y * w.double()
    return y if b is None else y + b.double()


def frozen_params(norm, affine, n, seed):
    if not affine:
        return None, None
    w = 1.0 + 0.5 * torch.randn(n, generator=gen(seed + 10))
    b = 0.5 * torch.randn(n, generator=gen(seed + 11)) if norm == "ln" else None
    return w, b


def run_norm(norm, x, w, b, residual):
    if norm == "rms":
        return rms_norm(x, w, RMS_EPS, residual)
    return layer_norm(x, w, b, LN_EPS, residual)


def ref_norm(norm, h, w, b):
    return ref_rms(h, w, RMS_EPS) if norm == "rms" else ref_ln(h, w, b, LN_EPS)


# --- forward and input gradient against float64 ------------------------------------------------
@pytest.mark.parametrize("norm", ["rms", "ln"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [N, N_LARGE])
@pytest.mark.parametrize(
    "case, with_residual, affine",
    [("2d", False, True), ("3d", True, True), ("transposed", False, False), ("strided3d", True, False), ("2d", True, True)],
)
def test_forward_and_input_gradient_match_float64(backend, norm, dtype, n, case, with_residual, affine):
    seed = seed_of(norm, dtype, n, case, with_residual, affine)
    w, b = frozen_params(norm, affine, n, seed)
    x = make_input(case, dtype, seed, n).requires_grad_(True)
    r = make_input(case, dtype, seed + 1, n).requires_grad_(True) if with_residual else None
    out = run_norm(norm, x, w, b, r)
    y, h = out if with_residual else (out, None)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    if with_residual:
        assert h.shape == x.shape and h.dtype == dtype
        # h = x + r in fp32, rounded once to the activation dtype
        assert torch.equal(h, (x.detach().float() + r.detach().float()).to(dtype))
    # the statistics are taken of h as stored (rounded), as an unfused ``norm(x + r)`` would
    h64 = (h if with_residual else x).detach().double().requires_grad_(True)
    y64 = ref_norm(norm, h64, w, b)
    assert rel_error(y, y64) < TOLERANCE[dtype]

    gy = torch.randn(y.shape, generator=gen(seed + 2)).to(dtype)
    gh = torch.randn(y.shape, generator=gen(seed + 3)).to(dtype) if with_residual else None
    torch.autograd.backward([y, h] if with_residual else [y], [gy, gh] if with_residual else [gy])
    (dh64,) = torch.autograd.grad(y64, h64, gy.double())
    expected = dh64 + (gh.double() if with_residual else 0)
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert rel_error(x.grad, expected) < TOLERANCE[dtype]
    if with_residual:
        assert torch.equal(r.grad, x.grad)  # d(x + r)/dx = d(x + r)/dr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_options_match_float64(backend, dtype):
    """Gemma's ``(1 + w)`` offset, and Llama's rounding point (x * rstd rounded to x's dtype first)."""
    w = 0.3 * torch.randn(N, generator=gen(1))
    x = make_input("3d", dtype, 2, N).requires_grad_(True)
    y = rms_norm(x, w, RMS_EPS, weight_offset=1.0)
    y64 = ref_rms(x.detach(), w, RMS_EPS, offset=1.0)
    assert rel_error(y, y64) < TOLERANCE[dtype]
    gy = torch.randn(y.shape, generator=gen(3)).to(dtype)
    y.backward(gy)
    x64 = x.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(ref_rms(x64, w, RMS_EPS, offset=1.0), x64, gy.double())
    assert rel_error(x.grad, expected) < TOLERANCE[dtype]

    rounded = rms_norm(x.detach(), w, RMS_EPS, round_normalized=True)
    xhat = ref_rms(x.detach(), None, RMS_EPS).to(dtype).double()  # rounded after normalising
    assert rel_error(rounded, xhat * w.double()) < TOLERANCE[dtype]
    if dtype == torch.float64:
        assert torch.equal(rounded, rms_norm(x.detach(), w, RMS_EPS))  # rounding to float64 is no rounding


def test_layer_norm_is_stable_for_rows_with_a_large_mean(backend):
    x = 1000.0 + torch.randn(M, N, generator=gen(5))  # naive E[x^2] - E[x]^2 would lose every digit in fp32
    w = torch.randn(N, generator=gen(6))
    assert rel_error(layer_norm(x, w, None, LN_EPS), ref_ln(x, w, None, LN_EPS)) < 1e-3


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_zero_rows_stay_finite(backend, norm):
    x = torch.randn(4, N, generator=gen(7))
    x[1] = 0.0
    x.requires_grad_(True)
    y = run_norm(norm, x, torch.randn(N, generator=gen(8)), None, None)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.equal(y[1], torch.zeros(N))


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_only_the_residual_needs_grad_and_h_may_go_unused(backend, norm):
    x = torch.randn(M, N, generator=gen(9))
    r = torch.randn(M, N, generator=gen(10)).requires_grad_(True)
    w, b = frozen_params(norm, True, N, 11)
    y, h = run_norm(norm, x, w, b, r)
    assert h.requires_grad
    gy = torch.randn(M, N, generator=gen(12))
    y.backward(gy)  # h unused: its gradient counts as zero
    h64 = h.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(ref_norm(norm, h64, w, b), h64, gy.double())
    assert x.grad is None
    assert rel_error(r.grad, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_y_may_go_unused_when_h_carries_the_gradient(backend, norm):
    # the normalised output unused: its gradient reaches the backward as None (not materialised zeros)
    x = torch.randn(M, N, generator=gen(13)).requires_grad_(True)
    r = torch.randn(M, N, generator=gen(14)).requires_grad_(True)
    w, b = frozen_params(norm, True, N, 15)
    _y, h = run_norm(norm, x, w, b, r)
    gh = torch.randn(M, N, generator=gen(16))
    h.backward(gh)  # dx = dr = gh exactly: the norm's branch adds nothing
    assert torch.equal(x.grad, gh) and torch.equal(r.grad, gh)


# --- the Triton kernels write every element (poisoned outputs) ------------------------------
@pytest.mark.parametrize("norm", ["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(1, N), (M, N), (M, 7), (5, N_LARGE)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_kernels_write_every_output_element(norm, dtype, m, n, with_residual):
    pytest.importorskip("triton")
    from offsite_kernels.ops import norm_triton as k

    seed = seed_of("poison", norm, dtype, m, n, with_residual)
    x = make_input("2d", dtype, seed, n)[:m]
    r = make_input("2d", dtype, seed + 1, n)[:m] if with_residual else None
    w, b = frozen_params(norm, True, n, seed)

    def poisoned(*shape, dt=dtype):
        return torch.full(shape, float("nan"), dtype=dt)

    y, h_out = poisoned(m, n), poisoned(m, n) if with_residual else None
    mean, rstd = poisoned(m, dt=torch.float32), poisoned(m, dt=torch.float32)
    if norm == "rms":
        k.rms_norm_fwd(x, w, r, RMS_EPS, out=y, residual_out=h_out, rstd_out=rstd)
    else:
        k.layer_norm_fwd(x, w, b, r, LN_EPS, out=y, residual_out=h_out, mean_out=mean, rstd_out=rstd)
    h = h_out if with_residual else x
    if with_residual:
        assert torch.equal(h, (x.float() + r.float()).to(dtype))
    h64 = h.double()
    assert rel_error(y, ref_norm(norm, h64, w, b)) < TOLERANCE[dtype]
    var = h64.square().mean(-1) if norm == "rms" else h64.var(-1, unbiased=False)
    assert rel_error(rstd, torch.rsqrt(var + (RMS_EPS if norm == "rms" else LN_EPS))) < 1e-5
    if norm == "ln":
        assert float((mean.double() - h64.mean(-1)).abs().max()) < 1e-5

    gy = torch.randn(m, n, generator=gen(seed + 2)).to(dtype)
    gh = torch.randn(m, n, generator=gen(seed + 3)).to(dtype) if with_residual else None
    dx = poisoned(m, n)
    if norm == "rms":
        k.rms_norm_bwd(gy, h, w, rstd, gh, out=dx)
    else:
        k.layer_norm_bwd(gy, h, w, mean, rstd, gh, out=dx)
    h64.requires_grad_(True)
    (expected,) = torch.autograd.grad(ref_norm(norm, h64, w, b), h64, gy.double())
    assert rel_error(dx, expected + (gh.double() if with_residual else 0)) < TOLERANCE[dtype]


def test_forced_triton_backend_runs_the_kernels(monkeypatch):
    pytest.importorskip("triton")
    from offsite_kernels.ops import norm_triton as k

    calls = []
    for name in ("rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd"):
        real = getattr(k, name)
        monkeypatch.setattr(k, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    x = torch.randn(4, 64, requires_grad=True)
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    rms_norm(x, torch.randn(64)).sum().backward()
    layer_norm(x, None, None, residual=torch.randn(4, 64))[0].sum().backward()
    assert calls == ["rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd"]
    calls.clear()
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")
    rms_norm(x, torch.randn(64)).sum().backward()
    layer_norm(x, None, None).sum().backward()
    assert calls == []
    monkeypatch.delenv("OFFSITE_BACKEND")
    assert not norm_ops._use_triton(x)  # a CPU tensor runs the reference unless the backend is forced


def test_forced_triton_backend_refuses_rows_longer_than_one_tile(monkeypatch):
    pytest.importorskip("triton")
    from offsite_kernels.ops.norm_triton import MAX_N, NormKernelError

    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    with pytest.raises(NormKernelError, match=f"at most {MAX_N}.*OFFSITE_BACKEND=torch"):
        rms_norm(torch.randn(1, MAX_N + 1), None)


def test_empty_batch(backend):
    x = torch.randn(0, 16, requires_grad=True)
    y, h = layer_norm(x, torch.randn(16), torch.randn(16), residual=torch.randn(0, 16))
    assert y.shape == h.shape == (0, 16)
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == (0, 16)
    assert rms_norm(torch.randn(2, 0, 16), torch.randn(16)).shape == (2, 0, 16)


# --- what autograd keeps ------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["rms", "ln"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_saves_only_the_input_and_row_statistics(backend, norm, with_residual, dtype):
    w, b = frozen_params(norm, True, N, 13)
    w = w.to(dtype)
    b = None if b is None else b.to(dtype)
    x = torch.randn(3, 11, N, generator=gen(14)).to(dtype).requires_grad_(True)
    r = torch.randn(3, 11, N, generator=gen(15)).to(dtype).requires_grad_(True) if with_residual else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = run_norm(norm, x, w, b, r)
    y, h = out if with_residual else (out, None)
    src = h if with_residual else x  # the tensor that was normalised
    activations = [t for t in saved if t.shape == x.shape]
    stats = [t for t in saved if t.shape == x.shape[:-1]]
    weights = [t for t in saved if t.shape == (N,)]
    assert len(saved) == len(activations) + len(stats) + len(weights), [tuple(t.shape) for t in saved]
    assert [t.data_ptr() for t in activations] == [src.data_ptr()]  # never y, never both x and h
    assert all(t.dtype == torch.float32 for t in stats) and len(stats) == (1 if norm == "rms" else 2)
    assert [t.data_ptr() for t in weights] == [w.data_ptr()]  # the frozen weight; the bias is not needed
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes == x.numel() * x.element_size() + len(stats) * 33 * 4 + N * w.element_size()
    assert y.data_ptr() not in {t.data_ptr() for t in saved}

    torch.autograd.backward([y, h] if with_residual else [y], [torch.ones_like(y)] * (2 if with_residual else 1))
    assert x.grad is not None and (r is None or r.grad is not None)
    assert w.grad is None and (b is None or b.grad is None)


@pytest.mark.parametrize("make", ["llama", "layernorm"])
def test_modules_hold_buffers_and_never_collect_gradients(backend, make):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    src = LlamaRMSNorm(N, eps=1e-5) if make == "llama" else nn.LayerNorm(N)
    frozen = (ok.nn.FrozenRMSNorm if make == "llama" else ok.nn.FrozenLayerNorm).from_module(src)
    assert list(frozen.parameters()) == []
    assert {name for name, _ in frozen.named_buffers()} == ({"weight"} if make == "llama" else {"weight", "bias"})
    x = torch.randn(2, 5, N, requires_grad=True)
    y, h = frozen(x, torch.randn(2, 5, N))
    (y.square().sum() + h.sum()).backward()
    assert x.grad is not None
    assert all(not t.requires_grad and t.grad is None for t in frozen.buffers())
    assert all(p.grad is None for p in src.parameters())
    assert set(frozen.state_dict()) == set(src.state_dict())  # same keys: a stock state dict loads
    frozen.load_state_dict(src.state_dict())


def test_weight_that_requires_grad_is_refused():
    w = torch.randn(N, requires_grad=True)
    with pytest.raises(NormInputError, match=r"weight requires grad.*requires_grad_\(False\)"):
        rms_norm(torch.randn(2, N), w)
    with pytest.raises(NormInputError, match="bias requires grad"):
        layer_norm(torch.randn(2, N), None, w)
    assert rms_norm(torch.randn(2, N), w.detach()).shape == (2, N)


# --- custom ops: opcheck, torch.compile ---------------------------------------------------------
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_opcheck(backend, with_residual, affine):
    x = torch.randn(2, 5, 70, generator=gen(16), requires_grad=True)
    r = torch.randn(2, 5, 70, generator=gen(17), requires_grad=True) if with_residual else None
    w = torch.randn(70, generator=gen(18)) if affine else None
    b = torch.randn(70, generator=gen(19)) if affine else None
    torch.library.opcheck(norm_ops._rms_norm_op, (x, w, r, 1e-6, 1.0 if affine else 0.0, affine))
    torch.library.opcheck(norm_ops._layer_norm_op, (x, w, b, r, 1e-5))
    gy, gh = torch.randn(2, 5, 70, generator=gen(20)), torch.randn(2, 5, 70, generator=gen(21)) if with_residual else None
    src = x.detach()
    rstd = torch.rand(2, 5, generator=gen(22)) + 0.5
    mean = torch.randn(2, 5, generator=gen(23))
    torch.library.opcheck(norm_ops._rms_norm_input_grad_op, (gy, src, w, rstd, gh, 0.0))
    torch.library.opcheck(norm_ops._layer_norm_input_grad_op, (gy, src, w, mean, rstd, gh))


def test_torch_compile_traces_without_graph_breaks(backend):
    rms = ok.nn.FrozenRMSNorm(torch.randn(48), eps=1e-6, round_normalized=True)
    ln = ok.nn.FrozenLayerNorm(torch.randn(48), torch.randn(48))

    def block(x, r):
        y, h = rms(torch.relu(x), r)
        z, h2 = ln(y * 2.0, h)
        return z.square().sum() + h2.sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 7, 48, generator=gen(24), requires_grad=True)
    r = torch.randn(3, 7, 48, generator=gen(25), requires_grad=True)
    compiled(x, r).backward()
    x_ref, r_ref = (t.detach().clone().requires_grad_(True) for t in (x, r))
    block(x_ref, r_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(r.grad, r_ref.grad)


# --- the modules they replace --------------------------------------------------------------
def _hf_like(kind):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = gen(seed_of("module", kind))
    if kind == "llama":
        m = LlamaRMSNorm(N, eps=1e-5)
    elif kind == "gemma":
        m = GemmaRMSNorm(N, eps=1e-6)
    elif kind == "olmo2":
        from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

        m = Olmo2RMSNorm(N, eps=1e-6)
    elif kind == "cohere":
        from transformers.models.cohere.modeling_cohere import CohereLayerNorm

        m = CohereLayerNorm(N, eps=1e-5)
    elif kind == "torch_rms":
        m = nn.RMSNorm(N)  # eps=None: torch's dtype-dependent default
    elif kind == "layernorm":
        m = nn.LayerNorm(N)
    elif kind == "layernorm_no_bias":
        m = nn.LayerNorm(N, bias=False)
    elif kind == "layernorm_no_affine":
        m = nn.LayerNorm(N, elementwise_affine=False)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (0.0 if kind == "gemma" else 1.0))
    return m


@pytest.mark.parametrize(
    "kind", ["llama", "gemma", "olmo2", "torch_rms", "layernorm", "layernorm_no_bias", "layernorm_no_affine", "cohere"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_from_module_matches_the_module(backend, kind, dtype):
    """Outputs and input gradients of the frozen module against the module it was made from.

    bf16: the rounding points are the module's own (Llama: ``x * rstd`` rounded before the weight
    multiply; OLMo 2 after it), so the outputs agree to the bit on the torch backend and to one bf16 ulp on a few
    elements on the Triton backend (its rsqrt and row sums round differently in the last fp32
    bit). The bf16 input gradients differ within bf16 rounding: Hugging Face's autograd rounds its
    intermediate gradients to bf16, the kernels do not. float64: Llama and Gemma compute their
    statistics in fp32, the frozen modules in float64 (agreement ~1e-7, exact math ~1e-12).
    """
    src = _hf_like(kind).to(dtype)
    rms = kind in ("llama", "gemma", "olmo2", "torch_rms")
    frozen = (ok.nn.FrozenRMSNorm if rms else ok.nn.FrozenLayerNorm).from_module(src)
    x = make_input("3d", dtype, seed_of(kind, dtype), N).requires_grad_(True)
    y, expected = frozen(x), src(x)
    assert y.dtype == expected.dtype == dtype
    gy = torch.randn(y.shape, generator=gen(26)).to(dtype)
    (gx,) = torch.autograd.grad(y, x, gy)
    (g_expected,) = torch.autograd.grad(expected, x, gy)
    if dtype == torch.float64:
        fp32_stats = kind in ("llama", "gemma", "olmo2", "cohere")
        assert rel_error(y, expected) < (1e-6 if fp32_stats else 1e-12)
        assert rel_error(gx, g_expected) < (1e-6 if fp32_stats else 1e-12)
        x64 = x.detach().requires_grad_(True)
        if rms:
            w, offset = src.weight.detach(), 1.0 if kind == "gemma" else 0.0
            eps = src.eps if kind == "gemma" else torch.finfo(torch.float64).eps if kind == "torch_rms" else src.variance_epsilon
            exact = ref_rms(x64, w, eps, offset)
        else:
            eps = src.variance_epsilon if kind == "cohere" else src.eps
            exact = ref_ln(x64, src.weight, getattr(src, "bias", None), eps)
        assert rel_error(y, exact) < 1e-12
        (g_exact,) = torch.autograd.grad(exact, x64, gy)
        assert rel_error(gx, g_exact) < 1e-12
    else:
        ulp = expected.detach().double().abs().clamp_min(2.0**-126) * 2.0**-7  # one bf16 ulp, at most
        diff = (y.detach().double() - expected.detach().double()).abs()
        assert bool((diff <= ulp).all()), f"{int((diff > ulp).sum())} elements differ by more than one bf16 ulp"
        assert int((diff > 0).sum()) <= (0 if backend == "torch" and kind != "layernorm" else diff.numel() // 100)
        assert rel_error(gx, g_expected.double()) < TOLERANCE[dtype]


def test_from_module_refuses_what_it_cannot_replace():
    with pytest.raises(TypeError, match=r"torch\.nn\.LayerNorm"):
        ok.nn.FrozenLayerNorm.from_module(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        ok.nn.FrozenRMSNorm.from_module(nn.LayerNorm(3))
    with pytest.raises(ValueError, match="last-dimension"):
        ok.nn.FrozenLayerNorm.from_module(nn.LayerNorm((4, 3)))


# --- bad inputs -----------------------------------------------------------------------------
def test_bad_inputs_name_the_problem():
    x, w = torch.randn(2, 16), torch.randn(16)
    with pytest.raises(NormInputError, match=r"weight must have shape \(16,\).*got \(15,\)"):
        rms_norm(x, torch.randn(15))
    with pytest.raises(NormInputError, match=r"bias must have shape \(16,\)"):
        layer_norm(x, w, torch.randn(2, 16))
    with pytest.raises(NormInputError, match=r"residual has shape \(2, 15\) but x has \(2, 16\)"):
        rms_norm(x, w, residual=torch.randn(2, 15))
    with pytest.raises(NormInputError, match="float32, float16, bfloat16 or float64"):
        rms_norm(torch.ones(2, 16, dtype=torch.int64), w)
    with pytest.raises(NormInputError, match=r"residual is torch.bfloat16 but x is torch.float32.*residual.to\(x.dtype\)"):
        layer_norm(x, w, residual=torch.randn(2, 16, dtype=torch.bfloat16))
    with pytest.raises(NormInputError, match="weight must be a floating-point tensor"):
        rms_norm(x, torch.ones(16, dtype=torch.int32))
    with pytest.raises(NormInputError, match=r"x is on meta but weight is on cpu.*\.to\(device\)"):
        rms_norm(torch.randn(2, 16, device="meta"), w)
    with pytest.raises(NormInputError, match="x is on cpu but residual is on meta"):
        layer_norm(x, w, residual=torch.randn(2, 16, device="meta"))
    for eps in (0.0, -1e-5):
        with pytest.raises(NormInputError, match="eps must be > 0"):
            rms_norm(x, w, eps)
        with pytest.raises(NormInputError, match="eps must be > 0"):
            layer_norm(x, w, eps=eps)
    with pytest.raises(NormInputError, match="eps must be a finite real number"):
        layer_norm(x, w, eps=float("nan"))
    with pytest.raises(NormInputError, match="non-empty last dimension"):
        rms_norm(torch.tensor(1.0), None)
    with pytest.raises(NormInputError, match="non-empty last dimension"):
        layer_norm(torch.randn(3, 0), None)
    with pytest.raises(NormInputError, match="x must be a tensor"):
        rms_norm([[1.0]], None)
    with pytest.raises(ValueError, match="hidden_size"):
        ok.nn.FrozenRMSNorm(None)


# --- ahead-of-time compile of every launch configuration ---------------------------------
def _aot_cases(name):
    try:
        from offsite_kernels.ops import norm_triton
    except ImportError:  # no triton
        return []
    return getattr(norm_triton, name)()


AOT_CASES = _aot_cases("aot_cases")
AOT_CASES_F64 = _aot_cases("aot_cases_float64")


def _aot_row(case, arch):
    from offsite_kernels.ops import aot

    available, why = aot.availability()
    if not available:
        pytest.skip(f"AOT compile check unavailable: {why}")
    row = aot.compile_case(case, arch)  # cached per process
    assert row["compiled"], f"sm_{arch} {case.label}: {aot.case_problems(row)} {row.get('error') or ''}"
    return row


def test_aot_cases_cover_every_launch_configuration_and_switch():
    pytest.importorskip("triton")
    from offsite_kernels.ops.norm_triton import MAX_N, launch_config

    covered = {(c.fn, c.constexprs["BLOCK_N"], c.constexprs["ROWS"], c.num_warps) for c in AOT_CASES}
    for n in [16, 17, 203, 768, 1000, 2048, 4096, 5120, 8192, 12288, MAX_N]:
        block_n, rows, warps = launch_config(n)
        for fn in ("_norm_fwd_kernel", "_norm_bwd_kernel"):
            assert (fn, block_n, rows, warps) in covered, (fn, n)
    assert {c.types["x_ptr"] for c in AOT_CASES} >= {"*bf16", "*fp16"}
    switches = {"_norm_fwd_kernel": ("RMS", "HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS", "ROUND_NORMALIZED")}
    switches["_norm_bwd_kernel"] = ("RMS", "HAS_WEIGHT", "HAS_DH")
    for fn, names in switches.items():
        seen = {tuple(c.constexprs[k] for k in names) for c in AOT_CASES if c.fn == fn}
        rms_at = names.index("RMS")
        for flags in seen:
            assert not (flags[rms_at] and "HAS_BIAS" in names and flags[names.index("HAS_BIAS")])  # RMSNorm has no bias
        expected = 16 if fn == "_norm_fwd_kernel" else 8  # every meaningful combination compiled somewhere
        assert len(seen) >= expected, (fn, sorted(seen))
    assert not any(c.constexprs["INTERPRETER_BF16"] for c in AOT_CASES + AOT_CASES_F64)


@pytest.mark.usefixtures("aot_prefetched")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", AOT_CASES, ids=[c.label.replace(" ", "_") for c in AOT_CASES])
def test_aot_compiles_without_spills(case, arch):
    from offsite_kernels.ops import aot

    row = _aot_row(case, arch)
    assert row["ok"], f"sm_{arch} {case.label}: {aot.case_problems(row)}"
    assert row["registers"] > 0


@pytest.mark.usefixtures("aot_prefetched")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", AOT_CASES_F64, ids=[c.label.replace(" ", "_") for c in AOT_CASES_F64])
def test_aot_float64_variants_compile(case, arch):
    """float64 (a checking dtype) must compile for real GPUs; at long rows it may spill (slow, not wrong)."""
    assert _aot_row(case, arch)["registers"] > 0


def test_which_rms_norms_scale_by_one_plus_weight():
    """Gemma, Gemma 2 and Gemma 3 scale by ``1 + weight``; Gemma 3n and Gemma 4 (also named Gemma*RMSNorm) by
    ``weight``, as Llama: a name pattern would add an offset of 1 there."""
    import importlib

    from offsite_kernels.nn.norm import rms_norm_kind

    for module_name, cls, kind in [
        ("gemma", "GemmaRMSNorm", "gemma"),
        ("gemma2", "Gemma2RMSNorm", "gemma"),
        ("gemma3", "Gemma3RMSNorm", "gemma"),
        ("gemma3n", "Gemma3nRMSNorm", None),
        ("gemma4", "Gemma4RMSNorm", None),
    ]:
        try:
            norm_class = getattr(importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}"), cls)
        except (ImportError, AttributeError):
            continue  # not in this transformers
        norm = norm_class(N, eps=1e-6)
        got = rms_norm_kind(norm)
        assert got in (kind, "llama" if kind is None else kind), cls  # a weight-only scale may look like Llama's
        if got == "gemma":
            x = torch.randn(3, N, generator=gen(5))
            with torch.no_grad():
                norm.weight.normal_(generator=gen(6))
            torch.testing.assert_close(ok.nn.FrozenRMSNorm.from_module(norm)(x), norm(x), rtol=1e-6, atol=1e-6)
    assert rms_norm_kind(nn.LayerNorm(N)) is None
