import importlib

import pytest
import torch

from offsite_kernels.backends import backend_status, requested_backend
from offsite_kernels.errors import BackendError


def test_torch_backend_always_runs():
    assert backend_status("torch").available


def test_forced_backend_is_checked(monkeypatch):
    monkeypatch.delenv("OFFSITE_BACKEND", raising=False)
    assert requested_backend() is None
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")
    assert requested_backend() == "torch"
    monkeypatch.setenv("OFFSITE_BACKEND", "cuda")
    with pytest.raises(BackendError, match="not a backend; choose one of torch, triton, native"):
        requested_backend()


def test_forcing_an_unavailable_backend_fails_loudly(monkeypatch):
    if backend_status("native").available:
        pytest.skip("the native extension is built here")
    monkeypatch.setenv("OFFSITE_BACKEND", "native")
    with pytest.raises(BackendError, match="cannot run here: the native extension is not built"):
        requested_backend()


def test_triton_interpreter_counts_as_runnable(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_status("triton").available


# --- GPUs older than Ampere (T4, V100): the reference serves, and forcing Triton says why it cannot -----------
def _module(name: str):
    """An op module of ``offsite_kernels.ops`` (the package exports functions of the same names)."""
    return importlib.import_module(f"offsite_kernels.ops.{name}")


class _CudaTensor:
    """What the dispatchers read of a CUDA tensor (a CPU-only machine cannot make one)."""

    is_cuda = True
    device = torch.device("cuda", 0)
    shape = (5, 64)

    def numel(self) -> int:
        return 5 * 64


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in CUDA device 0 whose compute capability the test sets (``gpu(7, 5)``)."""
    import offsite_kernels.backends as backends

    monkeypatch.delenv("OFFSITE_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")

    def set_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(backends, "_capability", lambda index: (major, minor))

    return set_capability


@pytest.mark.parametrize("capability", [(7, 5), (7, 0), (6, 1)])
def test_pre_ampere_gpus_run_the_reference(gpu, capability, monkeypatch):
    pytest.importorskip("triton")
    from offsite_kernels.backends import gpu_runs_triton, use_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    activation, frozen_linear, fused_head, norm = (
        _module(name) for name in ("activation", "frozen_linear", "fused_head", "norm")
    )
    gpu(*capability)
    t = _CudaTensor()
    assert not gpu_runs_triton(t.device) and not use_triton(t)
    assert not norm._use_triton(t)
    assert activation.use_triton is use_triton and fused_head.use_triton is use_triton  # the ops' one dispatch
    for fmt in ("dense", "int8", "int4", "fp8"):
        for direction in ("fwd", "bwd"):
            assert frozen_linear._pick(t, fmt, direction) == "torch", (fmt, direction)
    status = backend_status("triton")
    assert not status.available
    assert f"compute capability {capability[0]}.{capability[1]}" in status.reason and "8.0 or newer" in status.reason


def test_forcing_triton_on_a_pre_ampere_gpu_fails_loudly(gpu, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gpu(7, 5)
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    with pytest.raises(BackendError, match=r"cuda:0 \(Tesla T4\) has compute capability 7.5.*Unset OFFSITE_BACKEND"):
        requested_backend()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs anywhere
    assert backend_status("triton").available


def test_forcing_triton_on_a_tensor_of_an_older_second_gpu_fails_loudly(gpu, monkeypatch):
    """The forced backend is checked on the current GPU (an A100 here); a tensor on an older cuda:1 is refused
    at the op, never launched there."""
    pytest.importorskip("triton")
    import offsite_kernels.backends as backends
    from offsite_kernels.backends import use_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "_capability", lambda index: {0: (8, 0), 1: (7, 0)}[index])
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    assert requested_backend() == "triton"
    on_first, on_second = _CudaTensor(), _CudaTensor()
    on_second.device = torch.device("cuda", 1)
    assert use_triton(on_first) and _module("frozen_linear")._pick(on_first, "int4", "fwd") == "triton"
    for check in (use_triton, _module("norm")._use_triton, lambda t: _module("frozen_linear")._pick(t, "int4", "fwd")):
        with pytest.raises(BackendError, match=r"cannot run on cuda:1: cuda:1 .* compute capability 7.0"):
            check(on_second)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_ampere_and_newer_run_triton(gpu, capability, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from offsite_kernels.backends import use_triton

    frozen_linear = _module("frozen_linear")
    gpu(*capability)
    t = _CudaTensor()
    assert use_triton(t) and backend_status("triton").available
    assert frozen_linear._pick(t, "dense", "fwd") == frozen_linear._pick(t, "int4", "bwd") == "triton"
