"""Bottleneck adapters (Houlsby-style): ``h + up(act(down(h)))`` on a block's output.

Installed as a submodule of the block (``<block>.offsite_bottleneck``) plus a forward hook, so
the block's own parameter names do not change. The up projection starts at zero: a fresh
bottleneck leaves the model exactly as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTR = "offsite_bottleneck"


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size, dtype=dtype, device=device)
        self.up = nn.Linear(size, hidden, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.nn.functional.gelu(self.down(h)))


def _hook(module: nn.Module, args: Any, output: Any) -> Any:
    bottleneck = getattr(module, ATTR)
    if isinstance(output, tuple):
        return (bottleneck(output[0]), *output[1:])
    return bottleneck(output)


def install(block: nn.Module, hidden: int, size: int) -> Bottleneck:
    """Add a bottleneck adapter to ``block`` (idempotent); returns it."""
    if hasattr(block, ATTR):
        return getattr(block, ATTR)
    ref = next(block.parameters())
    bottleneck = Bottleneck(hidden, size, dtype=ref.dtype, device=ref.device)
    block.add_module(ATTR, bottleneck)
    block.register_forward_hook(_hook)
    return bottleneck


def bottleneck_size(tensors: dict[str, torch.Tensor]) -> int | None:
    """The bottleneck width found in adapter tensors, or None when they hold no bottleneck."""
    for name, t in tensors.items():
        if name.endswith(f"{ATTR}.down.weight"):
            return int(t.shape[0])
    return None
