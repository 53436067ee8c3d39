"""BLOOM: ALiBi attention (no position embedding), an embedding LayerNorm, GELU MLP."""

from .family import ModelFamily
from .registry import register_family

BLOOM = register_family(
    ModelFamily(
        name="BLOOM",
        model_types=("bloom",),
        blocks="transformer.h",
        token_embedding="transformer.word_embeddings",
        position_embedding=None,
        lora_targets=("query_key_value",),
        final_norm="transformer.ln_f",
        activation_modules=("mlp.gelu_impl",),
        activation_default="gelu_pytorch_tanh",  # BloomGelu: the tanh form
        # Hugging Face runs BLOOM's attention in eager PyTorch only; fast blocks run it through SDPA
        # with the library's own module (ALiBi as an additive bias), not through the config
        sdpa_attention=False,
        alibi_attention="self_attention",
    )
)
