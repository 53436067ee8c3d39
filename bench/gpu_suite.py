"""The whole GPU suite in one call: environment, GPU tests, kernel benchmarks, end-to-end table.

Run from the repository root on a machine with an NVIDIA GPU (the package need not be installed:
the checkout is put on ``PYTHONPATH``)::

    python3 bench/gpu_suite.py --out DIR          # at most 540 s: quick kernel sweeps, the main end-to-end methods
    python3 bench/gpu_suite.py --out DIR --quick  # the core four end-to-end methods
    python3 bench/gpu_suite.py --out DIR --only native,native_tests,host_overhead,e2e_7b   # a second call

The budget counts from the suite's start. Each stage runs in its own process group with its own
time limit (on timeout the whole group is killed), writes its log to ``DIR/<stage>.log`` and its
results under ``DIR``; a stage that fails or runs out of time is recorded and the next one runs; a
stage is not started with less than its ``min_s`` of the budget left. ``--only`` runs the stages
named, in the order named (opt-in ones included). ``DIR/SUMMARY.md`` lists every stage (exit
code, seconds) with the tail of its table (for an ``offsite bench`` stage cut short, the tables of
the rows it finished), and ``DIR/suite.json`` the same as data, stamped (by the ``env`` stage)
with the GPU, driver, torch and triton versions; both are rewritten after every stage, and a
SIGTERM (a time limit around the suite) kills the running stage's group and writes them once more.
A copy of a checkout without ``.git`` records the commit given in ``OFFSITE_SOURCE_COMMIT``.

Stages: ``env`` (nvidia-smi, ``offsite env``, the stamp), ``tests`` (``pytest -m gpu``: every
Triton kernel against float64 on CUDA), ``frozen_linear`` (bench/frozen_linear_gpu.py),
``fused_ops`` (bench/fused_ops_gpu.py; the quick run without the torch.compile baselines),
``host_overhead`` (bench/host_overhead.py: host µs per call of the per-layer ops, eager PyTorch vs
the library's direct path vs its custom ops), ``e2e`` (``offsite bench`` on the paper's models,
measured on the GPU, batch 1 and 16), ``native`` (bench/native_gpu.py; the extension's CUDA part
compiled on first use, for this GPU's architecture, in a folder of this run) and ``native_tests``
(its GPU tests, on the same build); opt-in: ``e2e_7b`` (OPT-6.7B, where FT at batch 16 runs on
DeepSpeed ZeRO-2 with the optimizer offloaded; DeepSpeed is carried as wheels, see
bench/gpu_wheels.sh), ``experts`` (bench/experts_gpu.py --quick: grouped low-bit experts), ``e2e_more`` (the other
fast paths), ``host_blocks`` (host µs per whole
frozen block) and ``e2e_compile`` (the emulator blocks through torch.compile).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# the paper's four and the best paths first: rows are written as they come, so a stage cut short keeps them. The
# default call's e2e stage runs E2E_METHODS (each row builds a full-size model: 64 rows would not fit its time);
# the rest of the methods are the opt-in e2e_more stage; --quick runs the core four
E2E_METHODS = "ft,ft+lora,ot,ot+lora,ot+lora+fast+int4+recompute+head,ot+lora+fast+int4+head+graph,ot+fast,ot+fast+int4"
CORE_METHODS = "ft,ot+lora,ot+lora+fast+int4+recompute+head,ot+lora+fast+int4+head+graph"
MORE_METHODS = (
    "ot+fast+graph,ot+fast+int8,ot+fast+fp8,ot+fast+recompute,ot+fast+head,ot+fast+int4+recompute+head,"
    "ot+lora+fast,ot+lora+fast+int8+recompute+head"
)
# the library's graphs first: the comparison the compiled rows are read against
COMPILE_METHODS = "ot+lora+fast+int4+head+graph,ot+lora+fast+int4+head+compile+graph,ot+fast+compile+graph,ot+fast+compile"
BUDGET_S = 540  # the device machine allows 600 s per command: room for a wheel install before and the summary after
_STARTED = time.monotonic()  # the budget counts from here (nvidia-smi and the imports included)
# the GPU tests, kernels first (pytest keeps this order): the float64 checks of every Triton kernel must not wait
# behind cold torch.compile runs; the compiled blocks' tests come last and may be cut short
GPU_TEST_FILES = (
    "tests/test_gpu_kernels.py",
    "tests/test_eager_path.py",
    "tests/test_cuda_graphs.py",
    "tests/test_compiled_blocks.py",
)


@dataclass
class Stage:
    name: str
    argv: list[str]
    timeout_s: int
    table: str | None = None  # a file (relative to the output folder) whose tail goes in the summary
    bench_dir: str | None = None  # an ``offsite bench`` stage's folder (relative to the output): its tables go in the summary
    needs: str | None = None  # a file (relative to the repo) that must exist, else the stage is skipped
    env: dict[str, str] | None = None  # extra environment variables
    opt_in: bool = False  # runs only when named in --only
    min_s: int = 10  # not started with less of the suite's budget left (a stage cut short can leave a mess)


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
    """``offsite bench`` measured on the GPU at ``batches`` (1 and 16), its rows under ``out/name``
    (measured only: the full-size accounting on fake tensors is the CPU's job, committed in bench/results)."""
    argv = [sys.executable, "-m", "offsite_kernels.cli", "bench", "--device", "cuda", "--models", models]
    argv += ["--methods", methods, "--batch", batches, "--source", "measured", *extra, "-o", str(out / name)]
    argv += ["--warmup", str(warmup), "--steps", str(steps)]
    return Stage(name, argv, timeout_s, opt_in=opt_in, min_s=60, bench_dir=name)


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
                "import json, sys, offsite_kernels.cli as c, offsite_kernels.benchmark.stamp as s; "
                "c.main(['env']); t = json.dumps(s.stamp(), indent=2); print(t); open(sys.argv[1], 'w').write(t)",
                str(out / STAMP_FILE),
            ],
            20,
        ),
        # -v --tb=line: each test's verdict is in the log as it comes, should the stage run out of time
        Stage(
            "tests",
            [py, "-m", "pytest", "-v", "--tb=line", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_FILES],
            110,
            table="tests.log",
            min_s=30,
        ),
        _script_stage(
            "frozen_linear",
            "frozen_linear_gpu.py",
            out / "frozen_linear",
            400 if full_kernels else 130,  # the quick sweep compiles ~85 kernels from a cold cache
            "frozen_linear_gpu.md",
            *q,
            # quick: 40 ms of repetitions per median (hundreds of calls of these µs kernels), so the ~300
            # measurements leave the cold compiles their time
            *([] if full_kernels else ["--rep-ms", "40", "--warmup-ms", "10"]),
        ),
        # the quick run leaves out the torch.compile baselines (cold Inductor compiles): the block section comes last
        _script_stage(
            "fused_ops",
            "fused_ops_gpu.py",
            out / "fused_ops",
            400 if full_kernels else 90,
            "fused_ops_gpu.md",
            *q,
            *([] if full_kernels else ["--no-compile"]),
        ),
        _bench_stage(out, "e2e", "gpt2-xl,opt-1.3b", CORE_METHODS if quick else E2E_METHODS, 190),
        # the stages below rarely fit the first call's budget: the second call names them (see the module docs)
        _script_stage(
            "host_overhead", "host_overhead.py", out / "host_overhead" / "host_overhead-cuda.json", 45, "host_overhead-cuda.md"
        ),
        # last: the CUDA part of the extension is compiled on first use (OFFSITE_NATIVE_JIT), which takes a while; not
        # started with less than 90 s left (a JIT build cut short leaves its lock behind). Its GPU tests reuse the build.
        replace(
            _script_stage(
                "native",
                "native_gpu.py",
                out / "native" / "native_gpu.json",
                150,
                "native_gpu.md",
                env={"OFFSITE_NATIVE_JIT": "1"},
            ),
            min_s=90,
        ),
        Stage(
            "native_tests",
            [py, "-m", "pytest", "-v", "--tb=line", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_native_cuda.py"],
            90,
            table="native_tests.log",
            env={"OFFSITE_NATIVE_JIT": "1"},
            min_s=30,
        ),
        # opt-in (--only e2e_7b): 6.7B-parameter models. FT runs on DeepSpeed ZeRO-2 with CPU offload where plain
        # FT does not fit the GPU and the host can hold the offload; DeepSpeed travels as wheels (bench/gpu_wheels.sh)
        _bench_stage(
            out,
            "e2e_7b",
            "opt-6.7b",
            "ft,ot+lora,ot+lora+fast+int4+recompute+head",
            330,
            warmup=1,
            steps=3,
            opt_in=True,
        ),
        # opt-in (--only experts): a mixture of experts' expert MLPs, grouped low-bit experts against Hugging Face's and
        # the expert-by-expert loop (Qwen3-30B-A3B and Mixtral-8x7B at 4096 tokens)
        replace(_script_stage("experts", "experts_gpu.py", out / "experts", 150, "experts_gpu.md", "--quick"), opt_in=True),
        # opt-in (--only e2e_more): the other fast paths, each alone and combined
        _bench_stage(out, "e2e_more", "gpt2-xl,opt-1.3b", MORE_METHODS, 400, opt_in=True),
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
            opt_in=True,
            batches="1",
        ),
    ]


