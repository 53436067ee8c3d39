"""The native extension ``offsite_kernels._C`` (C++ on CPU, CUDA on GPU; sources in ``csrc/``): loading and wrappers.

Nothing here is loaded by ``import offsite_kernels``: the extension is imported the first time an op asks for it
(:func:`get`). Where it is not built, :func:`get` returns None and every op runs on another backend;
``OFFSITE_BACKEND=native`` then fails with :func:`unavailable_reason`, which says how to build it.

Just-in-time build: with ``OFFSITE_NATIVE_JIT=1``, a source checkout without a built ``_C`` compiles the extension
on first use with ``torch.utils.cpp_extension.load`` (ninja required; the CUDA part too where torch is a CUDA build
and nvcc is found). The build lands in torch's extension cache (``TORCH_EXTENSIONS_DIR``) and is reused.

The wrappers below take and return tensors in the library's formats (see ``offsite_kernels/quant/weight.py``) and
allocate their outputs; the extension checks every argument (device, dtype, contiguity, shape) and raises
``TypeError``/``ValueError``/``RuntimeError`` naming the argument.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

import torch

JIT_ENV = "OFFSITE_NATIVE_JIT"
BUILD_HINT = (
    "build it with a C++ compiler present: pip install --no-build-isolation -e . "
    "(ninja speeds it up: pip install ninja), or set OFFSITE_NATIVE_JIT=1 in a source checkout to compile it on first use"
)

_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str | None = None
_tried = False


def jit_enabled() -> bool:
    """Whether OFFSITE_NATIVE_JIT asks for the just-in-time build."""
    return os.environ.get(JIT_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def _jit_build() -> ModuleType:
    """Compile csrc/ with torch.utils.cpp_extension.load (ninja) and import the result."""
    from torch.utils import cpp_extension

    from . import build_config as cfg

    root = cfg.repo_root()
    sources = [str(root / s) for s in cfg.CPU_SOURCES]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise ImportError(f"{JIT_ENV}=1 needs a source checkout; {missing[0]} does not exist")
    cflags = list(cfg.CXX_FLAGS)
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cuda_flags: list[str] = []
    if with_cuda:
        archs = os.environ.get("OFFSITE_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or cfg.DEFAULT_CUDA_ARCHS
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        sources += [str(root / s) for s in (*cfg.CUDA_BINDING_SOURCES, *cfg.CUDA_KERNEL_SOURCES)]
        cflags.append("-DOFFSITE_WITH_CUDA")
        cuda_flags = list(cfg.NVCC_FLAGS)
    return cpp_extension.load(
        name="offsite_kernels_native_jit",
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=list(cfg.LINK_FLAGS),
        with_cuda=with_cuda,
        verbose=os.environ.get("OFFSITE_NATIVE_JIT_VERBOSE", "0") not in ("", "0"),
    )


def get() -> ModuleType | None:
    """The loaded extension, or None where it is not built (the reason: :func:`unavailable_reason`)."""
    global _module, _reason, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            module = importlib.import_module("offsite_kernels._C")
        except ImportError as exc:
            module = None
            built = not (isinstance(exc, ModuleNotFoundError) and exc.name == "offsite_kernels._C")
            _reason = (
                f"the native extension failed to load ({exc}); rebuild it against this torch: pip install --no-build-isolation -e ."
                if built
                else f"the native extension is not built ({BUILD_HINT})"
            )
            if jit_enabled():
                try:
                    module = _jit_build()
                    _reason = None
                except Exception as exc:  # a failed JIT build leaves the other backends running
                    _reason = f"the just-in-time build ({JIT_ENV}=1) failed: {exc}"
        _module, _tried = module, True
        return _module


def available() -> bool:
    """True when the extension is built and loads (or was just built with ``OFFSITE_NATIVE_JIT=1``)."""
    return get() is not None


def unavailable_reason() -> str:
    """Why :func:`get` returns None (empty when the extension loaded)."""
    get()
    return _reason or ""


def has_cuda() -> bool:
    """True when the loaded extension carries the CUDA kernels."""
    module = get()
    return module is not None and bool(module.build_info()["cuda"])


def require() -> ModuleType:
    """The extension, or a :class:`BackendError` that says how to build it."""
    from ..errors import BackendError

    module = get()
    if module is None:
        raise BackendError(f"OFFSITE_BACKEND=native cannot run here: {unavailable_reason()}")
    return module


def supports_device(device: torch.device) -> bool:
    """Whether the extension has kernels for tensors on ``device``: CPU always; CUDA in a CUDA build, on GPUs of
    compute capability 8.0 or newer (older ones have no code in the default build, ``build_config``)."""
    if get() is None:
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not has_cuda():
        return False
    from ..backends import cuda_capability
    from .build_config import MIN_CUDA_CAPABILITY

    return cuda_capability(device) >= MIN_CUDA_CAPABILITY


def _reset_for_tests() -> None:
    global _module, _reason, _tried
    with _lock:
        _module, _reason, _tried = None, None, False


# --- wrappers (outputs allocated here; the extension checks every argument) ------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` float weight -> (``int8 [N, K]``, ``float32 scales [N]``), bit-exact with the reference."""
    return require().quantize_int8(w.contiguous())


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, K]`` float weight -> (``uint8 packed [N, Kp/2]``, ``float32 scales [N, G]``, ``uint8 zeros [N, G]``)."""
    return require().quantize_int4(w.contiguous(), group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` uint8 values in [0, 15] -> ``[N, K/2]`` bytes, low nibble first."""
    return require().pack_int4(q.contiguous())


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``[N, B]`` bytes -> ``[N, 2B]`` uint8 values in [0, 15]."""
    packed = packed.contiguous()
    out = torch.empty((packed.shape[0], 2 * packed.shape[1]), dtype=torch.uint8, device=packed.device)
    return require().unpack_int4(packed, out)


def _u8(fmt: str, data: torch.Tensor) -> torch.Tensor:
    data = data.contiguous()  # stored weights are (a no-op); a weight quantized from a transposed view may not be
    return data.view(torch.uint8) if fmt == "fp8" and data.dtype == torch.float8_e4m3fn else data


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def dequantize(fmt, data, scales, zeros, group_size, shape, dtype) -> torch.Tensor:
    """The dense ``shape`` weight in ``dtype`` from the stored fields, bit-exact with ``dequantize_fields``."""
    out = torch.empty(shape, dtype=dtype, device=data.device)
    return require().dequantize(fmt, _u8(fmt, data), _c(scales), _c(zeros), group_size, out)


def frozen_linear_fwd(x, data, scales, zeros, bias, fmt, group_size, out_features) -> torch.Tensor:
    """CPU, 2-D ``x [M, K]``: ``x @ deq(W)^T (+ bias)`` in ``x.dtype``, the weight dequantized tile by tile."""
    out = torch.empty((x.shape[0], out_features), dtype=x.dtype, device=x.device)
    return require().frozen_linear_fwd(x.contiguous(), fmt, _u8(fmt, data), _c(scales), _c(zeros), bias, group_size, out)


def frozen_linear_bwd(grad_y, data, scales, zeros, fmt, group_size, in_features) -> torch.Tensor:
    """CPU, 2-D ``grad_y [M, N]``: ``grad_y @ deq(W)`` in ``grad_y.dtype``, tile by tile."""
    out = torch.empty((grad_y.shape[0], in_features), dtype=grad_y.dtype, device=grad_y.device)
    return require().frozen_linear_bwd(grad_y.contiguous(), fmt, _u8(fmt, data), _c(scales), _c(zeros), group_size, out)


def skinny_gemm(x, data, scales, zeros, bias, fmt, group_size, out_features) -> torch.Tensor:
    """CUDA, ``x [M, K]`` with M <= 16, int4 or int8 weight: ``x @ deq(W)^T (+ bias)`` in ``x.dtype``."""
    out = torch.empty((x.shape[0], out_features), dtype=x.dtype, device=x.device)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    return require().skinny_gemm(x.contiguous(), fmt, _u8(fmt, data), _c(scales), _c(zeros), bias, group_size, out)
