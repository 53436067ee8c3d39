"""The direct eager path of the per-layer custom ops (``offsite_kernels/ops/eager.py``).

In plain eager mode the ops run their implementation inside a classic autograd Function; anywhere a
tracer or a dispatch mode is active they go through the ``torch.library`` custom op. Both paths must
give the same outputs, the same input gradients and save the same tensors; the custom op must still
be what FlopCounterMode, fake tensors and ``torch.compile`` see.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gen
from torch.utils.flop_counter import FlopCounterMode

import offsite_kernels as ok
from offsite_kernels.ops import activation, eager, norm

M, N = 7, 45  # odd rows and features


def _x(seed: int, shape=(3, M // 3 + 1, N), dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)).to(device, dtype).requires_grad_(True)


def _frozen(seed: int, *shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)).to(device, dtype)


def _cases(dtype=torch.float32, device="cpu") -> dict:
    w, b = _frozen(1, N, dtype=dtype, device=device), _frozen(2, N, dtype=dtype, device=device)
    res = _frozen(3, 3, M // 3 + 1, N, dtype=dtype, device=device)
    lin = _frozen(4, 29, N, dtype=dtype, device=device)
    int8, int4 = ok.quantize_weight(lin, bits=8), ok.quantize_weight(lin, bits=4, group_size=32)
    return {
        "layer_norm": lambda x: norm.layer_norm(x, w, b, 1e-5),
        "layer_norm+residual": lambda x: norm.layer_norm(x, w, b, 1e-5, residual=res),
        "rms_norm+residual": lambda x: norm.rms_norm(x, w, 1e-6, residual=res, weight_offset=1.0),
        "bias_gelu": lambda x: activation.bias_gelu(x, b),
        "bias_gelu_tanh": lambda x: activation.bias_gelu(x, b, "tanh"),
        "bias_relu": lambda x: activation.bias_relu(x, b),
        "bias_silu": lambda x: activation.bias_silu(x, None),
        "swiglu": lambda x: activation.swiglu(x, x * 0.5 + 1),
        "frozen_linear_dense": lambda x: ok.frozen_linear(x, lin, b[:29]),
        "frozen_linear_int8": lambda x: ok.frozen_linear(x, int8),
        "frozen_linear_int4": lambda x: ok.frozen_linear(x, int4, b[:29]),
    }


CASES = _cases()


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _run(case: str, enabled: bool, monkeypatch: pytest.MonkeyPatch, dtype=torch.float32, device="cpu"):
    """Outputs, input gradient, saved tensors and grad_fn names of one call on either path."""
    monkeypatch.setattr(eager, "ENABLED", enabled)
    x = _x(10, dtype=dtype, device=device)
    cases = CASES if device == "cpu" else _cases(dtype, device)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = _outputs(cases[case](x))
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in outs)
    loss.backward()
    names = {type(o.grad_fn).__name__ for o in outs if o.grad_fn is not None}
    return [o.detach() for o in outs], x.grad, [(tuple(t.shape), t.dtype) for t in saved], names


@pytest.mark.parametrize("case", list(CASES))
def test_eager_path_matches_the_custom_op(case, monkeypatch):
    out_e, grad_e, saved_e, names_e = _run(case, True, monkeypatch)
    out_o, grad_o, saved_o, names_o = _run(case, False, monkeypatch)
    for a, b in zip(out_e, out_o, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(grad_e, grad_o)
    assert saved_e == saved_o  # the same tensors saved for backward: the op's own setup_context
    assert all(n.endswith("_eagerBackward") for n in names_e), names_e
    assert not any("eager" in n for n in names_o), names_o


def test_no_grad_calls_skip_autograd(monkeypatch):
    monkeypatch.setattr(eager, "ENABLED", True)
    x = _x(11)
    with torch.no_grad():
        y = CASES["layer_norm"](x)
    assert y.grad_fn is None and not y.requires_grad
    y = CASES["bias_gelu"](x.detach())
    assert y.grad_fn is None


def test_flop_counter_sees_the_custom_op(monkeypatch):
    """FlopCounterMode is a dispatch mode: the call goes through the op and its registered FLOP formula."""
    monkeypatch.setattr(eager, "ENABLED", True)
    x = _x(12)
    with FlopCounterMode(display=False) as counter:
        CASES["frozen_linear_int8"](x).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    rows = x.numel() // N
    assert counts.get("offsite_kernels.frozen_linear") == 2 * rows * N * 29
    assert counts.get("offsite_kernels.frozen_linear_input_grad") == 2 * rows * N * 29


def test_fake_tensors_take_the_custom_op(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(eager, "ENABLED", True)
    with FakeTensorMode():
        x = torch.empty(5, N, requires_grad=True)
        w = torch.empty(N)
        y = norm.layer_norm(x, w, None, 1e-5)
        y.sum().backward()
    assert y.shape == (5, N) and x.grad.shape == (5, N)
    assert not type(y.grad_fn).__name__.endswith("_eagerBackward")


def test_plain_eager_detects_tracing_and_transforms(monkeypatch):
    monkeypatch.setattr(eager, "ENABLED", True)
    t = torch.ones(3)
    assert eager.plain_eager((t, None, 1.0))
    seen = []
    torch.func.vmap(lambda row: seen.append(eager.plain_eager((row,))) or row)(torch.ones(2, 3))
    assert seen == [False]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not eager.plain_eager((mode.from_tensor(t),))
    monkeypatch.setattr(eager, "ENABLED", False)
    assert not eager.plain_eager((t,))


def test_compiled_graph_holds_the_custom_op(monkeypatch):
    """Under torch.compile the traced call is the custom op (no graph break, no inlined implementation)."""
    monkeypatch.setattr(eager, "ENABLED", True)
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    w, b = _frozen(1, N), _frozen(2, N)
    fn = torch.compile(lambda x: activation.bias_gelu(norm.layer_norm(x, w, b, 1e-5), b), backend=backend, fullgraph=True)
    x = _x(13)
    torch.testing.assert_close(fn(x), activation.bias_gelu(norm.layer_norm(x, w, b, 1e-5), b))
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any("offsite_kernels.layer_norm" in t for t in targets), targets
    assert any("offsite_kernels.bias_gelu" in t for t in targets), targets


@pytest.mark.parametrize("case", ["layer_norm+residual", "swiglu", "frozen_linear_int4"])
def test_eager_path_on_the_triton_kernels(case, monkeypatch):
    """The Triton kernels (the interpreter on CPU) behind either path: identical results."""
    pytest.importorskip("triton")
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    out_e, grad_e, _, _ = _run(case, True, monkeypatch)
    out_o, grad_o, _, _ = _run(case, False, monkeypatch)
    for a, b in zip(out_e, out_o, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(grad_e, grad_o)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_eager_path_matches_the_custom_op_on_cuda(case, monkeypatch):
    """On a GPU (the Triton kernels, bf16): both paths launch the same kernels, so results are identical."""
    out_e, grad_e, saved_e, names_e = _run(case, True, monkeypatch, torch.bfloat16, "cuda")
    out_o, grad_o, saved_o, _ = _run(case, False, monkeypatch, torch.bfloat16, "cuda")
    for a, b in zip(out_e, out_o, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(grad_e, grad_o)
    assert saved_e == saved_o
    assert all(n.endswith("_eagerBackward") for n in names_e), names_e


@pytest.mark.parametrize("case", ["layer_norm", "bias_gelu", "swiglu", "frozen_linear_int8"])
def test_double_backward_fails_loudly_on_both_paths(case, monkeypatch):
    """The input-gradient ops have no autograd formula: a second derivative must raise, not drop terms."""
    for enabled in (True, False):
        monkeypatch.setattr(eager, "ENABLED", enabled)
        x = _x(14)
        (g,) = torch.autograd.grad(_outputs(CASES[case](x))[0].square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            g.sum().backward()


def test_jit_trace_and_torch_function_modes_take_the_custom_op(monkeypatch):
    monkeypatch.setattr(eager, "ENABLED", True)
    w, b = _frozen(1, N), _frozen(2, N)
    traced = torch.jit.trace(lambda x: norm.layer_norm(x, w, b, 1e-5), (torch.randn(5, N),), check_trace=False)
    assert "offsite_kernels::layer_norm" in str(traced.graph)

    seen: list[str] = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        activation.bias_gelu(_x(15), b)
    assert any("offsite_kernels.bias_gelu" in name for name in seen), seen


def test_forward_mode_ad_is_refused_by_name():
    """PyTorch's custom ops give a zero tangent under forward-mode AD without a word; the library's ops refuse."""
    import torch.autograd.forward_ad as fwad

    from offsite_kernels.errors import ForwardADError

    lin = ok.nn.FrozenLinear.from_linear(torch.nn.Linear(64, 5), bits=4, group_size=32)
    head_weight = torch.randn(7, 6, generator=gen(2))
    calls = {
        "frozen_linear": (lin, torch.randn(3, 64, generator=gen(1))),
        "rms_norm": (ok.nn.FrozenRMSNorm(torch.randn(6, generator=gen(3))), torch.randn(2, 6, generator=gen(4))),
        "bias_gelu": (activation.bias_gelu, torch.randn(2, 6, generator=gen(5))),
        "swiglu": (lambda x: activation.swiglu(x, x), torch.randn(2, 6, generator=gen(6))),
        "fused_linear_cross_entropy": (
            lambda h: ok.ops.fused_linear_cross_entropy(h, head_weight, torch.tensor([[1, 2, 3]])),
            torch.randn(1, 3, 6, generator=gen(7)),
        ),
    }
    for name, (fn, x) in calls.items():
        tangent = torch.randn(x.shape, generator=gen(9))
        with pytest.raises(ForwardADError, match=rf"offsite_kernels::{name} has no forward-mode derivative"):
            torch.func.jvp(fn, (x,), (tangent,))
        with fwad.dual_level(), pytest.raises(ForwardADError, match=name):
            fn(fwad.make_dual(x, tangent))
        with fwad.dual_level():  # inside a dual level, an input without a tangent runs as usual
            torch.testing.assert_close(fn(x), fn(x.clone()))
    hidden, labels = torch.randn(1, 3, 6, generator=gen(8)), torch.tensor([[1, 2, 3]])
    with fwad.dual_level(), pytest.raises(ForwardADError, match="fused_linear_cross_entropy"):  # a tangent on the head
        ok.ops.fused_linear_cross_entropy(hidden, fwad.make_dual(head_weight, torch.randn(7, 6, generator=gen(10))), labels)
