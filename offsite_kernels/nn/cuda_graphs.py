"""CUDA graphs for a run of frozen blocks: each block's forward and its input-gradient backward
replayed as two CUDA graphs.

Why. At the paper's setting (batch 1 x 512 tokens) a frozen block of GPT2-XL's size keeps an H100
class GPU busy for a few hundred microseconds per forward + backward, while the Python that launches
its twenty-odd kernels (module calls, the ops' launchers, autograd) takes longer: the host, not the
GPU, sets the step time. A replayed graph costs the host one launch.

How. :func:`apply_cuda_graphs` swaps each block's class for a subclass whose ``forward`` goes
through one ``_GraphedStack`` shared by the run (undone by :func:`remove_cuda_graphs`; parameter
names and the blocks' own module hooks are untouched: they run on every call, outside the graphs.
Hooks on modules *inside* a block run only in the warm-up and the capture, so what they collect,
such as Hugging Face's ``output_attentions`` of the emulator layers, is not there on a replay).

- A call can be graphed when its tensors are on a CUDA device, grad is enabled, the hidden states
  need grad, no saved-tensor hooks are active (a checkpoint, as in Hugging Face's gradient
  checkpointing, or ``save_on_cpu``), every other argument is a tensor that needs no grad or a
  plain constant (None, bool, int, float, str; a KV cache object is not: train with
  ``use_cache=False``), and the block returns its hidden states first, then tensors or constants.
  Any other call runs the block's own forward.
- The first ``warmup_passes`` passes with a signature through the whole run are eager (Triton compiles and tunes,
  cuDNN picks its algorithms) and record each block's signature: shapes, dtypes, constants, the
  training flag and the autocast state. The next pass whose first block has the recorded
  signature captures every block at once with ``torch.cuda.make_graphed_callables``: forwards in
  order, backwards in reverse, one memory pool, as a training step runs them, in thread-local
  capture mode (other threads may use CUDA meanwhile). The pool holds the saved activations and
  stays allocated between steps (:meth:`_GraphedStack.pool_bytes`).
- A replay copies the call's tensors into the graph's static inputs and returns a copy of the
  static output (a later replay overwrites it); the gradient that leaves the run in the backward
  is a copy too. While any block's graph still holds the saved state of a forward that has not
  been backpropagated (two forwards before one backward), a new pass runs eagerly (the graphs
  share a pool laid out for passes in order); the state is released when its backward runs or its
  autograd graph is freed. A second backward through a replay (``retain_graph=True``) raises, and
  there is no double backward.
- A call whose signature differs from the captured one runs eagerly. Up to ``max_graph_sets``
  signatures (sequence lengths, batch sizes) are captured, each with its own pool; later ones run
  eagerly, with one warning. A capture that fails (a host synchronisation inside a block, say)
  warns once and leaves that signature eager.

Rules. The graphs read the weights at the addresses they had at capture: change them in place
only (``load_state_dict`` and ``copy_`` are fine; not parameter offloading, ZeRO-3 or the fp8
``OFFSITE_FP8_BWD_WEIGHT=cache`` mode). Moving or casting the blocks (``.to()``, ``.half()``) and
``OffsiteModel.quantize_`` drop the captured graphs; so does :func:`reset_cuda_graphs`. Does not
combine with recomputation (a checkpoint reads the RNG state, which a capture forbids). Dropout and other
random ops replay with fresh random numbers each step, but not the ones eager PyTorch would draw.
One thread: calls from other threads (``DataParallel`` replicas) run eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import OffsiteError
from .frozen_blocks import inside_checkpoint, require_frozen, unwrap, wrapped_by, wrapper_class

_STATE = "_offsite_graphs"  # attribute of a graphed block: (its _GraphedStack, its index)
_CONSTANT_TYPES = (type(None), bool, int, float, str)
_MAX_SEEN = 16  # pass signatures warming up at once, at most
GRAPH_DEVICE_TYPES = ("cuda",)  # where calls are graphed (tests add "cpu" with a stand-in capture engine)


class GraphError(OffsiteError, RuntimeError):
    """CUDA graphs asked for where they cannot work, or a replay used in a way that would be wrong."""


# --- call signatures ------------------------------------------------------------------------------
class _NotGraphable(Exception):
    """A call argument the graphs cannot take (a cache object, a tensor that needs grad, ...)."""


def _layout(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable description of ``value`` with its tensors replaced by their index in ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("t", len(tensors) - 1)
    if isinstance(value, _CONSTANT_TYPES):
        return ("c", type(value).__name__, value)
    if isinstance(value, tuple | list):
        return ("s", type(value).__name__, tuple(_layout(v, tensors) for v in value))
    raise _NotGraphable(type(value).__name__)


def _rebuild(layout: Any, tensors: Sequence[torch.Tensor]) -> Any:
    kind = layout[0]
    if kind == "t":
        return tensors[layout[1]]
    if kind == "c":
        return layout[2]
    items = [_rebuild(item, tensors) for item in layout[2]]
    return tuple(items) if layout[1] == "tuple" else items


@dataclass(frozen=True)
class _Signature:
    """What a graph was captured for: argument structure and constants, tensor shapes and dtypes,
    the block's training flag and the autocast state."""

    args: tuple
    kwargs: tuple
    tensors: tuple  # (shape, dtype, requires_grad) per tensor, the hidden states first
    device: torch.device
    training: bool
    autocast: tuple

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        args = tuple(_rebuild(item, tensors) for item in self.args)
        return args, {key: _rebuild(item, tensors) for key, item in self.kwargs}


