"""Triton kernels of the fused activations of the emulator's frozen MLPs.

- ``_bias_act_fwd_kernel``: ``y = act(x + b)``; ``act`` one of GELU (exact erf form), GELU (tanh
  form), ReLU, SiLU, chosen by the constexpr ``ACT`` (codes in :data:`ACT_CODES`).
- ``_bias_act_bwd_kernel``: ``dx = dy * act'(x + b)``, recomputing ``x + b`` and the derivative
  from the saved input (no intermediate is stored between forward and backward).
- ``_gated_act_fwd_kernel``: ``y = act(gate) * up`` (SwiGLU with SiLU, GeGLU with either GELU).
- ``_gated_act_bwd_kernel``: ``d_gate = dy * up * act'(gate)``, ``d_up = dy * act(gate)``.

Every kernel is elementwise over rows ``[M, N]`` (``N`` the last dimension): one program per
``BLOCK_M x BLOCK_N`` tile, masked at both edges, math in fp32, one rounding to the output dtype.
Rows may have any stride (a ``gate``/``up`` pair chunked out of one fused projection is read in
place); within a row elements are contiguous, which the launchers ensure (copying only when the
last dimension is strided).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreter_enabled
from .triton_common import _cast
from .triton_launch import as_rows, cdiv, on_input_device, output

ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}
GATED_ACTS = ("silu", "gelu", "gelu_tanh")  # act(gate) * up: SwiGLU, GeGLU (erf form), GeGLU (tanh form)
TILE = 2048  # elements per program: 16 per thread at 4 warps (two 16-byte vectors of bf16)
NUM_WARPS = 4
BLOCK_NS = (64, 256, 1024)  # row-tile widths: few, so that every variant is compile-checked ahead of time

# Constants, written as literals in the kernels (the interpreter mishandles constexpr * tensor):
# 0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2 pi), 0.7978845608028654 = sqrt(2/pi),
# 1.5957691216057308 = 2 sqrt(2/pi); 2u = z (1.5957691216057308 + 0.07135481627260025 z^2) with
# 0.07135481627260025 = 2 sqrt(2/pi) 0.044715, and d(2u)/dz = 1.5957691216057308 + 0.21406444881780076 z^2 (3 x it).


@triton.jit
def _sigmoid(z):
    """``1 / (1 + exp(-z))`` in fp32: exact 0 and 1 at the far ends, never NaN for finite ``z``."""
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _act(z, ACT: tl.constexpr):
    """``act(z)`` for fp32 ``z``."""
    if ACT == 0:  # GELU, exact: z * Phi(z)
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 1:  # GELU, tanh form: 0.5 z (1 + tanh(u)) = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        y = z * _sigmoid(z * (1.5957691216057308 + 0.07135481627260025 * z * z))
    elif ACT == 2:  # ReLU (a NaN stays NaN)
        y = tl.where(z < 0.0, 0.0, z)
    else:  # SiLU
        y = z * _sigmoid(z)
    return y


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """``act'(z)`` for fp32 ``z``."""
    if ACT == 0:  # Phi(z) + z * phi(z)
        d = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 1:  # s + z s (1 - s) d(2u)/dz with s = sigmoid(2u), since 1 - tanh(u)^2 = 4 s (1 - s)
        s = _sigmoid(z * (1.5957691216057308 + 0.07135481627260025 * z * z))
        d = s + z * s * (1.0 - s) * (1.5957691216057308 + 0.21406444881780076 * z * z)
    elif ACT == 2:  # 1 where z > 0 (PyTorch's threshold_backward: 0 at z == 0)
        d = tl.where(z > 0.0, 1.0, 0.0)
    else:  # s (1 + z (1 - s)) with s = sigmoid(z)
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    return d


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (int64, against overflow of ``row * stride``), column indices and the mask of this program's tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _bias_act_fwd_kernel(
    x_ptr, b_ptr, y_ptr,
    M, N, stride_xm, stride_ym,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``Y[M, N] = act(X[M, N] + b[N])``."""
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    z = tl.load(x_ptr + rows * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * stride_ym + cols, _cast(_act(z, ACT), y_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(
    dy_ptr, x_ptr, b_ptr, dx_ptr,
    M, N, stride_dym, stride_xm, stride_dxm,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``dX[M, N] = dY[M, N] * act'(X[M, N] + b[N])``, ``X + b`` recomputed from the saved input."""
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    z = tl.load(x_ptr + rows * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
    dx = dy * _act_grad(z, ACT)
    tl.store(dx_ptr + rows * stride_dxm + cols, _cast(dx, dx_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


@triton.jit
def _gated_act_fwd_kernel(
    g_ptr, u_ptr, y_ptr,
    M, N, stride_gm, stride_um, stride_ym,
    ACT: tl.constexpr, INTERPRETER_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``Y[M, N] = act(G[M, N]) * U[M, N]``."""
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + rows * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * stride_um + cols, mask=mask, other=0.0).to(tl.float32)
    y = _act(g, ACT) * u
    tl.store(y_ptr + rows * stride_ym + cols, _cast(y, y_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr,
    M, N, stride_dym, stride_gm, stride_um, stride_dgm, stride_dum,
    ACT: tl.constexpr, INTERPRETER_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``dG = dY * U * act'(G)`` and ``dU = dY * act(G)``, both from the saved inputs."""
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + rows * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * stride_um + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
    dg = dy * u * _act_grad(g, ACT)
    du = dy * _act(g, ACT)
    tl.store(dg_ptr + rows * stride_dgm + cols, _cast(dg, dg_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)
    tl.store(du_ptr + rows * stride_dum + cols, _cast(du, du_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


# --- launch configuration ------------------------------------------------------------------
@functools.cache
def block_sizes(n_cols: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` for rows of ``n_cols`` elements: ``BLOCK_N`` the narrowest of
    :data:`BLOCK_NS` that holds a row (the widest for longer rows: MLP widths are >= 1024, where
    the last tile of a row is the only partial one), ``BLOCK_M`` filling a tile of :data:`TILE` elements."""
    block_n = next((b for b in BLOCK_NS if n_cols <= b), BLOCK_NS[-1])
    return TILE // block_n, block_n


def all_block_sizes() -> list[tuple[int, int]]:
    """Every ``(BLOCK_M, BLOCK_N)`` :func:`block_sizes` can return."""
    return [block_sizes(b) for b in BLOCK_NS]


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(tensor, rows, row stride)`` of ``t`` seen as ``[rows, last dim]`` with contiguous rows: ``t``
    itself where its dimensions allow, a copy only when the last dimension is strided."""
    t2, m, stride_m, stride_n = as_rows(t)
    if stride_n != 1 and t.dim() and t.shape[-1] > 1:
        t2 = t2.contiguous()  # 2-D here: a contiguous t has unit column stride
        return t2, m, t2.stride(0)
    return t2, m, stride_m


def _cols(t: torch.Tensor) -> int:
    return t.shape[-1] if t.dim() else 1


def _launch(kernel, args: tuple, m: int, n: int, **meta) -> None:
    block_m, block_n = block_sizes(n)
    grid = (cdiv(m, block_m), cdiv(n, block_n))
    kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)


def _interpreter_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreter_enabled()


@on_input_device
def bias_act_fwd(x: torch.Tensor, bias: torch.Tensor | None, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x + bias)`` for ``x`` of any shape (bias over the last dimension, in ``x.dtype``);
    returns a contiguous tensor of ``x``'s shape and dtype (``out`` if given)."""
    y = output(out, x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return y
    (x2, m, stride_xm), n = _rows(x), _cols(x)
    b = bias.contiguous() if bias is not None else x2  # placeholder pointer, never read without a bias
    args = (x2, b, y, m, n, stride_xm, n)  # y: contiguous
    meta = dict(ACT=ACT_CODES[act], HAS_BIAS=bias is not None, INTERPRETER_BF16=_interpreter_bf16(x.dtype))
    _launch(_bias_act_fwd_kernel, args, m, n, **meta)
    return y


@on_input_device
def bias_act_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, act: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``grad_y * act'(x + bias)``: the input gradient, of ``x``'s shape and dtype (``out`` if given)."""
    dx = output(out, x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return dx
    (dy2, _, stride_dym), (x2, m, stride_xm), n = _rows(grad_y), _rows(x), _cols(x)
    b = bias.contiguous() if bias is not None else x2
    args = (dy2, x2, b, dx, m, n, stride_dym, stride_xm, n)  # dx: contiguous
    meta = dict(ACT=ACT_CODES[act], HAS_BIAS=bias is not None, INTERPRETER_BF16=_interpreter_bf16(x.dtype))
    _launch(_bias_act_bwd_kernel, args, m, n, **meta)
    return dx


@on_input_device
def gated_act_fwd(gate: torch.Tensor, up: torch.Tensor, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(gate) * up`` for tensors of one shape and dtype; contiguous, of that shape (``out`` if given)."""
    y = output(out, gate.shape, gate.dtype, gate.device)
    if gate.numel() == 0:
        return y
    (g2, m, stride_gm), (u2, _, stride_um), n = _rows(gate), _rows(up), _cols(gate)
    args = (g2, u2, y, m, n, stride_gm, stride_um, n)  # y: contiguous
    _launch(_gated_act_fwd_kernel, args, m, n, ACT=ACT_CODES[act], INTERPRETER_BF16=_interpreter_bf16(gate.dtype))
    return y


@on_input_device
def gated_act_bwd(
    grad_y: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: str,
    out_gate: torch.Tensor | None = None,
    out_up: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_gate, d_up)`` of ``act(gate) * up`` for the output gradient ``grad_y``."""
    dg = output(out_gate, gate.shape, gate.dtype, gate.device, "out_gate")
    du = output(out_up, up.shape, up.dtype, up.device, "out_up")
    if gate.numel() == 0:
        return dg, du
    (dy2, _, stride_dym), (g2, m, stride_gm), (u2, _, stride_um), n = _rows(grad_y), _rows(gate), _rows(up), _cols(gate)
    args = (dy2, g2, u2, dg, du, m, n, stride_dym, stride_gm, stride_um, n, n)  # dg, du: contiguous
    _launch(_gated_act_bwd_kernel, args, m, n, ACT=ACT_CODES[act], INTERPRETER_BF16=_interpreter_bf16(gate.dtype))
    return dg, du


@on_input_device
def gated_act_bwd_packed(grad_y: torch.Tensor, gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """The gradient of ``act(gate) * up`` for ``gate_up = [gate, up]`` along the last dimension, written as one
    tensor shaped as ``gate_up`` (its two halves by the kernel of :func:`gated_act_bwd`: no concatenation after)."""
    n = gate_up.shape[-1] // 2
    d = torch.empty(gate_up.shape, device=gate_up.device, dtype=gate_up.dtype)
    if gate_up.numel() == 0:
        return d
    gate, up = gate_up[..., :n], gate_up[..., n:]
    (dy2, _, stride_dym), (g2, m, stride_gm), (u2, _, stride_um) = _rows(grad_y), _rows(gate), _rows(up)
    d2 = d.view(m, 2 * n)
    args = (dy2, g2, u2, d2, d2[:, n:], m, n, stride_dym, stride_gm, stride_um, 2 * n, 2 * n)
    _launch(_gated_act_bwd_kernel, args, m, n, ACT=ACT_CODES[act], INTERPRETER_BF16=_interpreter_bf16(gate.dtype))
    return d


# --- ahead-of-time compile cases -----------------------------------------------------------
# runtime arguments of each kernel: (pointers, i32 scalars), as the launchers pass them
_AOT_ARGS = {
    "_bias_act_fwd_kernel": (("x_ptr", "b_ptr", "y_ptr"), ("M", "N", "stride_xm", "stride_ym")),
    "_bias_act_bwd_kernel": (("dy_ptr", "x_ptr", "b_ptr", "dx_ptr"), ("M", "N", "stride_dym", "stride_xm", "stride_dxm")),
    "_gated_act_fwd_kernel": (("g_ptr", "u_ptr", "y_ptr"), ("M", "N", "stride_gm", "stride_um", "stride_ym")),
    "_gated_act_bwd_kernel": (
        ("dy_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr"),
        ("M", "N", "stride_dym", "stride_gm", "stride_um", "stride_dgm", "stride_dum"),
    ),
}


def _case(fn: str, dtype: str, block: tuple[int, int], label: str, **meta):
    """One kernel variant as the JIT specialises a typical launch: 16-byte-aligned pointers, ``N``
    and the row strides multiples of 16, ``M`` arbitrary, the interpreter-only switch off."""
    from .aot import KernelCase

    pointers, ints = _AOT_ARGS[fn]
    types: dict[str, str | int] = {**{p: "*" + dtype for p in pointers}, **dict.fromkeys(ints, "i32")}
    return KernelCase(
        module=__name__,
        fn=fn,
        types=types,
        constexprs=dict(meta, INTERPRETER_BF16=False, BLOCK_M=block[0], BLOCK_N=block[1]),
        div16=tuple(n for n in types if n != "M"),
        num_warps=NUM_WARPS,
        num_stages=1,
        label=f"{label} {dtype} {block[0]}x{block[1]}",
    )


def aot_cases() -> list:
    """An :class:`~offsite_kernels.ops.aot.KernelCase` for every kernel variant the launchers can pick
    for bf16 and fp16 (each activation with and without a bias, forward and backward, each gated
    activation forward and backward, at every block size of :func:`all_block_sizes`), and for fp32 at
    the widest block."""
    cases = []
    for dtype, blocks in (("bf16", all_block_sizes()), ("fp16", all_block_sizes()), ("fp32", all_block_sizes()[-1:])):
        for block in blocks:
            for act, code in ACT_CODES.items():
                for has_bias in (True, False):
                    tag = f"{act}{' +bias' if has_bias else ''}"
                    for direction in ("fwd", "bwd"):
                        label = f"bias_act {direction} {tag}"
                        cases.append(_case(f"_bias_act_{direction}_kernel", dtype, block, label, ACT=code, HAS_BIAS=has_bias))
            for act in GATED_ACTS:
                for direction in ("fwd", "bwd"):
                    label = f"gated_act {direction} {act}"
                    cases.append(_case(f"_gated_act_{direction}_kernel", dtype, block, label, ACT=ACT_CODES[act]))
    return cases
