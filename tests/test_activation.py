"""Fused activations (bias + GELU/ReLU/SiLU, SwiGLU, GeGLU): both backends against a float64 reference of the same math."""

import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import gen

from offsite_kernels.ops.activation import (
    HF_ACTIVATIONS,
    ActivationInputError,
    activation_by_name,
    bias_gelu,
    bias_relu,
    bias_silu,
    geglu,
    swiglu,
)

# exp overflows to inf on purpose in the far tails of the sigmoid; the CPU interpreter's numpy warns about it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
act_ops = importlib.import_module("offsite_kernels.ops.activation")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |error| / max |reference|; fp16 and bf16 include rounding the output (and, on the torch path, x + b)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ACTS = ["gelu", "gelu_tanh", "relu", "silu"]
# float64 statements of the math
REFERENCE = {
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5)),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3))),
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "silu": lambda z: z * torch.sigmoid(z),
}
# act(gate) * up, by the name of the activation
GATED = {
    "silu": swiglu,
    "gelu": lambda g, u: geglu(g, u),
    "gelu_tanh": lambda g, u: geglu(g, u, approximate="tanh"),
}
FUSED = {
    "gelu": lambda x, b: bias_gelu(x, b),
    "gelu_tanh": lambda x, b: bias_gelu(x, b, approximate="tanh"),
    "relu": bias_relu,
    "silu": bias_silu,
}


def seed_of(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode()) % 10_000  # stable across processes, unlike hash()


def make_input(case, dtype, seed, scale=2.0):
    """Odd shapes (no row a multiple of a block), 2-D and 3-D, and views that are not contiguous."""
    g = gen(seed)
    if case == "3d":
        return (scale * torch.randn(3, 5, 203, generator=g)).to(dtype)
    if case == "2d":
        return (scale * torch.randn(37, 1001, generator=g)).to(dtype)
    if case == "transposed":  # strides (1, 37): the last dimension is strided
        return (scale * torch.randn(203, 37, generator=g)).to(dtype).t()
    if case == "strided3d":  # every other feature of a wider tensor
        return (scale * torch.randn(2, 7, 2 * 203, generator=g)).to(dtype)[..., ::2]
    if case == "rows":  # rows of a wider tensor: contiguous within a row, row stride 2 * 203
        return (scale * torch.randn(37, 2 * 203, generator=g)).to(dtype)[:, 203:]
    raise ValueError(case)


def rel_error(actual, reference):
    assert not torch.isnan(actual).any(), "NaN in output"
    reference = reference.detach()
    return float((actual.detach().double() - reference).abs().max() / reference.abs().max())


def reference_bias_act(act, x, bias, grad_y):
    """Float64 forward and input gradient of ``act(x + bias)``, from the dtype's values of x, bias and grad_y."""
    x64 = x.detach().double().requires_grad_(True)
    z = x64 if bias is None else x64 + bias.double()
    y = REFERENCE[act](z)
    (grad,) = torch.autograd.grad(y, x64, grad_y.double())
    return y.detach(), grad


# --- accuracy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case, with_bias", [("3d", True), ("2d", False), ("2d", True), ("transposed", True), ("strided3d", False), ("rows", True)]
)
def test_bias_act_forward_and_input_gradient_match_float64(backend, act, dtype, case, with_bias):
    seed = seed_of(act, dtype, case, with_bias)
    x = make_input(case, dtype, seed).requires_grad_(True)
    bias = torch.randn(x.shape[-1], generator=gen(seed + 1)).to(dtype) if with_bias else None
    y = FUSED[act](x, bias)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    grad_y = torch.randn(y.shape, generator=gen(seed + 2)).to(dtype)
    y_ref, grad_ref = reference_bias_act(act, x, bias, grad_y)
    assert rel_error(y, y_ref) < TOLERANCE[dtype]
    y.backward(grad_y)
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert rel_error(x.grad, grad_ref) < TOLERANCE[dtype]


