"""The GPU launch path of the frozen-linear kernels (Triton's autotuner), run on the CPU.

On a GPU every frozen-linear call goes through ``triton.autotune``: the autotuner prunes the
configurations with our ``early_config_prune`` (called with the positional arguments by name and
the launch's keyword arguments apart), times the survivors and launches the winner. CPU test runs
otherwise take the fixed interpreter configuration and never reach that code. Here the kernels run
through the real autotuner in Triton's interpreter, with a stub timer (there is no GPU to time on).
"""

from __future__ import annotations

import pytest
import torch
from conftest import gen

import offsite_kernels as ok

triton = pytest.importorskip("triton")
k = pytest.importorskip("offsite_kernels.ops.frozen_linear_triton")

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or not k.triton_interpreter_enabled(), reason="the autotuned path runs for real on a GPU"
)


@pytest.fixture
def autotuned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the launches through the autotuners, each with a fresh cache and a stub timer."""
    monkeypatch.setattr(k, "triton_interpreter_enabled", lambda: False)  # _launch: the GPU branch
    for tuned in (k._tuned_fwd, k._tuned_bwd):
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "cache_results", False)
        monkeypatch.setattr(tuned, "do_bench", lambda fn, quantiles=None: [1.0, 1.0, 1.0] if quantiles else 1.0)


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("m", [1, 40, 300])
def test_autotuned_kernels_prune_launch_and_match(autotuned, bits, m):
    n, kk = 48, 256
    qw = ok.quantize_weight(torch.randn(n, kk, generator=gen(m)), bits=bits, group_size=128)
    w64 = qw.dequantize().double()
    x = torch.randn(m, kk, generator=gen(m + 1))
    y = k.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, None, qw.format, qw.group_size, n)
    assert float((y.double() - x.double() @ w64.T).abs().max()) < 1e-3
    dy = torch.randn(m, n, generator=gen(m + 2))
    dx = k.frozen_linear_bwd(dy, qw.data, qw.scales, qw.zeros, qw.format, qw.group_size, kk)
    assert float((dx.double() - dy.double() @ w64).abs().max()) < 1e-3
    # the autotuner chose among the checked candidates of this format and M bucket
    fmt = "int4" if bits == 4 else "any"
    for direction, tuned in (("fwd", k._tuned_fwd), ("bwd", k._tuned_bwd)):
        (best,) = tuned.cache.values()
        assert k._key(best) in k._CANDIDATES[(direction, fmt)]
