"""Text and multiple-choice data: reading, checking, tokenizing into fixed blocks.

Text files are plain text (documents separated by blank lines are simply concatenated) or
JSONL with a ``text`` field per line. Tokens of the whole file are joined, with the tokenizer's
end-of-text token between documents, and cut into blocks of ``block_size`` tokens.
Multiple-choice files are JSONL: ``{"context": str, "choices": [str, ...], "gold": int}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import OffsiteError


class DataError(OffsiteError, ValueError):
    """A data file that is missing, empty, too short, or not in the expected format."""


def _read_raw(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text ({exc})") from exc
    if not raw.strip():
        raise DataError(f"data file {str(path)!r} is empty")
    return raw


def _jsonl_records(path: Path, raw: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` for each non-blank line."""
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc


def read_texts(path: str | os.PathLike) -> list[str]:
    """Documents of a plain-text or JSONL (``text`` field) file."""
    path = Path(path)
    raw = _read_raw(path)
    if path.suffix == ".jsonl":
        texts = []
        for number, record in _jsonl_records(path, raw):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{number}: each JSONL line needs a string field 'text'")
            texts.append(record["text"])
        return texts
    return [raw]


def check_tokenizer(tokenizer: Any, model: Any) -> None:
    """Refuse a tokenizer whose ids do not fit the model's vocabulary."""
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        raise DataError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: "
            "they do not belong together (use the tokenizer saved with the model)"
        )
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-text token; set tokenizer.eos_token")


def max_positions(model: Any) -> int | None:
    """How many tokens a model with a position table (learned, or GPT-J's precomputed rotary one) takes at most; None
    when positions are computed per call."""
    from ..models import get_family

    return get_family(model).max_positions(model.config)


def check_fits(data: TextBlocks, model: Any) -> None:
    """Refuse blocks longer than the model's position table."""
    limit = max_positions(model)
    if limit is not None and data.block_size > limit:
        raise DataError(
            f"blocks of {data.block_size} tokens ({data.source!r}) are longer than the {limit} positions of the "
            f"model's position table; use a block size of at most {limit} (--block-size)"
        )


@dataclass
class TextBlocks:
    """A file tokenized into ``[n_blocks, block_size]`` token ids."""

    ids: torch.Tensor
    source: str

    @property
    def block_size(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()


def load_blocks(path: str | os.PathLike, tokenizer: Any, block_size: int, max_blocks: int | None = None) -> TextBlocks:
    """Read ``path``, tokenize, and cut into blocks; at least one whole block is required."""
    if block_size < 2:
        raise DataError(f"block_size must be at least 2, got {block_size}")
    if max_blocks is not None and max_blocks < 1:
        raise DataError(f"max_blocks must be at least 1, got {max_blocks}")
    ids: list[int] = []
    for text in read_texts(path):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise DataError(
            f"data file {str(path)!r} has {len(ids)} tokens, fewer than one block of {block_size}; "
            "give more text or a smaller --block-size"
        )
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    blocks = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    return TextBlocks(blocks, str(path))


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: a context, its candidate continuations, the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


def load_choices(path: str | os.PathLike) -> list[ChoiceItem]:
    """Read a multiple-choice JSONL file, checking every record."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise DataError(f"multiple-choice data must be a .jsonl file, got {str(path)!r}")
    raw = _read_raw(path)
    items = []
    for number, record in _jsonl_records(path, raw):
        choices = record.get("choices") if isinstance(record, dict) else None
        gold = record.get("gold") if isinstance(record, dict) else None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("context"), str)
            or not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
            or not isinstance(gold, int)
            or isinstance(gold, bool)
            or not 0 <= gold < len(choices)
        ):
            raise DataError(
                f"{path}:{number}: each line needs 'context' (string), 'choices' (two or more non-empty strings) "
                "and 'gold' (index of the right choice)"
            )
        items.append(ChoiceItem(record["context"], tuple(choices), gold))
    if not items:
        raise DataError(f"multiple-choice file {str(path)!r} has no questions")
    return items
