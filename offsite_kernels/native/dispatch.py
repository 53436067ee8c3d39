"""Which kernel runs a low-bit frozen-linear forward on a GPU, per weight format and token-count (M) bucket.

Candidates: ``"native"`` (the CUDA skinny GEMM of csrc/cuda/skinny_gemm.cu, M <= 16 only), ``"triton"`` (the
fused dequant GEMM of ops/frozen_linear_triton.py) and ``"torch"`` (dequantize, then cuBLAS in the activation
dtype: the reference). The choice is read from :data:`TABLE`, which ``bench/native_gpu.py`` writes from its
measurements (bench/results/native_gpu.json) into ``dispatch_table.py`` beside this file.

Until a GPU run has written it, the table holds a default that keeps the Triton kernels everywhere (the library's
behaviour before the native kernels existed): ``MEASURED`` is False then, and nothing here claims a speed-up.
"""

from __future__ import annotations

from .dispatch_table import MEASURED, SOURCE, TABLE

CANDIDATES = ("native", "triton", "torch")
BUCKETS = (1, 2, 4, 8, 16)  # M is rounded up to the next bucket; M > 16 always runs the Triton kernels

__all__ = ["BUCKETS", "CANDIDATES", "MEASURED", "SOURCE", "TABLE", "bucket", "choose"]


def bucket(m: int) -> int | None:
    """The M bucket of ``m`` tokens (the smallest bucket >= m), or None above the last one."""
    for b in BUCKETS:
        if m <= b:
            return b
    return None


def choose(fmt: str, m: int, native_ok: bool = True) -> str:
    """The backend for a forward of ``m`` tokens through a ``fmt`` ("int8"/"int4") weight on a GPU.

    ``native_ok`` is False where the extension has no CUDA kernels: a "native" entry then falls back to the Triton
    kernels. Unknown formats and M above the buckets run the Triton kernels.
    """
    b = bucket(m)
    if b is None:
        return "triton"
    choice = TABLE.get(fmt, {}).get(b, "triton")
    if choice == "native" and not native_ok:
        return "triton"
    return choice if choice in CANDIDATES else "triton"
