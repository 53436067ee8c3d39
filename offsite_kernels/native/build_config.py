"""Sources and flags of the native extension, shared by setup.py and the just-in-time build.

This file imports nothing from the package (setup.py loads it by path, before the package is installed).
Paths are relative to the repository root.
"""

from __future__ import annotations

from pathlib import Path

# sm_80 code (A100; runs on every 8.x GPU too) and sm_90 code (H100/H200), plus compute_90 PTX that the driver
# compiles for newer GPUs (Blackwell's sm_100/sm_120), which have no binary here and would otherwise fail to launch
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# the oldest GPU the default build runs on (native.supports_device)
MIN_CUDA_CAPABILITY = (8, 0)
CPU_SOURCES = ("csrc/module.cpp", "csrc/cpu/kernels.cpp")
# plain CUDA C++ (kernels + extern "C" launchers, no torch headers) and their torch bindings, compiled apart
CUDA_KERNEL_SOURCES = ("csrc/cuda/quant.cu", "csrc/cuda/skinny_gemm.cu")
CUDA_BINDING_SOURCES = ("csrc/cuda/bindings.cpp",)
# no FMA contraction anywhere: quantization and dequantization are bit-exact with the float32 reference (the GEMMs
# call fmaf themselves); at::parallel_for needs OpenMP
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas")
NVCC_FLAGS = ("-O3", "--fmad=false", "-lineinfo")  # torch adds -std (c++17 or c++20) itself
LINK_FLAGS = ("-fopenmp",)


def repo_root() -> Path:
    """The checkout this file lives in (the parent of ``offsite_kernels/``)."""
    return Path(__file__).resolve().parents[2]


def parse_archs(archs: str) -> list[str]:
    """``"8.0;9.0+PTX"`` -> ``["80", "90"]`` (compute capabilities as nvcc spells them)."""
    out = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip().replace("+PTX", "")
        if arch:
            out.append(arch.replace(".", ""))
    return out
