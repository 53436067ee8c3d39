"""Data-parallel training on an existing launcher: ``torchrun``, ``accelerate launch`` or ``deepspeed``.

The launcher starts one process per device and sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`launch_world` reads them, and the training loop
(:func:`offsite_kernels.workflow.loop.train`) picks an engine:

- one process, no ``--deepspeed``: :class:`LocalEngine` (plain PyTorch AdamW, as before);
- several processes, no ``--deepspeed``: :class:`DataParallelEngine`: ``torch.distributed``
  (NCCL on GPUs, gloo on CPUs), the trainable gradients averaged with one flat all-reduce per
  optimizer step (the arithmetic of DDP, without wrapping the model, so the emulator's fast
  frozen modules stay exactly as they are and nothing frozen is broadcast or bucketed);
- ``--deepspeed CONFIG`` (any number of processes): the DeepSpeed engine, see
  :mod:`offsite_kernels.workflow.deepspeed_engine`.

The global batch is what a single process would see: ``--batch-size`` is the micro-batch of all
processes together, and rank ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)`` of the very
micro-batch a single process would draw at that step. Block lengths are equal and unpadded, so
the mean of the per-rank mean losses is the single-process loss, and the averaged gradient is
the single-process gradient: the loss curve and the final adapter match a one-process run with
the same ``--batch-size`` (up to float summation order). The world size must divide the batch;
that is checked before any model is loaded.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import OffsiteError, PackageError


class DistributedError(OffsiteError, ValueError):
    """A launch that cannot run: a world size that does not divide the batch, a bad DeepSpeed config, ..."""


@dataclass(frozen=True)
class World:
    """Where this process sits among the launched ones."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer (set by the launcher)") from exc


def launch_world() -> World:
    """The world as the launcher (torchrun, accelerate launch, deepspeed, mpirun) describes it."""
    size = _env_int("WORLD_SIZE", _env_int("OMPI_COMM_WORLD_SIZE", 1))
    rank = _env_int("RANK", _env_int("OMPI_COMM_WORLD_RANK", 0))
    local = _env_int("LOCAL_RANK", _env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0))
    if size < 1 or not 0 <= rank < size or local < 0:
        raise DistributedError(f"inconsistent launch environment: WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local}")
    return World(size, rank, local)


def check_batch(batch_size: int, world: World) -> int:
    """Rows of each micro-batch per process; the world size must divide ``batch_size``."""
    if batch_size % world.size:
        raise DistributedError(
            f"--batch-size {batch_size} is the global micro-batch; it must be a multiple of the {world.size} launched "
            f"processes (each takes batch-size / world-size rows): use --batch-size {world.size * max(1, batch_size // world.size)} "
            f"or {world.size * (batch_size // world.size + 1)}, or launch a number of processes that divides {batch_size}"
        )
    return batch_size // world.size


