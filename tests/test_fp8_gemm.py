"""The fp8 tensor-core path of the frozen linear (activations quantized per row, GEMM on e4m3).

On a CPU the Triton kernels run in Triton's interpreter; ``OFFSITE_FP8_GEMM=on`` takes the fp8 GEMM
math without fp8 tensor cores. Every result is compared with a float64 reference of the same math:
the codes and scales of the PyTorch quantizer (``quant.formats.quantize_rows_fp8``), multiplied in
float64. The row quantization itself must be bit-exact with that quantizer (torch's e4m3 cast).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import forward_saving_only_weights, gen

import offsite_kernels as ok
from offsite_kernels.errors import BackendError
from offsite_kernels.ops import fp8_linear
from offsite_kernels.quant.formats import quantize_rows_fp8

fl_ops = importlib.import_module("offsite_kernels.ops.frozen_linear")
M, N, K = 37, 53, 203  # odd: no multiple of a block; K spans several interpreter blocks of the quantizer
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # max |err| / max |ref|, output rounding included
DTYPES = list(TOLERANCE)


def _triton():
    pytest.importorskip("triton")
    from offsite_kernels.ops import fp8_gemm_triton

    return fp8_gemm_triton


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _grid() -> torch.Tensor:
    """Every finite e4m3 value, ascending."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v[torch.isfinite(v)].unique()


def _rows_with_edge_cases(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(M, K, generator=gen(1)) * torch.logspace(-4, 4, K)[torch.randperm(K, generator=gen(2))]
    x[3] = 0.0  # an all-zero row: a tiny scale, zero codes, no NaN
    x[5, 7] = -0.0
    x[6, 10:] = 1e-3  # many equal values
    x[7, :] = 0
    x[7, 11] = -2.5  # one non-zero value: it maps to -448 exactly
    return x.to(dtype)


def _ref64_fwd(x2, qw, bias):
    q, s = quantize_rows_fp8(x2)
    w = qw.data.double() * qw.scales.double()[:, None]
    return (q.double() * s.double()[:, None]) @ w.T + (0 if bias is None else bias.double())


def _ref64_bwd(g2, qw):
    q, s = quantize_rows_fp8(g2, col_scale=qw.scales)
    return (q.double() * s.double()[:, None]) @ qw.data.double()


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "NaN or inf in the output (an element left unwritten?)"
    return float((actual.detach().double() - reference).abs().max() / reference.abs().max())


# --- per-row quantization: bit-exact -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("col_scale", [False, True])
def test_quantize_rows_is_bit_exact_with_torch(dtype, layout, col_scale):
    kernels = _triton()
    x = _rows_with_edge_cases(dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()  # strides (1, M)
    c = torch.rand(K, generator=gen(3)) + 0.05 if col_scale else None
    q, s = kernels.quantize_rows_fp8_triton(x, c)
    q_ref, s_ref = quantize_rows_fp8(x, c)
    assert q.dtype == torch.float8_e4m3fn and q.is_contiguous() and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref)), f"{int((_bits(q) != _bits(q_ref)).sum())} codes differ"
    assert s[3] > 0 and not _bits(q[3]).any()  # the zero row
    assert float(q[7, 11]) == -448.0


def test_quantize_rows_rounds_ties_to_even_like_torch():
    kernels = _triton()
    grid = _grid()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties between neighbouring e4m3 values
    row = torch.cat([grid, mids, mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(-float("inf")))])
    row = torch.cat([row, torch.tensor([448.0])])[None]  # amax 448: the scale is exactly 1
    q, s = kernels.quantize_rows_fp8_triton(row)
    q_ref, _ = quantize_rows_fp8(row)
    assert float(s) == 1.0
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(q[0, : len(grid)].float(), grid)  # representable values pass unchanged


def test_cast_through_fp16_rounds_twice():
    """Why Triton <= 3.6 on sm_89 rounds in fp32 first (``cast_rounds_twice``): it casts fp32 -> fp16 -> e4m3,
    and 17.004 (just above the e4m3 tie 17 between 16 and 18) becomes 17 in fp16, then 16 by ties-to-even."""
    kernels = _triton()
    x = torch.tensor([17.004, -17.004, 33.0])
    assert _bits(x.to(torch.float8_e4m3fn)).tolist() != _bits(x.half().to(torch.float8_e4m3fn)).tolist()
    assert kernels.cast_rounds_twice(89) == (kernels.triton_version() < (3, 9))
    assert not kernels.cast_rounds_twice(90)


