"""What the block wrappers share (recomputation, CUDA graphs, compiled blocks).

Each wraps a frozen block by swapping its class for a subclass (:func:`wrapper_class`) that
records which wrapper it is and the class it wraps; :func:`wrapped_by` reads that back and
:func:`unwrap` undoes it. The wrappers exclude each other and are for frozen blocks only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

_WRAPPER = "_offsite_wrapper"  # class attribute of a wrapper subclass: "recompute", "cuda_graphs" or "compile"
_BASE = "_offsite_wrapped_base"  # class attribute of a wrapper subclass: the class it wraps


def wrapper_class(base: type, wrapper: str, attrs: dict[str, Any]) -> type:
    """A subclass of ``base`` with ``attrs`` (its ``forward``, ...), recorded as ``wrapper``'s."""
    return type(base.__name__, (base,), {**attrs, "__module__": base.__module__, _WRAPPER: wrapper, _BASE: base})


def wrapped_by(block: nn.Module) -> str | None:
    """The wrapper ``block`` runs under ("recompute", "cuda_graphs", "compile"), or None."""
    return type(block).__dict__.get(_WRAPPER)


def unwrap(blocks: Sequence[nn.Module], wrapper: str, state_attribute: str) -> None:
    """Undo ``wrapper``'s class swap on ``blocks`` and drop its per-block state (``state_attribute``)."""
    for block in blocks:
        if wrapped_by(block) == wrapper:
            block.__class__ = type(block).__dict__[_BASE]
        block.__dict__.pop(state_attribute, None)


def require_frozen(blocks: Sequence[nn.Module], wrapper: str, error: type[Exception]) -> None:
    """Raise ``error`` naming the first trainable parameters of any of ``blocks`` (``wrapper`` says who asks)."""
    for block in blocks:
        trainable = [name for name, p in block.named_parameters() if p.requires_grad]
        if trainable:
            raise error(
                f"{wrapper} is for frozen blocks, but {type(block).__name__} has trainable parameters "
                f"({', '.join(trainable[:3])}...): freeze them (requires_grad_(False)) first"
            )


def is_kv_cache(obj: Any) -> bool:
    """Whether ``obj`` is a Hugging Face KV cache (a ``Cache`` of any kind)."""
    return hasattr(obj, "get_seq_length") and hasattr(obj, "update")


def inside_checkpoint() -> bool:
    """Whether saved-tensor hooks are active: a checkpoint (Hugging Face's gradient checkpointing) or ``save_on_cpu``."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
