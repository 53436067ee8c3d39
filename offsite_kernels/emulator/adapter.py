"""Adapter files and plug-in.

An adapter directory holds ``adapter.safetensors`` (only the adapter blocks' tensors, named
as in the source model) and ``adapter.json``, a manifest naming the source architecture, the
layout and a small probe of the input embedding. :func:`plug_in` checks all of it against
the full model before it changes a single weight.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._version import __version__
from ..errors import AdapterMismatchError, PackageError, UnsupportedModelError
from ..io import atomic_output_dir, load_tensors, read_json, save_tensors, write_json
from ..models import ModelFamily, get_family
from .bottleneck import ATTR as BOTTLENECK_ATTR
from .bottleneck import Bottleneck, bottleneck_size
from .bottleneck import install as install_bottleneck
from .layout import Layout

if TYPE_CHECKING:
    from .offsite_model import OffsiteModel

ADAPTER_FORMAT = "offsite-kernels/adapter"
ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "adapter.json"
FORMAT_VERSION = 1
_ARCH_FIELDS = ("hidden_size", "vocab_size", "num_attention_heads")
_PROBE_SIZE = 16
_PROBE_RTOL = 1e-2


def architecture_of(config: Any) -> dict[str, Any]:
    """The config fields an adapter must agree on with the model it is plugged into."""
    return {f: getattr(config, f, None) for f in _ARCH_FIELDS}


def embedding_probe(model: nn.Module, family: ModelFamily) -> list[float]:
    """A few fixed entries of the input embedding: tells one model's weights from another's.

    Compared with a relative tolerance, so the probe survives a change of dtype.
    """
    weight = family.get(model, family.token_embedding).weight.detach()
    rows = torch.linspace(0, weight.shape[0] - 1, _PROBE_SIZE).round().long()
    return weight[rows.to(weight.device), : min(_PROBE_SIZE, weight.shape[1])].float().flatten().cpu().tolist()


def probe_matches(probe: Any, model: nn.Module, family: ModelFamily) -> bool:
    """Whether ``probe`` (an :func:`embedding_probe`) was taken from ``model``'s weights, to a relative tolerance."""
    try:
        theirs = torch.tensor(probe, dtype=torch.float64)
    except (TypeError, ValueError):
        return False
    mine = torch.tensor(embedding_probe(model, family), dtype=torch.float64)
    return theirs.shape == mine.shape and bool((theirs - mine).norm() <= _PROBE_RTOL * mine.norm())


def check_no_unmerged_lora(model: nn.Module, what: str) -> None:
    """Refuse to write ``what`` from a model that holds PEFT (LoRA) layers not yet merged: their tensors go under
    PEFT's own names (``q_proj.base_layer.weight``, ``q_proj.lora_A.default.weight``), which neither
    :func:`plug_in` nor ``from_pretrained`` reads."""
    layers = [name for name, m in model.named_modules() if type(m).__module__.startswith("peft.tuners")]
    if layers:
        raise PackageError(
            f"cannot write {what}: the model holds {len(layers)} unmerged PEFT layers ({layers[0]}, ...); merge them "
            "into the adapter first (offsite_kernels.workflow.methods.export(emu), or PEFT's merge_and_unload())"
        )


