"""Mixtures of experts in the Llama family's places: Mixtral, Qwen MoE (Qwen1.5-MoE, Qwen2-MoE, Qwen3-MoE), OLMoE,
DeepSeek-V2 and V3 (their multi-head latent attention stays Hugging Face's, run through SDPA), GLM-4.5
and dots.llm1 (DeepSeek's mixture under a standard attention).

Each sparse block routes every token to its top-k experts; the experts are one Hugging Face module holding 3-D
weights (``ModelFamily.experts``). Qwen MoE's shared expert is a gated MLP (``gated_mlp``), and its config may
name dense blocks by index (``dense_blocks_config``); DeepSeek's shared experts are one gated MLP and its
leading blocks are dense by count (``first_k_dense_replace``).
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
DEEPSEEK = register_family(
    replace(
        _MOE,
        name="DeepSeek-V2/V3",
        model_types=("deepseek_v2", "deepseek_v3"),
        shared_expert="mlp.shared_experts",
        dense_blocks_config=("first_k_dense_replace",),
        # query and value as the LoRA paper picks them: the latent attention's up-projections (q_proj where the
        # queries have no low rank), whose kv_b_proj makes keys and values
        lora_targets=("q_proj", "q_b_proj", "kv_b_proj"),
    )
)
# GLM-4.5/4.6 and dots.llm1: DeepSeek's mixture (shared experts, leading dense blocks by count) under a standard
# grouped-query attention (GLM: partial rotary, biases on q/k/v, optional query/key norms; dots: query/key norms)
GLM4_MOE = register_family(
    replace(DEEPSEEK, name="GLM-4.5 MoE, dots.llm1", model_types=("glm4_moe", "dots1"), lora_targets=("q_proj", "v_proj"))
)
