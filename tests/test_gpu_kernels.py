"""Every Triton kernel on a real CUDA GPU, against a float64 reference of the same math.

CI runs these kernels in Triton's interpreter (the other test files); the compiler on a GPU is
stricter and its arithmetic differs (tf32, fused multiply-adds, bf16 tensor cores), so the same
checks run here on CUDA tensors: fresh random inputs, odd shapes, 3-D and non-contiguous inputs,
outputs poisoned before the run, per-dtype tolerances, and one emulator end to end. Marked ``gpu``:
skipped where there is none (bench/gpu_suite.py runs them).
"""

from __future__ import annotations

import pytest
import torch

import offsite_kernels as ok
from offsite_kernels.ops import bias_gelu, fused_linear_cross_entropy, geglu, layer_norm, rms_norm, swiglu

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative (Frobenius) error bounds
DTYPES = list(TOL)


@pytest.fixture(autouse=True)
def _triton_and_poison(monkeypatch):
    """Force the Triton kernels, and fill the caching allocator's free blocks with NaN, so an
    output element a kernel forgets to write shows up as NaN (rel_err rejects it)."""
    from offsite_kernels.backends import gpu_runs_triton

    if not gpu_runs_triton(torch.device("cuda")):
        pytest.skip(f"{torch.cuda.get_device_name()} is older than Ampere: the ops run the PyTorch reference there")
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    poison = [torch.full((n,), float("nan"), device="cuda") for n in (2**26, 2**24, 2**22, 2**20, 2**16, 2**12)]
    del poison  # the blocks go back to the cache, NaN-filled, and the kernels' outputs are carved from them


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def rand(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32).to(dtype)


