"""Training on DeepSpeed's engine (``--deepspeed CONFIG``): data parallel, ZeRO 1/2, CPU offload.

DeepSpeed is optional and imported only here, only when a config is given
(``pip install --no-build-isolation deepspeed``: it builds against the installed torch).

What the engine gets, and what it does not:

- The engine wraps the model that holds the trainable weights; only the trainable weights
  (the adapter when fine-tuning, the emulator blocks when distilling) are passed to it as
  ``model_parameters``, so only they get optimizer state, gradients, ZeRO partitions and fp32
  master copies. The frozen emulator (its low-bit ``FrozenLinear`` buffers and fast frozen
  modules included) and the embeddings stay replicated as they are: the engine never re-wraps
  or replaces a submodule, it calls the model's own forward.
- With ``"bf16": {"enabled": true}`` DeepSpeed keeps the model in bf16 (the frozen dense weights
  too: replicated in low bit) and fp32 master copies of the trainable weights only.
- ZeRO stage 3 would partition every parameter of the wrapped model, the frozen emulator
  included; the adapter run refuses it. In ``offsite distill`` a stage-3 config partitions the
  *teacher* (the full model, which may not fit one GPU) with a separate inference-only ZeRO-3
  engine, while the trained emulator blocks use stage 2 with the same other settings.
- The loop owns the batch order, the learning-rate schedule (warm-up + cosine) and the loss
  scaling for gradient accumulation; the config's batch keys, ``gradient_clipping`` and the
  optimizer's ``lr``/``weight_decay`` may be ``"auto"`` (filled from the command line) or must
  agree with it; a ``scheduler`` section is refused. Without an ``optimizer`` section the engine
  gets torch's AdamW; with CPU offload of optimizer state and no section, DeepSpeed's CPU Adam
  (AdamW mode) is asked for, as DeepSpeed requires.
- Checkpoints are DeepSpeed's (``save_checkpoint``/``load_checkpoint``: one tag directory per
  checkpoint, ``latest`` names the last complete one, each rank writes its own optimizer
  partition) holding only the trainable weights; the loop's counters go in the client state and
  the best weights so far in a safetensors file inside the tag. Older tags are removed once a
  newer one is complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import DistributedError, LocalEngine, World, barrier, check_batch, from_main, launch_world, mean_over_ranks

INSTALL = "pip install --no-build-isolation deepspeed"
BEST_FILE = "offsite_best.safetensors"
COUNTERS_FILE = "offsite_counters.json"
LATEST = "latest"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def require_deepspeed() -> Any:
    """Import DeepSpeed (on a machine without a GPU its CPU accelerator is chosen)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise DistributedError(
            f"--deepspeed needs DeepSpeed, which is not installed ({exc}); install it against your torch with: {INSTALL}"
        ) from exc
    return deepspeed


