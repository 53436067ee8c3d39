"""Kernel backends and how one is chosen.

``torch`` (pure PyTorch, the reference) always runs. ``triton`` runs on a CUDA GPU, or on the
CPU in Triton's interpreter when ``TRITON_INTERPRET=1``. ``native`` needs the compiled
extension from ``csrc/`` (``offsite_kernels.native`` loads it; see csrc/README.md). ``OFFSITE_BACKEND=torch|triton|native`` forces one; forcing one
that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from .errors import BackendError

BACKENDS = ("torch", "triton", "native")
ENV_VAR = "OFFSITE_BACKEND"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_status(name: str) -> BackendStatus:
    """Whether backend ``name`` can run here, and why (not)."""
    if name == "torch":
        return BackendStatus(name, True, "pure PyTorch reference")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(name, False, "triton is not installed (pip install triton)")
        if _cuda_available():
            return BackendStatus(name, True, "CUDA GPU")
        if triton_interpreter_enabled():
            return BackendStatus(name, True, "Triton interpreter on CPU (TRITON_INTERPRET=1)")
        return BackendStatus(name, False, "no CUDA GPU; set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter")
    if name == "native":
        from . import native  # loads the extension (or, with OFFSITE_NATIVE_JIT=1, builds it) on first use

        if not native.available():
            return BackendStatus(name, False, native.unavailable_reason())
        return BackendStatus(name, True, "compiled extension" + (" with CUDA kernels" if native.has_cuda() else " (CPU kernels)"))
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def requested_backend() -> str | None:
    """The backend forced by ``OFFSITE_BACKEND``, checked to be runnable; None if unset."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise BackendError(f"{ENV_VAR}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    status = backend_status(name)
    if not status.available:
        raise BackendError(f"{ENV_VAR}={name} cannot run here: {status.reason}")
    return name
