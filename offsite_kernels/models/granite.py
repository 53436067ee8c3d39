"""Granite (IBM Granite 3.x dense and MoE): the Llama family's modules with scalar multipliers on the embeddings, the
attention scores, the residual branches and the logits. The first three live in Hugging Face's forward methods,
which the library does not replace; the logits' divisor is applied by the fused head (``emulator.fused_loss``).
Granite MoE's blocks hold a mixture of experts (``block_sparse_moe.experts``) and no dense MLP."""

from dataclasses import replace

from .llama import LLAMA
from .registry import register_family

GRANITE = register_family(replace(LLAMA, name="Granite", model_types=("granite",), logit_divisor="logits_scaling"))
GRANITE_MOE = register_family(
    replace(GRANITE, name="Granite MoE", model_types=("granitemoe",), gated_mlp=None, experts="block_sparse_moe.experts")
)
