"""What the block wrappers share (recomputation, CUDA graphs, compiled blocks): each is for frozen blocks only."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def require_frozen(blocks: Sequence[nn.Module], wrapper: str, error: type[Exception]) -> None:
    """Raise ``error`` naming the first trainable parameters of any of ``blocks`` (``wrapper`` says who asks)."""
    for block in blocks:
        trainable = [name for name, p in block.named_parameters() if p.requires_grad]
        if trainable:
            raise error(
                f"{wrapper} is for frozen blocks, but {type(block).__name__} has trainable parameters "
                f"({', '.join(trainable[:3])}...): freeze them (requires_grad_(False)) first"
            )


def unwrap(blocks: Sequence[nn.Module], base_attribute: str, state_attribute: str) -> None:
    """Undo a wrapper's class swap: each block gets back the class its wrapper subclass keeps as
    ``base_attribute``, and loses the per-block state stored as ``state_attribute``."""
    for block in blocks:
        base = type(block).__dict__.get(base_attribute)
        if base is not None:
            block.__class__ = base
        block.__dict__.pop(state_attribute, None)
