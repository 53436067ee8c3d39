"""Ahead-of-time compile checks of the frozen-linear Triton kernels for every GPU class: sm_80 (A100), sm_86
(99 KiB of shared memory per block: RTX 3090/4090, A10, L4, L40S), sm_90 (H100/H200), sm_100 (B200) and
sm_120 (consumer Blackwell, which runs sm_86's lists).

No GPU is needed: Triton compiles for the real targets on the CPU and the ``cuobjdump`` bundled
with its NVIDIA backend reads the cubins (``offsite_kernels/ops/aot.py``). For each case:

- it compiles;
- the GEMM runs on tensor cores: ``HGMMA`` (warpgroup MMA) on sm_90 and ``UTCHMMA`` (tcgen05) on sm_100
  for tiles of 64 or more rows, ``HMMA`` for the skinny 16- and 32-row tiles there (these serve M <= 32,
  where the weight bytes, not the math, set the time) and on sm_80, sm_86 and sm_120;
- no register spills (stack 0, no local stores);
- shared memory (dynamic + static) fits one block: 163 KiB on A100, 99 KiB on sm_86/sm_120, 227 KiB on
  H100/H200/B200.

The grouped frozen linear of low-bit experts (``grouped_linear_triton.aot_cases``): every tile of each direction and
format, for every GPU class, under the same checks.

The fp8 tensor-core path (``fp8_gemm_triton.aot_cases``) compiles for sm_89, sm_90, sm_100 and sm_120
(sm_80 has no fp8 tensor cores and runs weight-only fp8): its GEMM must show e4m3 x e4m3 -> fp32 MMAs
(``QGMMA`` on sm_90, ``QMMA`` on sm_89/sm_120, ``UTCQMMA`` on sm_100) and its quantizer the hardware's
saturating e4m3 cast.

Coverage: every configuration the autotuner may pick for each kernel and weight format on each
architecture (``candidate_configs``: sm_90 adds Hopper's larger tiles), with bf16 activations; fp16 compiles to the same
resources, so it gets one configuration per (kernel, format), rotating through the list. fp32 activations
have their own lists, each checked whole: on TF32 tensor cores ("tf32": HMMA/HGMMA with TF32 operands)
and as exact fp32 FMAs ("fp32": no tensor-core MMA may appear).
``bench/aot_report.py`` writes the full matrix (every activation dtype) to bench/results/.
The selected cases compile up front, in worker processes with the interpreter off, one per CPU
(conftest's ``aot_prefetched``); each test then checks its case's cached report row.
Skipped only where Triton's NVIDIA backend or its ``cuobjdump`` is missing.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from offsite_kernels.ops import aot
from offsite_kernels.ops import fp8_gemm_triton as fp8k
from offsite_kernels.ops import grouped_linear_triton as grouped
from offsite_kernels.ops.frozen_linear_triton import candidate_configs

_AVAILABLE, _WHY = aot.availability()
pytestmark = [
    pytest.mark.skipif(not _AVAILABLE, reason=f"AOT compile check unavailable: {_WHY}"),
    pytest.mark.usefixtures("aot_prefetched"),  # the selected cases compile up front, one per CPU (conftest)
]


def _cases() -> list:
    chosen = []
    for arch in aot.ARCHS:
        for kernel in aot.KERNELS:
            for i, fmt in enumerate(aot.FORMATS):
                configs = [aot.config_key(c) for c in candidate_configs(kernel, fmt, aot.gpu_class(arch))]
                chosen += [(kernel, fmt, "bf16", cfg, arch) for cfg in configs]
                chosen.append((kernel, fmt, "fp16", configs[i % len(configs)], arch))
                for dtype in ("tf32", "fp32"):  # fp32 activations: their own lists, every tile
                    fp32 = candidate_configs(kernel, fmt, aot.gpu_class(arch), aot.ACT_OPERANDS[dtype])
                    chosen += [(kernel, fmt, dtype, aot.config_key(c), arch) for c in fp32]
    return [
        pytest.param(
            kernel, fmt, dtype, cfg, arch, id=f"sm{arch}-{kernel}-{fmt}-{dtype}-{aot.config_label(cfg).replace(' ', '_')}"
        )
        for kernel, fmt, dtype, cfg, arch in chosen
    ]


CASES = _cases()
ARGS = "kernel,fmt,dtype,cfg,arch"


def _report(kernel: str, fmt: str, dtype: str, cfg: tuple, arch: int) -> dict:
    row = aot.compile_report(kernel, fmt, dtype, cfg, arch)  # cached: each variant compiles once per session
    assert row["compiled"], f"sm_{arch}: {aot.problems(row)[0]}\n{row['error']}"
    return row


@pytest.mark.parametrize(ARGS, CASES)
def test_compiles(kernel, fmt, dtype, cfg, arch):
    row = _report(kernel, fmt, dtype, cfg, arch)
    assert row["registers"] > 0


@pytest.mark.parametrize(ARGS, CASES)
def test_uses_tensor_cores(kernel, fmt, dtype, cfg, arch):
    row = _report(kernel, fmt, dtype, cfg, arch)
    want = aot.expected_tensor_core(arch, cfg[0], dtype)
    if want is None:  # exact fp32 (PyTorch's default for fp32 matmuls): FMAs, never TF32 tensor cores
        assert not row["tensor_core"], f"{row['tensor_core_mnemonic']} in an exact-fp32 GEMM on sm_{arch}"
    else:
        assert row["tensor_core_ok"], f"no {want} in the sm_{arch} SASS (found: {row['tensor_core_mnemonic']})"


@pytest.mark.parametrize(ARGS, CASES)
def test_no_register_spills(kernel, fmt, dtype, cfg, arch):
    row = _report(kernel, fmt, dtype, cfg, arch)
    assert row["stack_bytes"] == 0 and row["local_bytes"] == 0 and row["spill_stores"] == 0, (
        f"spills on sm_{arch}: {row['registers']} registers, stack {row['stack_bytes']} B, "
        f"{row['spill_stores']} STL / {row['spill_loads']} LDL in the SASS"
    )


@pytest.mark.parametrize(ARGS, CASES)
def test_shared_memory_fits(kernel, fmt, dtype, cfg, arch):
    row = _report(kernel, fmt, dtype, cfg, arch)
    assert row["shared_bytes"] <= aot.SHARED_LIMITS[arch], (
        f"{row['shared_bytes']} B of shared memory (dynamic {row['dynamic_shared_bytes']} + static "
        f"{row['static_shared_bytes']}) > {aot.SHARED_LIMITS[arch]} B per block on {aot.ARCH_NAMES[arch]}"
    )


def test_signature_matches_kernels():
    """The AOT signature names every kernel parameter, in order, with the GPU's constexpr values."""
    for kernel in aot.KERNELS:
        for fmt in aot.FORMATS:
            sig, constexprs, _ = aot.kernel_signature(kernel, fmt, "bf16", aot.config_key(candidate_configs(kernel, fmt)[0]))
            assert list(sig) == list(aot.kernel_fn(kernel).arg_names)
            assert all(sig[name] == "constexpr" for name in constexprs)
            assert constexprs["DOT_PRECISION"] == "ieee"
            assert not any(constexprs.get(flag, False) for flag in aot.INTERPRETER_FLAGS)


