"""Phi-3 (Phi-3, Phi-3.5, Phi-4-mini): Llama's layout with fused projections (``qkv_proj``, ``gate_up_proj``)."""

from dataclasses import replace

from .llama import LLAMA
from .registry import register_family

PHI3 = register_family(replace(LLAMA, name="Phi-3", model_types=("phi3",), lora_targets=("qkv_proj",), gated_mlp_fused=True))
