"""The native extension's build and load paths: a lean import, the package without a built extension (every op on
another backend; OFFSITE_BACKEND=native fails saying how to build), the just-in-time build's wiring."""

import subprocess
import sys

import pytest
import torch
from conftest import gen

import offsite_kernels as ok
from offsite_kernels import native
from offsite_kernels.backends import backend_status, requested_backend
from offsite_kernels.errors import BackendError
from offsite_kernels.native import build_config


@pytest.fixture
def without_extension(monkeypatch):
    """As if offsite_kernels._C were not built (the module cannot be imported)."""
    monkeypatch.setitem(sys.modules, "offsite_kernels._C", None)
    monkeypatch.delenv(native.JIT_ENV, raising=False)
    native._reset_for_tests()
    yield
    monkeypatch.undo()
    native._reset_for_tests()


def test_import_loads_no_extension():
    code = "import sys, offsite_kernels; assert 'offsite_kernels._C' not in sys.modules, 'loaded at import'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_forced_native_without_extension_says_how_to_build(without_extension, monkeypatch):
    assert not native.available()
    status = backend_status("native")
    assert not status.available and "not built" in status.reason and "pip install --no-build-isolation -e ." in status.reason
    monkeypatch.setenv("OFFSITE_BACKEND", "native")
    with pytest.raises(BackendError, match=r"OFFSITE_BACKEND=native cannot run here: the native extension is not built"):
        requested_backend()
    with pytest.raises(BackendError, match="OFFSITE_NATIVE_JIT=1"):
        ok.quantize_weight(torch.randn(4, 64), bits=4, group_size=32)
    with pytest.raises(BackendError, match="not built"):
        native.require()


def test_every_op_runs_without_extension(without_extension, monkeypatch):
    monkeypatch.delenv("OFFSITE_BACKEND", raising=False)
    w = torch.randn(24, 70, generator=gen(1))
    for bits in (8, 4, "fp8", None):
        qw = ok.quantize_weight(w, bits=bits, group_size=32)
        x = torch.randn(3, 70, generator=gen(2), requires_grad=True)
        y = ok.frozen_linear(x, qw)
        y.sum().backward()
        expected = x.detach().double() @ qw.dequantize().double().T
        assert float((y.detach().double() - expected).abs().max()) < 1e-4 and x.grad is not None


def test_jit_build_is_opt_in_and_compiles_the_checkout(without_extension, monkeypatch):
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "jit-module")
    assert native.get() is None and calls == []  # not without OFFSITE_NATIVE_JIT
    native._reset_for_tests()
    monkeypatch.setenv(native.JIT_ENV, "1")
    assert native.get() == "jit-module"
    (kw,) = calls
    assert kw["sources"][:2] == [str(build_config.repo_root() / s) for s in build_config.CPU_SOURCES]
    assert "-fopenmp" in kw["extra_cflags"] and kw["with_cuda"] == (
        torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    )


def test_failed_jit_build_leaves_other_backends(without_extension, monkeypatch):
    from torch.utils import cpp_extension

    def boom(**kw):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", boom)
    monkeypatch.setenv(native.JIT_ENV, "1")
    assert native.get() is None
    assert "just-in-time build (OFFSITE_NATIVE_JIT=1) failed: Ninja is required" in native.unavailable_reason()


def test_build_config_lists_existing_sources():
    root = build_config.repo_root()
    for source in (*build_config.CPU_SOURCES, *build_config.CUDA_KERNEL_SOURCES, *build_config.CUDA_BINDING_SOURCES):
        assert (root / source).is_file(), source
    assert build_config.parse_archs("8.0;9.0+PTX") == ["80", "90"]
    assert build_config.parse_archs(build_config.DEFAULT_CUDA_ARCHS) == ["80", "90"]


def test_default_gpu_targets_reach_newer_gpus_through_ptx():
    """sm_80 and sm_90 code, plus compute_90 PTX: a GPU newer than Hopper (sm_100, sm_120) has no binary in the
    build and runs the PTX, compiled by its driver; without it the kernels would fail to launch there."""
    assert build_config.DEFAULT_CUDA_ARCHS.split(";")[-1] == "9.0+PTX"
    assert build_config.MIN_CUDA_CAPABILITY == (8, 0)


