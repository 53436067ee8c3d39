"""Build the emulator model: a copy of the source model holding only the kept blocks."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..errors import LayoutError, UnsupportedModelError
from ..models import ModelFamily, find_submodule
from .layout import Layout


def renumber_blocks_(blocks: nn.ModuleList) -> None:
    """Set every ``layer_idx`` inside block ``j`` to ``j`` (KV caches index layers by position)."""
    for position, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position


def restore_source_depth_(model: nn.Module, family: ModelFamily, layout: Layout) -> None:
    """Give blocks that Hugging Face built at their emulator position the attention scaling of their
    source position, where the family scales attention by depth (:attr:`ModelFamily.depth_scaled_attention`).

    An emulator made in memory keeps its source blocks (and their scaling); one loaded from a package
    is rebuilt block by block at positions 0, 1, ... of the shrunk config."""
    modules = _depth_scaled(model, family)
    if not modules:
        return
    for position, (attention, source) in enumerate(zip(modules, layout.kept_indices, strict=True)):
        attention.scaling = attention.scaling * (position + 1) / (source + 1)


def _depth_scaled(model: nn.Module, family: ModelFamily) -> list[nn.Module]:
    """The attention modules of ``model``'s blocks that scale by depth (none where the family or config does not).

    Such a module must hold its scale (``scaling``, set when Hugging Face builds the block): an older
    transformers that divides by ``layer_idx + 1`` at each call would follow the renumbered blocks."""
    if family.depth_scaled_attention is None:
        return []
    path, flag = family.depth_scaled_attention
    if not getattr(model.config, flag, False):
        return []
    modules = [block.get_submodule(path) for block in family.get_blocks(model)]
    if not all(isinstance(getattr(m, "scaling", None), float) for m in modules):
        raise UnsupportedModelError(
            f"{family.name} with {flag}: this transformers version scales attention by the block's position at each "
            "call, which an emulator's renumbered blocks would change; upgrade transformers (5.x keeps the scale per block)"
        )
    return modules


def shrink_config_(config: Any, family: ModelFamily, kept: tuple[int, ...]) -> None:
    """Make ``config`` describe a model of the ``kept`` blocks (count and per-block lists)."""
    n_source = config.num_hidden_layers
    for attr in family.per_block_config_lists:
        values = getattr(config, attr, None)
        if isinstance(values, (list, tuple)) and len(values) == n_source:
            setattr(config, attr, type(values)(values[i] for i in kept))
    config.num_hidden_layers = len(kept)


def copy_with_blocks(model: nn.Module, family: ModelFamily, kept: tuple[int, ...]) -> nn.Module:
    """Deep-copy ``model`` with only the blocks at source indices ``kept``.

    The dropped blocks are never copied. The source model is left exactly as it was.
    """
    _depth_scaled(model, family)  # refused here if the blocks could not keep their source scale
    blocks = family.get_blocks(model)
    subset = nn.ModuleList([blocks[i] for i in kept])
    family.set_blocks(model, subset)
    try:
        reduced = copy.deepcopy(model)
    finally:
        family.set_blocks(model, blocks)
    renumber_blocks_(family.get_blocks(reduced))
    shrink_config_(reduced.config, family, kept)
    keep_dense_blocks_dense_(reduced, family)
    return reduced


def keep_dense_blocks_dense_(model: nn.Module, family: ModelFamily) -> None:
    """Where the config names a mixture of experts' dense blocks by index (:attr:`ModelFamily.dense_blocks_config`),
    name the blocks ``model`` holds now, so that a model rebuilt from the config (an emulator package loaded) has
    a dense MLP exactly where these blocks have one."""
    if family.dense_blocks_config is None or family.experts is None:
        return
    dense = [j for j, block in enumerate(family.get_blocks(model)) if find_submodule(block, family.experts) is None]
    if len(family.dense_blocks_config) == 1:  # a count of leading blocks: the kept blocks keep their order, so the
        (count,) = family.dense_blocks_config  # dense ones (a prefix of the source's) are a prefix here too
        if dense != list(range(len(dense))):
            raise LayoutError(
                f"{family.name}: the config names dense blocks by a count of leading blocks ({count}), and these blocks "
                f"put dense ones at {dense}; keep the source blocks in order"
            )
        setattr(model.config, count, len(dense))
        return
    indices, step = family.dense_blocks_config
    setattr(model.config, indices, dense)
    setattr(model.config, step, 1)


def freeze_all_but_adapter_(model: nn.Module, family: ModelFamily, layout: Layout) -> None:
    """Freeze every parameter, then unfreeze the adapter blocks (bottom and top)."""
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = family.get_blocks(model)
    for position in layout.adapter_positions():
        for p in blocks[position].parameters():
            p.requires_grad_(True)