def _autocast_state(device: torch.device) -> tuple:
    return (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))


def signature(block: nn.Module, args: tuple, kwargs: dict) -> tuple[_Signature, list[torch.Tensor]] | None:
    """The call's signature and its tensors (the hidden states first), or None if it cannot be graphed."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        return None
    tensors: list[torch.Tensor] = [hidden]
    try:
        arg_layout = (("t", 0), *(_layout(a, tensors) for a in args[1:])) if args else ()
        kwarg_layout = tuple(
            (key, ("t", 0) if value is hidden and not args and key == "hidden_states" else _layout(value, tensors))
            for key, value in kwargs.items()
        )
    except _NotGraphable:
        return None
    device = hidden.device
    if any(t.device != device or (t.requires_grad and i) for i, t in enumerate(tensors)):
        return None
    metas = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)
    return _Signature(arg_layout, kwarg_layout, metas, device, block.training, _autocast_state(device)), tensors


@dataclass(frozen=True)
class _OutputForm:
    """How a block returns: its hidden states alone, or first in a tuple/list whose other items
    are tensors (attention weights, say) or constants."""

    container: str | None  # None: the hidden states themselves; "tuple" or "list"
    rest: tuple = ()  # per item after the hidden states: ("t",) a tensor, ("c", value) a constant

    @classmethod
    def of(cls, out: Any) -> _OutputForm | None:
        if isinstance(out, torch.Tensor):
            return cls(None)
        if type(out) not in (tuple, list) or not out or not isinstance(out[0], torch.Tensor):
            return None
        if not all(isinstance(v, (torch.Tensor, *_CONSTANT_TYPES)) for v in out[1:]):
            return None
        return cls(type(out).__name__, tuple(("t",) if isinstance(v, torch.Tensor) else ("c", v) for v in out[1:]))

    def tensors_of(self, out: Any) -> tuple[torch.Tensor, ...]:
        """The output's tensors, the hidden states first: what the graph returns."""
        if self.container is None:
            return (out,)
        return (out[0], *(v for v, item in zip(out[1:], self.rest, strict=True) if item[0] == "t"))

    def wrap(self, tensors: Sequence[torch.Tensor]) -> Any:
        if self.container is None:
            return tensors[0]
        extra = iter(tensors[1:])
        items = (tensors[0], *(next(extra) if item[0] == "t" else item[1] for item in self.rest))
        return items if self.container == "tuple" else list(items)


# --- replay safety ---------------------------------------------------------------------------------
class _Token:
    """One replay's claim on a block's graph state; freed with the replay's autograd graph."""

    __slots__ = ("__weakref__", "number")

    def __init__(self, number: int) -> None:
        self.number = number


class _Slot:
    """Which replay's saved state a block's graph holds (the last forward replayed, until backward)."""

    _numbers = itertools.count(1)

    def __init__(self) -> None:
        self.owner = 0  # number of the token holding the state; 0: free

    @property
    def free(self) -> bool:
        return self.owner == 0

    def acquire(self) -> _Token:
        token = _Token(next(self._numbers))
        self.owner = token.number
        weakref.finalize(token, self.release, token.number)
        return token

    def release(self, number: int) -> None:
        if self.owner == number:
            self.owner = 0


class _Guard(torch.autograd.Function):
    """Copies a replay's static output out; in the backward, checks the graph still holds this
    replay's state, then frees it (the graph's own backward runs right after)."""

    @staticmethod
    def forward(ctx, static_output: torch.Tensor, slot: _Slot, token: _Token) -> torch.Tensor:  # type: ignore[override]
        ctx.slot, ctx.token = slot, token
        return static_output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        if ctx.slot.owner != ctx.token.number:
            raise GraphError(
                "a second backward through a CUDA-graphed block (retain_graph=True, or after the block was replayed "
                "for another forward): a graph keeps the saved activations of one forward for one backward. Run the "
                "forward again, or remove_cuda_graphs() for this use"
            )
        ctx.slot.release(ctx.token.number)
        return grad, None, None


