"""Low-bit emulator: swap every linear of the emulator blocks for a :class:`FrozenLinear`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import PackageError
from ..nn.frozen_linear import FrozenLinear
from ..quant.formats import check_format, check_stored
from ..quant.weight import COMPUTE_DTYPES, QuantizedWeight

_DTYPES = {str(d): d for d in COMPUTE_DTYPES}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def quantize_linears_(block: nn.Module, bits: int | str | None, group_size: int = 128) -> dict[str, dict[str, Any]]:
    """Replace each ``nn.Linear``/``Conv1D`` of ``block`` with a ``FrozenLinear``; returns a record per module."""
    check_format(bits, group_size)
    records: dict[str, dict[str, Any]] = {}
    for name, module in list(block.named_modules()):
        if _is_linear(module):
            frozen = FrozenLinear.from_linear(module, bits=bits, group_size=group_size)
            _replace(block, name, frozen)
            records[name] = {
                "format": frozen.format,
                "group_size": frozen.group_size,
                "shape": [frozen.out_features, frozen.in_features],
                "dtype": str(frozen.weight_dtype),
                "bias": frozen.bias is not None,
            }
    return records


def restore_quantized_linears_(
    block: nn.Module, records: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor], prefix: str
) -> None:
    """Rebuild the ``FrozenLinear`` modules of ``block`` from stored tensors named ``prefix + name + '.weight_*'``."""
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
