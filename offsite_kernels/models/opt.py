"""OPT: learned positions (offset 2), pre-LayerNorm decoder layers, ReLU MLP."""

from .family import ModelFamily
from .registry import register_family

OPT = register_family(
    ModelFamily(
        name="OPT",
        model_types=("opt",),
        blocks="model.decoder.layers",
        token_embedding="model.decoder.embed_tokens",
        position_embedding="model.decoder.embed_positions",
        final_norm="model.decoder.final_layer_norm",
        activation_modules=("activation_fn",),
        activation_config="activation_function",
    )
)
