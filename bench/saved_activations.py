"""Saved activation bytes of the emulator and peak memory of a training step, per recompute mode.

For a 2-8-2 emulator (12-block Llama-family, GPT-2 and BLOOM models, random weights from a config) this
measures, on whatever device runs it, with the plain Hugging Face blocks and with the fast frozen
blocks (``fast=True``):

- ``emulator_saved_bytes``: bytes autograd saves while the emulator blocks run (saved-tensor
  hooks switched on by hooks on the first and last emulator block), each storage once, the
  emulator's own weights (which linear layers save for their input gradient) apart in
  ``emulator_saved_weight_bytes``;
- ``step_peak_bytes``: peak bytes of tensor storage allocated during forward + backward of one
  training step (``offsite_kernels.memtrack.MemoryTracker``; weights, allocated before, excluded);
- ``emulator_input_bytes``: one hidden-state tensor, the floor for full recomputation.

Selective recomputation keeps its saved GEMM/attention outputs in PyTorch's checkpoint cache,
which saved-tensor hooks do not see: for that mode ``emulator_saved_bytes`` counts only the block
inputs, and ``step_peak_bytes`` is the number to compare.

    python bench/saved_activations.py            # appends rows to bench/results/saved_activations.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import append_rows

import offsite_kernels as ok
from offsite_kernels.memtrack import MemoryTracker, SavedBytesBetween
from offsite_kernels.tiny import tiny_model

MODELS = {
    "llama": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4),
    "gpt2": dict(n_embd=256, n_head=8),
    "bloom": dict(hidden_size=256, n_head=8),  # ALiBi: an additive [batch, heads, q, k] bias in every block
}
BATCH, TOKENS = 4, 128


def measure(model_type: str, mode: str | None, fast: bool = False) -> dict:
    model = tiny_model(model_type, n_layers=12, seed=0, **MODELS[model_type])
    model.config._attn_implementation = "sdpa"  # Hugging Face's default attention
    emu = ok.make_emulator(model, bottom=2, top=2, emulator_layers=8, recompute=mode, fast=fast).train()
    ids = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    blocks = [b for _, b in emu.emulator_blocks()]
    with MemoryTracker() as tracker:
        with SavedBytesBetween(blocks[0], blocks[-1], weights_of=emu) as saved:
            loss = emu(input_ids=ids, labels=ids).loss
        loss.backward()
    hidden = model.config.hidden_size
    return dict(
        bench="saved_activations",
        model=model_type,
        layout="2-8-2",
        hidden=hidden,
        batch=BATCH,
        tokens=TOKENS,
        dtype="float32",
        recompute=mode or "none",
        fast_blocks=fast,
        emulator_saved_bytes=saved.bytes,
        emulator_saved_weight_bytes=saved.weight_bytes,
        counting="distinct storages; the emulator's weights apart",
        emulator_input_bytes=BATCH * TOKENS * hidden * 4,
        step_peak_bytes=tracker.peak_bytes,
        attention="sdpa",
        measured_on=str(ids.device),
        note="selective: emulator_saved_bytes excludes the checkpoint cache; compare step_peak_bytes"
        if mode == "selective"
        else None,
    )


def main() -> None:
    rows = [measure(m, mode, fast) for m in MODELS for fast in (False, True) for mode in (None, "selective", "block", "full")]
    print("| model | fast blocks | recompute | emulator saved | emulator input | step peak |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {'yes' if r['fast_blocks'] else 'no'} | {r['recompute']} | {r['emulator_saved_bytes'] / 2**20:.2f} MiB | "
            f"{r['emulator_input_bytes'] / 2**20:.2f} MiB | {r['step_peak_bytes'] / 2**20:.2f} MiB |"
        )
    out = append_rows(Path(__file__).resolve().parent / "results" / "saved_activations.jsonl", rows)
    print(f"appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
