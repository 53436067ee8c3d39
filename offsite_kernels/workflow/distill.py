"""Emulator distillation (model owner): train the emulator blocks to mimic the full middle.

loss = lm_weight * LM + kd_weight * KD, KD = mean(((T - S) / sqrt(mean(T^2)))^2), where T is
the hidden state the original middle blocks hand to the top adapter and S the emulator's
(paper defaults: lm_weight 1.0, kd_weight 30.0). The bottom blocks are shared and frozen, so
both sides see the same input. The teacher runs without grad (in bf16 on a GPU).

Under ``--deepspeed`` with a ZeRO stage-3 config the teacher is partitioned across the processes
by an inference-only ZeRO-3 engine (each rank holds 1/world of it, a block's weights gathered as
it runs) and the emulator blocks train at stage 2: see
:mod:`offsite_kernels.workflow.deepspeed_engine`. The teacher is then consumed (partitioned) and
not restored.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import nn

from ..emulator.adapter import embedding_probe, probe_matches
from ..emulator.build import freeze_all_but_adapter_
from ..emulator.offsite_model import OffsiteModel
from ..errors import OffsiteError
from ..nn.frozen_linear import FrozenLinear
from .data import TextBlocks, check_fits
from .evaluate import perplexity
from .loop import TrainResult, TrainSettings, data_digest, train


class DistillError(OffsiteError, ValueError):
    """An emulator and teacher that cannot be distilled together."""


def kd_loss(teacher: torch.Tensor, student: torch.Tensor, global_batch: bool = False) -> torch.Tensor:
    """The paper's normalized distance: mean(((T - S) / sqrt(mean(T^2)))^2), in fp32.

    ``global_batch``: under data parallelism each process holds a slice of the batch; mean(T^2)
    is then averaged over the processes (equal slices), so the normaliser, and the loss, are
    those of the whole batch as one process would compute them.
    """
    t, s = teacher.float(), student.float()
    mean_sq = t.pow(2).mean()
    if global_batch:
        from .distributed import all_reduce_mean_

        mean_sq = mean_sq.detach().clone()
        all_reduce_mean_([mean_sq])
    return ((t - s) / mean_sq.sqrt()).pow(2).mean()


def middle_output_index(emu: OffsiteModel) -> tuple[int, int]:
    """Indices into HF ``hidden_states`` of the middle's output: (student, teacher)."""
    return emu.layout.bottom + len(emu.layout.emulator), emu.layout.n_layers - emu.layout.top


def _teacher_dtype(device: torch.device) -> torch.dtype | None:
    """The teacher runs forward only: in bf16 on a GPU (a bf16 copy moved there for the run, or under
    autocast if it is there already); elsewhere as it is."""
    return torch.bfloat16 if device.type == "cuda" else None


def _own_tensors(module: nn.Module) -> tuple[list, list]:
    """References to ``module``'s parameter and buffer tensors, to put back after ``module.to()`` replaced them."""
    params = [(p, p.data) for p in module.parameters()]
    buffers = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    return params, buffers


def _put_back(tensors: tuple[list, list]) -> None:
    params, buffers = tensors
    for p, data in params:
        p.data = data
    for m, name, b in buffers:
        m._buffers[name] = b


