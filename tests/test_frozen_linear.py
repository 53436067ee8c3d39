"""Frozen linear: every format, dtype and backend against a float64 reference of the same math."""

import importlib
import zlib

import pytest
import torch
from conftest import forward_saving_only_weights, gen
from torch import nn

import offsite_kernels as ok
from offsite_kernels.ops.frozen_linear import FrozenLinearInputError

fl_ops = importlib.import_module("offsite_kernels.ops.frozen_linear")  # the package re-exports the function
FORMATS = [None, 8, 4, "fp8"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |error| / max |reference|; bf16 and fp16 include rounding the output and the weight tile
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
M, N, K = 37, 53, 203  # none a multiple of a block, a group (32) or two


def make_input(case, dtype, seed):
    g = gen(seed)
    if case == "2d":
        return torch.randn(M, K, generator=g).to(dtype)
    if case == "3d":
        return torch.randn(3, 5, K, generator=g).to(dtype)
    if case == "transposed":  # strides (1, M): not contiguous in the reduction dimension
        return torch.randn(K, M, generator=g).to(dtype).t()
    if case == "strided3d":  # every other feature of a wider tensor
        return torch.randn(2, 7, 2 * K, generator=g).to(dtype)[..., ::2]
    raise ValueError(case)


def rel_error(actual, reference):
    assert not torch.isnan(actual).any(), "NaN in output"
    reference = reference.detach()
    return float((actual.detach().double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, with_bias", [("2d", True), ("3d", False), ("transposed", True), ("strided3d", False)])
def test_forward_and_input_gradient_match_float64(backend, bits, dtype, case, with_bias):
    seed = zlib.crc32(f"{bits}-{dtype}-{case}".encode()) % 10_000  # stable across processes, unlike hash()
    w = torch.randn(N, K, generator=gen(seed + 1))
    qw = ok.quantize_weight(w, bits=bits, group_size=32)
    w64 = qw.dequantize().double()
    bias = torch.randn(N, generator=gen(seed + 2)) if with_bias else None
    x = make_input(case, dtype, seed).requires_grad_(True)
    y = ok.frozen_linear(x, qw, bias)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    ref = x.detach().double() @ w64.T + (bias.double() if with_bias else 0)
    assert rel_error(y, ref) < TOLERANCE[dtype]

    grad_y = torch.randn(y.shape, generator=gen(seed + 3)).to(dtype)
    y.backward(grad_y)
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert rel_error(x.grad, grad_y.double() @ w64) < TOLERANCE[dtype]


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 37])
def test_triton_kernels_write_every_output_element(bits, dtype, m, monkeypatch):
    pytest.importorskip("triton")
    from offsite_kernels.ops.frozen_linear_triton import frozen_linear_bwd, frozen_linear_fwd

    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(m)), bits=bits, group_size=64)
    x = torch.randn(m, K, generator=gen(m + 1)).to(dtype)
    y = torch.full((m, N), float("nan"), dtype=dtype)
    frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, None, qw.format, qw.group_size, N, out=y)
    assert rel_error(y, x.double() @ qw.dequantize().double().T) < TOLERANCE[dtype]
    dy = torch.randn(m, N, generator=gen(m + 2)).to(dtype)
    dx = torch.full((m, K), float("nan"), dtype=dtype)
    frozen_linear_bwd(dy, qw.data, qw.scales, qw.zeros, qw.format, qw.group_size, K, out=dx)
    assert rel_error(dx, dy.double() @ qw.dequantize().double()) < TOLERANCE[dtype]


def test_forced_triton_backend_runs_the_kernels(monkeypatch):
    pytest.importorskip("triton")
    from offsite_kernels.ops import frozen_linear_triton as kernels

    calls = []
    real_fwd, real_bwd = kernels.frozen_linear_fwd, kernels.frozen_linear_bwd
    monkeypatch.setattr(kernels, "frozen_linear_fwd", lambda *a, **k: calls.append("fwd") or real_fwd(*a, **k))
    monkeypatch.setattr(kernels, "frozen_linear_bwd", lambda *a, **k: calls.append("bwd") or real_bwd(*a, **k))
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    x = torch.randn(4, 64, requires_grad=True)
    ok.frozen_linear(x, ok.quantize_weight(torch.randn(16, 64), bits=4, group_size=32)).sum().backward()
    assert calls == ["fwd", "bwd"]
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")
    calls.clear()
    ok.frozen_linear(x, ok.quantize_weight(torch.randn(16, 64), bits=8)).sum().backward()
    assert calls == []


