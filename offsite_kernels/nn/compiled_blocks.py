"""``torch.compile`` for a run of frozen blocks, applied to training calls only (regional compilation).

Why. An eager block is a chain of Python calls: module calls, the library's op wrappers, autograd
nodes and one launch per kernel. At small batches that host work, not the GPU, sets the step
time. ``torch.compile`` traces the block's own forward once: Inductor fuses the elementwise work
between the library's ops (which stay opaque custom ops, so their Triton kernels and their
input-gradient backward run as they are), one generated wrapper launches the kernels, and
``mode="reduce-overhead"`` replays them as CUDA graphs (PyTorch's cudagraph trees). It is the
PyTorch-native alternative to :mod:`offsite_kernels.nn.cuda_graphs`; ``offsite bench`` measures both.

How. :func:`apply_compile` swaps each block's class for a subclass whose ``forward`` sends a
training call through ``torch.compile`` of the block class's own forward, and every other call
to that forward eagerly (undone by :func:`remove_compile`; parameter names and module hooks are
untouched). One compiled function per block class and :func:`apply_compile` call: Dynamo lifts the
parameters and buffers of a block to graph inputs, so blocks of one class and shape share one graph
and a 16-block emulator compiles once per input shape, not 16 times. The function is a copy of
the forward with a code object of its own: Dynamo keeps one cache (and one recompile limit) per
code object, and Hugging Face wraps the forward of every layer class in the same function; so
two emulators, or one compiled again, never share compiled code, shapes seen or limits, and the
compiled code goes with the blocks.

A call is compiled when grad is enabled, the block is in training mode, no KV cache object is among
its arguments (train with ``use_cache=False``; ``OffsiteModel`` passes it), Hugging Face's gradient
checkpointing is off and no saved-tensor hooks are active (``save_on_cpu``), no dispatch mode is on
(the memory tracker, fake tensors) and no outer ``torch.compile`` is tracing. Evaluation and
generation run eagerly: their shapes change every token and would recompile again and again.

Rules. The first training call of each input shape compiles (seconds to a minute); later calls
with the same shapes, dtypes and modules reuse it. Replacing modules inside the blocks
(``OffsiteModel.quantize_``) or moving them makes Dynamo's guards fail once and compile again.
Does not combine with recomputation or with the library's CUDA graphs (``mode="reduce-overhead"``
is PyTorch's own CUDA graphs). In that mode PyTorch's cudagraph trees start a new step by themselves
once no forward waits for its backward (two forwards before one backward are fine); a block's
output kept from an earlier step is overwritten by the replays (clone what you keep), and the
trees' memory pools stay with the process (``torch._inductor.cudagraph_trees.reset_cudagraph_trees``).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import OffsiteError
from .frozen_blocks import inside_checkpoint, is_kv_cache, require_frozen, unwrap, wrapped_by, wrapper_class

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_STATE = "_offsite_compile"


class CompileError(OffsiteError, ValueError):
    """Compiled blocks asked for where they cannot apply."""


@dataclass
class _CompileState:
    mode: str
    compiled: Callable[..., Any]
    calls: int = 0  # training calls that went through the compiled forward


def _eligible(block: nn.Module, args: tuple, kwargs: dict) -> bool:
    return (
        block.training
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not inside_checkpoint()
        and not any(is_kv_cache(v) for v in (*args, *kwargs.values()))
        # Hugging Face's gradient checkpointing (reentrant too: its rerun inside the backward is eager)
        and not getattr(block, "gradient_checkpointing", False)
    )


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of the function ``fn`` with a code object of its own (its own Dynamo cache)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(copy, fn)


def _compiled_forward(base: type, mode: str, fullgraph: bool, dynamic: bool | None) -> Callable[..., Any]:
    return torch.compile(_own_code(base.forward), mode=mode, fullgraph=fullgraph, dynamic=dynamic)


@functools.cache
def _compiled_class(base: type) -> type:
    """``base`` with a ``forward`` that compiles training calls (one subclass per block class)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state: _CompileState = self.__dict__[_STATE]
        if _eligible(self, args, kwargs):
            state.calls += 1
            return state.compiled(self, *args, **kwargs)
        return base.forward(self, *args, **kwargs)

    return wrapper_class(base, "compile", {"forward": forward})


def check_compile_mode(mode: str) -> str:
    """``mode`` if ``torch.compile`` knows it, else a :class:`CompileError` naming the choices."""
    if mode not in COMPILE_MODES:
        raise CompileError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    return mode


def apply_compile(
    blocks: Sequence[nn.Module], mode: str = "default", *, fullgraph: bool = True, dynamic: bool | None = None
) -> None:
    """Compile the training calls of these frozen ``blocks`` with ``torch.compile`` (see module docs).

    ``mode``: one of :data:`COMPILE_MODES`. ``fullgraph=True`` (the default) makes a graph break an
    error at the first training call instead of a silent fallback to Python between graph pieces.
    ``dynamic``: as ``torch.compile`` (None: static shapes first, dynamic after a shape changes).
    """
    check_compile_mode(mode)
    blocks = list(blocks)
    for block in blocks:
        if wrapped_by(block) == "compile":
            raise CompileError("these blocks are compiled already; call remove_compile first")
        if wrapped_by(block) is not None:
            raise CompileError(
                "compiled blocks do not combine with recomputation or the library's CUDA graphs; remove those first "
                "(compile mode 'reduce-overhead' replays CUDA graphs itself)"
            )
    require_frozen(blocks, "compiling blocks", CompileError)
    compiled: dict[type, Callable[..., Any]] = {}  # one per block class of this call: dies with the blocks
    for block in blocks:
        base = type(block)
        if base not in compiled:
            compiled[base] = _compiled_forward(base, mode, fullgraph, dynamic)
        block.__class__ = _compiled_class(base)
        object.__setattr__(block, _STATE, _CompileState(mode, compiled[base]))


def remove_compile(blocks: Sequence[nn.Module]) -> None:
    """Undo :func:`apply_compile` on these blocks (they run their eager forward again)."""
    unwrap(blocks, "compile", _STATE)


def compile_mode(block: nn.Module) -> str | None:
    """The compile mode of ``block`` (:func:`apply_compile`), or None when it runs eagerly."""
    state = block.__dict__.get(_STATE)
    return state.mode if state is not None and wrapped_by(block) == "compile" else None


def compile_report(module: nn.Module) -> dict[str, Any]:
    """What the compiled blocks inside ``module`` did: their mode and the training calls compiled."""
    states = [sub.__dict__[_STATE] for sub in module.modules() if compile_mode(sub) is not None]
    return {"blocks": len(states), "mode": states[0].mode if states else None, "compiled_calls": sum(s.calls for s in states)}
