"""Triton kernels of the grouped frozen linear: a mixture of experts' projections in one launch each way.

Rows arrive sorted by expert: rows ``[offsets[e], offsets[e + 1])`` belong to expert ``e``, whose weight is
rows ``[e * N, (e + 1) * N)`` of one stacked ``[E * N, K]`` stored weight (any format of the frozen linear;
per-row scales and groups make the stacked weight's quantization the same as each expert's own). Forward:
``Y[rows of e] = X[rows of e] @ deq(W_e)^T``; backward: ``dX[rows of e] = dY[rows of e] @ deq(W_e)``. Rows
after ``offsets[E]`` (tokens routed to no expert), and any before ``offsets[0]``, are written as zeros.

No host synchronisation: the grid is sized by an upper bound on the row tiles (``cdiv(R, BLOCK_M) + E + 2``),
and each program finds its expert from the ``E + 1`` offsets on the device (one vector load and a scan over them);
programs past the last tile write nothing. Consecutive programs take consecutive row tiles of one column
tile, so the tiles of one expert reuse its weight tile from L2.

Dequantization is fused into the main loop exactly as in the frozen linear (``_load_dequant_weight``); fp8
weights run weight-only here (decoded to the activation dtype), also where the frozen linear would take
the fp8 tensor-core GEMM. bf16/fp16 activations only: fp32 activations run expert by expert
(``ops/grouped_linear.py`` decides). The tile is chosen from the mean rows per expert, not autotuned
(unmeasured on a GPU so far); every tile is checked ahead of time for sm_80, sm_86, sm_90, sm_100 and sm_120
(``aot_cases``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreter_enabled
from .frozen_linear_triton import FMT_CODES, INT4_FWD_READ_NK, _dot, _interpreter_bf16, _load_dequant_weight, _weight_args
from .triton_common import _cast
from .triton_launch import cdiv, next_power_of_2, on_input_device, output


@triton.jit
def _expert_rows(off_ptr, pid_m, E, R, BLOCK_M: tl.constexpr, E_BLOCK: tl.constexpr):
    """``(expert, first row, end row)`` of row tile ``pid_m`` over ``E + 2`` segments of rows: expert 0's, expert
    1's, ..., then those after ``offsets[E]`` and those before ``offsets[0]`` (both routed to no expert: expert
    ``E``, written as zeros); ``first >= end`` past the last tile. All segments at once, as vectors of
    ``E_BLOCK >= E + 2`` lanes: two loads and a scan, whatever ``E``. Bounds are clamped to ``[0, R]`` and a
    segment ending before it starts is empty: offsets out of order give rows of unspecified values, never a write
    outside ``[0, R)``."""
    idx = tl.arange(0, E_BLOCK)
    lo = tl.load(off_ptr + idx, mask=idx < E, other=0)
    hi = tl.load(off_ptr + idx + 1, mask=idx < E, other=0)
    lo = tl.where(idx == E, tl.load(off_ptr + E), lo)  # the rows after the last expert's
    hi = tl.where(idx == E, R, tl.where(idx == E + 1, tl.load(off_ptr), hi))  # ... and those before the first's
    lo, hi = tl.minimum(tl.maximum(lo, 0), R), tl.minimum(tl.maximum(hi, 0), R)
    tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)  # zero past segment E + 1
    ends = tl.cumsum(tiles, 0)
    here = (pid_m >= ends - tiles) & (pid_m < ends)  # one segment at most
    expert = tl.sum(tl.where(here, tl.minimum(idx, E), 0), 0)
    first = tl.sum(tl.where(here, lo + (pid_m - (ends - tiles)) * BLOCK_M, 0), 0)
    end = tl.sum(tl.where(here, hi, 0), 0)
    return expert, first, end


@triton.jit
def _expert_weight(expert, w_ptr, s_ptr, z_ptr, E, stride_we, stride_se, reduce_len, BLOCK_R: tl.constexpr):
    """``(stored weight, scales, zeros, steps of BLOCK_R over reduce_len)`` of ``expert``; expert ``E`` (rows of no
    expert) reads no weight: no steps, zeros out."""
    e = tl.minimum(expert, E - 1).to(tl.int64)
    steps = tl.where(expert < E, tl.cdiv(reduce_len, BLOCK_R), 0)
    return w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_se, steps


@triton.jit
def _grouped_linear_fwd_kernel(
    x_ptr, off_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    R, N, K, E,
    stride_xm, stride_xk, stride_we, stride_wn, stride_se, stride_sn, stride_ym, stride_yn,
    GROUP: tl.constexpr, FMT: tl.constexpr, INTERPRETER_BF16: tl.constexpr, E_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``Y[rows of e] = X[rows of e] @ deq(W_e)^T`` for one ``BLOCK_M x BLOCK_N`` tile of one expert's rows."""
    expert, first, end = _expert_rows(off_ptr, tl.program_id(0), E, R, BLOCK_M, E_BLOCK)
    if first < end:
        w_e, s_e, z_e, steps = _expert_weight(expert, w_ptr, s_ptr, z_ptr, E, stride_we, stride_se, K, BLOCK_K)
        rows = tl.arange(0, BLOCK_M)
        row_ok = first + rows < end
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + first.to(tl.int64) * stride_xm + rows[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, steps):
            k = k0 * BLOCK_K + offs_k
            x = tl.load(x_rows + k[None, :] * stride_xk, mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
            if FMT == 2 and INT4_FWD_READ_NK:
                w_t = tl.trans(
                    _load_dequant_weight(w_e, s_e, z_e, offs_n[:, None], k[None, :], N, K, stride_wn, stride_sn, GROUP, FMT)
                )
            else:
                w_t = _load_dequant_weight(w_e, s_e, z_e, offs_n[None, :], k[:, None], N, K, stride_wn, stride_sn, GROUP, FMT)
            acc = _dot(x, _cast(w_t, x.dtype, INTERPRETER_BF16), acc, "ieee", INTERPRETER_BF16)
        y = y_ptr + first.to(tl.int64) * stride_ym + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y, _cast(acc, y_ptr.dtype.element_ty, INTERPRETER_BF16), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _grouped_linear_bwd_kernel(
    dy_ptr, off_ptr, w_ptr, s_ptr, z_ptr, dx_ptr,
    R, N, K, E,
    stride_dym, stride_dyn, stride_we, stride_wn, stride_se, stride_sn, stride_dxm, stride_dxk,
    GROUP: tl.constexpr, FMT: tl.constexpr, INTERPRETER_BF16: tl.constexpr, E_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``dX[rows of e] = dY[rows of e] @ deq(W_e)`` for one ``BLOCK_M x BLOCK_K`` tile of one expert's rows."""
    expert, first, end = _expert_rows(off_ptr, tl.program_id(0), E, R, BLOCK_M, E_BLOCK)
    if first < end:
        w_e, s_e, z_e, steps = _expert_weight(expert, w_ptr, s_ptr, z_ptr, E, stride_we, stride_se, N, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        row_ok = first + rows < end
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N)
        dy_rows = dy_ptr + first.to(tl.int64) * stride_dym + rows[:, None] * stride_dym
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, steps):
            n = n0 * BLOCK_N + offs_n
            dy = tl.load(dy_rows + n[None, :] * stride_dyn, mask=row_ok[:, None] & (n[None, :] < N), other=0.0)
            w = _load_dequant_weight(w_e, s_e, z_e, n[:, None], offs_k[None, :], N, K, stride_wn, stride_sn, GROUP, FMT)
            acc = _dot(dy, _cast(w, dy.dtype, INTERPRETER_BF16), acc, "ieee", INTERPRETER_BF16)
        dx = dx_ptr + first.to(tl.int64) * stride_dxm + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx, _cast(acc, dx_ptr.dtype.element_ty, INTERPRETER_BF16), mask=row_ok[:, None] & (offs_k[None, :] < K))


