"""Triton kernels of the fp8 (e4m3) tensor-core path of the frozen linear (Hopper, Ada).

Weights stored as e4m3 with one fp32 scale per output channel (``W ~= Wq * s_w[:, None]``);
activations are quantized on the fly, one fp32 scale per row, and the GEMM runs on fp8 operands
with fp32 accumulation (warpgroup MMA, ``HGMMA ... E4M3``, on sm_90)::

    forward   Y[m, n]  = s_x[m] * s_w[n] * sum_k qX[m, k] * Wq[n, k]  (+ b[n])
    backward  dX[m, k] = s_g[m] * sum_n qG[m, n] * Wq[n, k],   qG, s_g = rows of dY * s_w[None, :]

with ``s[m] = max(amax_m / 448, FLT_MIN)`` (an all-zero row gets a tiny scale and quantizes to
zeros) and ``q = e4m3(clamp(v / s, -448, 448))``, round to nearest even: bit-exact with
:func:`offsite_kernels.quant.formats.quantize_rows_fp8`, the PyTorch reference. The backward
folds the weight's per-channel scale into ``dY`` before quantizing it, since that scale runs
along the GEMM's reduction.

Two kernels: ``_fp8_quantize_rows_kernel`` (one program per row: amax pass, then quantize
pass; the row is re-read from L1/L2) and ``_fp8_gemm_kernel`` (``C = s_a[m] (* s_b[n]) * A @ B^T
(+ bias)``, with ``A [M, K]`` and ``B [N, K]`` e4m3, any B strides).

Operand layout. Hopper's fp8 warpgroup MMA reads both shared-memory operands K-major (only
16-bit types may be transposed in shared memory). The forward's ``B = Wq [N, K]`` is K-major
as stored. The backward reduces over ``N``, so ``Wq`` read as its ``B`` is N-major. Two ways:
let Triton transpose the tile (it does, in registers, between the global load and the
shared-memory store: the loop stays on HGMMA E4M3), or keep a transposed copy ``Wq^T`` (twice
the fp8 weight memory, or a transpose pass per call). The ahead-of-time SASS of both (see
``offsite_kernels/ops/aot.py``, ``fp8_layout_report``) is the record of that choice: this
module lets Triton transpose, and keeps one stored copy (docs of :func:`fp8_linear_bwd`).

Under Triton's CPU interpreter the fp32 -> e4m3 cast rounds wrongly (it ORs the mantissa
carry into the exponent instead of adding it, and rounds ties away from zero), so there
``INTERPRETER_FP8`` rounds to the e4m3 grid in fp32 first, with integer bit arithmetic; the
cast of an exactly representable value is then exact. The interpreter's fp8 ``tl.dot`` is
exact (it widens e4m3 to fp16, multiplies in fp32): no workaround there.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl
import triton.testing

from ..backends import triton_interpreter_enabled
from .triton_common import _cast

FP8_MAX = 448.0
FP32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny: the scale of an all-zero row


@triton.jit
def _round_to_e4m3_grid(v):
    """``v`` (fp32, within +-448) rounded to the nearest e4m3 value, ties to even, still fp32.

    Only for the interpreter (see module docs): normal e4m3 values keep 3 mantissa bits (an
    integer add carries into the exponent correctly); below 2^-6 the grid is 2^-9 apart."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    t = tl.abs(v) * 512.0
    sub = ((t + 8388608.0) - 8388608.0) * 0.001953125  # 2^23 forces round-to-even of t to an integer
    sub = (sub.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def _fp8_quantize_rows_kernel(
    x_ptr, c_ptr, q_ptr, s_ptr,
    K, stride_xm, stride_xk, stride_qm,
    HAS_COL_SCALE: tl.constexpr, INTERPRETER_FP8: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Row ``m`` of ``v = x (* c[None, :])``: ``s[m] = max(amax / 448, FLT_MIN)``, ``q[m] = e4m3(v / s[m])``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        v = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            v = v * tl.load(c_ptr + k, mask=k < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FP8_MAX), FP32_TINY)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        v = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            v = v * tl.load(c_ptr + k, mask=k < K, other=0.0)
        # IEEE division, as torch divides: bit-exact scales and codes
        q = tl.clamp(tl.math.div_rn(v, scale), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        if INTERPRETER_FP8:
            q = _round_to_e4m3_grid(q)
        tl.store(q_ptr + row * stride_qm + k, q.to(tl.float8e4nv), mask=k < K)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``C[M, N] = s_a[m] (* s_b[n]) * sum_k A[m, k] B[n, k] (+ bias[n])``; A, B e4m3, fp32 accumulation.

    One program per ``BLOCK_M x BLOCK_N`` tile, grouped along M so neighbours share B tiles in L2."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_n)
    first_m = group_id * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_n[None, :] < N) & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc *= tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if HAS_COL_SCALE:
        acc *= tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(
        c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn,
        _cast(acc, c_ptr.dtype.element_ty, INTERPRETER_BF16),
        mask=c_mask,
    )


# --- launch configuration ------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Hopper tiles only: fp8 tensor cores need
# sm_89+, and A100 (sm_80) is no target of this path. Every entry compiles for sm_90 in both
# operand layouts with HGMMA E4M3, without spills and within an H100's shared memory (checked
# ahead of time by tests/test_aot_compile.py). BLOCK_M >= 64: warpgroup MMA works on 64 rows.
GEMM_CANDIDATES = (
    (64, 128, 128, 4, 4),
    (64, 256, 128, 4, 3),
    (128, 128, 128, 4, 4),
    (128, 128, 128, 8, 4),
    (128, 256, 128, 8, 3),
    (128, 256, 64, 8, 4),
)
INTERPRETER_GEMM_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
QUANTIZE_BLOCK_K = 1024
INTERPRETER_QUANTIZE_BLOCK_K = 64
QUANTIZE_WARPS = 4


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)