def _described(kernel: str, fmt: str, cfg: tuple) -> aot.KernelCase:
    """The frozen-linear variant written as a generic :class:`aot.KernelCase` (how other ops describe theirs)."""
    sig, constexprs, attrs = aot.kernel_signature(kernel, fmt, "bf16", cfg)
    names = list(sig)
    types = {n: t for n, t in sig.items() if t != "constexpr"}
    consts = {n: v for n, v in constexprs.items() if n not in types}
    unit = {n: v for n, v in consts.items() if isinstance(v, int) and not isinstance(v, bool) and n.startswith("stride")}
    for n in unit:
        consts.pop(n)
    return aot.KernelCase(
        module="offsite_kernels.ops.frozen_linear_triton",
        fn=aot.kernel_fn(kernel).__name__,
        types={**types, **unit},
        constexprs=consts,
        div16=tuple(names[i] for (i,) in attrs),
        num_warps=cfg[4],
        num_stages=cfg[5],
        tensor_core=True,
    )


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_described_case_compiles_like_the_builtin_report(arch):
    cfg = aot.config_key(candidate_configs("fwd", "int4", aot.gpu_class(arch))[0])
    case = _described("fwd", "int4", cfg)
    row, builtin = aot.compile_case(case, arch), aot.compile_report("fwd", "int4", "bf16", cfg, arch)
    assert row["ok"], aot.case_problems(row)
    assert (row["registers"], row["shared_bytes"]) == (builtin["registers"], builtin["shared_bytes"])


