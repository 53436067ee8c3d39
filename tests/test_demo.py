"""`offsite demo` on the shipped model and texts."""

import json

import pytest

from offsite_kernels.demo import ASSETS, DOWNSTREAM, MODEL_DIR, DemoSettings, run_demo
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


@pytest.mark.slow
def test_default_demo_shows_the_papers_ordering(tmp_path):
    """The README's main job, as shipped: plug-in beats full zero-shot and the emulator fine-tuned."""
    rows = run_demo(DemoSettings(progress=False), json_out=tmp_path / "demo.json")
    ppl = {r["setting"]: r["perplexity"] for r in rows}
    assert ppl["plug-in"] < ppl["emulator fine-tuned"] < ppl["emulator zero-shot"]
    assert ppl["plug-in"] < ppl["full zero-shot"]
    assert ordering_holds(rows) and json.loads((tmp_path / "demo.json").read_text())["ordering_holds"]
