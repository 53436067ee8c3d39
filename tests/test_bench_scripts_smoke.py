"""The GPU benchmark scripts of bench/ run end to end in their CPU smoke mode (tiny shapes, Triton's interpreter).

Each runs in a subprocess, as a user would start it, and must exit 0 and write its JSON lines and
markdown without an ``error`` row. The numbers of a smoke run mean nothing; only the code paths are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, out: Path, *extra: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH / script), "--device", "cpu", "--interpret", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(BENCH.parent))
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}"
    return proc


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows, f"{path} holds no rows"
    return rows


def _env(**overrides: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OFFSITE_BACKEND", "TRITON_INTERPRET")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    env.update({k: v for k, v in overrides.items() if v is not None})
    return env


@pytest.mark.slow
def test_fused_ops_gpu_cpu_smoke(tmp_path):
    # no TRITON_INTERPRET in the environment: --interpret must set it before triton is imported
    proc = _run("fused_ops_gpu.py", tmp_path, "--quick", env=_env())
    rows = _rows(tmp_path / "fused_ops_gpu.jsonl")
    failed = [r for r in rows if r.get("error")]
    assert not failed, f"rows with an error: {failed[:3]}"
    kinds = {r.get("kind") for r in rows}
    assert {"run", "ceiling", "op", "head", "block", "target", "run_end", "skip"} <= kinds
    ops = [r for r in rows if r.get("kind") == "op"]
    assert {(r["op"], r["direction"]) for r in ops} >= {
        (op, d) for op in ("rms_norm", "layer_norm", "bias_gelu", "swiglu", "geglu") for d in ("fwd", "bwd")
    }
    assert {r["impl"] for r in ops} >= {"offsite", "offsite_op", "eager", "eager_dgamma"}
    ours = [r for r in rows if r.get("impl") in ("offsite", "offsite_op", "fused")]
    assert ours and all(r["correct"] and r["max_rel_err"] is not None for r in ours)
    assert all(r["median_ms"] > 0 for r in ops)
    heads = {r["impl"]: r for r in rows if r.get("kind") == "head"}
    assert {"fused", "unfused"} <= heads.keys() and heads["fused"]["time_ratio"] is not None
    blocks = {(r["model"], r["variant"]): r for r in rows if r.get("kind") == "block"}
    assert {v for _, v in blocks} >= {
        "plain",
        "fast",
        "fast_int4",
        "plain_full",
        "fast_full",
        "fast_block",
        "fast_compile",
        "fast_compile_graph",
    }
    compiled = [r for (_, v), r in blocks.items() if v.startswith("fast_compile")]
    assert compiled and all(r["compiled"]["compiled_calls"] > 0 and r["correct"] for r in compiled)
    for key, r in blocks.items():
        assert r["step_ms"] > 0 and r["emu_ms"] is not None, key
        assert r.get("correct", True), key
    assert all(r["recompute_overhead_pct"] is not None for (_, v), r in blocks.items() if v.endswith(("_full", "_block")))
    skips = " ".join(r["what"] for r in rows if r.get("kind") == "skip")
    assert "torch.compile" in skips and "Liger" in skips  # both skipped on a CPU, with a note
    md = (tmp_path / "fused_ops_gpu.md").read_text()
    assert md.startswith("# Fused frozen-block ops") and "## Targets of the issue" in md
    assert "## Fused LM head" in md and "## Emulator blocks" in md
    assert proc.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the markdown is printed last


@pytest.mark.slow
def test_frozen_linear_gpu_cpu_smoke(tmp_path):
    # no TRITON_INTERPRET in the environment: --interpret must set it before triton is imported
    # --fp8-gemm on: the fp8 tensor-core path and its variants run too (in the interpreter)
    # OFFSITE_SPLIT_K=2: split-K at every M (automatic only on a GPU), so the unsplit rows are timed beside it
    # one shape: "odd" (136 x 136) pads both an int4 group and a block, which the square one would not add
    _run(
        "frozen_linear_gpu.py", tmp_path, "--shapes", "odd", "--tokens", "1,40", "--fp8-gemm", "on", env=_env(OFFSITE_SPLIT_K="2")
    )
    rows = _rows(tmp_path / "frozen_linear_gpu.jsonl")
    cases = [r for r in rows if r.get("kind") == "case"]
    assert cases and not [r for r in rows if r.get("error")]
    split = [r for r in cases if r["impl"] == "offsite" and (r.get("splits") or 1) > 1]
    unsplit = [r for r in cases if r["impl"] == "offsite_unsplit"]
    assert split and len(unsplit) == len(split) and all(r["splits"] == 1 and r["correct"] for r in unsplit)
    assert {r["format"] for r in cases if r["impl"] == "offsite"} == {"int4", "int8", "fp8", "dense"}
    assert all(r["correct"] for r in cases if "correct" in r)
    assert all(r["fp8_gemm"] for r in cases if r["impl"] == "offsite" and r["format"] == "fp8")
    assert {r["impl"] for r in cases if r["format"] == "fp8"} >= {"fp8_weight_only", "fp8_bwd_cache", "fp8_bwd_strided"}
    targets = [r for r in rows if r.get("kind") == "target"]
    fp8 = [t for t in targets if t["name"].startswith("fp8")]
    assert [t["direction"] for t in fp8] == ["fwd", "bwd"] and all(t["threshold"] == 1.5 for t in fp8)
    lowbit = {t["name"]: t for t in targets if not t["name"].startswith("fp8")}
    assert len(lowbit) == 6  # int4 and int8 at large M, both directions; int4 at M <= 16: bandwidth and speedup
    for name, t in lowbit.items():  # the smoke run's M (1, 3, 40) reach the skinny targets, not the M >= 4096 ones
        assert (t["n"] > 0 and t["met"] is not None) if "M <= 16" in name else (t["n"] == 0 and t["met"] is None), name
    md = (tmp_path / "frozen_linear_gpu.md").read_text()
    assert md.startswith("# Frozen linear") and "## Targets of the issue" in md


def test_host_overhead_cpu_smoke(tmp_path):
    out = tmp_path / "host.json"
    cmd = [sys.executable, str(BENCH / "host_overhead.py"), "--device", "cpu", "--calls", "5", "--rounds", "2", "--out", str(out)]
    cmd += ["--blocks", "gpt2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(), cwd=str(BENCH.parent))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    impls = {(r["op"], r["impl"]) for r in result["rows"]}
    assert {(op, i) for op in ("layer_norm", "swiglu", "frozen_linear_int8") for i in ("eager", "offsite", "offsite_op")} <= impls
    assert all(r[k]["median_us"] > 0 for r in result["rows"] for k in ("fwd", "fwd_bwd"))
    assert "saved by the direct path" in out.with_suffix(".md").read_text()
    blocks = {r["variant"]: r for r in result["blocks"]}
    assert blocks.keys() == {"plain", "fast", "fast_compile"}  # the CUDA-graph variants need a GPU
    assert not [r for r in blocks.values() if "error" in r]
    assert all(r["steps"][str(n)]["median_us"] > 0 for r in blocks.values() for n in (1, 5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="stubbed launches time the host path on a CPU")
def test_host_overhead_with_stubbed_kernel_launches(tmp_path):
    out = tmp_path / "host.json"
    cmd = [sys.executable, str(BENCH / "host_overhead.py"), "--device", "cpu", "--calls", "5", "--rounds", "2"]
    cmd += ["--out", str(out), "--stub-kernels", "--blocks", "llama"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(), cwd=str(BENCH.parent))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["stub_kernels"] is True
    assert all(r[k]["median_us"] > 0 for r in result["rows"] for k in ("fwd", "fwd_bwd"))
    assert "Kernel launches stubbed" in out.with_suffix(".md").read_text()
    assert not [r for r in result["blocks"] if "error" in r]
    # the interpreter would run the kernels instead of the GPU path: refused with the fix
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(TRITON_INTERPRET="1"), cwd=str(BENCH.parent))
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="stubbed launches time the host path on a CPU")
def test_stubbed_kernel_launches_take_the_triton_path_launch_nothing_and_restore(monkeypatch):
    """Inside the context the ops run their Triton launchers (with the autotuner's cached-config path) and no
    kernel; outside it everything is as before."""
    pytest.importorskip("triton")
    script = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from kernel_stubs import stubbed_kernel_launches
import offsite_kernels as ok
from offsite_kernels.ops import norm, norm_triton, frozen_linear_triton as flt
from triton.runtime.jit import JITFunction
fwd = flt.autotuned_launch("fwd", 80)
run_before, cache_before = JITFunction.run, fwd.tuned.cache
launched = []
real_fwd = norm_triton.layer_norm_fwd
norm_triton.layer_norm_fwd = lambda *a, **k: launched.append("ln") or real_fwd(*a, **k)
x = torch.randn(3, 5, 33)
qw = ok.quantize_weight(torch.randn(7, 33), bits=4, group_size=32)
with stubbed_kernel_launches():
    y = torch.full((3, 5, 33), float("nan"))
    norm_triton.layer_norm_fwd(x, None, None, None, 1e-5, out=y)
    assert torch.isnan(y).all()  # the kernel never ran: the poisoned output is untouched
    norm.layer_norm(x, torch.ones(33))
    for _ in range(3):
        ok.frozen_linear(x, qw)
    assert len(fwd.chosen) == 1  # first launch "tuned", then the cached path
assert launched == ["ln", "ln"]
assert JITFunction.run is run_before and fwd.tuned.cache is cache_before and "_bench" not in vars(fwd.tuned)
assert fwd.chosen == {}
from offsite_kernels.ops import norm as norm_again
from offsite_kernels import backends
assert norm_again.requested_backend is backends.requested_backend
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script, str(BENCH)], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_reports_are_rewritten_as_rows_come_and_marked_partial(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        from frozen_linear_gpu import write_report
    finally:
        sys.path.pop(0)
    path = tmp_path / "report.md"
    write_report(path, "# Report\n", "run1", rows_so_far=7)  # a stage killed now leaves this
    assert path.read_text().startswith("> partial report: the run was still going (7 rows so far)")
    write_report(path, "# Report\n", "run1")
    assert path.read_text() == "# Report\n" and not list(tmp_path.glob(".*.tmp"))


def test_frozen_linear_cpu_benchmarks_run_once_with_timing_disabled():
    # pytest-benchmark's --benchmark-disable runs each benchmark once as a smoke test; the file must not
    # read timing statistics that such a run does not have
    flags = ["-q", "-p", "no:cacheprovider", "--benchmark-disable"]
    cmd = [sys.executable, "-m", "pytest", *flags, str(BENCH / "frozen_linear_cpu.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(), cwd=str(BENCH.parent))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_host_overhead_report_of_a_run_cut_short():
    sys.path.insert(0, str(BENCH))
    try:
        from host_overhead import markdown
    finally:
        sys.path.pop(0)
    timing = {"median_us": 10.0, "p20_us": 9.0, "p80_us": 11.0}
    rows = [{"op": "rms_norm", "impl": impl, "fwd": timing, "fwd_bwd": timing} for impl in ("eager", "offsite", "offsite_op")]
    rows.append({"op": "layer_norm", "impl": "eager", "fwd": timing, "fwd_bwd": timing})  # its other impls never ran
    result = {
        "device": "cpu",
        "device_name": "CPU",
        "dtype": "fp32",
        "threads": 1,
        "rounds": 1,
        "calls": 1,
        "rows": rows,
        "blocks": [],
    }
    md = markdown({**result, "partial": True})
    assert "Partial" in md and "| rms_norm |" in md and "| layer_norm |" not in md


@pytest.mark.slow
def test_experts_gpu_cpu_smoke(tmp_path):
    """Every variant of both families runs forward + backward; the grouped low-bit experts match their dense twin and
    the loop matches the grouped int4 experts (in the interpreter)."""
    _run("experts_gpu.py", tmp_path, env=_env())
    rows = [r for r in _rows(tmp_path / "experts_gpu.jsonl") if r.get("kind") == "experts"]
    assert not [r for r in rows if r.get("error")]
    assert {(r["model"], r["variant"]) for r in rows} == {
        (m, v) for m in ("mixtral-8x7b", "qwen3-30b-a3b") for v in ("hf", "dense", "int8", "int4", "fp8", "int4_loop")
    }
    assert all(r["correct"] and r["median_ms"] > 0 and r["weight_bytes"] > 0 for r in rows)
    low_bit = {r["variant"]: r["weight_bytes"] for r in rows if r["model"] == "mixtral-8x7b"}
    assert low_bit["int4"] < low_bit["int8"] < low_bit["dense"] == low_bit["hf"]
    assert (tmp_path / "experts_gpu.md").read_text().startswith("# Mixture-of-experts expert MLPs")