def test_described_case_missing_an_argument_is_reported():
    cfg = aot.config_key(candidate_configs("bwd", "int8")[0])
    case = _described("bwd", "int8", cfg)
    broken = aot.KernelCase(**{**case.__dict__, "types": {k: v for k, v in case.types.items() if k != "M"}})
    row = aot.compile_case(broken, 90)
    assert not row["compiled"] and "'M'" in aot.case_problems(row)[0]


# --- split-K (few tokens): the partial-writing variants the autotuner may pick, and the kernel adding them ---------
def _case_params(archs, cases_of) -> list:
    """One pytest parameter per (case, arch), ``cases_of(arch)`` giving an architecture's cases."""
    return [pytest.param(case, arch, id=f"sm{arch}-{case.label.replace(' ', '_')}") for arch in archs for case in cases_of(arch)]


SPLIT_CASES = _case_params(aot.ARCHS, aot.split_k_cases)


@pytest.mark.parametrize("case,arch", SPLIT_CASES)
def test_split_k_kernels_compile_without_spills(case, arch):
    row = aot.compile_case(case, arch)
    assert row["compiled"], f"sm_{arch} {case.label}: {aot.case_problems(row)}\n{row['error']}"
    assert row["ok"], f"sm_{arch} {case.label}: {aot.case_problems(row)}"


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_split_k_cases_cover_every_format_dtype_and_both_kernels(arch):
    labels = [case.label for case in aot.split_k_cases(arch)]
    for kernel in aot.KERNELS:
        for fmt in aot.FORMATS:
            for dtype in ("bf16", "tf32", "fp32"):
                assert any(label.startswith(f"{kernel} {fmt} {dtype} split-K") for label in labels), (kernel, fmt, dtype)
    assert sum(label.startswith("split-K reduce") for label in labels) == 6


# --- the fp8 tensor-core path (offsite_kernels/ops/fp8_gemm_triton.py): sm_90 and sm_89, never sm_80 ---------
FP8_CASES = _case_params(fp8k.AOT_TARGETS, fp8k.aot_cases)


@pytest.mark.parametrize("case,arch", FP8_CASES)
def test_fp8_kernels_compile_on_fp8_tensor_cores_without_spills(case, arch):
    """Every fp8 launch: compiles; the GEMM on e4m3 x e4m3 -> fp32 MMAs (QGMMA on sm_90, QMMA on sm_89 and sm_120,
    tcgen05's UTCQMMA on sm_100, whose SASS names no operand types), K-major
    layouts without byte-wise shared stores; the quantizer on the hardware's saturating e4m3 cast; no spills;
    shared memory within the target's limit."""
    row = aot.compile_case(case, arch)
    assert row["compiled"], f"sm_{arch} {case.label}: {aot.case_problems(row)}\n{row['error']}"
    assert row["ok"], f"sm_{arch} {case.label}: {aot.case_problems(row)}"
    if case.tensor_core and arch != 100:
        assert row["mma_instruction"].endswith(".F32.E4M3.E4M3"), row["mma_instruction"]
    elif case.tensor_core:
        assert row["mma_counts"]["UTCQMMA"] > 0 and row["tensor_core_mnemonic"] == "UTCQMMA"


