"""Compile-only resource report of the native CUDA kernels (csrc/cuda/*.cu): registers, spills, stack and shared
memory per kernel for sm_80 and sm_90, from ``nvcc -cubin -Xptxas -v`` with the build's flags. Needs nvcc, no GPU.

    python bench/native_cuda_resources.py            # writes bench/results/native_cuda_resources.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stamp import stamp

from offsite_kernels.native import cuda_compile

OUT = Path(__file__).resolve().parent / "results" / "native_cuda_resources.json"


def main() -> None:
    report = cuda_compile.compile_all()
    for row in report["rows"]:
        row.pop("mangled", None)
    report["rows"].sort(key=lambda r: (r["arch"], r["source"], r["kernel"]))
    report["summary"] = {
        arch: {
            "kernels": sum(r["arch"] == arch for r in report["rows"]),
            "max_registers": max(r["registers"] for r in report["rows"] if r["arch"] == arch),
            "spill_stores": sum(r["spill_stores"] for r in report["rows"] if r["arch"] == arch),
            "spill_loads": sum(r["spill_loads"] for r in report["rows"] if r["arch"] == arch),
        }
        for arch in sorted({r["arch"] for r in report["rows"]})
    }
    report["stamp"] = stamp()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    for r in report["rows"]:
        print(
            f"{r['arch']}  {r['registers']:>3} regs  {r['spill_stores']:>3} B spilled  {r['smem']:>5} B smem  {r['kernel'][:120]}"
        )


if __name__ == "__main__":
    main()
