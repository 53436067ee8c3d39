"""GPT-NeoX (Pythia): partial rotary positions, parallel attention and MLP residuals, GELU MLP."""

from .family import ModelFamily
from .registry import register_family

GPT_NEOX = register_family(
    ModelFamily(
        name="GPT-NeoX",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        token_embedding="gpt_neox.embed_in",
        position_embedding=None,
        final_norm="gpt_neox.final_layer_norm",
        lora_targets=("query_key_value",),
        activation_modules=("mlp.act",),
        activation_config="hidden_act",
    )
)
