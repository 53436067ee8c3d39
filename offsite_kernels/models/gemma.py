"""Gemma: RMSNorm with a ``1 + weight`` scale, rotary positions, GeGLU MLP (tanh GELU), scaled and tied embeddings."""

from .family import ModelFamily
from .registry import register_family

GEMMA = register_family(
    ModelFamily(
        name="Gemma",
        model_types=("gemma",),
        blocks="model.layers",
        token_embedding="model.embed_tokens",
        position_embedding=None,
        final_norm="model.norm",
        gated_mlp="mlp",
        activation_config="hidden_act",
    )
)
