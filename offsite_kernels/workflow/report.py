"""The paper's settings side by side: full zero-shot, emulator zero-shot, emulator fine-tuned,
plug-in (and full fine-tune where asked), as a table and as JSON rows."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..emulator.adapter import check_adapter, load_adapter, plug_in
from ..emulator.offsite_model import OffsiteModel
from .data import ChoiceItem, TextBlocks
from .evaluate import multiple_choice, perplexity

SETTINGS = ("full zero-shot", "emulator zero-shot", "emulator fine-tuned", "plug-in", "full fine-tune")
# OPT-1.3B 2-8-2 distilled, WikiText-2 perplexity (arXiv:2302.04870, Table 3)
PAPER_WIKITEXT_PPL = {
    "full zero-shot": 31.48,
    "emulator zero-shot": 38.55,
    "emulator fine-tuned": 15.54,
    "plug-in": 13.15,
    "full fine-tune": 12.52,
}


def evaluate_setting(
    name: str, model: nn.Module, data: TextBlocks, tokenizer: Any = None, choices: list[ChoiceItem] | None = None
) -> dict[str, Any]:
    row: dict[str, Any] = {"setting": name, **perplexity(model, data)}
    if choices:
        scores = multiple_choice(model, tokenizer, choices)
        row.update(accuracy=scores.accuracy, accuracy_norm=scores.accuracy_norm, questions=scores.n)
    return row


def four_settings(
    model: nn.Module,
    emulator: OffsiteModel,
    adapter_path: str | os.PathLike,
    data: TextBlocks,
    tokenizer: Any = None,
    choices: list[ChoiceItem] | None = None,
    full_finetuned: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the settings in an order that needs no copy of the full model.

    ``emulator`` must hold the untouched adapter (it is evaluated zero-shot first) and
    ``model`` the original weights; both are modified in place (adapter loaded, plugged in).
    An adapter that fits neither is refused before the first evaluation.
    """
    check_adapter(adapter_path, model=model, emulator=emulator)
    rows = [evaluate_setting("full zero-shot", model, data, tokenizer, choices)]
    rows.append(evaluate_setting("emulator zero-shot", emulator, data, tokenizer, choices))
    load_adapter(emulator, adapter_path)
    rows.append(evaluate_setting("emulator fine-tuned", emulator, data, tokenizer, choices))
    plug_in(model, adapter_path)
    rows.append(evaluate_setting("plug-in", model, data, tokenizer, choices))
    if full_finetuned is not None:
        rows.append(evaluate_setting("full fine-tune", full_finetuned, data, tokenizer, choices))
    return rows


def ordering_holds(rows: list[dict[str, Any]]) -> bool:
    """The paper's ordering: plug-in beats both full zero-shot and emulator fine-tuned (perplexity)."""
    ppl = {r["setting"]: r["perplexity"] for r in rows}
    return ppl["plug-in"] < ppl["full zero-shot"] and ppl["plug-in"] < ppl["emulator fine-tuned"]


def format_table(rows: list[dict[str, Any]], paper: bool = True) -> str:
    """A markdown table of the rows (with the paper's OPT-1.3B WikiText-2 figures beside them)."""
    has_mc = any("accuracy" in r for r in rows)
    head = (
        ["setting", "perplexity"]
        + (["acc", "acc_norm"] if has_mc else [])
        + (["paper ppl (OPT-1.3B, WikiText-2)"] if paper else [])
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], f"{r['perplexity']:.2f}"]
        if has_mc:
            cells += [f"{r['accuracy']:.3f}" if "accuracy" in r else "", f"{r['accuracy_norm']:.3f}" if "accuracy" in r else ""]
        if paper:
            cells.append(f"{PAPER_WIKITEXT_PPL[r['setting']]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
