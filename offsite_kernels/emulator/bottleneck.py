"""Bottleneck adapters (Houlsby-style): ``h + up(act(down(h)))`` on a block's output.

Installed as a submodule of the block (``<block>.offsite_bottleneck``) plus a forward hook, so
the block's own parameter names do not change. The up projection starts at zero: a fresh
bottleneck leaves the model exactly as it was.

A model with bottlenecks plugged in saves them with its weights (``<block>.offsite_bottleneck.*``),
but Hugging Face's ``from_pretrained`` builds the plain architecture and drops those tensors:
:func:`load_model` loads a whole model directory and puts them back (:func:`restore_saved`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PackageError

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


def load_model(path: str | os.PathLike, **hf_kwargs: Any) -> nn.Module:
    """A whole causal LM from a local directory, with the bottleneck adapters it was saved with
    (``offsite plug-in`` of a bottleneck adapter writes such a directory)."""
    from ..hf_io import load_local_model

    model = load_local_model(path, added_marker=f".{ATTR}.", **hf_kwargs)
    restore_saved(model, path)
    return model


def saved_bottlenecks(directory: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The bottleneck tensors saved in a model directory's safetensors files, by block path."""
    from safetensors import safe_open

    marker = f".{ATTR}."
    found: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if marker in key:
                    block, name = key.split(marker, 1)
                    found.setdefault(block, {})[name] = f.get_tensor(key)
    return found


def restore_saved(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Reinstall the bottleneck adapters saved in ``directory`` into ``model`` (just loaded from it).

    Returns the block paths that got one; a directory without bottleneck tensors changes nothing."""
    saved = saved_bottlenecks(directory)
    for block_path, state in saved.items():
        where = f"bottleneck tensors {block_path}.{ATTR}.* in {str(directory)!r}"
        try:
            block = model.get_submodule(block_path)
        except AttributeError:
            raise PackageError(f"{where} name no block of the loaded model; the directory is damaged") from None
        down = state.get("down.weight")
        if down is None or down.dim() != 2:
            raise PackageError(f"{where} have no 2-D down.weight; the directory is damaged")
        try:
            install(block, hidden=int(down.shape[1]), size=int(down.shape[0])).load_state_dict(state)
        except RuntimeError as exc:
            raise PackageError(f"{where} do not fit a bottleneck adapter ({exc}); the directory is damaged") from exc
    return list(saved)