class _CopyGradient(torch.autograd.Function):
    """Identity whose backward copies the gradient: what leaves the graphed run in the backward
    must not be a graph's static buffer (``AccumulateGrad`` may keep it as a ``.grad``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.clone()


# --- capture -------------------------------------------------------------------------------------
def _make_graphed_callables(callables: tuple, sample_args: tuple, pool: Any) -> tuple:
    """The capture engine (``torch.cuda.make_graphed_callables``); tests put a CPU stand-in here.

    The capture runs in ``"thread_local"`` mode: a capture in the middle of training must not fail
    because another thread (a DataLoader's pin-memory thread) makes a CUDA call meanwhile. Where
    ``make_graphed_callables`` has no such argument (torch <= 2.13) its ``torch.cuda.graph`` is
    given that mode for the call."""
    make = torch.cuda.make_graphed_callables
    if "capture_error_mode" in inspect.signature(make).parameters:
        return make(callables, sample_args, pool=pool, capture_error_mode="thread_local")
    original = torch.cuda.graph
    torch.cuda.graph = functools.partial(original, capture_error_mode="thread_local")  # type: ignore[misc]
    try:
        return make(callables, sample_args, pool=pool)
    finally:
        torch.cuda.graph = original  # type: ignore[misc]


def _graph_pool(device: torch.device) -> Any:
    return torch.cuda.graph_pool_handle() if device.type == "cuda" else None


@dataclass
class _GraphSet:
    """The graphs of every block of the run, captured together for one pass signature."""

    signatures: tuple[_Signature, ...]
    forms: tuple[_OutputForm, ...]
    graphed: tuple[Callable, ...]
    pool: Any
    slots: list[_Slot] = field(default_factory=list)
    replays: int = 0


def _block_function(run: Callable, sig: _Signature, form: _OutputForm) -> Callable:
    def block_function(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = sig.rebuild(tensors)
        return form.tensors_of(run(*args, **kwargs))

    return block_function


def _sample(meta: tuple, device: torch.device) -> torch.Tensor:
    shape, dtype, requires_grad = meta
    if dtype == torch.bool:  # a boolean mask that masks nothing: no fully masked rows (NaN) in the capture
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def capture(runs: Sequence[Callable], signatures: Sequence[_Signature], forms: Sequence[_OutputForm]) -> _GraphSet:
    """Capture the blocks' forward and backward graphs for one pass signature (zeros as samples)."""
    device = signatures[0].device
    enabled, dtype = signatures[0].autocast
    callables = tuple(_block_function(run, sig, form) for run, sig, form in zip(runs, signatures, forms, strict=True))
    samples = tuple(tuple(_sample(meta, device) for meta in sig.tensors) for sig in signatures)
    pool = _graph_pool(device)
    device_context = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    # make_graphed_callables refuses autocast's weight cache; the frozen weights never use it
    with device_context, torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
        graphed = _make_graphed_callables(callables, samples, pool)
    return _GraphSet(tuple(signatures), tuple(forms), tuple(graphed), pool, [_Slot() for _ in signatures])


# --- the stack -----------------------------------------------------------------------------------
@dataclass
class _Pass:
    """One forward pass through the run: what it recorded, and the graphs it replays."""

    graphs: _GraphSet | None
    signatures: list[_Signature | None] = field(default_factory=list)
    forms: list[_OutputForm | None] = field(default_factory=list)
    runs: list[Callable] = field(default_factory=list)


class _GraphedStack:
    """A run of ``size`` graphed blocks and the graph sets captured for it."""

    def __init__(self, size: int, warmup_passes: int, max_graph_sets: int) -> None:
        self.size = size
        self.warmup_passes = warmup_passes
        self.max_graph_sets = max_graph_sets
        self.sets: dict[_Signature, _GraphSet] = {}
        self.failed: dict[_Signature, str] = {}
        self._pass: _Pass | None = None
        # first block's signature -> (complete eager passes, every block's signature, output forms, runs)
        self._seen: dict[_Signature, tuple] = {}
        self._thread: int | None = None  # the thread of the first graphed call; others run eagerly
        self.warned: set[str] = set()

    def __deepcopy__(self, memo: dict) -> _GraphedStack:
        return _GraphedStack(self.size, self.warmup_passes, self.max_graph_sets)  # graphs are never copied

    def reset(self) -> None:
        """Drop every captured graph (a replay in flight keeps its own until its backward)."""
        self.sets.clear()
        self.failed.clear()
        self._pass = None
        self._seen.clear()

    def pool_bytes(self) -> int:
        """Device memory held by the graphs' pools (saved activations and workspace), in bytes."""
        pools = {graphs.pool for graphs in self.sets.values() if graphs.pool is not None}
        if not pools:
            return 0
        return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", ())) in pools)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=5)

    @staticmethod
    def _eligible(hidden: Any) -> bool:
        return (
            type(hidden) is torch.Tensor  # no fake, functional or other subclass tensors
            and hidden.device.type in GRAPH_DEVICE_TYPES
            and torch.is_grad_enabled()
            and hidden.requires_grad
            and not torch.compiler.is_compiling()
            # inside a checkpoint (HF gradient checkpointing) or save_on_cpu: a capture there would
            # save into the checkpoint's frame and break its recomputation
            and not inside_checkpoint()
        )

    def _start_pass(self, sig: _Signature | None) -> _Pass:
        graphs = self.sets.get(sig) if sig is not None else None
        seen = self._seen.get(sig) if sig is not None else None
        if graphs is None and seen is not None and sig not in self.failed and self._ready_to_capture(seen[0]):
            graphs = self._capture(sig, *seen[1:])
        if graphs is not None and not all(slot.free for slot in graphs.slots):
            # the blocks' graphs share one memory pool, laid out for passes that run in order: while
            # another pass still holds state in any of them, this whole pass runs eagerly
            graphs = None
        self._pass = _Pass(graphs)
        return self._pass

    def _ready_to_capture(self, passes: int) -> bool:
        if passes < self.warmup_passes:
            return False
        if len(self.sets) >= self.max_graph_sets:
            self._warn_once(
                "max_sets",
                f"CUDA graphs: {len(self.sets)} input signatures captured already (max_graph_sets); further ones "
                "run eagerly. Pad batches to a few fixed shapes, or raise max_graph_sets",
            )
            return False
        return True

    def _capture(self, first: _Signature, signatures: tuple, forms: tuple, runs: tuple) -> _GraphSet | None:
        self._seen.pop(first, None)
        try:
            graphs = capture(runs, signatures, forms)
        except Exception as exc:  # the blocks still run eagerly: nothing is lost but speed
            self.failed[first] = f"{type(exc).__name__}: {exc}"
            self._warn_once(
                "capture",
                f"CUDA graph capture of the frozen blocks failed, they run eagerly ({type(exc).__name__}: {exc})",
            )
            return None
        self.sets[first] = graphs
        return graphs

    def _finish_pass(self, record: _Pass) -> None:
        """Count a complete eager pass towards the capture of its signature."""
        if record.graphs is not None:
            return
        if any(s is None for s in record.signatures) or any(f is None for f in record.forms):
            return
        first, signatures, forms = record.signatures[0], tuple(record.signatures), tuple(record.forms)
        passes, *known = self._seen.get(first, (0, None, None, None))
        if known[:2] != [signatures, forms]:
            passes = 0  # the same first block but other later ones: count afresh
        if len(self._seen) >= _MAX_SEEN and first not in self._seen:
            self._seen.clear()
        self._seen[first] = (passes + 1, signatures, forms, tuple(record.runs))

    def call(self, block: nn.Module, index: int, run: Callable, args: tuple, kwargs: dict) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not self._eligible(hidden) or self._thread not in (None, threading.get_ident()):
            if index == 0:
                self._pass = None
            return run(*args, **kwargs)
        self._thread = threading.get_ident()
        found = signature(block, args, kwargs)
        sig, tensors = found if found is not None else (None, [])
        record = self._start_pass(sig) if index == 0 else self._pass
        if record is None or len(record.signatures) != index:  # out of order: no graphs for this pass
            self._pass = None
            return run(*args, **kwargs)
        record.signatures.append(sig)
        record.runs.append(run)
        graphs = record.graphs
        try:
            if graphs is not None and sig == graphs.signatures[index] and graphs.slots[index].free:
                record.forms.append(graphs.forms[index])
                out = self._replay(graphs, index, tensors)
            else:
                out = run(*args, **kwargs)
                record.forms.append(_OutputForm.of(out))
        except BaseException:
            self._pass = None  # a failed pass counts for nothing
            raise
        if index == self.size - 1:
            self._finish_pass(record)
            self._pass = None
        return out

    @staticmethod
    def _replay(graphs: _GraphSet, index: int, tensors: list[torch.Tensor]) -> Any:
        slot = graphs.slots[index]
        token = slot.acquire()
        if index == 0:  # the gradient handed on below the run is a copy, never the static buffer
            tensors = [_CopyGradient.apply(tensors[0]), *tensors[1:]]
        static_outputs = graphs.graphed[index](*tensors)
        graphs.replays += 1
        # copies: the next replay overwrites the static outputs
        hidden = _Guard.apply(static_outputs[0], slot, token)
        return graphs.forms[index].wrap((hidden, *(t.clone() for t in static_outputs[1:])))


# --- install -------------------------------------------------------------------------------------
@functools.cache
def _graphed_class(base: type) -> type:
    """``base`` with a ``forward`` that replays CUDA graphs (one subclass per block class)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        stack, index = getattr(self, _STATE)
        return stack.call(self, index, functools.partial(base.forward, self), args, kwargs)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        getattr(self, _STATE)[0].reset()  # moved or cast weights: the graphs would read the old ones
        return base._apply(self, fn, *args, **kwargs)

    return wrapper_class(base, "cuda_graphs", {"forward": forward, "_apply": _apply})


def apply_cuda_graphs(blocks: Sequence[nn.Module], warmup_passes: int = 1, max_graph_sets: int = 4) -> None:
    """Replay a run of consecutive, frozen ``blocks`` as CUDA graphs in training (see module docs).

    ``warmup_passes``: eager passes before the capture; ``max_graph_sets``: input signatures
    (shapes) captured at most, each with its own memory pool. Off the GPU and under
    ``torch.no_grad()`` (evaluation, generation) the blocks run as before.
    """
    from .recompute import recompute_mode

    if warmup_passes < 1 or max_graph_sets < 1:
        raise GraphError(f"warmup_passes and max_graph_sets must be >= 1, got {warmup_passes} and {max_graph_sets}")
    blocks = list(blocks)
    for block in blocks:
        if cuda_graphs_enabled(block):
            raise GraphError("these blocks already replay CUDA graphs; call remove_cuda_graphs first")
        if wrapped_by(block) == "compile":
            raise GraphError(
                "these blocks are compiled (torch.compile); for CUDA graphs of compiled blocks use compile mode "
                "'reduce-overhead' instead of the library's graphs"
            )
        if recompute_mode(block) is not None:
            raise GraphError(
                "CUDA graphs and recomputation do not combine (the graphs keep every block's saved activations, and a "
                "checkpoint reads the RNG state, which a capture forbids); set recompute=None to use CUDA graphs"
            )
    require_frozen(blocks, "CUDA graphs", GraphError)
    stack = _GraphedStack(len(blocks), warmup_passes, max_graph_sets)
    for index, block in enumerate(blocks):
        block.__class__ = _graphed_class(type(block))
        object.__setattr__(block, _STATE, (stack, index))


def remove_cuda_graphs(blocks: Sequence[nn.Module]) -> None:
    """Undo :func:`apply_cuda_graphs` on these blocks (their graphs are dropped)."""
    unwrap(blocks, "cuda_graphs", _STATE)


def reset_cuda_graphs(blocks: Sequence[nn.Module]) -> None:
    """Drop the captured graphs of these blocks; the next passes warm up and capture again."""
    for block in blocks:
        state = getattr(block, _STATE, None)
        if state is not None:
            state[0].reset()


def cuda_graphs_enabled(block: nn.Module) -> bool:
    """Whether ``block`` replays CUDA graphs (:func:`apply_cuda_graphs`)."""
    return _STATE in block.__dict__ and wrapped_by(block) == "cuda_graphs"


def graph_stacks(module: nn.Module) -> list[_GraphedStack]:
    """Every graphed run inside ``module``, once each."""
    found: dict[int, _GraphedStack] = {}
    for sub in module.modules():
        stack = graph_stack(sub)
        if stack is not None:
            found.setdefault(id(stack), stack)
    return list(found.values())


def graph_report(module: nn.Module) -> dict[str, Any]:
    """What the CUDA graphs inside ``module`` did: input signatures captured, block replays, bytes
    held by their pools, failed captures (a graphed run that captured nothing ran eagerly)."""
    stacks = graph_stacks(module)
    return {
        "sets": sum(len(s.sets) for s in stacks),
        "block_replays": sum(g.replays for s in stacks for g in s.sets.values()),
        "pool_bytes": sum(s.pool_bytes() for s in stacks),
        "failed": [reason for s in stacks for reason in s.failed.values()],
    }


def graph_stack(block: nn.Module) -> _GraphedStack | None:
    """The shared state of the graphed run ``block`` belongs to (sets captured, replays, pool bytes)."""
    state = block.__dict__.get(_STATE)
    return state[0] if state is not None else None
