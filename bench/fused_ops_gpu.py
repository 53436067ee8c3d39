"""GPU benchmark of the fused frozen-block ops: norms, activations, fused LM head, whole emulator blocks.

Usage::

    python bench/fused_ops_gpu.py [--out DIR] [--quick]            # a CUDA GPU (an H200 expected)
    python bench/fused_ops_gpu.py --device cpu --interpret --out /tmp/smoke   # CPU smoke run of the same code

Everything in bf16. Ceilings first, as in ``frozen_linear_gpu.py``: bf16 matmul TFLOP/s on one
8192^3 GEMM and device-to-device copy GB/s on 1 GiB (bytes read + written). Then four sections
(``--sections``, default all):

``norm``: frozen RMSNorm and LayerNorm, without and with the fused residual add, hidden in
{2048, 4096, 1600} x rows in {4096, 16384} (``--quick``: 4096 x 16384). ``fwd`` and ``bwd``
timed separately. Implementations:

- ``offsite``: ``ok.ops.rms_norm(x, w, eps, residual=r)`` / ``ok.ops.layer_norm(...)``; ``bwd`` is
  ``torch.autograd.grad`` through its graph (input gradient only, no dgamma);
- ``offsite_op``: the custom ops without autograd (``torch.ops.offsite_kernels.rms_norm`` and the
  input-gradient op its backward calls, ``rms_norm_input_grad``; same for ``layer_norm``): kernel
  plus dispatch, the figure the bandwidth target is read from;
- ``eager``: ``F.rms_norm`` / ``F.layer_norm`` (after ``h = x + r``) with the weight frozen;
- ``eager_dgamma``: the same with the weight (and bias) requiring grad, so its backward also
  computes dgamma (and dbeta): what a plain trainable norm costs;
- ``eager_hf`` (RMSNorm only): Hugging Face's ``LlamaRMSNorm`` formula in plain PyTorch, frozen;
- ``compile``: ``torch.compile`` (default mode) of ``eager``; the rows dimension is marked
  dynamic (one compilation per op, residual and hidden size); compilation is excluded from the
  timing and reported as ``first_call_s``; a failure is recorded as the row's ``error``;
- ``liger``: Liger Kernel's ``LigerRMSNormFunction`` / ``LigerLayerNormFunction`` when
  ``liger_kernel`` is importable (it computes dgamma too); otherwise a ``skip`` row says so.

GB/s over the minimal traffic: ``fwd`` reads x (+ residual), writes y (+ h = x + residual);
``bwd`` reads dy, the saved input, the fp32 row statistics (rstd, and mean for LayerNorm),
(+ dh), and writes dx. The same byte count for every implementation of a case.

``act``: ``bias_gelu`` (tanh form, GPT2-XL's 6400 features; erf form, 8192), ``swiglu``
(Llama-2-7B's 11008) and ``geglu`` (tanh form, Gemma-7B's 24576), rows in {4096, 16384};
``offsite``, ``offsite_op``, ``eager`` (``F.gelu(x + b)``, ``F.silu(g) * u``,
``F.gelu(g) * u``), ``compile``, ``liger`` (the gated ones: ``liger_swiglu``, ``liger_geglu``). Traffic: ``fwd`` reads the inputs, writes y; ``bwd`` reads dy and the
inputs, writes their gradients.

``head``: ``ok.ops.fused_linear_cross_entropy(h, W, labels, shift_labels=False)`` against the
unfused ``F.cross_entropy(F.linear(h, W).float(), labels)``, forward + backward (W frozen: only dh),
for (hidden, vocab) in {(2048, 50272) OPT-1.3B, (4096, 32000) Llama-2-7B} x tokens in
{4096, 16384} (``--quick``: 4096 / 32000 / 4096), and Liger's fused linear cross-entropy when
installed. Besides the time, the peak memory of one forward + backward, measured in a separate
call: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was allocated before
(the inputs). ``time_ratio`` and ``mem_ratio`` are against the unfused head of the same case.

``block``: a Llama-2-7B-shaped and a GPT2-XL-shaped model of 4 blocks (random bf16 weights, built
on the device from ``offsite_kernels.tiny.tiny_config``), made an emulator with
``ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, ...)`` and trained one step at a time
(``emu(input_ids, labels=ids).loss.backward()``, batch 8 x 512 tokens) in the variants

- ``plain_eager``: plain blocks with Hugging Face's eager attention; ``plain``: plain blocks with
  SDPA attention (the baseline of the speedups: ``fast`` switches to SDPA too);
- ``fast``: ``fast=True``; ``fast_int4``: ``fast=True, bits=4`` (group 128);
- ``plain_full`` / ``fast_full``: ``recompute="full"``; ``fast_block``: ``recompute="block"``;
- ``fast_graph`` / ``fast_int4_graph``: ``cuda_graphs=True`` (captured in the warm-up steps;
  ``cuda_graphs``: sets captured, block replays over all its steps, pool bytes, failed captures);
- ``fast_compile`` / ``fast_compile_graph``: ``compile="default"`` / ``compile="reduce-overhead"``
  (the emulator blocks' training calls through ``torch.compile``; compiled in the first call, which
  ``first_call_s`` times; ``compiled``: the blocks' mode and training calls compiled).

Each step is timed with events around it (CUDA events, ``perf_counter`` on a CPU), and forward
hooks on the first and last emulator block plus gradient hooks on their input and output time the
emulator part alone (``emu_fwd_ms``, ``emu_bwd_ms``). Reported: median step time and emulator time,
speedups against ``plain``, the recompute overhead ``(t_full - t_none) / t_none`` of each
``*_full`` and ``*_block`` variant against its ``recompute=None`` twin, the peak memory of a step over what was
allocated before it, and the first-step loss against ``plain``'s.

Every first call is made, synchronised and timed outside the measurement (``first_call_s``: by
default in a fresh, empty Triton cache; ``--keep-triton-cache`` for a warm start) and its output
checked against a float32 reference (``max_rel_err`` = max |out - ref| / max |ref| over the
outputs; bf16 tolerance ``--tolerance``). Timing of the op sections: ``triton.testing.do_bench(fn,
quantiles=[0.5, 0.2, 0.8])``. An exception in one row is recorded as that row's ``error`` and the
run goes on.

Output: JSON lines appended to ``<out>/fused_ops_gpu.jsonl`` (bench/stamp.py provenance on every
row) and a markdown report, printed last and written to ``<out>/fused_ops_gpu.md``, ending with the
issue's targets (norm backward >= 60 % of copy bandwidth and >= 1.5x a backward with dgamma; fused
head <= 1.15x the unfused time with <= 1/4 of its memory; fast blocks >= 1.3x plain; full
recompute overhead <= 25 %) and whether this run met them. Without a CUDA GPU (and without
``--device cpu``) it exits 1 with a message; it exits 1 too when an ``offsite`` row is wrong or
failed.

``--device cpu`` runs the same code on tiny shapes with a ``time.perf_counter`` timer (and, with
``--interpret``, the Triton kernels in Triton's interpreter); ``torch.compile`` and Liger are
skipped there, with a note. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # bench/ is not a package
    sys.path.insert(0, str(_HERE))

if TYPE_CHECKING:
    from frozen_linear_gpu import Ceilings

# frozen_linear_gpu (its timers and ceilings) and stamp are imported in main(), after TRITON_INTERPRET is
# set: importing them imports offsite_kernels (and torch, which imports triton), and Triton's interpreter
# must be chosen before that.
QUANTILES = (0.5, 0.2, 0.8)

SECTIONS = ("norm", "act", "head", "block")

# norms: hidden sizes (OPT-1.3B, Llama-2-7B, GPT2-XL) x rows
NORM_HIDDEN = (2048, 4096, 1600)
NORM_ROWS = (4096, 16384)
QUICK_NORM_HIDDEN, QUICK_NORM_ROWS = (4096,), (16384,)
SMOKE_NORM_HIDDEN, SMOKE_NORM_ROWS = (48, 40), (3, 16)
QUICK_SMOKE_NORM_HIDDEN, QUICK_SMOKE_NORM_ROWS = (40,), (16,)
NORM_KINDS = ("rms_norm", "layer_norm")

# activations: (op, label, features, gelu approximation)
ACT_CASES: tuple[tuple[str, str, int, str], ...] = (
    ("bias_gelu", "gpt2-xl/mlp (tanh)", 6400, "tanh"),
    ("bias_gelu", "8192 (erf)", 8192, "none"),
    ("swiglu", "llama-2-7b/mlp", 11008, ""),
    ("geglu", "gemma-7b/mlp (tanh)", 24576, "tanh"),
)
QUICK_ACT_CASES = ("gpt2-xl/mlp (tanh)", "llama-2-7b/mlp")
SMOKE_ACT_CASES: tuple[tuple[str, str, int, str], ...] = (
    ("bias_gelu", "tiny (tanh)", 80, "tanh"),
    ("bias_gelu", "tiny (erf)", 72, "none"),
    ("swiglu", "tiny", 80, ""),
    ("geglu", "tiny (tanh)", 80, "tanh"),
)
ACT_ROWS = (4096, 16384)
QUICK_ACT_ROWS = (16384,)
SMOKE_ACT_ROWS = (5,)

# fused head: (model, hidden, vocab) x tokens
HEAD_CASES: tuple[tuple[str, int, int], ...] = (("opt-1.3b", 2048, 50272), ("llama-2-7b", 4096, 32000))
HEAD_TOKENS = (4096, 16384)
QUICK_HEAD_CASES, QUICK_HEAD_TOKENS = (("llama-2-7b", 4096, 32000),), (4096,)
SMOKE_HEAD_CASES, SMOKE_HEAD_TOKENS = (("tiny", 32, 97),), (24,)

# whole blocks: name -> (model_type, config overrides, vocab)
BLOCK_MODELS: dict[str, tuple[str, dict[str, Any], int]] = {
    "llama-2-7b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        32000,
    ),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_head=25, n_inner=6400, n_positions=1024, layer_norm_epsilon=1e-5), 50257),
}
QUICK_BLOCK_MODELS = ("llama-2-7b",)
SMOKE_BLOCK_MODELS: dict[str, tuple[str, dict[str, Any], int]] = {"tiny-llama": ("llama", {}, 97), "tiny-gpt2": ("gpt2", {}, 97)}
QUICK_SMOKE_BLOCK_MODELS = ("tiny-llama", "tiny-gpt2")
BLOCK_LAYERS = 4  # bottom 1 + emulator 2 + top 1
# variant -> ok.make_emulator options; "attention" (default "sdpa") is the model's attention implementation
BLOCK_VARIANTS: dict[str, dict[str, Any]] = {
    "plain_eager": {"attention": "eager"},
    "plain": {},
    "fast": {"fast": True},
    "fast_int4": {"fast": True, "bits": 4},
    "plain_full": {"recompute": "full"},
    "fast_full": {"fast": True, "recompute": "full"},
    "fast_block": {"fast": True, "recompute": "block"},  # each block's input saved, each block rerun once
    "fast_graph": {"fast": True, "cuda_graphs": True},  # the emulator blocks replayed as CUDA graphs
    "fast_int4_graph": {"fast": True, "bits": 4, "cuda_graphs": True},
    "fast_compile": {"fast": True, "compile": "default"},  # through torch.compile
    "fast_compile_graph": {"fast": True, "compile": "reduce-overhead"},
}
QUICK_BLOCK_VARIANTS = ("plain", "fast", "fast_full", "fast_block", "fast_graph")
RECOMPUTE_TWIN = {"plain_full": "plain", "fast_full": "fast", "fast_block": "fast"}

# the issue's targets (GPU, H200): checked against this run's rows in the report
TARGET_NORM_BWD_PCT_COPY = 60.0
TARGET_NORM_BWD_VS_DGAMMA = 1.5
TARGET_HEAD_TIME_RATIO = 1.15
TARGET_HEAD_MEM_RATIO = 0.25
TARGET_BLOCK_SPEEDUP = 1.3
TARGET_RECOMPUTE_OVERHEAD_PCT = 25.0

BASELINES = ("eager", "eager_dgamma", "compile", "liger")


# --- pure row arithmetic (no torch, testable anywhere) ---------------------------------------------
def norm_traffic(kind: str, direction: str, rows: int, hidden: int, act_bytes: int, residual: bool) -> int:
    """Minimal bytes of one frozen-norm call: fwd reads x (+ residual) and writes y (+ h); bwd reads
    dy, the saved input and the fp32 row statistics (+ dh) and writes dx."""
    tensor = rows * hidden * act_bytes
    if direction == "fwd":
        return tensor * (4 if residual else 2)
    stats = rows * 4 * (2 if kind == "layer_norm" else 1)
    return tensor * (4 if residual else 3) + stats


def act_traffic(op: str, direction: str, rows: int, features: int, act_bytes: int) -> int:
    """Minimal bytes of one activation call: the inputs read, the outputs written (bwd: dy read too)."""
    tensor = rows * features * act_bytes
    if op in ("swiglu", "geglu"):
        return tensor * (3 if direction == "fwd" else 5)
    return tensor * (2 if direction == "fwd" else 3)


def timing_metrics(times_ms: Sequence[float], traffic: int | None, ceilings: Ceilings, flop: int | None = None) -> dict[str, Any]:
    median, p20, p80 = (float(t) for t in times_ms)
    out: dict[str, Any] = {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    if traffic is not None:
        gbps = traffic / (median * 1e-3) / 1e9
        out.update(traffic_bytes=traffic, gbps=gbps, pct_peak_gbps=100.0 * gbps / ceilings.gbps)
    if flop is not None:
        tflops = flop / (median * 1e-3) / 1e12
        out.update(flop=flop, tflops=tflops, pct_peak_tflops=100.0 * tflops / ceilings.tflops)
    return out


def fill_speedups(group: list[dict[str, Any]]) -> None:
    """``speedup_vs_<baseline>`` (baseline median / row median, > 1: faster) on the rows of one
    (op, shape, direction) group, for each baseline measured in it."""
    base = {r["impl"]: r["median_ms"] for r in group if r.get("median_ms") and r["impl"] in BASELINES}
    for r in group:
        for name, ms in base.items():
            r[f"speedup_vs_{name}"] = ms / r["median_ms"] if r.get("median_ms") else None


def fill_head_ratios(group: list[dict[str, Any]]) -> None:
    """``time_ratio`` and ``mem_ratio`` of each head row against the unfused head of its case (< 1: better)."""
    ref = next((r for r in group if r["impl"] == "unfused"), None)
    for r in group:
        ok_time = ref is not None and ref.get("median_ms") and r.get("median_ms")
        r["time_ratio"] = r["median_ms"] / ref["median_ms"] if ok_time else None
        ok_mem = ref is not None and ref.get("peak_bytes") and r.get("peak_bytes") is not None
        r["mem_ratio"] = r["peak_bytes"] / ref["peak_bytes"] if ok_mem else None


def fill_block_ratios(group: list[dict[str, Any]]) -> None:
    """Speedups of each block variant against ``plain`` (step and emulator part), and the recompute
    overhead of each ``*_full`` variant against its ``recompute=None`` twin, in %."""
    by = {r["variant"]: r for r in group if r.get("step_ms")}
    plain = by.get("plain")
    for r in group:
        step, emu = r.get("step_ms"), r.get("emu_ms")
        r["speedup_vs_plain"] = plain["step_ms"] / step if plain and step else None
        r["emu_speedup_vs_plain"] = plain["emu_ms"] / emu if plain and plain.get("emu_ms") and emu else None
        twin = by.get(RECOMPUTE_TWIN.get(r["variant"], ""))
        r["recompute_overhead_pct"] = 100.0 * (step - twin["step_ms"]) / twin["step_ms"] if twin and step else None


def _worst(values: list[float], higher_is_better: bool) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return min(values) if higher_is_better else max(values)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with this run's worst case over the measured shapes and whether it is met."""

    def pick(kind: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in rows if r.get("kind") == kind and not r.get("error") and all(r.get(k) == v for k, v in match.items())]

    norm_op = pick("op", section="norm", direction="bwd", impl="offsite_op")
    norm_ag = pick("op", section="norm", direction="bwd", impl="offsite")
    head = pick("head", impl="fused")
    fast = [r for r in pick("block") if r["variant"] == "fast"]
    # the library's recomputation of its own fast blocks (plain_full is shown in the table, not judged)
    full = [r for r in pick("block") if r["variant"] == "fast_full"]
    per_block = [r for r in pick("block") if r["variant"] == "fast_block"]
    spec = [
        ("norm bwd % of copy bandwidth (offsite_op)", [r.get("pct_peak_gbps") for r in norm_op], True, TARGET_NORM_BWD_PCT_COPY),
        (
            "norm bwd speedup vs eager with dgamma",
            [r.get("speedup_vs_eager_dgamma") for r in norm_ag],
            True,
            TARGET_NORM_BWD_VS_DGAMMA,
        ),
        ("fused head time / unfused", [r.get("time_ratio") for r in head], False, TARGET_HEAD_TIME_RATIO),
        ("fused head peak memory / unfused", [r.get("mem_ratio") for r in head], False, TARGET_HEAD_MEM_RATIO),
        ("fast emulator blocks speedup vs plain", [r.get("emu_speedup_vs_plain") for r in fast], True, TARGET_BLOCK_SPEEDUP),
        ("fast step speedup vs plain", [r.get("speedup_vs_plain") for r in fast], True, None),
        (
            "full recompute overhead % of step",
            [r.get("recompute_overhead_pct") for r in full],
            False,
            TARGET_RECOMPUTE_OVERHEAD_PCT,
        ),
        (
            "per-block recompute overhead % of step",
            [r.get("recompute_overhead_pct") for r in per_block],
            False,
            TARGET_RECOMPUTE_OVERHEAD_PCT,
        ),
    ]
    out = []
    for name, values, higher, threshold in spec:
        worst = _worst(values, higher)
        met = None if worst is None or threshold is None else (worst >= threshold if higher else worst <= threshold)
        out.append(
            dict(kind="target", name=name, worst=worst, threshold=threshold, higher_is_better=higher, met=met, n=len(values))
        )
    return out


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _note(r: dict[str, Any]) -> str:
    if r.get("error"):
        return "**error**: " + str(r["error"]).replace("|", "/").replace("\n", " ")[:160]
    return "**WRONG**" if r.get("correct") is False else ""