def test_fp8_candidates_are_all_covered_and_sm80_is_no_target():
    assert 80 not in fp8k.AOT_TARGETS and set(fp8k.GEMM_CANDIDATES) == {fp8k.list_target(a) for a in fp8k.AOT_TARGETS}
    for arch in fp8k.AOT_TARGETS:
        covered = {
            (c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"], c.constexprs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in fp8k.aot_cases(arch)
            if c.fn == "_fp8_gemm_kernel" and c.types["c_ptr"] == "*bf16"
        }
        assert covered == set(fp8k.GEMM_CANDIDATES[fp8k.list_target(arch)])
        assert all(c.constexprs["BLOCK_M"] >= aot.WGMMA_MIN_BLOCK_M for c in fp8k.aot_cases(90) if "BLOCK_M" in c.constexprs)


def test_fp8_backward_layout_choice_is_backed_by_the_sass():
    """The backward reads a K-major ``Wq^T`` (fp8_gemm_triton's docs): on sm_90 that gives it the forward's
    pipeline (every operand by async copy, no byte-wise shared stores), which reading ``Wq`` in place does not."""
    by_label = {case.label: case for case in fp8k.aot_cases(90)}
    for cfg in fp8k.GEMM_CANDIDATES[90]:
        tile = "{}x{}x{} w{} s{}".format(*cfg)
        fwd, cached, strided = (aot.compile_case(by_label[f"fp8 gemm {lay} bf16 {tile}"], 90) for lay in fp8k.GEMM_LAYOUTS)
        assert cached["byte_shared_stores"] == fwd["byte_shared_stores"] == 0
        assert cached["async_copies"] == fwd["async_copies"] >= strided["async_copies"]
        assert cached["shared_bytes"] == fwd["shared_bytes"] >= strided["shared_bytes"]


# --- compiling many cases at once ------------------------------------------------------------------------
def _quick_cases() -> list:
    """Four cheap compiles: the split-K reduce kernel, two outputs, for sm_80 and sm_90."""
    reduce_cases = [case for case in aot.split_k_cases(80) if case.label.startswith("split-K reduce")][:2]
    return [(case, arch) for case in reduce_cases for arch in (80, 90)]


@pytest.fixture
def fresh_pool(monkeypatch):
    """An empty row cache and no workers; the workers a test starts are closed after it."""
    monkeypatch.setattr(aot, "_ROWS", {})
    monkeypatch.setattr(aot, "_WORKERS", [])
    yield aot._WORKERS
    for worker in aot._WORKERS:
        worker.close()


def test_prefetch_compiles_each_case_once_over_workers_with_the_rows_one_compile_gives(fresh_pool, monkeypatch):
    cases = _quick_cases()
    aot.prefetch(cases=cases + cases[:2], workers=8)  # duplicates compile once; no more workers than cases
    assert len(aot._ROWS) == 4 and len(aot._WORKERS) == 4
    parallel = [aot.compile_case(case, arch) for case, arch in cases]
    monkeypatch.setattr(aot, "_ROWS", {})
    one_by_one = [aot.compile_case(case, arch) for case, arch in cases]
    for a, b in zip(parallel, one_by_one, strict=True):
        assert a["ok"] and b["ok"], (aot.case_problems(a), aot.case_problems(b))
        assert [a[k] for k in ("arch", "label", "registers", "shared_bytes")] == [
            b[k] for k in ("arch", "label", "registers", "shared_bytes")
        ]
    assert {r["arch"] for r in parallel} == {80, 90}


def test_prefetch_rejects_an_unknown_target_and_reports_a_dead_worker(fresh_pool):
    case, _ = _quick_cases()[0]
    with pytest.raises(ValueError, match="arch must be one of"):
        aot.prefetch(cases=[(case, 75)])
    with pytest.raises(ValueError, match="arch must be one of"):
        aot.prefetch([("fwd", "int4", "bf16", (64, 64, 32, 8, 4, 3), 61)])
    dead = aot._Worker()
    dead.proc.kill()
    dead.proc.wait()
    fresh_pool.append(dead)
    with pytest.raises(RuntimeError, match="AOT compile worker exited"):
        aot.prefetch(cases=[(case, 80)], workers=2)


def test_prefetch_shares_rows_through_a_file_so_each_case_compiles_once_across_processes(fresh_pool, monkeypatch, tmp_path):
    cases = _quick_cases()
    share = tmp_path / "rows.json"
    aot.prefetch(cases=cases[:2], workers=2, share=share)
    first = [aot.compile_case(case, arch) for case, arch in cases[:2]]
    assert all(row["ok"] for row in first) and len(json.loads(share.read_text())) == 2

    # Another process (a fresh cache) that asks for the same cases reads them and compiles nothing ...
    compile_request, worker = aot._compile_request, aot._Worker
    monkeypatch.setattr(aot, "_ROWS", {})
    monkeypatch.setattr(aot, "_compile_request", _no_compile)
    monkeypatch.setattr(aot, "_Worker", _no_compile)
    aot.prefetch(cases=cases[:2], share=share)
    assert [aot.compile_case(case, arch) for case, arch in cases[:2]] == first

    # ... and what it still lacks compiles there and is added to the file, beside the rows it found.
    monkeypatch.setattr(aot, "_ROWS", {})
    monkeypatch.setattr(aot, "_compile_request", compile_request)
    monkeypatch.setattr(aot, "_Worker", worker)
    aot.prefetch(cases=cases, workers=1, share=share)
    assert len(json.loads(share.read_text())) == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    assert [aot.compile_case(case, arch) for case, arch in cases[:2]] == first
    assert all(aot.compile_case(case, arch)["ok"] for case, arch in cases[2:])


def test_a_failed_write_of_the_shared_rows_keeps_the_old_file_and_leaves_no_temporary_file(monkeypatch, tmp_path):
    share = tmp_path / "rows.json"
    share.write_text("{}")
    monkeypatch.setattr(aot, "_ROWS", {"a row this process compiled": (("ok", True),)})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aot.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        aot.prefetch(share=share)
    assert share.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name != "rows.json.lock"] == ["rows.json"]