def select_stages(every: list[Stage], only: str | None) -> list[Stage]:
    """The stages to run: those named in ``only`` (comma-separated), in the order named; else every stage that is not opt-in."""
    if not only:
        return [stage for stage in every if not stage.opt_in]
    chosen = [name.strip() for name in only.split(",") if name.strip()]
    by_name = {stage.name: stage for stage in every}
    unknown = [name for name in chosen if name not in by_name]
    if unknown:
        raise ValueError(f"--only: no stage named {', '.join(unknown)}; the stages are {', '.join(by_name)}")
    return [by_name[name] for name in dict.fromkeys(chosen)]


STAMP_FILE = "stamp.json"  # written by the env stage: the suite itself never imports torch or touches the GPU
_RUNNING: list[subprocess.Popen] = []  # the stage in flight, for the SIGTERM handler
_STOP = {"asked": False}  # set by SIGTERM: the running stage is killed and no other starts


def _on_sigterm(signum: int, frame: Any) -> None:
    """Kill the running stage's process group at once; the suite then writes its summary and stops."""
    _STOP["asked"] = True
    for proc in list(_RUNNING):
        _kill_group(proc, wait=False)


def _kill_group(proc: subprocess.Popen, wait: bool = True) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if wait:
        proc.wait()


def run_stage(stage: Stage, out: Path, env: dict[str, str], left_s: float) -> StageResult:
    if stage.needs and not (REPO / stage.needs).exists():
        return StageResult(stage.name, None, 0.0, f"skipped ({stage.needs} is not in this checkout)")
    timeout = int(min(stage.timeout_s, left_s))
    if timeout < stage.min_s:
        return StageResult(stage.name, None, 0.0, f"skipped (less than {stage.min_s} s of the suite's budget left)")
    log = out / f"{stage.name}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        # a session of its own: on timeout the whole process group goes (ninja, nvcc, compile workers too)
        proc = subprocess.Popen(
            stage.argv, cwd=REPO, env={**env, **(stage.env or {})}, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        _RUNNING.append(proc)
        try:
            if _STOP["asked"]:  # SIGTERM came while the stage was being started, before the handler could see it
                _kill_group(proc)
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code, status = None, f"timeout after {timeout} s"
        finally:
            _RUNNING.remove(proc)
    if _STOP["asked"] and status != "ok":
        code, status = None, "interrupted (SIGTERM)"
    return StageResult(stage.name, code, time.perf_counter() - start, status)


def _bench_table(folder: Path) -> Path | None:
    """The markdown of an ``offsite bench`` stage; for one cut short (it writes its tables at the end), the
    tables rendered here from the rows it appended as they came."""
    table = latest(folder, "offsite_bench-*.md")
    rows_path = folder / "offsite_bench.jsonl"
    if table is not None or not rows_path.exists():
        return table
    sys.path.insert(0, str(REPO))
    from offsite_kernels.benchmark.report import format_markdown
    from offsite_kernels.benchmark.stamp import read_rows

    rows = read_rows(rows_path)
    if not rows:
        return None
    table = folder / "offsite_bench-partial.md"
    table.write_text("(the stage ran out of time: tables of the rows it finished)\n\n" + format_markdown(rows))
    return table


def _device_arch() -> str | None:
    """The GPU's compute capability as nvidia-smi gives it ("9.0"), or None."""
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    caps = {line.strip() for line in proc.stdout.splitlines() if line.strip()}
    return next(iter(caps)) if proc.returncode == 0 and len(caps) == 1 else None


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
    # the native extension's JIT build: a folder of this run (a stale lock of an earlier run cannot block it), and only
    # this GPU's architecture (half the nvcc work of the default sm_80 + sm_90)
    if "TORCH_EXTENSIONS_DIR" not in env:
        env["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="offsite_torch_extensions_")
    arch = _device_arch()
    if arch and "OFFSITE_CUDA_ARCH_LIST" not in env:
        env["OFFSITE_CUDA_ARCH_LIST"] = arch
    if args.host_memory_gib:
        env["OFFSITE_HOST_MEMORY_GIB"] = str(args.host_memory_gib)
    try:
        selected = select_stages(stages(out, args.quick, args.full_kernels), args.only)
    except ValueError as exc:
        p.error(str(exc))
    results: list[tuple[Stage, StageResult]] = []
    _STOP["asked"] = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for stage in selected:
            if _STOP["asked"]:
                break
            print(f"[suite] {stage.name} ...", flush=True)
            result = run_stage(stage, out, env, args.budget_s - (time.monotonic() - _STARTED))
            results.append((stage, result))
            print(f"[suite] {stage.name}: {result.status} ({result.seconds:.0f} s)", flush=True)
            write_summary(out, results, budget_s=args.budget_s, interrupted=_STOP["asked"])  # after every stage
    finally:
        signal.signal(signal.SIGTERM, previous)
        interrupted, _STOP["asked"] = _STOP["asked"], False
    if interrupted:
        print("[suite] interrupted (SIGTERM): no further stage started", flush=True)
    summary = write_summary(out, results, tables=True, budget_s=args.budget_s, interrupted=interrupted)
    print("\n".join(summary[: 4 + len(results)]))
    passed = all(r.status == "ok" or r.status.startswith("skipped") for _, r in results)
    return 0 if passed and not interrupted else 1


def write_summary(
    out: Path,
    results: list[tuple[Stage, StageResult]],
    tables: bool = False,
    budget_s: float = BUDGET_S,
    interrupted: bool = False,
) -> list[str]:
    """``SUMMARY.md`` (each stage's status, with the tail of its table when ``tables``) and ``suite.json``
    (the same as data, with the env stage's stamp); returns the summary's lines."""
    summary = ["# GPU suite", "", "| stage | status | exit | seconds |", "|---|---|---|---|"]
    summary += [f"| {r.name} | {r.status} | {r.returncode} | {r.seconds:.0f} |" for _, r in results]
    if interrupted:
        summary += ["", "**Interrupted (SIGTERM): the stages after the last one above never started.**"]
    for stage, _result in results:
        if not tables and stage.bench_dir:
            continue  # rendering a cut-short bench's rows imports the package: once, at the end
        table = _bench_table(out / stage.bench_dir) if stage.bench_dir else out / stage.table if stage.table else None
        if table is not None:
            summary += ["", f"## {stage.name}", "", _tail(table)]
    (out / "SUMMARY.md").write_text("\n".join(summary) + "\n")
    try:
        stamp = json.loads((out / STAMP_FILE).read_text())
    except (OSError, ValueError):
        stamp = None  # no env stage in this call (--only), or it failed
    record = {"stamp": stamp, "budget_s": budget_s, "interrupted": interrupted, "stages": [asdict(r) for _, r in results]}
    (out / "suite.json").write_text(json.dumps(record, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
