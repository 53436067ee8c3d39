"""``OffsiteModel``: adapter blocks trainable, compressed emulator frozen, HF forward underneath."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LayoutError, OffsiteError, UnsupportedModelError
from ..models import ModelFamily, get_family
from ..nn.compiled_blocks import (
    CompileError,
    apply_compile,
    check_compile_mode,
    compile_mode,
    remove_compile,
)
from ..nn.cuda_graphs import (
    GraphError,
    apply_cuda_graphs,
    cuda_graphs_enabled,
    graph_stack,
    remove_cuda_graphs,
    reset_cuda_graphs,
)
from ..nn.frozen_blocks import wrapped_by
from ..nn.recompute import RECOMPUTE_MODES, RecomputeError, apply_recompute, recompute_mode, remove_recompute
from ..quant.formats import check_format
from ..quant.weight import COMPUTE_DTYPES
from .build import copy_with_blocks, freeze_all_but_adapter_
from .fused_loss import fused_head_loss, fused_head_supported
from .layout import Layout, resolve_layout
from .prune import magnitude_prune_
from .quantize import check_experts_activation, quantize_linears_


class OffsiteModel(nn.Module):
    """A Hugging Face causal LM reduced to bottom adapter + emulator + top adapter.

    ``forward`` is the wrapped model's own forward (``input_ids``, ``attention_mask``,
    ``labels``, ... in; ``.loss`` and ``.logits`` out), so HF Trainer, accelerate and a plain
    loop train it as they would the original. Only the adapter blocks require grad.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: Layout,
        prune: float = 0.0,
        quantized: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # the wrapper's mode is the wrapped model's (set both with .train()/.eval())
        self.family: ModelFamily = get_family(model)
        self.layout = layout
        self.prune = prune
        # per emulator block position: {module name inside the block: FrozenLinear record}
        self.quantized: dict[str, dict[str, Any]] = quantized or {}
        self.fused_head = True  # the loss from labels through the fused frozen head (see forward)
        self.fused_head_chunk_size: int | None = None  # tokens per chunk there; None: a fixed logits budget
        self.fast_blocks: list[str] = []  # the fused frozen modules swapped into the emulator blocks
        n_blocks = len(self.family.get_blocks(model))
        if n_blocks != len(layout.kept_indices):
            raise LayoutError(f"model has {n_blocks} blocks but layout {layout} keeps {len(layout.kept_indices)}")

    # --- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The wrapped model's forward; returns its output (``.loss`` when labels are given, ``.logits``).

        When training (grad enabled) with ``labels`` and without ``return_logits``, the loss comes
        from the fused frozen head (:func:`~offsite_kernels.ops.fused_linear_cross_entropy`: the
        ``[tokens, vocab]`` logits are never built) and ``.logits`` is None; ``return_logits=True``
        (or ``fused_head = False``), or evaluation under ``torch.no_grad()`` (HF Trainer's
        ``evaluate`` and ``predict`` want the logits), runs the wrapped model's own head and loss.
        ``labels`` and ``return_logits`` are keyword-only (HF models differ in their third
        positional argument). The dataset columns are named so that HF
        Trainer keeps them; every other argument (``inputs_embeds``, caches, ...) goes through
        to the wrapped model as given.
        """
        self._check_attention_outputs(kwargs)
        self._check_router_logits(kwargs)
        if torch.is_grad_enabled() and "use_cache" not in kwargs and (labels is not None or self._emulator_wrapped()):
            # training: no KV cache to fill (two copies per block and its memory, for nothing); a recomputed,
            # graphed or compiled emulator must not fill one at all while grad is on
            kwargs["use_cache"] = False
        if (
            labels is not None
            and not return_logits
            and self.fused_head
            and torch.is_grad_enabled()
            and fused_head_supported(self.model, self.family, kwargs)
        ):
            return fused_head_loss(
                self.model, self.family, input_ids, attention_mask, labels, chunk_size=self.fused_head_chunk_size, **kwargs
            )
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generation through the emulator (the wrapped model's ``generate``)."""
        asked = kwargs
        if "output_attentions" not in kwargs:  # asked for in a GenerationConfig (given, or the model's own)?
            generation_config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
            asked = {"output_attentions": getattr(generation_config, "output_attentions", None)}
        self._check_attention_outputs(asked)
        return self.model.generate(*args, **kwargs)

    def _check_attention_outputs(self, kwargs: dict[str, Any]) -> None:
        """Fast blocks run attention through SDPA, which forms no probabilities: refuse to return them
        (Hugging Face would return none, or empty ones, without a word, and switches every block to SDPA)."""
        wanted = kwargs.get("output_attentions")
        if wanted is None:
            wanted = getattr(self.config, "output_attentions", False)
        if wanted and self.fast_blocks:
            from .fast import FastBlocksError

            raise FastBlocksError(
                "the emulator runs fast blocks, whose attention (SDPA) forms no attention probabilities; "
                "call without output_attentions, or build the emulator without fast blocks"
            )

    def _check_router_logits(self, kwargs: dict[str, Any]) -> None:
        """Full recomputation runs the emulator's forward without a graph, so router logits recorded there (a mixture
        of experts' load-balancing loss) would carry no gradient: refuse them, naming the modes that keep it."""
        wanted = kwargs.get("output_router_logits")
        if wanted is None:
            wanted = getattr(self.config, "output_router_logits", False)
        if wanted and torch.is_grad_enabled() and self.recompute == "full":
            raise RecomputeError(
                "with recompute='full' the emulator blocks' router logits carry no gradient, so the load-balancing loss "
                "would not reach the routers below them; use recompute='block' or 'selective', or output_router_logits=False"
            )

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- blocks --------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """All blocks of the emulator model: bottom adapter, emulator, top adapter."""
        return self.family.get_blocks(self.model)

    def adapter_blocks(self) -> list[tuple[int, nn.Module]]:
        """``(source_index, block)`` for each adapter block, bottom then top."""
        blocks = self.blocks
        return [(src, blocks[pos]) for src, pos in zip(self.layout.adapter_indices, self.layout.adapter_positions(), strict=True)]

    def quantize_(self, bits: int | str, group_size: int = 128) -> OffsiteModel:
        """Store every linear of the (still dense) emulator blocks in ``bits`` (8, 4, "fp8"), in place (a mixture of
        experts' experts too, each projection's experts stacked into one low-bit matrix)."""
        check_format(bits, group_size)
        if self.quantized:
            raise LayoutError("the emulator is already quantized")
        activation = self.family.activation_name(self.config)
        # all or nothing: the data-dependent failures (a non-finite weight, experts of another activation) come first
        for _, block in self.emulator_blocks():
            check_experts_activation(block, self.family.experts, activation)
            for name, p in (*block.named_parameters(), *block.named_buffers()):
                if p.dim() not in (2, 3) or not p.is_floating_point():
                    continue  # vectors (norms, biases), and the stored codes of low-bit weights
                if p.dtype not in COMPUTE_DTYPES:
                    raise LayoutError(
                        f"emulator weight {name} is {p.dtype}; low-bit frozen linears run in float32, float16 or "
                        "bfloat16: cast the model first (.float() or .to(torch.bfloat16))"
                    )
                if p.device.type != "meta" and not torch.isfinite(p).all():
                    raise LayoutError(f"emulator weight {name} holds NaN or infinite values; it cannot be quantized")
        for position, (_, block) in zip(self.emulator_positions(), self.emulator_blocks(), strict=True):
            self.quantized[str(position)] = quantize_linears_(block, bits, group_size, self.family.experts, activation)
        reset_cuda_graphs([block for _, block in self.emulator_blocks()])  # they read the dense weights
        return self

    def use_fast_blocks(self) -> OffsiteModel:
        """Swap the library's fused frozen ops into the emulator blocks (norms, MLP activation,
        SwiGLU) and run attention through SDPA; see :mod:`offsite_kernels.emulator.fast`. In place,
        one way (build the emulator again to go back); the emulator must be distilled already."""
        from .fast import apply_fast_block_, plan_fast_block, use_sdpa_attention_

        if self.fast_blocks:
            return self
        # every block's fused modules built and checked before anything changes: a refusal leaves the emulator as it was
        plans = [plan_fast_block(block, self.family, self.config) for _, block in self.emulator_blocks()]
        mode, graphs = self.recompute, self._graph_settings()
        self.set_cuda_graphs(False)
        self.set_recompute(None)  # swap inside the plain blocks, then wrap them again
        swapped = []
        for position, (_, block), plan in zip(self.emulator_positions(), self.emulator_blocks(), plans, strict=True):
            swapped += [f"{position}.{entry}" for entry in apply_fast_block_(block, plan)]
        if self.family.sdpa_attention:
            use_sdpa_attention_(self.model)
        self.fast_blocks = swapped
        self.set_recompute(mode)
        return self.set_cuda_graphs(True, **graphs) if graphs is not None else self

    def _emulator_wrapped(self) -> bool:
        """Whether the emulator blocks run under recomputation, CUDA graphs or ``torch.compile``."""
        return bool(self.layout.emulator) and wrapped_by(self.blocks[self.layout.bottom]) is not None

    @property
    def recompute(self) -> str | None:
        """How the emulator blocks recompute activations in the backward: "full", "block", "selective" or None."""
        blocks = self.emulator_blocks()
        return recompute_mode(blocks[0][1]) if blocks else None

    def set_recompute(self, mode: str | bool | None) -> OffsiteModel:
        """Recompute the emulator's activations in the backward instead of saving them.

        ``"full"`` (or True): the emulator saves only its input and reruns its blocks in the
        backward, one at a time. ``"block"``: each emulator block saves its input and reruns once
        (one block forward more per block, where ``"full"`` reruns the blocks below each one).
        ``"selective"``: each emulator block keeps its GEMM and attention outputs and recomputes
        norms and activations. None (or False): save as usual.
        """
        mode = "full" if mode is True else (None if mode is False else mode)
        if mode is not None and mode not in RECOMPUTE_MODES:
            raise RecomputeError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, True, False or None; got {mode!r}")
        if mode is not None and getattr(self.config, "layerdrop", 0.0):
            raise RecomputeError("recomputation needs every emulator block to run; set config.layerdrop = 0")
        if self.cuda_graphs:  # graphed blocks never recompute
            if mode is not None:
                raise GraphError("recomputation and CUDA graphs do not combine: set_cuda_graphs(False) first")
            return self
        if self.compiled:  # nor do compiled ones
            if mode is not None:
                raise CompileError("recomputation and compiled blocks do not combine: set_compile(None) first")
            return self
        blocks = [block for _, block in self.emulator_blocks()]
        remove_recompute(blocks)
        if mode is not None and blocks:
            apply_recompute(blocks, mode)
        return self

    def _graph_settings(self) -> dict[str, int] | None:
        """The CUDA graph settings of the emulator blocks, or None when they replay no graphs."""
        blocks = self.emulator_blocks()
        stack = graph_stack(blocks[0][1]) if blocks else None
        return None if stack is None else {"warmup_passes": stack.warmup_passes, "max_graph_sets": stack.max_graph_sets}

    @property
    def cuda_graphs(self) -> bool:
        """Whether the emulator blocks replay CUDA graphs in training (:mod:`offsite_kernels.nn.cuda_graphs`)."""
        blocks = self.emulator_blocks()
        return bool(blocks) and cuda_graphs_enabled(blocks[0][1])

    def set_cuda_graphs(self, enabled: bool = True, warmup_passes: int = 1, max_graph_sets: int = 4) -> OffsiteModel:
        """Replay each emulator block's forward and input backward as CUDA graphs while training.

        At small batches the host's Python, not the GPU, sets the step time of the frozen blocks;
        a graph replay costs one launch. The first ``warmup_passes`` passes run eagerly, the next
        one captures; at most ``max_graph_sets`` input shapes are captured. Off the GPU and under
        ``torch.no_grad()`` (evaluation, generation) the blocks run as before. Does not combine
        with recomputation. False removes the graphs.
        """
        blocks = [block for _, block in self.emulator_blocks()]
        if not enabled:
            remove_cuda_graphs(blocks)
            return self
        if getattr(self.config, "layerdrop", 0.0):
            raise GraphError("CUDA graphs need every emulator block to run; set config.layerdrop = 0")
        if self.compiled:
            raise GraphError(
                "the emulator blocks are compiled (set_compile); use compile mode 'reduce-overhead' for CUDA graphs of "
                "compiled blocks, or set_compile(None) first"
            )
        if self.cuda_graphs:
            remove_cuda_graphs(blocks)  # new settings: capture again
        apply_cuda_graphs(blocks, warmup_passes=warmup_passes, max_graph_sets=max_graph_sets)
        return self

    @property
    def compiled(self) -> str | None:
        """The ``torch.compile`` mode of the emulator blocks' training calls, or None (eager)."""
        blocks = self.emulator_blocks()
        return compile_mode(blocks[0][1]) if blocks else None

    def set_compile(
        self, mode: str | bool | None = "default", *, fullgraph: bool = True, dynamic: bool | None = None
    ) -> OffsiteModel:
        """Run the emulator blocks' training calls through ``torch.compile`` (:mod:`offsite_kernels.nn.compiled_blocks`).

        ``mode``: "default", "reduce-overhead" (CUDA graphs through PyTorch's cudagraph trees),
        "max-autotune" or "max-autotune-no-cudagraphs"; True means "default"; None or False
        goes back to eager. The first training step of each input shape compiles; evaluation and
        generation stay eager. Does not combine with recomputation or :meth:`set_cuda_graphs`.
        """
        mode = "default" if mode is True else (None if mode is False else mode)
        blocks = [block for _, block in self.emulator_blocks()]
        if mode is None:
            remove_compile(blocks)
            return self
        check_compile_mode(mode)
        if self.recompute is not None or self.cuda_graphs:
            raise CompileError(
                "compiled blocks do not combine with recomputation or the library's CUDA graphs: set_recompute(None) and "
                "set_cuda_graphs(False) first (compile mode 'reduce-overhead' replays CUDA graphs itself)"
            )
        remove_compile(blocks)  # new settings: compile again
        apply_compile(blocks, mode, fullgraph=fullgraph, dynamic=dynamic)
        return self

    def emulator_positions(self) -> list[int]:
        """Positions of the emulator blocks inside the block list."""
        return [self.layout.bottom + j for j in range(len(self.layout.emulator))]

    def emulator_blocks(self) -> list[tuple[int, nn.Module]]:
        """``(source_index, block)`` for each frozen emulator block."""
        blocks = self.blocks
        return [(src, blocks[pos]) for src, pos in zip(self.layout.emulator, self.emulator_positions(), strict=True)]

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the adapter blocks (what the data owner trains)."""
        for _, block in self.adapter_blocks():
            yield from block.parameters()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors named as in the *source* model (``<blocks>.<source index>.<name>``)."""
        out: dict[str, torch.Tensor] = {}
        for src, block in self.adapter_blocks():
            for name, tensor in block.state_dict().items():
                out[f"{self.family.blocks}.{src}.{name}"] = tensor
        return out

    def extra_repr(self) -> str:
        fmt = next((rec["format"] for recs in self.quantized.values() for rec in recs.values()), "dense")
        extra = f", recompute={self.recompute}" if self.recompute else ""
        extra += ", fast blocks" if self.fast_blocks else ""
        extra += ", CUDA graphs" if self.cuda_graphs else ""
        extra += f", compiled ({self.compiled})" if self.compiled else ""
        return f"layout={self.layout} of {self.layout.n_layers} blocks, emulator={list(self.layout.emulator)}, prune={self.prune}, weights={fmt}{extra}"

    # --- files ---------------------------------------------------------------------------
    def save_pretrained(
        self,
        path: str | os.PathLike,
        overwrite: bool = False,
        tokenizer: Any = None,
        tokenizer_from: str | os.PathLike | None = None,
    ) -> Path:
        """Write the emulator package: safetensors weights, HF config and an ``offsite.json`` layout."""
        from .package import save_emulator

        return save_emulator(self, path, overwrite=overwrite, tokenizer=tokenizer, tokenizer_from=tokenizer_from)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **hf_kwargs: Any) -> OffsiteModel:
        """Load an emulator package written by :meth:`save_pretrained` (needs nothing else)."""
        from .package import load_emulator

        return load_emulator(path, **hf_kwargs)

    def load_adapter(self, path: str | os.PathLike, check_weights: bool = True) -> OffsiteModel:
        """Load adapter weights written by :meth:`save_adapter` into this emulator's adapter blocks."""
        from .adapter import load_adapter

        return load_adapter(self, path, check_weights=check_weights)

    def save_adapter(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write only the adapter tensors and a manifest that :func:`plug_in` checks."""
        from .adapter import save_adapter

        return save_adapter(self, path, overwrite=overwrite)


def make_emulator(
    model: nn.Module,
    bottom: int = 2,
    top: int = 2,
    emulator_layers: int | None = None,
    strategy: str | Sequence[int] = "uniform",
    prune: float = 0.0,
    bits: int | str | None = None,
    group_size: int = 128,
    recompute: str | bool | None = None,
    fast: bool = False,
    cuda_graphs: bool = False,
    compile: str | bool | None = None,
) -> OffsiteModel:
    """Split a Hugging Face causal LM into adapter + compressed emulator (Offsite-Tuning).

    Args:
        model: a supported ``*ForCausalLM`` model; it is copied, never modified.
        bottom, top: number of first and last blocks that form the trainable adapter.
        emulator_layers: middle blocks kept in the emulator (all of them if None).
        strategy: ``"uniform"`` (the paper's layer drop) or explicit source block indices.
        prune: fraction of each emulator weight matrix zeroed by magnitude, in ``[0, 1)``.
        bits: store every linear of the emulator blocks as a frozen ``FrozenLinear``: 8 (int8),
            4 (int4, groups of ``group_size``), "fp8", "bf16"/"fp16" (dense in 16 bits), or None to
            keep them as they are. Pruning, if any, happens first.
        recompute: "full" (or True) to save only the emulator's input and rerun its blocks in the
            backward; "block" to save each block's input and rerun each once; "selective" to keep
            GEMM and attention outputs and rerun the rest; None.
        fast: swap the fused frozen ops into the emulator blocks (:meth:`OffsiteModel.use_fast_blocks`).
        cuda_graphs: replay the emulator blocks as CUDA graphs while training on a GPU
            (:meth:`OffsiteModel.set_cuda_graphs`); not with ``recompute``.
        compile: run the emulator blocks' training calls through ``torch.compile`` with this mode
            ("default", "reduce-overhead", ...; True means "default"; :meth:`OffsiteModel.set_compile`);
            not with ``recompute`` or ``cuda_graphs``.
    """
    if isinstance(model, OffsiteModel):
        raise UnsupportedModelError("make_emulator takes the full Hugging Face model; this is already an emulator (OffsiteModel)")
    family = get_family(model)
    n_layers = len(family.get_blocks(model))
    if getattr(model.config, "num_hidden_layers", n_layers) != n_layers:
        raise OffsiteError(
            f"config.num_hidden_layers={model.config.num_hidden_layers} disagrees with the {n_layers} blocks "
            "the model holds; pass an unmodified model"
        )
    try:
        prune = float(prune)
    except (TypeError, ValueError) as exc:
        raise LayoutError(f"prune must be a fraction in [0, 1), got {prune!r}") from exc
    if not 0.0 <= prune < 1.0:
        raise LayoutError(f"prune must be a fraction in [0, 1), got {prune!r}")
    check_format(bits, group_size)  # reject a bad format before any copying
    if recompute not in (None, False, True, *RECOMPUTE_MODES):
        raise RecomputeError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, True, False or None; got {recompute!r}")
    if cuda_graphs and recompute:
        raise GraphError("CUDA graphs and recomputation do not combine; set recompute=None to use CUDA graphs")
    if compile not in (None, False, True):
        check_compile_mode(compile)
    if compile and (recompute or cuda_graphs):
        raise CompileError(
            "compiled blocks do not combine with recompute or cuda_graphs; pick one (compile mode 'reduce-overhead' "
            "replays CUDA graphs itself)"
        )
    layout = resolve_layout(n_layers, bottom, top, emulator_layers, strategy)
    reduced = copy_with_blocks(model, family, layout.kept_indices)
    freeze_all_but_adapter_(reduced, family, layout)
    emulator = OffsiteModel(reduced, layout, prune=float(prune))
    if prune > 0:
        for _, block in emulator.emulator_blocks():
            magnitude_prune_(block, float(prune))
    if bits is not None:
        emulator.quantize_(bits, group_size)
    if fast:
        emulator.use_fast_blocks()
    if recompute:
        emulator.set_recompute(recompute)
    if cuda_graphs:
        emulator.set_cuda_graphs(True)
    if compile:
        emulator.set_compile(compile)
    return emulator
