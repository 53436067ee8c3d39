"""Fast frozen emulator blocks: the fused ops inside every family, same loss and adapter gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_mask, random_ids

import offsite_kernels as ok
from offsite_kernels.emulator.fast import FastBlocksError
from offsite_kernels.memtrack import SavedBytesBetween
from offsite_kernels.nn import AlibiSdpaAttention, FrozenExperts, FrozenLayerNorm, FrozenRMSNorm
from offsite_kernels.nn.mlp import FrozenActivation, FrozenFusedGatedMLP, FrozenGatedMLP
from offsite_kernels.tiny import tiny_model


def _loss_and_grads(emu, ids, mask):
    emu.train()
    emu.zero_grad(set_to_none=True)
    # no loss on padding, nor on a token predicted from a padding position (eager and SDPA
    # attention differ there: a padding query attends to nothing, and each fills it its own way)
    pad = mask == 0
    after_pad = torch.nn.functional.pad(pad, (1, 0))[:, :-1]
    out = emu(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(pad | after_pad, -100))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in emu.named_parameters() if p.requires_grad}


def _assert_close(reference, other, rtol):
    (loss, grads), (loss2, grads2) = reference, other
    assert abs(float(loss2) - float(loss)) <= rtol * abs(float(loss))
    assert grads.keys() == grads2.keys() and grads
    # a gradient that is zero in exact arithmetic (a key projection's bias: softmax ignores it) is
    # rounding noise in both: measure each against a floor of the largest gradient of the model
    floor = 1e-3 * max(float(g.abs().max()) for g in grads.values())
    for name, grad in grads.items():
        err = float((grads2[name] - grad).abs().max() / max(float(grad.abs().max()), floor))
        assert err <= rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("recompute", [None, "full", "selective"])
def test_every_family_matches_the_plain_emulator(full_model, recompute):
    ids, mask = random_ids(2, 11, seed=2), padded_mask(2, 11)
    plain = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=3)
    fast = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=3, fast=True, recompute=recompute)
    assert fast.fast_blocks and fast.recompute == recompute
    kinds = {type(m) for _, b in fast.emulator_blocks() for m in b.modules()}
    assert kinds & {FrozenLayerNorm, FrozenRMSNorm}
    if fast.family.experts is None:
        assert kinds & {FrozenActivation, FrozenGatedMLP, FrozenFusedGatedMLP}
    assert FrozenExperts not in kinds  # dense experts keep Hugging Face's module (its grouped GEMM)
    assert (FrozenFusedGatedMLP in kinds) == fast.family.gated_mlp_fused  # Phi-3's gate_up_proj
    assert (AlibiSdpaAttention in kinds) == (fast.family.name == "BLOOM")
    assert not any(isinstance(m, (FrozenLayerNorm, FrozenRMSNorm)) for _, b in fast.adapter_blocks() for m in b.modules())
    _assert_close(_loss_and_grads(plain, ids, mask), _loss_and_grads(fast, ids, mask), rtol=1e-5)
    fast.eval()
    plain.eval()
    with torch.no_grad():
        real = mask.bool()  # logits at padding positions differ between eager and SDPA attention (see above)
        torch.testing.assert_close(
            fast(input_ids=ids, attention_mask=mask).logits[real], plain(input_ids=ids, attention_mask=mask).logits[real]
        )


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "bloom"])
def test_low_bit_fast_blocks_match_the_low_bit_plain_emulator(model_type, bits):
    model = tiny_model(model_type, n_layers=5, seed=3)
    ids, mask = random_ids(2, 9, seed=4), padded_mask(2, 9)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, bits=bits, group_size=32)
    fast = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, bits=bits, group_size=32, fast=True, recompute="full")
    _assert_close(_loss_and_grads(plain, ids, mask), _loss_and_grads(fast, ids, mask), rtol=1e-5)


def test_bf16_fast_blocks_close_to_plain():
    model = tiny_model("llama", n_layers=5, seed=3, dtype=torch.bfloat16)
    ids, mask = random_ids(2, 9, seed=4), padded_mask(2, 9)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    fast = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True)
    _assert_close(_loss_and_grads(plain, ids, mask), _loss_and_grads(fast, ids, mask), rtol=5e-2)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bloom"])
def test_fast_blocks_save_fewer_activation_bytes(model_type):
    model = tiny_model(model_type, n_layers=12, seed=0)
    ids = random_ids(2, 33, seed=1)
    saved = {}
    for fast in (False, True):
        emu = ok.make_emulator(model, bottom=2, top=2, emulator_layers=8, fast=fast).train()
        blocks = [b for _, b in emu.emulator_blocks()]
        with SavedBytesBetween(blocks[0], blocks[-1], weights_of=emu) as counter:
            loss = emu(input_ids=ids, labels=ids).loss
        loss.backward()
        saved[fast] = counter.bytes
    assert 0 < saved[True] < saved[False]


def test_files_unchanged_and_distillation_refused(tmp_path):
    model = tiny_model("qwen3", n_layers=5, seed=1)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    fast = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    fast.save_pretrained(tmp_path / "emu")
    loaded = ok.OffsiteModel.from_pretrained(tmp_path / "emu").eval()
    ids = random_ids(1, 6, seed=2)
    torch.testing.assert_close(loaded(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
    from offsite_kernels.workflow.distill import DistillError, distill

    with pytest.raises(DistillError, match="fast frozen blocks"):
        distill(fast, model, None, None)


def test_fast_blocks_need_frozen_blocks():
    from offsite_kernels.emulator.fast import fast_block_

    emu = ok.make_emulator(tiny_model("opt", n_layers=4, seed=1), bottom=1, top=1, emulator_layers=2)
    _, adapter_block = emu.adapter_blocks()[0]
    with pytest.raises(FastBlocksError, match="trainable parameters"):
        fast_block_(adapter_block, emu.family, emu.config)


@pytest.mark.parametrize(
    ("model_type", "config", "message"),
    [
        ("gpt2", dict(activation_function="tanh"), "no fused op"),
        ("llama", dict(hidden_act="relu"), "no fused gated kernel"),
        ("bloom", dict(pretraining_tp=2, slow_but_exact=True), "slow_but_exact"),
        ("opt", dict(dtype=torch.float64), "float64"),
    ],
)
def test_a_refused_switch_to_fast_blocks_changes_nothing(model_type, config, message):
    from offsite_kernels.nn import FrozenLayerNorm, FrozenRMSNorm

    model = tiny_model(model_type, n_layers=5, seed=2, **config)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, recompute="full")
    before = [type(m) for m in emu.modules()]
    with pytest.raises(FastBlocksError, match=message):
        emu.use_fast_blocks()
    assert emu.recompute == "full" and not emu.fast_blocks
    assert [type(m) for m in emu.modules()] == before
    assert not any(isinstance(m, (FrozenLayerNorm, FrozenRMSNorm)) for m in emu.modules())
    with pytest.raises(FastBlocksError, match=message):
        ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, fast=True)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bloom"])
def test_attention_probabilities_are_refused_by_fast_blocks_only(model_type):
    model = tiny_model(model_type, n_layers=4, seed=1)
    ids = random_ids(1, 6, seed=2)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    assert len(plain(input_ids=ids, output_attentions=True).attentions) == 4
    fast = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True)
    with pytest.raises(FastBlocksError, match="output_attentions"):
        fast(input_ids=ids, output_attentions=True)
    with pytest.raises(FastBlocksError, match="output_attentions"):
        fast.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    from transformers import GenerationConfig

    asked = GenerationConfig(max_new_tokens=2, output_attentions=True, return_dict_in_generate=True, pad_token_id=2)
    with pytest.raises(FastBlocksError, match="output_attentions"):  # asked for in a generation config
        fast.generate(ids, generation_config=asked)
    fast.model.generation_config.output_attentions = True  # or in the model's own
    with pytest.raises(FastBlocksError, match="output_attentions"):
        fast.generate(ids, max_new_tokens=2, return_dict_in_generate=True, pad_token_id=2)
    fast.model.generation_config.output_attentions = False
    assert fast.generate(ids, max_new_tokens=2, pad_token_id=2).shape == (1, 8)


def test_swapped_modules_follow_the_blocks_train_or_eval_mode(model_type):
    """A module swapped into an eval-mode block is in eval mode too: BLOOM's fast attention ran its dropout in an
    emulator built from a model in eval mode (random outputs) before."""
    dropout = dict(attention_dropout=0.3, hidden_dropout=0.3, attn_pdrop=0.3, resid_pdrop=0.3, dropout=0.3)
    model = tiny_model(model_type, n_layers=5, seed=3, **dropout)  # in eval mode
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3)
    fast = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, fast=True)
    assert not any(m.training for m in fast.modules())
    ids = random_ids(2, 9, seed=4)
    with torch.no_grad():
        first = fast(input_ids=ids, return_logits=True).logits
        torch.testing.assert_close(fast(input_ids=ids, return_logits=True).logits, first, rtol=0, atol=0)
        torch.testing.assert_close(first, plain(input_ids=ids, return_logits=True).logits, rtol=1e-5, atol=1e-5)
    fast.train()
    assert all(m.training for m in fast.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_norm_offset_and_geglu_match_the_plain_emulator(dtype):
    """Gemma's RMSNorm scales by 1 + weight (its weights start at zero, where the offset is invisible) and its MLP
    is GeGLU with the tanh GELU: random norm weights, fast against plain."""
    model = tiny_model("gemma", n_layers=5, seed=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
            if "gate_proj" in name:  # gate inputs of a few units, where the tanh and erf GELUs part
                p.mul_(8.0)
    model = model.to(dtype)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3)
    fast = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, fast=True)
    kinds = [type(m) for _, b in fast.emulator_blocks() for m in b.modules()]
    assert kinds.count(FrozenGatedMLP) == 3 and kinds.count(FrozenRMSNorm) == 6
    assert sum(entry.endswith("mlp: GeGLU MLP") for entry in fast.fast_blocks) == 3
    assert all(m.weight_offset == 1.0 for _, b in fast.emulator_blocks() for m in b.modules() if isinstance(m, FrozenRMSNorm))
    ids = random_ids(2, 9, seed=5)
    with torch.no_grad():
        want, got = (e(input_ids=ids, return_logits=True).logits.double() for e in (plain, fast))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((got - want).abs().max() / want.abs().max()) < tol
    mask = torch.ones_like(ids)
    _assert_close(
        _loss_and_grads(plain, ids, mask), _loss_and_grads(fast, ids, mask), rtol=1e-5 if dtype == torch.float32 else 3e-2
    )


def _random_norm_weights(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_swap_that_would_change_the_activation_is_refused(dtype):
    """The fused activation comes from the config's name; a model whose modules compute another one (here the config
    names the erf GELU, the modules were built with the tanh form) is refused at the swap, in any dtype (activations
    are checked in float32), instead of being trained through other math."""
    model = tiny_model("gemma3_text", n_layers=5, seed=1, dtype=dtype)
    ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True)  # as built: accepted
    model.config.hidden_activation = "gelu"
    with pytest.raises(FastBlocksError, match=r"mlp \(Gemma3MLP\)(\.act_fn)? does not reproduce its output.*without fast blocks"):
        ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_swap_that_would_drop_a_norm_offset_is_refused(dtype, monkeypatch):
    """A norm read wrongly (Gemma's ``1 + weight`` taken as ``weight``: what a renamed class would cause) is refused."""
    from offsite_kernels.nn import norm as norm_module

    model = _random_norm_weights(tiny_model("gemma", n_layers=5, seed=1, dtype=dtype))
    ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True)
    read_as = norm_module.rms_norm_kind
    monkeypatch.setattr(norm_module, "rms_norm_kind", lambda module: "llama" if read_as(module) else None)
    monkeypatch.setattr(type(model.model.norm), "variance_epsilon", 1e-6, raising=False)
    with pytest.raises(FastBlocksError, match=r"input_layernorm \(GemmaRMSNorm\) does not reproduce its output"):
        ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True)


