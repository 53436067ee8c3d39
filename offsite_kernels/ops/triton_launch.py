"""Host-side helpers of the Triton launchers: integer arithmetic, row views and cached autotuned launches.

At the paper's batch (1 x 512 tokens) an eager step on a GPU waits on the host, and most of the
host's time is Python around each kernel launch. These helpers keep that short:

- :func:`cdiv` and :func:`next_power_of_2` in plain integers (``triton.cdiv`` and
  ``triton.next_power_of_2`` are ``constexpr`` functions that unwrap their arguments, about 1.5 µs
  per call from Python);
- :func:`as_rows`: a tensor's ``[rows, last dim]`` strides without a ``reshape`` call when the
  leading dimensions already collapse (the common, contiguous case);
- :class:`CachedAutotune`: a Triton autotuner asked once per key; later launches of that key go
  straight to the kernel with the configuration it chose (Triton's ``Autotuner.run`` rebuilds
  argument dictionaries and its key on every call).

And one rule of correctness, :func:`on_input_device`: Triton launches on the *current* CUDA device
and that device's current stream, whatever device the tensors are on. Every launcher runs with
its input's device current, as PyTorch's own CUDA ops do.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

_Launcher = TypeVar("_Launcher", bound=Callable)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def output(
    out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str = "out"
) -> torch.Tensor:
    """A new contiguous output of ``shape`` and ``dtype``, or the caller's ``out`` checked to be one (the
    kernels write contiguous rows); a clear error otherwise."""
    if out is None:
        return torch.empty(shape, device=device, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)}, got a "
            f"{'contiguous' if out.is_contiguous() else 'non-contiguous'} {out.dtype} tensor of shape {tuple(out.shape)}"
        )
    return out


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``(tensor, rows, row stride, column stride)`` of ``t`` seen as ``[rows, t.shape[-1]]``.

    The tensor is ``t`` itself when its leading dimensions collapse into one row stride (2-D or
    contiguous; its data pointer then addresses row 0), else a ``reshape`` of it (a copy only when
    no view exists). A 0-D tensor is one row of one element.
    """
    if t.dim() == 2:
        return t, t.shape[0], t.stride(0), t.stride(1)
    if t.dim() == 0:
        return t, 1, 1, 1
    n = t.shape[-1]
    if t.is_contiguous():
        return t, t.numel() // n if n else math.prod(t.shape[:-1]), n, 1
    t2 = t.reshape(-1, n)
    return t2, t2.shape[0], t2.stride(0), t2.stride(1)


def on_input_device(launcher: _Launcher) -> _Launcher:
    """Decorate a launcher whose first argument is a tensor: its kernels launch on that tensor's device.

    Triton compiles for, launches on and orders against the current CUDA device and its current
    stream. A model on ``cuda:1`` while ``cuda:0`` is current (``model.to("cuda:1")``, or layers
    spread over GPUs by ``device_map="auto"``) would otherwise launch on the wrong GPU: an illegal
    address, or a race with the stream that wrote the inputs. The check costs a device lookup per
    call; the device switch happens only when the devices differ.
    """

    @functools.wraps(launcher)
    def launch(t: torch.Tensor, *args, **kwargs):
        if t.is_cuda:
            index = t.get_device()
            if index != torch.cuda.current_device():
                with torch.cuda.device(index):
                    return launcher(t, *args, **kwargs)
        return launcher(t, *args, **kwargs)

    launch.launches_on_input_device = True  # what tests/test_triton_launch.py checks every launcher for
    return launch  # type: ignore[return-value]


class CachedAutotune:
    """Launch a kernel through its Triton autotuner once per key, then directly with the chosen configuration.

    The key is what Triton's ``Autotuner`` keys on (its ``key`` arguments and the dtypes of the
    tensor arguments, which this package's kernels name ``*_ptr``) plus every launch-time
    constexpr, so a cached launch never uses a configuration the autotuner would not have picked
    for the same call. Configurations with hooks always go through the autotuner.
    """

    def __init__(self, tuned) -> None:
        self.tuned = tuned
        self.kernel = tuned.fn
        self._key_positions = tuple(i for i, name in enumerate(tuned.arg_names) if name in tuned.keys)
        self._tensor_positions = tuple(i for i, name in enumerate(tuned.arg_names) if name.endswith("_ptr"))
        self.chosen: dict[tuple, tuple] = {}  # key -> (config, its launch keyword arguments)
        self.last_config = None  # the configuration of the latest launch (a ``triton.Config``)
        # Triton's Autotuner keeps per-call state (its arguments, best_config) on itself: one tuning at a time
        self._tuning = threading.Lock()

    def key(self, args: tuple, meta: dict) -> tuple:
        """The cache key of one launch."""
        n = len(args)  # key arguments passed as constexprs are in ``meta``
        keys = tuple([args[i] for i in self._key_positions if i < n])
        return keys, tuple([args[i].dtype for i in self._tensor_positions]), tuple(meta.items())

    def __call__(self, grid: Callable[[dict], tuple], args: tuple, meta: dict) -> None:
        """Launch with ``grid(config kwargs)`` programs; ``args`` positional, ``meta`` the constexprs."""
        key = self.key(args, meta)
        chosen = self.chosen.get(key)
        if chosen is not None:
            self.last_config, kwargs = chosen
            self.kernel[grid(kwargs)](*args, **meta, **kwargs)
            return
        with self._tuning:
            self.tuned[grid](*args, **meta)
            best = self.last_config = self.tuned.best_config
            if best.pre_hook is None and getattr(best, "post_hook", None) is None:
                self.chosen[key] = (best, best.all_kwargs())