def load_config(source: str | os.PathLike | dict) -> dict[str, Any]:
    """A DeepSpeed config from a JSON file (or a dict, copied)."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise DistributedError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DistributedError(f"DeepSpeed config {str(path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise DistributedError(f"DeepSpeed config {str(path)!r} must be a JSON object")
    return config


def _agree(config: dict, key: str, expected: Any, option: str, where: str = "") -> None:
    value = config.get(key, "auto")
    if value == "auto":
        config[key] = expected
    elif value != expected:
        raise DistributedError(
            f"DeepSpeed config {where}{key!r} is {value!r} but the command line gives {expected!r} ({option}); "
            'set it to "auto" or make them agree'
        )


def zero_stage(config: dict[str, Any]) -> int:
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DistributedError("DeepSpeed config 'zero_optimization' must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DistributedError(f"DeepSpeed config zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def resolve_config(source: str | os.PathLike | dict, settings: Any, world: World, allow_stage3: bool = False) -> dict[str, Any]:
    """The config the engine gets: ``"auto"`` entries filled from ``settings``, the rest checked.

    Raises :class:`DistributedError` with the reason for anything that cannot run as asked.
    """
    config = load_config(source)
    rows = check_batch(settings.batch_size, world)
    _agree(config, "train_micro_batch_size_per_gpu", rows, f"--batch-size {settings.batch_size} / {world.size} processes")
    _agree(config, "gradient_accumulation_steps", settings.grad_accum, "--grad-accum")
    _agree(config, "train_batch_size", settings.batch_size * settings.grad_accum, "--batch-size x --grad-accum")
    _agree(config, "gradient_clipping", float(settings.clip), "--clip")
    if "scheduler" in config:
        raise DistributedError(
            "DeepSpeed config has a 'scheduler' section; the learning rate follows --lr, --warmup and the cosine decay "
            "of the training loop: remove the section"
        )
    stage = zero_stage(config)
    if stage == 3 and not allow_stage3:
        raise DistributedError(
            "ZeRO stage 3 would partition the frozen emulator as well; train the adapter with stage 1 or 2 (the emulator "
            "stays replicated in low bit). Stage 3 is for the teacher of `offsite distill`"
        )
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise DistributedError("DeepSpeed config enables both fp16 and bf16; choose one")
    zero = config.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", "cpu", "nvme"):
        raise DistributedError(f"zero_optimization.offload_optimizer.device must be none, cpu or nvme, got {offload!r}")
    if offload != "none" and stage not in (1, 2, 3):
        raise DistributedError("offload_optimizer needs ZeRO stage 1, 2 or 3")
    optimizer = config.get("optimizer")
    if optimizer is None and offload != "none":
        optimizer = config["optimizer"] = {"type": "AdamW", "params": {}}
    if optimizer is not None:
        if not isinstance(optimizer, dict) or str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
            raise DistributedError(
                f"DeepSpeed config optimizer type {optimizer.get('type') if isinstance(optimizer, dict) else optimizer!r} "
                "is not supported: the adapter trains with AdamW (type 'AdamW' or 'Adam', or no optimizer section)"
            )
        params = optimizer.setdefault("params", {})
        _agree(params, "lr", settings.lr, "--lr", "optimizer.params.")
        _agree(params, "weight_decay", settings.weight_decay, "--weight-decay", "optimizer.params.")
        if str(optimizer["type"]).lower() == "adam":
            params.setdefault("adam_w_mode", True)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def check_config(source: str | os.PathLike | dict, settings: Any, world: World | None = None, allow_stage3: bool = False) -> dict:
    """Everything that can be checked before a model is loaded: DeepSpeed installed, the config
    readable, consistent with the command line and accepted by DeepSpeed's own validation."""
    world = world or launch_world()
    deepspeed = require_deepspeed()
    config = resolve_config(source, settings, world, allow_stage3=allow_stage3)
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed validates batch sizes against the initialised world; before it exists, check a one-process copy
    probe = copy.deepcopy(config)
    probe["train_batch_size"] = probe["train_micro_batch_size_per_gpu"] * probe["gradient_accumulation_steps"]
    try:
        DeepSpeedConfig(probe)
    except Exception as exc:  # pydantic ValidationError, AssertionError, ValueError, ...
        raise DistributedError(f"DeepSpeed rejects the config: {str(exc).strip()}") from exc
    del deepspeed
    return config


