"""The save policy of ``recompute="selective"``: keep the outputs of the GEMMs and of attention, rerun the rest.

PyTorch's selective activation checkpointing caches the chosen ops' outputs in the forward and hands them back when
the backward reruns the block. A cached output that the block then changes in place (Falcon divides its attention
scores in place and adds its attention output into the MLP's) would come back changed, and the rerun would compute
from the changed value. PyTorch notices some of these in the backward (with an error naming neither the op nor a
fix) and misses others (Falcon's scores: wrong gradients without a word). :class:`_CachedOutputGuard` watches the
forward instead: before an in-place op writes over a cached output, the cache gets a copy of it (the value the rerun
needs, and the memory a copy costs where the block writes over it); where PyTorch's cache does not have the layout
this reads, the block is refused with the fix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from ..errors import OffsiteError


class SelectiveCheckpointError(OffsiteError, RuntimeError):
    """A block that selective recomputation cannot rerun exactly."""


def saved_ops() -> list[Any]:
    """The ops whose outputs selective recomputation keeps: GEMMs (dense and the frozen linear) and attention."""
    ops = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default]
    ops += [torch.ops.aten.baddbmm.default, torch.ops.aten.linear.default]
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops.append(op.default)
    from ..ops import frozen_linear as _frozen_linear  # noqa: F401 - registers the custom op

    ops.append(torch.ops.offsite_kernels.frozen_linear.default)
    return ops


def _memory(value: Any) -> list[int]:
    """Where the real tensors of an op's output or argument (a tensor or a tuple of them) live. Fake, functional
    (``torch.compile`` traces with those, and rewrites in-place ops itself) and meta tensors have no memory to watch."""
    return [
        t.untyped_storage().data_ptr()
        for t in tree_leaves(value)
        if type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta" and t.numel()
    ]


def _copy_cached(cache: Any, address: int) -> bool:
    """Replace each entry of PyTorch's selective-checkpoint cache held at ``address`` by a copy of its current value;
    False where the cache does not look as expected (a PyTorch version that keeps it otherwise) or holds none there."""
    storage = getattr(cache, "storage", None)
    if not isinstance(storage, dict):
        return False
    copied = False
    for entries in list(storage.values()):  # the copy below is itself recorded there (as an op to rerun)
        for entry in list(entries.values() if isinstance(entries, dict) else entries):
            for wrapper in tree_leaves(entry):
                if hasattr(wrapper, "version") and address in _memory(getattr(wrapper, "val", None)):
                    wrapper.val = wrapper.val.clone()  # through the modes below (a memory tracker counts it)
                    wrapper.version = wrapper.val._version
                    copied = True
    return copied


class _CachedOutputGuard(TorchDispatchMode):
    """The forward context of a selective checkpoint: PyTorch's caching mode ``cache``, and above it this mode, which
    records where the cached ops' outputs live and, before an in-place op writes there, copies the cached value."""

    supports_higher_order_operators = True  # flex attention and the like pass through to the checkpoint's modes

    def __init__(self, cache: Any, cached_ops: frozenset) -> None:
        super().__init__()
        self.cache, self.cached_ops, self.cached_memory = cache, cached_ops, set()

    @classmethod
    def ignore_compile_internals(cls) -> bool:  # as PyTorch's own checkpoint modes: torch.compile may trace beneath
        return True

    @property
    def ac_graph_id(self) -> Any:  # torch.compile tags the traced nodes through the forward context: the cache's
        return getattr(self.cache, "ac_graph_id", None)

    @ac_graph_id.setter
    def ac_graph_id(self, value: Any) -> None:
        self.cache.ac_graph_id = value

    def __enter__(self):
        self.cache.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self.cache.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self.cache.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if self.cached_memory and func._schema.is_mutable:
            written = [
                args[i] if i < len(args) else kwargs.get(argument.name)
                for i, argument in enumerate(func._schema.arguments)
                if argument.alias_info is not None and argument.alias_info.is_write
            ]
            for address in {a for value in written for a in _memory(value)} & self.cached_memory:
                if not _copy_cached(self.cache, address):
                    raise SelectiveCheckpointError(
                        f"this block changes the output of a GEMM or of attention in place ({func}), which "
                        "recompute='selective' keeps from the forward for the backward's rerun, and this PyTorch's "
                        "checkpoint cache cannot be given a copy: the rerun would start from the changed value. Use "
                        "recompute='block' (the same memory for the block's input, the whole block rerun) or 'full'"
                    )
                self.cached_memory.discard(address)
        out = func(*args, **kwargs)
        if func in self.cached_ops:
            self.cached_memory.update(_memory(out))
        return out


def selective_context() -> tuple[Any, Any]:
    """The ``context_fn`` of a selective checkpoint: the forward caches :func:`saved_ops`' outputs (copying one before
    the block writes over it), the rerun takes them back."""
    ops = saved_ops()
    cache, rerun = create_selective_checkpoint_contexts(ops)
    return _CachedOutputGuard(cache, frozenset(ops)), rerun