def test_interpreter_fp8_cast_still_needs_the_workaround():
    """Canary for ``ROUND_IN_FP32`` in the interpreter: Triton's interpreter rounds fp32 -> e4m3 wrongly (the mantissa
    carry is ORed into the exponent: 31.3 becomes 16). When it stops doing so, drop the flag."""
    kernels = _triton()
    from offsite_kernels.backends import triton_interpreter_enabled

    if not triton_interpreter_enabled():
        pytest.skip("runs the interpreter's cast")
    x = torch.tensor([[31.3, -125.0, 448.0, 0.3]])
    q = torch.empty(1, 4, dtype=torch.float8_e4m3fn)
    s = torch.empty(1)
    kernels._fp8_quantize_rows_kernel[(1,)](x, s, q, s, 4, 4, 1, 4, HAS_COL_SCALE=False, ROUND_IN_FP32=False, BLOCK_K=4)
    if torch.equal(_bits(q), _bits(quantize_rows_fp8(x)[0])):
        pytest.skip("the interpreter's e4m3 cast is exact now: the interpreter can drop ROUND_IN_FP32")
    assert float(q[0, 0]) == 16.0  # the known bug, documented in fp8_gemm_triton's module docs


# --- the GEMM launchers: poisoned outputs, odd shapes, both layouts --------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, M])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_forward_kernel_matches_float64(dtype, m, with_bias):
    kernels = _triton()
    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(10 + m)), bits="fp8")
    x = torch.randn(m, K, generator=gen(11 + m)).to(dtype)
    bias = torch.randn(N, generator=gen(12)) if with_bias else None
    y = torch.full((m, N), float("nan"), dtype=dtype)
    kernels.fp8_linear_fwd(x, qw.data.view(torch.uint8), qw.scales, bias, out=y)
    assert rel_error(y, _ref64_fwd(x, qw, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["cache", "transpose", "strided"])
def test_fp8_input_grad_kernel_matches_float64(dtype, mode):
    kernels = _triton()
    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(20)), bits="fp8")
    g = torch.randn(N, M, generator=gen(21)).to(dtype).t()  # non-contiguous dY
    dx = torch.full((M, K), float("nan"), dtype=dtype)
    kernels.fp8_linear_bwd(g, qw.data, qw.scales, out=dx, weight_mode=mode)
    assert rel_error(dx, _ref64_bwd(g, qw)) < TOLERANCE[dtype]


def test_gemm_of_zero_rows_is_the_bias():
    kernels = _triton()
    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(30)), bits="fp8")
    bias = torch.randn(N, generator=gen(31))
    x = torch.zeros(4, K, dtype=torch.bfloat16)
    y = kernels.fp8_linear_fwd(x, qw.data, qw.scales, bias)
    assert torch.equal(y, bias.to(torch.bfloat16).expand(4, N))


def test_cached_transposed_weight_is_reused_and_refreshed():
    kernels = _triton()
    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(40)), bits="fp8")
    view = qw.data.view(torch.uint8)  # what crosses the custom op boundary
    first = kernels.bwd_weight_operand(view, "cache")
    assert torch.equal(_bits(first), _bits(qw.data.t().contiguous())) and first.is_contiguous()
    assert kernels.bwd_weight_operand(qw.data.view(torch.uint8), "cache") is first  # kept on the stored tensor
    with torch.no_grad():
        qw.data.view(torch.uint8)[0, 0] ^= 1  # the weight written in place: the copy is stale
    again = kernels.bwd_weight_operand(view, "cache")
    assert again is not first and torch.equal(_bits(again), _bits(qw.data.t().contiguous()))
    assert kernels.bwd_weight_operand(view, "strided").data_ptr() == qw.data.data_ptr()  # a view, no copy
    with torch.inference_mode():
        w = torch.randn(8, 16).to(torch.float8_e4m3fn)
    assert torch.equal(_bits(kernels.bwd_weight_operand(w, "cache")), _bits(w.t().contiguous()))  # no version: no cache