# --- tiles ------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the tile height wanted for the mean rows per expert; in
# the backward BLOCK_N is the reduction tile. Tiles of the frozen linear's lists that fit the 99 KiB of shared
# memory of sm_86-class GPUs, so one list serves every GPU; tests/test_aot_compile.py compiles each for sm_80,
# sm_86, sm_90, sm_100 and sm_120 (no spills, tensor cores, shared memory within the limit). The 32-row forward
# tile is 32x64x64 with 4 warps: the frozen linear's 32x64x128 ones spilled 8 B here (8 warps: sm_90, sm_100 and
# sm_120 for dense weights; 4 warps: int8 on sm_90 and sm_100), the expert lookup holding a few more registers.
TILES = {
    ("fwd", "any"): {16: (16, 64, 128, 4, 4), 32: (32, 64, 64, 4, 4), 64: (64, 64, 64, 4, 4), 128: (128, 128, 64, 8, 3)},
    ("fwd", "int4"): {16: (16, 64, 128, 4, 3), 32: (32, 64, 128, 8, 3), 64: (64, 64, 64, 4, 4), 128: (128, 64, 64, 8, 3)},
    ("bwd", "any"): {16: (16, 64, 128, 4, 4), 32: (32, 64, 128, 8, 4), 64: (64, 64, 64, 4, 4), 128: (128, 64, 64, 4, 3)},
    ("bwd", "int4"): {16: (64, 64, 64, 4, 4), 32: (64, 64, 64, 4, 4), 64: (64, 64, 64, 4, 4), 128: (64, 64, 64, 4, 4)},
}  # fmt: skip
INTERPRETER_TILE = (16, 32, 32, 4, 1)


