"""The training loop shared by distillation and adapter fine-tuning.

AdamW, linear warm-up then cosine decay, gradient accumulation, gradient clipping, bf16
autocast on GPU, seeded and deterministic batch order, periodic validation that keeps the best
weights, checkpoints every N steps, and exact resumption from the last checkpoint.

The same loop runs in one process, data parallel under ``torchrun`` / ``accelerate launch``, and
on DeepSpeed's engine (``settings.deepspeed``): the engine (see :mod:`.distributed`) owns the
optimizer, the gradient averaging and the checkpoint format; the loop owns the data order, the
schedule, validation and the counters, so every engine follows the same curve.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PackageError
from ..io import write_text_atomic
from .data import TextBlocks


@dataclass
class TrainSettings:
    """Hyper-parameters of one training run."""

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    progress: bool = True
    deepspeed: str | dict | None = None  # a DeepSpeed config (JSON path or dict): train on DeepSpeed's engine
    loss_log: str | None = None  # append one JSON line per optimizer step (step, loss, lr): the loss curve


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    best_valid: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    losses: list[float] = field(default_factory=list)  # the (global) training loss of each step run here


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, cosine to ``min_lr_ratio``."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    floor = settings.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, micro: int, n_blocks: int, settings: TrainSettings) -> torch.Tensor:
    """Indices of the blocks of micro-batch ``micro`` of ``step``: a fresh seeded permutation per epoch."""
    per_step = settings.batch_size * settings.grad_accum
    first = step * per_step + micro * settings.batch_size
    out = []
    for position in range(first, first + settings.batch_size):
        epoch, offset = divmod(position, n_blocks)
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch))
        out.append(int(perm[offset]))
    return torch.tensor(out, dtype=torch.long)


def data_digest(data: TextBlocks | None) -> dict[str, Any] | None:
    """Shape and SHA-256 of the token ids: the same blocks in the same order, or not."""
    if data is None:
        return None
    ids = data.ids.detach().to("cpu", torch.int64).contiguous()
    return {"shape": list(ids.shape), "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


def run_fingerprint(
    trainable: dict[str, nn.Parameter], data: TextBlocks, settings: TrainSettings, extra: dict[str, Any] | None = None
) -> dict:
    """What must match for a checkpoint to be resumed: the trainable weights, the data, the settings and
    ``extra`` (what else decides the result: the method's settings, loss weights, the validation data)."""
    keep = ("steps", "batch_size", "grad_accum", "lr", "warmup", "min_lr_ratio", "weight_decay", "clip", "seed", "eval_every")
    fingerprint = {
        "params": {n: list(p.shape) for n, p in trainable.items()},
        "data": data_digest(data),
        "settings": {k: getattr(settings, k) for k in keep},
        "run": extra or {},
    }
    return json.loads(json.dumps(fingerprint))  # as a checkpoint's JSON gives it back (tuples become lists)


def _check_same_run(counters: dict[str, Any], fingerprint: dict, ckpt: Path) -> None:
    saved = counters.get("fingerprint")
    if isinstance(saved, dict) and "run" not in saved:  # written before the fingerprint had its run settings
        raise PackageError(
            f"the checkpoint in {str(ckpt)!r} was written by an older offsite-kernels, whose fingerprint cannot tell "
            "whether it is this run's; delete it or give a new --checkpoint-dir"
        )
    if saved != fingerprint:
        raise PackageError(
            f"the checkpoint in {str(ckpt)!r} belongs to another run (other settings, data, method or trainable weights); "
            "delete it or give a new --checkpoint-dir"
        )


def _trim_loss_log(path: Path, step: int) -> None:
    """Drop the lines a run killed after its checkpoint of ``step`` wrote past it (they are run again).

    Only a tail that follows the last line of ``step`` and counts up from it is dropped; a log that
    does not look like that is left as it is."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def step_of(line: str) -> int | None:
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None  # a line cut short by the kill

    marks = [i for i, line in enumerate(lines) if step_of(line) == step]
    if not marks:
        return
    tail = [step_of(line) for line in lines[marks[-1] + 1 :]]
    if tail and all(s is None or s > step for s in tail):
        write_text_atomic(path, "".join(lines[: marks[-1] + 1]), overwrite=True)


def train(
    trainable: dict[str, nn.Parameter],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    data: TextBlocks,
    settings: TrainSettings,
    validate: Callable[[], float] | None = None,
    device: torch.device | None = None,
    desc: str = "train",
    module: nn.Module | None = None,
    fingerprint_extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Optimize ``trainable`` on ``loss_fn(batch_ids)``; keeps the weights with the best ``validate()``.

    With ``settings.checkpoint_dir`` set, a checkpoint is written every ``checkpoint_every``
    steps and an existing one is resumed from, if it is of the same run (:func:`run_fingerprint`,
    with ``fingerprint_extra``), checked before any state is restored. ``module`` is the model
    holding ``trainable`` (DeepSpeed wraps it; data parallel moves it to this process's device).
    """
    from tqdm.auto import tqdm

    from .distributed import make_engine

    torch.manual_seed(settings.seed)
    engine = make_engine(trainable, settings, device, module)
    device = engine.device
    world = engine.world
    start_step, best_valid, best_state, history = 0, None, None, []
    ckpt = Path(settings.checkpoint_dir) if settings.checkpoint_dir else None
    fingerprint = run_fingerprint(trainable, data, settings, fingerprint_extra)
    loss_value = float("nan")
    if ckpt is not None and engine.has_checkpoint(ckpt):
        saved = engine.saved_counters(ckpt)
        if saved is not None:  # refused before the weights, optimizer and RNG are touched
            _check_same_run(saved, fingerprint, ckpt)
        counters, best_state = engine.load(ckpt)
        _check_same_run(counters, fingerprint, ckpt)
        start_step, best_valid, history = counters["step"], counters["best_valid"], counters["history"]
        loss_value = float(counters.get("last_loss", float("nan")))

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    tokens = 0
    losses: list[float] = []
    started = time.perf_counter()
    if settings.loss_log and world.is_main and start_step > 0:
        _trim_loss_log(Path(settings.loss_log), start_step)
    log = open(settings.loss_log, "a", encoding="utf-8") if settings.loss_log and world.is_main else None  # noqa: SIM115
    bar = tqdm(
        range(start_step, settings.steps),
        desc=desc,
        initial=start_step,
        total=settings.steps,
        disable=not settings.progress or not world.is_main,
    )
    try:
        for step in bar:
            lr = settings.lr * lr_factor(step, settings)
            engine.set_lr(lr)
            total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one sync per step
            for micro in range(settings.grad_accum):
                ids = engine.shard(data.ids[batch_indices(step, micro, len(data), settings)]).to(device)
                with autocast:
                    loss = engine.forward(loss_fn, ids) / settings.grad_accum
                engine.backward(loss)
                total += loss.detach().to(torch.float64)
                tokens += ids.numel() * world.size
            engine.step()
            loss_value = engine.global_loss(float(total))
            losses.append(loss_value)
            if log is not None:
                log.write(json.dumps({"step": step + 1, "loss": loss_value, "lr": lr}) + "\n")
                log.flush()
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:,.0f}")
            done = step + 1
            if validate is not None and (done % settings.eval_every == 0 or done == settings.steps):
                valid = engine.agree(validate())
                history.append({"step": done, "train_loss": loss_value, "valid_loss": valid})
                if best_valid is None or valid < best_valid:
                    best_valid = valid
                    best_state = {n: p.detach().clone() for n, p in trainable.items()}
            if (
                ckpt is not None
                and settings.checkpoint_every
                and (done % settings.checkpoint_every == 0 or done == settings.steps)
            ):
                counters = {
                    "step": done,
                    "best_valid": best_valid,
                    "history": history,
                    "last_loss": loss_value,
                    "fingerprint": fingerprint,
                }
                engine.save(ckpt, counters, best_state)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if best_state is not None:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(best_state[name].to(device=p.device, dtype=p.dtype))
    engine.close()
    rate = tokens / max(time.perf_counter() - started, 1e-9)
    return TrainResult(settings.steps, loss_value, best_valid, history, rate, losses)
