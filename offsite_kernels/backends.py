"""Kernel backends and how one is chosen.

``torch`` (pure PyTorch, the reference) always runs. ``triton`` runs on a CUDA GPU of compute
capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell), or on the CPU in Triton's interpreter when
``TRITON_INTERPRET=1``; on older GPUs (T4, V100) the reference serves by default. ``native`` needs the compiled
extension from ``csrc/`` (``offsite_kernels.native`` loads it; see csrc/README.md). ``OFFSITE_BACKEND=torch|triton|native`` forces one; forcing one
that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BackendError

if TYPE_CHECKING:
    import torch

BACKENDS = ("torch", "triton", "native")
ENV_VAR = "OFFSITE_BACKEND"
# The Triton kernels' tiles (at least 99 KiB of shared memory per block, cp.async pipelines) and their
# bf16 tensor-core GEMMs are built and checked for Ampere and newer; older GPUs run the reference.
MIN_TRITON_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def cuda_index(device: torch.device) -> int:
    """The index of CUDA ``device`` (the current device for a bare ``torch.device("cuda")``)."""
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` compute capability of CUDA ``device``, cached per device."""
    return _capability(cuda_index(device))


def gpu_runs_triton(device: torch.device) -> bool:
    """Whether the Triton kernels serve tensors on CUDA ``device``: compute capability 8.0 or newer."""
    return cuda_capability(device) >= MIN_TRITON_CAPABILITY


def check_triton_device(t: torch.Tensor) -> None:
    """Raise :class:`BackendError` when Triton is forced on a CUDA tensor of a GPU older than Ampere (the forced
    backend was checked on the current device only; ``t`` may live on another)."""
    if t.is_cuda and not gpu_runs_triton(t.device):
        raise BackendError(f"{ENV_VAR}=triton cannot run on {t.device}: {_old_gpu_reason(cuda_index(t.device))}")


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op runs its Triton kernels on ``t``: forced by ``OFFSITE_BACKEND=triton`` (on a GPU that runs
    them: :func:`check_triton_device`); by default on a CUDA tensor of a GPU that runs them
    (:func:`gpu_runs_triton`); never when another backend is forced."""
    forced = requested_backend()
    if forced == "triton":
        check_triton_device(t)
        return True
    if forced is not None:  # "torch" (and "native", for ops it lacks, runs the reference)
        return False
    return t.is_cuda and gpu_runs_triton(t.device)


def _old_gpu_reason(index: int) -> str:
    import torch

    major, minor = _capability(index)
    need = ".".join(map(str, MIN_TRITON_CAPABILITY))
    return (
        f"cuda:{index} ({torch.cuda.get_device_name(index)}) has compute capability {major}.{minor}; the Triton "
        f"kernels need {need} or newer (Ampere+). Unset {ENV_VAR} to run the torch reference there"
    )


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
        if triton_interpreter_enabled():
            return BackendStatus(name, True, "Triton interpreter on CPU (TRITON_INTERPRET=1)")
        if _cuda_available():
            import torch

            index = torch.cuda.current_device()
            if _capability(index) < MIN_TRITON_CAPABILITY:
                return BackendStatus(name, False, _old_gpu_reason(index))
            return BackendStatus(name, True, "CUDA GPU")
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
