"""The Llama family: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.

Llama, Mistral, Qwen2 and Qwen3 share one module layout in Hugging Face transformers.
"""

from .family import ModelFamily
from .registry import register_family

LLAMA = register_family(
    ModelFamily(
        name="Llama family",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks="model.layers",
        token_embedding="model.embed_tokens",
        position_embedding=None,
        final_norm="model.norm",
        gated_mlp="mlp",
        activation_config="hidden_act",
    )
)
