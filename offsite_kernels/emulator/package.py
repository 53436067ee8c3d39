"""The emulator package on disk.

A package is a directory that is at the same time a valid Hugging Face checkpoint of the
reduced model (``config.json`` + ``*.safetensors``, only the kept blocks) and carries an
``offsite.json`` with the layout: which source blocks are adapter and which emulator.
Loading it needs nothing but the directory.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import OffsiteError, PackageError
from ..hf_io import copy_tokenizer_files
from ..io import atomic_output_dir, check_safetensors_files, load_tensors, read_json, write_json
from .adapter import check_no_unmerged_lora
from .build import freeze_all_but_adapter_, restore_source_depth_
from .layout import Layout
from .quantize import restore_quantized_linears_

if TYPE_CHECKING:
    from .offsite_model import OffsiteModel

PACKAGE_FORMAT = "offsite-kernels/emulator"
PACKAGE_FILE = "offsite.json"
# 2: low-bit experts stored stacked, one matrix per projection (``<experts>.gate_up_experts``); a package without
# low-bit experts is written as 1, which every version reads. Version 1 stored them one matrix per expert.
FORMAT_VERSION = 2


def save_emulator(
    emu: OffsiteModel,
    path: str | os.PathLike,
    overwrite: bool = False,
    tokenizer: Any = None,
    tokenizer_from: str | os.PathLike | None = None,
) -> Path:
    """Write ``emu`` to the directory ``path`` atomically; returns the path.

    ``tokenizer`` (an HF tokenizer) is saved with it; or the tokenizer files found in the
    directory ``tokenizer_from`` are copied.
    """
    check_no_unmerged_lora(emu.model, "an emulator package")
    record = {
        "format": PACKAGE_FORMAT,
        "format_version": FORMAT_VERSION if _holds_low_bit_experts(emu.quantized) else 1,
        "library_version": __version__,
        "model_type": emu.config.model_type,
        "layout": emu.layout.to_dict(),
        "prune": emu.prune,
        "quantized": emu.quantized,
    }
    with atomic_output_dir(path, overwrite) as tmp:
        emu.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        write_json(tmp / PACKAGE_FILE, record)
    return Path(path)


def _holds_low_bit_experts(quantized: dict[str, Any]) -> bool:
    return any(name.endswith(".gate_up_experts") for records in quantized.values() for name in records)


def read_package_record(path: Path) -> dict[str, Any]:
    """Read and check ``offsite.json`` of an emulator package."""
    what = "emulator package"
    if not path.is_dir():
        raise PackageError(f"{what}: {str(path)!r} is not a directory (expected the output of `offsite emulate`)")
    if not (path / PACKAGE_FILE).is_file():
        raise PackageError(
            f"{what}: {str(path)!r} is not an emulator package (it has no {PACKAGE_FILE}; "
            "make one with `offsite emulate` or OffsiteModel.save_pretrained)"
        )
    record = read_json(path / PACKAGE_FILE, what)
    if record.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{what}: {str(path)!r} is not an emulator package (format {record.get('format')!r})")
    version = record.get("format_version")
    if not isinstance(version, int):
        raise PackageError(f"{what}: {str(path)!r} has no integer format_version in {PACKAGE_FILE}; the file is corrupt")
    if version > FORMAT_VERSION:
        raise PackageError(
            f"{what}: format version {record['format_version']} is newer than this library reads; upgrade offsite-kernels"
        )
    return record


def load_emulator(path: str | os.PathLike, **hf_kwargs: Any) -> OffsiteModel:
    """Load a package written by :func:`save_emulator`; ``hf_kwargs`` go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from .offsite_model import OffsiteModel

    path = Path(path)
    record = read_package_record(path)
    layout = Layout.from_dict(record.get("layout", {}))
    check_safetensors_files(path, "emulator package")
    if not (path / "config.json").is_file():
        raise PackageError(f"emulator package: missing config.json in {str(path)!r}")
    quantized = record.get("quantized") or {}
    prune = record.get("prune", 0.0)
    if not isinstance(quantized, dict) or not all(isinstance(r, dict) for r in quantized.values()):
        raise PackageError(f"emulator package {str(path)!r}: 'quantized' in {PACKAGE_FILE} is malformed; the file is corrupt")
    if any(re.search(r"(gate_up|down)_experts\.\d+$", name) for records in quantized.values() for name in records):
        raise PackageError(
            f"emulator package {str(path)!r} (format version {record['format_version']}) stores its low-bit experts one "
            "matrix per expert, a layout this library no longer reads (it stacks each projection's experts); build the "
            "package again from the model with `offsite emulate`"
        )
    if isinstance(prune, bool) or not isinstance(prune, int | float) or not 0.0 <= prune < 1.0:
        raise PackageError(
            f"emulator package {str(path)!r}: 'prune' in {PACKAGE_FILE} is {prune!r}; expected a fraction in [0, 1)"
        )
    try:
        # low-bit modules are rebuilt below from the stored tensors; transformers would report their keys
        with _quiet_transformers() if quantized else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(str(path), **{"use_safetensors": True, **hf_kwargs})
    except OffsiteError:
        raise
    except Exception as exc:  # transformers raises many kinds; name the package in one message
        raise PackageError(f"emulator package {str(path)!r} could not be loaded: {exc}") from exc
    emu = OffsiteModel(model, layout, prune=float(prune), quantized=quantized)
    restore_source_depth_(model, emu.family, layout)
    files = check_safetensors_files(path, "emulator package")
    if quantized:
        tensors: dict = {}
        for f in files:
            tensors.update(load_tensors(f, "emulator package"))
        blocks = emu.blocks
        activation = emu.family.activation_name(emu.config)
        for position, records in quantized.items():
            if not position.isdigit() or int(position) not in emu.emulator_positions():
                raise PackageError(f"emulator package {str(path)!r}: quantized block {position!r} is not an emulator block")
            if not isinstance(records, dict):
                raise PackageError(f"emulator package {str(path)!r}: quantized block {position!r} has no record per module")
            prefix = f"{emu.family.blocks}.{position}."
            stored = _stored_names(model, [f"{prefix}{name}.{field}" for name in records for field in _STORED_FIELDS])
            by_model_name = {name: tensors[key] for name, key in stored.items() if key in tensors}
            restore_quantized_linears_(blocks[int(position)], records, by_model_name, prefix, emu.family.experts, activation)
        emu.model.to(next(emu.model.parameters()).device)
    _check_nothing_missing(emu.model, files, path)
    freeze_all_but_adapter_(model, emu.family, layout)
    return emu


