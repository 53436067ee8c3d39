"""Ahead-of-time compile report of the frozen-linear Triton kernels for each GPU class: A100 (sm_80), GPUs
with 99 KiB of shared memory per block (sm_86; consumer Blackwell's sm_120 runs its lists), H100/H200 (sm_90)
and B200 (sm_100).

Needs no GPU: every kernel x weight format x activation dtype (bf16, fp16, fp32 on TF32 tensor cores
"tf32", exact fp32 "fp32") x autotune configuration of a class is
compiled for its architecture and its cubin inspected (registers, spills, shared memory,
tensor-core instructions); see ``offsite_kernels/ops/aot.py``. Writes
``bench/results/aot_frozen_linear.json`` (``{"stamp": ..., "rows": [...]}``, replaced
atomically) and prints a compact table followed by every failed check.

The fp8 tensor-core path (``offsite_kernels/ops/fp8_gemm_triton.py``: row quantizer and e4m3 GEMM)
goes to ``bench/results/aot_fp8_gemm.json`` the same way, for sm_89, sm_90, sm_100 and sm_120 (sm_80 has no fp8
tensor cores): every launch the path can make, each GEMM tile in its three operand layouts, with the
MMA instruction, async copies (``LDGSTS``) and byte-wise shared stores (``STS.U8``) read from the SASS.

    python bench/aot_report.py [--archs 80 86 90 100 120] [--out PATH] [--fp8-archs 89 90 100 120] [--fp8-out PATH]
                               [--workers N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
DEFAULT_OUT = _HERE / "results" / "aot_frozen_linear.json"
DEFAULT_FP8_OUT = _HERE / "results" / "aot_fp8_gemm.json"


def _stamp() -> dict[str, Any]:
    """Provenance of the report: ``bench/stamp.py``'s stamp when present, else the essentials."""
    sys.path.insert(0, str(_HERE))
    try:
        from stamp import stamp  # type: ignore[import-not-found]

        return stamp()
    except ImportError:
        import torch
        import triton

        import offsite_kernels

        return {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {
                "torch": torch.__version__,
                "triton": triton.__version__,
                "offsite_kernels": offsite_kernels.__version__,
            },
        }
    finally:
        sys.path.remove(str(_HERE))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'arch':<5} {'kernel':<4} {'fmt':<5} {'dtype':<5} {'config':<17} {'regs':>4} {'stack':>5} {'STL':>4} {'shared KiB':>10} {'limit':>5} {'mma':<6} status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r["compiled"]:
            lines.append(f"sm{r['arch']:<3} {r['kernel']:<4} {r['fmt']:<5} {r['act_dtype']:<5} {r['config']:<17} COMPILE ERROR")
            continue
        mma_check = "no-mma" if r["tensor_core_expected"] else "mma-in-fp32"  # exact fp32 must not use tensor cores
        checks = (("spills", r["spills"]), ("shared", not r["shared_ok"]), (mma_check, not r["tensor_core_ok"]))
        status = "ok" if r["ok"] else "FAIL: " + ", ".join(name for name, bad in checks if bad)
        lines.append(
            f"sm{r['arch']:<3} {r['kernel']:<4} {r['fmt']:<5} {r['act_dtype']:<5} {r['config']:<17} {r['registers']:>4} "
            f"{r['stack_bytes']:>5} {r['spill_stores']:>4} {r['shared_bytes'] / 1024:>10.1f} {r['shared_limit'] // 1024:>5} "
            f"{r['tensor_core_mnemonic'] or '-':<6} {status}"
        )
    return "\n".join(lines)


def format_case_table(rows: list[dict[str, Any]]) -> str:
    """A compact table of :func:`offsite_kernels.ops.aot.compile_case` rows (the fp8 path's launches)."""
    head = f"{'arch':<5} {'case':<46} {'regs':>4} {'stack':>5} {'shared KiB':>10} {'LDGSTS':>6} {'STS.U8':>6} {'mma':<32} status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r["compiled"]:
            lines.append(f"sm{r['arch']:<3} {r['label']:<46} COMPILE ERROR")
            continue
        lines.append(
            f"sm{r['arch']:<3} {r['label']:<46} {r['registers']:>4} {r['stack_bytes']:>5} {r['shared_bytes'] / 1024:>10.1f} "
            f"{r['async_copies']:>6} {r['byte_shared_stores']:>6} {r['mma_instruction'] or '-':<32} {'ok' if r['ok'] else 'FAIL'}"
        )
    return "\n".join(lines)


