"""StarCoder 2: Llama's module layout with biased LayerNorms, a GELU MLP (``c_fc``, ``c_proj``), grouped-query
attention with rotary positions and an optional sliding window."""

from .family import ModelFamily
from .registry import register_family

STARCODER2 = register_family(
    ModelFamily(
        name="StarCoder 2",
        model_types=("starcoder2",),
        blocks="model.layers",
        token_embedding="model.embed_tokens",
        position_embedding=None,
        final_norm="model.norm",
        activation_modules=("mlp.act",),
        activation_config="hidden_act",
    )
)
