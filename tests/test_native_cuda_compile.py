"""Compile-only checks of the CUDA part (no GPU, no CUDA torch needed): every kernel source compiles with nvcc alone
for sm_80 and sm_90 and spills no register; the torch bindings of the CUDA kernels compile against torch's
headers (with a stand-in for the one generated header a CPU build of torch does not ship)."""

import os
import shutil
import subprocess
import sysconfig

import pytest

from offsite_kernels.native import build_config, cuda_compile

NVCC = cuda_compile.find_nvcc()


@pytest.fixture(scope="module")
def report():
    if NVCC is None:
        pytest.skip("nvcc not found")
    return cuda_compile.compile_all()


@pytest.mark.parametrize("arch", cuda_compile.ARCHS)
def test_every_kernel_compiles_without_spills(report, arch):
    rows = [r for r in report["rows"] if r["arch"] == f"sm_{arch}"]
    names = {r["kernel"] for r in rows}
    for kernel in ("quantize_int8_kernel", "quantize_int4_kernel", "pack_int4_kernel", "unpack_int4_kernel", "dequantize_kernel"):
        assert any(kernel in n for n in names), f"{kernel} missing for sm_{arch}"
    skinny = [r for r in rows if "skinny_gemm_kernel<" in r["kernel"]]
    assert len(skinny) == 5 * 2 * 3, "one skinny GEMM per M bucket (1, 2, 4, 8, 16), format and dtype"
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, r
        assert r["registers"] <= 255, r


def test_ptxas_report_parser():
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]\n"
    )
    (row,) = cuda_compile.parse_ptxas(log)
    assert row["arch"] == "sm_90" and row["registers"] == 40 and row["spill_stores"] == 4 and row["smem"] == 1024
    assert row["kernel"] in ("foo(float*)", "_Z3fooPf")


def test_cuda_bindings_compile_against_torch_headers(tmp_path):
    """csrc/cuda/bindings.cpp and csrc/module.cpp with OFFSITE_WITH_CUDA, syntax only: what the GPU build compiles."""
    import torch
    from torch.utils import cpp_extension

    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    cuda_include = cuda_compile.find_cuda_include()
    if cxx is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit's headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text(
        "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
    )  # generated in CUDA builds only
    includes = [str(tmp_path), *cpp_extension.include_paths(), cuda_include, sysconfig.get_paths()["include"]]
    root = build_config.repo_root()
    for source in ("csrc/cuda/bindings.cpp", "csrc/module.cpp"):
        cmd = [
            cxx,
            "-std=c++20",
            "-fsyntax-only",
            "-Wall",
            "-Werror=return-type",
            "-DOFFSITE_WITH_CUDA",
            "-DTORCH_EXTENSION_NAME=_C",
        ]
        cmd += [f"-I{i}" for i in includes] + [str(root / source)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        assert done.returncode == 0, f"{source} (torch {torch.__version__}):\n{done.stderr[-3000:]}"
