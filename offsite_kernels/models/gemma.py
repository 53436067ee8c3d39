"""Gemma: RMSNorm with a ``1 + weight`` scale, rotary positions, GeGLU MLP (tanh GELU), scaled and tied embeddings.

Its modules sit where the Llama family's do; what differs (the norm's offset, the gated activation) is read from
the modules and the config when fast blocks are swapped in.
"""

from dataclasses import replace

from .llama import LLAMA
from .registry import register_family

GEMMA = register_family(replace(LLAMA, name="Gemma", model_types=("gemma",)))
# Gemma 2 and Gemma 3 (text): the same places, four norms per block, the activation's name in ``hidden_activation``;
# Gemma 2 soft-caps attention scores, which SDPA cannot do, so its attention stays as Hugging Face runs it
GEMMA2 = register_family(
    replace(LLAMA, name="Gemma 2", model_types=("gemma2",), activation_config="hidden_activation", sdpa_attention=False)
)
GEMMA3 = register_family(replace(LLAMA, name="Gemma 3", model_types=("gemma3_text",), activation_config="hidden_activation"))
