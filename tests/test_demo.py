"""`offsite demo` on the shipped model and texts."""

import json

from offsite_kernels.demo import ASSETS, MODEL_DIR, DemoSettings, run_demo
from offsite_kernels.workflow.report import SETTINGS


def test_assets_are_shipped_and_small():
    weights = list(MODEL_DIR.glob("*.safetensors"))
    assert weights and sum(f.stat().st_size for f in weights) <= 20 * 2**20
    for name in ("tokenizer.json", "config.json"):
        assert (MODEL_DIR / name).is_file()
    for text in ("kjv/train.txt", "kjv/valid.txt", "pydoc/distill.txt"):
        assert (ASSETS / text).stat().st_size > 100_000


def test_demo_mechanics_with_few_steps(tmp_path, capsys):
    settings = DemoSettings(distill_steps=3, finetune_steps=4, batch_size=2, valid_blocks=4, progress=False)
    rows = run_demo(settings, workdir=tmp_path, json_out=tmp_path / "demo.json")
    assert [r["setting"] for r in rows] == list(SETTINGS[:4])
    assert (tmp_path / "emulator" / "offsite.json").is_file() and (tmp_path / "adapter" / "adapter.json").is_file()
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] == rows
    assert "| plug-in |" in capsys.readouterr().out
