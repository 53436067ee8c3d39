"""Falcon: fused query-key-value projection (multi-query or grouped), parallel attention and MLP, rotary or ALiBi
positions, GELU MLP."""

from .family import ModelFamily
from .registry import register_family

FALCON = register_family(
    ModelFamily(
        name="Falcon",
        model_types=("falcon",),
        blocks="transformer.h",
        token_embedding="transformer.word_embeddings",
        position_embedding=None,
        final_norm="transformer.ln_f",
        lora_targets=("query_key_value",),
        activation_modules=("mlp.act",),
        activation_config="activation",
    )
)
