"""Gemma: RMSNorm with a ``1 + weight`` scale, rotary positions, GeGLU MLP (tanh GELU), scaled and tied embeddings.

Its modules sit where the Llama family's do; what differs (the norm's offset, the gated activation) is read from
the modules and the config when fast blocks are swapped in.
"""

from dataclasses import replace

from .llama import LLAMA
from .registry import register_family

GEMMA = register_family(replace(LLAMA, name="Gemma", model_types=("gemma",)))
