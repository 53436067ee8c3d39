"""Tiny random models of every supported family, built from configs (no hub access).

Used by the tests, the demo and the scaled-down benchmarks. Sizes are small but odd enough to
catch shape mistakes: a vocabulary that is not a power of two, grouped-query attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TINY_VOCAB = 97

_COMMON_LLAMA = dict(
    hidden_size=48,
    intermediate_size=80,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "cohere": dict(_COMMON_LLAMA, tie_word_embeddings=True, use_qk_norm=True, logit_scale=0.25),
    "cohere2": dict(_COMMON_LLAMA, tie_word_embeddings=True, sliding_window=5, sliding_window_pattern=2, logit_scale=0.25),
    "gpt2": dict(n_embd=48, n_head=4, n_inner=80, n_positions=128),
    "gpt_bigcode": dict(n_embd=48, n_head=4, n_inner=80, n_positions=128, multi_query=True),
    "opt": dict(hidden_size=48, num_attention_heads=4, ffn_dim=80, max_position_embeddings=128, word_embed_proj_dim=48),
    "bloom": dict(hidden_size=48, n_head=4),
    "gemma": dict(_COMMON_LLAMA, head_dim=12, tie_word_embeddings=True),
    "gemma2": dict(_COMMON_LLAMA, head_dim=12, tie_word_embeddings=True, sliding_window=5),
    "gemma3_text": dict(_COMMON_LLAMA, head_dim=12, tie_word_embeddings=True, sliding_window=5, sliding_window_pattern=2),
    "deepseek_v2": dict(  # DeepSeek-V2-Lite's shape: queries without a low rank
        _COMMON_LLAMA,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=10,
        n_routed_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=2,
        first_k_dense_replace=1,
    ),
    "deepseek_v3": dict(
        _COMMON_LLAMA,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=10,  # not the query/key head size (12)
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=1,
        first_k_dense_replace=2,  # leading dense blocks, which a layer selection must count again
        routed_scaling_factor=2.5,
    ),
    "dots1": dict(
        _COMMON_LLAMA,
        head_dim=12,
        n_routed_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),
    "falcon": dict(hidden_size=48, num_attention_heads=4, new_decoder_architecture=False, multi_query=True),
    "gptj": dict(n_embd=48, n_head=4, n_inner=80, n_positions=128, rotary_dim=6),
    "gpt_neox": dict(hidden_size=48, num_attention_heads=4, intermediate_size=80, max_position_embeddings=128, rotary_pct=0.5),
    "granite": dict(
        _COMMON_LLAMA, embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0
    ),
    "glm4_moe": dict(
        _COMMON_LLAMA,
        head_dim=12,
        partial_rotary_factor=0.5,
        attention_bias=True,
        use_qk_norm=True,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=1,
        first_k_dense_replace=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
    ),
    "granitemoe": dict(
        _COMMON_LLAMA,
        num_local_experts=5,
        num_experts_per_tok=2,
        embedding_multiplier=3.0,
        attention_multiplier=0.2,
        residual_multiplier=0.5,
        logits_scaling=4.0,
    ),
    "llama": dict(_COMMON_LLAMA),
    "mistral": dict(_COMMON_LLAMA, sliding_window=None),
    "phi": dict(
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=80,
        max_position_embeddings=128,
        partial_rotary_factor=0.5,
    ),
    "mixtral": dict(_COMMON_LLAMA, num_local_experts=5, num_experts_per_tok=2),
    "olmo2": dict(_COMMON_LLAMA),
    "olmoe": dict(_COMMON_LLAMA, num_experts=5, num_experts_per_tok=2),
    "olmo3": dict(_COMMON_LLAMA, sliding_window=5),
    "phi3": dict(_COMMON_LLAMA, partial_rotary_factor=0.75),
    "qwen2": dict(_COMMON_LLAMA),
    "qwen2_moe": dict(
        _COMMON_LLAMA,
        num_experts=5,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        mlp_only_layers=[2],  # a dense block among the sparse ones, which a layer selection must keep dense
    ),
    "qwen3": dict(_COMMON_LLAMA, head_dim=12),
    "qwen3_moe": dict(_COMMON_LLAMA, head_dim=12, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24),
    "stablelm": dict(_COMMON_LLAMA, partial_rotary_factor=0.5, qk_layernorm=True, use_qkv_bias=True),
    "starcoder2": dict(_COMMON_LLAMA, sliding_window=5, tie_word_embeddings=True),
}


def tiny_model_types() -> list[str]:
    """The model types that have a tiny test configuration (every supported family)."""
    return sorted(_TINY_CONFIGS)


def tiny_config(model_type: str, n_layers: int = 6, vocab_size: int = TINY_VOCAB, **overrides: Any) -> Any:
    """A small Hugging Face config of ``model_type`` with ``n_layers`` blocks, no dropout."""
    from transformers import AutoConfig

    kwargs = dict(_TINY_CONFIGS[model_type])
    kwargs.update(vocab_size=vocab_size, num_hidden_layers=n_layers, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    for key in (
        "attention_dropout",
        "hidden_dropout",
        "attn_pdrop",
        "resid_pdrop",
        "embd_pdrop",
        "dropout",
        "activation_dropout",
    ):
        kwargs[key] = 0.0
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(
    model_type: str, n_layers: int = 6, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> nn.Module:
    """A tiny random ``*ForCausalLM`` of ``model_type`` in eval mode (weights drawn with ``seed``)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, n_layers=n_layers, **overrides)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


_TINY_CHARS = " \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"


def tiny_tokenizer() -> Any:
    """A character-level tokenizer whose ids fit :data:`TINY_VOCAB` (``<unk>`` 0, ``<eos>`` 1, ``<pad>`` 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for ch in _TINY_CHARS:
        vocab.setdefault(ch, len(vocab))
    assert len(vocab) <= TINY_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
