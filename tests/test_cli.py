"""The `offsite` command: emulate and plug-in on model directories, errors as exit codes."""

import subprocess
import sys

import pytest
import torch
from conftest import random_ids, state_dict_copy
from transformers import AutoModelForCausalLM

import offsite_kernels as ok
from offsite_kernels.cli import main
from offsite_kernels.tiny import tiny_model


@pytest.fixture
def model_dir(tmp_path):
    model = tiny_model("gpt2", n_layers=6, seed=21)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer_config.json").write_text("{}")
    return tmp_path / "model"


def test_emulate_then_plug_in(model_dir, tmp_path, capsys):
    assert main(["emulate", str(model_dir), "-o", str(tmp_path / "emu"), "--layout", "1-2-1", "--prune", "0.1", "-q"]) == 0
    assert "1-2-1" in capsys.readouterr().out
    emu = ok.OffsiteModel.from_pretrained(tmp_path / "emu")
    assert emu.layout.emulator == (1, 4) and emu.prune == 0.1
    assert (tmp_path / "emu" / "tokenizer_config.json").is_file()

    opt = torch.optim.AdamW(list(emu.adapter_parameters()), lr=1e-2)
    ids = random_ids(2, 9, seed=1)
    emu.train()
    emu(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    emu.save_adapter(tmp_path / "adapter")

    assert main(["plug-in", str(model_dir), str(tmp_path / "adapter"), "-o", str(tmp_path / "plugged"), "-q"]) == 0
    plugged = AutoModelForCausalLM.from_pretrained(tmp_path / "plugged")
    adapter = emu.adapter_state_dict()
    source = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for k, v in plugged.state_dict().items():
        assert torch.equal(v, adapter[k] if k in adapter else source[k]), k


def test_emulate_low_bit(model_dir, tmp_path, capsys):
    args = [
        "emulate",
        str(model_dir),
        "-o",
        str(tmp_path / "emu"),
        "--layout",
        "1-2-1",
        "--bits",
        "4",
        "--group-size",
        "32",
        "-q",
    ]
    assert main(args) == 0
    emu = ok.OffsiteModel.from_pretrained(tmp_path / "emu")
    formats = {rec["format"] for recs in emu.quantized.values() for rec in recs.values()}
    assert formats == {"int4"}
    capsys.readouterr()
    assert (
        main(["emulate", str(model_dir), "-o", str(tmp_path / "e2"), "--layout", "1-2-1", "--bits", "4", "--group-size", "48"])
        == 2
    )
    err = capsys.readouterr().err
    assert "group_size must be one of" in err and "Loading" not in err  # refused before the model is loaded
    with pytest.raises(SystemExit):
        main(["emulate", str(model_dir), "-o", str(tmp_path / "e3"), "--bits", "3"])
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()


def test_emulate_with_explicit_layers(model_dir, tmp_path):
    assert main(["emulate", str(model_dir), "-o", str(tmp_path / "emu"), "--layout", "1-3-1", "--layers", "2,3,4", "-q"]) == 0
    assert ok.OffsiteModel.from_pretrained(tmp_path / "emu").layout.emulator == (2, 3, 4)
    # without --layout the kept blocks set the emulator's size: 2-<count>-2
    assert main(["emulate", str(model_dir), "-o", str(tmp_path / "emu2"), "--layers", "2,3", "-q"]) == 0
    layout = ok.OffsiteModel.from_pretrained(tmp_path / "emu2").layout
    assert (layout.bottom, layout.emulator, layout.top) == (2, (2, 3), 2)


def test_layers_that_are_not_numbers_exit_non_zero_and_write_nothing(model_dir, tmp_path, capsys):
    assert main(["emulate", str(model_dir), "-o", str(tmp_path / "emu"), "--layers", "2,x", "-q"]) == 2
    assert "--layers must be comma-separated block indices such as 3,7,11; got '2,x'" in capsys.readouterr().err
    assert not (tmp_path / "emu").exists()


@pytest.mark.parametrize(
    "layout, message",
    [
        ("3-1-3", "leaves no middle blocks"),
        ("1-9-1", "between 1 and the 4 middle blocks"),
        ("1-0-1", "between 1"),
        ("2-8", "BOTTOM-EMULATOR-TOP"),
    ],
)
def test_bad_layout_exits_non_zero_and_writes_nothing(model_dir, tmp_path, capsys, layout, message):
    assert main(["emulate", str(model_dir), "-o", str(tmp_path / "emu"), "--layout", layout, "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "emu").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_existing_output_is_refused_before_any_work(model_dir, tmp_path, capsys):
    out = tmp_path / "emu"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["emulate", str(model_dir), "-o", str(out), "--layout", "1-2-1", "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_model_dir_and_bad_adapter(model_dir, tmp_path, capsys):
    assert main(["emulate", str(tmp_path / "nothing"), "-o", str(tmp_path / "emu"), "-q"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["plug-in", str(model_dir), str(tmp_path / "nothing"), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "adapter" in capsys.readouterr().err
    before = state_dict_copy(AutoModelForCausalLM.from_pretrained(model_dir))
    other = tiny_model("gpt2", n_layers=6, seed=99)
    ok.make_emulator(other, bottom=1, top=1, emulator_layers=2).save_adapter(tmp_path / "other_adapter")
    assert main(["plug-in", str(model_dir), str(tmp_path / "other_adapter"), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "other weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    after = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(v, before[k]) for k, v in after.items())


def test_console_script_and_env_module_run():
    env = subprocess.run([sys.executable, "-m", "offsite_kernels.env"], capture_output=True, text=True, check=True)
    for word in ("torch", "triton", "transformers", "deepspeed", "backends:", "native"):
        assert word in env.stdout
    assert "torch   yes" in env.stdout
    cli = subprocess.run(["offsite", "--help"], capture_output=True, text=True, check=True)
    assert "emulate" in cli.stdout and "plug-in" in cli.stdout


def test_lean_import_does_not_load_transformers_or_cuda():
    code = (
        "import sys, offsite_kernels as ok, torch\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(ok.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