def device_for(world: World) -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` when GPUs exist, else the CPU."""
    if torch.cuda.is_available():
        if world.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} GPUs are visible on this node"
            )
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def init_process_group(world: World, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the launcher's process group (``env://``): NCCL for GPUs, gloo for CPUs. Idempotent."""
    if not world.distributed or dist.is_initialized():
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world.size} but {', '.join(missing)} is not set: start the processes with torchrun, "
            "accelerate launch or deepspeed"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, rank=world.rank, world_size=world.size, timeout=datetime.timedelta(seconds=timeout_s), device_id=None
    )


def leave_process_group() -> None:
    """Destroy the process group of a launched run (``WORLD_SIZE`` > 1) once its work is done.

    gloo's and NCCL's threads, left running into interpreter shutdown, can abort a process whose
    work already finished ("terminate called without an active exception"), failing the launch.
    A one-process group (DeepSpeed in a plain process) stays: DeepSpeed caches it for the process's life.
    """
    try:
        launched = launch_world().distributed
    except DistributedError:
        return  # an inconsistent launch never joined a group
    if launched and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def move_to_device(module: torch.nn.Module, device: torch.device) -> None:
    """Move a model to ``device`` unless it is there already (an emulator loaded on the CPU goes to its GPU)."""
    current = next(module.parameters()).device
    if current != device:
        module.to(device)


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over the processes in place, with one flat all-reduce."""
    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def mean_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the same decision everywhere, e.g. which weights are best)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class LocalEngine:
    """One process: torch AdamW, clipping, the library's own safetensors checkpoints."""

    def __init__(self, trainable: dict[str, torch.nn.Parameter], settings: Any, device: torch.device) -> None:
        self.trainable = trainable
        self.settings = settings
        self.device = device
        self.world = World()
        decay = [p for p in trainable.values() if p.dim() >= 2]
        no_decay = [p for p in trainable.values() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr,
        )

    # the rows of a global micro-batch this process trains on
    def shard(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def forward(self, loss_fn: Any, ids: torch.Tensor) -> torch.Tensor:
        return loss_fn(ids)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def sync_gradients(self) -> None:
        pass

    def step(self) -> None:
        self.sync_gradients()
        if self.settings.clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.settings.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def global_loss(self, value: float) -> float:
        return value

    def agree(self, value: Any) -> Any:
        return value

    # --- checkpoints ----------------------------------------------------------------------
    def has_checkpoint(self, ckpt: Path) -> bool:
        from .checkpoint import check_checkpoint_dir

        return check_checkpoint_dir(ckpt)

    def saved_counters(self, ckpt: Path) -> dict[str, Any] | None:
        """The checkpoint's counters, read before anything is restored (None: only :meth:`load` can read them)."""
        from .checkpoint import saved_counters

        return saved_counters(ckpt)

    def load(self, ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """Restore weights and optimizer; return ``(counters, best_state)``."""
        from .checkpoint import load_checkpoint

        params, best, counters = load_checkpoint(ckpt, self.optimizer)
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(params[name])
        return counters, best

    def save(self, ckpt: Path, counters: dict[str, Any], best: dict[str, torch.Tensor] | None) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(ckpt, {n: p.detach() for n, p in self.trainable.items()}, best, self.optimizer, counters)

    def close(self) -> None:
        pass


class DataParallelEngine(LocalEngine):
    """Several processes on ``torch.distributed``: each trains its rows, gradients averaged before
    clipping (so clipping sees the global gradient, as one process would). Weights and optimizer
    state are replicated; rank 0 writes the (library-format) checkpoint, every rank reads it."""

    def __init__(self, trainable: dict[str, torch.nn.Parameter], settings: Any, device: torch.device, world: World) -> None:
        super().__init__(trainable, settings, device)
        self.world = world
        self.rows = check_batch(settings.batch_size, world)
        # every rank starts from rank 0's weights (LoRA and bottleneck weights are seeded anyway)
        with torch.no_grad():
            for p in trainable.values():
                dist.broadcast(p.data, src=0)

    def shard(self, ids: torch.Tensor) -> torch.Tensor:
        return ids[self.world.rank * self.rows : (self.world.rank + 1) * self.rows]

    def sync_gradients(self) -> None:
        grads = []
        for p in self.trainable.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        all_reduce_mean_(grads)

    def global_loss(self, value: float) -> float:
        return mean_over_ranks(value, self.device)

    def agree(self, value: Any) -> Any:
        return from_main(value)

    def has_checkpoint(self, ckpt: Path) -> bool:
        """Rank 0 looks (and recovers an interrupted save); every rank gets its answer, or its error."""
        outcome: tuple[str, Any] | None = None
        if self.world.is_main:
            try:
                outcome = ("found", super().has_checkpoint(ckpt))
            except PackageError as exc:
                outcome = ("error", str(exc))
        kind, value = from_main(outcome)
        if kind == "error":
            raise PackageError(value)
        return bool(value)

    def save(self, ckpt: Path, counters: dict[str, Any], best: dict[str, torch.Tensor] | None) -> None:
        if self.world.is_main:
            super().save(ckpt, counters, best)
        barrier()


def make_engine(
    trainable: dict[str, torch.nn.Parameter],
    settings: Any,
    device: torch.device | None,
    module: torch.nn.Module | None,
) -> LocalEngine:
    """The engine for this launch: local, data-parallel (torch.distributed) or DeepSpeed."""
    world = launch_world()
    if getattr(settings, "deepspeed", None) is not None:
        from .deepspeed_engine import DeepSpeedEngine

        if module is None:
            raise DistributedError("DeepSpeed needs the module that holds the trainable weights (pass module=...)")
        return DeepSpeedEngine(trainable, settings, module, world)
    if not world.distributed:
        return LocalEngine(trainable, settings, device or next(iter(trainable.values())).device)
    check_batch(settings.batch_size, world)
    device = device_for(world)
    init_process_group(world, device)
    if module is not None:
        move_to_device(module, device)
    return DataParallelEngine(trainable, settings, device, world)


def training_device(settings: Any, model: torch.nn.Module) -> torch.device:
    """Where this process trains ``model``: its own GPU under a launcher or DeepSpeed, else where it is."""
    world = launch_world()
    if world.distributed or getattr(settings, "deepspeed", None) is not None:
        return device_for(world)
    return next(model.parameters()).device
