"""Build script of the native extension ``offsite_kernels._C`` (csrc/). Metadata lives in pyproject.toml.

What gets built (see csrc/README.md):

- the CPU part (C++, two translation units) wherever torch is importable and a C++ compiler exists;
- the CUDA part (csrc/cuda/*.cu and their torch bindings) as well, when torch is a CUDA build and nvcc is found.

Environment variables:

- ``OFFSITE_NO_NATIVE=1``: build nothing (a pure-Python install; every op runs on another backend).
- ``OFFSITE_NO_CUDA=1``: build the CPU part only, even with a CUDA torch.
- ``OFFSITE_CUDA_ARCH_LIST`` (else ``TORCH_CUDA_ARCH_LIST``): GPU targets, e.g. ``"8.0;9.0+PTX"`` (the default: PTX for GPUs newer than sm_90).
- ``MAX_JOBS``: parallel compile jobs (torch's variable).

ninja is used when it is on PATH (``pip install ninja``), else setuptools compiles the sources one by one.
Install with ``pip install --no-build-isolation -e .`` so that the build sees the installed torch.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_config():
    """offsite_kernels/native/build_config.py, loaded by path (the package is not importable yet)."""
    spec = importlib.util.spec_from_file_location(
        "_offsite_build_config", ROOT / "offsite_kernels" / "native" / "build_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CFG = _build_config()


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _say(message: str) -> None:
    print(f"offsite-kernels setup: {message}", file=sys.stderr)


def _cxx_available() -> bool:
    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")))


def native_extensions() -> tuple[list, dict]:
    if _flag("OFFSITE_NO_NATIVE"):
        _say("OFFSITE_NO_NATIVE is set: skipping the native extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable at build time (use pip install --no-build-isolation): skipping the native extension")
        return [], {}
    if not _cxx_available():
        _say("no C++ compiler found: skipping the native extension (every op runs on the torch/triton backends)")
        return [], {}

    nvcc = shutil.which("nvcc") or (os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None)
    with_cuda = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc) and not _flag("OFFSITE_NO_CUDA")
    sources = list(CFG.CPU_SOURCES)
    compile_args: dict[str, list[str]] = {"cxx": list(CFG.CXX_FLAGS)}
    if with_cuda:
        archs = os.environ.get("OFFSITE_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or CFG.DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch's own flag builder reads it too
        sources += [*CFG.CUDA_BINDING_SOURCES, *CFG.CUDA_KERNEL_SOURCES]
        compile_args["cxx"].append("-DOFFSITE_WITH_CUDA")
        compile_args["nvcc"] = list(CFG.NVCC_FLAGS)
        ext = cpp_extension.CUDAExtension(
            "offsite_kernels._C", sources, extra_compile_args=compile_args, extra_link_args=list(CFG.LINK_FLAGS)
        )
        _say(f"building the CPU and CUDA parts (archs {archs})")
    else:
        why = (
            "torch is a CPU build"
            if torch.version.cuda is None
            else "nvcc not found"
            if nvcc is None
            else "OFFSITE_NO_CUDA is set"
        )
        ext = cpp_extension.CppExtension(
            "offsite_kernels._C", sources, extra_compile_args=compile_args, extra_link_args=list(CFG.LINK_FLAGS)
        )
        _say(f"building the CPU part ({why}: no CUDA kernels)")
    use_ninja = cpp_extension.is_ninja_available()
    if not use_ninja:
        _say("ninja not found (pip install ninja): compiling without it")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
