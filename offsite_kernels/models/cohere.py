"""Cohere (Command R, Aya) and Cohere 2 (Command R7B, Command A: sliding-window layers): one bias-free LayerNorm
feeding attention and a SwiGLU MLP in parallel, rotary positions, tied embeddings and a logit scale (applied by the
fused head, ``emulator.fused_loss``)."""

from dataclasses import replace

from .llama import LLAMA
from .registry import register_family

COHERE = register_family(replace(LLAMA, name="Cohere", model_types=("cohere",), logit_multiplier="logit_scale"))
COHERE2 = register_family(replace(COHERE, name="Cohere 2", model_types=("cohere2",)))
