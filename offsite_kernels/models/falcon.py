"""Falcon: fused query-key-value projection (multi-query or grouped), parallel attention and MLP, rotary or ALiBi
positions, GELU MLP. Fast blocks are for its rotary form (Falcon-7B/40B/180B); see ``fast_blocks_unsupported``."""

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
        fast_blocks_unsupported=(
            (
                "alibi",
                "with ALiBi, Hugging Face's eager and SDPA attentions disagree (in transformers 5.24 the eager one "
                "adds the ALiBi bias twice, into the scores and again with the mask), so the SDPA attention of fast "
                "blocks would not reproduce the plain emulator",
            ),
        ),
    )
)
