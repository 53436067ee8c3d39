"""Memory accounting by tensor storage: what a region of code allocates, and its peak.

:class:`MemoryTracker` is a ``TorchDispatchMode``: every ATen call made inside the region
(forward, autograd's backward, optimizer steps, under ``torch.no_grad`` or not) passes through
it, and every tensor storage that an op's outputs hold and that existed before neither as an
input of that op nor as a storage already tracked is a new allocation. Its bytes count until
the storage is freed: a weak reference to the storage's Python object (PyTorch keeps one
Python object per live storage) fires when the storage dies. So

- views, ``reshape`` of contiguous tensors, in-place and ``out=`` ops allocate nothing;
  a storage is counted once however many tensors share it;
- a storage resized inside the region (``out=`` into an empty tensor, ``resize_``) is
  re-measured whenever an op touches it;
- storages created before the region are not counted (even if resized in it), nor is memory
  that no tensor holds (allocator caching and rounding, cuBLAS workspaces, kernel scratch);
- it works alike on CPU, CUDA, ``meta`` and ``FakeTensor`` tensors (per-device totals use the
  tensor's device: a fake CUDA tensor counts on ``cuda``), so a whole training step can be
  accounted without the hardware: ``with FakeTensorMode(): ...; with MemoryTracker(): step()``
  (the tracker innermost).

Python custom ops (``torch.library.custom_op``) are opaque to a dispatch mode: only their
outputs would be seen. On real tensors the tracker therefore runs such an op's Python
implementation itself, with the tracker active, so the allocations made inside the op (chunk
buffers, temporaries) count too (``inside_custom_ops=False`` turns this off). On fake and meta
tensors the op's fake implementation runs and only its outputs count, plus the scratch memory the
op declares with :func:`register_workspace` (alive together with its outputs, then freed).

Counts are exact storage bytes (no rounding to the CUDA caching allocator's 512-byte blocks).
After the region, storages it allocated are still released from ``current_bytes`` when they
die; peaks only change inside a region.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MemoryTracker", "SavedBytesBetween", "register_workspace"]

_NON_CUSTOM_NAMESPACES = frozenset({"aten", "prim", "prims", "_c10d_functional", "c10d"})


_WORKSPACES: dict[Any, Callable[..., int]] = {}


def register_workspace(op: Any, nbytes: Callable[..., int]) -> None:
    """Declare the scratch memory a custom op allocates and frees inside itself.

    ``op`` is the op packet (``torch.ops.ns.name``); ``nbytes(*args, **kwargs)`` gets the op's
    arguments and returns the scratch bytes. Used where the op's own implementation does not run
    under the tracker (fake and meta tensors).
    """
    _WORKSPACES[op] = nbytes


@dataclass
class _Entry:
    device: torch.device
    nbytes: int
    ref: weakref.ref


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, some wrapper subclasses
        return None


def _nbytes(st: torch.UntypedStorage) -> int | None:
    try:
        return int(st.nbytes())
    except (RuntimeError, TypeError):  # an unbacked symbolic size cannot be counted
        return None


def _is_fake_or_meta(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def _custom_op_kernel(func: Any, tensors: list[torch.Tensor]) -> Any:
    """The Python implementation of a ``torch.library.custom_op`` for real ``tensors``, if any."""
    if not isinstance(func, torch._ops.OpOverload) or func.namespace in _NON_CUSTOM_NAMESPACES or not tensors:
        return None
    if any(_is_fake_or_meta(t) for t in tensors):
        return None
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:  # pragma: no cover - private API of torch
        return None
    opdef = _maybe_get_opdef(func)
    if opdef is None:
        return None
    device_type = tensors[0].device.type
    fns = getattr(opdef, "_backend_fns", {})
    if device_type in getattr(opdef, "_disabled_kernel", ()):
        return None
    return fns.get(device_type) or fns.get(None)


class MemoryTracker(TorchDispatchMode):
    """Bytes of tensor storages allocated inside ``with MemoryTracker() as mt:`` and still alive.

    ``mt.current_bytes`` / ``mt.peak_bytes``: all devices together (the peak of the sum);
    ``mt.current_by_device`` / ``mt.peak_by_device``: per device (each device's own peak);
    ``mt.peak_op``: the op whose outputs set the total peak; ``mt.allocations``: storages counted.
    ``mt.reset_peak()`` sets the peaks to the current values (to measure a later phase).
    Entering the same tracker again continues its counts.
    """

    def __init__(self, *, inside_custom_ops: bool = True) -> None:
        super().__init__()
        self.inside_custom_ops = inside_custom_ops
        self._lock = threading.RLock()  # a weakref callback may run inside a locked section (GC)
        self._live: dict[int, _Entry] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.current_by_device: dict[torch.device, int] = {}
        self.peak_by_device: dict[torch.device, int] = {}
        self.peak_op: str | None = None
        self.allocations = 0

    # --- bookkeeping ------------------------------------------------------------------------
    def _change(self, device: torch.device, delta: int, op: str | None) -> None:
        self.current_bytes += delta
        self.current_by_device[device] = self.current_by_device.get(device, 0) + delta
        if delta > 0:
            if self.current_by_device[device] > self.peak_by_device.get(device, 0):
                self.peak_by_device[device] = self.current_by_device[device]
            if self.current_bytes > self.peak_bytes:
                self.peak_bytes = self.current_bytes
                self.peak_op = op

    def _release(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is None or entry.ref is not ref:
                return
            del self._live[key]
            self._change(entry.device, -entry.nbytes, None)

    def _track(self, t: torch.Tensor, st: torch.UntypedStorage, op: str) -> None:
        nbytes = _nbytes(st)
        if nbytes is None:
            return
        key = id(st)
        ref = weakref.ref(st, functools.partial(self._release, key))
        device = t.device  # a FakeTensor's device, not its meta storage's
        self._live[key] = _Entry(device, nbytes, ref)
        self.allocations += 1
        self._change(device, nbytes, op)

    def _refresh(self, st: torch.UntypedStorage, op: str) -> None:
        entry = self._live.get(id(st))
        nbytes = _nbytes(st)
        if entry is None or nbytes is None or nbytes == entry.nbytes:
            return
        delta, entry.nbytes = nbytes - entry.nbytes, nbytes
        self._change(entry.device, delta, op)

    def _account(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        op = str(func)
        leaves = tree_leaves((args, kwargs))
        known = set()
        with self._lock:
            for x in leaves:
                st = _storage(x) if isinstance(x, torch.Tensor) else x if isinstance(x, torch.UntypedStorage) else None
                if st is not None:
                    known.add(id(st))
                    self._refresh(st, op)  # an out= argument may have been resized
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                st = _storage(t)
                if st is None:
                    continue
                key = id(st)
                if key in self._live:
                    self._refresh(st, op)
                elif key not in known:  # neither an input's storage nor one made before the region
                    self._track(t, st, op)
                    known.add(key)

    # --- dispatch ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kernel = None
        if self.inside_custom_ops:
            kernel = _custom_op_kernel(func, [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)])
        if kernel is not None:
            with self:  # the op's own allocations pass through the tracker too
                out = kernel(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self._account(func, args, kwargs, out)
        if kernel is None:
            self._workspace(func, args, kwargs)
        return out

    def _workspace(self, func: Any, args: tuple, kwargs: dict) -> None:
        declared = _WORKSPACES.get(getattr(func, "overloadpacket", None))
        if declared is None:
            return
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if not tensors or not any(_is_fake_or_meta(t) for t in tensors):
            return
        nbytes = int(declared(*args, **kwargs))
        if nbytes > 0:
            with self._lock:
                self._change(tensors[0].device, nbytes, str(func))
                self._change(tensors[0].device, -nbytes, None)

    # --- public -----------------------------------------------------------------------------
    def reset_peak(self) -> None:
        """Set the peaks to the current values."""
        with self._lock:
            self.peak_bytes = self.current_bytes
            self.peak_by_device = dict(self.current_by_device)
            self.peak_op = None

    @property
    def live_storages(self) -> int:
        """How many storages allocated in the region are still alive."""
        return len(self._live)

    def __repr__(self) -> str:
        return (
            f"MemoryTracker(current_bytes={self.current_bytes}, peak_bytes={self.peak_bytes}, live_storages={self.live_storages})"
        )


class SavedBytesBetween:
    """Bytes autograd saves for the backward while a run of modules executes.

    Counting starts when ``first`` is called and stops when ``last`` returns (forward hooks), under
    saved-tensor hooks: ``with SavedBytesBetween(first, last, weights_of=model) as saved: loss = model(...)``,
    then ``saved.bytes``. Memory is what is counted: each storage once, however many tensors, views or
    autograd nodes save it (a bias shared by every block counts once; q, k and v views of one
    projection output count as that output). Storages of ``weights_of``'s parameters and buffers, which
    linear layers save for their input gradient, are counted apart in ``weight_bytes``: they are held
    anyway. Tensors that PyTorch's checkpoint caches keep outside autograd's saved tensors (selective
    activation checkpointing) are not seen: compare peaks with :class:`MemoryTracker` there.
    """

    def __init__(self, first: torch.nn.Module, last: torch.nn.Module, weights_of: torch.nn.Module | None = None) -> None:
        self.first, self.last = first, last
        self.tensors = 0  # saved references, with repeats
        self._weights = (
            set()
            if weights_of is None
            else {t.untyped_storage().data_ptr() for t in (*weights_of.parameters(), *weights_of.buffers())}
        )
        self._saved: dict[int, int] = {}
        self._saved_weights: dict[int, int] = {}
        self._inside = False

    @property
    def bytes(self) -> int:
        """Bytes of the distinct storages saved, weights of ``weights_of`` excluded."""
        return sum(self._saved.values())

    @property
    def weight_bytes(self) -> int:
        """Bytes of the distinct storages saved that belong to ``weights_of``'s parameters and buffers."""
        return sum(self._saved_weights.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._inside:
            self.tensors += 1
            storage = t.untyped_storage()
            key = storage.data_ptr()
            (self._saved_weights if key in self._weights else self._saved)[key] = storage.nbytes()
        return t

    def _set(self, inside: bool) -> None:
        self._inside = inside

    def __enter__(self) -> SavedBytesBetween:
        self._handles = [
            self.first.register_forward_pre_hook(lambda *_: self._set(True)),
            self.last.register_forward_hook(lambda *_: self._set(False)),
        ]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._inside = False
