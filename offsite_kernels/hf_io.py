"""Loading and saving whole Hugging Face models from local directories (never from a hub)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from .errors import OffsiteError, PackageError
from .io import atomic_output_dir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def keys_with(path: str | os.PathLike, marker: str) -> list[str]:
    """Names of the tensors in a directory's safetensors files that contain ``marker`` (headers only)."""
    from safetensors import safe_open

    found: list[str] = []
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found += [key for key in f.keys() if marker in key]  # noqa: SIM118 (a safetensors handle, not a dict)
    return found


def load_local_model(path: str | os.PathLike, added_marker: str | None = None, **hf_kwargs: Any) -> nn.Module:
    """Load a causal LM from a local directory, with one clear error for every kind of failure.

    ``added_marker``: tensors whose names contain it belong to modules the caller adds after loading
    (Hugging Face builds the plain architecture and leaves them out): its load report, which would
    call them unexpected, is quieted, and any other unexpected or missing weight is warned about."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise PackageError(
            f"model: {str(path)!r} is not a directory (give a local Hugging Face model directory; hubs are not used)"
        )
    if not (path / "config.json").is_file():
        raise PackageError(f"model: {str(path)!r} has no config.json; is it a Hugging Face model directory?")
    if not any(path.glob("*.safetensors")):
        raise PackageError(
            f"model: {str(path)!r} holds no .safetensors weights; weights are read only from safetensors (a pickle "
            "checkpoint such as pytorch_model.bin can run code when loaded). Convert it where you trust it: "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst) writes safetensors"
        )
    hf_kwargs.setdefault("use_safetensors", True)
    added = added_marker is not None and bool(keys_with(path, added_marker))
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if added:
        hf_logging.set_verbosity_error()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=added, **hf_kwargs)
    except OffsiteError:
        raise
    except Exception as exc:  # transformers raises many kinds; one message that names the directory
        raise PackageError(f"model: {str(path)!r} could not be loaded: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if not added:
        return loaded
    model, info = loaded
    others = sorted(k for k in info["unexpected_keys"] if added_marker not in k) + sorted(info["missing_keys"])
    if others:
        warnings.warn(f"model: {str(path)!r}: weights unexpected or missing at load: {', '.join(others[:8])}", stacklevel=2)
    return model


def copy_tokenizer_files(source: str | os.PathLike, dest: Path) -> list[str]:
    """Copy the tokenizer files found in ``source`` into ``dest``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(source) / name
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied


def save_model_dir(
    model: nn.Module, path: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None, overwrite: bool = False
) -> Path:
    """Save a whole HF model (safetensors) atomically, with the tokenizer files of ``tokenizer_from``."""
    with atomic_output_dir(path, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
    return Path(path)