def test_a_gated_family_without_an_activation_name_is_refused():
    """A gated MLP whose activation the config does not name is refused (it was taken for SiLU)."""
    from dataclasses import replace

    from offsite_kernels.emulator.fast import check_fast_block

    model = tiny_model("llama", n_layers=3, seed=1).requires_grad_(False)
    family = replace(ok.get_family(model), activation_config="hidden_activation")  # an attribute this config lacks
    with pytest.raises(FastBlocksError, match=r"no activation name in the config \(hidden_activation\)"):
        check_fast_block(model.model.layers[1], family, model.config)


def test_every_family_passes_the_swap_check_with_trained_looking_norms_in_every_dtype(model_type):
    """No false alarm: with norm weights away from their initial values, in float32, bfloat16 and float16, dense and
    int8, every family's fused modules reproduce Hugging Face's within the check's bounds."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = _random_norm_weights(tiny_model(model_type, n_layers=5, seed=1, dtype=dtype))
        for bits in (None, 8):
            fast = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True, bits=bits, group_size=32)
            assert fast.fast_blocks


@pytest.mark.parametrize(
    "variant",
    [dict(new_decoder_architecture=True, multi_query=False, num_kv_heads=2), dict(parallel_attn=False)],
    ids=["falcon-40b-style", "sequential"],
)
def test_falcon_variants_match_the_plain_emulator(variant):
    """Falcon-40B/180B's layout (two norms, grouped key-value heads) and the sequential block, beside the 7B default."""
    model = tiny_model("falcon", n_layers=5, seed=1, **variant)
    ids, mask = random_ids(2, 11, seed=2), padded_mask(2, 11)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    fast = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True, recompute="selective")
    _assert_close(_loss_and_grads(plain, ids, mask), _loss_and_grads(fast, ids, mask), rtol=1e-5)


