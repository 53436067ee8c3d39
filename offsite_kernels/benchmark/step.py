"""One training step as every method runs it, and the byte counts of its parts.

The step is the paper's: forward under autocast (bf16 mixed precision; none when
``amp_dtype`` is None), backward, AdamW on the trainable fp32 parameters, gradients set to None.
:class:`TorchStep` runs it for every method but ``ft+zero``, whose step is DeepSpeed's
(:mod:`offsite_kernels.benchmark.zero`); both answer the same calls (:class:`Step`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

from .methods import Trainee


def make_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel per step on CUDA and CPU, no for-each temporaries), on every device
    and in the accounting alike."""
    return torch.optim.AdamW(params, lr=1e-5, fused=True)


def forward_loss(trainee: Trainee, ids: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The training loss of ``ids`` (labels = inputs) under autocast in ``amp_dtype``."""
    with torch.autocast(ids.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return trainee.loss(ids)


def train_step(
    trainee: Trainee, ids: torch.Tensor, optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    """Forward, backward, optimizer step, gradients released; returns the (detached) loss."""
    loss = forward_loss(trainee, ids, amp_dtype)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by several counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()  # one Python object per live storage: its id names the storage
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


def weight_bytes(module: nn.Module) -> int:
    """Parameters and buffers of ``module`` (tied weights once)."""
    return storage_bytes([*module.parameters(), *module.buffers()])


def grad_bytes(params: Iterable[nn.Parameter]) -> int:
    return storage_bytes(p.grad for p in params)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


class Step(Protocol):
    """A method's training step, as the benchmark times and measures it."""

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Forward, backward, optimizer step, gradients released; returns the (detached) loss."""
        ...

    def phases(self, ids: torch.Tensor, allocated: Callable[[], int]) -> tuple[int, int]:
        """One step with ``allocated()`` read around its phases: (activation bytes, gradient bytes)."""
        ...

    def optimizer_bytes(self) -> int:
        """Optimizer state held on the device."""
        ...

    def host_bytes(self) -> int:
        """Training state kept in host memory instead (0 unless offloaded)."""
        ...


class TorchStep:
    """The step of every method run by PyTorch alone: autocast forward, backward, fused AdamW."""

    def __init__(self, trainee: Trainee, amp_dtype: torch.dtype | None) -> None:
        self.trainee, self.amp_dtype = trainee, amp_dtype
        self.optimizer = make_optimizer(trainee.params)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return train_step(self.trainee, ids, self.optimizer, self.amp_dtype)

    def phases(self, ids: torch.Tensor, allocated: Callable[[], int]) -> tuple[int, int]:
        before = allocated()
        loss = forward_loss(self.trainee, ids, self.amp_dtype)
        activations = allocated() - before
        loss.backward()
        del loss
        gradients = grad_bytes(self.trainee.params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return activations, gradients

    def optimizer_bytes(self) -> int:
        return optimizer_state_bytes(self.optimizer)

    def host_bytes(self) -> int:
        return 0