def fp8_gemm_refs(x: torch.Tensor, qw, bias: torch.Tensor | None, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 forward and input gradient of the fp8 GEMM math (ops/fp8_linear.py): the activations (and
    ``dY * s_w``) quantized per row by the PyTorch reference, then multiplied in float64."""
    from offsite_kernels.quant.formats import quantize_rows_fp8

    k, n = x.shape[-1], qw.out_features
    qx, sx = quantize_rows_fp8(x.detach().reshape(-1, k))
    w = qw.data.double() * qw.scales.double()[:, None]
    y = (qx.double() * sx.double()[:, None]) @ w.t() + (0 if bias is None else bias.double())
    qg, sg = quantize_rows_fp8(grad_y.reshape(-1, n), col_scale=qw.scales)
    dx = (qg.double() * sg.double()[:, None]) @ qw.data.double()
    return y.reshape(*x.shape[:-1], n), dx.reshape(x.shape)


def needs_fp8_tensor_cores() -> None:
    from offsite_kernels.ops.fp8_linear import has_fp8_tensor_cores

    if not has_fp8_tensor_cores(torch.device("cuda")):
        pytest.skip(f"{torch.cuda.get_device_name()} has no fp8 tensor cores (compute capability < 8.9)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [8, 4, "fp8", None])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 257, 384), (37, 130, 640), (1029, 515, 1152)])
def test_frozen_linear_forward_and_input_grad(fmt, m, n, k, dtype):
    from offsite_kernels.ops.fp8_linear import uses_fp8_gemm

    w = rand(n, k, seed=1) * 0.05
    qw = ok.quantize_weight(w, bits=fmt, group_size=128) if fmt is not None else w.to(dtype)
    w_hat = (qw.dequantize() if fmt is not None else qw).double()
    bias = rand(n, seed=2)
    x = rand(3, m, k, seed=3, dtype=dtype)[:, :, :]  # 3-D
    x = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # non-contiguous
    y = ok.frozen_linear(x, qw, bias)
    grad_y = rand(*y.shape, seed=4, dtype=dtype)
    if fmt == "fp8" and uses_fp8_gemm(x):  # sm_89+ with bf16/fp16: the activations are quantized too
        ref, grad_ref = fp8_gemm_refs(x, qw, bias, grad_y)
    else:
        ref, grad_ref = x.detach().double() @ w_hat.t() + bias.double(), grad_y.double() @ w_hat
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert rel_err(grad_x, grad_ref) < TOL[dtype]


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("fmt", [4, None])
@pytest.mark.parametrize("m", [1, 1029])
def test_frozen_linear_fp32_runs_on_its_own_tiles(fmt, m, tf32, monkeypatch):
    """fp32 activations: TF32 tensor cores where PyTorch allows them, else exact fp32 FMAs, each on its own
    tile list (the 16-bit tiles spill or overflow shared memory on fp32 operands). Few cases: each compiles its
    own kernels, and the suite's test stage has two minutes (exact fp32 on every format: the test above)."""
    from offsite_kernels.ops import frozen_linear_triton as flt

    monkeypatch.setattr(flt, "tf32_enabled", lambda: tf32)
    n, k = 515, 1152
    w = rand(n, k, seed=1) * 0.05
    qw = ok.quantize_weight(w, bits=fmt, group_size=128) if fmt is not None else w
    w_hat = (qw.dequantize() if fmt is not None else qw).double()
    x = rand(m, k, seed=5).requires_grad_(True)
    y = ok.frozen_linear(x, qw)
    grad_y = rand(*y.shape, seed=6)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    # exact fp32 rounds each product like the float64 reference up to fp32 sums (~1e-6 here); TF32 rounds the
    # operands to 10 mantissa bits (~5e-4): the exact bound would catch a kernel that silently ran TF32
    tol = 1e-2 if tf32 else 5e-5
    assert rel_err(y, x.detach().double() @ w_hat.t()) < tol
    assert rel_err(grad_x, grad_y.double() @ w_hat) < tol
    arch, operands = flt.gpu_arch(torch.cuda.current_device()), flt.TF32 if tf32 else flt.FP32
    for direction in ("fwd", "bwd"):
        chosen = flt._key(flt.autotuned_launch(direction, arch).last_config)
        assert chosen in {flt._key(c) for c in flt.candidate_configs(direction, qw.format if fmt else "dense", arch, operands)}


@pytest.mark.parametrize("fmt", [8, 4, None])
def test_frozen_linear_cached_configuration_launches_match(fmt, monkeypatch):
    """After a key's first launch through Triton's autotuner, launches of that key go straight to the kernel
    with the chosen configuration (ops/triton_launch.CachedAutotune): same results, no autotuner call."""
    from offsite_kernels.ops import frozen_linear_triton as flt

    tuner_runs = []
    arch = flt.gpu_arch(torch.cuda.current_device())
    fwd, bwd = flt.autotuned_launch("fwd", arch), flt.autotuned_launch("bwd", arch)
    real_run = type(fwd.tuned).run
    monkeypatch.setattr(type(fwd.tuned), "run", lambda self, *a, **kw: tuner_runs.append(1) or real_run(self, *a, **kw))
    n, k = 515, 1152
    w = rand(n, k, seed=1) * 0.05
    qw = ok.quantize_weight(w, bits=fmt, group_size=128) if fmt is not None else w.to(torch.bfloat16)
    w_hat = (qw.dequantize() if fmt is not None else qw).double()
    for i, m in enumerate((700, 1000, 999)):  # one M bucket (1024): the first launch of each direction tunes
        x = rand(2, m // 2, k, seed=10 + i, dtype=torch.bfloat16).requires_grad_(True)
        y = ok.frozen_linear(x, qw)
        grad_y = rand(*y.shape, seed=20 + i, dtype=torch.bfloat16)
        (grad_x,) = torch.autograd.grad(y, x, grad_y)
        assert rel_err(y, x.detach().double() @ w_hat.t()) < TOL[torch.bfloat16]
        assert rel_err(grad_x, grad_y.double() @ w_hat) < TOL[torch.bfloat16]
        if i == 0:
            first = len(tuner_runs)  # 0 when an earlier test already tuned this key, else 2 (fwd and bwd)
    assert len(tuner_runs) == first  # the later launches took the cached configuration
    assert fwd.last_config is not None and bwd.last_config is not None


@pytest.mark.parametrize("fmt", [4, 8, None])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_frozen_linear_split_k_for_few_tokens_matches(fmt, m, monkeypatch):
    """At M <= 16 the automatic split-K (frozen_linear_triton.split_length) splits K in the forward and N in
    the input gradient on a real GPU: same math as the unsplit kernel, bit-identical from run to run."""
    from offsite_kernels.ops import frozen_linear_triton as flt

    monkeypatch.delenv(flt.SPLIT_ENV, raising=False)
    n, k = 1600, 2056  # GPT2-XL-like: 13-33 output tiles, far fewer than an SM count
    w = rand(n, k, seed=3) * 0.05
    qw = ok.quantize_weight(w, bits=fmt, group_size=128) if fmt is not None else w.to(torch.bfloat16)
    w_hat = (qw.dequantize() if fmt is not None else qw).double()
    device = torch.device("cuda", torch.cuda.current_device())
    fmt_name = qw.format if fmt is not None else "dense"
    half = flt.HALF  # bf16 activations
    assert flt.split_length(m, n, k, device, "fwd", fmt_name, half) < k
    assert flt.split_length(m, k, n, device, "bwd", fmt_name, half) < n
    bias = rand(n, seed=4, dtype=torch.bfloat16)
    x = rand(m, k, seed=5, dtype=torch.bfloat16).requires_grad_(True)
    grad_y = rand(m, n, seed=6, dtype=torch.bfloat16)
    y = ok.frozen_linear(x, qw, bias)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert rel_err(y, x.detach().double() @ w_hat.t() + bias.double()) < TOL[torch.bfloat16]
    assert rel_err(grad_x, grad_y.double() @ w_hat) < TOL[torch.bfloat16]
    y2 = ok.frozen_linear(x, qw, bias)
    (grad_x2,) = torch.autograd.grad(y2, x, grad_y)
    assert torch.equal(y, y2) and torch.equal(grad_x, grad_x2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("col_scale", [False, True])
def test_fp8_row_quantization_is_bit_exact_on_the_gpu(dtype, col_scale):
    """The hardware's saturating e4m3 cast (F2FP.SATFINITE.E4M3) and torch's CUDA cast agree bit for bit."""
    needs_fp8_tensor_cores()
    from offsite_kernels.ops.fp8_gemm_triton import quantize_rows_fp8_triton
    from offsite_kernels.quant.formats import quantize_rows_fp8

    x = rand(517, 4099, seed=20) * torch.logspace(-3, 3, 4099, device="cuda")
    x[3] = 0.0
    grid = torch.arange(256, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[1:] + grid[:-1]) / 2
    x[5] = 0.0
    x[5, : len(ties)] = ties
    x[5, -1] = 448.0  # scale 1: the ties stay ties (without a column scale)
    x = x.to(dtype)
    c = rand(4099, seed=21).abs() + 0.05 if col_scale else None
    q, s = quantize_rows_fp8_triton(x, c)
    q_ref, s_ref = quantize_rows_fp8(x, c)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_mode", ["cache", "transpose", "strided"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 257, 384), (37, 130, 1000), (1029, 515, 1152), (257, 4096, 11008)])
def test_fp8_tensor_core_path_matches_float64(m, n, k, weight_mode, dtype, monkeypatch):
    """The fp8 GEMMs (forward, backward in every weight layout) against float64 of the same math; K = 11008
    checks Hopper's reduced-precision fp8 accumulation over a Llama-2-7B down_proj reduction."""
    needs_fp8_tensor_cores()
    from offsite_kernels.ops import fp8_gemm_triton

    monkeypatch.setenv("OFFSITE_FP8_BWD_WEIGHT", weight_mode)
    qw = ok.quantize_weight(rand(n, k, seed=22) * 0.05, bits="fp8")
    bias = rand(n, seed=23)
    x = rand(m, k, seed=24, dtype=dtype).requires_grad_(True)
    calls = []
    for name in ("fp8_linear_fwd", "fp8_linear_bwd"):
        real = getattr(fp8_gemm_triton, name)
        monkeypatch.setattr(fp8_gemm_triton, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    y = ok.frozen_linear(x, qw, bias)
    grad_y = rand(m, n, seed=25, dtype=dtype)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert calls == ["fp8_linear_fwd", "fp8_linear_bwd"]  # sm_89+ with bf16/fp16 takes the fp8 tensor cores
    ref, grad_ref = fp8_gemm_refs(x, qw, bias, grad_y)
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]
    assert rel_err(grad_x, grad_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 4096), (333, 1600), (2049, 2048)])
def test_norms(rows, hidden, residual, dtype):
    x = rand(rows, hidden, seed=5, dtype=dtype).requires_grad_(True)
    res = rand(rows, hidden, seed=6, dtype=dtype).requires_grad_(True) if residual else None
    w, b = 1 + 0.1 * rand(hidden, seed=7), 0.1 * rand(hidden, seed=8)
    h64 = x.detach().double() + (res.detach().double() if residual else 0)
    for name in ("rms", "layer"):
        if name == "rms":
            out = rms_norm(x, w, 1e-6, residual=res)
            ref = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        else:
            out = layer_norm(x, w, b, 1e-5, residual=res)
            ref = torch.nn.functional.layer_norm(h64, (hidden,), w.double(), b.double(), 1e-5)
        y = out[0] if residual else out
        assert rel_err(y, ref) < TOL[dtype], name
        grad_y = rand(rows, hidden, seed=9, dtype=dtype)
        (grad_x,) = torch.autograd.grad(y, x, grad_y)
        h_ref = h64.clone().requires_grad_(True)
        if name == "rms":
            y_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        else:
            y_ref = torch.nn.functional.layer_norm(h_ref, (hidden,), w.double(), b.double(), 1e-5)
        (grad_ref,) = torch.autograd.grad(y_ref, h_ref, grad_y.double())
        assert rel_err(grad_x, grad_ref) < TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 3, 1000), (4097, 11008)])
