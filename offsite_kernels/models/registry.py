"""Registry of supported model families, keyed by ``config.model_type``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .family import ModelFamily

_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family`` for each of its ``model_types``; returns it."""
    for model_type in family.model_types:
        if model_type in _FAMILIES:
            raise ValueError(f"model_type {model_type!r} is already registered to {_FAMILIES[model_type].name}")
        _FAMILIES[model_type] = family
    return family


def supported_model_types() -> list[str]:
    """Sorted list of every ``config.model_type`` the library supports."""
    return sorted(_FAMILIES)


def get_family(model_or_config: Any) -> ModelFamily:
    """Return the :class:`ModelFamily` of a Hugging Face model or config.

    Raises :class:`UnsupportedModelError` listing the supported types otherwise.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None and isinstance(model_or_config, nn.Module):
        raise UnsupportedModelError(
            f"a {type(model_or_config).__name__} is not a Hugging Face model (it has no config); "
            "pass the whole causal LM (the *ForCausalLM model)"
        )
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported types: {', '.join(supported_model_types())}. "
            "A new family needs one small file in offsite_kernels/models/ registering where its blocks, "
            "embeddings, final norm and LM head live"
        )
    return _FAMILIES[model_type]
