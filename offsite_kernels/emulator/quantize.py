"""Low-bit emulator: swap every linear of the emulator blocks for a :class:`FrozenLinear` (a mixture of experts'
experts module for :class:`FrozenExperts` holding each projection of every expert stacked in one FrozenLinear)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..errors import LayoutError, PackageError
from ..models import find_submodule
from ..nn.experts import FrozenExperts
from ..nn.frozen_linear import FrozenLinear
from ..ops.activation import activation_by_name
from ..quant.formats import check_format, check_stored
from ..quant.weight import COMPUTE_DTYPES, QuantizedWeight

_DTYPES = {str(d): d for d in COMPUTE_DTYPES}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def check_experts_activation(block: nn.Module, path: str | None, activation: str | None) -> None:
    """Raise :class:`LayoutError` where the experts at ``path`` in ``block`` compute another activation than the fused
    gated one of ``activation`` (the name low-bit experts read from the config), on a sample in float32."""
    module = find_submodule(block, path)
    act = getattr(module, "act_fn", None)
    if module is None or not isinstance(act, nn.Module) or torch._C._len_torch_dispatch_stack():
        return  # no experts here, or fake tensors (the benchmark's accounting): nothing to run
    fused = None
    with contextlib.suppress(ValueError):  # a name the library does not know: refused below
        fused = activation_by_name(activation) if activation is not None else None
    if fused is None or not fused.has_gated:
        raise LayoutError(
            f"low-bit experts run a fused gated activation, and {activation!r} has none; build the emulator dense (bits=None)"
        )
    x = torch.linspace(-8.0, 8.0, 161, dtype=torch.float32)
    if not torch.allclose(fused(x), act(x), rtol=1e-4, atol=1e-6):
        raise LayoutError(
            f"the experts' activation ({type(act).__name__}) is not the config's {activation!r}: low-bit experts would "
            "compute other math; build the emulator dense (bits=None) and report the model type"
        )


def quantize_linears_(
    block: nn.Module,
    bits: int | str | None,
    group_size: int = 128,
    experts: str | None = None,
    activation: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Replace each ``nn.Linear``/``Conv1D`` of ``block`` with a ``FrozenLinear``, and the experts module at ``experts``
    (where the block has one) with low-bit :class:`FrozenExperts` of gated ``activation``; returns a record per
    ``FrozenLinear``."""
    check_format(bits, group_size)
    module = find_submodule(block, experts)
    if module is not None:
        if activation is None:
            raise ValueError(f"the experts at {experts!r} need their activation's name to be stored low-bit")
        _replace(block, experts, FrozenExperts.from_module(module, activation, bits=bits, group_size=group_size))
    for name, module in list(block.named_modules()):
        if _is_linear(module):
            _replace(block, name, FrozenLinear.from_linear(module, bits=bits, group_size=group_size))
    return {
        name: {
            "format": frozen.format,
            "group_size": frozen.group_size,
            "shape": [frozen.out_features, frozen.in_features],
            "dtype": str(frozen.weight_dtype),
            "bias": frozen.bias is not None,
        }
        for name, frozen in block.named_modules()
        if isinstance(frozen, FrozenLinear)
    }


def restore_quantized_linears_(
    block: nn.Module,
    records: dict[str, dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    prefix: str,
    experts: str | None = None,
    activation: str | None = None,
) -> None:
    """Rebuild the ``FrozenLinear`` modules of ``block`` from stored tensors named ``prefix + name + '.weight_*'``
    (inside low-bit :class:`FrozenExperts` at ``experts`` where the records name some there)."""
    module = find_submodule(block, experts)
    if module is not None and any(name.startswith(f"{experts}.") for name in records):
        if activation is None or not hasattr(module, "gate_up_proj"):
            raise PackageError(f"emulator package: low-bit experts at {prefix}{experts} do not fit this model's block")
        _replace(block, experts, FrozenExperts.low_bit_skeleton(module, activation))
    for name, rec in records.items():
        key = f"{prefix}{name}."
        try:
            target = block.get_submodule(name)
        except AttributeError:
            target = None
        if not (_is_linear(target) or isinstance(target, FrozenLinear)):
            raise PackageError(f"emulator package: quantized module {key[:-1]!r} is not a linear layer of its block")
        if not isinstance(rec, dict) or rec.get("dtype") not in _DTYPES:
            dtype = rec.get("dtype") if isinstance(rec, dict) else None
            raise PackageError(
                f"emulator package: quantized module {key[:-1]!r} has dtype {dtype!r}; expected one of {sorted(_DTYPES)}"
            )
        try:
            weight = QuantizedWeight(
                rec["format"],
                tensors[key + "weight_data"],
                tensors.get(key + "weight_scales"),
                tensors.get(key + "weight_zeros"),
                int(rec["group_size"]),
                (int(rec["shape"][0]), int(rec["shape"][1])),
                _DTYPES[rec["dtype"]],
            )
            bias = tensors[key + "bias"] if rec["bias"] else None
            check_stored(weight)
        except KeyError as exc:
            raise PackageError(f"emulator package: quantized module {key[:-1]!r} is missing tensor or field {exc}") from exc
        except (TypeError, ValueError, IndexError) as exc:  # a malformed record, or tensors that do not fit it
            raise PackageError(f"emulator package: quantized module {key[:-1]!r} does not fit its record: {exc}") from exc
        if bias is not None and tuple(bias.shape) != (weight.out_features,):
            raise PackageError(
                f"emulator package: quantized module {key[:-1]!r} has a bias of shape {list(bias.shape)}; "
                f"its weight has {weight.out_features} outputs"
            )
        _replace(block, name, FrozenLinear(weight, bias))
    placeholders = [name for name, p in block.named_parameters() if p.device.type == "meta"]
    if placeholders:
        raise PackageError(f"emulator package: {prefix}{placeholders[0].rsplit('.', 1)[0]} has no stored low-bit weight")
