"""Activation recomputation for a stack of frozen blocks.

Two modes, set on a run of consecutive blocks (any ``nn.Module`` called as
``block(hidden_states, ...)`` that returns the new hidden states, or a tuple that starts with them,
which is every Hugging Face decoder block):

- ``"full"``: the stack saves only its input. Its blocks run without autograd in the forward; one
  autograd node stands for the whole stack and, in the backward, reruns the blocks from the saved
  input (with the forward's RNG and autocast state) to get each block's input, then reruns one block
  at a time with grad and backpropagates through it. Between forward and backward only the input
  is kept; in the backward the blocks' inputs plus one block's working set. Hidden states or
  attentions that the blocks output before the last one (``output_hidden_states``) carry no
  gradient in this mode.
- ``"block"``: each block is checkpointed on its own (PyTorch's non-reentrant checkpoint): it
  saves its input and reruns once, with grad, in the backward. ``n`` block inputs kept instead of
  one, for ``n - 1`` fewer block forwards than ``"full"`` (which reruns the blocks below each one to
  rebuild its input). Unlike Hugging Face's reentrant checkpointing, it needs no input that
  requires grad at the embeddings: the hidden states' own gradient is enough.
- ``"selective"``: each block is checkpointed on its own with PyTorch's selective activation
  checkpointing: the outputs of the GEMMs and of attention are saved, norms, activations and
  other cheap elementwise work are recomputed.

Both keep the block's own ``forward`` and its parameter names: the block's class is swapped for
a subclass whose ``forward`` wraps the original (undone by :func:`remove_recompute`). Nothing is
copied from Hugging Face.

Module hooks. The wrapper runs inside the block's ``__call__``, after its pre-hooks and before its
forward hooks, and a rerun calls the wrapped ``forward`` only. In ``"block"`` and ``"selective"`` mode that is
exact: each block's checkpoint spans its ``forward``, its hooks run once, outside. In ``"full"``
mode the hooks *between* blocks (forward hooks of all blocks but the last, pre-hooks of all but the
first) ran in the forward but are not rerun, so a hook there that changes a block's output or
input gives wrong gradients. Full backward hooks of all blocks but the last never fire (those
blocks run without autograd). Such a stack warns once (hooks that change nothing, such as
DeepSpeed's parameter gathering, are harmless). Use ``"block"`` or ``"selective"`` there. The blocks are expected frozen (no parameter needs grad); only the
gradient of the hidden states flows through them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import OffsiteError
from .frozen_blocks import is_kv_cache, require_frozen, unwrap, wrapped_by, wrapper_class
from .selective_checkpoint import selective_context

RECOMPUTE_MODES = ("full", "block", "selective")
_STATE = "_offsite_recompute"  # attribute of a wrapped block: its _Stack


class RecomputeError(OffsiteError, ValueError):
    """Recomputation asked for where it cannot work."""


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise RecomputeError(
            "a recomputed block takes its hidden states as its first positional argument or as hidden_states=, "
            f"as Hugging Face blocks do; got positional {[type(a).__name__ for a in args]} and keywords {sorted(kwargs)}"
        )
    return hidden


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _output_hidden(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _replace_output_hidden(out: Any, hidden: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return hidden
    return type(out)((hidden, *out[1:])) if isinstance(out, tuple) else [hidden, *out[1:]]


def _without_caches(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with any KV cache object replaced by None (a recompute must not append to it)."""
    return tuple(None if is_kv_cache(a) else a for a in args), {k: (None if is_kv_cache(v) else v) for k, v in kwargs.items()}


def _layer_index(block: nn.Module) -> int:
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            return module.layer_idx
    return 0


def _check_no_cached_keys(block: nn.Module, args: tuple, kwargs: dict) -> None:
    """A block rerun in the backward gets no cache: refuse a pass whose cache already holds keys for it."""
    for obj in (*args, *kwargs.values()):
        if is_kv_cache(obj):
            try:
                cached = obj.get_seq_length(_layer_index(block))
            except (IndexError, KeyError, TypeError):
                cached = 0
            if cached > 0:
                raise RecomputeError(
                    "recomputation with a filled KV cache: the backward would rerun attention without the "
                    "cached keys; call the model with use_cache=False when training"
                )


def _check_no_cache(block: nn.Module, args: tuple, kwargs: dict, mode: str) -> None:
    """A checkpointed block (modes "block", "selective") cannot fill a KV cache: its forward and its rerun
    in the backward would both append to it, and a cache left out would come back without this block's keys."""
    if any(is_kv_cache(obj) for obj in (*args, *kwargs.values())):
        raise RecomputeError(
            f"recompute={mode!r} with a KV cache while grad is enabled: the checkpointed block cannot fill it. "
            "Call the model with use_cache=False when training, run generation under torch.no_grad() (nothing is "
            "recomputed there), or use recompute='full', which fills the cache"
        )