def save_adapter(emu: OffsiteModel, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapter of ``emu`` to the directory ``path`` atomically."""
    check_no_unmerged_lora(emu.model, "an adapter")
    tensors = emu.adapter_state_dict()
    manifest = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model_type": emu.config.model_type,
        "blocks": emu.family.blocks,
        "n_layers": emu.layout.n_layers,
        "layout": emu.layout.to_dict(),
        "architecture": architecture_of(emu.config),
        "embedding_probe": embedding_probe(emu.model, emu.family),
        "tensors": sorted(tensors),
    }
    with atomic_output_dir(path, overwrite) as tmp:
        save_tensors(tmp / ADAPTER_FILE, tensors, metadata={"format": ADAPTER_FORMAT})
        write_json(tmp / MANIFEST_FILE, manifest)
    return Path(path)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory; returns ``(manifest, tensors)``."""
    path = Path(path)
    what = "adapter"
    if not path.is_dir():
        raise PackageError(f"{what}: {str(path)!r} is not a directory (expected the output of save_adapter / `offsite finetune`)")
    manifest = read_json(path / MANIFEST_FILE, what)
    if manifest.get("format") != ADAPTER_FORMAT:
        raise PackageError(f"{what}: {str(path)!r} is not an adapter (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PackageError(
            f"{what}: {str(path)!r} has format version {version!r}; this library reads up to {FORMAT_VERSION} (upgrade offsite-kernels)"
        )
    expected_types = {"tensors": list, "layout": dict, "architecture": dict, "embedding_probe": list}
    for field, kind in expected_types.items():
        if field in manifest and not isinstance(manifest[field], kind):
            raise PackageError(
                f"{what}: {str(path)!r}: {field!r} in {MANIFEST_FILE} is a {type(manifest[field]).__name__}, "
                f"not a {kind.__name__}; the file is corrupt"
            )
    tensors = load_tensors(path / ADAPTER_FILE, what)
    if sorted(tensors) != sorted(map(str, manifest.get("tensors", []))):
        raise PackageError(f"{what}: tensors in {ADAPTER_FILE} do not match the manifest's list; the directory is corrupt")
    return manifest, tensors


def _check_compatible(model: nn.Module, family: ModelFamily, manifest: dict[str, Any], check_weights: bool) -> Layout:
    model_type = model.config.model_type
    if manifest.get("model_type") != model_type:
        raise AdapterMismatchError(
            f"adapter was trained for a {manifest.get('model_type')!r} model, not this {model_type!r} model"
        )
    n_layers = len(family.get_blocks(model))
    layout = Layout.from_dict(manifest.get("layout", {}))
    if layout.n_layers != n_layers:
        raise AdapterMismatchError(
            f"adapter's layout {layout} is for a {layout.n_layers}-block model; this model has {n_layers} blocks"
        )
    expected, found = manifest.get("architecture", {}), architecture_of(model.config)
    if expected != found:
        diff = {k: (expected.get(k), found.get(k)) for k in set(expected) | set(found) if expected.get(k) != found.get(k)}
        raise AdapterMismatchError(f"adapter's architecture differs from this model's (adapter, model): {diff}")
    if check_weights and not probe_matches(manifest.get("embedding_probe", []), model, family):
        raise AdapterMismatchError(
            "adapter comes from a model with other weights (its embedding probe does not match this model's); "
            "plug it into the model its emulator was made from, or pass check_weights=False to force it"
        )
    return layout


def _expected_state(block: nn.Module, hidden: int, bottleneck: int | None) -> dict[str, torch.Tensor]:
    """The block's state dict, plus the bottleneck's (on the meta device) if the adapter brings one."""
    state = dict(block.state_dict())
    if bottleneck is not None and not hasattr(block, BOTTLENECK_ATTR):
        extra = Bottleneck(hidden, bottleneck, device="meta").state_dict()
        state.update({f"{BOTTLENECK_ATTR}.{k}": v for k, v in extra.items()})
    return state


def _split_and_check(
    tensors: dict[str, torch.Tensor],
    family: ModelFamily,
    layout: Layout,
    blocks: nn.ModuleList,
    positions: dict[int, int],
    hidden: int,
) -> dict[int, dict[str, torch.Tensor]]:
    """Group adapter tensors by block and check names and shapes against ``blocks`` (nothing changes).

    ``positions`` maps a source block index to its position in ``blocks``.
    """
    per_block: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layout.adapter_indices}
    prefix = family.blocks + "."
    for name, tensor in tensors.items():
        index_text, _, rest = name[len(prefix) :].partition(".") if name.startswith(prefix) else ("", "", "")
        if not index_text.isdigit() or int(index_text) not in per_block:
            raise AdapterMismatchError(f"adapter tensor {name!r} does not belong to an adapter block of layout {layout}")
        per_block[int(index_text)][rest] = tensor
    size = bottleneck_size(tensors)
    for index, sub in per_block.items():
        target = _expected_state(blocks[positions[index]], hidden, size)
        if sorted(sub) != sorted(target):
            missing, extra = sorted(set(target) - set(sub)), sorted(set(sub) - set(target))
            raise AdapterMismatchError(
                f"adapter block {index} does not match the model's block: missing {missing}, unexpected {extra}"
            )
        for key, tensor in sub.items():
            if tensor.shape != target[key].shape:
                raise AdapterMismatchError(
                    f"adapter tensor {prefix}{index}.{key} has shape {tuple(tensor.shape)}, the model's has {tuple(target[key].shape)}"
                )
    return per_block