def test_activations(shape, dtype):
    x = rand(*shape, seed=10, dtype=dtype).requires_grad_(True)
    up = rand(*shape, seed=11, dtype=dtype).requires_grad_(True)
    bias = rand(shape[-1], seed=12, dtype=dtype)
    x64, up64 = x.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    cases = [
        (bias_gelu(x, bias), torch.nn.functional.gelu(x64 + bias.double())),
        (bias_gelu(x, bias, approximate="tanh"), torch.nn.functional.gelu(x64 + bias.double(), approximate="tanh")),
        (swiglu(x, up), torch.nn.functional.silu(x64) * up64),
        (geglu(x, up, approximate="tanh"), torch.nn.functional.gelu(x64, approximate="tanh") * up64),
    ]
    for out, ref in cases:
        assert rel_err(out, ref) < TOL[dtype]
        grad = rand(*shape, seed=13, dtype=dtype)
        got = torch.autograd.grad(out, [x, up], grad, allow_unused=True)
        want = torch.autograd.grad(ref, [x64, up64], grad.double(), allow_unused=True)
        for g, r in zip(got, want, strict=True):
            if r is not None:
                assert rel_err(g, r) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "hidden", "vocab", "chunk"), [(333, 256, 50272, None), (1025, 128, 32000, 96)])
