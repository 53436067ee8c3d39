"""The whole GPU suite in one call: environment, GPU tests, kernel benchmarks, end-to-end table.

Run from the repository root on a machine with an NVIDIA GPU (the package need not be installed:
the checkout is put on ``PYTHONPATH``)::

    python3 bench/gpu_suite.py --out DIR          # at most 570 s: quick kernel sweeps, every end-to-end method
    python3 bench/gpu_suite.py --out DIR --quick  # fewer end-to-end methods
    python3 bench/gpu_suite.py --out DIR --only frozen_linear,fused_ops --full-kernels   # a second call: full sweeps

Each stage runs in its own process with its own time limit, writes its log to ``DIR/<stage>.log``
and its results under ``DIR``; a stage that fails or runs out of time is recorded and the next one
runs. ``DIR/SUMMARY.md`` lists every stage (exit code, seconds) with the tail of its table, and
``DIR/suite.json`` the same as data, stamped with the GPU, driver, torch and triton versions.

Stages: ``env`` (nvidia-smi, ``offsite env``, the stamp), ``tests`` (``pytest -m gpu``: every
Triton kernel against float64 on CUDA), ``frozen_linear`` (bench/frozen_linear_gpu.py),
``fused_ops`` (bench/fused_ops_gpu.py), ``host_overhead`` (bench/host_overhead.py: host µs per
call of the per-layer ops, eager PyTorch vs the library's direct path vs its custom ops), ``e2e`` (``offsite bench`` on the paper's models, measured
on the GPU, batch 1 and 16), ``native`` (bench/native_gpu.py; the extension's CUDA part compiled
on first use), and, opt-in, ``e2e_7b`` (``--only e2e_7b``: OPT-6.7B, where FT at batch 16 runs on
DeepSpeed ZeRO-2 with the optimizer offloaded; DeepSpeed is carried as wheels, see
bench/gpu_wheels.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the paper's four and the best path first: rows are written as they come, so a stage cut short keeps them
SUITE_METHODS = (
    "ft,ft+lora,ot,ot+lora,ot+lora+fast+int4+recompute+head,ot+lora+fast+int4+head+graph,ot+fast+graph,"
    "ot+fast,ot+fast+int8,ot+fast+int4,ot+fast+fp8,"
    "ot+fast+recompute,ot+fast+head,ot+fast+int4+recompute+head,ot+lora+fast,ot+lora+fast+int8+recompute+head"
)
QUICK_METHODS = "ft,ft+lora,ot,ot+lora,ot+lora+fast+int4+recompute+head,ot+lora+fast+int4+head+graph,ot+fast,ot+fast+int4"
COMPILE_METHODS = "ot+lora+fast+int4+head+compile+graph,ot+fast+compile+graph,ot+fast+compile,ot+lora+fast+int4+head+graph"
BUDGET_S = 570  # the device machine allows 600 s per command


@dataclass
class Stage:
    name: str
    argv: list[str]
    timeout_s: int
    table: str | None = None  # a markdown file (relative to the output folder) whose tail goes in the summary
    needs: str | None = None  # a file (relative to the repo) that must exist, else the stage is skipped
    env: dict[str, str] | None = None  # extra environment variables
    opt_in: bool = False  # runs only when named in --only


@dataclass
class StageResult:
    name: str
    returncode: int | None
    seconds: float
    status: str  # ok, failed, timeout, skipped


def _bench_stage(
    out: Path,
    name: str,
    models: str,
    methods: str,
    timeout_s: int,
    *extra: str,
    warmup: int = 2,
    steps: int = 5,
    opt_in: bool = False,
    batches: str = "1,16",
) -> Stage:
    """``offsite bench`` measured on the GPU at ``batches`` (1 and 16), its rows under ``out/name``."""
    argv = [sys.executable, "-m", "offsite_kernels.cli", "bench", "--device", "cuda", "--models", models]
    argv += ["--methods", methods, "--batch", batches, *extra, "-o", str(out / name)]
    argv += ["--warmup", str(warmup), "--steps", str(steps)]
    return Stage(name, argv, timeout_s, opt_in=opt_in)


def _script_stage(
    name: str, script: str, out_arg: Path, timeout_s: int, table: str, *extra: str, env: dict | None = None
) -> Stage:
    """``bench/<script>`` with ``--out out_arg``; ``table``: its markdown, under ``out/<name>``."""
    argv = [sys.executable, f"bench/{script}", "--out", str(out_arg), *extra]
    return Stage(name, argv, timeout_s, table=f"{name}/{table}", needs=f"bench/{script}", env=env)


def stages(out: Path, quick: bool, full_kernels: bool) -> list[Stage]:
    py = sys.executable
    q = [] if full_kernels else ["--quick"]  # the kernel benchmarks' full sweeps take longer than the whole suite
    return [
        Stage(
            "env",
            [
                py,
                "-c",
                "import json, offsite_kernels.cli as c, offsite_kernels.benchmark.stamp as s; "
                "c.main(['env']); print(json.dumps(s.stamp(), indent=2))",
            ],
            30,
        ),
        Stage("tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 130),
        _script_stage(
            "frozen_linear",
            "frozen_linear_gpu.py",
            out / "frozen_linear",
            400 if full_kernels else 110,
            "frozen_linear_gpu.md",
            *q,
        ),
        _script_stage("fused_ops", "fused_ops_gpu.py", out / "fused_ops", 400 if full_kernels else 100, "fused_ops_gpu.md", *q),
        _script_stage(
            "host_overhead", "host_overhead.py", out / "host_overhead" / "host_overhead-cuda.json", 40, "host_overhead-cuda.md"
        ),
        _bench_stage(out, "e2e", "gpt2-xl,opt-1.3b", QUICK_METHODS if quick else SUITE_METHODS, 100 if quick else 170),
        # last: the CUDA part of the extension is compiled on first use (OFFSITE_NATIVE_JIT), which takes a while
        _script_stage(
            "native", "native_gpu.py", out / "native" / "native_gpu.json", 150, "native_gpu.md", env={"OFFSITE_NATIVE_JIT": "1"}
        ),
        # opt-in (--only e2e_7b): 6.7B-parameter models. FT runs on DeepSpeed ZeRO-2 with CPU offload where plain
        # FT does not fit the GPU and the host can hold the offload; DeepSpeed travels as wheels (bench/gpu_wheels.sh)
        _bench_stage(
            out,
            "e2e_7b",
            "opt-6.7b",
            "ft,ot+lora,ot+lora+fast+int4+recompute+head",
            330,
            "--source",
            "measured",
            warmup=1,
            steps=3,
            opt_in=True,
        ),
        # opt-in (--only host_blocks): host µs of a whole frozen block per variant, CUDA graphs and compiled included
        replace(
            _script_stage(
                "host_blocks",
                "host_overhead.py",
                out / "host_blocks" / "host_overhead-cuda.json",
                150,
                "host_overhead-cuda.md",
                "--blocks",
                "gpt2,llama",
            ),
            opt_in=True,
        ),
        # opt-in (--only e2e_compile): the emulator blocks through torch.compile, alone and with PyTorch's CUDA
        # graphs, at the paper's setting (batch 1, where the host sets the step time); each method compiles first
        _bench_stage(
            out,
            "e2e_compile",
            "gpt2-xl",
            COMPILE_METHODS,
            360,  # each method compiles a GPT2-XL block's forward and backward from a cold cache
            "--source",
            "measured",
            opt_in=True,
            batches="1",
        ),
    ]


def run_stage(stage: Stage, out: Path, env: dict[str, str], left_s: float) -> StageResult:
    if stage.needs and not (REPO / stage.needs).exists():
        return StageResult(stage.name, None, 0.0, f"skipped ({stage.needs} is not in this checkout)")
    timeout = int(min(stage.timeout_s, left_s))
    if timeout < 10:
        return StageResult(stage.name, None, 0.0, "skipped (the suite's time budget is spent)")
    log = out / f"{stage.name}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                stage.argv, cwd=REPO, env={**env, **(stage.env or {})}, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            )
            code = proc.returncode
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, f"timeout after {timeout} s"
    return StageResult(stage.name, code, time.perf_counter() - start, status)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no table)"


def latest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created; $OUT on the device machine)")
    p.add_argument("--quick", action="store_true", help="fewer end-to-end methods")
    p.add_argument(
        "--full-kernels",
        action="store_true",
        help="the kernel benchmarks' full sweeps (longer: run with --only and a larger budget)",
    )
    p.add_argument("--only", help="comma-separated stage names to run (default: all)")
    p.add_argument(
        "--host-memory-gib",
        type=float,
        help="the host's memory, for machines whose OS reports less at first (guards DeepSpeed's CPU offload)",
    )
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"time for the whole suite (default {BUDGET_S} s)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    if args.host_memory_gib:
        env["OFFSITE_HOST_MEMORY_GIB"] = str(args.host_memory_gib)
    chosen = set(args.only.split(",")) if args.only else None
    results = []
    suite_start = time.perf_counter()
    for stage in stages(out, args.quick, args.full_kernels):
        skipped = stage.opt_in if chosen is None else stage.name not in chosen
        if skipped:
            continue
        print(f"[suite] {stage.name} ...", flush=True)
        result = run_stage(stage, out, env, args.budget_s - (time.perf_counter() - suite_start))
        results.append((stage, result))
        print(f"[suite] {stage.name}: {result.status} ({result.seconds:.0f} s)", flush=True)

    summary = ["# GPU suite", "", "| stage | status | exit | seconds |", "|---|---|---|---|"]
    summary += [f"| {r.name} | {r.status} | {r.returncode} | {r.seconds:.0f} |" for _, r in results]
    for stage, _result in results:
        table = out / stage.table if stage.table else None
        if stage.name in ("e2e", "e2e_7b", "e2e_compile"):
            table = latest(out / stage.name, "offsite_bench-*.md")
        if stage.name == "tests":
            table = out / "tests.log"
        if table is not None:
            summary += ["", f"## {stage.name}", "", _tail(table)]
    (out / "SUMMARY.md").write_text("\n".join(summary) + "\n")
    sys.path.insert(0, str(REPO))
    from offsite_kernels.benchmark.stamp import stamp

    (out / "suite.json").write_text(json.dumps({"stamp": stamp(), "stages": [asdict(r) for _, r in results]}, indent=2) + "\n")
    print("\n".join(summary[: 4 + len(results)]))
    return 0 if all(r.status == "ok" or r.status.startswith("skipped") for _, r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
