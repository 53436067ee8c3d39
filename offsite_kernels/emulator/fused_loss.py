"""The causal-LM loss of a Hugging Face model through the fused frozen head.

The wrapped model's base (``model.base_model``: the blocks and the final norm) runs as usual;
its last hidden states go to :func:`~offsite_kernels.ops.fused_linear_cross_entropy` with the
frozen LM head's weight, so the ``[tokens, vocab]`` logits are never materialised. Same loss as
the model's own head and ``ForCausalLMLoss`` (label shifting, ``ignore_index`` -100, mean over
counted tokens, or a sum divided by ``num_items_in_batch`` as HF Trainer passes it). A head that
scales its logits (Cohere, Granite) has them scaled in each chunk, rounded as the model rounds them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import ModelFamily
from ..ops.fused_head import fused_linear_cross_entropy

# keyword arguments the base model takes as the causal LM does; any other one (logits_to_keep, a
# custom loss, ...) sends the call through the wrapped model's own head
_PASSED_THROUGH = frozenset(
    {"use_cache", "output_hidden_states", "output_attentions", "position_ids", "past_key_values", "cache", "cache_position"}
)
_HANDLED = frozenset({"num_items_in_batch", "return_dict", "inputs_embeds"})
# config attributes that make a head more than a linear layer (scaling or capping the logits): the model's own head
# computes them, except a scale its family declares (``ModelFamily.logit_multiplier``, ``logit_divisor``)
_LOGIT_TRANSFORMS = ("logit_scale", "final_logit_softcapping", "logits_scaling", "output_multiplier_scale")


def fused_head_supported(model: nn.Module, family: ModelFamily, kwargs: dict[str, Any]) -> bool:
    """Whether the fused head computes exactly the loss ``model`` would for this call."""
    head = family.get_lm_head(model)
    if not isinstance(head, nn.Linear) or head.weight.requires_grad:
        return False  # a trainable head needs its weight gradient: the model's own path
    if head.bias is not None and head.bias.requires_grad:
        return False
    declared = (family.logit_multiplier, family.logit_divisor)
    if any(name not in declared and getattr(model.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    if kwargs.get("output_router_logits", getattr(model.config, "output_router_logits", False)):
        return False  # a mixture of experts' load-balancing loss joins the loss in the model's own head
    return_dict = kwargs.get("return_dict", getattr(model.config, "return_dict", True))
    return set(kwargs) <= _PASSED_THROUGH | _HANDLED and return_dict is not False


def fused_head_loss(
    model: nn.Module,
    family: ModelFamily,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> Any:
    """``model``'s causal-LM output for ``labels``, with the loss from the fused head and no logits
    (``chunk_size`` tokens per chunk; by default a chunk's logits stay under a fixed budget)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("return_dict", None)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out[0]
    head = family.get_lm_head(model)
    weight, bias = head.weight, head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the head's matmul in the autocast dtype, as nn.Linear would run it
        dtype = torch.get_autocast_dtype(device_type)
        hidden = hidden.to(dtype)
    if hidden.device != weight.device:  # a head placed on another device (device_map): go to it, as HF does
        hidden = hidden.to(weight.device)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    reduction = "sum" if num_items is not None else "mean"
    with torch.autocast(device_type, enabled=False):
        loss = fused_linear_cross_entropy(
            hidden,
            weight,
            labels.to(hidden.device),
            bias,
            reduction=reduction,
            chunk_size=chunk_size,
            logit_scale=family.logit_scale(model.config),
        )
    if num_items is not None:
        loss = loss / num_items
    # the cache field is ``cache`` from transformers 5.2x on (``past_key_values`` is deprecated there)
    cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
        **{cache_field: out.get(cache_field)},
    )
