"""GPT-J: one LayerNorm feeding attention and MLP in parallel, interleaved partial rotary, GELU MLP."""

from .family import ModelFamily
from .registry import register_family

GPTJ = register_family(
    ModelFamily(
        name="GPT-J",
        model_types=("gptj",),
        blocks="transformer.h",
        token_embedding="transformer.wte",
        position_embedding=None,
        position_table_config="n_positions",  # rotary sin/cos precomputed for this many positions
        final_norm="transformer.ln_f",
        activation_modules=("mlp.act",),
        activation_config="activation_function",
    )
)