def _param_groups(trainable: dict[str, nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in trainable.values() if p.dim() >= 2]
    no_decay = [p for p in trainable.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class _LossModule(nn.Module):
    """What the engine wraps: the model (a registered submodule, so DeepSpeed places and casts it)
    and, per call, the loop's loss function of the batch ids."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn: Any = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(ids)


class DeepSpeedEngine(LocalEngine):
    """The loop's engine on ``deepspeed.initialize``: ZeRO partitions of the trainable weights only."""

    def __init__(self, trainable: dict[str, nn.Parameter], settings: Any, module: nn.Module, world: World) -> None:
        deepspeed = require_deepspeed()
        self.trainable = trainable
        self.settings = settings
        self.world = world
        self.config = resolve_config(settings.deepspeed, settings, world, allow_stage3=False)
        self.rows = check_batch(settings.batch_size, world)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.wrapper = _LossModule(module)
        client_optimizer = None
        if "optimizer" not in self.config:
            client_optimizer = torch.optim.AdamW(_param_groups(trainable, settings.weight_decay), lr=settings.lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.wrapper,
            optimizer=client_optimizer,
            model_parameters=_param_groups(trainable, settings.weight_decay) if client_optimizer is None else None,
            config=self.config,
        )
        self.device = self.engine.device
        if self.engine.zero_optimization_stage() > 2:
            raise DistributedError("the adapter engine runs ZeRO stage 0, 1 or 2")

    def shard(self, ids: torch.Tensor) -> torch.Tensor:
        return ids[self.world.rank * self.rows : (self.world.rank + 1) * self.rows]

    def forward(self, loss_fn: Any, ids: torch.Tensor) -> torch.Tensor:
        self.wrapper.loss_fn = loss_fn
        try:
            return self.engine(ids)
        finally:
            self.wrapper.loss_fn = None

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        # the loop already divided by the accumulation steps
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # applies the optimizer on the accumulation boundary only

    def step(self) -> None:
        pass  # engine.step() after each backward steps the optimizer on the boundary (the loop's last micro-batch)

    def global_loss(self, value: float) -> float:
        return mean_over_ranks(value, self.device)

    def agree(self, value: Any) -> Any:
        return from_main(value)

    # --- checkpoints: DeepSpeed's own --------------------------------------------------------
    def has_checkpoint(self, ckpt: Path) -> bool:
        return bool(from_main(check_deepspeed_checkpoint_dir(ckpt)))

    def saved_counters(self, ckpt: Path) -> dict[str, Any] | None:
        from ..io import read_json

        counters = ckpt / (ckpt / LATEST).read_text().strip() / COUNTERS_FILE
        return read_json(counters, "DeepSpeed checkpoint counters") if counters.is_file() else None

    def load(self, ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        from ..io import load_tensors

        tag = (ckpt / LATEST).read_text().strip()
        path, client = self.engine.load_checkpoint(str(ckpt), tag=tag, load_module_strict=False)
        if path is None or not client or "offsite" not in client:
            raise DistributedError(f"DeepSpeed checkpoint {str(ckpt / tag)!r} is incomplete or not from offsite; delete it")
        counters = client["offsite"]
        if counters.get("world_size") != self.world.size:
            raise DistributedError(
                f"the DeepSpeed checkpoint in {str(ckpt)!r} was written by {counters.get('world_size')} processes; "
                f"resume it with as many (this launch has {self.world.size})"
            )
        best_file = ckpt / tag / BEST_FILE
        best = load_tensors(best_file, "best weights") if best_file.is_file() else None
        return counters, best

    def save(self, ckpt: Path, counters: dict[str, Any], best: dict[str, torch.Tensor] | None) -> None:
        from ..io import save_tensors, write_json

        tag = f"step{counters['step']}"
        counters = {**counters, "world_size": self.world.size}
        if self.world.is_main:
            (ckpt / tag).mkdir(parents=True, exist_ok=True)
            write_json(ckpt / tag / COUNTERS_FILE, counters)  # readable before any state is restored
            if best is not None:
                save_tensors(ckpt / tag / BEST_FILE, {k: v.detach().contiguous().cpu() for k, v in best.items()})
        barrier()
        self.engine.save_checkpoint(str(ckpt), tag=tag, client_state={"offsite": counters}, exclude_frozen_parameters=True)
        barrier()
        if self.world.is_main:  # the new tag is complete and named in `latest`: drop the older ones
            for old in ckpt.iterdir():
                if old.is_dir() and old.name.startswith("step") and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()


def check_deepspeed_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a DeepSpeed checkpoint to resume; False if it is free; else an error."""
    from .checkpoint import STATE_FILE

    path = Path(path)
    if (path / LATEST).is_file():
        return True
    if (path / STATE_FILE).is_file():
        raise DistributedError(
            f"checkpoint directory {str(path)!r} holds a checkpoint of a run without --deepspeed; "
            "resume it without --deepspeed, or give a new --checkpoint-dir"
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DistributedError(
            f"checkpoint directory {str(path)!r} exists and holds no DeepSpeed checkpoint; give an empty or new --checkpoint-dir"
        )
    return False


def teacher_engine(teacher: nn.Module, config: dict[str, Any]) -> nn.Module:
    """The distillation teacher, partitioned with an inference-only ZeRO-3 engine (no optimizer).

    Every rank holds 1/world of the teacher's weights; each forward gathers a block's weights
    as it runs. Returns a module to call like the teacher.
    """
    deepspeed = require_deepspeed()
    zero = dict(config.get("zero_optimization", {}))
    teacher_config = {
        "train_micro_batch_size_per_gpu": config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            **{k: v for k, v in zero.items() if k in ("offload_param", "stage3_param_persistence_threshold")},
        },
        "steps_per_print": 10**9,
    }
    for key in ("bf16", "fp16"):
        if key in config:
            teacher_config[key] = config[key]
    engine, *_ = deepspeed.initialize(model=teacher, config=teacher_config)
    engine.module.eval()
    return engine


def split_teacher_config(settings: Any, world: World | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """For distillation: ``(config of the trained emulator blocks, config of a ZeRO-3 teacher or None)``.

    A stage-3 config partitions the teacher; the emulator blocks train at stage 2 with the
    config's other settings (offload of optimizer state included). Other stages: no teacher engine.
    """
    world = world or launch_world()
    config = resolve_config(settings.deepspeed, settings, world, allow_stage3=True)
    if zero_stage(config) != 3:
        return config, None
    student = copy.deepcopy(config)
    zero = student["zero_optimization"]
    student["zero_optimization"] = {
        k: v for k, v in zero.items() if not k.startswith("stage3_") and k not in ("offload_param", "zero_quantized_weights")
    }
    student["zero_optimization"]["stage"] = 2
    return student, config
