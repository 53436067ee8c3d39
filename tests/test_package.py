"""Emulator package and adapter files: exact round trips, nothing dropped leaks, bad input."""

import pytest
import torch
from conftest import random_ids, state_dict_copy
from safetensors import safe_open

import offsite_kernels as ok
from offsite_kernels.io import atomic_output_dir


def package_tensors(path):
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return tensors


def test_round_trip_is_exact(full_model, tmp_path):
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2, prune=0.25)
    emu.save_pretrained(tmp_path / "emu")
    loaded = ok.OffsiteModel.from_pretrained(tmp_path / "emu", attn_implementation="eager")
    assert loaded.layout == emu.layout and loaded.prune == emu.prune
    a, b = emu.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in emu.named_parameters() if p.requires_grad
    ]
    ids = random_ids(2, 7, seed=3)
    torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, emu.eval()(input_ids=ids).logits, rtol=0, atol=0)


def test_package_holds_no_tensor_of_a_dropped_block(full_model, tmp_path):
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=1)
    emu.save_pretrained(tmp_path / "emu")
    stored = list(package_tensors(tmp_path / "emu").values())
    blocks = ok.get_family(full_model).get_blocks(full_model)
    assert len(emu.layout.dropped_indices) == 3
    checked = 0
    for i in emu.layout.dropped_indices:
        for name, t in blocks[i].named_parameters():
            if torch.all(t == t.flatten()[0]):
                continue  # constant tensors (fresh norm weights, Cohere's per-head ones too; zero biases) are not identifying
            assert not any(s.shape == t.shape and torch.equal(s, t.detach()) for s in stored), f"dropped block {i} {name} leaked"
            checked += 1
    assert checked > 0
    # and every kept block is there, by value
    for src, _ in emu.adapter_blocks() + emu.emulator_blocks():
        w = next(p for p in blocks[src].parameters() if p.dim() == 2)
        assert any(s.shape == w.shape and torch.equal(s, w.detach()) for s in stored)


def test_adapter_file_holds_only_adapter_tensors(full_model, tmp_path):
    emu = ok.make_emulator(full_model, bottom=2, top=1, emulator_layers=2)
    emu.save_adapter(tmp_path / "adapter")
    stored = package_tensors(tmp_path / "adapter")
    family = ok.get_family(full_model)
    expected = {f"{family.blocks}.{i}.{name}" for i in (0, 1, 5) for name in family.get_blocks(full_model)[i].state_dict()}
    assert set(stored) == expected


def test_save_refuses_existing_output_and_leaves_it_alone(full_model, tmp_path):
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2)
    out = tmp_path / "emu"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(ok.OutputExistsError, match="already exists"):
        emu.save_pretrained(out)
    with pytest.raises(ok.OutputExistsError, match="already exists"):
        emu.save_adapter(out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    emu.save_pretrained(out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "offsite.json").is_file()


def test_failed_write_leaves_nothing_behind(tmp_path):
    out = tmp_path / "pkg"
    with pytest.raises(RuntimeError, match="disk full"), atomic_output_dir(out) as tmp:
        (tmp / "part.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_content(tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"] and (out / "old.txt").read_text() == "old"


def test_an_output_that_cannot_be_moved_aside_is_kept_and_nothing_is_left_behind(tmp_path, monkeypatch):
    import os

    from offsite_kernels import io

    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def busy(src, dst):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(io.os, "replace", busy)
    with pytest.raises(OSError, match="busy"), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(io.os, "replace", os.replace)
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"] and (out / "old.txt").read_text() == "old"


def test_text_files_are_written_whole_and_never_clobbered(tmp_path):
    from offsite_kernels.io import write_text_atomic

    target = tmp_path / "sub" / "table.json"
    write_text_atomic(target, "first\n")
    with pytest.raises(ok.OutputExistsError, match="already exists"):
        write_text_atomic(target, "second\n")
    assert target.read_text() == "first\n"
    write_text_atomic(target, "second\n", overwrite=True)
    assert target.read_text() == "second\n" and [p.name for p in target.parent.iterdir()] == ["table.json"]


def test_load_errors_name_the_problem(full_model, tmp_path):
    with pytest.raises(ok.PackageError, match="not a directory"):
        ok.OffsiteModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ok.PackageError, match=r"not an emulator package.*no offsite\.json"):
        ok.OffsiteModel.from_pretrained(tmp_path / "empty")
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2)
    emu.save_pretrained(tmp_path / "emu")
    emu.save_adapter(tmp_path / "adapter")
    with pytest.raises(ok.PackageError, match="not an emulator package"):
        ok.OffsiteModel.from_pretrained(tmp_path / "adapter")
    weights = next((tmp_path / "emu").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ok.PackageError, match="corrupt or truncated"):
        ok.OffsiteModel.from_pretrained(tmp_path / "emu")
    (tmp_path / "emu" / "offsite.json").write_text("{not json")
    with pytest.raises(ok.PackageError, match="not valid JSON"):
        ok.OffsiteModel.from_pretrained(tmp_path / "emu")


