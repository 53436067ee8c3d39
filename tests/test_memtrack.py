"""MemoryTracker: storage bytes allocated in a region, against allocations whose sizes are known."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from offsite_kernels.memtrack import MemoryTracker

CPU = torch.device("cpu")
META = torch.device("meta")


def nbytes(*shape: int, dtype: torch.dtype = torch.float32) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8


def test_one_allocation_is_counted_exactly():
    with MemoryTracker() as mt:
        a = torch.empty(37, 203)
    assert mt.current_bytes == mt.peak_bytes == nbytes(37, 203)
    assert mt.current_by_device == {CPU: nbytes(37, 203)} and mt.peak_by_device == {CPU: nbytes(37, 203)}
    assert mt.allocations == 1 and mt.live_storages == 1
    del a
    assert mt.current_bytes == 0 and mt.peak_bytes == nbytes(37, 203) and mt.live_storages == 0


def test_views_and_in_place_ops_allocate_nothing():
    with MemoryTracker() as mt:
        a = torch.randn(12, 30, dtype=torch.bfloat16)
        size = mt.current_bytes
        views = [a.t(), a.view(-1), a[3:7], a[:, ::2], a.reshape(30, 12), a.unsqueeze(0).expand(4, 12, 30), a.detach()]
        a.add_(1.0).mul_(2.0)
        views[0].clamp_(-1, 1)
        a[2:5] = 0.5
        assert mt.current_bytes == mt.peak_bytes == size == nbytes(12, 30, dtype=torch.bfloat16)
        del a
        assert mt.current_bytes == size  # the views keep the storage alive
        views.clear()
    assert mt.current_bytes == 0 and mt.allocations == 1


def test_frees_reduce_current_and_the_peak_stays():
    with MemoryTracker() as mt:
        a = torch.ones(100, 50)
        b = torch.ones(200, dtype=torch.float64)
        c = a * 2
        assert mt.current_bytes == 2 * nbytes(100, 50) + nbytes(200, dtype=torch.float64)
        del a, c
        d = torch.empty(10, dtype=torch.int8)
    assert mt.current_bytes == nbytes(200, dtype=torch.float64) + 10
    assert mt.peak_bytes == 2 * nbytes(100, 50) + nbytes(200, dtype=torch.float64)
    del b, d


def test_matmul_chain_peak():
    m, k, n, p = 17, 33, 29, 11
    with MemoryTracker() as mt:
        a, b, d = torch.randn(m, k), torch.randn(k, n), torch.randn(n, p)
        c = a @ b
        e = c @ d  # peak: a, b, d, c and e alive together
        del c
        f = e.relu()
        del e
    inputs = nbytes(m, k) + nbytes(k, n) + nbytes(n, p)
    assert mt.peak_bytes == inputs + nbytes(m, n) + nbytes(m, p)
    assert mt.current_bytes == inputs + nbytes(m, p)
    assert mt.peak_op == "aten.mm.default"
    del a, b, d, f


def test_storages_from_before_the_region_are_not_counted():
    before = torch.randn(64, 64)
    out = torch.empty(0)
    with MemoryTracker() as mt:
        before.mul_(3)  # in place on an old storage
        v = before[1:]
        torch.mm(before, before, out=out)  # out= into an old (empty) storage
        new = before + 1
    assert mt.current_bytes == nbytes(64, 64) and mt.allocations == 1
    del v, new


def test_out_argument_resized_inside_the_region_is_re_measured():
    with MemoryTracker() as mt:
        out = torch.empty(0)
        a = torch.ones(20, 30)
        torch.mm(a, a.t(), out=out)
    assert mt.current_bytes == nbytes(20, 20) + nbytes(20, 30)
    del out, a


def test_autograd_saved_tensors_and_grads():
    m, k, n = 24, 40, 56
    with MemoryTracker() as mt:
        x = torch.randn(m, k, requires_grad=True)
        w = torch.randn(k, n)
        y = (x @ w).relu().sum()
        # the relu output is saved for the backward; the mm output is freed once relu has run
        assert mt.current_bytes == nbytes(m, k) + nbytes(k, n) + nbytes(m, n) + 4
        assert mt.peak_bytes == nbytes(m, k) + nbytes(k, n) + 2 * nbytes(m, n)
        y.backward()
        del y
    assert x.grad is not None
    assert mt.current_bytes == 2 * nbytes(m, k) + nbytes(k, n)  # x, w, x.grad: the graph is gone
    del x, w


def test_no_grad_saves_nothing():
    m, k, n = 24, 40, 56
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(k, n)
    with torch.no_grad(), MemoryTracker() as mt:
        y = (x @ w).relu().sum()
    assert mt.current_bytes == 4 and mt.peak_bytes == 2 * nbytes(m, n)
    del y


def test_meta_tensors():
    with MemoryTracker() as mt:
        a = torch.empty(1000, 3000, device="meta", dtype=torch.bfloat16)
        b = a @ a.t()
        c = b[:10]
    assert mt.current_by_device == {META: nbytes(1000, 3000, dtype=torch.bfloat16) + nbytes(1000, 1000, dtype=torch.bfloat16)}
    assert mt.current_bytes == mt.peak_bytes
    del a, b, c


def test_per_device_totals():
    with MemoryTracker() as mt:
        a = torch.empty(100)
        b = torch.empty(300, device="meta")
        del a
    assert mt.current_by_device == {CPU: 0, META: 1200}
    assert mt.peak_by_device == {CPU: 400, META: 1200}
    assert mt.peak_bytes == 1600 and mt.current_bytes == 1200
    del b


def test_fake_tensors_count_on_their_fake_device():
    with FakeTensorMode(), MemoryTracker() as mt:
        a = torch.empty(1000, 4000, device="cuda", dtype=torch.float16)  # no memory is touched
        b = a.float()
    assert mt.current_by_device == {torch.device("cuda", 0): nbytes(1000, 4000, dtype=torch.float16) + nbytes(1000, 4000)}
    del a, b


def test_whole_training_step_on_fake_tensors():
    """An AdamW step: parameters, gradients, two moments and a step counter per parameter."""
    with FakeTensorMode(), MemoryTracker() as mt:
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
        params = sum(p.numel() * 4 for p in model.parameters())
        assert mt.current_bytes == params
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        x = torch.randn(16, 64)
        loss = model(x).square().mean()
        loss.backward()
        assert mt.current_bytes == 2 * params + nbytes(16, 64) + 4  # + grads, the input, the loss
        opt.step()
        del loss, x
    assert mt.current_bytes == 4 * params + 4 * 4  # 4 parameter tensors, each with a 0-dim fp32 step
    assert mt.peak_bytes > mt.current_bytes
    del model, opt


def test_reset_peak_and_reentry():
    mt = MemoryTracker()
    with mt:
        a = torch.empty(1000)
        del a
    mt.reset_peak()
    assert mt.peak_bytes == 0
    with mt:
        b = torch.empty(10)
    assert mt.peak_bytes == mt.current_bytes == 40 and mt.allocations == 2
    del b


def test_python_custom_ops_are_accounted_inside_on_real_tensors():
    @torch.library.custom_op("offsite_kernels_test::big_temp", mutates_args=())
    def big_temp(x: torch.Tensor) -> torch.Tensor:
        temp = torch.empty(x.shape[0], 10_000)  # 40 kB per row, freed before returning
        temp.fill_(1.0)
        return x + temp[:, :1].sum()

    @big_temp.register_fake
    def _(x):
        return torch.empty_like(x)

    x = torch.randn(8, 3)
    with MemoryTracker() as inside:
        y = big_temp(x)
    assert inside.peak_bytes == nbytes(8, 10_000) + 4 + nbytes(8, 3)  # the temp, its 0-dim sum, the output
    assert inside.current_bytes == nbytes(8, 3)
    with MemoryTracker(inside_custom_ops=False) as outside:
        y = big_temp(x)
    assert outside.peak_bytes == outside.current_bytes == nbytes(8, 3)
    with FakeTensorMode() as fake, MemoryTracker() as on_fake:
        y = big_temp(fake.from_tensor(x))  # the fake implementation: outputs only
    assert on_fake.peak_bytes == nbytes(8, 3)
    del y


def test_released_after_the_region_and_by_the_garbage_collector():
    class Cycle:
        pass

    with MemoryTracker() as mt:
        c = Cycle()
        c.self, c.t = c, torch.empty(256)
    del c
    assert mt.current_bytes == 1024  # held by a reference cycle
    gc.collect()
    assert mt.current_bytes == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_workload_balances_to_zero(dtype):
    """Everything allocated in the region and dropped is released: current returns to zero."""
    with MemoryTracker() as mt:
        x = torch.randn(5, 7, 33, dtype=dtype, requires_grad=True)
        lin = nn.Linear(33, 19).to(dtype)
        out = torch.tanh(lin(x)).cumsum(1).softmax(-1)
        out.square().mean().backward()
        del out, x, lin
    gc.collect()
    assert mt.current_bytes == 0 and mt.peak_bytes > 0


class _TwoUses(nn.Module):
    """A linear whose output is saved by two multiplications, and a split into views."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)  # saves x and the weight
        a, b = y.split(3, dim=-1)  # two views of y's storage
        return (y * y).sum() + (a * b).sum()  # y saved by one node, twice; a and b by another


def test_saved_bytes_count_each_storage_once_and_weights_apart():
    from offsite_kernels.memtrack import SavedBytesBetween

    module = _TwoUses()
    x = torch.randn(7, 5, requires_grad=True)
    with SavedBytesBetween(module, module, weights_of=module) as saved:
        module(x).backward()
    assert saved.tensors >= 5  # x, the weight, y twice, a and b
    assert saved.bytes == nbytes(7, 5) + nbytes(7, 6)  # x and y, once each
    assert saved.weight_bytes == nbytes(6, 5)
    with SavedBytesBetween(module, module) as everything:  # no weights named: the weight is counted too
        module(x).backward()
    assert everything.bytes == nbytes(7, 5) + nbytes(7, 6) + nbytes(6, 5) and everything.weight_bytes == 0
    z = torch.randn(11, 3, requires_grad=True)
    with SavedBytesBetween(module, module) as inside_only:
        module(x)
        (z * z).sum()  # after the module returned: z is saved, but not counted
    assert inside_only.bytes == everything.bytes