def test_falcon_with_alibi_is_refused_fast_blocks_and_runs_plain():
    model = tiny_model("falcon", n_layers=5, seed=1, alibi=True)
    with pytest.raises(FastBlocksError, match=r"Falcon with alibi=True: .* build the emulator without fast blocks"):
        ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, recompute="selective")
    loss, grads = _loss_and_grads(plain, random_ids(2, 9, seed=2), torch.ones(2, 9, dtype=torch.long))
    assert torch.isfinite(loss) and grads


def test_a_refused_swap_leaves_the_emulator_as_it_was():
    """Every block's replacements are built and checked before anything changes: a refusal keeps the recomputation
    setting and the original modules."""
    model = tiny_model("gemma3_text", n_layers=5, seed=1)
    model.config.hidden_activation = "gelu"  # not what the modules compute: refused
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, recompute="selective")
    before = [[type(m) for m in b.modules()] for _, b in emu.emulator_blocks()]
    with pytest.raises(FastBlocksError):
        emu.use_fast_blocks()
    assert emu.recompute == "selective" and emu.fast_blocks == []
    assert [[type(m) for m in b.modules()] for _, b in emu.emulator_blocks()] == before


def test_a_model_without_sdpa_attention_keeps_its_own():
    """Where this transformers has no SDPA attention for a class (GPT-J in 5.17), the config is left alone: naming
    "sdpa" there changed only the mask the model builds, which its eager attention misread (loss 1e-2 off)."""
    model = tiny_model("gptj", n_layers=5, seed=1)
    model._supports_sdpa = False  # as GPTJForCausalLM in transformers 5.17
    ids, mask = random_ids(2, 11, seed=2), padded_mask(2, 11)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    fast = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True)
    assert fast.fast_blocks and fast.config._attn_implementation == plain.config._attn_implementation == "eager"
    _assert_close(_loss_and_grads(plain, ids, mask), _loss_and_grads(fast, ids, mask), rtol=1e-5)