def _no_compile(*args, **kwargs):
    raise AssertionError("compiled although the shared file holds the row")


# --- the grouped frozen linear (a mixture of experts' projections): every tile of each direction and format ---------
GROUPED_CASES = _case_params(grouped.AOT_TARGETS, grouped.aot_cases)


@pytest.mark.parametrize("case,arch", GROUPED_CASES)
def test_grouped_kernels_compile_on_tensor_cores_without_spills(case, arch):
    row = aot.compile_case(case, arch)
    assert row["compiled"], f"sm_{arch} {case.label}: {aot.case_problems(row)}\n{row['error']}"
    assert row["ok"], f"sm_{arch} {case.label}: {aot.case_problems(row)}"


def test_grouped_cases_cover_every_tile_the_launchers_pick():
    for arch in grouped.AOT_TARGETS:
        assert arch in aot.ARCHS
        covered = {
            (
                c.fn,
                c.constexprs["FMT"],
                tuple(c.constexprs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
                c.num_warps,
                c.num_stages,
            )
            for c in grouped.aot_cases(arch)
        }
        for (direction, kind), tiles in grouped.TILES.items():
            formats = ["int4"] if kind == "int4" else [f for f in grouped.FMT_CODES if f != "int4"]
            for fmt in formats:
                for bm, bn, bk, warps, stages in tiles.values():
                    key = (f"_grouped_linear_{direction}_kernel", grouped.FMT_CODES[fmt], (bm, bn, bk), warps, stages)
                    assert key in covered, (arch, direction, fmt, (bm, bn, bk, warps, stages))
