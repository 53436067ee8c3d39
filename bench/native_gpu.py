"""GPU benchmark of the native skinny low-bit GEMM (csrc/cuda/skinny_gemm.cu), side by side with the Triton
kernel and bf16 cuBLAS, for M <= 16 tokens; and the measurements behind the GPU dispatch table.

One call on a GPU machine (the extension built with its CUDA part: ``pip install --no-build-isolation -e .``)::

    python bench/native_gpu.py --write-table    # ~5 min on an H200
    python -m pytest -q -m gpu tests/test_native_cuda.py

writes ``bench/results/native_gpu.json`` (stamped: GPU, driver, torch, triton), ``bench/results/native_gpu.md``
and, with ``--write-table``, ``offsite_kernels/native/dispatch_table.py`` (the backend per format and M bucket
that the frozen linear's forward uses on a GPU). Commit all three.

Per (shape, format, M bucket), bf16 activations, ``triton.testing.do_bench`` (median, p20, p80; L2 flushed):

- ``native``: ``offsite_kernels.native.skinny_gemm`` (the C++/CUDA kernel, int4 group 128 or int8);
- ``triton``: the Triton fused dequant GEMM (``ops.frozen_linear_triton.frozen_linear_fwd``), autotuned first;
- ``torch``: the reference low-bit path (dequantize the whole weight to bf16, then cuBLAS);
- ``cublas_bf16``: ``F.linear`` with a dense bf16 weight (what the low-bit kernels are measured against; it
  moves 4x (int4) or 2x (int8) more weight bytes).

Bandwidth: the bytes the low-bit call must move (packed weight + scales + zeros + x + y) over the time, as GB/s and
as a percentage of the measured device-to-device copy bandwidth (1 GiB tensor) and of the GPU's nominal figure
(H200: 4.8 TB/s). The issue's target: native >= 80% of the bandwidth on the packed bytes.

Table: for each format and bucket, the backend with the lowest geometric-mean time over the shapes among
``native``, ``triton`` and ``torch`` (the ones that run a low-bit weight).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

RESULTS = _HERE / "results"
TABLE_PATH = _HERE.parent / "offsite_kernels" / "native" / "dispatch_table.py"
SHAPES = {  # name -> (N, K)
    "llama-2-7b q/k/v/o_proj": (4096, 4096),
    "llama-2-7b gate/up_proj": (11008, 4096),
    "llama-2-7b down_proj": (4096, 11008),
    "gpt2-xl attn.c_attn": (4800, 1600),
    "gpt2-xl mlp.c_fc": (6400, 1600),
    "gpt2-xl mlp.c_proj": (1600, 6400),
}
BUCKETS = (1, 2, 4, 8, 16)
FORMATS = {"int4": 4, "int8": 8}
GROUP = 128
NOMINAL_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # nominal HBM bandwidth, GB/s


def nominal_bandwidth(name: str) -> float | None:
    for key, gbps in NOMINAL_GBPS.items():
        if key in name:
            return gbps
    return None


def copy_bandwidth() -> float:
    """Measured device-to-device copy GB/s (bytes read + written) on a 1 GiB tensor."""
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])[0]  # the median
    return 2 * src.numel() / ms / 1e6


def derive_table(rows: list[dict]) -> dict[str, dict[int, str]]:
    """Backend per format and M bucket: the lowest geometric-mean time over the shapes (native/triton/torch)."""
    table: dict[str, dict[int, str]] = {}
    for fmt in FORMATS:
        table[fmt] = {}
        for m in BUCKETS:
            best, best_t = "triton", math.inf
            for impl in ("native", "triton", "torch"):
                ts = [
                    r["median_ms"] for r in rows if r["format"] == fmt and r["M"] == m and r["impl"] == impl and "error" not in r
                ]
                if ts and len(ts) == len({r["shape"] for r in rows if r["format"] == fmt and r["M"] == m}):
                    t = math.exp(statistics.fmean(math.log(x) for x in ts))
                    if t < best_t:
                        best, best_t = impl, t
            table[fmt][m] = best
    return table


def write_table(table: dict[str, dict[int, str]], source: str, path: Path = TABLE_PATH) -> None:
    rows = "\n".join(f"    {fmt!r}: {{{', '.join(f'{m}: {v!r}' for m, v in sorted(r.items()))}}}," for fmt, r in table.items())
    path.write_text(
        '"""GPU dispatch table of the low-bit frozen-linear forward (see dispatch.py). Written by bench/native_gpu.py."""\n\n'
        "MEASURED = True\n"
        f"SOURCE = {source!r}\n"
        f"TABLE: dict[str, dict[int, str]] = {{\n{rows}\n}}\n"
    )


def _reference_dense(qw, dtype):
    """The torch backend's path: dequantize the whole weight with PyTorch ops in the activation dtype."""
    from offsite_kernels.quant.formats import dequantize_fields

    return dequantize_fields(qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, qw.shape, dtype)