def test_bad_bwd_weight_mode_is_named(monkeypatch):
    kernels = _triton()
    monkeypatch.setenv("OFFSITE_FP8_BWD_WEIGHT", "sideways")
    with pytest.raises(ValueError, match="OFFSITE_FP8_BWD_WEIGHT"):
        kernels.bwd_weight_operand(torch.zeros(4, 4, dtype=torch.float8_e4m3fn))


# --- the public path with OFFSITE_FP8_GEMM=on (torch reference and Triton kernels) ----------
@pytest.fixture
def fp8_on(monkeypatch):
    monkeypatch.setenv("OFFSITE_FP8_GEMM", "on")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, with_bias", [("2d", True), ("3d", False), ("transposed", False), ("strided3d", True)])
def test_frozen_linear_fp8_gemm_matches_float64(backend, fp8_on, dtype, case, with_bias):
    g = gen(50)
    x = {
        "2d": lambda: torch.randn(M, K, generator=g),
        "3d": lambda: torch.randn(3, 5, K, generator=g),
        "transposed": lambda: torch.randn(K, M, generator=g).t(),
        "strided3d": lambda: torch.randn(2, 7, 2 * K, generator=g)[..., ::2],
    }[case]().to(dtype)
    x.requires_grad_(True)
    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(51)), bits="fp8")
    bias = torch.randn(N, generator=gen(52)) if with_bias else None
    y = ok.frozen_linear(x, qw, bias)
    x2 = x.detach().reshape(-1, K)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    assert rel_error(y.reshape(-1, N), _ref64_fwd(x2, qw, bias)) < TOLERANCE[dtype]
    grad_y = torch.randn(y.shape, generator=gen(53)).to(dtype)
    y.backward(grad_y)
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert rel_error(x.grad.reshape(-1, K), _ref64_bwd(grad_y.reshape(-1, N), qw)) < TOLERANCE[dtype]


def test_reference_and_kernels_agree(fp8_on, monkeypatch):
    """The torch backend of the fp8 GEMM math (the oracle) and the Triton kernels: same codes, same math."""
    _triton()
    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(60)), bits="fp8")
    x = torch.randn(M, K, generator=gen(61)).to(torch.float16)
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("OFFSITE_BACKEND", backend)
        out[backend] = ok.frozen_linear(x, qw)
    assert rel_error(out["triton"], out["torch"].double()) < 2e-3


@pytest.mark.parametrize("mode", ["on", "off"])
def test_opcheck_on_the_fp8_paths(backend, monkeypatch, mode):
    monkeypatch.setenv("OFFSITE_FP8_GEMM", mode)
    qw = ok.quantize_weight(torch.randn(24, 70), bits="fp8")
    x = torch.randn(2, 5, 70, dtype=torch.bfloat16, requires_grad=True)
    data = fl_ops._to_op_storage(qw.format, qw.data)
    args = (x, data, qw.scales, qw.zeros, torch.randn(24), qw.format, qw.group_size, 24)
    torch.library.opcheck(fl_ops._frozen_linear_op, args)
    grad_args = (torch.randn(2, 5, 24, dtype=torch.bfloat16), data, qw.scales, qw.zeros, qw.format, qw.group_size, 70)
    torch.library.opcheck(fl_ops._frozen_linear_input_grad_op, grad_args)