def _check_only_hidden_needs_grad(args: tuple, kwargs: dict, hidden: torch.Tensor) -> None:
    """Mode "full" differentiates the stack in its input hidden states only: another argument that needs grad
    would get no gradient (or break the backward), so it is refused by name."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    others = [name for name, a in named if isinstance(a, torch.Tensor) and a is not hidden and a.requires_grad]
    if others:
        raise RecomputeError(
            f"recompute='full' propagates gradients through the hidden states only, but {', '.join(map(str, others))} "
            "of the first recomputed block needs grad too; use recompute='block' or 'selective', which differentiate "
            "every input"
        )


class _StackFunction(torch.autograd.Function):
    """The whole stack as one autograd node: saves the stack's input, reruns the blocks in backward."""

    @staticmethod
    def forward(ctx, stack_input: torch.Tensor, record: _Pass) -> torch.Tensor:  # type: ignore[override]
        ctx.calls, ctx.autocast = record.calls, record.autocast  # freed with the graph (retain_graph works)
        ctx.save_for_backward(stack_input)
        return record.output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        """Rerun the blocks without grad to get each one's input, then one block at a time, last
        first: rerun it with grad and backpropagate. Peak: the blocks' inputs plus one block's work.
        Each rerun sees the RNG state and the autocast state of its forward."""
        (stack_input,) = ctx.saved_tensors
        calls = ctx.calls
        devices = [stack_input.device] if stack_input.is_cuda else []
        with torch.random.fork_rng(devices=devices), _Autocast(ctx.autocast):
            inputs = [stack_input.detach()]
            with torch.no_grad():
                for run, args, kwargs, rng in calls[:-1]:
                    _set_rng(rng)
                    call_args, call_kwargs = _with_hidden(args, kwargs, inputs[-1])
                    inputs.append(_output_hidden(run(*call_args, **call_kwargs)))
            grad = grad_output
            for index in reversed(range(len(calls))):
                run, args, kwargs, rng = calls[index]
                _set_rng(rng)
                with torch.enable_grad():
                    x = inputs[index].requires_grad_(True)
                    call_args, call_kwargs = _with_hidden(args, kwargs, x)
                    torch.autograd.backward(_output_hidden(run(*call_args, **call_kwargs)), grad)
                grad, inputs[index] = x.grad, None
        return grad, None


def _get_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.device]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None, device


def _set_rng(state: tuple[torch.Tensor, torch.Tensor | None, torch.device]) -> None:
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _autocast_state(device: torch.device) -> list[tuple[str, bool, torch.dtype]]:
    """The autocast state of the forward, for the device's type and for the CPU."""
    kinds = {device.type, "cpu"}
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in sorted(kinds)]


class _Autocast(contextlib.ExitStack):
    """Re-enter a recorded autocast state (enabled or disabled, per device type)."""

    def __init__(self, state: list[tuple[str, bool, torch.dtype]]) -> None:
        super().__init__()
        for kind, enabled, dtype in state:
            self.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))