@pytest.mark.parametrize(
    "capability,runs", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 9), True), ((9, 0), True), ((12, 0), True)]
)
def test_cuda_kernels_serve_only_gpus_the_build_has_code_for(monkeypatch, capability, runs):
    """A CUDA build's kernels serve GPUs of compute capability 8.0 or newer; on older ones (T4, V100) the weight
    quantizers and the frozen linear take another backend instead of failing to launch."""

    class CudaBuild:
        @staticmethod
        def build_info():
            return {"cuda": True}

    import offsite_kernels.backends as backends

    monkeypatch.setattr(native, "get", lambda: CudaBuild)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "_capability", lambda index: capability)  # the cached per-device lookup
    assert native.supports_device(torch.device("cpu"))
    assert native.supports_device(torch.device("cuda")) is runs
    assert native.supports_device(torch.device("cuda", 1)) is runs


def test_dispatch_table_is_well_formed():
    from offsite_kernels.native import dispatch

    assert set(dispatch.TABLE) == {"int8", "int4"}
    for fmt, row in dispatch.TABLE.items():
        assert set(row) == set(dispatch.BUCKETS), fmt
        assert set(row.values()) <= set(dispatch.CANDIDATES)
    assert dispatch.bucket(1) == 1 and dispatch.bucket(3) == 4 and dispatch.bucket(16) == 16 and dispatch.bucket(17) is None
    assert dispatch.choose("int4", 17) == "triton" and dispatch.choose("fp8", 1) == "triton"
    monkey = {"int4": {b: "native" for b in dispatch.BUCKETS}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "TABLE", monkey)
        assert dispatch.choose("int4", 5) == "native"
        assert dispatch.choose("int4", 5, native_ok=False) == "triton"


def test_gpu_bench_derives_and_writes_the_dispatch_table(tmp_path):
    """bench/native_gpu.py's table logic on synthetic rows (the measurements themselves need a GPU)."""
    import importlib.util
    import runpy

    spec = importlib.util.spec_from_file_location("native_gpu", build_config.repo_root() / "bench" / "native_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = []
    for shape in ("a", "b"):
        for fmt in bench.FORMATS:
            for m in bench.BUCKETS:
                times = {
                    "native": 1.0 if m <= 4 else 3.0,
                    "triton": 2.0,
                    "torch": 5.0 if fmt == "int4" else 1.5,
                    "cublas_bf16": 0.5,
                }
                rows += [{"shape": shape, "format": fmt, "M": m, "impl": i, "median_ms": t} for i, t in times.items()]
    table = bench.derive_table(rows)
    assert table["int4"] == {1: "native", 2: "native", 4: "native", 8: "triton", 16: "triton"}
    assert table["int8"] == {1: "native", 2: "native", 4: "native", 8: "torch", 16: "torch"}  # cuBLAS bf16 needs a dense weight
    # a case that failed (an error row, no time) never wins its bucket, and the report shows it
    failed = [
        {**r, "error": "RuntimeError: boom"} if (r["shape"], r["format"], r["M"], r["impl"]) == ("a", "int4", 1, "native") else r
        for r in rows
    ]
    failed = [{k: v for k, v in r.items() if not ("error" in r and k == "median_ms")} for r in failed]
    assert bench.derive_table(failed)["int4"][1] == "triton"
    for r in failed:
        if "error" not in r:
            r.update(gb_per_s=1.0, pct_of_copy=1.0, speedup_vs_triton=1.0)
    stamp = {"gpu": {"name": "test"}, "versions": {"torch": "x", "triton": "y"}, "date": "today"}
    result = {"stamp": stamp, "copy_gb_per_s": 1.0, "nominal_gb_per_s": None, "rows": failed, "checks": []}
    md = bench.markdown({**result, "table": bench.derive_table(failed), "partial": True})
    assert "error: a int4 M=1 native: RuntimeError: boom" in md and "Partial" in md
    path = tmp_path / "dispatch_table.py"
    bench.write_table(table, "synthetic", path)
    written = runpy.run_path(str(path))
    assert written["MEASURED"] is True and written["SOURCE"] == "synthetic" and written["TABLE"] == table
