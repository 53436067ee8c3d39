"""Adapter fine-tuning methods: what is trained inside the adapter blocks, and how it is exported.

- ``full``: every parameter of the adapter blocks (the paper's default).
- ``lora``: low-rank updates (PEFT) on the adapter blocks' attention projections only; merged into
  the blocks' weights on export, so the adapter file and ``plug_in`` stay the same.
- ``bitfit``: the adapter blocks' biases only.
- ``bottleneck``: a small residual MLP after each adapter block (Houlsby-style), the blocks frozen;
  ``plug_in`` installs the same modules in the full model from the adapter file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from ..emulator.bottleneck import install as install_bottleneck
from ..emulator.build import freeze_all_but_adapter_
from ..emulator.offsite_model import OffsiteModel
from ..errors import OffsiteError

METHODS = ("full", "lora", "bitfit", "bottleneck")


class MethodError(OffsiteError, ValueError):
    """A fine-tuning method that does not apply to this model."""


@dataclass
class BottleneckSettings:
    """The bottleneck adapter's width."""

    size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise MethodError(f"the bottleneck size must be a whole number of at least 1, got {self.size!r}")


@dataclass
class LoraSettings:
    """LoRA's rank, scale (``alpha / rank``), dropout and the modules it adapts."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: the family's defaults

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise MethodError(f"the LoRA rank must be a whole number of at least 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise MethodError(f"the LoRA alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise MethodError(f"the LoRA dropout must be at least 0 and below 1, got {self.dropout!r}")
        if self.target_modules is not None and (
            not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise MethodError(f"the LoRA target modules must be non-empty names, got {self.target_modules!r}")


def prepare(
    emu: OffsiteModel, method: str, lora: LoraSettings | None = None, bottleneck: BottleneckSettings | None = None
) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` for ``method`` and return the trainable parameters by name."""
    if method not in METHODS:
        raise MethodError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}")
    freeze_all_but_adapter_(emu.model, emu.family, emu.layout)
    if method == "lora":
        _inject_lora(emu, lora or LoraSettings())
    elif method == "bottleneck":
        size = (bottleneck or BottleneckSettings()).size
        for p in emu.parameters():
            p.requires_grad_(False)
        for _, block in emu.adapter_blocks():
            for p in install_bottleneck(block, emu.config.hidden_size, size).parameters():
                p.requires_grad_(True)
    elif method == "bitfit":
        biases = {id(p) for _, block in emu.adapter_blocks() for n, p in block.named_parameters() if n.endswith("bias")}
        if not biases:
            raise MethodError(f"BitFit trains biases, and the {emu.family.name} adapter blocks have none; use full or lora")
        for p in emu.parameters():
            p.requires_grad_(id(p) in biases)
    return {n: p for n, p in emu.named_parameters() if p.requires_grad}


def _inject_lora(emu: OffsiteModel, settings: LoraSettings) -> None:
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules or emu.family.lora_targets
    positions = "|".join(str(p) for p in emu.layout.adapter_positions())
    pattern = rf"{re.escape(emu.family.blocks)}\.({positions})\.(.*\.)?({'|'.join(map(re.escape, targets))})"
    matched = {name: m for name, m in emu.model.named_modules() if re.fullmatch(pattern, name)}
    if not matched:
        raise MethodError(f"no module of the adapter blocks matches LoRA targets {list(targets)}")
    # the adapter blocks by index, not a regular expression: PEFT rewrites the targets of some mixtures of experts
    # (Mixtral) into bare module names, which would reach the frozen emulator blocks too
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        layers_to_transform=list(emu.layout.adapter_positions()),
        layers_pattern=emu.family.blocks.rsplit(".", 1)[-1],
        fan_in_fan_out=not isinstance(next(iter(matched.values())), nn.Linear),  # HF Conv1D stores [in, out]
    )
    # injects LoRA layers into emu.model in place (and freezes everything else); the wrapper is kept to merge
    emu._peft = get_peft_model(emu.model, config)  # type: ignore[attr-defined]
    wrapped = {name.removesuffix(".lora_A") for name, _ in emu.model.named_modules() if name.endswith(".lora_A")}
    if wrapped != set(matched):
        raise MethodError(
            f"PEFT put LoRA layers on {sorted(wrapped - set(matched))[:3] or sorted(set(matched) - wrapped)[:3]}, not on "
            f"the adapter blocks' {list(targets)} only; this PEFT version targets modules differently (report it)"
        )


def export(emu: OffsiteModel) -> None:
    """Fold a method's extra weights into the adapter blocks (LoRA merge); a no-op for the others."""
    peft_model = getattr(emu, "_peft", None)
    if peft_model is not None:
        emu.model = peft_model.merge_and_unload()
        del emu._peft
    freeze_all_but_adapter_(emu.model, emu.family, emu.layout)