def make_gate_up(case, dtype, seed):
    if case == "chunked":  # the two halves of one fused gate_up projection: row-strided views
        return (2 * torch.randn(37, 2 * 203, generator=gen(seed))).to(dtype).chunk(2, dim=-1)
    return make_input(case, dtype, seed), make_input(case, dtype, seed + 1)


def reference_gated(act, gate, up, grad_y):
    """Float64 ``act(gate) * up`` and its gradients in gate and up, from the dtype's values."""
    g64, u64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    y_ref = REFERENCE[act](g64) * u64
    dg_ref, du_ref = torch.autograd.grad(y_ref, (g64, u64), grad_y.double())
    return y_ref.detach(), dg_ref, du_ref


@pytest.mark.parametrize("act", sorted(GATED))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["3d", "2d", "transposed", "chunked"])
def test_gated_forward_and_input_gradients_match_float64(backend, act, dtype, case):
    seed = seed_of("gated", act, dtype, case)
    gate, up = make_gate_up(case, dtype, seed)
    gate, up = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
    y = GATED[act](gate, up)
    assert y.shape == gate.shape and y.dtype == dtype and y.is_contiguous()
    grad_y = torch.randn(y.shape, generator=gen(seed + 7)).to(dtype)
    y_ref, dg_ref, du_ref = reference_gated(act, gate, up, grad_y)
    assert rel_error(y, y_ref) < TOLERANCE[dtype]
    y.backward(grad_y)
    assert rel_error(gate.grad, dg_ref) < TOLERANCE[dtype]
    assert rel_error(up.grad, du_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("act", ACTS)
def test_extreme_inputs_stay_finite_and_accurate(backend, act):
    """Far tails (exp overflows inside the sigmoid), zero and tiny values, in fp32 and bf16."""
    values = torch.tensor(
        [-3e4, -1e3, -100.0, -30.0, -9.0, -1.0, -1e-3, -1e-30, 0.0, 1e-30, 1e-3, 1.0, 9.0, 30.0, 100.0, 1e3, 3e4]
    )
    for dtype in (torch.float32, torch.bfloat16):
        x = values.to(dtype).clone().requires_grad_(True)
        y = FUSED[act](x, None)
        y.backward(torch.ones_like(y))
        y_ref, grad_ref = reference_bias_act(act, x, None, torch.ones_like(y))
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(x.grad.double(), grad_ref, rtol=tol, atol=tol)


def test_bias_of_another_dtype_is_used_in_the_input_dtype(backend):
    x = torch.randn(5, 203, generator=gen(3)).to(torch.bfloat16)
    bias = torch.randn(203, generator=gen(4))  # fp32 bias, bf16 activations
    y = bias_gelu(x, bias)
    assert y.dtype == torch.bfloat16
    y_ref, _ = reference_bias_act("gelu", x, bias.to(torch.bfloat16), torch.ones_like(x))
    assert rel_error(y, y_ref) < TOLERANCE[torch.bfloat16]


def test_zero_dim_and_empty_inputs(backend):
    x = torch.tensor(0.7, requires_grad=True)
    y = bias_gelu(x)
    y.backward()
    assert y.shape == () and abs(float(y.detach()) - float(REFERENCE["gelu"](torch.tensor(0.7, dtype=torch.float64)))) < 1e-6
    assert x.grad.shape == ()
    for shape in ((0, 16), (4, 0), (2, 0, 5)):
        x = torch.randn(shape, requires_grad=True)
        bias = torch.randn(shape[-1])
        y = bias_relu(x, bias)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape
        for gated in (swiglu, geglu):
            g, u = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
            gated(g, u).sum().backward()
            assert g.grad.shape == shape and u.grad.shape == shape


# --- kernels: every element written, nothing past the end ----------------------------------------
def _poisoned(shape, dtype, spare=67):
    """A NaN-filled contiguous output of ``shape`` inside a larger buffer whose tail must stay untouched."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + spare,), float("nan"), dtype=dtype)
    buf[n:] = 12345.0
    return buf[:n].view(shape), buf[n:]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 203), (37, 1001), (3, 5, 29), (2, 1100)])
def test_bias_act_kernels_write_every_output_element(act, dtype, shape):
    pytest.importorskip("triton")
    from offsite_kernels.ops.activation_triton import bias_act_bwd, bias_act_fwd

    seed = seed_of("poison", act, dtype, shape)
    x = torch.randn(shape, generator=gen(seed)).to(dtype)
    bias = torch.randn(shape[-1], generator=gen(seed + 1)).to(dtype)
    dy = torch.randn(shape, generator=gen(seed + 2)).to(dtype)
    y_ref, dx_ref = reference_bias_act(act, x, bias, dy)
    y, y_tail = _poisoned(shape, dtype)
    assert bias_act_fwd(x, bias, act, out=y) is y
    assert rel_error(y, y_ref) < TOLERANCE[dtype] and (y_tail == 12345.0).all()
    dx, dx_tail = _poisoned(shape, dtype)
    assert bias_act_bwd(dy, x, bias, act, out=dx) is dx
    assert rel_error(dx, dx_ref) < TOLERANCE[dtype] and (dx_tail == 12345.0).all()


@pytest.mark.parametrize("act", sorted(GATED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 203), (37, 1001), (3, 5, 29)])
def test_gated_kernels_write_every_output_element(act, dtype, shape):
    pytest.importorskip("triton")
    from offsite_kernels.ops.activation_triton import gated_act_bwd, gated_act_fwd

    seed = seed_of("poison-gated", act, dtype, shape)
    gate, up, dy = (torch.randn(shape, generator=gen(seed + i)).to(dtype) for i in range(3))
    y_ref, dg_ref, du_ref = reference_gated(act, gate, up, dy)
    y, y_tail = _poisoned(shape, dtype)
    assert gated_act_fwd(gate, up, act, out=y) is y
    assert rel_error(y, y_ref) < TOLERANCE[dtype] and (y_tail == 12345.0).all()
    (dg, dg_tail), (du, du_tail) = _poisoned(shape, dtype), _poisoned(shape, dtype)
    assert gated_act_bwd(dy, gate, up, act, out_gate=dg, out_up=du) == (dg, du)
    assert rel_error(dg, dg_ref) < TOLERANCE[dtype] and rel_error(du, du_ref) < TOLERANCE[dtype]
    assert (dg_tail == 12345.0).all() and (du_tail == 12345.0).all()


def test_kernels_read_broadcast_gradients():
    """``y.sum().backward()`` hands the backward an expanded (stride 0) gradient."""
    pytest.importorskip("triton")
    from offsite_kernels.ops.activation_triton import bias_act_bwd, gated_act_bwd

    x, g, u = (torch.randn(37, 203, generator=gen(60 + i)) for i in range(3))
    ones = torch.ones(()).expand(37, 203)
    assert ones.stride() == (0, 0)
    _, ref = reference_bias_act("silu", x, None, torch.ones(37, 203))
    assert rel_error(bias_act_bwd(ones, x, None, "silu"), ref) < 1e-6
    row = torch.randn(203, generator=gen(63)).expand(37, 203)  # stride (0, 1): every row the same
    dg, du = gated_act_bwd(row, g, u, "silu")
    assert rel_error(du, row.double() * F.silu(g.double())) < 1e-6
    assert rel_error(dg, torch.ops.aten.silu_backward(row.double() * u.double(), g.double())) < 1e-6


def test_block_sizes_cover_every_row_length():
    pytest.importorskip("triton")
    from offsite_kernels.ops import activation_triton as k

    blocks = set(k.all_block_sizes())
    for n in (1, 5, 63, 64, 65, 203, 256, 257, 1001, 1024, 1025, 3072, 4096, 8192, 11008, 14336, 28672):
        bm, bn = k.block_sizes(n)
        assert (bm, bn) in blocks and bm * bn == k.TILE
        assert bn >= min(n, max(k.BLOCK_NS)) and bn & (bn - 1) == 0 and bm & (bm - 1) == 0


def test_forced_triton_backend_runs_the_kernels(monkeypatch):
    pytest.importorskip("triton")
    from offsite_kernels.ops import activation_triton as kernels

    calls = []
    for name in ("bias_act_fwd", "bias_act_bwd", "gated_act_fwd", "gated_act_bwd"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    x, g, u = (torch.randn(4, 64, requires_grad=True) for _ in range(3))
    (bias_gelu(x, torch.randn(64), "tanh") + bias_relu(x) + swiglu(g, u) + geglu(g, u)).sum().backward()
    expected = ["bias_act_fwd", "bias_act_bwd"] * 2 + ["gated_act_fwd", "gated_act_bwd"] * 2
    assert sorted(calls) == sorted(expected)
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")
    calls.clear()
    (bias_gelu(x) + bias_silu(x) + swiglu(g, u) + geglu(g, u, "tanh")).sum().backward()
    assert calls == []


# --- autograd: what is saved, what gets a gradient -------------------------------------------------
def _saved_during(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def _same_tensor(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", ["3d", "strided3d"])
def test_bias_act_saves_only_its_inputs(backend, act, case):
    x = make_input(case, torch.float32, 5).requires_grad_(True)
    bias = torch.randn(x.shape[-1])
    y, saved = _saved_during(lambda: FUSED[act](x, bias))
    assert saved, "the input must be saved for the backward"
    for t in saved:
        assert _same_tensor(t, x) or _same_tensor(t, bias), f"saved a tensor of shape {tuple(t.shape)} that is not an input"
    assert sum(t.numel() for t in saved) == x.numel() + bias.numel()
    y.sum().backward()
    assert x.grad is not None and bias.grad is None and not bias.requires_grad


@pytest.mark.parametrize("act", sorted(GATED))
@pytest.mark.parametrize("case", ["3d", "chunked"])
def test_gated_saves_only_gate_and_up(backend, act, case):
    gate, up = make_gate_up(case, torch.float32, 9)
    gate, up = gate.requires_grad_(True), up.requires_grad_(True)
    y, saved = _saved_during(lambda: GATED[act](gate, up))
    assert len(saved) == 2 and _same_tensor(saved[0], gate) and _same_tensor(saved[1], up)
    y.sum().backward()
    assert gate.grad is not None and up.grad is not None


def test_swiglu_gradient_of_one_input_only(backend):
    gate = torch.randn(6, 40, requires_grad=True)
    up = torch.randn(6, 40)
    swiglu(gate, up).sum().backward()
    torch.testing.assert_close(gate.grad, torch.ops.aten.silu_backward(up, gate.detach()))
    gate2, up2 = torch.randn(6, 40), torch.randn(6, 40, requires_grad=True)
    swiglu(gate2, up2).sum().backward()
    torch.testing.assert_close(up2.grad, F.silu(gate2))
    gate3 = gate.detach().clone().requires_grad_(True)
    geglu(gate3, up, "tanh").sum().backward()
    torch.testing.assert_close(gate3.grad, torch.ops.aten.gelu_backward(up, gate.detach(), approximate="tanh"))


def test_frozen_bias_that_requires_grad_is_refused():
    x = torch.randn(3, 8, requires_grad=True)
    for fn in (bias_gelu, bias_relu, bias_silu):
        with pytest.raises(ActivationInputError, match="frozen"):
            fn(x, torch.randn(8, requires_grad=True))


# --- torch.library ------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(backend, with_bias):
    x = torch.randn(2, 5, 70, requires_grad=True)
    bias = torch.randn(70) if with_bias else None
    grad = torch.randn(2, 5, 70)
    for approximate in ("none", "tanh"):
        torch.library.opcheck(act_ops._bias_gelu_op, (x, bias, approximate))
        torch.library.opcheck(act_ops._bias_gelu_backward_op, (grad, x.detach(), bias, approximate))
    for op, bwd in (
        (act_ops._bias_relu_op, act_ops._bias_relu_backward_op),
        (act_ops._bias_silu_op, act_ops._bias_silu_backward_op),
    ):
        torch.library.opcheck(op, (x, bias))
        torch.library.opcheck(bwd, (grad, x.detach(), bias))
    gate, up = torch.randn(2, 5, 70, requires_grad=True), torch.randn(2, 5, 70, requires_grad=True)
    for op, bwd in (
        (act_ops._swiglu_op, act_ops._swiglu_backward_op),
        (act_ops._geglu_op, act_ops._geglu_backward_op),
        (act_ops._geglu_tanh_op, act_ops._geglu_tanh_backward_op),
    ):
        torch.library.opcheck(op, (gate, up))
        torch.library.opcheck(bwd, (grad, gate.detach(), up.detach()))
    strided = torch.randn(2, 5, 140)[..., ::2]
    torch.library.opcheck(act_ops._swiglu_op, (strided, up.detach()))
    torch.library.opcheck(act_ops._bias_gelu_op, (strided, bias, "tanh"))


def test_ops_are_registered_under_the_library_namespace():
    for name in ("bias_gelu", "bias_relu", "bias_silu", "swiglu", "geglu", "geglu_tanh"):
        assert hasattr(torch.ops.offsite_kernels, name)
        assert hasattr(torch.ops.offsite_kernels, f"{name}_backward")


def test_torch_compile_traces_without_graph_breaks(backend):
    bias = torch.randn(48)

    def mlp(x, gate, up):
        mixed = bias_gelu(x, bias, "tanh") * swiglu(gate, up) + bias_relu(x, bias) - bias_silu(gate) + geglu(x, up, "tanh")
        return mixed.square().sum()

    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    inputs = [torch.randn(3, 48, generator=gen(70 + i), requires_grad=True) for i in range(3)]
    compiled(*inputs).backward()
    eager = [t.detach().clone().requires_grad_(True) for t in inputs]
    mlp(*eager).backward()
    for a, b in zip(inputs, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# --- Hugging Face names ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(HF_ACTIVATIONS))
def test_matches_transformers_act2fn(backend, name):
    from transformers.activations import ACT2FN

    seed = seed_of("hf", name)
    hf_act = ACT2FN[name]
    act = activation_by_name(name)
    x = (3 * torch.randn(7, 203, generator=gen(seed))).requires_grad_(True)
    bias = torch.randn(203, generator=gen(seed + 1))
    for b in (None, bias):
        x_hf = x.detach().clone().requires_grad_(True)
        y_hf = hf_act(x_hf if b is None else x_hf + b)
        y = act(x, b)
        torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
        grad_y = torch.randn(y.shape, generator=gen(seed + 2))
        (gx,) = torch.autograd.grad(y, x, grad_y)
        (gx_hf,) = torch.autograd.grad(y_hf, x_hf, grad_y)
        torch.testing.assert_close(gx, gx_hf, rtol=1e-5, atol=1e-5)
    if act.has_gated:  # the Llama (Gemma) MLP: act_fn(gate_proj(x)) * up_proj(x)
        gate, up = torch.randn(7, 203, generator=gen(seed + 3)), torch.randn(7, 203, generator=gen(seed + 4))
        gate.requires_grad_(True)
        y, y_hf = act.gated(gate, up), hf_act(gate) * up
        torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
        grad_y = torch.randn(y.shape, generator=gen(seed + 5))
        torch.testing.assert_close(
            torch.autograd.grad(y, gate, grad_y)[0], torch.autograd.grad(y_hf, gate, grad_y)[0], rtol=1e-5, atol=1e-5
        )
    else:
        with pytest.raises(ActivationInputError, match="no fused gated kernel"):
            act.gated(x, x)


def test_activation_names():
    from transformers.activations import ACT2FN

    assert set(HF_ACTIVATIONS) <= set(ACT2FN)
    assert activation_by_name("gelu_new").kind == activation_by_name("gelu_pytorch_tanh").kind == "gelu_tanh"
    assert activation_by_name("gelu").kind == "gelu"
    assert activation_by_name("relu").kind == "relu"  # OPT
    assert activation_by_name("swish").kind == activation_by_name("silu").kind == "silu"
    for unsupported in ("quick_gelu", "gelu_10", "relu6", "tanh", "linear", "GELU", "no_such_act", None):
        with pytest.raises(ActivationInputError, match="has no fused op; supported: gelu"):
            activation_by_name(unsupported)


# --- bad inputs ---------------------------------------------------------------------------------
def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 16)
    with pytest.raises(ActivationInputError, match="x must be a float32, float16 or bfloat16"):
        bias_gelu(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(ActivationInputError, match="x must be a float32"):
        bias_relu([[1.0]])
    with pytest.raises(ActivationInputError, match=r"bias must have shape \(16,\)"):
        bias_gelu(x, torch.randn(15))
    with pytest.raises(ActivationInputError, match="bias must have shape"):
        bias_silu(x, torch.randn(2, 16))
    with pytest.raises(ActivationInputError, match="0-d x has no feature dimension"):
        bias_gelu(torch.tensor(1.0), torch.randn(1))
    with pytest.raises(ActivationInputError, match="bias must be a float32"):
        bias_gelu(x, torch.ones(16, dtype=torch.int32))
    with pytest.raises(ActivationInputError, match="bias is on meta but x is on cpu"):
        bias_gelu(x, torch.randn(16, device="meta"))
    with pytest.raises(ActivationInputError, match="approximate must be 'none'"):
        bias_gelu(x, approximate="erf")
    with pytest.raises(ActivationInputError, match="same shape"):
        swiglu(x, torch.randn(2, 15))
    with pytest.raises(ActivationInputError, match="same shape"):
        swiglu(x, torch.randn(16))  # no broadcasting
    with pytest.raises(ActivationInputError, match="same dtype"):
        swiglu(x, x.half())
    with pytest.raises(ActivationInputError, match="up is on meta"):
        swiglu(x, torch.randn(2, 16, device="meta"))
    with pytest.raises(ActivationInputError, match="gate must be a float32"):
        swiglu(x.double(), x.double())
    with pytest.raises(ActivationInputError, match="same shape"):
        geglu(x, torch.randn(2, 15))
    with pytest.raises(ActivationInputError, match="approximate must be 'none'"):
        geglu(x, x, approximate="erf")
    with pytest.raises(ActivationInputError, match="no fused gated kernel for activation 'relu'"):
        activation_by_name("relu").gated(x, x)


# --- ahead-of-time compile for real GPUs --------------------------------------------------------
def test_aot_cases_cover_every_launch_variant():
    pytest.importorskip("triton")
    from offsite_kernels.ops import activation_triton as k

    cases = k.aot_cases()
    seen = {
        (c.fn, c.types[next(iter(c.types))], c.constexprs.get("ACT"), c.constexprs.get("HAS_BIAS"), c.constexprs["BLOCK_N"])
        for c in cases
    }
    for dtype in ("*bf16", "*fp16"):
        for _, bn in k.all_block_sizes():
            for code in k.ACT_CODES.values():
                for has_bias in (True, False):
                    for d in ("fwd", "bwd"):
                        assert (f"_bias_act_{d}_kernel", dtype, code, has_bias, bn) in seen
            for act in k.GATED_ACTS:
                for d in ("fwd", "bwd"):
                    assert (f"_gated_act_{d}_kernel", dtype, k.ACT_CODES[act], None, bn) in seen
    assert len(seen) == len(cases)
    assert all(not c.constexprs["INTERPRETER_BF16"] for c in cases)


@pytest.mark.parametrize("arch", [80, 90])
def test_aot_compile_every_case(arch):
    pytest.importorskip("triton")
    from offsite_kernels.ops import aot
    from offsite_kernels.ops.activation_triton import aot_cases

    available, why = aot.availability()
    if not available:
        pytest.skip(f"AOT compile check unavailable: {why}")
    failures, cases = [], aot_cases()
    aot.prefetch(cases=[(case, arch) for case in cases])  # compiled one per CPU, then read from the cache
    for case in cases:
        row = aot.compile_case(case, arch)
        if not row["ok"]:
            failures.append(f"{case.label}: {'; '.join(aot.case_problems(row))}")
    assert not failures, f"sm_{arch}:\n" + "\n".join(failures)
