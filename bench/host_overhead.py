"""Host time per call of the per-layer ops: eager PyTorch, the library's direct eager path, its custom ops.

    python bench/host_overhead.py                  # the GPU if there is one, else the CPU (1 thread)
    python bench/host_overhead.py --device cpu --calls 200 --out /tmp/host.json

At the paper's batch (1 x 512 tokens) a norm or an activation takes the GPU a few µs; the Python
that launches it takes longer, so the host sets the step time. This measures that host time on
tensors small enough (8 rows) that the device never waits: the wall time of ``--calls`` calls in a
row (then one synchronize), per call, median of ``--rounds`` rounds with p20/p80. Three ways to run
each op, forward alone and forward + input backward:

- ``eager``: the plain PyTorch a Hugging Face block runs (``F.layer_norm``, ``F.gelu(x + b)``, ...);
- ``offsite``: the library's op in plain eager mode, its direct path (``offsite_kernels/ops/eager.py``);
- ``offsite_op``: the same op through its ``torch.library`` custom op (what ``torch.compile`` sees).

``offsite_op - offsite`` is what the direct path saves. On the CPU the library's ops run the PyTorch
reference (several aten calls per op) where a GPU runs one Triton kernel, so CPU rows compare the
wrappers, not the kernels.

``--blocks FAMILIES`` (e.g. ``gpt2,llama``) adds whole frozen blocks: the host time of one emulator
block's forward + input backward inside a training step of a tiny emulator (1 x 8 tokens), as the
difference between emulators of 1 and ``BLOCKS_MANY`` blocks (same adapters and head) divided by
the blocks added. Variants: ``plain`` (Hugging Face blocks), ``fast`` (the fused frozen ops),
``fast_compile`` (``compile="default"``), and on a GPU ``fast_graph`` (the library's CUDA graphs)
and ``fast_compile_graph`` (``compile="reduce-overhead"``). Warm-up steps compile and capture first.

``--stub-kernels`` (CPU only) runs the library's ops on their GPU code path with Triton's launcher
stubbed out (``bench/kernel_stubs.py``): the offsite columns are then the host time of the
library's own Python around each launch, which a GPU pays as it is (plus Triton's launcher).

Writes ``--out`` (JSON, stamped) and the tables as markdown beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_stubs import stubbed_kernel_launches
from stamp import stamp

import offsite_kernels as ok
from offsite_kernels.ops import activation, eager, norm

RESULTS = Path(__file__).resolve().parent / "results"
ROWS, HIDDEN = 8, 256
BLOCKS_MANY = 5  # emulator blocks of the larger emulator in --blocks (the smaller has one)
# fused_ops_gpu's block variants measured here; the CUDA-graph ones run on a GPU only
HOST_BLOCK_VARIANTS = ("plain", "fast", "fast_compile", "fast_graph", "fast_compile_graph")
CUDA_ONLY_VARIANTS = ("fast_graph", "fast_compile_graph")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_us(fn: Callable[[], object], device: torch.device, calls: int, rounds: int) -> dict[str, float]:
    """Median, p20 and p80 over ``rounds`` of the wall time per call of ``calls`` back-to-back calls (µs)."""
    for _ in range(max(calls // 10, 3)):
        fn()
    _sync(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / calls * 1e6)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_us": statistics.median(times), "p20_us": q[0], "p80_us": q[3]}


def cases(device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, Callable]]:
    """For each op, ``impl -> f(x)``; every ``f`` is differentiable in ``x`` (``[ROWS, HIDDEN]``)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(HIDDEN, generator=g).to(device, dtype)
    b = torch.randn(HIDDEN, generator=g).to(device, dtype)
    res = torch.randn(ROWS, HIDDEN, generator=g).to(device, dtype)
    lin = torch.randn(HIDDEN, HIDDEN, generator=g).to(device, dtype)
    q8 = ok.quantize_weight(lin, bits=8)
    ours = {
        "layer_norm": lambda x: norm.layer_norm(x, w, b, 1e-5),
        "layer_norm+residual": lambda x: norm.layer_norm(x, w, b, 1e-5, residual=res)[0],
        "rms_norm": lambda x: norm.rms_norm(x, w, 1e-6),
        "bias_gelu_tanh": lambda x: activation.bias_gelu(x, b, "tanh"),
        "swiglu": lambda x: activation.swiglu(x, res),
        "frozen_linear_int8": lambda x: ok.frozen_linear(x, q8),
    }
    plain = {
        "layer_norm": lambda x: F.layer_norm(x, (HIDDEN,), w, b, 1e-5),
        "layer_norm+residual": lambda x: F.layer_norm(x + res, (HIDDEN,), w, b, 1e-5),
        "rms_norm": lambda x: F.rms_norm(x, (HIDDEN,), w, 1e-6),
        "bias_gelu_tanh": lambda x: F.gelu(x + b, approximate="tanh"),
        "swiglu": lambda x: F.silu(x) * res,
        "frozen_linear_int8": lambda x: F.linear(x, lin),  # a dense frozen weight, for scale
    }
    return {name: {"eager": plain[name], "offsite": ours[name], "offsite_op": ours[name]} for name in ours}


