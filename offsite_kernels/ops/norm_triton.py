"""Triton kernels of the frozen norms: RMSNorm and LayerNorm, optionally fused with a residual add.

One program normalises ``ROWS`` whole rows: a ``[ROWS, BLOCK_N]`` tile with ``BLOCK_N`` the next
power of two of the row length, masked, statistics in fp32 (fp64 for float64 inputs). The forward
writes ``y`` (and ``h = x + residual``, the new residual stream, when fused) plus one ``rstd`` (and
one ``mean`` for LayerNorm) per row; the backward reads ``dy``, the saved input (or ``h``) and
those row statistics, and writes the input gradient only: the weight and bias are frozen, so no
``dgamma``/``dbeta`` partial sums are ever computed or reduced.

``RMS`` (constexpr) picks the norm: RMSNorm ``y = x * rstd * (w + offset)`` with
``rstd = rsqrt(mean(x^2) + eps)``; LayerNorm ``y = (x - mean) * rstd * w + b`` with
``rstd = rsqrt(var + eps)``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreter_enabled
from ..errors import OffsiteError
from .triton_common import _cast
from .triton_launch import as_rows, cdiv, next_power_of_2, on_input_device, output

# Longest row the one-tile kernels take: a 16384-wide row (the hidden size of the largest released
# transformers) is 16 fp32 values per thread at 32 warps. Longer rows run the PyTorch reference
# unless the Triton backend is forced, which then fails loudly (see norm.py).
MAX_N = 16384


class NormKernelError(OffsiteError, ValueError):
    """A row too long for the one-tile Triton norm kernels."""


@triton.jit
def _acc(v, F64: tl.constexpr):
    """``v`` in the statistics dtype: fp64 for float64 inputs, fp32 for everything else."""
    # one return: the compiler refuses returns of different types, even under a constexpr branch
    return v.to(tl.float64) if F64 else v.to(tl.float32)


@triton.jit
def _rsqrt(v, F64: tl.constexpr):
    return 1.0 / tl.sqrt(v) if F64 else tl.math.rsqrt(v)


@triton.jit
def _norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr,
    M, N, stride_xm, stride_xn, stride_rm, stride_rn, eps, w_offset,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROUND_NORMALIZED: tl.constexpr, F64: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Rows ``[pid * ROWS, pid * ROWS + ROWS)``: ``h = x + r`` (rounded to x's dtype, stored),
    row statistics of ``h`` (or ``x``), ``y = norm(h)`` in y's dtype. ``y`` and ``h`` are
    contiguous ``[M, N]``; ``x`` and ``r`` may have any strides."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # M * N may pass 2^31
    out_offs = rows64 * N + cols[None, :]

    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows64 * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
        h = _cast(_acc(x, F64) + _acc(r, F64), h_ptr.dtype.element_ty, INTERPRETER_BF16)
        tl.store(h_ptr + out_offs, h, mask=mask)
        v = _acc(h, F64)  # the statistics see the stored (rounded) h, as the backward will
    else:
        v = _acc(x, F64)

    if RMS:
        rstd = _rsqrt(tl.sum(v * v, axis=1) / N + eps, F64)
        xhat = v * rstd[:, None]
    else:
        mean = tl.sum(v, axis=1) / N
        d = tl.where(mask, v - mean[:, None], 0.0)
        rstd = _rsqrt(tl.sum(d * d, axis=1) / N + eps, F64)
        xhat = d * rstd[:, None]
        tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    if ROUND_NORMALIZED:  # Hugging Face Llama's rounding point: x * rstd in x's dtype, then the weight
        xhat = _acc(_cast(xhat, y_ptr.dtype.element_ty, INTERPRETER_BF16), F64)
    y = xhat
    if HAS_WEIGHT:
        w = _acc(tl.load(w_ptr + cols, mask=col_ok, other=0.0), F64) + w_offset
        y = y * w[None, :]
    if HAS_BIAS:
        y = y + _acc(tl.load(b_ptr + cols, mask=col_ok, other=0.0), F64)[None, :]
    tl.store(y_ptr + out_offs, _cast(y, y_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dh_ptr, dx_ptr,
    M, N, stride_dym, stride_dyn, stride_xm, stride_xn, stride_dhm, stride_dhn, w_offset,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DH: tl.constexpr, F64: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Input gradient of ``ROWS`` rows from ``dy``, the saved input and row statistics:
    ``dx = rstd * (g - xhat * mean(g * xhat))`` (RMSNorm) or
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` (LayerNorm), ``g = dy * w``; plus ``dh``
    (the residual stream's own gradient) when fused. ``dx`` is contiguous ``[M, N]``."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    dy = _acc(tl.load(dy_ptr + rows64 * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0), F64)
    x = _acc(tl.load(x_ptr + rows64 * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0), F64)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    if RMS:
        xhat = x * rstd[:, None]
    else:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        w = _acc(tl.load(w_ptr + cols, mask=col_ok, other=0.0), F64) + w_offset
        g = dy * w[None, :]
    c1 = tl.sum(g * xhat, axis=1) / N
    if RMS:
        dx = (g - xhat * c1[:, None]) * rstd[:, None]
    else:
        c2 = tl.sum(g, axis=1) / N
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
    if HAS_DH:
        dx += _acc(tl.load(dh_ptr + rows64 * stride_dhm + cols[None, :] * stride_dhn, mask=mask, other=0.0), F64)
    tl.store(dx_ptr + rows64 * N + cols[None, :], _cast(dx, dx_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


# --- launch configuration ------------------------------------------------------------------
# Rows per program and warps per row length: about 8-16 fp32 values per thread per tile, so the
# backward's three live tiles (dy, x, w) stay in registers. Every entry is compiled for sm_80 and
# sm_90 by tests/test_norm.py (no spills, shared memory within the limit).
@functools.cache
def launch_config(n: int) -> tuple[int, int, int]:
    """``(BLOCK_N, ROWS, num_warps)`` for rows of ``n`` elements."""
    block_n = next_power_of_2(n)
    rows = max(1, min(16, 2048 // block_n))
    tile = rows * block_n
    num_warps = max(4, min(32, tile // 512))
    return block_n, rows, num_warps


def block_sizes() -> list[int]:
    """Every ``BLOCK_N`` the launchers can pick (row lengths 1 .. ``MAX_N``)."""
    return [1 << i for i in range(MAX_N.bit_length())]


def _interpreter_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreter_enabled()


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_n(n: int) -> None:
    if n > MAX_N:
        raise NormKernelError(
            f"the Triton norm kernels take rows of at most {MAX_N} elements, got {n}; "
            "use OFFSITE_BACKEND=torch (or leave OFFSITE_BACKEND unset: longer rows then run the PyTorch reference)"
        )


def _grid(m: int, rows: int) -> tuple[int]:
    return (cdiv(m, rows),)


@on_input_device
def _norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    weight_offset: float,
    rms: bool,
    round_normalized: bool,
    out: torch.Tensor | None,
    residual_out: torch.Tensor | None,
    mean_out: torch.Tensor | None,
    rstd_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    shape, n = x.shape, x.shape[-1]
    _check_n(n)
    x, m, stride_xm, stride_xn = as_rows(x)
    stats = _stats_dtype(x.dtype)
    y = output(out, shape, x.dtype, x.device)
    h = None if residual is None else output(residual_out, shape, x.dtype, x.device, "residual_out")
    rstd = output(rstd_out, shape[:-1], stats, x.device, "rstd_out")
    mean = None if rms else output(mean_out, shape[:-1], stats, x.device, "mean_out")
    if m == 0:
        return y, h, mean, rstd
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    # placeholders: never read when the flag is off
    r, _, stride_rm, stride_rn = as_rows(residual) if residual is not None else (x, m, stride_xm, stride_xn)
    block_n, rows, num_warps = launch_config(n)
    _norm_fwd_kernel[_grid(m, rows)](
        x, r, w if w is not None else y, b if b is not None else y, y, h if h is not None else y,
        mean if mean is not None else rstd, rstd,
        m, n, stride_xm, stride_xn, stride_rm, stride_rn, float(eps), float(weight_offset),
        RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=w is not None, HAS_BIAS=b is not None,
        ROUND_NORMALIZED=round_normalized, F64=x.dtype == torch.float64, INTERPRETER_BF16=_interpreter_bf16(x.dtype),
        ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return y, h, mean, rstd


@on_input_device
def _norm_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    grad_h: torch.Tensor | None,
    weight_offset: float,
    rms: bool,
    out: torch.Tensor | None,
) -> torch.Tensor:
    shape, n = x.shape, x.shape[-1]
    _check_n(n)
    x, m, stride_xm, stride_xn = as_rows(x)
    dx = output(out, shape, x.dtype, x.device)
    if m == 0:
        return dx
    w = None if weight is None else weight.contiguous()
    grad_y, _, stride_dym, stride_dyn = as_rows(grad_y)
    dh, _, stride_dhm, stride_dhn = as_rows(grad_h) if grad_h is not None else (grad_y, m, stride_dym, stride_dyn)
    block_n, rows, num_warps = launch_config(n)
    _norm_bwd_kernel[_grid(m, rows)](
        grad_y, x, w if w is not None else dx, mean.contiguous() if mean is not None else rstd, rstd.contiguous(), dh, dx,
        m, n, stride_dym, stride_dyn, stride_xm, stride_xn, stride_dhm, stride_dhn, float(weight_offset),
        RMS=rms, HAS_WEIGHT=w is not None, HAS_DH=grad_h is not None, F64=x.dtype == torch.float64,
        INTERPRETER_BF16=_interpreter_bf16(x.dtype), ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return dx


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
    round_normalized: bool = False,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    rstd_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """RMSNorm forward over the last dimension of ``x [..., N]`` (any strides): ``(y, h, rstd)``;
    ``h = x + residual`` (None without a residual), ``y`` and ``h`` contiguous of x's shape and
    dtype, ``rstd [...]`` in fp32 (fp64 for float64 ``x``); written into ``out``/``residual_out``/
    ``rstd_out`` (contiguous) when given."""
    y, h, _, rstd = _norm_fwd(
        x, weight, None, residual, eps, weight_offset, True, round_normalized, out, residual_out, None, rstd_out
    )
    return y, h, rstd


def rms_norm_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    grad_h: torch.Tensor | None = None,
    weight_offset: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm input gradient from ``dy`` and ``x`` (the saved input, or ``h``) ``[..., N]`` and ``rstd [...]``;
    ``grad_h`` (the residual stream's gradient) is added when given. Returns ``dx`` of x's shape and dtype."""
    return _norm_bwd(grad_y, x, weight, None, rstd, grad_h, weight_offset, True, out)


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    mean_out: torch.Tensor | None = None,
    rstd_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """LayerNorm forward over the last dimension of ``x [..., N]``: ``(y, h, mean, rstd)`` (see :func:`rms_norm_fwd`)."""
    y, h, mean, rstd = _norm_fwd(x, weight, bias, residual, eps, 0.0, False, False, out, residual_out, mean_out, rstd_out)
    assert mean is not None
    return y, h, mean, rstd