def bench(reps_ms: int, on_progress: Callable[[dict], None] = lambda result: None) -> dict:
    """Every case, each in its own ``try`` (a failure is that case's ``error`` row); ``on_progress`` gets
    the result so far after each (shape, format), so a run cut short keeps what it measured."""
    import triton.testing

    import offsite_kernels as ok
    from offsite_kernels import native
    from offsite_kernels.ops.frozen_linear_triton import frozen_linear_fwd

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=reps_ms)
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}

    peak_copy = copy_bandwidth()
    name = torch.cuda.get_device_name()
    nominal = nominal_bandwidth(name)
    rows, checks = [], []
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        w_bf16 = w.to(torch.bfloat16)
        for fmt, bits in FORMATS.items():
            qw = ok.quantize_weight(w, bits=bits, group_size=GROUP)
            weight_bytes = qw.nbytes()
            for m in BUCKETS:
                x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
                fns = {
                    "native": lambda x=x, qw=qw, n=n: native.skinny_gemm(
                        x, qw.data, qw.scales, qw.zeros, None, qw.format, qw.group_size, n
                    ),
                    "triton": lambda x=x, qw=qw, n=n: frozen_linear_fwd(
                        x, qw.data, qw.scales, qw.zeros, None, qw.format, qw.group_size, n
                    ),
                    "torch": lambda x=x, qw=qw: F.linear(x, _reference_dense(qw, torch.bfloat16)),
                    "cublas_bf16": lambda x=x, w_bf16=w_bf16: F.linear(x, w_bf16),
                }
                ref = x.double() @ qw.dequantize().double().T
                for impl in ("native", "triton"):
                    try:
                        err = float((fns[impl]().double() - ref).abs().max() / ref.abs().max())
                    except Exception as exc:  # recorded; the other cases go on
                        err, failure = math.nan, f"{type(exc).__name__}: {exc}"
                    else:
                        failure = None
                    check = {"shape": shape, "format": fmt, "M": m, "impl": impl, "rel_error": err, "ok": err < 1e-2}
                    checks.append({**check, **({"error": failure} if failure else {})})
                case = {"shape": shape, "N": n, "K": k, "M": m, "format": fmt, "group_size": GROUP if fmt == "int4" else None}
                for impl, fn in fns.items():
                    try:
                        t = timed(fn)
                    except Exception as exc:
                        rows.append({**case, "impl": impl, "error": f"{type(exc).__name__}: {exc}"})
                        continue
                    moved = (w_bf16.numel() * 2 if impl == "cublas_bf16" else weight_bytes) + 2 * m * (k + n)
                    gbps = moved / t["median_ms"] / 1e6
                    rows.append(
                        {
                            **case,
                            "impl": impl,
                            **t,
                            "bytes": moved,
                            "gb_per_s": gbps,
                            "pct_of_copy": 100 * gbps / peak_copy,
                            "pct_of_nominal": None if nominal is None else 100 * gbps / nominal,
                        }
                    )
                base = {
                    r["impl"]: r["median_ms"]
                    for r in rows
                    if r["shape"] == shape and r["format"] == fmt and r["M"] == m and "error" not in r
                }
                for r in rows[-len(fns) :]:
                    if "error" not in r:
                        r["speedup_vs_cublas_bf16"] = base["cublas_bf16"] / r["median_ms"] if "cublas_bf16" in base else None
                        r["speedup_vs_triton"] = base["triton"] / r["median_ms"] if "triton" in base else None
            on_progress({"device": name, "copy_gb_per_s": peak_copy, "nominal_gb_per_s": nominal, "rows": rows, "checks": checks})
    return {"device": name, "copy_gb_per_s": peak_copy, "nominal_gb_per_s": nominal, "rows": rows, "checks": checks}


