"""The training methods ``offsite bench`` compares, and how each builds its trainee from a model.

A method is written as its base and modifiers joined by ``+``, in any order:

- base ``ft``: full fine-tuning of every parameter; ``ot``: Offsite-Tuning, the adapter blocks
  trained through a layer-dropped frozen emulator (uniform drop, as in the paper).
- ``lora``: LoRA (rank 8, PEFT) on the attention projections instead of whole blocks: of every
  block for ``ft``, of the adapter blocks for ``ot``.
- ``zero`` (``ft`` only): full fine-tuning on DeepSpeed, the way a model too large for one GPU
  is fine-tuned there: ZeRO stage 2, bf16 weights and gradients on the device, fp32 master
  weights, gradients and AdamW state offloaded to host memory and stepped by DeepSpeed's CPU
  Adam (:mod:`offsite_kernels.benchmark.zero`). On a GPU, ``ft`` itself runs this way when plain
  FT does not fit (see :mod:`offsite_kernels.benchmark.runner`).
- ``fast`` (``ot`` only): the library's fused frozen emulator blocks, and every frozen tensor kept in
  the compute dtype (bf16 under bf16 autocast) instead of an fp32 copy.
- ``int8`` / ``int4`` / ``fp8`` (``ot`` only): the emulator's linears stored in that format
  (int4 group-wise, groups of 128) and run by the low-bit frozen linear.
- ``recompute`` (``ot`` only): full recomputation of the emulator's activations in the backward.
- ``head`` (``ot`` only): the loss through the fused frozen LM head (chunked linear +
  cross-entropy; the logits are never materialised). Without it the emulator computes logits and
  the loss as Hugging Face does.
- ``graph`` (``ot`` only, CUDA only, not with ``recompute``): each emulator block's forward and
  input backward replayed as CUDA graphs (:mod:`offsite_kernels.nn.cuda_graphs`), captured in
  the warm-up steps.
- ``compile`` (``ot`` only, not with ``recompute``): the emulator blocks' training calls through
  ``torch.compile`` (:mod:`offsite_kernels.nn.compiled_blocks`), compiled in the warm-up steps;
  with ``graph`` in mode "reduce-overhead" (PyTorch's own CUDA graphs, instead of the library's),
  else in mode "default".

``ot`` alone is the paper's method in plain PyTorch: Hugging Face blocks, fp32 weights, bf16
autocast. Every trainable parameter is fp32 and trained by AdamW in every method.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OffsiteError

BASES = ("ft", "ot")
MODIFIERS = ("lora", "zero", "fast", "int8", "int4", "fp8", "recompute", "head", "compile", "graph")
_FORMATS = {"int8": 8, "int4": 4, "fp8": "fp8"}
INT4_GROUP_SIZE = 128
LORA_RANK = 8


class BenchError(OffsiteError, ValueError):
    """Bad input to ``offsite bench`` (a method, model or setting it cannot run)."""


@dataclass(frozen=True)
class BenchMethod:
    base: str
    lora: bool = False
    zero: bool = False
    fast: bool = False
    bits: int | str | None = None
    recompute: bool = False
    fused_head: bool = False
    cuda_graphs: bool = False
    compiled: bool = False

    @property
    def compile_mode(self) -> str | None:
        """The ``torch.compile`` mode of the emulator blocks, or None (eager)."""
        if not self.compiled:
            return None
        return "reduce-overhead" if self.cuda_graphs else "default"

    @property
    def name(self) -> str:
        """Canonical name: base, then modifiers in :data:`MODIFIERS` order."""
        parts = [self.base]
        parts += ["lora"] if self.lora else []
        parts += ["zero"] if self.zero else []
        parts += ["fast"] if self.fast else []
        parts += [k for k, v in _FORMATS.items() if v == self.bits]
        parts += ["recompute"] if self.recompute else []
        parts += ["head"] if self.fused_head else []
        parts += ["compile"] if self.compiled else []
        parts += ["graph"] if self.cuda_graphs else []
        return "+".join(parts)

    @property
    def label(self) -> str:
        """The name as the paper's table writes it (FT, OT + LoRA, ...)."""
        head, *rest = self.name.split("+")
        if self.zero:
            return "FT (DeepSpeed ZeRO-2, optimizer on CPU)"
        words = {
            "lora": "LoRA",
            "fast": "fused",
            "recompute": "recompute",
            "head": "fused head",
            "compile": "compiled",
            "graph": "CUDA graphs",
        }
        return " + ".join([head.upper(), *(words.get(w, w) for w in rest)])

    @classmethod
    def parse(cls, text: str) -> BenchMethod:
        """``"ot+lora+int4"`` -> the method; a clear error for an unknown or contradictory name."""
        tokens = [t.strip().lower() for t in text.split("+") if t.strip()]
        if not tokens or tokens[0] not in BASES:
            raise BenchError(f"method {text!r} must start with one of {', '.join(BASES)} (e.g. ot+lora+int4)")
        base, mods = tokens[0], tokens[1:]
        unknown = [m for m in mods if m not in MODIFIERS]
        if unknown:
            raise BenchError(f"method {text!r}: unknown modifier(s) {unknown}; choose from {', '.join(MODIFIERS)}")
        if len(set(mods)) != len(mods):
            raise BenchError(f"method {text!r} repeats a modifier")
        formats = [m for m in mods if m in _FORMATS]
        if len(formats) > 1:
            raise BenchError(f"method {text!r} names more than one weight format ({', '.join(formats)}); pick one")
        if "graph" in mods and "recompute" in mods:
            raise BenchError(
                f"method {text!r}: +graph keeps every emulator block's activations in its graphs, +recompute drops them; pick one"
            )
        if "compile" in mods and "recompute" in mods:
            raise BenchError(f"method {text!r}: +compile does not combine with +recompute; pick one")
        if base == "ft" and set(mods) - {"lora", "zero"}:
            raise BenchError(
                f"method {text!r}: full fine-tuning takes only +lora or +zero; {sorted(set(mods) - {'lora', 'zero'})} "
                "are emulator options (ot+...)"
            )
        if "zero" in mods and (base != "ft" or "lora" in mods):
            raise BenchError(f"method {text!r}: +zero is full fine-tuning on DeepSpeed: write it as ft+zero")
        return cls(
            base=base,
            lora="lora" in mods,
            zero="zero" in mods,
            fast="fast" in mods,
            bits=_FORMATS[formats[0]] if formats else None,
            recompute="recompute" in mods,
            fused_head="head" in mods,
            cuda_graphs="graph" in mods,
            compiled="compile" in mods,
        )