def fp8_report(archs: tuple[int, ...], workers: int = 1) -> list[dict[str, Any]]:
    """Every fp8-path launch (``fp8_gemm_triton.aot_cases``) compiled for each of ``archs``, ``workers`` at a time."""
    from offsite_kernels.ops import aot, fp8_gemm_triton

    cases = [(case, arch) for arch in archs for case in fp8_gemm_triton.aot_cases(arch)]
    aot.prefetch(cases=cases, workers=workers)
    return [aot.compile_case(case, arch) for case, arch in cases]


def main(argv: list[str] | None = None) -> int:
    from offsite_kernels.ops import aot, fp8_gemm_triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archs",
        type=int,
        nargs="+",
        default=list(aot.ARCHS),
        help=f"compile targets sm_<arch> (default {' '.join(map(str, aot.ARCHS))})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--fp8-archs", type=int, nargs="*", default=list(fp8_gemm_triton.AOT_TARGETS), help="targets of the fp8 path (none: skip)"
    )
    parser.add_argument("--fp8-out", type=Path, default=DEFAULT_FP8_OUT)
    parser.add_argument(
        "--workers", type=int, default=aot.default_workers(), help="compiles run at once (default: the CPUs available)"
    )
    args = parser.parse_args(argv)

    ok, why = aot.availability()
    if not ok:
        print(f"cannot run the AOT check here: {why}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = aot.full_report(tuple(args.archs), workers=args.workers)
    split_cases = [(case, arch) for arch in args.archs for case in aot.split_k_cases(arch)]
    aot.prefetch(cases=split_cases, workers=args.workers)
    split_rows = [aot.compile_case(case, arch) for case, arch in split_cases]
    seconds = time.perf_counter() - t0
    report = {
        "stamp": _stamp(),
        "seconds": round(seconds, 1),
        "workers": args.workers,
        "shared_limits": {f"sm_{a}": aot.SHARED_LIMITS[a] for a in args.archs},
        "assumptions": "contiguous row-major tensors, 16-byte-aligned pointers, N/K/row strides multiples of 16, "
        f"int4 group size {aot.INT4_GROUP}, forward with bias, DOT_PRECISION=ieee (tf32 for the tf32 rows: fp32 "
        "activations with TF32 allowed; fp32 rows: exact fp32), INTERPRETER_BF16=False",
        "rows": rows,
        "split_k_rows": split_rows,  # the split-K launches of M <= 16 and the kernel that adds their partials
    }
    write_json_atomic(args.out, report)

    print(format_table(rows))
    failed = [(r, aot.problems(r)) for r in rows if not r.get("ok")]
    print(f"\n{len(rows)} variants compiled in {seconds:.0f} s; {len(failed)} fail a check; written to {args.out}")
    for r, why in failed:
        print(f"  sm_{r['arch']} {r['kernel']} {r['fmt']} {r['act_dtype']} {r['config']}: {'; '.join(why)}")
    print("\n" + format_case_table(split_rows))
    failed_split = [(r, aot.case_problems(r)) for r in split_rows if not r.get("ok")]
    print(f"\n{len(split_rows)} split-K launches; {len(failed_split)} fail a check")
    for r, why in failed_split:
        print(f"  sm_{r['arch']} {r['label']}: {'; '.join(why)}")
    if args.fp8_archs:
        t0 = time.perf_counter()
        fp8_rows = fp8_report(tuple(args.fp8_archs), args.workers)
        seconds = time.perf_counter() - t0
        fp8 = {
            "stamp": report["stamp"],
            "seconds": round(seconds, 1),
            "workers": args.workers,
            "shared_limits": {f"sm_{a}": aot.SHARED_LIMITS[a] for a in args.fp8_archs},
            "assumptions": "fp8 e4m3 operands, contiguous row-major activations and outputs, 16-byte-aligned pointers, "
            "N/K/row strides multiples of 16, M arbitrary; GEMM layouts: fwd (B = Wq, K-major), bwd (B = cached Wq^T, "
            "K-major), bwd_strided (B = Wq read in place, N-major)",
            "rows": fp8_rows,
        }
        write_json_atomic(args.fp8_out, fp8)
        print("\n" + format_case_table(fp8_rows))
        failed = [(r, aot.case_problems(r)) for r in fp8_rows if not r.get("ok")]
        print(
            f"\n{len(fp8_rows)} fp8-path launches compiled in {seconds:.0f} s; {len(failed)} fail a check; written to {args.fp8_out}"
        )
        for r, why in failed:
            print(f"  sm_{r['arch']} {r['label']}: {'; '.join(why)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
