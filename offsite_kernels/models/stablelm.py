"""StableLM (StableLM 2, StableLM-3B-4E1T, StableCode): the Llama family's places with LayerNorms, partial rotary
positions, optional per-head LayerNorms on queries and keys, and an optional parallel residual."""

from dataclasses import replace

from .llama import LLAMA
from .registry import register_family

STABLELM = register_family(replace(LLAMA, name="StableLM", model_types=("stablelm",)))
