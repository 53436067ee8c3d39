"""Unstructured magnitude pruning of the emulator's weight matrices (an optional compression)."""

from __future__ import annotations

import torch
from torch import nn


def weight_matrices(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The 2-D parameters of ``module`` (linear and Conv1D weights; norms and biases are 1-D)."""
    return [(name, p) for name, p in module.named_parameters() if p.dim() == 2]


@torch.no_grad()
def magnitude_prune_(module: nn.Module, ratio: float) -> int:
    """Zero the ``ratio`` fraction of smallest-magnitude entries of each weight matrix, in place.

    Each matrix is pruned on its own (per-layer unstructured pruning, as in the paper's code).
    Returns the number of entries set to zero.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    zeroed = 0
    for _, weight in weight_matrices(module):
        n_prune = int(weight.numel() * ratio)
        if n_prune == 0:
            continue
        flat = weight.detach().abs().flatten().float()
        # indices of the n_prune smallest magnitudes: ties broken by position, so exactly n_prune go
        idx = torch.topk(flat, n_prune, largest=False, sorted=False).indices
        weight.view(-1)[idx] = 0
        zeroed += n_prune
    return zeroed