def tile_height(rows: int, experts: int) -> int:
    """The tile height (a key of :data:`TILES`) for ``rows`` routed rows over ``experts`` experts, from the mean rows
    per expert (the counts themselves are on the device): 16 up to 16 rows, 32 up to 32, 64 up to 256, else 128."""
    mean = cdiv(rows, max(experts, 1))
    return 16 if mean <= 16 else 32 if mean <= 32 else 64 if mean <= 256 else 128


def tile(direction: str, fmt: str, rows: int, experts: int) -> tuple[int, int, int, int, int]:
    """The ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of one launch (the interpreter's own on a CPU)."""
    if triton_interpreter_enabled():
        return INTERPRETER_TILE
    return TILES[(direction, "int4" if fmt == "int4" else "any")][tile_height(rows, experts)]


def expert_block(experts: int) -> int:
    """The lanes of the kernels' expert lookup: a power of two holding the ``experts + 2`` segments (at least 16)."""
    return max(next_power_of_2(experts + 2), 16)


def _expert_strides(fmt: str, n: int, stride_wn: int, stride_sn: int) -> tuple[int, int]:
    """``(stride_we, stride_se)``: one expert's step in the stored data and in the scales/zeros (as ``_weight_args``
    passes them: contiguous; int4's scales are ``[rows, groups]`` of row step ``stride_sn``, the per-channel formats'
    1-D, dense weights have none)."""
    if fmt == "dense":
        return n * stride_wn, 0
    return n * stride_wn, n * (stride_sn if fmt == "int4" else 1)


def _launch(kernel, direction: str, fmt: str, args: tuple, meta: dict, rows: int, experts: int, cols: int) -> None:
    bm, bn, bk, warps, stages = tile(direction, fmt, rows, experts)
    col_block = bn if direction == "fwd" else bk
    grid = (cdiv(rows, bm) + experts + 2, cdiv(cols, col_block))  # at most one partial tile per segment
    kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


