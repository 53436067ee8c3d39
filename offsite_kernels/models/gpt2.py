"""GPT-2: learned positions, pre-LayerNorm blocks, Conv1D projections, tied head."""

from .family import ModelFamily
from .registry import register_family

GPT2 = register_family(
    ModelFamily(
        name="GPT-2",
        model_types=("gpt2",),
        blocks="transformer.h",
        token_embedding="transformer.wte",
        position_embedding="transformer.wpe",
        lora_targets=("c_attn",),
        final_norm="transformer.ln_f",
        activation_modules=("mlp.act",),
        activation_config="activation_function",
        depth_scaled_attention=("attn", "scale_attn_by_inverse_layer_idx"),  # Stanford CRFM's GPT-2 sets it
    )
)
