"""CPU benchmark of the native extension (csrc/cpu/), side by side with the PyTorch reference in one run.

    python bench/native_cpu.py                     # writes bench/results/native_cpu.json and native_cpu.md
    python bench/native_cpu.py --reps 5 --quick    # fewer repetitions, smaller quantize shape (a smoke run)

Two parts, fp32, every case timed interleaved (one call of each implementation per round, rounds repeated; the
median is reported with p20/p80), so that a load spike hits every implementation alike:

1. Quantize and pack a 7B-sized projection (Llama-2-7B ``mlp.up_proj``, 11008 x 4096) to int8 (per channel) and
   int4 (group 128): ``offsite_kernels.native`` (the C++ kernels) vs the reference (``quant.formats.quantize_int8`` /
   ``quantize_int4``, pure PyTorch), at the machine's thread count and at 1 thread. Targets: native >= 5x faster.
2. The frozen linear at M = 512 tokens on the four GPT2-XL projections (``attn.c_attn`` 1600 -> 4800,
   ``attn.c_proj`` 1600 -> 1600, ``mlp.c_fc`` 1600 -> 6400, ``mlp.c_proj`` 6400 -> 1600): forward
   (``y = x W^T``) and input backward (``dx = dy W``) of the native tiled kernel with an int8 / int4 weight vs a
   dense fp32 ``torch.nn.functional.linear`` (forward) and ``dy @ W`` (the input gradient autograd computes for it).
   Also the torch reference low-bit path (dequantize the whole weight, then the same GEMM) for context. Target:
   native within 1.3x of dense fp32, with the weight held at int4/int8 size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stamp import stamp

import offsite_kernels as ok
from offsite_kernels import native
from offsite_kernels.quant import formats as ref

RESULTS = Path(__file__).resolve().parent / "results"
QUANT_SHAPE = (11008, 4096)  # Llama-2-7B mlp.up_proj [out, in]
GPT2_XL = {"attn.c_attn": (4800, 1600), "attn.c_proj": (1600, 1600), "mlp.c_fc": (6400, 1600), "mlp.c_proj": (1600, 6400)}
TOKENS = 512
SMALL_M = (1, 16)  # context: evaluation-sized calls on one shape
GROUP = 128


def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median, p20 and p80 (ms) of each callable, timed one call per round, rounds interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
        out[name] = {"median_ms": statistics.median(ts), "p20_ms": q[1], "p80_ms": q[7], "reps": len(ts)}
    return out


def bench_quantize(shape: tuple[int, int], reps: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    C = native.get()
    rows = []
    for fmt in ("int8", "int4"):
        if fmt == "int8":
            fns = {"native": lambda: C.quantize_int8(w), "torch": lambda: ref.quantize_int8(w)}
        else:
            fns = {"native": lambda: C.quantize_int4(w, GROUP), "torch": lambda: ref.quantize_int4(w, GROUP)}
        # bit-exact, checked on the benchmarked shape itself
        got = fns["native"]()
        want = fns["torch"]()
        exact = all(torch.equal(a, b) for a, b in zip(got, want.tensors().values(), strict=True))
        res = interleaved(fns, reps)
        rows.append(
            {
                "part": "quantize",
                "format": fmt,
                "group_size": GROUP if fmt == "int4" else None,
                "shape": list(shape),
                "threads": threads,
                "bit_exact": exact,
                "native": res["native"],
                "torch": res["torch"],
                "speedup": res["torch"]["median_ms"] / res["native"]["median_ms"],
                "native_gb_per_s_read": w.numel() * 4 / res["native"]["median_ms"] / 1e6,
            }
        )
    return rows


def bench_linear(reps: int, threads: int, tokens: int = TOKENS, layers: tuple[str, ...] = tuple(GPT2_XL)) -> list[dict]:
    torch.set_num_threads(threads)
    C = native.get()
    rows = []
    g = torch.Generator().manual_seed(1)
    for name in layers:
        n, k = GPT2_XL[name]
        w = torch.randn(n, k, generator=g) * 0.02
        x = torch.randn(tokens, k, generator=g)
        dy = torch.randn(tokens, n, generator=g)
        qws = {fmt: ok.quantize_weight(w, bits=bits, group_size=GROUP) for fmt, bits in (("int8", 8), ("int4", 4))}
        for direction in ("fwd", "bwd"):
            fns = _linear_fns(C, direction, x, w, dy, qws)
            res = interleaved(fns, reps)
            base = res["dense fp32"]["median_ms"]
            flop = 2 * tokens * n * k
            for impl, r in res.items():
                fmt = impl.split()[-1] if impl != "dense fp32" else "dense"
                weight_bytes = w.numel() * 4 if fmt == "dense" else qws[fmt].nbytes()
                rows.append(
                    {
                        "part": "frozen_linear",
                        "layer": f"gpt2-xl {name}",
                        "direction": direction,
                        "impl": impl,
                        "M": tokens,
                        "N": n,
                        "K": k,
                        "threads": threads,
                        **r,
                        "vs_dense": r["median_ms"] / base,
                        "gflop_per_s": flop / r["median_ms"] / 1e6,
                        "weight_bytes": weight_bytes,
                    }
                )
    return rows


def _linear_fns(C, direction: str, x, w, dy, qws: dict) -> dict:
    """The callables of one (shape, direction) case: dense fp32, then native and reference per format."""
    n, k = w.shape
    if direction == "fwd":
        out = torch.empty(x.shape[0], n)
        fns = {"dense fp32": lambda: F.linear(x, w)}
        for fmt, qw in qws.items():
            fns[f"native {fmt}"] = lambda qw=qw: C.frozen_linear_fwd(x, qw.format, qw.data, qw.scales, qw.zeros, None, GROUP, out)
            fns[f"torch {fmt}"] = lambda qw=qw: F.linear(x, _ref_dense(qw))
    else:
        out = torch.empty(dy.shape[0], k)
        fns = {"dense fp32": lambda: dy @ w}
        for fmt, qw in qws.items():
            fns[f"native {fmt}"] = lambda qw=qw: C.frozen_linear_bwd(dy, qw.format, qw.data, qw.scales, qw.zeros, GROUP, out)
            fns[f"torch {fmt}"] = lambda qw=qw: dy @ _ref_dense(qw)
    return fns


def _ref_dense(qw):
    """The reference low-bit path: dequantize the whole weight with PyTorch, as the torch backend does."""
    return ref.dequantize_fields(qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, qw.shape, torch.float32)


def tile_buffer_bytes(threads: int) -> dict:
    fwd_n, fwd_k, bwd_k, bwd_n = native.get().get_tiles()
    return {
        "tiles": {"fwd_n": fwd_n, "fwd_k": fwd_k, "bwd_k": bwd_k, "bwd_n": bwd_n},
        "note": "per thread, the forward buffer holds at most ceil(N / tasks) x min(K, fwd_k) fp32 values (tasks >= threads, "
        "about N / fwd_n); the backward at most min(N, bwd_n) x ceil(K / tasks) (multiple of 16): a few hundred KiB",
    }


def markdown(result: dict) -> str:
    st = result["stamp"]
    lines = [
        "# Native CPU kernels vs the PyTorch reference (one run, side by side)",
        "",
        f"CPU: {st['cpu']} ({st['cpu_count']} cores), torch {st['versions']['torch']}, load average (1 min) at start "
        f"{st['loadavg_1m']}, {result['date']}, commit {str(st['git']['commit'])[:10]}{' (dirty)' if st['git']['dirty'] else ''}. "
        f"Times are medians of {result['reps']} interleaved rounds (p20-p80 in brackets), ms.",
        "",
        "## Quantize + pack (Llama-2-7B `mlp.up_proj`, 11008 x 4096, fp32 in)",
        "",
        "| format | threads | native | torch reference | speed-up | bit-exact |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["quantize"]:
        fmt = r["format"] + (f" g{r['group_size']}" if r["group_size"] else "")
        n, t = r["native"], r["torch"]
        lines.append(
            f"| {fmt} | {r['threads']} | {n['median_ms']:.1f} [{n['p20_ms']:.1f}-{n['p80_ms']:.1f}] | "
            f"{t['median_ms']:.1f} [{t['p20_ms']:.1f}-{t['p80_ms']:.1f}] | {r['speedup']:.1f}x | {r['bit_exact']} |"
        )
    lines += [
        "",
        f"## Frozen linear, M = {TOKENS}, GPT2-XL shapes, fp32 activations, {result['threads']} threads",
        "",
        "`vs dense` = time / dense fp32 time in the same run (target for native: <= 1.3). `torch intN` = the reference "
        "low-bit path (dequantize the whole weight, then the same GEMM).",
        "",
        "| layer (N x K) | direction | impl | ms | vs dense | GFLOP/s | weight MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["frozen_linear"]:
        lines.append(
            f"| {r['layer']} ({r['N']} x {r['K']}) | {r['direction']} | {r['impl']} | {r['median_ms']:.1f} "
            f"[{r['p20_ms']:.1f}-{r['p80_ms']:.1f}] | {r['vs_dense']:.2f} | {r['gflop_per_s']:.0f} | {r['weight_bytes'] / 2**20:.2f} |"
        )
    lines += [
        "",
        "Context, small M (gpt2-xl mlp.c_fc 6400 x 1600):",
        "",
        "| M | direction | impl | ms | vs dense |",
        "|---|---|---|---|---|",
    ]
    for r in result["frozen_linear_small_m"]:
        lines.append(f"| {r['M']} | {r['direction']} | {r['impl']} | {r['median_ms']:.2f} | {r['vs_dense']:.2f} |")
    worst = {}
    for r in result["frozen_linear"]:
        if r["impl"].startswith("native"):
            key = r["impl"]
            worst[key] = max(worst.get(key, 0), r["vs_dense"])
    lines += [
        "",
        "Worst native / dense ratio over the shapes and directions: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="a 2752 x 4096 quantize shape and 3 rounds (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "native_cpu.json")
    args = parser.parse_args()
    if not native.available():
        sys.exit(f"the native extension is not available: {native.unavailable_reason()}")
    reps = 3 if args.quick else args.reps
    shape = (2752, 4096) if args.quick else QUANT_SHAPE
    threads = torch.get_num_threads()
    st = stamp()
    result = {
        "date": st["date"],
        "reps": reps,
        "threads": threads,
        "quantize": bench_quantize(shape, reps, threads) + (bench_quantize(shape, reps, 1) if threads > 1 else []),
        "frozen_linear": bench_linear(reps, threads),
        "frozen_linear_small_m": [r for m in SMALL_M for r in bench_linear(reps, threads, m, ("mlp.c_fc",))],
        "buffers": tile_buffer_bytes(threads),
        "native_build": native.get().build_info(),
        "stamp": st,
    }
    torch.set_num_threads(threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
