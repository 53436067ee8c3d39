"""Triton kernels of the frozen linear: ``Y = X @ deq(W)^T + b`` and ``dX = dY @ deq(W)``.

Dequantization is fused into the GEMM main loop: each program loads a tile of the stored
weight (packed int4, int8, fp8 or dense), turns it into the activation dtype in registers and
feeds it to ``tl.dot`` with fp32 accumulation. The dense weight is never written to memory, no
weight gradient exists, and the backward needs nothing but the stored weight.

Weight format codes (constexpr ``FMT``): 0 dense, 1 int8, 2 int4, 3 fp8 (passed as bytes and decoded
in the kernel, since Triton has no e4m3 type on sm_80). FMT 3 is weight-only fp8, the path of devices
without fp8 tensor cores; on sm_89+ fp8 weights take the fp8 tensor-core GEMM instead
(``fp8_gemm_triton.py``; ``fp8_linear.py`` decides).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl
import triton.testing

from ..backends import cuda_index, triton_interpreter_enabled
from .triton_common import A100_SHARED_BYTES, HOPPER_SHARED_BYTES, _cast, _grouped_tile, triton_version
from .triton_launch import CachedAutotune, as_rows, cdiv, next_power_of_2, on_input_device, output

FMT_CODES = {"dense": 0, "int8": 1, "int4": 2, "fp8": 3}


# How the forward reads an int4 weight tile: as [K, N] (the default, checked on Triton 3.9), or as
# [N, K] transposed in registers (Triton <= 3.6). The [K, N] read leaves the thread layout of the
# packed bytes to a tie in Triton's coalescing pass, which 3.6 breaks the other way (threads along
# K): every thread then holds a 64-bit address, a scale and a zero per column, and every candidate
# tile spills (0.1-1.8 KB of stack on sm_80 and sm_90). The [N, K] read gives 3.6 the layout 3.9
# picks for [K, N], and would make 3.9 spill. A code-generation heuristic offers no feature to
# detect: the version decides (3.7 and 3.8 unchecked, they keep the default).
INT4_FWD_READ_NK = tl.constexpr(triton_version() <= (3, 6))


@triton.jit
def _load_dequant_weight(w_ptr, s_ptr, z_ptr, n_idx, k_idx, N, K, stride_wn, stride_sn, GROUP: tl.constexpr, FMT: tl.constexpr):
    """Dequantized fp32 weight values ``W[n, k]`` for broadcastable index grids ``n_idx``, ``k_idx``."""
    mask = (n_idx < N) & (k_idx < K)
    if FMT == 2:  # int4: byte k // 2 of row n, low nibble for even k
        packed = tl.load(w_ptr + n_idx * stride_wn + k_idx // 2, mask=mask, other=0)
        q = ((packed >> ((k_idx % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
        g = k_idx // GROUP
        scale = tl.load(s_ptr + n_idx * stride_sn + g, mask=mask, other=0.0)
        zero = tl.load(z_ptr + n_idx * stride_sn + g, mask=mask, other=0).to(tl.float32)
        w = (q - zero) * scale
    elif FMT == 3:  # fp8 e4m3 stored as bytes: decoded exactly through fp16 bits (sm_80 has no e4m3 type)
        b = tl.load(w_ptr + n_idx * stride_wn + k_idx, mask=mask, other=0).to(tl.uint16)
        half = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        w = half.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        w = w * tl.load(s_ptr + n_idx, mask=n_idx < N, other=0.0)
    else:
        w = tl.load(w_ptr + n_idx * stride_wn + k_idx, mask=mask, other=0).to(tl.float32)
        if FMT == 1:  # int8: one scale per output channel
            w = w * tl.load(s_ptr + n_idx, mask=n_idx < N, other=0.0)
    return tl.where(mask, w, 0.0)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """``acc + a @ b``. Under ``INTERPRETER_BF16`` the bf16 operands are multiplied in fp32: the
    same products, since Triton's CPU interpreter mishandles ``tl.dot`` on bf16."""
    if INTERPRETER_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _split_blocks(pid_s, length, SPLIT_LEN, BLOCK: tl.constexpr, SPLIT_K: tl.constexpr):
    """The blocks ``[first, end)`` of a reduction of ``length`` that split ``pid_s`` covers (all of them
    without ``SPLIT_K``: a loop from 0, as the unsplit kernel had, which takes fewer registers)."""
    if SPLIT_K:
        per_split = SPLIT_LEN // BLOCK  # SPLIT_LEN is a multiple of every candidate block
        first = pid_s * per_split
        end = tl.minimum(first + per_split, tl.cdiv(length, BLOCK))
    else:
        first = 0
        end = tl.cdiv(length, BLOCK)
    return first, end


