"""Phi (Phi-1, Phi-1.5, Phi-2): one LayerNorm feeding attention and MLP in parallel, partial rotary, GELU MLP."""

from .family import ModelFamily
from .registry import register_family

PHI = register_family(
    ModelFamily(
        name="Phi",
        model_types=("phi",),
        blocks="model.layers",
        token_embedding="model.embed_tokens",
        position_embedding=None,
        final_norm="model.final_layernorm",
        activation_modules=("mlp.activation_fn",),
        activation_config="hidden_act",
    )
)
