"""Model families: where each Hugging Face causal LM keeps its blocks, embeddings, norm and head."""

from . import (  # noqa: F401  (each registers its family)
    bloom,
    cohere,
    falcon,
    gemma,
    gpt2,
    gpt_bigcode,
    gpt_neox,
    gptj,
    granite,
    llama,
    moe,
    olmo2,
    opt,
    phi,
    phi3,
    stablelm,
    starcoder2,
)
from .family import ModelFamily, find_submodule
from .registry import get_family, register_family, supported_model_types

__all__ = ["ModelFamily", "find_submodule", "get_family", "register_family", "supported_model_types"]
