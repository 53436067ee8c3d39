"""Grouped frozen linear (a mixture of experts' projections): every format, dtype and backend against float64."""

import importlib

import pytest
import torch
from conftest import gen

import offsite_kernels as ok
from offsite_kernels.ops.frozen_linear import FrozenLinearInputError
from offsite_kernels.ops.grouped_linear import grouped_frozen_linear

gl_ops = importlib.import_module("offsite_kernels.ops.grouped_linear")
FORMATS = [None, 8, 4, "fp8"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # max |error| / max |reference|
E, N, K = 5, 37, 70  # none a multiple of a block or a group (32)
# rows per expert: an empty expert, one of a single row, two longer than the interpreter's 16-row tile; then 3 rows
# routed to no expert
COUNTS, UNROUTED = [0, 19, 1, 33, 5], 3
ROWS = sum(COUNTS) + UNROUTED


def offsets(dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(COUNTS).cumsum(0).tolist()], dtype=dtype)


def stacked(bits, seed, dtype=torch.float32):
    w = torch.randn(E * N, K, generator=gen(seed))
    return ok.quantize_weight(w.to(dtype) if bits is None else w, bits=bits, group_size=32)


def reference(x, grad_y, qw):
    """float64 ``y`` and ``dx`` of the same math, expert by expert; rows routed nowhere stay zero."""
    w = qw.dequantize().double()
    y, dx = torch.zeros(x.shape[0], N, dtype=torch.float64), torch.zeros(x.shape, dtype=torch.float64)
    bounds = offsets().tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        y[lo:hi] = x[lo:hi].double() @ w[e * N : (e + 1) * N].T
        dx[lo:hi] = grad_y[lo:hi].double() @ w[e * N : (e + 1) * N]
    return y, dx