def distill(
    emu: OffsiteModel,
    teacher: nn.Module,
    data: TextBlocks,
    settings: TrainSettings,
    valid: TextBlocks | None = None,
    lm_weight: float = 1.0,
    kd_weight: float = 30.0,
) -> TrainResult:
    """Train ``emu``'s emulator blocks against ``teacher`` (the full model); adapters stay frozen.

    With ``valid``, the emulator with the best validation perplexity is kept; without, the last.
    The teacher is left as it was given (dtype, device, mode, ``requires_grad``).
    """
    teacher_type = getattr(getattr(teacher, "config", None), "model_type", None)
    # the family first: another family's blocks may live at another path, which get_blocks would blame instead
    teacher_blocks = len(emu.family.get_blocks(teacher)) if teacher_type == emu.config.model_type else None
    if teacher_blocks != emu.layout.n_layers:
        size = f"{teacher_blocks}-block " if teacher_blocks is not None else ""
        raise DistillError(
            f"the teacher is a {size}{teacher_type!r} model; "
            f"the emulator was made from a {emu.layout.n_layers}-block {emu.config.model_type!r} model"
        )
    if not probe_matches(embedding_probe(emu.model, emu.family), teacher, emu.family):
        raise DistillError(
            "the teacher's weights are not those the emulator was made from (their input embeddings differ); "
            "distill against the full model the emulator was cut from"
        )
    for blocks in (data, valid) if valid is not None else (data,):
        check_fits(blocks, emu)
    if any(isinstance(m, FrozenLinear) for _, b in emu.emulator_blocks() for m in b.modules()):
        raise DistillError("the emulator's blocks are already low-bit; distill the dense emulator, then quantize it")
    if emu.fast_blocks:
        raise DistillError("the emulator's blocks are fast frozen blocks (fixed weights); distill first, then use_fast_blocks()")
    if emu.prune > 0:
        raise DistillError(
            f"the emulator is pruned ({emu.prune:.0%}); distillation would refill the pruned weights: "
            "distill the unpruned emulator, then prune it"
        )
    from .distributed import launch_world, move_to_device, training_device

    device = training_device(settings, emu)
    move_to_device(emu, device)
    teacher_zero3 = None
    if settings.deepspeed is not None:
        from .deepspeed_engine import split_teacher_config

        student_config, teacher_zero3 = split_teacher_config(settings)
        settings = replace(settings, deepspeed=student_config)
    # the caller's teacher is restored afterwards: its own tensors (not a bf16 round trip), mode and requires_grad
    teacher_tensors = _own_tensors(teacher)
    teacher_training = teacher.training
    teacher_grad = [p.requires_grad for p in teacher.parameters()]
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    if teacher_zero3 is not None:
        from .deepspeed_engine import teacher_engine

        teacher_call: nn.Module = teacher_engine(teacher, teacher_zero3)
    else:
        dtype = _teacher_dtype(device)
        if dtype is not None and next(teacher.parameters()).device != device:
            teacher.to(device=device, dtype=dtype)  # a copy there; its own tensors stay where they were
        elif dtype is not None:  # already there: autocast, so that no second copy of its weights is held
            teacher_autocast = torch.autocast(device.type, dtype=dtype)
        teacher_call = teacher
    for p in emu.parameters():
        p.requires_grad_(False)
    trainable = {}
    for position, (_, block) in zip(emu.emulator_positions(), emu.emulator_blocks(), strict=True):
        for name, p in block.named_parameters():
            p.requires_grad_(True)
            trainable[f"blocks.{position}.{name}"] = p
    s_index, t_index = middle_output_index(emu)
    data_parallel = launch_world().distributed

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), teacher_autocast:
            t_ids = ids if teacher_zero3 is not None else ids.to(next(teacher.parameters()).device)
            t_hidden = teacher_call(input_ids=t_ids, output_hidden_states=True).hidden_states[t_index]
        out = emu(input_ids=ids, labels=ids, output_hidden_states=True)
        return lm_weight * out.loss + kd_weight * kd_loss(t_hidden.to(device), out.hidden_states[s_index], data_parallel)

    validate = (lambda: perplexity(emu, valid)["loss"]) if valid is not None else None
    emu.train()
    try:
        run = {"lm_weight": lm_weight, "kd_weight": kd_weight, "valid": data_digest(valid)}
        return train(trainable, loss_fn, data, settings, validate=validate, desc="distill", module=emu, fingerprint_extra=run)
    finally:
        emu.eval()
        freeze_all_but_adapter_(emu.model, emu.family, emu.layout)
        if teacher_zero3 is None:
            _put_back(teacher_tensors)
        teacher.train(teacher_training)
        for p, flag in zip(teacher.parameters(), teacher_grad, strict=True):
            p.requires_grad_(flag)
