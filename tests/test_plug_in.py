"""Plug-in: an untouched adapter is a no-op bit for bit; a trained one changes exactly its blocks."""

import pytest
import torch
from conftest import random_ids, state_dict_copy
from transformers import AutoModelForCausalLM

import offsite_kernels as ok
from offsite_kernels.tiny import tiny_model


def train_adapter(emu, steps=3, seed=0):
    opt = torch.optim.AdamW(list(emu.adapter_parameters()), lr=1e-2)
    emu.train()
    for step in range(steps):
        ids = random_ids(2, 9, seed=seed + step)
        emu(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return emu.eval()


def test_untouched_adapter_reproduces_the_model_bit_for_bit(full_model, tmp_path):
    before = state_dict_copy(full_model)
    ids = random_ids(2, 10, seed=11)
    logits = full_model(input_ids=ids).logits
    emu = ok.make_emulator(full_model, bottom=2, top=2, emulator_layers=1)
    emu.save_adapter(tmp_path / "adapter")
    plugged = ok.plug_in(full_model, tmp_path / "adapter")
    assert plugged is full_model
    for k, v in plugged.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(plugged(input_ids=ids).logits, logits)


def test_trained_adapter_changes_exactly_the_adapter_blocks(full_model, tmp_path):
    before = state_dict_copy(full_model)
    emu = train_adapter(ok.make_emulator(full_model, bottom=1, top=2, emulator_layers=2))
    emu.save_adapter(tmp_path / "adapter")
    plugged = ok.plug_in(full_model, tmp_path / "adapter", inplace=False)
    assert all(torch.equal(v, before[k]) for k, v in full_model.state_dict().items()), "inplace=False changed the input"
    adapter = emu.adapter_state_dict()
    prefix = emu.family.blocks
    for k, v in plugged.state_dict().items():
        if k in adapter:
            assert torch.equal(v, adapter[k]), k
        else:
            assert torch.equal(v, before[k]), f"non-adapter tensor {k} changed"
    for i in emu.layout.adapter_indices:
        assert any(not torch.equal(adapter[k], before[k]) for k in adapter if k.startswith(f"{prefix}.{i}.")), (
            f"block {i} unchanged"
        )


def test_plugged_model_saves_and_loads_with_transformers(full_model, tmp_path):
    emu = train_adapter(ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2))
    emu.save_adapter(tmp_path / "adapter")
    plugged = ok.plug_in(full_model, tmp_path / "adapter")
    plugged.save_pretrained(tmp_path / "plugged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plugged", attn_implementation="eager").eval()
    ids = random_ids(2, 8, seed=12)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, plugged(input_ids=ids).logits, rtol=0, atol=0)


def test_adapter_plugs_into_another_dtype_of_the_same_model(tmp_path):
    model = tiny_model("llama", seed=3)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    emu.save_adapter(tmp_path / "adapter")
    half = tiny_model("llama", seed=3, dtype=torch.bfloat16)
    ok.plug_in(half, tmp_path / "adapter")  # the weight probe tolerates the dtype change
    assert half.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_adapter_from_another_model_or_layout_is_refused(tmp_path):
    model = tiny_model("gpt2", seed=1)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    emu.save_adapter(tmp_path / "adapter")
    untouched = state_dict_copy(model)
    cases = [
        (tiny_model("gpt2", seed=2), "other weights"),
        (tiny_model("gpt2", n_layers=8, seed=1), "6-block model; this model has 8 blocks"),
        (tiny_model("opt", seed=1), "trained for a 'gpt2' model"),
        (tiny_model("gpt2", seed=1, n_embd=64), "architecture differs"),
    ]
    for other, message in cases:
        before = state_dict_copy(other)
        with pytest.raises(ok.AdapterMismatchError, match=message):
            ok.plug_in(other, tmp_path / "adapter")
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    # the weight check can be waived for a model with other weights of the same shapes
    ok.plug_in(tiny_model("gpt2", seed=2), tmp_path / "adapter", check_weights=False)
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())


def test_an_emulator_or_a_base_model_in_place_of_the_full_model_is_refused_by_name(tmp_path):
    model = tiny_model("llama", seed=1)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    emu.save_adapter(tmp_path / "adapter")
    with pytest.raises(ok.UnsupportedModelError, match=r"not an OffsiteModel; .* use its load_adapter"):
        ok.plug_in(emu, tmp_path / "adapter")
    with pytest.raises(ok.UnsupportedModelError, match="already an emulator"):
        ok.make_emulator(emu, bottom=1, top=1, emulator_layers=2)
    parts = {model.model: "LlamaModel has no 'model.layers'", model.model.layers: "a ModuleList is not a Hugging Face model"}
    for part, message in parts.items():
        with pytest.raises(ok.UnsupportedModelError, match=rf"{message}.*pass the whole causal LM"):
            ok.plug_in(part, tmp_path / "adapter")
        with pytest.raises(ok.UnsupportedModelError, match=rf"{message}.*pass the whole causal LM"):
            ok.make_emulator(part, bottom=1, top=1, emulator_layers=2)


def test_missing_or_corrupt_adapter_files(tmp_path):
    model = tiny_model("llama", seed=1)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    with pytest.raises(ok.PackageError, match="not a directory"):
        ok.plug_in(model, tmp_path / "nope")
    emu.save_adapter(tmp_path / "a1")
    (tmp_path / "a1" / "adapter.safetensors").unlink()
    with pytest.raises(ok.PackageError, match="missing file"):
        ok.plug_in(model, tmp_path / "a1")
    emu.save_adapter(tmp_path / "a2")
    f = tmp_path / "a2" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ok.PackageError, match="not a readable safetensors"):
        ok.plug_in(model, tmp_path / "a2")
    emu.save_pretrained(tmp_path / "pkg")
    with pytest.raises(ok.PackageError, match=r"missing file.*adapter\.json"):
        ok.plug_in(model, tmp_path / "pkg")
    import json

    for field, value in (("tensors", 5), ("embedding_probe", "abc"), ("architecture", [1]), ("layout", "2-2-2")):
        emu.save_adapter(tmp_path / field)
        manifest = json.loads((tmp_path / field / "adapter.json").read_text())
        (tmp_path / field / "adapter.json").write_text(json.dumps({**manifest, field: value}))
        with pytest.raises(ok.PackageError, match=f"'{field}' in adapter.json is a .* the file is corrupt"):
            ok.plug_in(model, tmp_path / field)