def test_fused_head(tokens, hidden, vocab, chunk, dtype):
    h = (rand(1, tokens, hidden, seed=14) * 0.5).to(dtype).requires_grad_(True)
    w = (rand(vocab, hidden, seed=15) * 0.05).to(dtype)
    labels = torch.randint(0, vocab, (1, tokens), device="cuda", generator=torch.Generator(device="cuda").manual_seed(16))
    labels[0, ::7] = -100
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk)
    h64 = h.detach().double().requires_grad_(True)
    logits = h64[:, :-1] @ w.double().t()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(loss) - float(ref)) / float(ref) < TOL[dtype]
    (grad,) = torch.autograd.grad(loss, h)
    (grad_ref,) = torch.autograd.grad(ref, h64)
    assert rel_err(grad, grad_ref) < 2 * TOL[dtype]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_launch_on_their_inputs_device_not_the_current_one(dtype, monkeypatch):
    """Inputs on cuda:1 while cuda:0 is current: Triton launches on the current device, so each launcher must switch
    (ops/triton_launch.on_input_device). Every launch sees cuda:1 current (peer access could otherwise hide a
    launch on cuda:0); every op against float64 on the inputs' device; the current device stays."""
    from triton.runtime.jit import JITFunction

    assert torch.cuda.current_device() == 0
    launched_on = []
    real_run = JITFunction.run
    monkeypatch.setattr(
        JITFunction, "run", lambda self, *a, **kw: launched_on.append(torch.cuda.current_device()) or real_run(self, *a, **kw)
    )
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(31)
    x = torch.randn(37, 640, device=dev, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(130, 640, device=dev, generator=g) * 0.05
    grad_y = torch.randn(37, 130, device=dev, generator=g).to(dtype)
    for bits in (None, 8, 4):
        qw = ok.quantize_weight(w, bits=bits, group_size=128) if bits else w.to(dtype)
        w64 = (qw.dequantize() if bits else qw).double()
        for rows in (37, 3):  # 3 tokens: the split-K launches and their reduction
            y = ok.frozen_linear(x[:rows], qw)
            (grad_x,) = torch.autograd.grad(y, x, grad_y[:rows])
            assert y.device == dev and rel_err(y, x[:rows].detach().double() @ w64.t()) < TOL[dtype], bits
            assert rel_err(grad_x[:rows], grad_y[:rows].double() @ w64) < TOL[dtype], bits
    hidden = x.shape[-1]
    weight = 1 + 0.1 * torch.randn(hidden, device=dev, generator=g)
    x64 = x.detach().double()
    y = rms_norm(x, weight, 1e-6)
    assert rel_err(y, x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()) < TOL[dtype]
    grad_y = torch.randn(y.shape, device=dev, generator=g).to(dtype)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    x64_leaf = x64.clone().requires_grad_(True)
    y64 = x64_leaf * torch.rsqrt(x64_leaf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    (grad_ref,) = torch.autograd.grad(y64, x64_leaf, grad_y.double())
    assert grad_x.device == dev and rel_err(grad_x, grad_ref) < TOL[dtype]
    y = layer_norm(x, weight, None, 1e-5)
    assert rel_err(y, torch.nn.functional.layer_norm(x64, (hidden,), weight.double(), None, 1e-5)) < TOL[dtype]
    bias = torch.randn(hidden, device=dev, generator=g).to(dtype)
    assert rel_err(bias_gelu(x, bias), torch.nn.functional.gelu(x64 + bias.double())) < TOL[dtype]
    assert rel_err(swiglu(x, x), torch.nn.functional.silu(x64) * x64) < TOL[dtype]
    labels = torch.randint(0, 130, (1, 37), device=dev, generator=g)
    loss = fused_linear_cross_entropy(x.unsqueeze(0), w.to(dtype), labels)
    logits = x64[:-1] @ w.to(dtype).double().t()
    ref = torch.nn.functional.cross_entropy(logits, labels[0, 1:])
    assert abs(float(loss) - float(ref)) / float(ref) < TOL[dtype]
    assert torch.cuda.current_device() == 0
    assert len(launched_on) >= 10 and set(launched_on) == {1}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("bits", [None, 4])
def test_fast_emulator_matches_the_plain_one_on_the_gpu(model_type, bits):
    """Same loss and adapter gradients through the fast frozen blocks (Triton) as through the plain ones."""
    from offsite_kernels.tiny import tiny_model

    overrides = {
        "llama": dict(hidden_size=256, intermediate_size=640),
        "gpt2": dict(n_embd=256),
        "opt": dict(hidden_size=256, ffn_dim=640),
    }
    model = tiny_model(model_type, n_layers=6, seed=3, **overrides[model_type]).cuda()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 67), device="cuda", generator=torch.Generator(device="cuda").manual_seed(17)
    )
    results = []
    for fast in (False, True):
        emu = ok.make_emulator(
            model, bottom=1, top=1, emulator_layers=2, bits=bits, fast=fast, recompute="full" if fast else None
        )
        emu.train()
        loss = emu(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, list(emu.adapter_parameters()))
        results.append((loss.detach(), grads))
    (loss_plain, grads_plain), (loss_fast, grads_fast) = results
    assert abs(float(loss_fast) - float(loss_plain)) < 1e-3 * float(loss_plain)
    for g_fast, g_plain in zip(grads_fast, grads_plain, strict=True):
        assert rel_err(g_fast, g_plain) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [8, 4, "fp8", None])
