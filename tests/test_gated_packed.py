"""The packed gated op (one fused gate-up projection, Phi-3): against a float64 reference, and its backward writes
the projection's gradient as one tensor."""

import pytest
import torch
from conftest import gen
from test_activation import DTYPES, GATED, TOLERANCE, reference_gated, rel_error, seed_of

from offsite_kernels.ops.activation import ActivationInputError, activation_by_name

NAMES = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # a Hugging Face name of each


def make_gate_up(case, dtype, seed):
    """Odd widths (gate and up of 203 or 1001 each), 2-D and 3-D, contiguous or a strided view."""
    g = gen(seed)
    if case == "3d":
        return (2 * torch.randn(3, 5, 406, generator=g)).to(dtype)
    if case == "2d":
        return (2 * torch.randn(37, 2002, generator=g)).to(dtype)
    if case == "strided":  # every other row of a taller tensor
        return (2 * torch.randn(2, 14, 406, generator=g)).to(dtype)[:, ::2]
    raise ValueError(case)


@pytest.mark.parametrize("act", sorted(GATED))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["3d", "2d", "strided"])
def test_packed_forward_and_gradient_match_float64(backend, act, dtype, case):
    seed = seed_of("packed", act, dtype, case)
    gate_up = make_gate_up(case, dtype, seed).detach().requires_grad_(True)
    y = activation_by_name(NAMES[act]).gated_packed(gate_up)
    n = gate_up.shape[-1] // 2
    assert y.shape == (*gate_up.shape[:-1], n) and y.dtype == dtype and y.is_contiguous()
    grad_y = torch.randn(y.shape, generator=gen(seed + 7)).to(dtype)
    y_ref, dg_ref, du_ref = reference_gated(act, gate_up[..., :n], gate_up[..., n:], grad_y)
    assert rel_error(y, y_ref) < TOLERANCE[dtype]
    y.backward(grad_y)
    assert rel_error(gate_up.grad[..., :n], dg_ref) < TOLERANCE[dtype]
    assert rel_error(gate_up.grad[..., n:], du_ref) < TOLERANCE[dtype]


def test_the_triton_backward_writes_both_halves_of_one_tensor():
    """Every element of the one gradient tensor written by the kernel, none by a concatenation after."""
    pytest.importorskip("triton")
    from offsite_kernels.ops.activation_triton import gated_act_bwd_packed

    gate_up, dy = torch.randn(37, 406, generator=gen(1)), torch.randn(37, 203, generator=gen(2))
    _, dg_ref, du_ref = reference_gated("silu", gate_up[:, :203], gate_up[:, 203:], dy)
    calls = []
    cat = torch.cat
    try:
        torch.cat = lambda *a, **k: calls.append(a) or cat(*a, **k)
        d = gated_act_bwd_packed(dy, gate_up, "silu")
    finally:
        torch.cat = cat
    assert calls == [] and d.shape == gate_up.shape and d.is_contiguous()
    assert rel_error(d[:, :203], dg_ref) < 1e-6 and rel_error(d[:, 203:], du_ref) < 1e-6


def test_packed_saves_only_gate_up_and_opcheck_passes(backend):
    gate_up = torch.randn(3, 5, 58, generator=gen(3), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = activation_by_name("silu").gated_packed(gate_up)
    assert len(saved) == 1 and saved[0].data_ptr() == gate_up.data_ptr() and saved[0].shape == gate_up.shape
    y.sum().backward()
    for op in (torch.ops.offsite_kernels.swiglu_packed, torch.ops.offsite_kernels.geglu_tanh_packed):
        torch.library.opcheck(op, (torch.randn(4, 6, 34, generator=gen(4), requires_grad=True),))


def test_packed_input_checks():
    act = activation_by_name("silu")
    with pytest.raises(ActivationInputError, match="even last dimension"):
        act.gated_packed(torch.randn(3, 7))
    with pytest.raises(ActivationInputError, match="gate_up must be a float32"):
        act.gated_packed(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(ActivationInputError, match="no fused gated kernel for activation 'relu'"):
        activation_by_name("relu").gated_packed(torch.randn(3, 8))


def test_the_fused_projection_mlp_peaks_no_higher_than_the_split_one(backend):
    """Autograd's backward of ``chunk`` would concatenate the two halves' gradients into a new buffer while both are
    alive (20% above the split MLP's peak here): the packed op's backward writes one tensor instead."""
    from torch import nn

    from offsite_kernels.memtrack import MemoryTracker
    from offsite_kernels.nn import FrozenFusedGatedMLP, FrozenGatedMLP

    torch.manual_seed(0)
    hidden, inner = 96, 256
    gate_up, down = nn.Linear(hidden, 2 * inner, bias=False), nn.Linear(inner, hidden, bias=False)
    fused = FrozenFusedGatedMLP(gate_up, down).requires_grad_(False)
    gate, up = (nn.Linear(hidden, inner, bias=False) for _ in range(2))
    with torch.no_grad():
        gate.weight.copy_(gate_up.weight[:inner])
        up.weight.copy_(gate_up.weight[inner:])
    split = FrozenGatedMLP(gate, up, down).requires_grad_(False)
    peaks, grads = [], []
    for mlp in (fused, split):
        x = torch.randn(2, 9, hidden, generator=gen(5), requires_grad=True)
        with MemoryTracker() as tracker:
            mlp(x).sum().backward()
        peaks.append(tracker.peak_bytes)
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert peaks[0] <= peaks[1]
