"""Model families: where each Hugging Face causal LM keeps its blocks, embeddings, norm and head."""

from . import bloom, falcon, gemma, gpt2, gpt_neox, gptj, llama, opt, phi, phi3  # noqa: F401  (each registers its family)
from .family import ModelFamily
from .registry import get_family, register_family, supported_model_types

__all__ = ["ModelFamily", "get_family", "register_family", "supported_model_types"]