def markdown(rows: list[dict[str, Any]], st: dict[str, Any]) -> str:
    """The run as markdown: provenance, ceilings, one table per section, skips, targets."""
    from frozen_linear_gpu import provenance_lines

    run = next((r for r in rows if r.get("kind") == "run"), {})
    lines = [
        "# Fused frozen-block ops: norms, activations, fused head, emulator blocks",
        "",
        *provenance_lines(
            rows,
            st,
            f"bf16, backend {run.get('backend')}, timer {run.get('timer')}, Triton cache {run.get('triton_cache')}, "
            f"torch.compile {run.get('compile')}, Liger {run.get('liger')}",
        ),
        "- speedups and ratios are against baselines measured in this same run",
    ]
    ops = [r for r in rows if r.get("kind") == "op"]
    if ops:
        lines += [
            "",
            "## Norms and activations",
            "",
            "GB/s over the minimal traffic of the case (the same bytes for every implementation); "
            "x baseline = baseline time / this time (> 1: faster).",
            "",
            "| op | case | rows | N | residual | dir | impl | median ms | p20 ms | p80 ms | GB/s | % copy GB/s "
            "| x eager | x eager+dgamma | x compile | x liger | first call s | max rel err | note |",
            "|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in ops:
            lines.append(
                f"| {r['op']} | {r['case']} | {r['rows']} | {r['N']} | {'yes' if r.get('residual') else 'no'} | {r['direction']} "
                f"| {r['impl']} | {_fmt(r.get('median_ms'), '.4f')} | {_fmt(r.get('p20_ms'), '.4f')} | {_fmt(r.get('p80_ms'), '.4f')} "
                f"| {_fmt(r.get('gbps'), '.0f')} | {_fmt(r.get('pct_peak_gbps'), '.1f')} | {_fmt(r.get('speedup_vs_eager'), '.2f')} "
                f"| {_fmt(r.get('speedup_vs_eager_dgamma'), '.2f')} | {_fmt(r.get('speedup_vs_compile'), '.2f')} "
                f"| {_fmt(r.get('speedup_vs_liger'), '.2f')} | {_fmt(r.get('first_call_s'), '.2f')} "
                f"| {_fmt(r.get('max_rel_err'), '.1e')} | {_note(r)} |"
            )
    heads = [r for r in rows if r.get("kind") == "head"]
    if heads:
        lines += [
            "",
            "## Fused LM head + cross-entropy (forward + backward, frozen W: dh only)",
            "",
            "Peak = max_memory_allocated of one forward + backward over what was allocated before it (the inputs); "
            "ratios against `unfused` (< 1: better).",
            "",
            "| case | tokens | H | V | impl | median ms | p20 ms | p80 ms | TFLOP/s | time ratio | peak MiB | mem ratio "
            "| first call s | max rel err | note |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in heads:
            lines.append(
                f"| {r['case']} | {r['tokens']} | {r['H']} | {r['V']} | {r['impl']} | {_fmt(r.get('median_ms'), '.3f')} "
                f"| {_fmt(r.get('p20_ms'), '.3f')} | {_fmt(r.get('p80_ms'), '.3f')} | {_fmt(r.get('tflops'), '.1f')} "
                f"| {_fmt(r.get('time_ratio'), '.2f')} | {_mib(r.get('peak_bytes'))} | {_fmt(r.get('mem_ratio'), '.3f')} "
                f"| {_fmt(r.get('first_call_s'), '.2f')} | {_fmt(r.get('max_rel_err'), '.1e')} | {_note(r)} |"
            )
    blocks = [r for r in rows if r.get("kind") == "block"]
    if blocks:
        b0 = blocks[0]
        lines += [
            "",
            f"## Emulator blocks (forward + backward; {b0.get('n_layers')} blocks = bottom 1 + emulator 2 + top 1, "
            f"batch {b0.get('batch')} x {b0.get('seq')} tokens, bf16)",
            "",
            "step = the whole OffsiteModel training step (loss from labels through the fused head); emu = the two emulator "
            "blocks alone (hooks); x plain = plain time / this time; recompute overhead = (t_full - t_none) / t_none of the step.",
            "",
            "| model | variant | step ms | p20 ms | p80 ms | emu fwd ms | emu bwd ms | emu ms | x plain (step) | x plain (emu) "
            "| recompute overhead % | peak MiB | first step s | loss | loss rel err vs plain | note |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in blocks:
            lines.append(
                f"| {r['model']} | {r['variant']} | {_fmt(r.get('step_ms'), '.2f')} | {_fmt(r.get('step_p20_ms'), '.2f')} "
                f"| {_fmt(r.get('step_p80_ms'), '.2f')} | {_fmt(r.get('emu_fwd_ms'), '.2f')} | {_fmt(r.get('emu_bwd_ms'), '.2f')} "
                f"| {_fmt(r.get('emu_ms'), '.2f')} | {_fmt(r.get('speedup_vs_plain'), '.2f')} "
                f"| {_fmt(r.get('emu_speedup_vs_plain'), '.2f')} | {_fmt(r.get('recompute_overhead_pct'), '.1f')} "
                f"| {_mib(r.get('peak_bytes'))} | {_fmt(r.get('first_call_s'), '.2f')} | {_fmt(r.get('loss'), '.4f')} "
                f"| {_fmt(r.get('max_rel_err'), '.1e')} | {_note(r)} |"
            )
    skips = [r for r in rows if r.get("kind") == "skip"]
    if skips:
        lines += ["", "## Not measured", ""]
        lines += [f"- {r['what']}: {r['reason']}" for r in skips]
    tg = [r for r in rows if r.get("kind") == "target"]
    if tg:
        lines += [
            "",
            "## Targets of the issue (worst case over the measured shapes of this run)",
            "",
            *(
                ["A CPU smoke run: its numbers mean nothing, nor do these verdicts.", ""]
                if run.get("device") != "cuda"
                else ["Measured on the GPU above; the targets are for an H200.", ""]
            ),
            "| target | worst | threshold | met | cases |",
            "|---|---:|---:|---|---:|",
        ]
        for r in tg:
            cmp = ">=" if r["higher_is_better"] else "<="
            met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
            threshold = "-" if r["threshold"] is None else f"{cmp} {r['threshold']:g}"
            lines.append(f"| {r['name']} | {_fmt(r['worst'], '.3g')} | {threshold} | {met} | {r['n']} |")
    return "\n".join(lines) + "\n"


# --- measurement helpers ---------------------------------------------------------------------------
@dataclass
class Context:
    torch: Any
    ok: Any
    device: str
    dtype: Any
    timer: Callable[[Callable], list[float]]
    ceilings: Ceilings
    run_id: str
    tolerance: float
    block_tolerance: float
    compile: bool
    liger: Any  # liger_kernel.transformers.functional, or None
    group_size: int
    block_batch: int
    block_seq: int
    block_warmup: int
    block_reps: int

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def randn(self, *shape: int, gen: Any, scale: float = 1.0) -> Any:
        return (self.torch.randn(*shape, device=self.device, generator=gen) * scale).to(self.dtype)


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def max_rel_err(torch: Any, outs: Sequence[Any], refs: Sequence[Any]) -> float | None:
    """max over the pairs of max |out - ref| / max |ref|; None if an output holds a NaN or an infinity."""
    worst = 0.0
    for out, ref in zip(outs, refs, strict=True):
        out, ref = out.detach(), ref.detach().float()
        if not torch.isfinite(out).all():
            return None
        worst = max(worst, float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _first_call(ctx: Context, fn: Callable) -> tuple[Any, float]:
    ctx.sync()
    t0 = time.perf_counter()
    out = fn()
    ctx.sync()
    return out, time.perf_counter() - t0


def _grad(outs: tuple, inputs: tuple, grads: tuple) -> tuple:
    """The backward under test: torch.autograd.grad through a retained graph (nothing accumulates)."""
    import torch

    return _as_tuple(torch.autograd.grad(outs, inputs, grads, retain_graph=True))


def _autograd_bwd(inputs: tuple, grads: tuple, outs: Any) -> Callable:
    outs = _as_tuple(outs)
    return partial(_grad, outs, inputs, grads[: len(outs)])


def measure_impl(
    ctx: Context,
    base: dict[str, Any],
    impl: str,
    call: str,
    fwd: Callable[[], Any],
    make_bwd: Callable[[Any], Callable[[], Any]],
    refs: dict[str, tuple],
    traffic: dict[str, int],
    **extra: Any,
) -> list[dict[str, Any]]:
    """A ``fwd`` and a ``bwd`` row of one implementation: first calls checked against ``refs``, then timed.

    ``fwd()`` returns the outputs (and, with autograd, a graph); ``make_bwd(outs)`` the backward
    call through the outputs of the first forward call. ``refs["fwd"]`` / ``refs["bwd"]`` are
    compared with the first outputs / gradients, pairwise in order.
    """
    torch = ctx.torch
    rows = []
    outs = None
    for direction in ("fwd", "bwd"):
        row = {**base, "direction": direction, "impl": impl, "call": call, **extra}
        try:
            if direction == "fwd":
                outs, first = _first_call(ctx, fwd)
                got = _as_tuple(outs)
                fn = fwd
            else:
                if outs is None:
                    raise RuntimeError("no forward outputs to differentiate (the forward failed)")
                fn = make_bwd(outs)
                got, first = _first_call(ctx, fn)
                got = _as_tuple(got)
            ref = refs[direction]
            err = max_rel_err(torch, got[: len(ref)], ref)
            del got
            row.update(first_call_s=first, max_rel_err=err, correct=err is not None and err <= ctx.tolerance)
            row.update(timing_metrics(ctx.timer(fn), traffic[direction], ctx.ceilings))
        except Exception as exc:
            row["error"] = _error(exc)
            print(f"[bench] {base.get('op')} {base.get('case')} {direction} {impl}: {row['error']}", file=sys.stderr)
        rows.append(row)
    del outs
    return rows


# --- norms -------------------------------------------------------------------------------------------
def _residual_add(x: Any, res: Any) -> Any:
    return x if res is None else x + res


def _with_h(y: Any, h: Any, res: Any) -> tuple:
    return (y,) if res is None else (y, h)


def eager_rms(x: Any, w: Any, res: Any, eps: float) -> tuple:
    import torch.nn.functional as F

    h = _residual_add(x, res)
    return _with_h(F.rms_norm(h, (h.shape[-1],), w, eps), h, res)


def eager_rms_hf(x: Any, w: Any, res: Any, eps: float) -> tuple:
    """Hugging Face's LlamaRMSNorm forward, written out."""
    import torch

    h = _residual_add(x, res)
    v = h.to(torch.float32)
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return _with_h(w * v.to(h.dtype), h, res)


def eager_ln(x: Any, w: Any, b: Any, res: Any, eps: float) -> tuple:
    import torch.nn.functional as F

    h = _residual_add(x, res)
    return _with_h(F.layer_norm(h, (h.shape[-1],), w, b, eps), h, res)


def offsite_rms(ok: Any, x: Any, w: Any, res: Any, eps: float) -> tuple:
    return _as_tuple(ok.ops.rms_norm(x, w, eps, residual=res))


def offsite_ln(ok: Any, x: Any, w: Any, b: Any, res: Any, eps: float) -> tuple:
    return _as_tuple(ok.ops.layer_norm(x, w, b, eps, residual=res))


def liger_rms(liger: Any, x: Any, w: Any, res: Any, eps: float) -> tuple:
    h = _residual_add(x, res)
    return _with_h(liger.liger_rms_norm(h, w, eps, 0.0, "llama", False), h, res)


def liger_ln(liger: Any, x: Any, w: Any, b: Any, res: Any, eps: float) -> tuple:
    h = _residual_add(x, res)
    return _with_h(liger.liger_layer_norm(h, w, b, eps), h, res)


def _op_rms_fwd(torch: Any, x: Any, w: Any, res: Any, eps: float) -> tuple:
    return torch.ops.offsite_kernels.rms_norm(x, w, res, eps, 0.0, False)


def _op_ln_fwd(torch: Any, x: Any, w: Any, b: Any, res: Any, eps: float) -> tuple:
    return torch.ops.offsite_kernels.layer_norm(x, w, b, res, eps)


def _op_rms_bwd(torch: Any, dy: Any, dh: Any, w: Any, residual: bool, outs: tuple) -> Callable:
    x_or_h = outs[1] if residual else outs[3]
    return partial(torch.ops.offsite_kernels.rms_norm_input_grad, dy, x_or_h, w, outs[2], dh, 0.0)


def _op_ln_bwd(torch: Any, dy: Any, dh: Any, w: Any, residual: bool, outs: tuple) -> Callable:
    x_or_h = outs[1] if residual else outs[4]
    return partial(torch.ops.offsite_kernels.layer_norm_input_grad, dy, x_or_h, w, outs[2], outs[3], dh)


def _with_input(fn: Callable, x: Any) -> tuple:
    """The op's outputs plus its input at the end: the input-gradient op of a norm without residual reads x."""
    return (*fn(), x)


def _compiled(ctx: Context, fn: Callable) -> Callable:
    return ctx.torch.compile(fn)


def bench_norm(ctx: Context, kind: str, residual: bool, rows: int, hidden: int) -> list[dict]:
    torch, ok = ctx.torch, ctx.ok
    from offsite_kernels.ops.norm import layer_norm_input_grad_torch, layer_norm_torch, rms_norm_input_grad_torch, rms_norm_torch

    rms = kind == "rms_norm"
    eps = 1e-6 if rms else 1e-5
    gen = torch.Generator(device=ctx.device).manual_seed(rows * 7 + hidden + residual)
    x = ctx.randn(rows, hidden, gen=gen)
    res = ctx.randn(rows, hidden, gen=gen) if residual else None
    w = (1 + 0.1 * torch.randn(hidden, device=ctx.device, generator=gen)).to(ctx.dtype)
    b = None if rms else ctx.randn(hidden, gen=gen, scale=0.1)
    dy = ctx.randn(rows, hidden, gen=gen)
    dh = ctx.randn(rows, hidden, gen=gen) if residual else None
    grads = (dy, dh) if residual else (dy,)

    # float32 reference of the same math (h = x + residual unrounded)
    f32 = [None if t is None else t.float() for t in (x, res, w, b, dy, dh)]
    if rms:
        y_ref, h_ref, rstd_ref = rms_norm_torch(f32[0], f32[2], f32[1], eps)
        dx_ref = rms_norm_input_grad_torch(f32[4], f32[0] if h_ref is None else h_ref, f32[2], rstd_ref, f32[5])
    else:
        y_ref, h_ref, mean_ref, rstd_ref = layer_norm_torch(f32[0], f32[2], f32[3], f32[1], eps)
        dx_ref = layer_norm_input_grad_torch(f32[4], f32[0] if h_ref is None else h_ref, f32[2], mean_ref, rstd_ref, f32[5])
    refs = {"fwd": (y_ref,) if h_ref is None else (y_ref, h_ref), "bwd": (dx_ref,)}
    del f32
    act_bytes = x.element_size()
    traffic = {d: norm_traffic(kind, d, rows, hidden, act_bytes, residual) for d in ("fwd", "bwd")}
    case = f"{rows}x{hidden}"
    base = dict(kind="op", section="norm", run_id=ctx.run_id, op=kind, case=case, rows=rows, N=hidden, residual=residual)
    print(f"[bench] {kind} {case} residual={residual}", file=sys.stderr, flush=True)

    def leaves(*ts: Any) -> tuple:
        return tuple(t.detach().clone().requires_grad_(True) for t in ts if t is not None)

    xr, *rest = leaves(x, res)
    resr = rest[0] if residual else None
    inputs = (xr, resr) if residual else (xr,)
    wt = w.detach().clone().requires_grad_(True)
    bt = None if b is None else b.detach().clone().requires_grad_(True)
    trainable = (wt,) if bt is None else (wt, bt)

    # name -> (call, forward, backward maker)
    impls: list[tuple[str, str, Callable, Callable]] = []
    bwd_frozen = partial(_autograd_bwd, inputs, grads)
    if rms:
        impls.append(
            ("offsite", "ok.ops.rms_norm(x, w, eps, residual=r)", partial(offsite_rms, ok, xr, w, resr, eps), bwd_frozen)
        )
        op_fwd = partial(_with_input, partial(_op_rms_fwd, torch, x, w, res, eps), x)
        impls.append(
            (
                "offsite_op",
                "torch.ops.offsite_kernels.rms_norm / rms_norm_input_grad",
                op_fwd,
                partial(_op_rms_bwd, torch, dy, dh, w, residual),
            )
        )
        impls.append(("eager", "F.rms_norm(x (+ r), w frozen)", partial(eager_rms, xr, w, resr, eps), bwd_frozen))
        impls.append(
            (
                "eager_dgamma",
                "F.rms_norm(x (+ r), w requiring grad): backward computes dgamma",
                partial(eager_rms, xr, wt, resr, eps),
                partial(_autograd_bwd, inputs + trainable, grads),
            )
        )
        impls.append(("eager_hf", "LlamaRMSNorm formula, w frozen", partial(eager_rms_hf, xr, w, resr, eps), bwd_frozen))
    else:
        impls.append(
            ("offsite", "ok.ops.layer_norm(x, w, b, eps, residual=r)", partial(offsite_ln, ok, xr, w, b, resr, eps), bwd_frozen)
        )
        op_fwd = partial(_with_input, partial(_op_ln_fwd, torch, x, w, b, res, eps), x)
        impls.append(
            (
                "offsite_op",
                "torch.ops.offsite_kernels.layer_norm / layer_norm_input_grad",
                op_fwd,
                partial(_op_ln_bwd, torch, dy, dh, w, residual),
            )
        )
        impls.append(("eager", "F.layer_norm(x (+ r), w, b frozen)", partial(eager_ln, xr, w, b, resr, eps), bwd_frozen))
        impls.append(
            (
                "eager_dgamma",
                "F.layer_norm(x (+ r), w, b requiring grad): backward computes dgamma, dbeta",
                partial(eager_ln, xr, wt, bt, resr, eps),
                partial(_autograd_bwd, inputs + trainable, grads),
            )
        )
    group: list[dict] = []
    for name, call, fwd, make_bwd in impls:
        group += measure_impl(ctx, base, name, call, fwd, make_bwd, refs, traffic)

    if ctx.compile:
        try:
            fn = _compiled(ctx, eager_rms if rms else eager_ln)
            for t in inputs:
                torch._dynamo.mark_dynamic(t, 0)
            fwd = partial(fn, xr, w, resr, eps) if rms else partial(fn, xr, w, b, resr, eps)
            call = f"torch.compile({'eager_rms' if rms else 'eager_ln'}), rows dynamic"
            group += measure_impl(ctx, base, "compile", call, fwd, bwd_frozen, refs, traffic)
        except Exception as exc:
            group.append({**base, "direction": "fwd", "impl": "compile", "error": _error(exc)})
    if ctx.liger is not None:
        fwd = partial(liger_rms, ctx.liger, xr, wt, resr, eps) if rms else partial(liger_ln, ctx.liger, xr, wt, bt, resr, eps)
        call = "liger_rms_norm(x (+ r), w)" if rms else "liger_layer_norm(x (+ r), w, b)"
        group += measure_impl(ctx, base, "liger", call, fwd, partial(_autograd_bwd, inputs + trainable, grads), refs, traffic)

    for direction in ("fwd", "bwd"):
        fill_speedups([r for r in group if r["direction"] == direction])
    return group


# --- activations -------------------------------------------------------------------------------------
def eager_bias_gelu(x: Any, b: Any, approximate: str) -> tuple:
    import torch.nn.functional as F

    return (F.gelu(x + b, approximate=approximate),)


def eager_swiglu(g: Any, u: Any) -> tuple:
    import torch.nn.functional as F

    return (F.silu(g) * u,)


def offsite_bias_gelu(ok: Any, x: Any, b: Any, approximate: str) -> tuple:
    return (ok.ops.bias_gelu(x, b, approximate),)


def offsite_swiglu(ok: Any, g: Any, u: Any) -> tuple:
    return (ok.ops.swiglu(g, u),)


def liger_swiglu(liger: Any, g: Any, u: Any) -> tuple:
    return (liger.liger_swiglu(g, u),)


def eager_geglu(g: Any, u: Any, approximate: str) -> tuple:
    import torch.nn.functional as F

    return (F.gelu(g, approximate=approximate) * u,)


def offsite_geglu(ok: Any, g: Any, u: Any, approximate: str) -> tuple:
    return (ok.ops.geglu(g, u, approximate),)


def liger_geglu(liger: Any, g: Any, u: Any) -> tuple:
    return (liger.liger_geglu(g, u),)  # Liger's GeGLU: the tanh form


def _op_call(fn: Callable, *args: Any) -> tuple:
    return _as_tuple(fn(*args))


def _op_bwd(fn: Callable, args: tuple, _outs: Any) -> Callable:
    return partial(_op_call, fn, *args)


def bench_act(ctx: Context, op: str, label: str, features: int, approximate: str, rows: int) -> list[dict]:
    torch, ok = ctx.torch, ctx.ok
    from offsite_kernels.ops.activation import _GELU_ACTS, bias_act_input_grad_torch, bias_act_torch, gated_act_input_grad_torch

    gen = torch.Generator(device=ctx.device).manual_seed(rows * 3 + features)
    dy = ctx.randn(rows, features, gen=gen)
    case = f"{label}"
    base = dict(kind="op", section="act", run_id=ctx.run_id, op=op, case=case, rows=rows, N=features, residual=False)
    print(f"[bench] {op} {case} rows={rows}", file=sys.stderr, flush=True)
    traffic = {d: act_traffic(op, d, rows, features, dy.element_size()) for d in ("fwd", "bwd")}
    group: list[dict] = []
    if op == "bias_gelu":
        x = ctx.randn(rows, features, gen=gen)
        b = ctx.randn(features, gen=gen, scale=0.1)
        act = _GELU_ACTS[approximate]
        refs = {
            "fwd": (bias_act_torch(x.float(), b.float(), act),),
            "bwd": (bias_act_input_grad_torch(dy.float(), x.float(), b.float(), act),),
        }
        xr = x.detach().clone().requires_grad_(True)
        bwd = partial(_autograd_bwd, (xr,), (dy,))
        impls = [
            ("offsite", f"ok.ops.bias_gelu(x, b, {approximate!r})", partial(offsite_bias_gelu, ok, xr, b, approximate), bwd),
            (
                "offsite_op",
                "torch.ops.offsite_kernels.bias_gelu / bias_gelu_backward",
                partial(_op_call, torch.ops.offsite_kernels.bias_gelu, x, b, approximate),
                partial(_op_bwd, torch.ops.offsite_kernels.bias_gelu_backward, (dy, x, b, approximate)),
            ),
            ("eager", f"F.gelu(x + b, approximate={approximate!r})", partial(eager_bias_gelu, xr, b, approximate), bwd),
        ]
        compile_fwd = (eager_bias_gelu, (xr, b, approximate), (xr,))
        liger_fwd = None
    elif op == "geglu":
        g = ctx.randn(rows, features, gen=gen)
        u = ctx.randn(rows, features, gen=gen)
        refs = {
            "fwd": (bias_act_torch(g.float(), None, _GELU_ACTS[approximate]) * u.float(),),
            "bwd": gated_act_input_grad_torch(dy.float(), g.float(), u.float(), _GELU_ACTS[approximate]),
        }
        gr, ur = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
        bwd = partial(_autograd_bwd, (gr, ur), (dy,))
        name = "geglu" if approximate == "none" else "geglu_tanh"
        impls = [
            ("offsite", f"ok.ops.geglu(g, u, {approximate!r})", partial(offsite_geglu, ok, gr, ur, approximate), bwd),
            (
                "offsite_op",
                f"torch.ops.offsite_kernels.{name} / {name}_backward",
                partial(_op_call, getattr(torch.ops.offsite_kernels, name), g, u),
                partial(_op_bwd, getattr(torch.ops.offsite_kernels, f"{name}_backward"), (dy, g, u)),
            ),
            ("eager", f"F.gelu(g, approximate={approximate!r}) * u", partial(eager_geglu, gr, ur, approximate), bwd),
        ]
        compile_fwd = (eager_geglu, (gr, ur, approximate), (gr, ur))
        has_liger = ctx.liger is not None and hasattr(ctx.liger, "liger_geglu") and approximate == "tanh"
        liger_fwd = partial(liger_geglu, ctx.liger, gr, ur) if has_liger else None
    else:
        g = ctx.randn(rows, features, gen=gen)
        u = ctx.randn(rows, features, gen=gen)
        refs = {
            "fwd": (torch.nn.functional.silu(g.float()) * u.float(),),
            "bwd": gated_act_input_grad_torch(dy.float(), g.float(), u.float(), "silu"),
        }
        gr, ur = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
        bwd = partial(_autograd_bwd, (gr, ur), (dy,))
        impls = [
            ("offsite", "ok.ops.swiglu(g, u)", partial(offsite_swiglu, ok, gr, ur), bwd),
            (
                "offsite_op",
                "torch.ops.offsite_kernels.swiglu / swiglu_backward",
                partial(_op_call, torch.ops.offsite_kernels.swiglu, g, u),
                partial(_op_bwd, torch.ops.offsite_kernels.swiglu_backward, (dy, g, u)),
            ),
            ("eager", "F.silu(g) * u", partial(eager_swiglu, gr, ur), bwd),
        ]
        compile_fwd = (eager_swiglu, (gr, ur), (gr, ur))
        liger_fwd = partial(liger_swiglu, ctx.liger, gr, ur) if ctx.liger is not None else None
    for name, call, fwd, make_bwd in impls:
        group += measure_impl(ctx, base, name, call, fwd, make_bwd, refs, traffic)
    if ctx.compile:
        fn, args, dyn = compile_fwd
        try:
            compiled = _compiled(ctx, fn)
            for t in dyn:
                torch._dynamo.mark_dynamic(t, 0)
            call = f"torch.compile({fn.__name__}), rows dynamic"
            group += measure_impl(ctx, base, "compile", call, partial(compiled, *args), bwd, refs, traffic)
        except Exception as exc:
            group.append({**base, "direction": "fwd", "impl": "compile", "error": _error(exc)})
    if liger_fwd is not None:
        group += measure_impl(ctx, base, "liger", f"liger_{op}(g, u)", liger_fwd, bwd, refs, traffic)
    for direction in ("fwd", "bwd"):
        fill_speedups([r for r in group if r["direction"] == direction])
    return group


# --- fused head --------------------------------------------------------------------------------------
def unfused_head_loss(weight: Any, labels: Any, hidden: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def fused_head_loss(ok: Any, weight: Any, labels: Any, hidden: Any) -> Any:
    return ok.ops.fused_linear_cross_entropy(hidden, weight, labels, shift_labels=False)


def liger_head_loss(liger: Any, weight: Any, labels: Any, hidden: Any) -> Any:
    return liger.liger_fused_linear_cross_entropy(hidden, weight, labels)


def head_step(loss_fn: Callable, hidden: Any) -> tuple:
    """Forward + backward of a frozen head: the loss and dLoss/dhidden."""
    import torch

    loss = loss_fn(hidden)
    (grad,) = torch.autograd.grad(loss, hidden)
    return loss.detach(), grad


def peak_bytes(ctx: Context, fn: Callable) -> int | None:
    """Peak memory of one call over what was allocated before it (None off CUDA)."""
    if not ctx.cuda:
        return None
    torch = ctx.torch
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def bench_head(ctx: Context, case: str, hidden: int, vocab: int, tokens: int) -> list[dict]:
    torch, ok = ctx.torch, ctx.ok
    gen = torch.Generator(device=ctx.device).manual_seed(hidden + vocab + tokens)
    h = ctx.randn(tokens, hidden, gen=gen).requires_grad_(True)
    w = ctx.randn(vocab, hidden, gen=gen, scale=hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), device=ctx.device, generator=gen)
    base = dict(kind="head", section="head", run_id=ctx.run_id, case=case, tokens=tokens, H=hidden, V=vocab)
    print(f"[bench] head {case} tokens={tokens} H={hidden} V={vocab}", file=sys.stderr, flush=True)
    h32 = h.detach().float().requires_grad_(True)
    ref = head_step(partial(unfused_head_loss, w.float(), labels), h32)
    del h32
    flop = 4 * tokens * hidden * vocab  # logits, then dh = dlogits @ W
    impls = [
        ("unfused", "F.cross_entropy(F.linear(h, W).float(), labels), dh only", partial(unfused_head_loss, w, labels)),
        ("fused", "ok.ops.fused_linear_cross_entropy(h, W, labels, shift_labels=False)", partial(fused_head_loss, ok, w, labels)),
    ]
    if ctx.liger is not None:
        impls.append(("liger", "liger_fused_linear_cross_entropy(h, W, labels)", partial(liger_head_loss, ctx.liger, w, labels)))
    group = []
    for name, call, loss_fn in impls:
        row = {**base, "impl": name, "call": call}
        try:
            fn = partial(head_step, loss_fn, h)
            out, first = _first_call(ctx, fn)
            err = max_rel_err(torch, out, ref)
            del out
            row.update(first_call_s=first, max_rel_err=err, correct=err is not None and err <= ctx.tolerance)
            row["peak_bytes"] = peak_bytes(ctx, fn)
            row.update(timing_metrics(ctx.timer(fn), None, ctx.ceilings, flop=flop))
        except Exception as exc:
            row["error"] = _error(exc)
            print(f"[bench] head {case} {name}: {row['error']}", file=sys.stderr)
        group.append(row)
    fill_head_ratios(group)
    return group


# --- whole blocks ------------------------------------------------------------------------------------
class Clock:
    """Time stamps on the device's timeline: CUDA events, or perf_counter on a CPU."""

    def __init__(self, torch: Any, cuda: bool) -> None:
        self.torch, self.cuda = torch, cuda

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) if self.cuda else (end - start) * 1e3


class EmulatorSpan:
    """Marks the start and end of the emulator blocks' forward and backward inside one training step.

    Forward: a pre-hook on the first emulator block and a hook on the last one. Backward: gradient
    hooks on the last block's output (its gradient arrives: the emulator's backward starts) and on
    the first block's input (its gradient is complete: the emulator's backward is done). Only the
    first of each mark counts in a step (a recomputing backward may call the blocks again).
    """

    def __init__(self, clock: Clock, first: Any, last: Any) -> None:
        self.clock = clock
        self.marks: dict[str, Any] = {}
        self.handles = [first.register_forward_pre_hook(self._pre, with_kwargs=True), last.register_forward_hook(self._post)]

    def reset(self) -> None:
        self.marks = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _mark(self, name: str) -> bool:
        if name in self.marks:
            return False
        self.marks[name] = self.clock.now()
        return True

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._mark("fwd_start"):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if getattr(hidden, "requires_grad", False):
                hidden.register_hook(partial(self._on_grad, "bwd_end"))

    def _post(self, module: Any, args: tuple, output: Any) -> None:
        if self._mark("fwd_end"):
            hidden = output if not isinstance(output, (tuple, list)) else output[0]
            if getattr(hidden, "requires_grad", False):
                hidden.register_hook(partial(self._on_grad, "bwd_start"))

    def _on_grad(self, name: str, grad: Any) -> None:
        self._mark(name)

    def split_ms(self, marks: dict[str, Any]) -> tuple[float | None, float | None]:
        fwd = self.clock.ms(marks["fwd_start"], marks["fwd_end"]) if {"fwd_start", "fwd_end"} <= marks.keys() else None
        bwd = self.clock.ms(marks["bwd_start"], marks["bwd_end"]) if {"bwd_start", "bwd_end"} <= marks.keys() else None
        return fwd, bwd


def _median_p20_p80(values: list[float]) -> list[float]:
    """(median, p20, p80) of ``values``, linearly interpolated (as the op timers report them)."""
    values = sorted(values)
    out = []
    for q in QUANTILES:
        pos = q * (len(values) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(values) - 1)
        out.append(values[lo] + (values[hi] - values[lo]) * (pos - lo))
    return out


def build_block_model(ctx: Context, model_type: str, overrides: dict[str, Any], vocab: int) -> Any:
    """A random bf16 ``*ForCausalLM`` of ``BLOCK_LAYERS`` blocks, built on the device, SDPA attention."""
    torch = ctx.torch
    from transformers import AutoModelForCausalLM

    from offsite_kernels.tiny import tiny_config

    config = tiny_config(model_type, n_layers=BLOCK_LAYERS, vocab_size=vocab, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, dtype=ctx.dtype)
    return model


def train_step(emu: Any, ids: Any) -> Any:
    out = emu(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach()


def bench_block_variant(
    ctx: Context, model: Any, name: str, variant: str, ids: Any, plain_loss: float | None
) -> tuple[dict[str, Any], float | None]:
    torch, ok = ctx.torch, ctx.ok
    options = dict(BLOCK_VARIANTS[variant])
    attn = options.pop("attention", "sdpa")
    fast, bits, recompute = options.get("fast", False), options.get("bits"), options.get("recompute")
    graphs, compile_mode = options.get("cuda_graphs", False), options.get("compile")
    cfg = model.config
    base = dict(
        kind="block",
        section="block",
        run_id=ctx.run_id,
        model=name,
        variant=variant,
        fast=fast,
        bits=bits,
        recompute=recompute,
        attention=attn,
        n_layers=BLOCK_LAYERS,
        batch=int(ids.shape[0]),
        seq=int(ids.shape[1]),
        hidden=getattr(cfg, "hidden_size", None),
        call="ok.make_emulator(model, bottom=1, top=1, emulator_layers=2"
        + "".join(f", {k}={v!r}" for k, v in options.items())
        + "); emu(input_ids=ids, labels=ids).loss.backward()",
    )
    print(f"[bench] block {name} {variant}", file=sys.stderr, flush=True)
    row = dict(base)
    emu = span = None
    loss = None
    try:
        emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, group_size=ctx.group_size, **options)
        if attn != "sdpa":
            emu.model.config._attn_implementation = attn
        emu.train()
        blocks = [b for _, b in emu.emulator_blocks()]
        clock = Clock(torch, ctx.cuda)
        span = EmulatorSpan(clock, blocks[0], blocks[-1])
        step = partial(train_step, emu, ids)
        out, first = _first_call(ctx, step)
        loss = float(out)
        row.update(first_call_s=first, loss=loss)
        if plain_loss is not None and variant != "plain":
            err = abs(loss - plain_loss) / max(abs(plain_loss), 1e-30)
            row["max_rel_err"] = err
            if bits is None:  # a quantized emulator computes another function: its loss is reported, not judged
                row["correct"] = err <= ctx.block_tolerance
        row["peak_bytes"] = peak_bytes(ctx, step)
        for _ in range(ctx.block_warmup):
            step()
        samples = []
        for _ in range(ctx.block_reps):
            span.reset()
            t0 = clock.now()
            step()
            t1 = clock.now()
            samples.append((t0, t1, dict(span.marks)))
        ctx.sync()
        steps, fwds, bwds, emus = [], [], [], []
        for t0, t1, marks in samples:
            steps.append(clock.ms(t0, t1))
            f, b = span.split_ms(marks)
            if f is not None and b is not None:
                fwds.append(f)
                bwds.append(b)
                emus.append(f + b)
        row["step_ms"], row["step_p20_ms"], row["step_p80_ms"] = _median_p20_p80(steps)
        if emus:
            row["emu_fwd_ms"] = _median_p20_p80(fwds)[0]
            row["emu_bwd_ms"] = _median_p20_p80(bwds)[0]
            row["emu_ms"], row["emu_p20_ms"], row["emu_p80_ms"] = _median_p20_p80(emus)
        row["reps"] = len(steps)
        row["fast_blocks"] = len(emu.fast_blocks)
        if graphs:
            from offsite_kernels.nn.cuda_graphs import graph_report

            row["cuda_graphs"] = graph_report(emu)
        if compile_mode:
            from offsite_kernels.nn.compiled_blocks import compile_report

            row["compiled"] = compile_report(emu)
    except Exception as exc:
        row["error"] = _error(exc)
        print(f"[bench] block {name} {variant}: {row['error']}", file=sys.stderr)
    finally:
        if span is not None:
            span.remove()
        del emu
        if compile_mode and ctx.cuda:  # PyTorch's cudagraph trees keep their pools until reset
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    return row, loss


def bench_blocks(
    ctx: Context, name: str, model_type: str, overrides: dict[str, Any], vocab: int, variants: Sequence[str]
) -> list:
    torch = ctx.torch
    try:
        model = build_block_model(ctx, model_type, overrides, vocab)
    except Exception as exc:
        return [dict(kind="block", section="block", run_id=ctx.run_id, model=name, variant="build", error=_error(exc))]
    gen = torch.Generator(device=ctx.device).manual_seed(11)
    ids = torch.randint(0, vocab, (ctx.block_batch, ctx.block_seq), device=ctx.device, generator=gen)
    group = []
    plain_loss = None
    # plain first: the other variants' first-step losses are compared with its
    for variant in sorted(variants, key=lambda v: v != "plain"):
        row, loss = bench_block_variant(ctx, model, name, variant, ids, plain_loss)
        if variant == "plain":
            plain_loss = loss
        group.append(row)
    del model
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    fill_block_ratios(group)
    return group


# --- the run -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    norm_hidden: tuple[int, ...]
    norm_rows: tuple[int, ...]
    act_cases: tuple[tuple[str, str, int, str], ...]
    act_rows: tuple[int, ...]
    head_cases: tuple[tuple[str, int, int], ...]
    head_tokens: tuple[int, ...]
    block_models: dict[str, tuple[str, dict[str, Any], int]]
    block_variants: tuple[str, ...]


def make_plan(args: argparse.Namespace) -> Plan:
    cpu, quick = args.device == "cpu", args.quick
    if cpu:
        models = SMOKE_BLOCK_MODELS if not quick else {k: SMOKE_BLOCK_MODELS[k] for k in QUICK_SMOKE_BLOCK_MODELS}
        return Plan(
            QUICK_SMOKE_NORM_HIDDEN if quick else SMOKE_NORM_HIDDEN,
            QUICK_SMOKE_NORM_ROWS if quick else SMOKE_NORM_ROWS,
            SMOKE_ACT_CASES,
            SMOKE_ACT_ROWS,
            SMOKE_HEAD_CASES,
            SMOKE_HEAD_TOKENS,
            models,
            tuple(BLOCK_VARIANTS),  # every variant: the smoke run goes through every code path
        )
    if quick:
        return Plan(
            QUICK_NORM_HIDDEN,
            QUICK_NORM_ROWS,
            tuple(c for c in ACT_CASES if c[1] in QUICK_ACT_CASES),
            QUICK_ACT_ROWS,
            QUICK_HEAD_CASES,
            QUICK_HEAD_TOKENS,
            {k: BLOCK_MODELS[k] for k in QUICK_BLOCK_MODELS},
            QUICK_BLOCK_VARIANTS,
        )
    return Plan(NORM_HIDDEN, NORM_ROWS, ACT_CASES, ACT_ROWS, HEAD_CASES, HEAD_TOKENS, BLOCK_MODELS, tuple(BLOCK_VARIANTS))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(_HERE / "results"), help="directory of fused_ops_gpu.jsonl / .md (default bench/results)")
    p.add_argument("--quick", action="store_true", help="one shape per op, the Llama-2-7B block only (about a minute)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: tiny shapes, perf_counter timer (a smoke run)")
    p.add_argument(
        "--interpret", action="store_true", help="with --device cpu: Triton kernels in the interpreter (TRITON_INTERPRET=1)"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--compile", action="store_true", help="time the torch.compile baselines with --device cpu too")
    p.add_argument("--warmup-ms", type=int, default=10, help="do_bench warm-up time per op measurement")
    p.add_argument("--rep-ms", type=int, default=40, help="do_bench repetition time per op measurement")
    p.add_argument("--block-batch", type=int, default=None, help="sequences per block step (default 8; 2 on cpu)")
    p.add_argument("--block-seq", type=int, default=None, help="tokens per sequence in a block step (default 512; 8 on cpu)")
    p.add_argument("--block-reps", type=int, default=None, help="timed steps per block variant (default 10; 2 on cpu)")
    p.add_argument("--keep-triton-cache", action="store_true", help="use the existing Triton cache (default: a fresh one)")
    p.add_argument("--tolerance", type=float, default=2e-2, help="max |err| / max |ref| allowed for a first-call output")
    p.add_argument("--block-tolerance", type=float, default=5e-2, help="max relative first-step loss difference vs plain")
    args = p.parse_args(argv)
    if args.interpret and args.device != "cpu":
        p.error("--interpret runs Triton's CPU interpreter; it needs --device cpu")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from frozen_linear_gpu import run_gpu_script  # sets the environment before offsite_kernels and triton load

    return run_gpu_script(parse_args(argv), _run)


def _liger_functional(cuda: bool) -> tuple[Any, str]:
    if not cuda:
        return None, "skipped on CPU (its kernels need a GPU)"
    if importlib.util.find_spec("liger_kernel") is None:
        return None, "liger_kernel is not installed (pip install liger-kernel, a benchmark-only dependency)"
    try:
        import liger_kernel.transformers.functional as liger
    except Exception as exc:
        return None, f"liger_kernel is installed but does not import: {_error(exc)}"
    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return liger, f"liger_kernel {version}"


def _setup_compile(torch: Any) -> None:
    """One compiled graph per op, residual and hidden size: rows are marked dynamic; other shape
    changes recompile with static shapes (never fall back to eager on the recompile limit)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), 256))
    cfg.automatic_dynamic_shapes = False
    # the backward is timed through a retained graph (retain_graph=True), which donated buffers forbid
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False


def _run(args: argparse.Namespace, torch: Any, ok: Any, backend: str, cache_dir: str | None) -> int:
    from frozen_linear_gpu import Ceilings, do_bench_timer, measure_ceilings, perf_counter_timer, write_report
    from stamp import append_rows, stamp

    t_start = time.perf_counter()
    cuda = args.device == "cuda"
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    plan = make_plan(args)
    timer = do_bench_timer(args.warmup_ms, args.rep_ms) if cuda else perf_counter_timer(budget_s=0.0, min_reps=2, max_reps=2)
    st = stamp()
    run_id = uuid.uuid4().hex[:12]
    out_dir = Path(args.out)
    jsonl = out_dir / "fused_ops_gpu.jsonl"

    skips: list[dict[str, Any]] = []
    compile_on = (cuda or args.compile) and not args.no_compile
    if not cuda and not args.compile:
        compile_note = "skipped on CPU (a smoke run: Inductor's C++ compilation would dominate it; --compile to include it)"
    elif args.no_compile:
        compile_note = "skipped (--no-compile)"
    else:
        compile_note = f"torch {torch.__version__}, default mode, donated buffers off"
        _setup_compile(torch)
    if not compile_on and {"norm", "act"} & set(sections):
        skips.append(dict(kind="skip", what="torch.compile baselines", reason=compile_note))
    liger, liger_note = _liger_functional(cuda)
    if liger is None:
        skips.append(dict(kind="skip", what="Liger Kernel rows", reason=liger_note))
    if liger is not None and "act" in sections:
        skips.append(dict(kind="skip", what="Liger bias_gelu", reason="Liger has no bias + GELU op (its GeGLU is gelu(a) * b)"))
    for s in skips:
        s["run_id"] = run_id

    ceiling = measure_ceilings(torch, args.device, timer, 8192 if cuda else 256, 2**30 if cuda else 16 * 2**20)
    ceiling["run_id"] = run_id
    ceilings = Ceilings(ceiling["tflops"], ceiling["gbps"])
    print(f"[bench] ceilings: {ceilings.tflops:.1f} TFLOP/s bf16 GEMM, {ceilings.gbps:.0f} GB/s copy", file=sys.stderr)
    run_row = dict(
        kind="run",
        run_id=run_id,
        argv=sys.argv[1:],
        device=args.device,
        dtype="bf16",
        backend=backend,
        timer="triton.testing.do_bench (blocks: CUDA events)" if cuda else "time.perf_counter",
        triton_cache="interpreter" if args.interpret else "fresh" if cache_dir else "existing",
        compile=compile_note,
        liger=liger_note,
        sections=sections,
        quick=args.quick,
    )
    append_rows(jsonl, [run_row, ceiling, *skips], st)

    ctx = Context(
        torch=torch,
        ok=ok,
        device=args.device,
        dtype=torch.bfloat16,
        timer=timer,
        ceilings=ceilings,
        run_id=run_id,
        tolerance=args.tolerance,
        block_tolerance=args.block_tolerance,
        compile=compile_on,
        liger=liger,
        group_size=128 if cuda else 32,
        block_batch=args.block_batch or (8 if cuda else 2),
        block_seq=args.block_seq or (512 if cuda else 8),
        block_warmup=3 if cuda else 0,
        block_reps=args.block_reps or (10 if cuda else 2),
    )
    rows: list[dict] = []
    md_path = out_dir / "fused_ops_gpu.md"

    def emit(new: list[dict]) -> None:
        append_rows(jsonl, new, st)  # each case lands on disk as soon as it is done
        rows.extend(new)
        write_report(md_path, markdown([run_row, ceiling, *rows, *skips, *targets(rows)], st), run_id, rows_so_far=len(rows))
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()

    if "norm" in sections:
        for kind in NORM_KINDS:
            for residual in (False, True):
                for hidden in plan.norm_hidden:
                    for n_rows in plan.norm_rows:
                        emit(bench_norm(ctx, kind, residual, n_rows, hidden))
    if "act" in sections:
        for op, label, features, approximate in plan.act_cases:
            for n_rows in plan.act_rows:
                emit(bench_act(ctx, op, label, features, approximate, n_rows))
    if "head" in sections:
        for case, hidden, vocab in plan.head_cases:
            for tokens in plan.head_tokens:
                emit(bench_head(ctx, case, hidden, vocab, tokens))
    if "block" in sections:
        for name, (model_type, overrides, vocab) in plan.block_models.items():
            emit(bench_blocks(ctx, name, model_type, overrides, vocab, plan.block_variants))

    summary = targets(rows)
    wall = {"kind": "run_end", "run_id": run_id, "wall_s": time.perf_counter() - t_start, "n_rows": len(rows)}
    for r in summary:
        r["run_id"] = run_id
    append_rows(jsonl, [*summary, wall], st)

    md = markdown([run_row, ceiling, *rows, *skips, *summary], st)
    print(md)
    write_report(md_path, md, run_id)
    print(f"[bench] {len(rows)} rows appended to {jsonl}; report in {md_path}; {wall['wall_s']:.0f} s", file=sys.stderr)

    errors = [r for r in rows if r.get("error")]
    ours = [r for r in rows if r.get("impl", "").startswith("offsite") or r.get("impl") == "fused" or r.get("kind") == "block"]
    failed = [r for r in ours if r.get("error") or r.get("correct") is False]
    if errors:
        print(f"[bench] {len(errors)} rows failed (see their 'error')", file=sys.stderr)
    if failed:
        print(f"[bench] {len(failed)} rows of the library's ops failed or exceeded the error tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
