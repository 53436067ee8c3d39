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


def load_local_model(path: str | os.PathLike, **hf_kwargs: Any) -> nn.Module:
    """Load a causal LM from a local directory, with one clear error for every kind of failure.

    Bottleneck adapters plugged in before the model was saved are put back (Hugging Face drops them)."""
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
    from .emulator.bottleneck import ATTR, restore_saved, saved_bottlenecks

    if not saved_bottlenecks(path):
        try:
            return AutoModelForCausalLM.from_pretrained(str(path), **hf_kwargs)
        except OffsiteError:
            raise
        except Exception as exc:  # transformers raises many kinds; one message that names the directory
            raise PackageError(f"model: {str(path)!r} could not be loaded: {exc}") from exc
    # bottleneck adapters were plugged in before the model was saved: Hugging Face builds the plain
    # architecture and drops their tensors (its load report would call them unexpected); put them back
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **hf_kwargs)
    except OffsiteError:
        raise
    except Exception as exc:
        raise PackageError(f"model: {str(path)!r} could not be loaded: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    others = sorted(k for k in info["unexpected_keys"] if f".{ATTR}." not in k) + sorted(info["missing_keys"])
    if others:
        warnings.warn(f"model: {str(path)!r}: weights unexpected or missing at load: {', '.join(others[:8])}", stacklevel=2)
    restore_saved(model, path)
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
