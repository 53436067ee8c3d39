"""Compile the CUDA sources of csrc/cuda/ with nvcc alone (no GPU, no CUDA torch) and read ptxas' resource report.

Used by tests/test_native_cuda_compile.py (every kernel compiles for sm_80 and sm_90 and spills nothing) and by
bench/native_cuda_resources.py (writes the report to bench/results/native_cuda_resources.json).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import build_config

ARCHS = tuple(build_config.parse_archs(build_config.DEFAULT_CUDA_ARCHS))  # ("80", "90")
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def find_cuda_include(nvcc: str | None = None) -> str | None:
    """The CUDA toolkit's include directory (the one holding cuda_runtime.h), or None."""
    nvcc = nvcc or find_nvcc()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    return None


def demangle(names: list[str]) -> list[str]:
    """C++ names of mangled symbols (c++filt where present, else unchanged)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout.splitlines()
    return out if len(out) == len(names) else names


def parse_ptxas(log: str) -> list[dict]:
    """Rows {kernel, mangled, arch, registers, spill_stores, spill_loads, stack, smem, barriers} from ptxas -v output."""
    rows: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"mangled": m.group(1), "arch": f"sm_{m.group(2)}"}
            rows.append(current)
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            current.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0), smem=int(m.group(3) or 0))
    for row, name in zip(rows, demangle([r["mangled"] for r in rows]), strict=True):
        row["kernel"] = name
    return rows


def compile_source(
    source: str | Path, arch: str, nvcc: str | None = None, extra: tuple[str, ...] = ()
) -> tuple[list[dict], float]:
    """``nvcc -cubin -Xptxas -v`` one source for ``sm_<arch>`` with the build's flags; (resource rows, seconds)."""
    import time

    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    source = Path(source)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", *build_config.NVCC_FLAGS, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", *extra]
        cmd += [str(source), "-o", os.path.join(tmp, source.stem + ".cubin")]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} for sm_{arch}:\n{done.stderr[-4000:]}")
    rows = parse_ptxas(done.stderr + done.stdout)
    for row in rows:
        row["source"] = str(source.relative_to(build_config.repo_root())) if source.is_absolute() else str(source)
    return rows, seconds


def nvcc_version(nvcc: str | None = None) -> str | None:
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1] if out else None


def compile_all(archs: tuple[str, ...] = ARCHS) -> dict:
    """Every CUDA kernel source for every arch: {"nvcc": version, "rows": [...], "seconds": {source@arch: s}}."""
    root = build_config.repo_root()
    rows, seconds = [], {}
    for arch in archs:
        for source in build_config.CUDA_KERNEL_SOURCES:
            r, s = compile_source(root / source, arch)
            rows += r
            seconds[f"{source}@sm_{arch}"] = round(s, 2)
    return {"nvcc": nvcc_version(), "flags": list(build_config.NVCC_FLAGS), "rows": rows, "seconds": seconds}
