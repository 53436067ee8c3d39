"""Unstructured magnitude pruning of the emulator's weight matrices (an optional compression)."""

from __future__ import annotations

import torch
from torch import nn


def weight_matrices(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weight matrices of ``module``: its 2-D parameters (linear and Conv1D weights; norms and biases are 1-D),
    and each expert's matrix of a mixture of experts' 3-D ``[experts, out, in]`` weights (named ``name[expert]``)."""
    matrices: list[tuple[str, torch.Tensor]] = []
    for name, p in module.named_parameters():
        if p.dim() == 2:
            matrices.append((name, p))
        elif p.dim() == 3:
            matrices += [(f"{name}[{e}]", p[e]) for e in range(p.shape[0])]
    return matrices


@torch.no_grad()
def magnitude_prune_(module: nn.Module, ratio: float) -> int:
    """Zero the ``ratio`` fraction of smallest-magnitude entries of each weight matrix, in place.

    Each matrix is pruned on its own (per-layer unstructured pruning, as in the paper's code; per expert in a
    mixture of experts).
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