@on_input_device
def grouped_linear_fwd(
    x: torch.Tensor,
    offsets: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    fmt: str,
    group_size: int,
    experts: int,
    out_features: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [R, N]`` of rows ``x [R, K]`` sorted by expert (``offsets`` int32 ``[E + 1]``) through the stacked
    ``[E * N, K]`` stored weight; rows after ``offsets[E]`` are zeros (into ``out``, contiguous ``[R, N]``, if given)."""
    rows, k = x.shape
    y = output(out, (rows, out_features), x.dtype, x.device)
    if rows == 0:
        return y
    w, s, z, stride_wn, stride_sn = _weight_args(data, scales, zeros)
    stride_we, stride_se = _expert_strides(fmt, out_features, stride_wn, stride_sn)
    args = (x, offsets, w, s, z, y, rows, out_features, k, experts)
    args += (x.stride(0), x.stride(1), stride_we, stride_wn, stride_se, stride_sn, out_features, 1)
    meta = dict(GROUP=max(group_size, 1), FMT=FMT_CODES[fmt], INTERPRETER_BF16=_interpreter_bf16(x.dtype))
    meta["E_BLOCK"] = expert_block(experts)
    _launch(_grouped_linear_fwd_kernel, "fwd", fmt, args, meta, rows, experts, out_features)
    return y


@on_input_device
def grouped_linear_bwd(
    grad_y: torch.Tensor,
    offsets: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    fmt: str,
    group_size: int,
    experts: int,
    in_features: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dx [R, K]`` of ``grad_y [R, N]`` (rows sorted by expert as in :func:`grouped_linear_fwd`; into ``out`` if given)."""
    rows, n = grad_y.shape
    dx = output(out, (rows, in_features), grad_y.dtype, grad_y.device)
    if rows == 0:
        return dx
    w, s, z, stride_wn, stride_sn = _weight_args(data, scales, zeros)
    stride_we, stride_se = _expert_strides(fmt, n, stride_wn, stride_sn)
    args = (grad_y, offsets, w, s, z, dx, rows, n, in_features, experts)
    args += (grad_y.stride(0), grad_y.stride(1), stride_we, stride_wn, stride_se, stride_sn, in_features, 1)
    meta = dict(GROUP=max(group_size, 1), FMT=FMT_CODES[fmt], INTERPRETER_BF16=_interpreter_bf16(grad_y.dtype))
    meta["E_BLOCK"] = expert_block(experts)
    _launch(_grouped_linear_bwd_kernel, "bwd", fmt, args, meta, rows, experts, in_features)
    return dx


# --- ahead-of-time compile cases ----------------------------------------------------------------
AOT_EXPERT_BLOCK = 256  # the lookup's lanes in the checked cases: up to 254 experts (Qwen3-MoE has 128); wider lookups unchecked
AOT_TARGETS = (80, 86, 90, 100, 120)  # the GPU classes of the frozen linear (ops/aot.py ARCHS)
_WEIGHT_POINTERS = {"dense": None, "int8": "*i8", "int4": "*u8", "fp8": "*u8"}  # dense: the activations' type


def aot_cases(arch: int) -> list:
    """An :class:`~offsite_kernels.ops.aot.KernelCase` per launch the launchers can make on ``sm_<arch>``: each
    direction, weight format and tile of :data:`TILES`, with bf16 activations (fp16 compiles to the same resources:
    one tile per direction and format, rotating). Specialised as the JIT specialises a typical launch: aligned
    pointers, sizes and row strides multiples of 16 but the row count ``R`` and int4's per-group scale stride."""
    from .aot import WGMMA_MIN_BLOCK_M, KernelCase, expected_tensor_core

    cases = []
    for direction, fn in (("fwd", "_grouped_linear_fwd_kernel"), ("bwd", "_grouped_linear_bwd_kernel")):
        act_a, out_a, sa, sb, oa, ob = (
            ("x_ptr", "y_ptr", "stride_xm", "stride_xk", "stride_ym", "stride_yn")
            if direction == "fwd"
            else ("dy_ptr", "dx_ptr", "stride_dym", "stride_dyn", "stride_dxm", "stride_dxk")
        )
        for i, fmt in enumerate(FMT_CODES):
            tiles = list(dict.fromkeys(TILES[(direction, "int4" if fmt == "int4" else "any")].values()))
            variants = [("bf16", t) for t in tiles] + [("fp16", tiles[i % len(tiles)])]
            for act, (bm, bn, bk, warps, stages) in variants:
                w = _WEIGHT_POINTERS[fmt] or "*" + act
                types: dict[str, str | int] = {
                    act_a: "*" + act, "off_ptr": "*i32", "w_ptr": w, "s_ptr": "*fp32" if fmt != "dense" else w,
                    "z_ptr": "*u8" if fmt == "int4" else w, out_a: "*" + act,
                    "R": "i32", "N": "i32", "K": "i32", "E": "i32", sa: "i32", sb: 1, "stride_we": "i32",
                    "stride_wn": "i32", "stride_se": "i32", "stride_sn": "i32", oa: "i32", ob: 1,
                }  # fmt: skip
                unaligned = {"R", sb, ob} | ({"stride_sn", "stride_se"} if fmt == "int4" else set())
                cases.append(
                    KernelCase(
                        module=__name__,
                        fn=fn,
                        types=types,
                        constexprs=dict(GROUP=128 if fmt == "int4" else 1, FMT=FMT_CODES[fmt], INTERPRETER_BF16=False)
                        | dict(E_BLOCK=AOT_EXPERT_BLOCK)
                        | dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                        div16=tuple(n for n, t in types.items() if isinstance(t, str) and n not in unaligned),
                        num_warps=warps,
                        num_stages=stages,
                        label=f"grouped {direction} {fmt} {act} {bm}x{bn}x{bk} w{warps} s{stages}",
                        tensor_core=True,
                        mma=expected_tensor_core(arch, bm) if bm >= WGMMA_MIN_BLOCK_M else "HMMA",
                    )
                )
    return cases
