"""The emulator model against Hugging Face's own models, for every family."""

import pytest
import torch
from conftest import padded_mask, random_ids, state_dict_copy
from transformers import AutoModelForCausalLM

import offsite_kernels as ok


def reference_reduced_model(full_model, kept):
    """The same reduced model built the independent way: HF from a config, weights copied by name."""
    family = ok.get_family(full_model)
    config = full_model.config.__class__.from_dict(full_model.config.to_dict())
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [full_model.config.layer_types[i] for i in kept]
    if isinstance(getattr(config, "mlp_only_layers", None), list):  # Qwen MoE: dense blocks by index, by its rule
        source = full_model.config
        dense = [
            i for i in range(source.num_hidden_layers) if i in source.mlp_only_layers or (i + 1) % source.decoder_sparse_step
        ]
        config.mlp_only_layers, config.decoder_sparse_step = [j for j, i in enumerate(kept) if i in dense], 1
    if isinstance(getattr(config, "first_k_dense_replace", None), int):  # DeepSeek: leading dense blocks, by count
        config.first_k_dense_replace = sum(i < full_model.config.first_k_dense_replace for i in kept)
    config._attn_implementation = "eager"
    ref = AutoModelForCausalLM.from_config(config).eval()
    prefix = family.blocks + "."
    source = full_model.state_dict()
    mapped = {}
    for name in ref.state_dict():
        if name.startswith(prefix):
            pos, rest = name[len(prefix) :].split(".", 1)
            mapped[name] = source[f"{prefix}{kept[int(pos)]}.{rest}"]
        else:
            mapped[name] = source[name]
    ref.load_state_dict(mapped, strict=True)
    return ref


def test_keep_all_reproduces_hf_logits_and_input_gradients(full_model):
    emu = ok.make_emulator(full_model, bottom=2, top=2)  # every middle block kept
    assert emu.layout.kept_indices == tuple(range(6))
    emu.eval()
    ids, mask = random_ids(3, 11, seed=5), padded_mask(3, 11)
    embed = ok.get_family(full_model).get(full_model, ok.get_family(full_model).token_embedding)
    x = embed(ids).detach()
    x_ref, x_emu = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref = full_model(inputs_embeds=x_ref, attention_mask=mask, labels=ids)
    out_emu = emu(inputs_embeds=x_emu, attention_mask=mask, labels=ids)  # loss through the fused frozen head
    soft_capped = getattr(full_model.config, "final_logit_softcapping", None) is not None  # Gemma 2: the model's head
    assert (out_emu.logits is None) != soft_capped
    with_logits = emu(inputs_embeds=x.clone(), attention_mask=mask, labels=ids, return_logits=True)
    torch.testing.assert_close(with_logits.logits, out_ref.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(with_logits.loss, out_ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_emu.loss, out_ref.loss, rtol=1e-6, atol=1e-6)
    out_ref.loss.backward()
    out_emu.loss.backward()
    assert x_emu.grad is not None and x_emu.grad.abs().sum() > 0
    torch.testing.assert_close(x_emu.grad, x_ref.grad, rtol=1e-5, atol=1e-7)


def test_layer_drop_matches_hf_model_of_kept_blocks(full_model):
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2).eval()
    assert emu.layout.emulator == (1, 4)
    assert emu.config.num_hidden_layers == 4 and len(emu.blocks) == 4
    ref = reference_reduced_model(full_model, emu.layout.kept_indices)
    ids, mask = random_ids(2, 13, seed=6), padded_mask(2, 13)
    torch.testing.assert_close(emu(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)


def test_generation_with_kv_cache_through_reduced_emulator(full_model):
    emu = ok.make_emulator(full_model, bottom=1, top=2, emulator_layers=1).eval()
    ref = reference_reduced_model(full_model, emu.layout.kept_indices)
    ids = random_ids(1, 5, seed=7)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(emu.generate(ids, **kwargs), ref.generate(ids, **kwargs))


def test_source_model_is_left_untouched(full_model):
    before = state_dict_copy(full_model)
    blocks_before = list(ok.get_family(full_model).get_blocks(full_model))
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2, prune=0.5)
    assert full_model.config.num_hidden_layers == 6
    assert list(ok.get_family(full_model).get_blocks(full_model)) == blocks_before
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in full_model.parameters())
    # no storage is shared between the emulator and the source model
    source_ptrs = {p.data_ptr() for p in full_model.parameters()}
    assert not any(p.data_ptr() in source_ptrs for p in emu.parameters())


