"""Kernel launches stubbed out: the host time of the library's own Python around them, measurable on a CPU.

On a GPU at the paper's batch (1 x 512 tokens) the host sets the step time of an eager step, and
most of that host time is the Python that wraps each kernel: input checks, dispatch, output
allocation, launch configuration, autotuner lookup, autograd. :func:`stubbed_kernel_launches`
runs that Python for real on any machine and replaces only the last step, Triton's own launcher
(``JITFunction.run``: argument binding, the compiled-kernel lookup, the driver call), by a no-op:

- the ops' backend choice is forced to ``"triton"`` (``requested_backend``, in ``offsite_kernels.backends``
  and in each op module that imports it by name), so CPU tensors take the GPU code path
  (``OFFSITE_BACKEND=triton`` without the interpreter);
- ``JITFunction.run`` returns at once; outputs stay as allocated (uninitialised): host timing only;
- the frozen linear's autotuners "time" every configuration as equal, so the first call of a
  shape picks one and later calls take the cached-config path they take on a GPU.

A GPU adds Triton's launcher and the driver's launch to each stubbed launch; everything else is
measured as it runs there.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from triton.runtime.jit import JITFunction

from offsite_kernels.backends import triton_interpreter_enabled

# modules holding a ``requested_backend`` name that the ops' backend choice reads: backends.use_triton (the
# activation and fused-head ops) and the ops that also read it themselves
_BACKEND_CHOOSERS = ("offsite_kernels.backends", "offsite_kernels.ops.norm", "offsite_kernels.ops.frozen_linear")
_MISSING = object()  # an attribute the patched object did not have of its own


def _equal_timings(*args, **kwargs) -> list[float]:
    return [1.0, 1.0, 1.0]


@contextmanager
def stubbed_kernel_launches() -> Iterator[None]:
    """Within the block, the library's ops take their Triton path and launch nothing (see module docs)."""
    if torch.cuda.is_available():
        raise RuntimeError("stubbed kernel launches measure the host path on a CPU; on a GPU measure the real launches")
    if triton_interpreter_enabled():
        raise RuntimeError(
            "stubbed kernel launches time the GPU code path, but TRITON_INTERPRET=1 sends launches to Triton's "
            "interpreter; unset TRITON_INTERPRET"
        )
    saved: list[tuple[object, str, object]] = []

    def patch(owner: object, name: str, value: object) -> None:
        saved.append((owner, name, owner.__dict__.get(name, _MISSING) if hasattr(owner, "__dict__") else _MISSING))
        setattr(owner, name, value)

    try:
        for mod_name in _BACKEND_CHOOSERS:
            module = importlib.import_module(mod_name)
            if not hasattr(module, "requested_backend"):  # a patch that would silently force nothing
                raise RuntimeError(f"{mod_name} no longer reads requested_backend: update bench/kernel_stubs.py")
            patch(module, "requested_backend", lambda: "triton")
        patch(JITFunction, "run", lambda self, *args, **kwargs: None)
        # fast blocks check each swapped module's output on a sample input: stubbed kernels write none
        patch(importlib.import_module("offsite_kernels.emulator.fast"), "CHECK_SWAPS", False)
        linear = importlib.import_module("offsite_kernels.ops.frozen_linear_triton")
        for launcher in (linear.autotuned_launch(d, linear.device_arch(torch.empty(0))) for d in ("fwd", "bwd")):
            patch(launcher.tuned, "_bench", _equal_timings)
            patch(launcher.tuned, "cache_results", False)  # the on-disk cache asks the (absent) GPU driver for its target
            patch(launcher.tuned, "cache", {})  # the configurations "picked" here never reach a real launch
            patch(launcher, "chosen", {})
        yield
    finally:
        for owner, name, before in reversed(saved):
            if before is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, before)