@triton.jit
def _store_tile(
    acc, out_ptr, ws_ptr, pid_s, offs_m, offs_c, M, C, stride_om, stride_oc,
    SPLIT_K: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
):  # fmt: skip
    """Write an output tile of an ``[M, C]`` result: with ``SPLIT_K`` the fp32 partial of split ``pid_s``
    to ``ws[pid_s, M, C]``, else ``acc`` rounded to the output's dtype."""
    mask = (offs_m[:, None] < M) & (offs_c[None, :] < C)
    if SPLIT_K:
        partial = ws_ptr + pid_s.to(tl.int64) * M * C
        tl.store(partial + offs_m[:, None] * C + offs_c[None, :], acc, mask=mask)
    else:
        out = out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc
        tl.store(out, _cast(acc, out_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


@triton.jit
def _frozen_linear_fwd_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, M_BUCKET, SPLIT_LEN,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_ym, stride_yn,
    GROUP: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``Y[M, N] = X[M, K] @ deq(W)[N, K]^T (+ b)``; one program per ``BLOCK_M x BLOCK_N`` tile and split of K.

    Split ``s`` (``program_id(1)``) reduces K columns ``[s * SPLIT_LEN, (s + 1) * SPLIT_LEN)``. With
    ``SPLIT_K`` it writes its fp32 partial tile to ``ws[s, M, N]`` (bias and rounding left to
    :func:`_split_reduce_kernel`); otherwise there is one split and it writes ``y``."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_m, num_n, GROUP_M)  # neighbours share weight tiles in L2
    pid_s = tl.program_id(1)
    k_first, k_end = _split_blocks(pid_s, K, SPLIT_LEN, BLOCK_K, SPLIT_K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_first, k_end):
        k = k0 * BLOCK_K + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk, mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0
        )
        if FMT == 2 and INT4_FWD_READ_NK:
            w = _load_dequant_weight(w_ptr, s_ptr, z_ptr, offs_n[:, None], k[None, :], N, K, stride_wn, stride_sn, GROUP, FMT)
            w_t = tl.trans(w)
        else:
            w_t = _load_dequant_weight(w_ptr, s_ptr, z_ptr, offs_n[None, :], k[:, None], N, K, stride_wn, stride_sn, GROUP, FMT)
        acc = _dot(x, _cast(w_t, x.dtype, INTERPRETER_BF16), acc, DOT_PRECISION, INTERPRETER_BF16)
    if HAS_BIAS and not SPLIT_K:  # split launches: the reduction adds the bias once
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(acc, y_ptr, ws_ptr, pid_s, offs_m, offs_n, M, N, stride_ym, stride_yn, SPLIT_K, INTERPRETER_BF16)


@triton.jit
def _frozen_linear_bwd_kernel(
    dy_ptr, w_ptr, s_ptr, z_ptr, dx_ptr, ws_ptr,
    M, N, K, M_BUCKET, SPLIT_LEN,
    stride_dym, stride_dyn, stride_wn, stride_sn, stride_dxm, stride_dxk,
    GROUP: tl.constexpr, FMT: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``dX[M, K] = dY[M, N] @ deq(W)[N, K]``; one program per ``BLOCK_M x BLOCK_K`` tile and split of N
    (rows ``[s * SPLIT_LEN, (s + 1) * SPLIT_LEN)`` of W; fp32 partials to ``ws[s, M, K]`` with ``SPLIT_K``)."""
    pid = tl.program_id(0)
    num_m, num_k = tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = _grouped_tile(pid, num_m, num_k, GROUP_M)
    pid_s = tl.program_id(1)
    n_first, n_end = _split_blocks(pid_s, N, SPLIT_LEN, BLOCK_N, SPLIT_K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_first, n_end):
        n = n0 * BLOCK_N + offs_n
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + n[None, :] * stride_dyn,
            mask=(offs_m[:, None] < M) & (n[None, :] < N),
            other=0.0,
        )
        w = _load_dequant_weight(w_ptr, s_ptr, z_ptr, n[:, None], offs_k[None, :], N, K, stride_wn, stride_sn, GROUP, FMT)
        acc = _dot(dy, _cast(w, dy.dtype, INTERPRETER_BF16), acc, DOT_PRECISION, INTERPRETER_BF16)
    _store_tile(acc, dx_ptr, ws_ptr, pid_s, offs_m, offs_k, M, K, stride_dxm, stride_dxk, SPLIT_K, INTERPRETER_BF16)


@triton.jit
def _split_reduce_kernel(
    ws_ptr, b_ptr, y_ptr, SIZE, N, SPLITS,
    HAS_BIAS: tl.constexpr, INTERPRETER_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``y[i] = sum_s ws[s, i] (+ b[i % N])`` over the flat ``SIZE = M * N`` elements of a contiguous ``y``;
    the splits are added in order, in fp32, so the result does not depend on which split finished first."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(ws_ptr + s * SIZE + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _cast(acc, y_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


# --- launch configuration ------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); in the backward BLOCK_N is the reduction tile.
# Each list holds only configurations that compile for sm_80 and sm_90 without spilling and within
# an A100's shared memory (checked ahead of time by tests/test_aot_compile.py), with Triton 3.9 (CI)
# and 3.6 (the GPU image). int4's per-element unpacking needs more registers: its lists drop the
# tiles that spill, and its 128x64 forward tile takes 8 warps (4 spilled 16 B on sm_80 under 3.6).
# The 32-row backward tile of the other formats takes 8 warps too (4 spilled 8 B on sm_90 under 3.6).
_CANDIDATES = {
    ("fwd", "any"): ((16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 128, 8, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3)),
    ("fwd", "int4"): ((16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 128, 8, 4), (64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3)),
    ("bwd", "any"): ((16, 64, 128, 4, 4), (32, 64, 128, 8, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3)),
    ("bwd", "int4"): ((64, 64, 64, 4, 4), (128, 128, 64, 8, 3)),
}  # fmt: skip
# Hopper adds larger tiles for many tokens (wider wgmma, deeper pipelines): each compiles for sm_90
# without spills within its 227 KiB of shared memory (Triton 3.6 and 3.9), where on sm_80 most spill
# or exceed the A100's 163 KiB. int4's backward gets none: every larger tile spills or needs more
# than 227 KiB. Hopper-class: compute capability 9.x with at least 227 KiB per block (gpu_arch).
HOPPER = 90
_HOPPER_TILES = {
    ("fwd", "any"): ((128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 128, 64, 8, 4)),
    ("fwd", "int4"): ((128, 128, 64, 8, 4),),
    ("bwd", "any"): ((128, 128, 128, 8, 3), (128, 128, 64, 8, 4)),
}  # fmt: skip
# GPUs with less shared memory per block than an A100's 163 KiB (sm_86 and sm_89: RTX 3090/4090, A10,
# L4, L40S; 99 KiB) cannot run the tiles above that need more: int4's 16- and 32-row forward tiles
# (118-136 KiB with 4 stages) and the 128x128x64 tiles of both directions but the dense/int8 forward.
# Their own lists swap in 3-stage skinny int4 tiles (84-96 KiB) and drop the rest: every tile compiles
# for sm_86 without spills within 99 KiB (Triton 3.6 and 3.9). Without them an int4 forward at
# M <= 32 had no tile that fits, and failed.
SMALL_SHARED = 86
# Datacenter Blackwell (compute capability 10.x: B200, GB200, B300) runs the A100-class lists (its larger
# tiles go to tcgen05 tensor cores; checked for sm_100 ahead of time) with its own autotuner, and a split
# launch there never takes the 16-row int4 forward tile (spills 8-16 B on sm_100 split).
BLACKWELL = 100
_SMALL_SHARED_TILES = {
    ("fwd", "int4"): ((16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (32, 64, 128, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 8, 3)),
    ("bwd", "any"): ((16, 64, 128, 4, 4), (32, 64, 128, 8, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3)),
    ("bwd", "int4"): ((64, 64, 64, 4, 4),),
}  # fmt: skip
# fp32 activations: every operand tile takes twice the shared memory, and the dot runs either on TF32
# tensor cores (where PyTorch allows TF32 for fp32 matmuls: tf32_enabled) or, PyTorch's default, as
# exact fp32 FMAs that hold their operands in registers. The 16-bit lists do not fit: with TF32 about
# half of their variants spill or need more shared memory than the GPU has, and as FMAs every one spills
# (240 B to 21 KB of stack). These smaller tiles serve every format and GPU class: each compiles for sm_80,
# sm_86, sm_90, sm_100 and sm_120 without spills within 99 KiB, split launches included (Triton 3.6 and
# 3.9). The TF32 backward has neither a 16-row tile nor a 64-row one (each candidate spilled 8-32 B for
# some format or target): few tokens take its 32-row tile, the rest its 128-row ones.
_FP32_TILES = {
    ("fwd", "tf32"): ((16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3)),
    ("bwd", "tf32"): ((32, 64, 32, 8, 3), (128, 32, 32, 8, 3), (128, 64, 32, 8, 2)),
    ("fwd", "fp32"): ((16, 64, 32, 4, 2), (32, 64, 32, 8, 2), (64, 64, 16, 4, 3), (64, 128, 16, 8, 2)),
    ("bwd", "fp32"): ((16, 32, 32, 8, 2), (32, 32, 32, 8, 2), (64, 32, 32, 8, 2), (128, 32, 16, 8, 2)),
}  # fmt: skip
# Triton 3.6 lowers an exact-fp32 dot whose weight operand is dequantized in registers (int8, int4, fp8) to
# TF32 tcgen05 MMAs on sm_100 when the tile has 64 rows or more: TF32's precision, silently (the AOT check
# found UTCHMMA, and kind::tf32 in the PTX, where exact fp32 must have none). Datacenter Blackwell's
# exact-fp32 list keeps the tiles below that, which run on FMAs under every Triton checked.
_BLACKWELL_EXACT_FP32_MAX_ROWS = 32
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
# How the GEMM's operands run: bf16/fp16 on tensor cores ("half"), fp32 on TF32 tensor cores ("tf32"),
# or fp32 as exact fp32 FMAs ("fp32"); see gemm_operands.
HALF, TF32, FP32 = "half", "tf32", "fp32"
OPERANDS = (HALF, TF32, FP32)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)


def _tiles(direction: str, kind: str, arch: int, operands: str = HALF) -> tuple:
    """The candidate tiles of ``(direction, kind)`` ("int4" or "any") on GPU class ``arch`` (80, 86 or 90)
    for the GEMM ``operands`` (:data:`OPERANDS`)."""
    if operands == FP32 and arch == BLACKWELL:  # see _BLACKWELL_EXACT_FP32_MAX_ROWS
        return tuple(t for t in _FP32_TILES[(direction, operands)] if t[0] <= _BLACKWELL_EXACT_FP32_MAX_ROWS)
    if operands != HALF:
        return _FP32_TILES[(direction, operands)]
    if arch == SMALL_SHARED:
        return _SMALL_SHARED_TILES.get((direction, kind), _CANDIDATES[(direction, kind)])
    return _CANDIDATES[(direction, kind)] + (_HOPPER_TILES.get((direction, kind), ()) if arch == HOPPER else ())  # 80, 100


def candidate_configs(direction: str, fmt: str, arch: int = 80, operands: str = HALF) -> list[triton.Config]:
    """The configurations the autotuner may pick for ``direction`` ("fwd"/"bwd") and weight ``fmt`` on GPU
    class ``arch`` (80: A100-class; 86: 99 KiB of shared memory per block; 90: with Hopper's larger tiles;
    100: datacenter Blackwell, A100-class lists),
    for bf16/fp16 activations or, with ``operands`` "tf32" or "fp32", fp32 ones (:func:`gemm_operands`)."""
    return [_config(*c) for c in _tiles(direction, "int4" if fmt == "int4" else "any", arch, operands)]


def gpu_configs() -> list[triton.Config]:
    """Every configuration of any direction, format, architecture and operands (the autotuners' full lists)."""
    lists = (_CANDIDATES, _HOPPER_TILES, _SMALL_SHARED_TILES, _FP32_TILES)
    return [_config(*c) for c in dict.fromkeys(c for tiles in lists for cs in tiles.values() for c in cs)]


@functools.cache
def gpu_arch(device_index: int) -> int:
    """The candidate list of a CUDA device: 90 (Hopper-class, see ``_HOPPER_TILES``), 100 (datacenter
    Blackwell, see ``BLACKWELL``), 86 (less shared memory per block than an A100, see ``_SMALL_SHARED_TILES``:
    sm_86, sm_89 and consumer Blackwell's sm_120 among them), else 80."""
    major, _ = torch.cuda.get_device_capability(device_index)
    smem = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    if major in (9, 10) and smem >= HOPPER_SHARED_BYTES:
        return HOPPER if major == 9 else BLACKWELL
    return SMALL_SHARED if smem < A100_SHARED_BYTES else 80


def device_arch(t: torch.Tensor) -> int:
    """:func:`gpu_arch` of the device ``t`` is on; 80 off a GPU (the stubbed-launch host benchmark)."""
    return gpu_arch(t.get_device()) if t.is_cuda else 80


def _key(c: triton.Config) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


# Tiles the split-K variant must not take: its loop over one split holds more registers. int4's
# 16x128x64 forward tile (249 of 255 registers unsplit) spills on sm_90 (88 B, Triton 3.9); the
# 16-row backward tile spills 8-16 B under Triton 3.6 (fp8 on sm_80, dense on sm_90), so split
# backward launches take the 32-row tile with 8 warps.
_SPLIT_EXCLUDED = {("fwd", "int4"): {(16, 128, 64, 4, 4)}, ("bwd", "any"): {(16, 64, 128, 4, 4)}}
_BLACKWELL_SPLIT_EXCLUDED = {("fwd", "int4"): {(16, 64, 128, 4, 4)}}  # spills 8-16 B on sm_100 (Triton 3.6, 3.9)


def _split_excluded(direction: str, kind: str, arch: int) -> set:
    """The tiles a split launch of ``(direction, kind)`` must not take on GPU class ``arch``."""
    extra = _BLACKWELL_SPLIT_EXCLUDED.get((direction, kind), set()) if arch == BLACKWELL else set()
    return _SPLIT_EXCLUDED.get((direction, kind), set()) | extra


def pruned_configs(
    configs: list[triton.Config], direction: str, arch: int, fmt: str, bucket: int, split: bool = False, operands: str = HALF
) -> list[triton.Config]:
    """The configurations of ``configs`` the autotuner times for one launch: those of ``direction``, weight
    ``fmt``, GPU class ``arch`` and ``operands`` (less the tiles a ``split`` launch must not take), with the
    tile height nearest ``bucket`` tokens (:func:`m_bucket`; and 64 rows too for many tokens)."""
    kind = "int4" if fmt == "int4" else "any"
    allowed = set(_tiles(direction, kind, arch, operands))
    if split:
        allowed -= _split_excluded(direction, kind, arch)
    usable = [c for c in configs if _key(c) in allowed]
    wanted = 16 if bucket <= 16 else 32 if bucket <= 32 else 64 if bucket <= 256 else 128
    sizes = sorted({c.kwargs["BLOCK_M"] for c in usable})
    best = min(sizes, key=lambda bm: (abs(bm.bit_length() - wanted.bit_length()), -bm))
    keep = {best} | ({64} if wanted == 128 and 64 in sizes else set())
    return [c for c in usable if c.kwargs["BLOCK_M"] in keep]


_FMT_NAMES = {code: name for name, code in FMT_CODES.items()}


def _launch_operands(dtype: torch.dtype, dot_precision: str) -> str:
    """The :data:`OPERANDS` of a launch on ``dtype`` activations with the kernel's ``DOT_PRECISION``."""
    if dtype != torch.float32:
        return HALF
    return TF32 if dot_precision == "tf32" else FP32


def _pruner(direction: str, arch: int):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        # Triton's autotuner passes the positional arguments by name (the tensors, M_BUCKET) and the
        # launch's keyword arguments (FMT and the other constexprs) separately
        args = {**named_args, **kwargs}
        activations = args["x_ptr" if direction == "fwd" else "dy_ptr"]
        operands = _launch_operands(activations.dtype, args["DOT_PRECISION"])
        fmt = _FMT_NAMES[args["FMT"]]
        return pruned_configs(configs, direction, arch, fmt, args["M_BUCKET"], bool(args.get("SPLIT_K")), operands)

    return prune


def m_bucket(m: int) -> int:
    """Autotuning key for the token count: the next power of two, capped at 16384."""
    return min(next_power_of_2(m), 16384)


def _brief_bench(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _autotuned(kernel: triton.JITFunction, direction: str, arch: int) -> triton.runtime.Autotuner:
    """``kernel`` autotuned over ``arch``'s tiles per (M bucket, N, K, split, format, group, operands): a few candidates
    after pruning, each timed briefly (5 ms warm-up, 20 ms measurement); winners kept on disk where
    Triton supports it."""
    tiles = dict.fromkeys(t for kind in ("any", "int4") for ops in OPERANDS for t in _tiles(direction, kind, arch, ops))
    options: dict = dict(do_bench=_brief_bench, prune_configs_by={"early_config_prune": _pruner(direction, arch)})
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True
    # Triton adds the tensors' dtypes to the key; DOT_PRECISION tells fp32's two tile lists apart
    key = ["M_BUCKET", "N", "K", "SPLIT_LEN", "FMT", "GROUP", "DOT_PRECISION"]
    return triton.autotune([_config(*c) for c in tiles], key=key, **options)(kernel)


@functools.cache
def autotuned_launch(direction: str, arch: int) -> CachedAutotune:
    """The autotuned launch of ``direction`` ("fwd"/"bwd") on GPUs of class ``arch`` (:func:`gpu_arch`).

    One autotuner, with its own cache, per class: Triton keys its choices on the arguments only,
    never on the device, so one shared autotuner would hand a Hopper tile tuned on an H200 to an
    A100 in the same process. After a key's first (autotuned) launch, its launches go straight to
    the kernel with the chosen configuration (:class:`CachedAutotune`)."""
    kernel = _frozen_linear_fwd_kernel if direction == "fwd" else _frozen_linear_bwd_kernel
    return CachedAutotune(_autotuned(kernel, direction, arch))


# --- split-K for few tokens ------------------------------------------------------------------
# At M <= 16 an output tile of 16 rows covers every token, so the grid has one program per 64 or
# 128 output columns: 16-64 programs for the projections of OPT-1.3B and GPT2-XL, too few to keep an
# H200's 132 SMs streaming weight bytes. Splitting the reduction dimension multiplies the programs;
# each split writes an fp32 partial and a second kernel adds them in a fixed order (deterministic),
# adds the bias and rounds once. Not yet measured on a GPU: OFFSITE_SPLIT_K=off turns it off, and the
# benchmark (bench/frozen_linear_gpu.py) reports both.
SPLIT_ENV = "OFFSITE_SPLIT_K"
SPLIT_ALIGN = 128  # a split's length is a multiple of every candidate BLOCK_K (forward) and BLOCK_N (backward)
SPLIT_MAX_M = 16  # automatic splits only up to this many tokens: there the weight stream sets the time
MIN_SPLIT_LEN = 512  # automatic splits reduce at least this many elements each
MAX_SPLITS = 16
REDUCE_BLOCK = 1024


def split_setting() -> int | None:
    """``OFFSITE_SPLIT_K``: "auto" or unset (None: :func:`split_length` decides), "off" (1), or a number
    of splits to use at M <= ``SPLIT_MAX_M`` on any device (tests and benchmarks)."""
    raw = os.environ.get(SPLIT_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw == "off":
        return 1
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise ValueError(f"{SPLIT_ENV}={raw!r}; use auto, off, or a whole number of splits (1 or more)")


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def split_tile(direction: str, fmt: str, arch: int, operands: str = HALF) -> tuple[int, int]:
    """``(rows, columns)`` of the largest output tile the autotuner may give a split launch of ``direction``,
    weight ``fmt`` and ``operands`` on GPU class ``arch`` (``M <= SPLIT_MAX_M``): the split count is sized
    for it, so whichever candidate the autotuner picks, the grid has at least the intended programs."""
    cols = "BLOCK_N" if direction == "fwd" else "BLOCK_K"
    configs = pruned_configs(gpu_configs(), direction, arch, fmt, SPLIT_MAX_M, split=True, operands=operands)
    return max(c.kwargs["BLOCK_M"] for c in configs), max(c.kwargs[cols] for c in configs)


def _aligned(length: int) -> int:
    """``length`` rounded up to a whole number of ``SPLIT_ALIGN`` (at least one)."""
    return max(cdiv(length, SPLIT_ALIGN), 1) * SPLIT_ALIGN


def finest_split_length(reduce_len: int) -> int:
    """The shortest automatic split of ``reduce_len``: ``MIN_SPLIT_LEN`` long, or ``MAX_SPLITS`` pieces."""
    return max(MIN_SPLIT_LEN, _aligned(cdiv(reduce_len, MAX_SPLITS)))


def _balanced_length(reduce_len: int, wanted: int) -> int:
    """The aligned length of near-equal pieces of ``reduce_len`` that makes at least ``wanted`` of them
    (rounding a piece up to ``SPLIT_ALIGN`` can make fewer: then try more), else the finest split."""
    finest = finest_split_length(reduce_len)
    for pieces in range(wanted, MAX_SPLITS + 1):
        length = _aligned(cdiv(reduce_len, pieces))
        if length < finest:
            break
        if cdiv(reduce_len, length) >= wanted:
            return length
    return finest


def split_plan(
    m: int, out_cols: int, reduce_len: int, device: torch.device, direction: str, fmt: str, operands: str
) -> tuple[int, int]:
    """``(length of a split, number of splits)`` of a launch (:func:`split_length`); one split, at least,
    when the reduction is empty (each output tile still writes the bias or zeros)."""
    length = split_length(m, out_cols, reduce_len, device, direction, fmt, operands)
    return length, max(cdiv(reduce_len, length), 1)


def split_length(m: int, out_cols: int, reduce_len: int, device: torch.device, direction: str, fmt: str, operands: str) -> int:
    """Length of one split of the reduction dimension (``K`` in the forward, ``N`` in the backward)
    for ``m`` tokens and ``out_cols`` output columns: a multiple of ``SPLIT_ALIGN``; one split when
    it is at least ``reduce_len``. Only for ``m <= SPLIT_MAX_M`` (the launches whose tiles the AOT
    checks compile split, ``aot.split_k_cases``); automatic on a CUDA device: enough near-equal
    splits for two programs per SM with the largest tile the autotuner may pick (:func:`split_tile`),
    at most ``MAX_SPLITS`` of them and each at least ``MIN_SPLIT_LEN`` long."""
    whole = _aligned(reduce_len)
    if m > SPLIT_MAX_M:
        return whole
    setting = split_setting()
    if setting is not None:  # forced: that many pieces, aligned (fewer when the reduction is short)
        return whole if setting <= 1 else min(whole, _aligned(cdiv(reduce_len, setting)))
    if device.type != "cuda":
        return whole
    index = cuda_index(device)
    tile_rows, tile_cols = split_tile(direction, fmt, gpu_arch(index), operands)
    tiles = cdiv(m, tile_rows) * cdiv(out_cols, tile_cols)  # the fewest programs an unsplit grid may have
    if tiles == 0:  # no output columns: nothing to split
        return whole
    wanted = min(cdiv(2 * _sm_count(index), tiles), MAX_SPLITS)
    return whole if wanted <= 1 else min(whole, _balanced_length(reduce_len, wanted))


def _reduce_splits(ws: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """``y = ws.sum(0) (+ bias)`` in fp32, rounded once to y's dtype (y contiguous, ``ws [splits, *y's rows]``)."""
    size = y.numel()
    _split_reduce_kernel[(cdiv(size, REDUCE_BLOCK),)](
        ws, bias if bias is not None else y, y, size, y.shape[-1], ws.shape[0],
        HAS_BIAS=bias is not None, INTERPRETER_BF16=_interpreter_bf16(y.dtype), BLOCK=REDUCE_BLOCK, num_warps=4,
    )  # fmt: skip


def _interpreter_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreter_enabled()


def tf32_enabled() -> bool:
    """Whether PyTorch lets fp32 matmuls on CUDA run on TF32 tensor cores, as cuBLAS would.

    Read from ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9; "none" there resolves to
    the global ``torch.backends.fp32_precision``): once a program has set the TF32 flag through that
    API, reading the legacy ``allow_tf32`` raises. Older torch: ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:
        return bool(matmul.allow_tf32)


def gemm_operands(dtype: torch.dtype) -> str:
    """How the GEMM on ``dtype`` activations runs (:data:`OPERANDS`): "half" for bf16/fp16, and for fp32
    "tf32" where PyTorch allows TF32 (:func:`tf32_enabled`), else "fp32" (exact fp32 FMAs, as cuBLAS then)."""
    if dtype != torch.float32:  # every launch passes here: PyTorch's flag is read for fp32 only
        return HALF
    return TF32 if tf32_enabled() else FP32


def _dot_precision(operands: str) -> str:
    return "tf32" if operands == TF32 else "ieee"


def _weight_args(data: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None) -> tuple:
    # the kernels read rows with unit column stride: make sure of it (a no-op for stored weights)
    data, scales, zeros = (None if t is None else t.contiguous() for t in (data, scales, zeros))
    if data.dtype == torch.float8_e4m3fn:
        data = data.view(torch.uint8)  # the kernel decodes the bytes itself
    s = scales if scales is not None else data  # placeholder pointers, never read for this format
    z = zeros if zeros is not None else data
    stride_sn = scales.stride(0) if scales is not None and scales.dim() == 2 else 0
    return data, s, z, data.stride(0), stride_sn


def _launch(kernel, direction: str, args: tuple, meta: dict, rows: int, cols: int, col_block: str, splits: int) -> None:
    """One program per (BLOCK_M x ``col_block``) output tile and split: the fixed interpreter
    configuration on the CPU, on a GPU the one autotuned for the device of ``args[0]``."""
    if triton_interpreter_enabled():
        cfg = INTERPRETER_CONFIG
        kernel[(cdiv(rows, cfg["BLOCK_M"]) * cdiv(cols, cfg[col_block]), splits)](*args, **meta, **cfg)
    else:
        tuned = autotuned_launch(direction, device_arch(args[0]))
        tuned(lambda c: (cdiv(rows, c["BLOCK_M"]) * cdiv(cols, c[col_block]), splits), args, meta)


@on_input_device
def frozen_linear_fwd(
    x: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    group_size: int,
    out_features: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the forward kernel on ``x [..., K]`` (any leading dimensions); returns ``y [..., N]`` in
    ``x.dtype`` (into ``out``, contiguous of that shape, if given)."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = out_features
    x, m, stride_xm, stride_xk = as_rows(x)
    y = output(out, (*lead, n), x.dtype, x.device)  # contiguous: rows of stride n
    if m == 0:
        return y
    w, s, z, stride_wn, stride_sn = _weight_args(data, scales, zeros)
    bias = None if bias is None else bias.contiguous()
    operands = gemm_operands(x.dtype)
    length, splits = split_plan(m, n, k, x.device, "fwd", fmt, operands)
    ws = x.new_empty((splits, m, n), dtype=torch.float32) if splits > 1 else y  # y: a placeholder, never written as ws
    args = (x, w, s, z, bias if bias is not None else y, y, ws, m, n, k, m_bucket(m), length)
    args += (stride_xm, stride_xk, stride_wn, stride_sn, n, 1)
    meta = dict(
        GROUP=max(group_size, 1),
        FMT=FMT_CODES[fmt],
        HAS_BIAS=bias is not None,
        SPLIT_K=splits > 1,
        DOT_PRECISION=_dot_precision(operands),
        INTERPRETER_BF16=_interpreter_bf16(x.dtype),
    )
    _launch(_frozen_linear_fwd_kernel, "fwd", args, meta, m, n, "BLOCK_N", splits)
    if splits > 1:
        _reduce_splits(ws, bias, y)
    return y


@on_input_device
def frozen_linear_bwd(
    grad_y: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    fmt: str,
    group_size: int,
    in_features: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the input-gradient kernel on ``dY [..., N]`` (any leading dimensions); returns ``dX [..., K]``
    (into ``out``, contiguous of that shape, if given)."""
    lead, n = grad_y.shape[:-1], grad_y.shape[-1]
    k = in_features
    grad_y, m, stride_dym, stride_dyn = as_rows(grad_y)
    dx = output(out, (*lead, k), grad_y.dtype, grad_y.device)  # contiguous: rows of stride k
    if m == 0:
        return dx
    w, s, z, stride_wn, stride_sn = _weight_args(data, scales, zeros)
    operands = gemm_operands(grad_y.dtype)
    length, splits = split_plan(m, k, n, grad_y.device, "bwd", fmt, operands)
    ws = grad_y.new_empty((splits, m, k), dtype=torch.float32) if splits > 1 else dx  # dx: a placeholder
    args = (grad_y, w, s, z, dx, ws, m, n, k, m_bucket(m), length)
    args += (stride_dym, stride_dyn, stride_wn, stride_sn, k, 1)
    meta = dict(
        GROUP=max(group_size, 1),
        FMT=FMT_CODES[fmt],
        SPLIT_K=splits > 1,
        DOT_PRECISION=_dot_precision(operands),
        INTERPRETER_BF16=_interpreter_bf16(grad_y.dtype),
    )
    _launch(_frozen_linear_bwd_kernel, "bwd", args, meta, m, k, "BLOCK_K", splits)
    if splits > 1:
        _reduce_splits(ws, None, dx)
    return dx
