"""Evaluation: perplexity on text blocks and zero-shot multiple choice by log-likelihood."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import ChoiceItem, DataError, TextBlocks, check_fits, max_positions


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, data: TextBlocks, batch_size: int = 8) -> dict[str, float]:
    """Token-level mean negative log-likelihood and perplexity of ``model`` on ``data``."""
    check_fits(data, model)
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids = data.ids[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    model.train(was_training)
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}


@dataclass
class ChoiceScores:
    accuracy: float
    accuracy_norm: float
    n: int


@torch.no_grad()
def multiple_choice(model: nn.Module, tokenizer: Any, items: list[ChoiceItem]) -> ChoiceScores:
    """Zero-shot accuracy: the choice with the highest log-likelihood given the context wins.

    ``accuracy`` compares summed log-likelihoods; ``accuracy_norm`` divides each by the choice's
    length in characters (as the usual zero-shot harnesses do).
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    limit = max_positions(model)
    correct = correct_norm = 0
    for n, item in enumerate(items):
        full_context = tokenizer(item.context, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        scores, scores_norm = [], []
        for choice in item.choices:
            target = tokenizer(choice, add_special_tokens=False)["input_ids"]
            context = full_context
            if limit is not None and len(context) + len(target) > limit:
                if len(target) >= limit:
                    raise DataError(
                        f"choice {choice[:40]!r} of item {n} has {len(target)} tokens; the model takes {limit} positions"
                    )
                context = context[len(context) + len(target) - limit :]  # keep the end of the context, as harnesses do
            ids = torch.tensor([context + target], device=device)
            logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            positions = torch.arange(len(context) - 1, ids.shape[1] - 1, device=device)
            ll = float(logprobs[positions, ids[0, len(context) :]].sum())
            scores.append(ll)
            scores_norm.append(ll / max(1, len(choice)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item.gold)
        correct_norm += int(max(range(len(scores_norm)), key=scores_norm.__getitem__) == item.gold)
    model.train(was_training)
    return ChoiceScores(correct / len(items), correct_norm / len(items), len(items))