@pytest.mark.parametrize("bits", FORMATS)
def test_autograd_saves_no_activation_and_no_weight_grad(bits):
    layer = ok.nn.FrozenLinear.from_linear(nn.Linear(K, N), bits=bits, group_size=32)
    x = torch.randn(3, 11, K, requires_grad=True)
    y = forward_saving_only_weights(layer, x)
    y.sum().backward()
    assert x.grad is not None
    assert all(b.grad is None and not b.requires_grad for b in layer.buffers())
    assert list(layer.parameters()) == []


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("case", ["2d", "3d"])
@pytest.mark.parametrize("eager_fast_path", [True, False])
def test_the_output_takes_an_in_place_add_as_nn_linear_does(backend, bits, case, eager_fast_path, monkeypatch):
    """Hugging Face blocks add into a linear's output in place (Falcon: ``mlp_output += attention_output``); autograd
    refuses that on a view made inside a custom op, so the output must not be one, through either call path."""
    monkeypatch.setattr(importlib.import_module("offsite_kernels.ops.eager"), "ENABLED", eager_fast_path)
    layer = ok.nn.FrozenLinear.from_linear(nn.Linear(K, N), bits=bits, group_size=32)
    weight = layer.weight.dequantize().double()
    x = make_input(case, torch.float32, 42).requires_grad_(True)
    other = torch.randn(*x.shape[:-1], N, generator=gen(43))
    y = layer(x)
    y += other
    (y * y).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    y64 = nn.functional.linear(x64, weight, layer.bias.double()) + other.double()
    (y64 * y64).sum().backward()
    assert rel_error(y, y64) < 1e-4 and rel_error(x.grad, x64.grad) < 1e-4


@pytest.mark.parametrize("bits", [None, 8])
def test_non_contiguous_weights_are_read_correctly(backend, bits):
    w = torch.randn(70, 24, generator=gen(40)).t()  # a transposed view, as HF Conv1D weights are
    qw = ok.quantize_weight(w, bits=bits) if bits else w
    x = torch.randn(5, 70, generator=gen(41))
    reference = x.double() @ (ok.quantize_weight(w, bits=bits).dequantize() if bits else w).double().T
    assert rel_error(ok.frozen_linear(x, qw), reference) < TOLERANCE[torch.float32]


def test_dense_weight_that_requires_grad_is_refused():
    w = torch.randn(8, 16, requires_grad=True)
    with pytest.raises(FrozenLinearInputError, match="requires grad"):
        ok.frozen_linear(torch.randn(2, 16), w)
    y = ok.frozen_linear(torch.randn(2, 16), w.detach())
    assert y.shape == (2, 8)


@pytest.mark.parametrize("bits", FORMATS)
def test_opcheck(backend, bits):
    qw = ok.quantize_weight(torch.randn(24, 70), bits=bits, group_size=32)
    x = torch.randn(2, 5, 70, requires_grad=True)
    bias = torch.randn(24)
    data = fl_ops._to_op_storage(qw.format, qw.data)
    args = (x, data, qw.scales, qw.zeros, bias, qw.format, qw.group_size, 24)
    torch.library.opcheck(fl_ops._frozen_linear_op, args)
    grad_args = (torch.randn(2, 5, 24), data, qw.scales, qw.zeros, qw.format, qw.group_size, 70)
    torch.library.opcheck(fl_ops._frozen_linear_input_grad_op, grad_args)


def test_torch_compile_traces_without_graph_breaks():
    layer = ok.nn.FrozenLinear.from_linear(nn.Linear(48, 24), bits=4, group_size=32)
    compiled = torch.compile(lambda t: layer(torch.relu(t)).square().sum(), fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 48, requires_grad=True)
    compiled(x).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    layer(torch.relu(x_ref)).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_from_linear_and_conv1d(backend):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear = nn.Linear(70, 30)
    conv = Conv1D(30, 70)  # HF stores [in, out]
    x = torch.randn(4, 70)
    for module, weight in ((linear, linear.weight), (conv, conv.weight.t())):
        layer = ok.nn.FrozenLinear.from_linear(module, bits=8)
        expected = x.double() @ ok.quantize_weight(weight.detach(), bits=8).dequantize().double().T + module.bias.double()
        assert rel_error(layer(x), expected) < 1e-5
        dense = ok.nn.FrozenLinear.from_linear(module, bits=None)
        torch.testing.assert_close(dense(x), module(x))
    with pytest.raises(TypeError, match=r"nn\.Linear or transformers Conv1D"):
        ok.nn.FrozenLinear.from_linear(nn.Conv2d(3, 3, 1))