@pytest.mark.parametrize(("counts", "n", "k"), [((0, 1, 37, 300, 5), 130, 640), ((3000, 0, 17, 2049), 515, 1152)])
def test_grouped_frozen_linear_forward_and_input_grad(fmt, counts, n, k, dtype):
    """Experts' rows sorted by expert (an empty expert, one of a single row, many spanning tiles; 7 rows routed
    nowhere), the grouped kernels against float64 of each expert's dequantized weight."""
    from offsite_kernels.ops.grouped_linear import grouped_frozen_linear

    experts, unrouted = len(counts), 7
    w = rand(experts * n, k, seed=5) * 0.05
    qw = ok.quantize_weight(w, bits=fmt, group_size=128) if fmt is not None else w.to(dtype)
    w_hat = (qw.dequantize() if fmt is not None else qw).double()
    bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
    offsets = torch.tensor(bounds, device="cuda")
    x = rand(bounds[-1] + unrouted, k, seed=6, dtype=dtype).requires_grad_(True)
    y = grouped_frozen_linear(x, offsets, qw, experts)
    grad_y = rand(*y.shape, seed=7, dtype=dtype)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    ref, grad_ref = (
        torch.zeros(y.shape, dtype=torch.float64, device="cuda"),
        torch.zeros(x.shape, dtype=torch.float64, device="cuda"),
    )
    for e in range(experts):
        lo, hi, w_e = bounds[e], bounds[e + 1], w_hat[e * n : (e + 1) * n]
        ref[lo:hi], grad_ref[lo:hi] = x[lo:hi].detach().double() @ w_e.t(), grad_y[lo:hi].double() @ w_e
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype] and rel_err(grad_x, grad_ref) < TOL[dtype]
    assert not y[-unrouted:].any() and not grad_x[-unrouted:].any()