def rel_error(actual, expected):
    assert not torch.isnan(actual).any(), "NaN in output"
    return float((actual.detach().double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_forward_and_input_gradient_match_float64(backend, bits, dtype, layout):
    seed = FORMATS.index(bits) * 10 + DTYPES.index(dtype)
    qw = stacked(bits, seed, dtype)
    x = torch.randn(ROWS, K, generator=gen(seed + 1)).to(dtype)
    if layout == "transposed":  # strides (1, ROWS): not contiguous in the reduction dimension
        x = torch.randn(K, ROWS, generator=gen(seed + 1)).to(dtype).t()
    x.requires_grad_(True)
    y = grouped_frozen_linear(x, offsets(), qw, E)
    assert y.shape == (ROWS, N) and y.dtype == dtype
    grad_y = torch.randn(ROWS, N, generator=gen(seed + 2)).to(dtype)
    y.backward(grad_y)
    y64, dx64 = reference(x.detach(), grad_y, qw)
    assert rel_error(y, y64) < TOLERANCE[dtype] and rel_error(x.grad, dx64) < TOLERANCE[dtype]
    assert not y[-UNROUTED:].any() and not x.grad[-UNROUTED:].any()  # routed nowhere: exactly zero


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_write_every_output_row(bits, dtype):
    """Into outputs poisoned with NaN: every row is written, the rows routed nowhere as zeros."""
    pytest.importorskip("triton")
    from offsite_kernels.ops.grouped_linear_triton import grouped_linear_bwd, grouped_linear_fwd

    qw = stacked(bits, 40, dtype)
    data = gl_ops._to_op_storage(qw.format, qw.data)
    fields = (data, qw.scales, qw.zeros, qw.format, qw.group_size, E)
    x, dy = torch.randn(ROWS, K, generator=gen(41)).to(dtype), torch.randn(ROWS, N, generator=gen(42)).to(dtype)
    y, dx = torch.full((ROWS, N), float("nan"), dtype=dtype), torch.full((ROWS, K), float("nan"), dtype=dtype)
    grouped_linear_fwd(x, offsets(torch.int32), *fields, N, out=y)
    grouped_linear_bwd(dy, offsets(torch.int32), *fields, K, out=dx)
    y64, dx64 = reference(x, dy, qw)
    assert rel_error(y, y64) < TOLERANCE[dtype] and rel_error(dx, dx64) < TOLERANCE[dtype]
    assert not y[-UNROUTED:].any() and not dx[-UNROUTED:].any()


def test_the_forced_triton_backend_runs_the_grouped_kernels_and_the_default_cpu_path_runs_each_expert(monkeypatch):
    pytest.importorskip("triton")
    from offsite_kernels.ops import grouped_linear_triton as kernels

    calls = []
    real_fwd, real_bwd = kernels.grouped_linear_fwd, kernels.grouped_linear_bwd
    monkeypatch.setattr(kernels, "grouped_linear_fwd", lambda *a, **k: calls.append("fwd") or real_fwd(*a, **k))
    monkeypatch.setattr(kernels, "grouped_linear_bwd", lambda *a, **k: calls.append("bwd") or real_bwd(*a, **k))
    qw = stacked(4, 43)
    x = torch.randn(ROWS, K, generator=gen(44), requires_grad=True)
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    grouped_frozen_linear(x, offsets(), qw, E).sum().backward()
    assert calls == ["fwd", "bwd"]
    calls.clear()
    monkeypatch.delenv("OFFSITE_BACKEND")
    expert_calls = []
    fl_ops = importlib.import_module("offsite_kernels.ops.frozen_linear")
    real_impl = fl_ops._frozen_linear_impl
    monkeypatch.setattr(gl_ops, "_frozen_linear_impl", lambda *a: expert_calls.append(a[0].shape[0]) or real_impl(*a))
    y = grouped_frozen_linear(x, offsets(), qw, E)
    assert calls == [] and expert_calls == [c for c in COUNTS if c]  # one frozen linear per expert with rows
    y64, _ = reference(x.detach(), torch.zeros(ROWS, N), qw)
    assert rel_error(y, y64) < 1e-5


@pytest.mark.parametrize("bits", FORMATS)
def test_autograd_saves_the_routing_and_the_weight_only(bits):
    qw = stacked(bits, 45)
    x = torch.randn(ROWS, K, generator=gen(46), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = grouped_frozen_linear(x, offsets(), qw, E)
    stored = {t.untyped_storage().data_ptr() for t in (qw.data, qw.scales, qw.zeros) if t is not None}
    assert saved and all(t.untyped_storage().data_ptr() in stored or t.dtype == torch.int32 for t in saved)
    assert sum(t.dtype == torch.int32 for t in saved) == 1  # the offsets
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("bits", FORMATS)
def test_opcheck(backend, bits):
    qw = stacked(bits, 47)
    data = gl_ops._to_op_storage(qw.format, qw.data)
    bounds = offsets(torch.int32)
    x = torch.randn(ROWS, K, generator=gen(48), requires_grad=True)
    torch.library.opcheck(gl_ops._grouped_op, (x, bounds, data, qw.scales, qw.zeros, qw.format, qw.group_size, E, N))
    grad_args = (torch.randn(ROWS, N, generator=gen(49)), bounds, data, qw.scales, qw.zeros, qw.format, qw.group_size, E, K)
    torch.library.opcheck(gl_ops._grouped_input_grad_op, grad_args)


def test_torch_compile_traces_without_graph_breaks():
    qw = stacked(4, 50)
    bounds = offsets()
    compiled = torch.compile(
        lambda t: grouped_frozen_linear(torch.relu(t), bounds, qw, E).square().sum(), fullgraph=True, backend="aot_eager"
    )
    x = torch.randn(ROWS, K, generator=gen(51), requires_grad=True)
    (grad,) = torch.autograd.grad(compiled(x), x)
    x2 = x.detach().clone().requires_grad_(True)
    grouped_frozen_linear(torch.relu(x2), bounds, qw, E).square().sum().backward()
    torch.testing.assert_close(grad, x2.grad)


def test_under_autocast_the_gemm_runs_in_the_autocast_dtype():
    qw = stacked(8, 52)
    x = torch.randn(ROWS, K, generator=gen(53), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_frozen_linear(x, offsets(), qw, E)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_no_rows():
    qw = stacked(8, 54)
    y = grouped_frozen_linear(torch.zeros(0, K), torch.zeros(E + 1, dtype=torch.int64), qw, E)
    assert y.shape == (0, N)


def test_bad_inputs_name_the_problem():
    qw = stacked(8, 55)
    x = torch.randn(ROWS, K)
    with pytest.raises(FrozenLinearInputError, match=r"experts \+ 1 = 6 row boundaries"):
        grouped_frozen_linear(x, offsets()[:-1], qw, E)
    with pytest.raises(FrozenLinearInputError, match="int32 or int64"):
        grouped_frozen_linear(x, offsets().float(), qw, E)
    with pytest.raises(FrozenLinearInputError, match=r"185 rows does not split into 4 experts"):
        grouped_frozen_linear(x, offsets()[:-1], qw, 4)
    with pytest.raises(FrozenLinearInputError, match=r"2-D .* \[rows, in_features\]"):
        grouped_frozen_linear(x[None], offsets(), qw, E)
    with pytest.raises(FrozenLinearInputError, match="x has 69 features"):
        grouped_frozen_linear(x[:, :-1], offsets(), qw, E)
    with pytest.raises(FrozenLinearInputError, match="requires grad"):
        grouped_frozen_linear(x, offsets(), torch.randn(E * N, K, requires_grad=True), E)
    with pytest.raises(FrozenLinearInputError, match="offsets are on meta"):
        grouped_frozen_linear(x, offsets().to("meta"), qw, E)


def test_tile_height_follows_the_mean_rows_per_expert():
    from offsite_kernels.ops.grouped_linear_triton import tile_height

    assert [tile_height(rows, 8) for rows in (0, 8, 128, 129, 256, 2048, 2049, 1 << 20)] == [16, 16, 16, 32, 32, 64, 128, 128]


def test_strided_scales_and_offsets_are_read_as_their_values(backend):
    """int4 scales and zeros that are column slices of wider buffers, and offsets that are a strided view: the same
    result as contiguous ones (the kernels read contiguous copies)."""
    from offsite_kernels.quant.weight import QuantizedWeight

    qw = stacked(4, 56)
    groups = qw.scales.shape[1]
    wide_s, wide_z = torch.zeros(E * N, groups + 3), torch.zeros(E * N, groups + 3, dtype=torch.uint8)
    wide_s[:, :groups], wide_z[:, :groups] = qw.scales, qw.zeros
    strided = QuantizedWeight("int4", qw.data, wide_s[:, :groups], wide_z[:, :groups], qw.group_size, qw.shape, qw.dtype)
    spread = torch.stack([offsets(torch.int32), torch.full((E + 1,), 999, dtype=torch.int32)], 1).reshape(-1)[::2]
    x = torch.randn(ROWS, K, generator=gen(57))
    expected = grouped_frozen_linear(x, offsets(), qw, E)
    assert torch.equal(grouped_frozen_linear(x, offsets(), strided, E), expected)
    assert not spread.is_contiguous() and torch.equal(grouped_frozen_linear(x, spread, qw, E), expected)


def test_rows_before_the_first_offset_are_zero_and_bounds_past_the_rows_stay_inside(backend):
    """Rows before ``offsets[0]`` belong to no expert (zeros, as after ``offsets[E]``); a last bound past the rows is
    clamped to them (never a write outside the output)."""
    qw = stacked(8, 58)
    x = torch.randn(12, K, generator=gen(59), requires_grad=True)
    bounds = torch.tensor([3, 5, 5, 9, 9, 40])  # rows 0..2 before expert 0; expert 4 would run past the 12 rows
    y = grouped_frozen_linear(x, bounds, qw, E)
    y.sum().backward()
    assert y.shape == (12, N) and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert not y[:3].any() and not x.grad[:3].any()
    w = qw.dequantize().double()
    assert rel_error(y[9:], x[9:].detach().double() @ w[4 * N : 5 * N].T) < 1e-5