def gemm_configs() -> list[triton.Config]:
    """Every configuration the fp8 GEMM's autotuner may pick."""
    return [_config(*c) for c in GEMM_CANDIDATES]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """64-row tiles for M <= 64 (a bigger tile would mostly multiply padding), both heights above."""
    if named_args["M_BUCKET"] <= 64:
        return [c for c in configs if c.kwargs["BLOCK_M"] == 64]
    return configs


def _brief_bench(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _autotuned() -> triton.runtime.Autotuner:
    """The GEMM autotuned per (M bucket, N, K, B's layout); winners kept on disk where Triton supports it."""
    options: dict = dict(do_bench=_brief_bench, prune_configs_by={"early_config_prune": _prune})
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True
    return triton.autotune(gemm_configs(), key=["M_BUCKET", "N", "K", "stride_bk", "HAS_COL_SCALE"], **options)(_fp8_gemm_kernel)


_tuned_gemm = _autotuned()


def m_bucket(m: int) -> int:
    """Autotuning key for the token count: the next power of two, capped at 16384."""
    return min(triton.next_power_of_2(max(m, 1)), 16384)


# --- launchers -----------------------------------------------------------------------------
def quantize_rows_fp8_triton(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a 2-D ``x`` (times ``col_scale[None, :]`` if given).

    Returns ``(q [M, K] float8_e4m3fn, contiguous; s [M] fp32)`` with ``x (* c) ~= q * s[:, None]``."""
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return q, s
    c = None if col_scale is None else col_scale.to(torch.float32).contiguous()
    interp = triton_interpreter_enabled()
    _fp8_quantize_rows_kernel[(m,)](
        x, c if c is not None else s, q, s, k, x.stride(0), x.stride(1), q.stride(0),
        HAS_COL_SCALE=c is not None,
        INTERPRETER_FP8=interp,
        BLOCK_K=INTERPRETER_QUANTIZE_BLOCK_K if interp else min(QUANTIZE_BLOCK_K, max(triton.next_power_of_2(k), 16)),
        num_warps=QUANTIZE_WARPS,
    )  # fmt: skip
    return q, s


def fp8_gemm(
    a: torch.Tensor,
    s_a: torch.Tensor,
    b: torch.Tensor,
    s_b: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s_a[:, None] (* s_b[None, :]) * (a @ b^T) (+ bias)`` for e4m3 ``a [M, K]`` and ``b [N, K]`` (any strides)."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), device=a.device, dtype=out_dtype) if out is None else out
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(c))
    args = (a, b, s_a, s_b if s_b is not None else s_a, bias if bias is not None else c, c, m, n, k, m_bucket(m))
    args += (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    meta = dict(
        HAS_COL_SCALE=s_b is not None,
        HAS_BIAS=bias is not None,
        INTERPRETER_BF16=out_dtype == torch.bfloat16 and triton_interpreter_enabled(),
    )
    if triton_interpreter_enabled():
        cfg = INTERPRETER_GEMM_CONFIG
        _fp8_gemm_kernel[(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **meta, **cfg)
    else:
        _tuned_gemm[lambda cf: (triton.cdiv(m, cf["BLOCK_M"]) * triton.cdiv(n, cf["BLOCK_N"]),)](*args, **meta)
    return c


def _weight(data: torch.Tensor) -> torch.Tensor:
    return (data if data.dtype == torch.float8_e4m3fn else data.view(torch.float8_e4m3fn)).contiguous()


# How the backward reads Wq as its B operand (N-major as stored; Hopper's fp8 MMA wants K-major):
BWD_WEIGHT_MODES = ("cache", "transpose", "strided")
BWD_WEIGHT_ENV = "OFFSITE_FP8_BWD_WEIGHT"
_CACHE_ATTR = "_offsite_fp8_wt"


def bwd_weight_mode() -> str:
    """``OFFSITE_FP8_BWD_WEIGHT``: "cache" (default), "transpose" or "strided" (see :func:`bwd_weight_operand`)."""
    import os

    mode = os.environ.get(BWD_WEIGHT_ENV, "").strip().lower() or "cache"
    if mode not in BWD_WEIGHT_MODES:
        raise ValueError(f"{BWD_WEIGHT_ENV}={mode!r}; choose one of {', '.join(BWD_WEIGHT_MODES)}")
    return mode


def bwd_weight_operand(data: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """The backward GEMM's ``B [K, N]`` (``B[k, n] = Wq[n, k]``) for the e4m3 weight ``data [N, K]``.

    - "cache" (default): a contiguous ``Wq^T``, made on the first backward and kept on the stored
      weight tensor (an attribute of its base, dropped with it, rebuilt when the weight is written
      in place): K-major, so both operands stream through the pipelined async copies. Costs one
      more byte per weight element (fp8 layers then hold 2 bytes per weight, bf16's size).
    - "transpose": the same copy made in every call and freed after it (no lasting memory; a pass
      over the weight, 2 N K bytes, per call).
    - "strided": ``Wq`` read in place as an N-major view; Triton transposes every tile through
      registers (byte-wise shared stores, B not multi-buffered: see ``aot.fp8_layout_report``).
    """
    w = data if data.dtype == torch.float8_e4m3fn else data.view(torch.float8_e4m3fn)
    mode = bwd_weight_mode() if mode is None else mode
    if mode == "strided":
        return w.t()
    if mode == "transpose":
        return w.t().contiguous()
    base = w._base if w._base is not None else w
    try:
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), base._version)
    except RuntimeError:  # an inference tensor has no version counter: nothing safe to key a cache on
        return w.t().contiguous()
    cached = getattr(base, _CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    wt = w.t().contiguous()
    setattr(base, _CACHE_ATTR, (key, wt))
    return wt


def fp8_linear_fwd(
    x: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Y = s_x s_w (qX @ Wq^T) (+ b)`` for a 2-D bf16/fp16 ``x [M, K]`` and the e4m3 weight ``data [N, K]``
    (float8_e4m3fn or its uint8 view) with per-channel ``scales [N]``; ``Y`` in ``x.dtype``."""
    q, s = quantize_rows_fp8_triton(x)
    bias = None if bias is None else bias.contiguous()
    return fp8_gemm(q, s, _weight(data), scales.to(torch.float32).contiguous(), bias, x.dtype, out)


def fp8_linear_bwd(
    grad_y: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor | None = None,
    weight_mode: str | None = None,
) -> torch.Tensor:
    """``dX = s_g (qG @ Wq)`` with ``qG, s_g`` the per-row quantization of ``dY * s_w``; ``dX`` in ``dY.dtype``.

    ``weight_mode``: how ``Wq`` becomes the K-major operand (:func:`bwd_weight_operand`;
    default from ``OFFSITE_FP8_BWD_WEIGHT``)."""
    q, s = quantize_rows_fp8_triton(grad_y, col_scale=scales)
    b = bwd_weight_operand(data, weight_mode)  # [K, N]: the GEMM's B with the reduction (N) last
    return fp8_gemm(q, s, b, None, None, grad_y.dtype, out)
