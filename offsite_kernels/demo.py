"""``offsite demo``: the offsite-tuning loop end to end on a built-in tiny model.

The model owner emulates a tiny random Llama-family model (1-2-1 of 6 blocks); the data owner
fine-tunes the adapter through the frozen emulator on a synthetic task (each token is followed
by a fixed permutation of itself); the owner plugs the adapter into the full model. The table
reports next-token loss of the full model before, the emulator before and after fine-tuning,
and the plugged-in model, on held-out sequences.
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch import nn

from .emulator import make_emulator, plug_in
from .tiny import TINY_VOCAB, tiny_model


def permutation_task(n_sequences: int, length: int, seed: int, vocab: int = TINY_VOCAB) -> torch.Tensor:
    """Sequences where token ``t+1 = perm[t]`` for a permutation fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=gen)
    seqs = torch.empty(n_sequences, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, vocab, (n_sequences,), generator=gen)
    for j in range(1, length):
        seqs[:, j] = perm[seqs[:, j - 1]]
    return seqs


@torch.no_grad()
def lm_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``model`` on ``ids``."""
    model.eval()
    return float(model(input_ids=ids, labels=ids).loss)


def run_demo(steps: int = 60, seed: int = 0, batch: int = 16, length: int = 32) -> dict[str, float]:
    """Run the loop and print the table; returns the losses by setting."""
    torch.manual_seed(seed)
    # the demo's own copy of the task: training and held-out sequences share the permutation
    data = permutation_task(512 + 64, length, seed)
    train, held_out = data[:512], data[512:]
    full = tiny_model("llama", n_layers=6, seed=seed)
    results = {"full model, before": lm_loss(full, held_out)}

    emu = make_emulator(full, bottom=1, top=1, emulator_layers=2)
    results["emulator, before"] = lm_loss(emu, held_out)
    optimizer = torch.optim.AdamW(list(emu.adapter_parameters()), lr=3e-3)
    start = time.perf_counter()
    emu.train()
    for step in range(steps):
        idx = torch.randint(0, len(train), (batch,))
        loss = emu(input_ids=train[idx], labels=train[idx]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:4d}  emulator train loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    results["emulator, fine-tuned"] = lm_loss(emu, held_out)

    with tempfile.TemporaryDirectory() as tmp:
        emu.save_adapter(f"{tmp}/adapter")
        plugged = plug_in(full, f"{tmp}/adapter", inplace=False)
    results["full model, plug-in"] = lm_loss(plugged, held_out)

    tokens = steps * batch * length
    print(
        f"\nemulator {emu.layout} of a {emu.layout.n_layers}-block tiny Llama; "
        f"{steps} adapter steps, {tokens / elapsed:,.0f} tokens/s on {'GPU' if torch.cuda.is_available() else 'CPU'}"
    )
    print(f"{'setting':<24} held-out loss")
    for name, value in results.items():
        print(f"{name:<24} {value:.4f}")
    return results