_STORED_FIELDS = ("weight_data", "weight_scales", "weight_zeros", "bias")  # a low-bit FrozenLinear's tensors


def _revert_conversion() -> Any:
    """transformers' function mapping a state dict to the names (and splits) ``save_pretrained`` stores, or None where
    this transformers has none (an internal API: callers fall back to the names as they are)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    return revert_weight_conversion


def _stored_names(model: Any, names: list[str]) -> dict[str, str]:
    """``{name in the model: name save_pretrained stores it under}`` for tensors that are renamed, never split, on
    save (a low-bit linear's: Mixtral stores its ``mlp.experts`` under ``block_sparse_moe.experts``). Each name as it
    is where this transformers converts nothing or has no such function."""
    import torch

    same = {name: name for name in names}
    revert = _revert_conversion()
    try:  # each tensor is its own index, so the renamed entries say which name they came from
        reverted = revert(model, {name: torch.tensor([i]) for i, name in enumerate(names)}) if revert else {}
    except Exception:  # an internal API of transformers
        return same
    found = {names[int(t)]: key for key, t in reverted.items() if t.numel() == 1}
    return {name: found.get(name, name) for name in names}


def _as_stored(model: Any) -> dict[str, Any]:
    """``model``'s state dict under the names ``save_pretrained`` stores it: transformers 5.x renames some tensors on
    save (GPT-NeoX's ``lm_head`` is stored as ``embed_out``, as the hub's checkpoints have it) and splits others
    (a mixture of experts' 3-D expert weights into one matrix per expert). The state dict as it is where this
    transformers converts nothing or has no such function."""
    state = model.state_dict()
    revert = _revert_conversion()
    try:
        return dict(revert(model, dict(state))) if revert else state
    except Exception:  # an internal API of transformers: without it, only exact names count
        return state


def _check_nothing_missing(model: Any, files: list[Path], path: Path) -> None:
    """Every tensor of the loaded model must come from the package (transformers would quietly
    initialise a missing one at random). Tied weights are stored once."""
    from safetensors import safe_open

    stored: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            stored.update(handle.keys())
    names_of: dict[tuple[int, tuple[int, ...]], list[str]] = {}  # one entry per tensor, tied names together
    for name, tensor in _as_stored(model).items():
        names_of.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    missing = [names[0] for names in names_of.values() if not stored.intersection(names)]
    if missing:
        raise PackageError(
            f"emulator package {str(path)!r} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; the package is incomplete"
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' missing/unexpected-key report while loading a low-bit package."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
