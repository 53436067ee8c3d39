"""``offsite demo``: the whole offsite-tuning loop on a small real model and real text, on a CPU.

The shipped model (``demo_assets/pydoc-llama``) is a small Llama-family causal LM pretrained by
``scripts/build_demo_assets.py`` on the prose of the Python documentation. The downstream task
is another domain (:data:`DOWNSTREAM`): by default Python source code (whole standard-library
modules, three held out); also system administration prose (the Debian Reference, chapter 3 held
out) and the King James Gospels (Acts held out). The loop, as the paper runs it:

1. model owner: emulate (uniform layer drop of the middle), distill the emulator briefly on
   the owner's own text, send the emulator package;
2. data owner: fine-tune the adapter through the frozen emulator, send the adapter back;
3. model owner: plug the adapter into the full model;
4. report held-out perplexity of the four settings of the paper side by side.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent / "demo_assets"
MODEL_DIR = ASSETS / "pydoc-llama"
# downstream text folder -> (what it is, what is held out)
DOWNSTREAM = {
    "pycode": ("Python standard-library source code, 22 modules", "textwrap, shlex, fractions"),
    "debref": ("Debian Reference, chapters 1, 2, 4, 5", "chapter 3"),
    "kjv": ("King James Gospels", "Acts"),
}


@dataclass
class DemoSettings:
    layout: str = "1-2-1"
    downstream: str = "pycode"
    block_size: int = 128
    distill_steps: int = 120
    finetune_steps: int = 240
    batch_size: int = 8
    distill_lr: float = 1e-3
    distill_lm_weight: float = 1.0
    finetune_lr: float = 1e-3
    method: str = "full"
    valid_blocks: int = 48
    seed: int = 0
    progress: bool = True


def run_demo(
    settings: DemoSettings | None = None,
    workdir: str | Path | None = None,
    json_out: str | Path | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run the loop; print the four-setting table; return its rows.

    ``workdir`` keeps the emulator package and the adapter (``workdir/emulator``, ``workdir/adapter``) and
    ``json_out`` receives the table; an existing one of them is refused before any work unless ``overwrite``.
    """
    from transformers import AutoTokenizer

    from .emulator import make_emulator, parse_layout
    from .emulator.offsite_model import OffsiteModel
    from .hf_io import load_local_model
    from .io import check_output_dir, write_text_atomic
    from .workflow import TrainSettings, check_tokenizer, distill, finetune, load_blocks
    from .workflow.report import format_table, four_settings, ordering_holds

    s = settings or DemoSettings()
    if s.downstream not in DOWNSTREAM:
        raise ValueError(f"unknown downstream text {s.downstream!r}; choose one of {', '.join(DOWNSTREAM)}")
    bottom, k, top = parse_layout(s.layout)
    outputs = [Path(workdir) / "emulator", Path(workdir) / "adapter"] if workdir else []
    for path in [*outputs, *([Path(json_out)] if json_out else [])]:
        check_output_dir(path, overwrite)
    torch.manual_seed(s.seed)
    started = time.perf_counter()
    model = load_local_model(MODEL_DIR, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    check_tokenizer(tokenizer, model)
    owner_text = load_blocks(ASSETS / "pydoc" / "distill.txt", tokenizer, s.block_size)
    train = load_blocks(ASSETS / s.downstream / "train.txt", tokenizer, s.block_size)
    valid = load_blocks(ASSETS / s.downstream / "valid.txt", tokenizer, s.block_size, max_blocks=s.valid_blocks)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params / 1e6:.1f}M-parameter {model.config.model_type} of {model.config.num_hidden_layers} blocks, pretrained on the Python docs"
    )
    what, held_out = DOWNSTREAM[s.downstream]
    print(f"downstream: {what}, {train.n_tokens:,} training tokens; held out: {held_out}, {valid.n_tokens:,} tokens")

    def training(steps: int, lr: float) -> TrainSettings:
        return TrainSettings(
            steps=steps,
            batch_size=s.batch_size,
            lr=lr,
            warmup=max(1, steps // 10),
            eval_every=max(1, steps // 4),
            seed=s.seed,
            progress=s.progress,
        )

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(workdir) if workdir else Path(scratch)
        print(f"\n[owner] emulate {s.layout} and distill on the owner's text ({s.distill_steps} steps)")
        emu = make_emulator(model, bottom=bottom, top=top, emulator_layers=k)
        owner_valid = load_blocks(ASSETS / "pydoc" / "distill.txt", tokenizer, s.block_size, max_blocks=16)
        if s.distill_steps > 0:
            distill(
                emu, model, owner_text, training(s.distill_steps, s.distill_lr), valid=owner_valid, lm_weight=s.distill_lm_weight
            )
        emu.save_pretrained(work / "emulator", tokenizer=tokenizer, overwrite=overwrite)

        print(f"[data owner] fine-tune the adapter through the frozen emulator ({s.finetune_steps} steps)")
        received = OffsiteModel.from_pretrained(work / "emulator")
        result = finetune(received, train, training(s.finetune_steps, s.finetune_lr), valid=valid, method=s.method)
        received.save_adapter(work / "adapter", overwrite=overwrite)
        print(f"  {result.tokens_per_second:,.0f} training tokens/s on {'GPU' if torch.cuda.is_available() else 'CPU'}")

        print("[owner] plug the adapter in and evaluate on the held-out text")
        zero_shot_emulator = OffsiteModel.from_pretrained(work / "emulator")
        rows = four_settings(model, zero_shot_emulator, work / "adapter", valid)

    print()
    print(format_table(rows))
    holds = ordering_holds(rows)
    print(
        f"\nthe paper's ordering (plug-in better than full zero-shot and than emulator fine-tuned): {'holds' if holds else 'does NOT hold'}"
    )
    print(f"demo took {time.perf_counter() - started:.0f} s")
    if json_out:
        report = {"settings": s.__dict__, "rows": rows, "ordering_holds": holds}
        write_text_atomic(json_out, json.dumps(report, indent=2) + "\n", overwrite)
    return rows
