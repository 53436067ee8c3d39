"""`offsite demo` on the shipped model and texts."""

import json

import pytest

from offsite_kernels import cli, demo, hf_io
from offsite_kernels.demo import ASSETS, DOWNSTREAM, MODEL_DIR, DemoSettings, run_demo
from offsite_kernels.errors import OutputExistsError
from offsite_kernels.workflow.report import SETTINGS, ordering_holds


def test_assets_are_shipped_and_small():
    weights = list(MODEL_DIR.glob("*.safetensors"))
    assert weights and sum(f.stat().st_size for f in weights) <= 20 * 2**20
    for name in ("tokenizer.json", "config.json"):
        assert (MODEL_DIR / name).is_file()
    for text in ("pycode/train.txt", "pydoc/distill.txt"):
        assert (ASSETS / text).stat().st_size > 100_000
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (ASSETS / "pycode" / "LICENSE").read_text()


def test_demo_mechanics_with_few_steps(tmp_path, capsys):
    settings = DemoSettings(distill_steps=3, finetune_steps=4, batch_size=2, valid_blocks=4, progress=False)
    rows = run_demo(settings, workdir=tmp_path, json_out=tmp_path / "demo.json")
    assert [r["setting"] for r in rows] == list(SETTINGS[:4])
    assert (tmp_path / "emulator" / "offsite.json").is_file() and (tmp_path / "adapter" / "adapter.json").is_file()
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] == rows
    assert "| plug-in |" in capsys.readouterr().out


def test_every_downstream_text_is_shipped_and_unknown_ones_are_refused():
    for name in DOWNSTREAM:
        assert (ASSETS / name / "train.txt").stat().st_size > 100_000
        assert (ASSETS / name / "valid.txt").stat().st_size > 20_000
    with pytest.raises(ValueError, match="unknown downstream text 'wiki'"):
        run_demo(DemoSettings(downstream="wiki"))


def test_the_demo_command_passes_every_option_on(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda settings, **kwargs: calls.append((settings, kwargs)))
    argv = ["demo", "--downstream", "kjv", "--layout", "2-2-2", "--method", "lora", "--distill-steps", "5"]
    argv += ["--finetune-steps", "7", "--seed", "3", "--workdir", str(tmp_path), "--json", "t.json", "--overwrite", "-q"]
    assert cli.main(argv) == 0
    [(settings, kwargs)] = calls
    assert (settings.downstream, settings.layout, settings.method) == ("kjv", "2-2-2", "lora")
    assert (settings.distill_steps, settings.finetune_steps, settings.seed, settings.progress) == (5, 7, 3, False)
    assert kwargs == {"workdir": str(tmp_path), "json_out": "t.json", "overwrite": True}


@pytest.mark.parametrize("existing", ["demo.json", "emulator", "adapter"])
def test_the_demo_refuses_an_existing_output_before_any_work_and_leaves_it_alone(monkeypatch, tmp_path, existing):
    def no_work(*args, **kwargs):
        raise AssertionError("the demo loaded the model although an output exists")

    monkeypatch.setattr(hf_io, "load_local_model", no_work)
    (tmp_path / existing).mkdir() if "." not in existing else (tmp_path / existing).write_text("mine")
    with pytest.raises(OutputExistsError, match=existing):
        run_demo(DemoSettings(progress=False), workdir=tmp_path, json_out=tmp_path / "demo.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).is_dir() or (tmp_path / existing).read_text() == "mine"


def test_the_demo_replaces_its_outputs_only_with_overwrite(tmp_path):
    settings = DemoSettings(distill_steps=0, finetune_steps=1, batch_size=2, valid_blocks=2, progress=False)
    (tmp_path / "demo.json").write_text("mine")
    with pytest.raises(OutputExistsError):
        run_demo(settings, json_out=tmp_path / "demo.json")
    rows = run_demo(settings, workdir=tmp_path, json_out=tmp_path / "demo.json", overwrite=True)
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] == rows
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.slow
def test_default_demo_shows_the_papers_ordering(tmp_path):
    """The README's main job, as shipped: plug-in beats full zero-shot and the emulator fine-tuned."""
    rows = run_demo(DemoSettings(progress=False), json_out=tmp_path / "demo.json")
    ppl = {r["setting"]: r["perplexity"] for r in rows}
    assert ppl["plug-in"] < ppl["emulator fine-tuned"] < ppl["emulator zero-shot"]
    assert ppl["plug-in"] < ppl["full zero-shot"]
    assert ordering_holds(rows) and json.loads((tmp_path / "demo.json").read_text())["ordering_holds"]