def test_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = ok.nn.FrozenLinear.from_linear(nn.Linear(70, 30), bits=4, group_size=64)
    save_file(layer.state_dict(), str(tmp_path / "l.safetensors"))
    shell = ok.nn.FrozenLinear(ok.quantize_weight(torch.zeros(30, 70), bits=4, group_size=64), torch.zeros(30))
    shell.load_state_dict(load_file(str(tmp_path / "l.safetensors")))
    x = torch.randn(3, 70)
    assert torch.equal(shell(x), layer(x))


def test_empty_batch():
    y = ok.frozen_linear(torch.randn(0, 16, requires_grad=True), ok.quantize_weight(torch.randn(8, 16), bits=4, group_size=32))
    assert y.shape == (0, 8)


@pytest.mark.parametrize("bits", [None, 8, 4, "fp8"])
def test_under_autocast_the_gemm_runs_in_the_autocast_dtype_as_nn_linear_does(backend, bits):
    torch.manual_seed(3)
    linear = torch.nn.Linear(40, 13)
    weight = ok.quantize_weight(linear.weight.detach(), bits=bits, group_size=32)
    x = torch.randn(3, 5, 40, requires_grad=True)
    bias = linear.bias.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ok.frozen_linear(x, weight, bias)
        assert linear(x).dtype == y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    # the same as running it on the bf16 input: the cast is autocast's, and the gradient comes back in x's dtype
    x16 = x.detach().bfloat16().requires_grad_(True)
    y16 = ok.frozen_linear(x16, weight, bias)
    y16.float().square().sum().backward()
    assert torch.equal(y, y16) and x.grad.dtype == torch.float32 and torch.equal(x.grad, x16.grad.float())
    with torch.autocast("cpu", enabled=False):
        assert ok.frozen_linear(x, weight, bias).dtype == torch.float32  # no autocast: x's dtype


def test_bad_inputs_name_the_problem():
    qw = ok.quantize_weight(torch.randn(8, 16), bits=8)
    with pytest.raises(FrozenLinearInputError, match="in_features=16"):
        ok.frozen_linear(torch.randn(2, 15), qw)
    with pytest.raises(FrozenLinearInputError, match="float32, float16 or bfloat16"):
        ok.frozen_linear(torch.ones(2, 16, dtype=torch.int64), qw)
    with pytest.raises(FrozenLinearInputError, match="bias must have shape"):
        ok.frozen_linear(torch.randn(2, 16), qw, torch.randn(9))
    with pytest.raises(FrozenLinearInputError, match="is on meta but the weight is on cpu"):
        ok.frozen_linear(torch.randn(2, 16, device="meta"), qw)
    with pytest.raises(FrozenLinearInputError, match="tensor or a QuantizedWeight"):
        ok.frozen_linear(torch.randn(2, 16), [[1.0]])
    with pytest.raises(FrozenLinearInputError, match="2-D floating-point"):
        ok.frozen_linear(torch.randn(2, 16), torch.ones(8, 16, dtype=torch.int8))
    # a dense weight in a dtype no kernel reads: an fp8 one would be read as raw bytes, a float64 one cast per call
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        with pytest.raises(FrozenLinearInputError, match=f"must be float32, float16 or bfloat16, got {dtype}; .*bits='fp8'"):
            ok.frozen_linear(torch.randn(2, 16), torch.randn(8, 16).to(dtype))
        with pytest.raises(FrozenLinearInputError, match="must be float32, float16 or bfloat16"):
            ok.frozen_linear(torch.randn(2, 16), ok.quantize_weight(torch.randn(8, 16).to(dtype), bits=None))
    with pytest.raises(FrozenLinearInputError, match=r"got torch\.float64$"):
        ok.frozen_linear(torch.randn(2, 16), torch.randn(8, 16, dtype=torch.float64))


def test_autotune_pruning_keeps_checked_configs_near_the_m_bucket():
    pytest.importorskip("triton")
    from offsite_kernels.ops import frozen_linear_triton as k

    def picked(direction, fmt, m, arch=80):
        pruned = k.pruned_configs(k.gpu_configs(), direction, arch, fmt, k.m_bucket(m))
        return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in pruned})

    assert {bm for bm, _, _ in picked("fwd", "int8", 1)} == {16}
    assert {bm for bm, _, _ in picked("fwd", "int8", 5000)} == {64, 128}
    assert {bm for bm, _, _ in picked("bwd", "int4", 8)} == {64}  # int4 backward has no spill-free skinny tile
    assert {bm for bm, _, _ in picked("fwd", "int4", 1, k.SMALL_SHARED)} == {16}  # 3-stage skinny tiles within 99 KiB
    for arch in (80, k.SMALL_SHARED, k.HOPPER):
        for d in ("fwd", "bwd"):
            for f in ("int4", "int8"):
                allowed = {k._key(c)[:3] for c in k.candidate_configs(d, f, arch)}
                for m in (1, 16, 33, 300, 20000):
                    assert picked(d, f, m, arch) and set(picked(d, f, m, arch)) <= allowed, (arch, d, f, m)
    assert k.m_bucket(1) == 1 and k.m_bucket(37) == 64 and k.m_bucket(10**6) == 16384