def test_the_emulator_reports_the_mode_of_the_model_it_wraps(full_model, tmp_path):
    for mode in (False, True):
        emu = ok.make_emulator(full_model.train(mode), bottom=1, top=1, emulator_layers=2)
        assert emu.training == emu.model.training == mode
    full_model.eval()
    emu.save_pretrained(tmp_path / "emu")
    loaded = ok.OffsiteModel.from_pretrained(tmp_path / "emu")
    assert loaded.training == loaded.model.training


def test_a_training_call_with_labels_fills_no_kv_cache(full_model):
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2)
    ids = random_ids(2, 7, seed=3)
    out = emu(input_ids=ids, labels=ids, return_logits=True)
    assert out.loss.requires_grad and not out.past_key_values
    with torch.no_grad():  # evaluation and generation keep the model's own default
        assert emu(input_ids=ids).past_key_values is not None
    assert emu(input_ids=ids, labels=ids, use_cache=True, return_logits=True).past_key_values is not None  # asked for


def test_only_adapter_requires_grad_and_only_adapter_changes(full_model):
    emu = ok.make_emulator(full_model, bottom=2, top=1, emulator_layers=2)
    adapter_ids = {id(p) for p in emu.adapter_parameters()}
    assert adapter_ids
    for name, p in emu.named_parameters():
        assert p.requires_grad == (id(p) in adapter_ids), name
    before = state_dict_copy(emu)
    opt = torch.optim.AdamW([p for p in emu.parameters() if p.requires_grad], lr=1e-2)
    emu.train()
    ids = random_ids(2, 9, seed=8)
    emu(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    adapter_keys = {f"model.{emu.family.blocks}.{pos}." for pos in emu.layout.adapter_positions()}
    for k, v in emu.state_dict().items():
        is_adapter = any(k.startswith(prefix) for prefix in adapter_keys)
        if not is_adapter:
            assert torch.equal(v, before[k]), f"frozen tensor {k} changed"
    changed = [k for k, v in emu.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(any(k.startswith(p) for p in adapter_keys) for k in changed)
    assert all(p.grad is None for p in emu.parameters() if not p.requires_grad)


def test_magnitude_pruning_zeroes_smallest_entries_of_emulator_only(full_model):
    ratio = 0.3
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2, prune=ratio)
    source_blocks = ok.get_family(full_model).get_blocks(full_model)
    for src, block in emu.emulator_blocks():
        original = dict(source_blocks[src].named_parameters())
        for name, w in block.named_parameters():
            if w.dim() == 1:
                assert torch.equal(w, original[name])
                continue
            for matrix, source in zip(w.reshape(-1, *w.shape[-2:]), original[name].reshape(-1, *w.shape[-2:]), strict=True):
                zero = matrix == 0  # a matrix, or each expert's matrix of a mixture of experts' 3-D weight
                assert int(zero.sum()) >= int(matrix.numel() * ratio)
                assert source[zero].abs().max() <= source[~zero].abs().min()
    for src, block in emu.adapter_blocks():
        for name, w in block.named_parameters():
            assert torch.equal(w, dict(source_blocks[src].named_parameters())[name])


@pytest.mark.parametrize("prune", [-0.1, 1.0])
def test_bad_prune_ratio(full_model, prune):
    with pytest.raises(ok.LayoutError, match="prune"):
        ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2, prune=prune)


def test_bad_layout_through_make_emulator(full_model):
    with pytest.raises(ok.LayoutError, match="leaves no middle blocks"):
        ok.make_emulator(full_model, bottom=3, top=3)
    with pytest.raises(ok.LayoutError, match="between 1 and the 2 middle blocks"):
        ok.make_emulator(full_model, bottom=2, top=2, emulator_layers=3)
