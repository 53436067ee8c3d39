"""Mixtures of experts in the Llama family's places: Mixtral, Qwen MoE (Qwen1.5-MoE, Qwen2-MoE, Qwen3-MoE), OLMoE.

Each sparse block routes every token to its top-k experts; the experts are one Hugging Face module holding 3-D
weights (``ModelFamily.experts``). Qwen MoE's shared expert is a gated MLP (``gated_mlp``), and its config may
name dense blocks by index (``dense_blocks_config``).
"""

from dataclasses import replace

from .llama import LLAMA
from .registry import register_family

# ``gated_mlp`` is fused where a block holds a dense MLP there (Qwen MoE's ``mlp_only_layers``)
_MOE = replace(LLAMA, experts="mlp.experts")
MIXTRAL = register_family(replace(_MOE, name="Mixtral", model_types=("mixtral",)))
QWEN_MOE = register_family(
    replace(
        _MOE,
        name="Qwen MoE",
        model_types=("qwen2_moe", "qwen3_moe"),
        shared_expert="mlp.shared_expert",
        dense_blocks_config=("mlp_only_layers", "decoder_sparse_step"),
    )
)
OLMOE = register_family(replace(_MOE, name="OLMoE", model_types=("olmoe",)))