def test_hopper_adds_its_larger_tiles_for_many_tokens_only():
    pytest.importorskip("triton")
    from offsite_kernels.ops import aot
    from offsite_kernels.ops import frozen_linear_triton as k

    def picked(direction, fmt, m, arch):
        pruned = k.pruned_configs(k.gpu_configs(), direction, arch, fmt, k.m_bucket(m))
        return {k._key(c) for c in pruned}

    for d in ("fwd", "bwd"):
        for f in ("int4", "int8", "dense"):
            kind = (d, "int4" if f == "int4" else "any")
            hopper = set(k._HOPPER_TILES.get(kind, ()))
            for m in (1, 16, 300, 20000):
                ampere, h = picked(d, f, m, 80), picked(d, f, m, k.HOPPER)
                assert not ampere & hopper  # never on an A100 (they spill or overflow its shared memory)
                assert ampere <= h <= ampere | hopper and h <= {k._key(c) for c in k.candidate_configs(d, f, k.HOPPER)}
            assert hopper <= picked(d, f, 20000, k.HOPPER)  # all of them tuned for many tokens
            assert picked(d, f, 1, k.HOPPER) == picked(d, f, 1, 80)  # few tokens: the same skinny tiles
            for m in (1, 16):  # and split launches (M <= 16 only) take tiles the AOT checks compile split
                split = k.pruned_configs(k.gpu_configs(), d, k.HOPPER, f, m, split=True)
                covered = {
                    case.label.split("split-K ")[1]
                    for case in aot.split_k_cases(k.HOPPER)
                    if case.label.startswith(f"{d} {f} bf16 ")
                }
                assert {aot.config_label(c) for c in split} <= covered
    assert not k._HOPPER_TILES.get(("bwd", "int4"))


@pytest.mark.parametrize(
    "capability, shared_kib, arch",
    [
        ((9, 0), 227, 90),
        ((9, 0), 99, 86),
        ((8, 0), 163, 80),
        ((8, 7), 163, 80),
        ((10, 0), 227, 100),
        ((10, 3), 227, 100),
        ((12, 0), 99, 86),
        ((8, 9), 99, 86),
        ((8, 6), 99, 86),
    ],
)
def test_gpu_arch_picks_the_list_of_each_gpu_class(monkeypatch, capability, shared_kib, arch):
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from offsite_kernels.ops import frozen_linear_triton as k

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    props = SimpleNamespace(shared_memory_per_block_optin=shared_kib * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert k.gpu_arch.__wrapped__(0) == arch
    assert k.device_arch(torch.zeros(1)) == 80  # a CPU tensor (stubbed-launch host benchmark)


def test_datacenter_blackwell_runs_the_a100_lists_but_splits_without_the_16_row_int4_forward_tile():
    """Class 100 (B200) has the A100-class lists (checked ahead of time for sm_100) and its own autotuner; a split
    int4 forward there takes the 32-row tile, since the 16-row one spills on sm_100 when split; exact fp32
    keeps its tiles under 64 rows."""
    pytest.importorskip("triton")
    from offsite_kernels.ops import frozen_linear_triton as k

    for d in ("fwd", "bwd"):
        for f in ("dense", "int8", "int4", "fp8"):
            for ops in (k.HALF, k.TF32):
                keys = [k._key(c) for c in k.candidate_configs(d, f, k.BLACKWELL, ops)]
                assert keys == [k._key(c) for c in k.candidate_configs(d, f, 80, ops)]
            # exact fp32: only tiles below 64 rows (Triton 3.6 turns taller ones into TF32 MMAs on sm_100)
            exact = [k._key(c) for c in k.candidate_configs(d, f, k.BLACKWELL, k.FP32)]
            assert exact and all(t[0] < 64 for t in exact)
            assert set(exact) < {k._key(c) for c in k.candidate_configs(d, f, 80, k.FP32)}
    split = {k._key(c) for c in k.pruned_configs(k.gpu_configs(), "fwd", k.BLACKWELL, "int4", 16, split=True)}
    assert split == {(32, 64, 128, 8, 4)}
    assert (16, 64, 128, 4, 4) in {k._key(c) for c in k.pruned_configs(k.gpu_configs(), "fwd", 80, "int4", 16, split=True)}
    assert k.autotuned_launch("fwd", k.BLACKWELL) is not k.autotuned_launch("fwd", 80)