class _Pass:
    """What one forward pass through the stack records (one per thread: DataParallel replicas
    share the blocks' stack but run in threads of their own)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable, tuple, dict, tuple]] = []
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.autocast: list = []
        self.expected = 0  # index of the block that must run next; -1: nothing to record


class _Stack:
    """A recomputed run of ``size`` blocks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._local = threading.local()
        self.warned_hooks = False

    def __deepcopy__(self, memo: dict) -> _Stack:
        return _Stack(self.size)  # a copy never shares a pass in flight

    def warn_on_hooks_between_blocks(self, block: nn.Module, index: int) -> None:
        """Warn once when ``block`` has module hooks that a full rerun would skip (see module docs)."""
        if self.warned_hooks:
            return
        hooks = nn.modules.module
        skipped = []
        if index < self.size - 1 and (block._forward_hooks or hooks._global_forward_hooks):
            skipped.append("forward hooks")
        if index > 0 and (block._forward_pre_hooks or hooks._global_forward_pre_hooks):
            skipped.append("forward pre-hooks")
        backward_hooks = block._backward_hooks or block._backward_pre_hooks
        if index < self.size - 1 and (backward_hooks or hooks._global_backward_hooks or hooks._global_backward_pre_hooks):
            skipped.append("backward hooks")
        if skipped:
            self.warned_hooks = True
            warnings.warn(
                f"recomputed block {index} ({type(block).__name__}) has {' and '.join(skipped)}; full recomputation "
                "reruns the blocks in the backward without the hooks between them, so a hook that changes a block's "
                "input or output gives wrong gradients (and backward hooks never fire). Use recompute='selective' "
                "with such hooks.",
                stacklevel=4,
            )

    def _pass(self) -> _Pass:
        record = getattr(self._local, "record", None)
        if record is None:
            record = self._local.record = _Pass()
        return record

    def call(self, block: nn.Module, index: int, run: Callable, args: tuple, kwargs: dict) -> Any:
        hidden = _hidden_of(args, kwargs)
        if index == 0:
            self._local.record = _Pass()
            record = self._local.record
            if not (torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad):
                record.expected = -1  # nothing to differentiate: the blocks just run
            else:
                _check_only_hidden_needs_grad(args, kwargs, hidden)
                record.input, record.autocast = hidden, _autocast_state(hidden.device)
        record = self._pass()
        if record.expected == -1 or not torch.is_grad_enabled():
            return run(*args, **kwargs)
        if index != record.expected:
            self._local.record = None
            raise RecomputeError(
                f"recomputed block {index} ran out of order (expected block {record.expected}); a recomputed stack "
                "must run all its blocks in order in every forward pass (no layer drop inside it)"
            )
        try:
            record.expected += 1
            self.warn_on_hooks_between_blocks(block, index)
            _check_no_cached_keys(block, args, kwargs)
            # the hidden states are not kept: the backward recomputes them from the stack's input
            call_args, call_kwargs = _with_hidden(*_without_caches(args, kwargs), None)
            record.calls.append((run, call_args, call_kwargs, _get_rng(hidden.device)))
            with torch.no_grad():
                out = run(*args, **kwargs)
            if index < self.size - 1:
                return out
            record.output = _output_hidden(out)
            new_hidden = _StackFunction.apply(record.input, record)
            return _replace_output_hidden(out, new_hidden)
        except BaseException:
            self._local.record = None  # nothing of a failed pass stays alive
            raise
        finally:
            if index == self.size - 1:
                self._local.record = None


@functools.cache
def _wrapped_class(base: type, mode: str) -> type:
    """``base`` with a ``forward`` that recomputes (one subclass per block class and mode)."""

    if mode == "full":

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            stack, index = getattr(self, _STATE)
            return stack.call(self, index, functools.partial(base.forward, self), args, kwargs)

    else:

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            hidden = _hidden_of(args, kwargs)
            if not (torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad):
                return base.forward(self, *args, **kwargs)
            _check_no_cache(self, args, kwargs, mode)
            if mode == "block":  # the block's inputs only; everything inside is rerun
                return checkpoint(base.forward, self, *args, use_reentrant=False, **kwargs)
            return checkpoint(base.forward, self, *args, use_reentrant=False, context_fn=selective_context, **kwargs)

    return wrapper_class(base, "recompute", {"forward": forward, "_offsite_mode": mode})


def apply_recompute(blocks: Sequence[nn.Module], mode: str = "full") -> None:
    """Make a run of consecutive, frozen ``blocks`` recompute their activations in the backward.

    ``mode="full"`` saves only the input of the first block; ``"block"`` checkpoints each block on its
    input; ``"selective"`` checkpoints each block and keeps its GEMM and attention outputs. In eval mode
    (no grad needed) the blocks run as before.
    """
    if mode not in RECOMPUTE_MODES:
        raise RecomputeError(f"recompute mode must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}")
    blocks = list(blocks)
    if any(wrapped_by(block) == "cuda_graphs" for block in blocks):
        raise RecomputeError("these blocks replay CUDA graphs, which do not combine with recomputation; remove_cuda_graphs first")
    if any(wrapped_by(block) == "compile" for block in blocks):
        raise RecomputeError(
            "these blocks are compiled (torch.compile), which does not combine with recomputation; remove_compile first"
        )
    for block in blocks:
        if recompute_mode(block) is not None:
            raise RecomputeError("these blocks already recompute; call remove_recompute first")
    require_frozen(blocks, "recomputation", RecomputeError)
    stack = _Stack(len(blocks))
    for index, block in enumerate(blocks):
        block.__class__ = _wrapped_class(type(block), mode)
        if mode == "full":
            object.__setattr__(block, _STATE, (stack, index))


def remove_recompute(blocks: Sequence[nn.Module]) -> None:
    """Undo :func:`apply_recompute` on these blocks."""
    unwrap(blocks, "recompute", _STATE)


def recompute_mode(block: nn.Module) -> str | None:
    """``"full"``, ``"block"``, ``"selective"`` or None for a block."""
    return type(block).__dict__.get("_offsite_mode") if wrapped_by(block) == "recompute" else None