def _load_blocks(
    per_block: dict[int, dict[str, torch.Tensor]], blocks: nn.ModuleList, positions: dict[int, int], hidden: int
) -> None:
    """Copy checked adapter tensors into ``blocks``, adding the bottleneck modules they bring."""
    size = bottleneck_size({k: v for sub in per_block.values() for k, v in sub.items()})
    with torch.no_grad():
        for index, sub in per_block.items():
            block = blocks[positions[index]]
            if size is not None:
                install_bottleneck(block, hidden, size)
            block.load_state_dict(sub, strict=True)


def plug_in(model: nn.Module, adapter_path: str | os.PathLike, inplace: bool = True, check_weights: bool = True) -> nn.Module:
    """Put a trained adapter into the full Hugging Face model and return the model.

    Every check (model type, layout, architecture, tensor names and shapes, embedding probe)
    runs before any weight changes. With ``inplace=False`` the model is copied first.
    """
    from .offsite_model import OffsiteModel

    if isinstance(model, OffsiteModel):
        raise UnsupportedModelError(
            "plug_in takes the full model the emulator was made from, not an OffsiteModel; "
            "to put an adapter back into an emulator use its load_adapter()"
        )
    family = get_family(model)
    per_block, identity = _checked_for_model(model, family, adapter_path, check_weights)
    if not inplace:
        model = copy.deepcopy(model)
    _load_blocks(per_block, family.get_blocks(model), identity, model.config.hidden_size)
    return model


def _checked_for_model(
    model: nn.Module, family: ModelFamily, adapter_path: str | os.PathLike, check_weights: bool
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, int]]:
    manifest, tensors = read_adapter(adapter_path)
    layout = _check_compatible(model, family, manifest, check_weights)
    identity = {i: i for i in layout.adapter_indices}
    return _split_and_check(tensors, family, layout, family.get_blocks(model), identity, model.config.hidden_size), identity


def check_adapter(
    adapter_path: str | os.PathLike,
    model: nn.Module | None = None,
    emulator: OffsiteModel | None = None,
    check_weights: bool = True,
) -> None:
    """Every check ``plug_in(model, adapter_path)`` and ``emulator.load_adapter(adapter_path)`` make, changing
    nothing: for a run that evaluates first and plugs in later, to fail before the work."""
    if model is not None:
        _checked_for_model(model, get_family(model), adapter_path, check_weights)
    if emulator is not None:
        _checked_for_emulator(emulator, adapter_path, check_weights)


def load_adapter(emu: OffsiteModel, adapter_path: str | os.PathLike, check_weights: bool = True) -> OffsiteModel:
    """Put an adapter back into an emulator of the same layout (to evaluate "emulator fine-tuned")."""
    per_block, positions = _checked_for_emulator(emu, adapter_path, check_weights)
    _load_blocks(per_block, emu.blocks, positions, emu.config.hidden_size)
    return emu


def _checked_for_emulator(
    emu: OffsiteModel, adapter_path: str | os.PathLike, check_weights: bool
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, int]]:
    manifest, tensors = read_adapter(adapter_path)
    if manifest.get("model_type") != emu.config.model_type:
        raise AdapterMismatchError(
            f"adapter was trained for a {manifest.get('model_type')!r} model, not a {emu.config.model_type!r} emulator"
        )
    layout = Layout.from_dict(manifest.get("layout", {}))
    if layout != emu.layout:
        raise AdapterMismatchError(
            f"adapter's layout {layout} {list(layout.emulator)} differs from the emulator's {emu.layout} {list(emu.layout.emulator)}"
        )
    if check_weights and not probe_matches(manifest.get("embedding_probe", []), emu.model, emu.family):
        raise AdapterMismatchError("adapter comes from an emulator of another model (embedding probe differs)")
    positions = dict(zip(layout.adapter_indices, layout.adapter_positions(), strict=True))
    return _split_and_check(tensors, emu.family, layout, emu.blocks, positions, emu.config.hidden_size), positions