def run(device: torch.device, calls: int, rounds: int, on_row: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Host µs per call of every (op, implementation); ``on_row`` gets the rows so far after each."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(ROWS, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(ROWS, HIDDEN, device=device, dtype=dtype)
    rows = []
    for op, impls in cases(device, dtype).items():
        for impl, f in impls.items():
            eager.ENABLED = impl != "offsite_op"
            try:
                fwd = per_call_us(lambda f=f: f(x), device, calls, rounds)
                both = per_call_us(lambda f=f: f(x).backward(gy), device, calls, rounds)
            finally:
                eager.ENABLED = True
            rows.append({"op": op, "impl": impl, "fwd": fwd, "fwd_bwd": both})
            on_row(rows)
    return rows


def block_rows(families: list[str], device: torch.device, calls: int, rounds: int) -> list[dict]:
    """Host µs of one frozen block's forward + input backward per family and variant (see module docs)."""
    from fused_ops_gpu import BLOCK_VARIANTS

    from offsite_kernels.tiny import tiny_model

    variants = [v for v in HOST_BLOCK_VARIANTS if device.type == "cuda" or v not in CUDA_ONLY_VARIANTS]
    rows = []
    for family in families:
        for variant in variants:
            steps = {}
            try:
                for blocks in (1, BLOCKS_MANY):
                    model = tiny_model(family, n_layers=BLOCKS_MANY + 2, seed=0).to(device)
                    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=blocks, **BLOCK_VARIANTS[variant]).train()
                    ids = torch.randint(3, 90, (1, ROWS), device=device)
                    step = lambda emu=emu, ids=ids: emu(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # noqa: E731
                    for _ in range(3):  # compile, capture
                        step()
                    steps[blocks] = per_call_us(step, device, calls, rounds)
                    del emu, model
                per_block = (steps[BLOCKS_MANY]["median_us"] - steps[1]["median_us"]) / (BLOCKS_MANY - 1)
                rows.append({"family": family, "variant": variant, "block_fwd_bwd_us": per_block, "steps": steps})
            except Exception as exc:  # a row, not a crash: the other variants still run
                rows.append({"family": family, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})
            if device.type == "cuda" and BLOCK_VARIANTS[variant].get("compile"):
                from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                reset_cudagraph_trees()
    return rows


def block_markdown(result: dict) -> list[str]:
    rows = result.get("blocks") or []
    if not rows:
        return []
    lines = [
        "",
        f"## Host time of one frozen block, forward + input backward, µs (tiny emulators, 1 x {ROWS} tokens, "
        f"1 and {BLOCKS_MANY} emulator blocks)",
        "",
        f"| family | variant | per block | step, 1 block | step, {BLOCKS_MANY} blocks | error |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['variant']} | | | | {r['error']} |")
            continue
        one, many = r["steps"][1]["median_us"], r["steps"][BLOCKS_MANY]["median_us"]
        lines.append(f"| {r['family']} | {r['variant']} | {r['block_fwd_bwd_us']:.0f} | {one:.0f} | {many:.0f} | |")
    return lines


def markdown(result: dict) -> str:
    by = {(r["op"], r["impl"]): r for r in result["rows"]}
    ops = list(dict.fromkeys(r["op"] for r in result["rows"]))
    lines = [
        f"# Host time per call, µs ({result['device_name']}, {result['dtype']}, {ROWS} x {HIDDEN}, "
        f"{result['threads']} thread(s), median of {result['rounds']} rounds of {result['calls']} calls)",
        "",
        "| op | eager fwd | offsite fwd | offsite_op fwd | eager fwd+bwd | offsite fwd+bwd | offsite_op fwd+bwd "
        "| saved by the direct path, fwd+bwd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if result.get("partial"):
        lines.insert(1, "\n**Partial: the run stopped before every op was measured.**")
    for op in ops:
        if any((op, impl) not in by for impl in ("eager", "offsite", "offsite_op")):
            continue  # a partial run: this op's implementations not all measured yet
        e, o, c = by[(op, "eager")], by[(op, "offsite")], by[(op, "offsite_op")]
        saved = c["fwd_bwd"]["median_us"] - o["fwd_bwd"]["median_us"]
        cells = [e["fwd"], o["fwd"], c["fwd"], e["fwd_bwd"], o["fwd_bwd"], c["fwd_bwd"]]
        lines.append(f"| {op} | " + " | ".join(f"{v['median_us']:.1f}" for v in cells) + f" | {saved:.1f} |")
    lines += ["", "eager: plain PyTorch (frozen_linear_int8's eager row is a dense F.linear, for scale)."]
    if result.get("stub_kernels"):
        lines.append(
            "Kernel launches stubbed (bench/kernel_stubs.py): the library's ops take their GPU (Triton) code path on the "
            "CPU and Triton's launcher returns at once, so offsite columns are the library's Python around each launch. "
            "A GPU adds Triton's launcher and the driver's launch per kernel."
        )
    elif result["device"] == "cpu":
        lines.append("On the CPU the library's ops run the PyTorch reference (several aten calls each), not a kernel.")
    lines += block_markdown(result)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=500, help="back-to-back calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/host_overhead-<device>.json)")
    parser.add_argument("--blocks", default="", help="families for the whole-block rows, comma-separated (e.g. gpt2,llama)")
    parser.add_argument(
        "--stub-kernels", action="store_true", help="CPU: the ops' GPU code path with Triton's launcher stubbed (module docs)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.stub_kernels and device.type != "cpu":
        parser.error("--stub-kernels measures the host path on a CPU; on a GPU the real launches are measured")
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.stub_kernels:
        torch.set_flush_denormal(True)  # stubbed outputs are uninitialised memory: no slow denormal arithmetic on them
    families = [f.strip() for f in args.blocks.split(",") if f.strip()]
    st = stamp()
    out = args.out or RESULTS / f"host_overhead-{device.type}{'-stubbed' if args.stub_kernels else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict], blocks: list[dict], partial: bool) -> str:
        """The JSON and markdown of the rows so far (rewritten after each: a run cut short keeps them)."""
        result = {
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "dtype": "bf16" if device.type == "cuda" else "fp32",
            "threads": torch.get_num_threads(),
            "stub_kernels": args.stub_kernels,
            "calls": args.calls,
            "rounds": args.rounds,
            "rows": rows,
            "blocks": blocks,
            "stamp": st,
            "partial": partial,
        }
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)
        md = markdown(result)
        md_tmp = out.with_suffix(".md.tmp")
        md_tmp.write_text(md)
        md_tmp.replace(out.with_suffix(".md"))
        return md

    with stubbed_kernel_launches() if args.stub_kernels else contextlib.nullcontext():
        rows = run(device, args.calls, args.rounds, on_row=lambda so_far: write(so_far, [], partial=True))
        blocks = block_rows(families, device, max(args.calls // 20, 3), args.rounds) if families else []
    print(write(rows, blocks, partial=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
