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
    for cached in (k.autotuned_launch("fwd", 80), k.autotuned_launch("bwd", 80)):  # CPU tensors: class 80
        monkeypatch.setattr(cached, "chosen", {})
        tuned = cached.tuned
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "cache_results", False)
        monkeypatch.setattr(tuned, "do_bench", lambda fn, quantiles=None: [1.0, 1.0, 1.0] if quantiles else 1.0)


# fp32 activations with exact fp32 FMAs (PyTorch's default) or with TF32 allowed, and fp16 (bf16 needs the
# interpreter flag that this fixture turns off with the interpreter branch): each has its own tile lists
ACTIVATIONS = [(torch.float32, False), (torch.float32, True), (torch.float16, False)]


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("m", [1, 40, 300])
@pytest.mark.parametrize("dtype,tf32", ACTIVATIONS, ids=["fp32", "fp32-tf32", "fp16"])
def test_autotuned_kernels_prune_launch_and_match(autotuned, monkeypatch, bits, m, dtype, tf32):
    monkeypatch.setattr(k, "tf32_enabled", lambda: tf32)
    n, kk = 48, 256
    qw = ok.quantize_weight(torch.randn(n, kk, generator=gen(m)), bits=bits, group_size=128)
    w64 = qw.dequantize().double()
    x = torch.randn(m, kk, generator=gen(m + 1)).to(dtype)
    tol = 1e-3 if dtype == torch.float32 else 0.05
    y = k.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, None, qw.format, qw.group_size, n)
    assert float((y.double() - x.double() @ w64.T).abs().max()) < tol
    dy = torch.randn(m, n, generator=gen(m + 2)).to(dtype)
    dx = k.frozen_linear_bwd(dy, qw.data, qw.scales, qw.zeros, qw.format, qw.group_size, kk)
    assert float((dx.double() - dy.double() @ w64).abs().max()) < tol
    # the autotuner chose among the checked candidates of this format, operands and M bucket
    operands = k.HALF if dtype != torch.float32 else k.TF32 if tf32 else k.FP32
    assert k.gemm_operands(dtype) == operands
    for direction in ("fwd", "bwd"):
        (best,) = k.autotuned_launch(direction, 80).tuned.cache.values()
        assert k._key(best) in {k._key(c) for c in k.candidate_configs(direction, qw.format, 80, operands)}


def test_a_keys_later_launches_skip_the_autotuner_with_its_choice(autotuned, monkeypatch):
    """The first launch of a key goes through Triton's autotuner; later ones launch the kernel directly with the
    configuration it chose, and match. A new M bucket, a bias or another dtype is a new key."""
    tuner_calls: list[str] = []
    direct_configs: list[dict] = []
    cached = k.autotuned_launch("fwd", 80)
    real_run = type(cached.tuned).run
    monkeypatch.setattr(type(cached.tuned), "run", lambda self, *a, **kw: tuner_calls.append("tuner") or real_run(self, *a, **kw))
    kernel = cached.kernel
    real_getitem = type(kernel).__getitem__

    def direct(self, grid):
        launch = real_getitem(self, grid)
        return lambda *a, **kw: direct_configs.append(kw) or launch(*a, **kw)

    monkeypatch.setattr(type(kernel), "__getitem__", direct)
    n, kk = 40, 96
    qw = ok.quantize_weight(torch.randn(n, kk, generator=gen(7)), bits=4, group_size=32)
    w64 = qw.dequantize().double()
    bias = torch.randn(n, generator=gen(8))

    def run(m, with_bias=False, dtype=torch.float32):
        x = torch.randn(m, kk, generator=gen(m)).to(dtype)
        y = k.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, bias if with_bias else None, qw.format, qw.group_size, n)
        ref = x.double() @ w64.T + (bias.double() if with_bias else 0)
        assert float((y.double() - ref).abs().max()) < (1e-3 if dtype == torch.float32 else 0.1)

    run(20)
    assert tuner_calls == ["tuner"] and direct_configs == []
    chosen = cached.last_config
    for m in (20, 30, 17):  # one M bucket (32): the cached configuration, without the autotuner
        run(m)
    assert tuner_calls == ["tuner"] and len(direct_configs) == 3
    assert all(c.items() >= chosen.all_kwargs().items() for c in direct_configs) and cached.last_config is chosen
    # (float16: bfloat16 needs the interpreter flag that this fixture turns off with the interpreter branch)
    for case in ({"m": 100}, {"m": 20, "with_bias": True}, {"m": 20, "dtype": torch.float16}):
        run(**case)
    assert tuner_calls == ["tuner"] * 4  # each a new key


def test_each_gpu_class_has_its_own_autotuner_and_cache(autotuned, monkeypatch):
    """Triton keys tuned choices on the arguments, never the device: a launch on a Hopper-class device goes
    through the Hopper autotuner (with its larger tiles), and what it chose is never reused for another class."""
    ampere, hopper = k.autotuned_launch("fwd", 80), k.autotuned_launch("fwd", k.HOPPER)
    assert ampere is not hopper and ampere.tuned is not hopper.tuned and k.autotuned_launch("fwd", 80) is ampere
    hopper_tiles = set(k._HOPPER_TILES[("fwd", "any")])
    assert hopper_tiles <= {k._key(c) for c in hopper.tuned.configs}
    assert not hopper_tiles & {k._key(c) for c in ampere.tuned.configs}
    for cached in (hopper, k.autotuned_launch("bwd", k.HOPPER)):
        monkeypatch.setattr(cached, "chosen", {})
        monkeypatch.setattr(cached.tuned, "cache", {})
        monkeypatch.setattr(cached.tuned, "cache_results", False)
        monkeypatch.setattr(cached.tuned, "do_bench", lambda fn, quantiles=None: [1.0, 1.0, 1.0] if quantiles else 1.0)
    n, kk = 24, 64
    qw = ok.quantize_weight(torch.randn(n, kk, generator=gen(4)), bits=8)
    x = torch.randn(9, kk, generator=gen(5))
    launch_arch = [k.HOPPER]
    monkeypatch.setattr(k, "device_arch", lambda t: launch_arch[0])  # as if x were on an H200, then an A100
    y = k.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, None, qw.format, qw.group_size, n)
    assert len(hopper.chosen) == 1 and not ampere.chosen
    launch_arch[0] = 80
    assert torch.equal(k.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, None, qw.format, qw.group_size, n), y)
    assert len(ampere.chosen) == 1 and len(hopper.chosen) == 1  # tuned afresh for the other class
    assert float((y.double() - x.double() @ qw.dequantize().double().T).abs().max()) < 1e-3


def test_the_two_fp32_gemms_never_share_a_tuned_choice(autotuned, monkeypatch):
    """Exact-fp32 and TF32 launches of one shape have the same tensors and dtypes: only DOT_PRECISION in the
    autotune key keeps Triton from handing the exact-fp32 tile it tuned first to the TF32 launch."""
    n, kk = 40, 128
    qw = ok.quantize_weight(torch.randn(n, kk, generator=gen(11)), bits=8)
    x = torch.randn(24, kk, generator=gen(12))
    tuned = k.autotuned_launch("fwd", 80).tuned
    for tf32, operands in ((False, k.FP32), (True, k.TF32)):
        monkeypatch.setattr(k, "tf32_enabled", lambda tf32=tf32: tf32)
        k.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, None, qw.format, qw.group_size, n)
        allowed = {k._key(c) for c in k.candidate_configs("fwd", "int8", 80, operands)}
        assert k._key(k.autotuned_launch("fwd", 80).last_config) in allowed
    assert len(tuned.cache) == 2
