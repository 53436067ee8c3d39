"""GPTBigCode (StarCoder, SantaCoder): GPT-2's layout with ``nn.Linear`` projections and multi-query attention
(one key-value head in the fused ``c_attn``)."""

from .family import ModelFamily
from .registry import register_family

GPT_BIGCODE = register_family(
    ModelFamily(
        name="GPTBigCode",
        model_types=("gpt_bigcode",),
        blocks="transformer.h",
        token_embedding="transformer.wte",
        position_embedding="transformer.wpe",
        final_norm="transformer.ln_f",
        lora_targets=("c_attn",),
        activation_modules=("mlp.act",),
        activation_config="activation_function",
    )
)