def layer_norm_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grad_h: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm input gradient (see :func:`rms_norm_bwd`); the bias plays no part."""
    return _norm_bwd(grad_y, x, weight, mean, rstd, grad_h, 0.0, False, out)


# --- ahead-of-time compile cases -------------------------------------------------------------
_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}


def _fwd_case(dtype: str, block_n: int, rms: bool, residual: bool, weight: str | None, bias: bool, round_normalized: bool):
    from .aot import KernelCase

    _, rows, warps = launch_config(block_n)
    act, stats = _PTR[dtype], "*fp64" if dtype == "fp64" else "*fp32"
    w = _PTR[weight] if weight else act  # without a weight or bias the launcher passes y as a placeholder
    types = {
        "x_ptr": act, "r_ptr": act, "w_ptr": w, "b_ptr": w, "y_ptr": act, "h_ptr": act, "mean_ptr": stats, "rstd_ptr": stats,
        "M": "i32", "N": "i32", "stride_xm": "i32", "stride_xn": 1, "stride_rm": "i32", "stride_rn": 1, "eps": "fp32",
        "w_offset": "fp32",
    }  # fmt: skip
    constexprs = dict(
        RMS=rms, HAS_RESIDUAL=residual, HAS_WEIGHT=weight is not None, HAS_BIAS=bias, ROUND_NORMALIZED=round_normalized,
        F64=dtype == "fp64", INTERPRETER_BF16=False, ROWS=rows, BLOCK_N=block_n,
    )  # fmt: skip
    div16 = ("x_ptr", "r_ptr", "w_ptr", "b_ptr", "y_ptr", "h_ptr", "mean_ptr", "rstd_ptr", "stride_xm", "stride_rm")
    div16 += ("N",) if block_n >= 16 else ()
    flags = f"w:{weight}" + (" +bias" if bias else "") + (" +res" if residual else "") + (" round" if round_normalized else "")
    label = f"{'rms' if rms else 'ln'} fwd {dtype} {flags} BLOCK_N={block_n} rows={rows} w{warps}"
    return KernelCase(
        module=__name__, fn="_norm_fwd_kernel", types=types, constexprs=constexprs, div16=div16, num_warps=warps, label=label
    )


def _bwd_case(dtype: str, block_n: int, rms: bool, dh: bool, weight: str | None):
    from .aot import KernelCase

    _, rows, warps = launch_config(block_n)
    act, stats = _PTR[dtype], "*fp64" if dtype == "fp64" else "*fp32"
    types = {
        "dy_ptr": act, "x_ptr": act, "w_ptr": _PTR[weight] if weight else act, "mean_ptr": stats, "rstd_ptr": stats,
        "dh_ptr": act, "dx_ptr": act, "M": "i32", "N": "i32", "stride_dym": "i32", "stride_dyn": 1, "stride_xm": "i32",
        "stride_xn": 1, "stride_dhm": "i32", "stride_dhn": 1, "w_offset": "fp32",
    }  # fmt: skip
    constexprs = dict(
        RMS=rms, HAS_WEIGHT=weight is not None, HAS_DH=dh, F64=dtype == "fp64", INTERPRETER_BF16=False, ROWS=rows, BLOCK_N=block_n
    )  # fmt: skip
    div16 = ("dy_ptr", "x_ptr", "w_ptr", "mean_ptr", "rstd_ptr", "dh_ptr", "dx_ptr", "stride_dym", "stride_xm", "stride_dhm")
    div16 += ("N",) if block_n >= 16 else ()
    label = f"{'rms' if rms else 'ln'} bwd {dtype} w:{weight}{' +dh' if dh else ''} BLOCK_N={block_n} rows={rows} w{warps}"
    return KernelCase(
        module=__name__, fn="_norm_bwd_kernel", types=types, constexprs=constexprs, div16=div16, num_warps=warps, label=label
    )


# every combination of the forward's and backward's constexpr switches (fp16 cases rotate through them)
_FWD_FLAGS = [(True, res, w, False, rnd) for res in (False, True) for w in (None, "fp16") for rnd in (False, True)]
_FWD_FLAGS += [(False, res, w, bias, False) for res in (False, True) for w in (None, "fp16") for bias in (False, True)]
_BWD_FLAGS = [(rms, dh, w) for rms in (True, False) for dh in (False, True) for w in (None, "fp16")]


def aot_cases() -> list:
    """:class:`~offsite_kernels.ops.aot.KernelCase` for every launch configuration the launchers can pick.

    Every ``BLOCK_N`` from 16 to ``MAX_N`` (each with its own rows per program and warps): both
    kernels and both norms with bf16 activations, the fused residual (forward) / residual gradient
    (backward) and an fp32 weight: the heaviest variants, most live tiles. fp16 cases rotate
    through every combination of the constexpr switches (residual, weight, bias, rounding point),
    so that each branch is compiled somewhere. fp32 activations at the longest rows. Row lengths
    under 16 take the 16-wide kernels' shapes at smaller tiles and are left out.
    """
    cases = []
    blocks = [b for b in block_sizes() if b >= 16]
    for i, block_n in enumerate(blocks):
        for rms in (True, False):
            cases.append(_fwd_case("bf16", block_n, rms, True, "fp32", not rms, rms))
            cases.append(_bwd_case("bf16", block_n, rms, True, "fp32"))
        for j in (2 * i, 2 * i + 1):
            cases.append(_fwd_case("fp16", block_n, *_FWD_FLAGS[j % len(_FWD_FLAGS)]))
        cases.append(_bwd_case("fp16", block_n, *_BWD_FLAGS[i % len(_BWD_FLAGS)]))
    for rms in (True, False):
        cases.append(_fwd_case("fp32", MAX_N, rms, True, "fp32", not rms, False))
        cases.append(_bwd_case("fp32", MAX_N, rms, True, "fp32"))
    return cases


def aot_cases_float64() -> list:
    """Float64 variants (statistics in fp64): a checking dtype, not a fast path. They must compile;
    at long rows they spill registers (fp64 values take two), which costs speed, not correctness."""
    cases = []
    for block_n in (1024, MAX_N):
        for rms in (True, False):
            cases.append(_fwd_case("fp64", block_n, rms, True, "fp64", not rms, rms))
            cases.append(_bwd_case("fp64", block_n, rms, True, "fp64"))
    return cases
