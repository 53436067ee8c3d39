"""A direct eager path for the library's per-layer custom ops: same implementation, same autograd.

The ops are ``torch.library`` custom ops: that is what ``torch.compile``, fake tensors,
``FlopCounterMode``, the memory tracker and ``opcheck`` see. In plain eager PyTorch the custom-op
dispatcher and its Python autograd wrapper cost about 20 µs of host time per call on a CPU core
(``bench/host_overhead.py``), more than the GPU needs for a norm or an activation at the paper's
batch (1 x 512 tokens): there the host, not the GPU, sets the step time.

:class:`EagerOp` wraps one custom op. A call in plain eager mode (real tensors of the base class,
no ``torch.compile``/export tracing, no ``TorchDispatchMode`` on the stack, no ``torch.func``
transform, no ``TorchFunctionMode``, no ``torch.jit`` trace) runs the op's implementation directly,
inside a classic ``torch.autograd.Function`` built from the op's own ``setup_context`` and
``backward`` when an input needs a gradient. Any other call goes through the custom op, and so
does a call of an op without a registered backward whose inputs need grad (a double backward:
the custom op raises, where the implementation would silently drop terms). ``OFFSITE_EAGER_FAST_PATH=0`` (read at import) or
``ENABLED = False`` sends every call through the custom op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._C._functorch import TransformType

from ..errors import ForwardADError

ENABLED = os.environ.get("OFFSITE_EAGER_FAST_PATH", "1").strip().lower() not in ("0", "false", "no", "off")
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager_state() -> bool:
    """No tracing, dispatch mode, function transform, function mode or JIT trace is active."""
    if not ENABLED or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return not torch._C._is_torch_function_mode_enabled() and torch._C._get_tracing_state() is None


def plain_eager(args: tuple) -> bool:
    """Whether a call with ``args`` may skip the custom-op dispatcher (see module docs)."""
    return _plain_eager_state() and all(type(a) in _PLAIN_TYPES for a in args if isinstance(a, torch.Tensor))


def _autograd_function(name: str, impl: Callable, setup_context: Callable, backward: Callable) -> type:
    """A ``torch.autograd.Function`` running ``impl`` with the custom op's ``setup_context`` and ``backward``."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def _backward(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(_backward)})


def _has_tangent(t: torch.Tensor) -> bool:
    return _forward_ad.unpack_dual(t).tangent is not None


def refuse_forward_ad(name: str, args: tuple) -> None:
    """Raise :class:`ForwardADError` when forward-mode AD reaches the op ``name`` (only checked inside a dual level).
    Under ``torch.func.jvp`` every call is refused, even one whose inputs carry no tangent (they are wrapped there)."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    under_jvp = any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    if under_jvp or any(isinstance(a, torch.Tensor) and _has_tangent(a) for a in args):
        raise ForwardADError(
            f"{name} has no forward-mode derivative (torch.func.jvp, jacfwd, torch.autograd.forward_ad): the library's "
            "ops define input gradients for reverse-mode autograd only (loss.backward(), torch.autograd.grad)"
        )


class EagerOp:
    """A custom op (``op``, what tracing and ``opcheck`` use) callable with a direct eager path.

    ``impl`` is the function the op was made from; ``setup_context``/``backward`` (optional) are
    registered as the op's autograd here and reused by the eager path, so both paths save the
    same tensors and compute the same gradients.
    """

    def __init__(
        self,
        op: Any,
        impl: Callable,
        setup_context: Callable | None = None,
        backward: Callable | None = None,
    ) -> None:
        self.op, self.impl = op, impl
        self.function: type | None = None
        if backward is not None:
            if setup_context is None:
                raise ValueError("an op with a backward needs its setup_context")
            op.register_autograd(backward, setup_context=setup_context)
            self.function = _autograd_function(
                f"{impl.__name__.strip('_').removesuffix('_impl')}_eager", impl, setup_context, backward
            )

    def __call__(self, *args: Any) -> Any:
        if _forward_ad._current_level >= 0:  # inside a dual level (forward_ad, torch.func.jvp): a custom op would
            refuse_forward_ad(
                getattr(self.op, "_qualname", str(self.op)), args
            )  # give zero tangents without a word (PyTorch's custom ops do)
        needs_grad = False  # one pass over the arguments: plain tensors only, and whether one needs grad
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) not in _PLAIN_TYPES:
                    return self.op(*args)
                needs_grad = needs_grad or a.requires_grad
        if not _plain_eager_state():
            return self.op(*args)
        if not (needs_grad and torch.is_grad_enabled()):
            return self.impl(*args)
        return self.function.apply(*args) if self.function is not None else self.op(*args)