def markdown(result: dict) -> str:
    st = result["stamp"]
    gpu = st.get("gpu") or {}
    lines = [
        "# Native skinny GEMM vs Triton vs bf16 cuBLAS (M <= 16, bf16 activations; one run)",
        "",
        f"{gpu.get('name')} (driver {gpu.get('driver')}, CUDA {gpu.get('cuda_runtime')}), torch {st['versions']['torch']}, "
        f"triton {st['versions']['triton']}, {st['date']}. Measured copy bandwidth {result['copy_gb_per_s']:.0f} GB/s; "
        f"nominal {result['nominal_gb_per_s']} GB/s. GB/s counts the bytes each call must move (packed weight, scales, "
        "zeros, x, y; the dense bf16 weight for cuBLAS).",
        "",
        "| shape (N x K) | fmt | M | native us | triton us | torch us | cuBLAS bf16 us | native GB/s | native % copy | native vs triton |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["shape"], r["format"], r["M"], r["impl"]): r for r in result["rows"]}
    for shape, (n, k) in SHAPES.items():
        for fmt in FORMATS:
            for m in BUCKETS:
                r = {impl: by.get((shape, fmt, m, impl)) for impl in ("native", "triton", "torch", "cublas_bf16")}
                if not r["native"]:
                    continue
                ok = {i: v for i, v in r.items() if v and "error" not in v}
                us = {i: f"{ok[i]['median_ms'] * 1e3:.1f}" if i in ok else "error" for i in r}
                native_row = ok.get("native")
                vs_triton = native_row and native_row.get("speedup_vs_triton")
                lines.append(
                    f"| {shape} ({n} x {k}) | {fmt} | {m} | {us['native']} | {us['triton']} | {us['torch']} | {us['cublas_bf16']} | "
                    + (f"{native_row['gb_per_s']:.0f} | {native_row['pct_of_copy']:.0f}% | " if native_row else "| | ")
                    + (f"{vs_triton:.2f}x |" if vs_triton else " |")
                )
    lines += ["", "Dispatch table derived from this run (fastest geometric mean over the shapes):", ""]
    for fmt, row in result["table"].items():
        lines.append(f"- {fmt}: " + ", ".join(f"M<={m}: {v}" for m, v in row.items()))
    bad = [c for c in result["checks"] if not c["ok"]]
    lines += [
        "",
        f"Correctness checks against float64: {len(result['checks']) - len(bad)} of {len(result['checks'])} within 1e-2.",
    ]
    errors = [r for r in result["rows"] if "error" in r] + [c for c in result["checks"] if "error" in c]
    lines += [f"- error: {r['shape']} {r['format']} M={r['M']} {r['impl']}: {r['error']}" for r in errors]
    if result.get("partial"):
        lines = [lines[0], "", "**Partial: the run stopped before every case was measured.**", *lines[1:]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-table", action="store_true", help=f"write {TABLE_PATH.relative_to(_HERE.parent)}")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measurement time per case (ms)")
    parser.add_argument("--out", type=Path, default=RESULTS / "native_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("native_gpu.py needs a CUDA GPU")
    from torch.utils import cpp_extension

    from offsite_kernels import native

    # a JIT build (OFFSITE_NATIVE_JIT=1) without nvcc would quietly build the CPU part only; without ninja it fails late
    if native.jit_enabled() and (cpp_extension.CUDA_HOME is None or shutil.which("ninja") is None):
        sys.exit(
            f"cannot build the extension's CUDA part here: CUDA toolkit {cpp_extension.CUDA_HOME or 'not found'}, "
            f"ninja {shutil.which('ninja') or 'not found'} (both are needed: set CUDA_HOME, pip install ninja)"
        )
    if not native.has_cuda():
        sys.exit(
            f"the native extension has no CUDA kernels here ({native.unavailable_reason() or 'built without CUDA'}); "
            "rebuild on this machine: pip install --no-build-isolation -e ."
        )
    from stamp import stamp

    provenance = {"stamp": stamp(), "native_build": native.get().build_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(result: dict, partial: bool) -> str:
        result = {**result, **provenance, "table": derive_table(result["rows"]), "partial": partial}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        md = markdown(result)
        args.out.with_suffix(".md").write_text(md)
        return md

    result = bench(args.rep_ms, on_progress=lambda so_far: write(so_far, partial=True))
    print(write(result, partial=False))
    result = {**result, **provenance, "table": derive_table(result["rows"])}
    if args.write_table:
        gpu = result["stamp"]["gpu"] or {}
        source = f"bench/results/{args.out.name}: {gpu.get('name')}, {result['stamp']['date']}"
        write_table(result["table"], source)
        print(f"wrote {TABLE_PATH}")


if __name__ == "__main__":
    main()