def test_torch_compile_traces_the_fp8_gemm_path(fp8_on, monkeypatch):
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")
    layer = ok.nn.FrozenLinear.from_linear(torch.nn.Linear(48, 24), bits="fp8")
    fn = lambda t: layer(torch.relu(t)).float().square().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 48, dtype=torch.bfloat16, requires_grad=True)
    compiled(x).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    fn(x_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_autograd_saves_no_activation_on_the_fp8_gemm_path(fp8_on):
    layer = ok.nn.FrozenLinear.from_linear(torch.nn.Linear(K, N), bits="fp8")
    x = torch.randn(3, 11, K, dtype=torch.bfloat16, requires_grad=True)
    y = forward_saving_only_weights(layer, x)
    y.sum().backward()
    assert x.grad is not None and all(b.grad is None for b in layer.buffers())


# --- the policy -------------------------------------------------------------------------------
def test_policy_auto_on_off(monkeypatch):
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    monkeypatch.delenv("OFFSITE_FP8_GEMM", raising=False)
    assert not fp8_linear.uses_fp8_gemm(x)  # a CPU has no fp8 tensor cores: weight-only fp8
    monkeypatch.setattr(fp8_linear, "has_fp8_tensor_cores", lambda device: True)
    assert fp8_linear.uses_fp8_gemm(x) and fp8_linear.uses_fp8_gemm(x.half())
    assert not fp8_linear.uses_fp8_gemm(x.float())  # fp32 activations keep full precision
    monkeypatch.setenv("OFFSITE_FP8_GEMM", "off")
    assert not fp8_linear.uses_fp8_gemm(x)
    monkeypatch.setenv("OFFSITE_FP8_GEMM", "on")
    monkeypatch.setattr(fp8_linear, "has_fp8_tensor_cores", lambda device: False)
    assert fp8_linear.uses_fp8_gemm(x) and not fp8_linear.uses_fp8_gemm(x.float())
    monkeypatch.setenv("OFFSITE_FP8_GEMM", "maybe")
    with pytest.raises(BackendError, match="OFFSITE_FP8_GEMM='maybe'"):
        fp8_linear.uses_fp8_gemm(x)


def test_tensor_core_check_reads_the_compute_capability(monkeypatch):
    assert not fp8_linear.has_fp8_tensor_cores(torch.device("cpu"))
    for cap, expected in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert fp8_linear.has_fp8_tensor_cores(torch.device("cuda", 0)) is expected


def test_triton_fp8_gemm_on_an_old_gpu_is_refused(monkeypatch):
    class FakeCudaTensor:
        is_cuda = True
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(BackendError, match=r"compute capability >= 8\.9.*A100 is 8\.0"):
        fp8_linear._check_triton_device(FakeCudaTensor())


def test_gemm_autotuning_keeps_the_devices_own_tiles():
    kernels = _triton()
    for target in kernels.GEMM_CANDIDATES:
        own = {kernels._key(c) for c in kernels.gemm_configs(target)}
        assert {kernels._key(c) for c in kernels.autotuned_gemm(target).tuned.configs} == own  # one autotuner per class
        for m in (1, 37, 64, 65, 4096, 20000):
            kept = kernels._pruner(target)(kernels.gemm_configs(), {"M_BUCKET": kernels.m_bucket(m)})
            assert kept and {kernels._key(c) for c in kept} <= own
            if m <= 64:
                assert len({c.kwargs["BLOCK_M"] for c in kept}) == 1  # the shortest tiles only
            else:
                assert {kernels._key(c) for c in kept} == own


def test_gpu_target_reads_capability_and_shared_memory(monkeypatch):
    kernels = _triton()

    class Props:
        def __init__(self, smem: int) -> None:
            self.shared_memory_per_block_optin = smem

    cases = (((9, 0), 227 * 1024, 90), ((8, 9), 99 * 1024, 89), ((12, 0), 99 * 1024, 89), ((10, 0), 227 * 1024, 100))
    for cap, smem, expected in cases:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, cap=cap: cap)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None, smem=smem: Props(smem))
        assert kernels.gpu_target.__wrapped__(0) == expected


def test_autotuner_prunes_and_keys_on_the_launch_arguments():
    """Through Triton's own Autotuner: its pruner sees only the positional arguments (the constexprs come as
    keyword arguments), so what the pruner and the key read must be positional or keyword as launched."""
    kernels = _triton()
    tuner = kernels.autotuned_gemm(90).tuned
    a = torch.zeros(5000, 64, dtype=torch.float8_e4m3fn)
    b = torch.zeros(48, 64, dtype=torch.float8_e4m3fn)
    c = torch.empty(5000, 48, dtype=torch.bfloat16)
    args, meta = kernels._launch_args(a, torch.ones(5000), b, torch.ones(48), None, c)
    assert set(meta) | set(tuner.arg_names[: len(args)]) >= set(tuner.keys)
    tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
    try:
        pruned = tuner.prune_configs(meta)
    finally:
        tuner.nargs = None
    assert {kernels._key(c) for c in pruned} == set(kernels.GEMM_CANDIDATES[90])
