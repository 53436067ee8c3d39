"""Adapter fine-tuning (data owner): train the adapter through the frozen emulator."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ..emulator.offsite_model import OffsiteModel
from .data import TextBlocks, check_fits
from .evaluate import perplexity
from .loop import TrainResult, TrainSettings, data_digest, train
from .methods import METHODS, BottleneckSettings, LoraSettings, MethodError, export, prepare


def finetune(
    model: OffsiteModel | nn.Module,
    data: TextBlocks,
    settings: TrainSettings,
    valid: TextBlocks | None = None,
    method: str = "full",
    lora: LoraSettings | None = None,
    bottleneck: BottleneckSettings | None = None,
) -> TrainResult:
    """Fine-tune the adapter of an emulator with ``method`` ("full", "lora", "bitfit", "bottleneck").

    The adapter weights with the best validation perplexity (when ``valid`` is given) are kept;
    LoRA updates are merged into the adapter blocks before returning, so ``save_adapter`` and
    ``plug_in`` work unchanged. A plain HF model (the "full fine-tune" baseline) trains every
    parameter with method "full".
    """
    from .distributed import move_to_device, training_device

    if method not in METHODS:
        raise MethodError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "full" and not isinstance(model, OffsiteModel):
        raise MethodError(
            f"method {method!r} trains an emulator's adapter; a plain Hugging Face model (the full fine-tune "
            "baseline) trains with method 'full'"
        )
    for blocks in (data, valid) if valid is not None else (data,):
        check_fits(blocks, model)
    move_to_device(model, training_device(settings, model))  # under a launcher: this process's GPU
    torch.manual_seed(settings.seed)  # LoRA and bottleneck weights are initialised from the seed
    if isinstance(model, OffsiteModel):
        trainable = prepare(model, method, lora, bottleneck)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        trainable = dict(model.named_parameters())

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    validate = (lambda: perplexity(model, valid)["loss"]) if valid is not None else None
    model.train()
    try:
        return train(
            trainable,
            loss_fn,
            data,
            settings,
            validate=validate,
            desc=f"finetune ({method})",
            module=model,
            fingerprint_extra=_run_settings(method, lora, bottleneck, valid),
        )
    finally:
        model.eval()
        if isinstance(model, OffsiteModel):
            export(model)


def _run_settings(
    method: str, lora: LoraSettings | None, bottleneck: BottleneckSettings | None, valid: TextBlocks | None
) -> dict[str, Any]:
    """What else decides a fine-tuning run's result, for the checkpoint's fingerprint."""
    run: dict[str, Any] = {"method": method, "valid": data_digest(valid)}
    if method == "lora":
        run["lora"] = asdict(lora or LoraSettings())
    elif method == "bottleneck":
        run["bottleneck"] = asdict(bottleneck or BottleneckSettings())
    return run