BEST_METHOD = "ot+lora+fast+int4+recompute+head"
DEFAULT_METHODS = ("ft", "ft+lora", "ot", "ot+lora", BEST_METHOD)
ALL_METHODS = (
    "ft",
    "ft+zero",
    "ft+lora",
    "ot",
    "ot+lora",
    "ot+fast",
    "ot+fast+int8",
    "ot+fast+int4",
    "ot+fast+fp8",
    "ot+fast+recompute",
    "ot+fast+head",
    "ot+fast+int4+recompute+head",
    "ot+lora+fast",
    "ot+lora+fast+int8+recompute+head",
    BEST_METHOD,
    "ot+fast+graph",
    "ot+lora+fast+int4+head+graph",
    "ot+fast+compile",
    "ot+fast+compile+graph",
    "ot+lora+fast+int4+head+compile+graph",
)


@dataclass
class Trainee:
    """What one training step runs: the module, its trainable parameters and its loss."""

    module: nn.Module
    params: list[nn.Parameter]
    loss: Callable[[torch.Tensor], torch.Tensor]


def _lora_all_blocks(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from ..models import get_family

    family = get_family(model)
    targets = "|".join(map(re.escape, family.lora_targets))
    pattern = rf"{re.escape(family.blocks)}\.\d+\.(.*\.)?({targets})"
    first = next(m for n, m in model.named_modules() if re.fullmatch(pattern, n))
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=pattern, fan_in_fan_out=not isinstance(first, nn.Linear)
    )
    return get_peft_model(model, config)


def cast_frozen_(module: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen floating-point parameter and buffer of ``module`` in ``dtype``.

    Low-bit weight data, scales and zero points of the frozen linears are left as quantized."""
    from ..nn.frozen_linear import FrozenLinear

    cast: dict[int, nn.Parameter] = {}  # tied parameters (embedding and LM head) stay one tensor
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                if id(p) not in cast:
                    cast[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                sub._parameters[name] = cast[id(p)]
        if isinstance(sub, FrozenLinear):
            if sub.bias is not None and sub.bias.is_floating_point():
                sub.bias = sub.bias.to(dtype)
            continue
        for name, b in sub._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype and "inv_freq" not in name:
                sub._buffers[name] = b.to(dtype)


def build_trainee(model: nn.Module, layout: str, method: BenchMethod, compute_dtype: torch.dtype | None) -> Trainee:
    """Turn a freshly built fp32 causal LM into what ``method`` trains (``model`` may be consumed)."""
    if method.base == "ft":
        module = _lora_all_blocks(model) if method.lora else model
        if not method.lora:
            for p in module.parameters():
                p.requires_grad_(True)
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        return Trainee(module, params, lambda ids: module(input_ids=ids, labels=ids).loss)

    from ..emulator import make_emulator, parse_layout
    from ..workflow.methods import prepare

    bottom, k, top = parse_layout(layout)
    emu = make_emulator(
        model,
        bottom=bottom,
        top=top,
        emulator_layers=k,
        bits=method.bits,
        group_size=INT4_GROUP_SIZE,
        recompute="full" if method.recompute else None,
        fast=method.fast,
        cuda_graphs=method.cuda_graphs and not method.compiled,  # compiled: PyTorch's own graphs
        compile=method.compile_mode,
    )
    prepare(emu, "lora" if method.lora else "full")
    emu.fused_head = method.fused_head
    if method.fast and compute_dtype is not None:
        cast_frozen_(emu, compute_dtype)
    emu.train()
    params = [p for p in emu.parameters() if p.requires_grad]
    return Trainee(emu, params, lambda ids: emu(input_ids=ids, labels=ids).loss)
