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
        # Hugging Face's "sdpa" BLOOM attention gives other input gradients than its eager one with
        # the same loss (transformers 5.24, CPU, every SDPA backend); unresolved: keep eager
        sdpa_attention=False,
    )
)
