"""The models ``offsite bench`` runs: the paper's, by config only (random weights, no hub).

Each :class:`BenchModel` holds the Hugging Face config of the real model, the adapter layout the
paper (or the issue) uses with it, the paper's efficiency figures where the paper has them, and a
scaled-down config of the same family and depth for measuring speed on a CPU: hidden size, heads,
MLP width and vocabulary shrink, the number of blocks and the layout stay, so FT still runs every
block and OT still runs the same share of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .methods import BenchError

# Paper, efficiency table (one GPU, bf16 mixed precision, batch 1, block 512): tokens/s, MB
PaperFigures = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class BenchModel:
    name: str
    model_type: str
    config: dict[str, Any]
    layout: str
    scaled: dict[str, Any]
    paper: PaperFigures = field(default_factory=dict)

    def hf_config(self, scaled: bool = False) -> Any:
        """The Hugging Face config (full size, or the scaled-down one), with dropout off."""
        from transformers import AutoConfig

        kwargs = {**self.config, **(self.scaled if scaled else {})}
        config = AutoConfig.for_model(self.model_type, **kwargs)
        for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout", "attention_dropout", "activation_dropout"):
            if hasattr(config, key):
                setattr(config, key, 0.0)
        config._attn_implementation = "sdpa"
        return config


BENCH_MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in (
        BenchModel(
            name="opt-1.3b",
            model_type="opt",
            config=dict(
                hidden_size=2048,
                num_hidden_layers=24,
                num_attention_heads=32,
                ffn_dim=8192,
                vocab_size=50272,
                max_position_embeddings=2048,
                word_embed_proj_dim=2048,
                do_layer_norm_before=True,
            ),
            layout="2-8-2",
            scaled=dict(hidden_size=128, num_attention_heads=4, ffn_dim=512, word_embed_proj_dim=128, vocab_size=4096),
            paper={"ft": (1316, 30458), "ft+lora": (3379, 12470), "ot": (5207, 9336), "ot+lora": (8525, 6192)},
        ),
        BenchModel(
            name="gpt2-xl",
            model_type="gpt2",
            config=dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257),
            layout="2-16-2",
            scaled=dict(n_embd=128, n_head=4, vocab_size=4096),
            paper={"ft": (957, 39922), "ft+lora": (1992, 17113), "ot": (4905, 8966), "ot+lora": (6257, 7155)},
        ),
        BenchModel(
            name="llama-2-7b",
            model_type="llama",
            config=dict(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
            ),
            layout="2-18-2",
            scaled=dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4, vocab_size=4096),
        ),
        BenchModel(
            name="opt-6.7b",
            model_type="opt",
            config=dict(
                hidden_size=4096,
                num_hidden_layers=32,
                num_attention_heads=32,
                ffn_dim=16384,
                vocab_size=50272,
                max_position_embeddings=2048,
                word_embed_proj_dim=4096,
                do_layer_norm_before=True,
            ),
            layout="2-18-2",
            scaled=dict(hidden_size=128, num_attention_heads=4, ffn_dim=512, word_embed_proj_dim=128, vocab_size=4096),
        ),
    )
}

PAPER_MODELS = ("opt-1.3b", "gpt2-xl")


def get_bench_model(name: str) -> BenchModel:
    """The benchmark model called ``name`` (case-insensitive)."""
    try:
        return BENCH_MODELS[name.strip().lower()]
    except KeyError:
        raise BenchError(f"unknown benchmark model {name!r}; choose from {', '.join(BENCH_MODELS)}") from None
