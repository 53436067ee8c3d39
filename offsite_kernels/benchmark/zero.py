"""Full fine-tuning on DeepSpeed (method ``ft+zero``): the FT baseline a user really runs when
plain FT does not fit one GPU.

ZeRO stage 2 with the optimizer offloaded to host memory ("ZeRO-Offload"), in one process:

- on the device: the model's weights in bf16 (one flat buffer), the activations, and
  gradients only in transit: each gradient is staged in a bucket of ``REDUCE_BUCKET`` elements
  (two buckets with ``overlap_comm``) and copied to the host as the backward produces it;
- in host memory: the fp32 master weights, their fp32 gradients, AdamW's two moments and a
  bf16 copy-back buffer; DeepSpeed's CPU Adam (AdamW mode) steps them, and the updated weights
  are copied back to the device.

Measured, the gradients left on the device after the backward are none (the buckets are
freed by then; the peak includes them). Accounted (modelled, see
:func:`~offsite_kernels.benchmark.account.account_zero_memory`), the gradients are the buckets
while the backward runs.

DeepSpeed is imported only here, when the method runs (``pip install 'offsite-kernels[distributed]'``;
on a machine without a registry, carry it as wheels: bench/README.md). The step starts a
one-process ``torch.distributed`` group if none exists (gloo on a CPU, NCCL on a GPU).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
from torch import nn

from .methods import BenchError, Trainee
from .step import grad_bytes, storage_bytes

REDUCE_BUCKET = 200_000_000  # elements per gradient bucket (DeepSpeed's default is 5e8)
OVERLAP_COMM = True  # two buckets: the copy to the host overlaps the backward
LR = 1e-5
WEIGHT_DECAY = 0.01  # torch's AdamW default, as the other methods' optimizer

# bytes per trainable parameter kept in host memory: fp32 master (4), fp32 gradient (4),
# AdamW's exp_avg and exp_avg_sq (8), bf16 copy-back buffer (2)
HOST_BYTES_PER_PARAM = 18


def zero_offload_config(batch: int) -> dict[str, Any]:
    """The DeepSpeed config of ``ft+zero`` for a micro-batch of ``batch`` sequences."""
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "contiguous_gradients": True,
            "overlap_comm": OVERLAP_COMM,
            "reduce_bucket_size": REDUCE_BUCKET,
            "allgather_bucket_size": REDUCE_BUCKET,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


HOST_FRACTION = 0.8  # the offloaded state may take at most this share of the host's memory
HOST_MEMORY_VARIABLE = "OFFSITE_HOST_MEMORY_GIB"


def host_memory_bytes() -> int | None:
    """The host's memory: ``$OFFSITE_HOST_MEMORY_GIB`` if set (for machines whose reported memory
    grows as it is used), else the total the OS reports; None if unknown."""
    value = os.environ.get(HOST_MEMORY_VARIABLE)
    if value:
        try:
            return int(float(value) * 2**30)
        except ValueError:
            raise BenchError(f"{HOST_MEMORY_VARIABLE}={value!r} is not a number of GiB") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_memory(params: int) -> None:
    """Refuse, before anything is allocated, an offload the host cannot hold (it would be killed)."""
    need, have = HOST_BYTES_PER_PARAM * params, host_memory_bytes()
    if have is not None and need > HOST_FRACTION * have:
        raise BenchError(
            f"ft+zero keeps {HOST_BYTES_PER_PARAM} bytes per parameter in host memory: {need / 2**30:.1f} GiB for "
            f"{params / 1e9:.2f}B parameters, more than {HOST_FRACTION:.0%} of this host's {have / 2**30:.1f} GiB "
            f"(set {HOST_MEMORY_VARIABLE} if the OS under-reports it)"
        )


def device_gradient_bytes() -> int:
    """Bytes of the device's gradient buckets (bf16) while the backward runs."""
    return REDUCE_BUCKET * (2 if OVERLAP_COMM else 1) * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_deepspeed() -> Any:
    from ..workflow.deepspeed_engine import require_deepspeed

    try:
        return require_deepspeed()
    except Exception as exc:
        raise BenchError(f"method ft+zero runs on DeepSpeed: {exc}") from exc


def _one_process_group(deepspeed: Any) -> None:
    """A one-process group for DeepSpeed, unless one exists (a bench runs on one device). It stays
    for the life of the process: DeepSpeed caches its groups, so a destroyed one cannot be redone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != 1:
            raise BenchError(f"offsite bench runs in one process; this one is rank {dist.get_rank()} of {dist.get_world_size()}")
        return
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


class _LossOf(nn.Module):
    """What the engine wraps: the trainee's module (registered, so DeepSpeed places and casts it)
    and its loss of the batch ids."""

    def __init__(self, trainee: Trainee) -> None:
        super().__init__()
        self.model = trainee.module
        self._loss = trainee.loss

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._loss(ids)


class ZeroStep:
    """The training step of ``ft+zero``: DeepSpeed's engine forward, backward and step.

    Answers the calls of :class:`~offsite_kernels.benchmark.step.Step`. DeepSpeed casts the
    model to bf16 in place, so ``trainee.module`` holds the device weights afterwards."""

    def __init__(self, trainee: Trainee, batch: int) -> None:
        check_host_memory(sum(p.numel() for p in trainee.params))
        deepspeed = _require_deepspeed()
        _one_process_group(deepspeed)
        self.trainee = trainee
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_LossOf(trainee), model_parameters=trainee.params, config=zero_offload_config(batch)
        )

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        loss = self.engine(ids)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def phases(self, ids: torch.Tensor, allocated: Any) -> tuple[int, int]:
        before = allocated()
        loss = self.engine(ids)
        activations = allocated() - before
        self.engine.backward(loss)
        del loss
        gradients = grad_bytes(self.trainee.params)  # none: they went to the host, and the buckets are freed
        self.engine.step()
        return activations, gradients

    def optimizer_bytes(self) -> int:
        """ZeRO's persistent buffers on the device (the optimizer state itself is in host memory)."""
        return storage_bytes([getattr(self.optimizer, "temp_grad_buffer_for_gpu_offload", None)])

    def host_bytes(self) -> int:
        """The offloaded state: fp32 master weights and gradients, AdamW moments, staging buffers."""
        opt = self.optimizer
        masters = list(getattr(opt, "single_partition_of_fp32_groups", []))
        tensors: list[torch.Tensor | None] = [*masters, *(m.grad for m in masters)]
        tensors += [v for state in opt.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += list(getattr(opt, "param_buffer_of_bit16_for_cpu_offload_groups", []))
        tensors.append(getattr(opt, "temp_grad_buffer_for_cpu_offload", None))
        return storage_bytes(tensors)
