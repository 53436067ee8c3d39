import pytest
from transformers import AutoConfig

import offsite_kernels as ok
from offsite_kernels.errors import UnsupportedModelError


def test_every_family_finds_its_pieces(full_model):
    family = ok.get_family(full_model)
    blocks = family.get_blocks(full_model)
    assert len(blocks) == full_model.config.num_hidden_layers == 6
    for path in (family.token_embedding, family.final_norm, family.lm_head):
        assert family.get(full_model, path) is not None
    if family.position_embedding:
        assert family.get(full_model, family.position_embedding) is not None
    assert family.get(full_model, family.token_embedding).weight.shape[0] == full_model.config.vocab_size


def test_required_families_are_supported():
    assert {"gpt2", "opt", "bloom", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi"} <= set(ok.supported_model_types())


def test_unsupported_model_lists_supported_types():
    config = AutoConfig.for_model("gpt_oss", hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(UnsupportedModelError, match=r"'gpt_oss' is not supported.*bloom.*gpt2.*gpt_neox.*llama.*mixtral"):
        ok.get_family(config)


def test_max_positions_follow_the_position_table_learned_or_precomputed():
    """A learned table (GPT-2) and GPT-J's precomputed rotary table limit a sequence; Llama's rotary does not."""
    from offsite_kernels.tiny import tiny_config

    for model_type, limit in (("gpt2", 128), ("gptj", 128), ("llama", None)):
        config = tiny_config(model_type, n_layers=2)
        assert ok.get_family(config).max_positions(config) == limit, model_type