@pytest.mark.parametrize("bits", [4, 8])
def test_low_bit_experts_run_without_a_host_sync_and_replay_as_a_cuda_graph(bits, monkeypatch):
    """By default (no forced backend) low-bit experts in bf16 take the grouped kernels, with no host
    synchronisation (CUDA's sync debug mode raises on one), and a captured CUDA graph replays them exactly."""
    from offsite_kernels.nn import FrozenExperts

    monkeypatch.delenv("OFFSITE_BACKEND")
    e, h, inner, tokens, k = 8, 256, 384, 301, 2
    gate_up, down = rand(e, 2 * inner, h, seed=8) * 0.05, rand(e, h, inner, seed=9) * 0.05
    dense = FrozenExperts(gate_up.to(torch.bfloat16), down.to(torch.bfloat16))
    experts = FrozenExperts.from_module(dense, "silu", bits=bits, group_size=128)
    g = torch.Generator(device="cuda").manual_seed(10)
    x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, generator=g)
    index = torch.randint(0, e, (tokens, k), device="cuda", generator=g)
    weights = torch.rand(tokens, k, device="cuda", generator=g).to(torch.bfloat16)
    expected = experts(x, index, weights)  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert torch.equal(experts(x, index, weights), expected)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        experts(x, index, weights)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = experts(x, index, weights)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expected)
