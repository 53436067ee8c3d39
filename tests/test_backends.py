import pytest

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