def test_source_state_is_untouched_by_saving(full_model, tmp_path):
    before = state_dict_copy(full_model)
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2)
    emu.save_pretrained(tmp_path / "emu")
    emu.save_adapter(tmp_path / "adapter")
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("bits", [None, 8])
def test_package_missing_a_tensor_is_refused(tmp_path, bits):
    from safetensors.torch import load_file, save_file

    from offsite_kernels.tiny import tiny_model

    emu = ok.make_emulator(tiny_model("llama", seed=3), bottom=1, top=1, emulator_layers=2, bits=bits)
    emu.save_pretrained(tmp_path / "emu")
    weights = tmp_path / "emu" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.0.self_attn.q_proj.weight"]  # an adapter tensor
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ok.PackageError, match=r"lacks tensors \['model.layers.0.self_attn.q_proj.weight'\]"):
        ok.OffsiteModel.from_pretrained(tmp_path / "emu")


def _edit_record(path, edit):
    import json

    record = json.loads((path / "offsite.json").read_text())
    edit(record)
    (path / "offsite.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(quantized=["x"]), "'quantized' in offsite.json is malformed"),
        (lambda r: r.update(prune="abc"), "'prune' in offsite.json is 'abc'; expected a fraction"),
        (lambda r: r["quantized"]["1"]["mlp.down_proj"].update(dtype="torch.float64"), "has dtype 'torch.float64'"),
        (lambda r: r["quantized"]["1"]["mlp.down_proj"].update(group_size=64), r"data of a int4 .* must be \[\d+, \d+\]"),
        (lambda r: r["quantized"]["1"]["mlp.down_proj"].update(shape=[7, 7]), "does not fit its record"),
        (lambda r: r["quantized"]["1"]["mlp.down_proj"].update(format="int8"), "does not fit its record"),
        (lambda r: r["quantized"]["1"].update({"mlp.nothing": r["quantized"]["1"]["mlp.down_proj"]}), "not a linear layer"),
    ],
)
def test_a_package_whose_record_does_not_fit_its_tensors_is_refused_at_load(tmp_path, edit, message):
    from offsite_kernels.tiny import tiny_model

    emu = ok.make_emulator(tiny_model("llama", seed=3), bottom=1, top=1, emulator_layers=2, bits=4, group_size=32)
    emu.save_pretrained(tmp_path / "emu")
    _edit_record(tmp_path / "emu", edit)
    with pytest.raises(ok.PackageError, match=message):
        ok.OffsiteModel.from_pretrained(tmp_path / "emu")


def test_weights_load_only_from_safetensors(tmp_path):
    from offsite_kernels.hf_io import load_local_model
    from offsite_kernels.tiny import tiny_model

    model = tiny_model("llama", seed=3)
    model.config.save_pretrained(tmp_path / "model")
    torch.save(model.state_dict(), tmp_path / "model" / "pytorch_model.bin")  # a pickle checkpoint
    with pytest.raises(ok.PackageError, match=r"holds no \.safetensors weights"):
        load_local_model(tmp_path / "model")


def test_outputs_get_the_usual_permissions(full_model, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2).save_adapter(tmp_path / "adapter")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755


@pytest.mark.parametrize("fast", [False, True])
def test_gpt2_attention_scaled_by_depth_keeps_its_source_scale_through_a_package(tmp_path, fast):
    # Hugging Face divides GPT-2's attention scale by (layer_idx + 1) when it builds a block (Stanford
    # CRFM's checkpoints set this); a package rebuilds block j at position j, not at its source index
    from offsite_kernels.tiny import tiny_model

    model = tiny_model("gpt2", n_layers=6, seed=1, scale_attn_by_inverse_layer_idx=True)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8)  # sharp attention, as in a trained model: the scale matters
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=fast).eval()
    source = [model.transformer.h[i].attn.scaling for i in emu.layout.kept_indices]
    assert [b.attn.scaling for b in emu.blocks] == source
    emu.save_pretrained(tmp_path / "emu")
    loaded = ok.OffsiteModel.from_pretrained(tmp_path / "emu").eval()
    if fast:
        loaded.use_fast_blocks()
    assert [b.attn.scaling for b in loaded.blocks] == pytest.approx(source, rel=1e-12)
    ids = random_ids(2, 9, seed=3)
    torch.testing.assert_close(loaded(input_ids=ids).logits, emu(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_depth_scaled_attention_without_a_stored_scale_is_refused():
    # an older transformers divides by (layer_idx + 1) at each call: renumbered emulator blocks would change it
    from offsite_kernels.tiny import tiny_model

    model = tiny_model("gpt2", n_layers=6, seed=1, scale_attn_by_inverse_layer_idx=True)
    for block in model.transformer.h:
        del block.attn.scaling
    with pytest.raises(ok.UnsupportedModelError, match="upgrade transformers"):
        ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
