"""Triton kernels of the fp8 (e4m3) tensor-core path of the frozen linear (Hopper, Ada).

Weights stored as e4m3 with one fp32 scale per output channel (``W ~= Wq * s_w[:, None]``);
activations are quantized on the fly, one fp32 scale per row, and the GEMM runs on fp8 operands
with fp32 accumulation (``QGMMA.64xNx32.F32.E4M3.E4M3``, Hopper's warpgroup MMA, on sm_90;
``QMMA.16832.F32.E4M3.E4M3`` on sm_89)::

    forward   Y[m, n]  = s_x[m] * s_w[n] * sum_k qX[m, k] * Wq[n, k]  (+ b[n])
    backward  dX[m, k] = s_g[m] * sum_n qG[m, n] * Wq[n, k],   qG, s_g = rows of dY * s_w[None, :]

with ``s[m] = max(amax_m / 448, FLT_MIN)`` (an all-zero row gets a tiny scale and quantizes to
zeros) and ``q = e4m3(clamp(v * (1 / s), -448, 448))`` (one IEEE division per row, a multiply per
element; the cast is the hardware's saturating round-to-nearest-even ``F2FP.SATFINITE.E4M3``):
bit-exact with :func:`offsite_kernels.quant.formats.quantize_rows_fp8`, the PyTorch reference.
The backward folds the weight's per-channel scale into ``dY`` before quantizing it, since that
scale runs along the GEMM's reduction.

Two kernels: ``_fp8_quantize_rows_kernel`` (one program per row: an amax pass, then a quantize
pass that re-reads the row from L1/L2) and ``_fp8_gemm_kernel`` (``C = s_a[m] (* s_b[n]) * A @ B^T
(+ bias)``, ``A [M, K]`` and ``B [N, K]`` e4m3, any B strides). Accumulation: Triton's sm_90
default, the whole reduction in the tensor core's fp32 accumulator (Hopper adds fp8 products with
reduced precision, about 2^-13 of the running sum per 32-wide step; an order below the
activations' e4m3 rounding, 2^-4 per element). Promoting to fp32 every ``BLOCK_K``
(``max_num_imprecise_acc``, DeepSeek-V3's recipe) was compiled and rejected: it doubles the
accumulator registers (the 128x256 tiles spill) and serialises the MMAs behind the adds.

Operand layout. Hopper's fp8 warpgroup MMA reads both shared-memory operands K-major (only
16-bit types may be transposed in shared memory). The forward's ``B = Wq [N, K]`` is K-major as
stored; the backward reduces over ``N``, so ``Wq`` read in place as its ``B`` is N-major. Triton
compiles that (``bwd_strided``) by loading the B tile into registers and transposing it into
shared memory byte by byte. The sm_90 SASS of the 128x128x128 8-warp tile (``aot_cases``;
bench/results/aot_fp8_gemm.json has every tile): read in place, B takes 64 ``STS.U8`` per thread
per K step, is not multi-buffered (81 KiB of shared memory instead of 129 KiB) and only A streams
by async copy (16 ``LDGSTS`` instead of 32); the MMA waits for zero pending groups, so nothing
overlaps it. A K-major ``Wq^T`` gives the backward the forward's SASS exactly (both operands by
``LDGSTS`` through a 4-stage ring, no byte stores, one MMA group in flight). So the backward
reads a transposed copy, made per call by default and freed after it (:func:`bwd_weight_operand`):
the emulator's weights stay at one byte each, the point of a low-bit emulator, for one extra pass
over the weight per backward (2 N K bytes; about 5% of the GEMM at M = 4096, estimated, not
measured). ``OFFSITE_FP8_BWD_WEIGHT`` picks the copy kept with the weight (one more byte per
weight element) or the in-place read instead, so a GPU run can time all three.

Two Triton builds cast fp32 -> e4m3 wrongly, so there ``ROUND_IN_FP32`` rounds to the e4m3 grid in
fp32 first, with integer bit arithmetic; the cast of an exactly representable value is then exact
whatever path it takes. The CPU interpreter ORs the mantissa carry into the exponent instead of
adding it (31.3 becomes 16; ties round away from zero). Triton <= 3.6 compiles the cast for sm_89
through fp16 (``F2FP.F16.F32``, then ``F2FP.SATFINITE.E4M3.F16``: two roundings, so a value just
above an e4m3 tie lands on it in fp16 and then rounds to even); 3.9 and every sm_90 build cast
from fp32 directly (``aot_cases`` checks which SASS each target gets). The interpreter's fp8
``tl.dot`` is exact (it widens e4m3 to fp16, multiplies in fp32): no workaround there.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl
import triton.testing

from ..backends import triton_interpreter_enabled
from .triton_common import HOPPER_SHARED_BYTES, _cast, _grouped_tile, triton_version
from .triton_launch import CachedAutotune, cdiv, next_power_of_2, on_input_device

E4M3_MAX = tl.constexpr(448.0)  # the largest finite e4m3 value
FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny: the scale of an all-zero row


@triton.jit
def _round_to_e4m3_grid(v):
    """``v`` (fp32, within +-448) rounded to the nearest e4m3 value, ties to even, still fp32.

    Only where the cast itself rounds wrongly (see module docs): normal e4m3 values keep 3 mantissa bits (an
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
    HAS_COL_SCALE: tl.constexpr, ROUND_IN_FP32: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Row ``m`` of ``v = x (* c[None, :])``: ``s[m] = max(amax / 448, FLT_MIN)``, ``q[m] = e4m3(v * (1 / s[m]))``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        v = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            v = v * tl.load(c_ptr + k, mask=k < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), E4M3_MAX), FP32_TINY)
    inv = tl.math.div_rn(1.0, scale)  # IEEE divisions, as torch divides: bit-exact scales and codes
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        v = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            v = v * tl.load(c_ptr + k, mask=k < K, other=0.0)
        q = tl.clamp(v * inv, -E4M3_MAX, E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
        if ROUND_IN_FP32:
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
    pid_m, pid_n = _grouped_tile(pid, num_m, num_n, GROUP_M)

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
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per target. fp8 tensor cores need sm_89+: A100
# (sm_80) is no target of this path (it runs weight-only fp8). Every entry compiles for its target
# in both operand layouts with the fp8 MMA (sm_90: QGMMA, the warpgroup MMA, on 64-row tiles;
# sm_89: QMMA), without spills and within the target's shared memory (227 KiB on H100, 99 KiB on
# Ada), checked ahead of time by tests/test_aot_compile.py. The Hopper tiles spill on Ada
# (mma.sync keeps the accumulators of every warp in registers), hence two lists. Datacenter Blackwell
# (sm_100: tcgen05's UTCQMMA) keeps the Hopper tiles that do not spill there (four forward tiles spilled
# 56-376 B); consumer Blackwell (sm_120, 99 KiB) runs the Ada list, checked for sm_120.
GEMM_CANDIDATES = {
    90: (
        (64, 128, 128, 4, 4),
        (64, 256, 128, 4, 3),
        (128, 128, 128, 4, 4),
        (128, 128, 128, 8, 3),
        (128, 128, 128, 8, 4),
        (128, 256, 128, 8, 3),
        (128, 256, 64, 8, 4),
    ),
    89: ((128, 64, 128, 4, 3), (128, 128, 128, 8, 4)),
    100: ((64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 128, 128, 8, 4)),
}
TARGET_NAMES = {
    90: "Hopper-class (sm_90, >= 227 KiB shared memory per block)",
    89: "Ada-class (sm_89, 99 KiB; sm_120 too)",
    100: "datacenter Blackwell (sm_100, 227 KiB)",
}
INTERPRETER_GEMM_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
QUANTIZE_BLOCK_K = 1024  # the quantizer's chunk: next_power_of_2(K) up to this
INTERPRETER_QUANTIZE_BLOCK_K = 64
QUANTIZE_WARPS = 4


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)


def _key(c: triton.Config) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def gemm_configs(target: int | None = None) -> list[triton.Config]:
    """The configurations the fp8 GEMM's autotuner may pick on ``target`` (89, 90 or 100; None: all)."""
    lists = [GEMM_CANDIDATES[target]] if target else GEMM_CANDIDATES.values()
    return [_config(*c) for c in dict.fromkeys(c for cs in lists for c in cs)]


@functools.cache
def gpu_target(device_index: int) -> int:
    """The candidate list for a CUDA device: 100 for compute capability 10.x (datacenter Blackwell), 90 for other
    sm_90+ GPUs with Hopper's shared memory, else 89 (Ada-class, consumer Blackwell's sm_120 included)."""
    cap = torch.cuda.get_device_capability(device_index)
    smem = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    if cap >= (9, 0) and smem >= HOPPER_SHARED_BYTES:
        return 100 if cap[0] == 10 else 90
    return 89


def device_target(t: torch.Tensor) -> int:
    """:func:`gpu_target` of the device ``t`` is on; 90 off a GPU (the stubbed-launch host benchmark)."""
    return gpu_target(t.get_device()) if t.is_cuda else 90


def _pruner(target: int):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """``target``'s own list; for M <= 64 its shortest tiles only (a taller tile would mostly multiply padding)."""
        allowed = set(GEMM_CANDIDATES[target])
        usable = [c for c in configs if _key(c) in allowed]
        if named_args["M_BUCKET"] <= 64:
            shortest = min(c.kwargs["BLOCK_M"] for c in usable)
            usable = [c for c in usable if c.kwargs["BLOCK_M"] == shortest]
        return usable

    return prune


def _brief_bench(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _autotuned(target: int) -> triton.runtime.Autotuner:
    """The GEMM autotuned over ``target``'s tiles per (M bucket, N, K, B's layout, direction); winners kept
    on disk where Triton supports it."""
    options: dict = dict(do_bench=_brief_bench, prune_configs_by={"early_config_prune": _pruner(target)})
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True
    key = ["M_BUCKET", "N", "K", "stride_bk", "HAS_COL_SCALE"]
    return triton.autotune(gemm_configs(target), key=key, **options)(_fp8_gemm_kernel)


@functools.cache
def autotuned_gemm(target: int) -> CachedAutotune:
    """The autotuned GEMM launch on GPUs of class ``target`` (:func:`gpu_target`): one autotuner and cache per
    class (Triton's key holds no device), whose later launches of a key skip the autotuner's per-call work."""
    return CachedAutotune(_autotuned(target))


def m_bucket(m: int) -> int:
    """Autotuning key for the token count: the next power of two, capped at 16384."""
    return min(next_power_of_2(m), 16384)


# --- ahead-of-time compile cases -------------------------------------------------------------
AOT_TARGETS = (89, 90, 100, 120)  # sm_80 has no fp8 tensor cores: no target of this path
GEMM_LAYOUTS = ("fwd", "bwd", "bwd_strided")  # B K-major (weight; cached Wq^T) or N-major (Wq read in place)
_MMA = {90: "QGMMA", 89: "QMMA", 100: "UTCQMMA", 120: "QMMA"}


def list_target(arch: int) -> int:
    """The candidate list (:func:`gpu_target`) that compile target ``sm_<arch>`` runs: sm_120 runs the Ada list."""
    return 89 if arch == 120 else arch


def _gemm_case(arch: int, layout: str, cfg: tuple, dtype: str = "bf16"):
    from .aot import KernelCase

    bm, bn, bk, warps, stages = cfg
    types: dict[str, str | int] = {
        "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": f"*{dtype}",
        "c_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32",
        "stride_am": "i32", "stride_ak": 1, "stride_cm": "i32", "stride_cn": 1,
    }  # fmt: skip
    strided = layout == "bwd_strided"
    types.update(stride_bn=1, stride_bk="i32") if strided else types.update(stride_bn="i32", stride_bk=1)
    fwd = layout == "fwd"
    constexprs = dict(HAS_COL_SCALE=fwd, HAS_BIAS=fwd, INTERPRETER_BF16=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    mma = _MMA[arch]
    # the e4m3 x e4m3 -> fp32 MMA; tcgen05's UTCQMMA names no operand types in the SASS (kind::f8f6f4 in the PTX)
    expect = rf"\b{mma}\b" if mma.startswith("UTC") else rf"\b{mma}\.\S*\.F32\.E4M3\.E4M3\b"
    return KernelCase(
        module=__name__,
        fn="_fp8_gemm_kernel",
        types=types,
        constexprs=constexprs,
        div16=tuple(n for n, t in types.items() if isinstance(t, str) and n != "M"),
        num_warps=warps,
        num_stages=stages,
        label=f"fp8 gemm {layout} {dtype} {bm}x{bn}x{bk} w{warps} s{stages}",
        tensor_core=True,
        mma=mma,
        # K-major operands reach shared memory by async copies; byte-wise register stores mean a transpose (sm_100
        # stores one flag byte outside the loop for its tensor memory: there the async copies are what is checked)
        sass_expect=(expect, r"\bLDGSTS\b") if not strided and arch == 100 else (expect,),
        sass_forbid=() if strided or arch == 100 else (r"\bSTS\.U8\b",),
    )


def cast_rounds_twice(arch: int) -> bool:
    """Whether Triton may compile the fp32 -> e4m3 cast for ``sm_<arch>`` through fp16 (see module docs):
    3.6 does on sm_89, 3.9 does not; 3.7 and 3.8 are unchecked, so they round in fp32 first too (exact
    whichever cast they compile)."""
    return triton_version() < (3, 9) and arch < 90


def _quantize_case(arch: int, dtype: str, block_k: int, col_scale: bool):
    from .aot import KernelCase

    round_first = cast_rounds_twice(arch)

    types: dict[str, str | int] = {
        "x_ptr": f"*{dtype}", "c_ptr": "*fp32", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
        "K": "i32", "stride_xm": "i32", "stride_xk": 1, "stride_qm": "i32",
    }  # fmt: skip
    return KernelCase(
        module=__name__,
        fn="_fp8_quantize_rows_kernel",
        types=types,
        constexprs=dict(HAS_COL_SCALE=col_scale, ROUND_IN_FP32=round_first, BLOCK_K=block_k),
        div16=("x_ptr", "c_ptr", "q_ptr", "s_ptr", "K", "stride_xm", "stride_qm"),
        num_warps=QUANTIZE_WARPS,
        label=f"fp8 quantize rows {dtype} BLOCK_K={block_k}{' *col_scale' if col_scale else ''}"
        + (" round in fp32" if round_first else ""),
        # the hardware's saturating round-to-nearest-even cast: from fp32, or, where Triton may cast
        # through fp16, from either (of a value already on the e4m3 grid: exact both ways)
        sass_expect=(rf"\bF2FP\.SATFINITE\.E4M3\.{'F(16|32)' if round_first else 'F32'}\b",),
    )


def aot_cases(arch: int) -> list:
    """:class:`~offsite_kernels.ops.aot.KernelCase` for every launch the fp8 path can make on ``arch`` (one of
    :data:`AOT_TARGETS`, with the candidate list :func:`list_target` gives it).

    The GEMM: every configuration of the target's list in each operand layout (forward; backward on the
    cached ``Wq^T``; backward reading ``Wq`` in place) with bf16 output, plus fp16 output in each layout on
    a configuration rotating through the list. The quantizer: the largest chunk and two short-row chunks,
    bf16 and fp16, with and without the weight's column scale (the backward's)."""
    configs = GEMM_CANDIDATES[list_target(arch)]
    cases = [_gemm_case(arch, layout, cfg) for layout in GEMM_LAYOUTS for cfg in configs]
    cases += [_gemm_case(arch, layout, configs[i % len(configs)], "fp16") for i, layout in enumerate(GEMM_LAYOUTS)]
    for dtype in ("bf16", "fp16"):
        for block_k in (16, 256, QUANTIZE_BLOCK_K):
            cases.append(_quantize_case(arch, dtype, block_k, col_scale=(dtype == "bf16") == (block_k != 256)))
    return cases


# --- launchers -----------------------------------------------------------------------------
@on_input_device
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
    round_first = interp or cast_rounds_twice(_arch(x.device))
    _fp8_quantize_rows_kernel[(m,)](
        x, c if c is not None else s, q, s, k, x.stride(0), x.stride(1), q.stride(0),
        HAS_COL_SCALE=c is not None,
        ROUND_IN_FP32=round_first,
        BLOCK_K=INTERPRETER_QUANTIZE_BLOCK_K if interp else min(QUANTIZE_BLOCK_K, max(next_power_of_2(k), 16)),
        num_warps=QUANTIZE_WARPS,
    )  # fmt: skip
    return q, s


def _arch(device: torch.device) -> int:
    """``10 * major + minor`` of a CUDA device's compute capability (90 elsewhere: no cast quirk applies)."""
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 90


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _launch_args(a, s_a, b, s_b, bias, c) -> tuple[tuple, dict]:
    """The GEMM kernel's positional arguments (what the autotuner's key and pruner read) and constexprs."""
    m, k = a.shape
    n = b.shape[0]
    args = (a, b, s_a, s_b if s_b is not None else s_a, bias if bias is not None else c, c, m, n, k, m_bucket(m))
    args += (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    meta = dict(
        HAS_COL_SCALE=s_b is not None,
        HAS_BIAS=bias is not None,
        INTERPRETER_BF16=c.dtype == torch.bfloat16 and triton_interpreter_enabled(),
    )
    return args, meta


@on_input_device
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
    args, meta = _launch_args(a, s_a, b, s_b, bias, c)
    if triton_interpreter_enabled():
        cfg = INTERPRETER_GEMM_CONFIG
        _fp8_gemm_kernel[(cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)](*args, **meta, **cfg)
    else:
        autotuned_gemm(device_target(a))(lambda cf: (cdiv(m, cf["BLOCK_M"]) * cdiv(n, cf["BLOCK_N"]),), args, meta)
    return c


def _weight(data: torch.Tensor) -> torch.Tensor:
    return (data if data.dtype == torch.float8_e4m3fn else data.view(torch.float8_e4m3fn)).contiguous()


# How the backward reads Wq as its B operand (N-major as stored; Hopper's fp8 MMA wants K-major):
BWD_WEIGHT_MODES = ("cache", "transpose", "strided")
BWD_WEIGHT_ENV = "OFFSITE_FP8_BWD_WEIGHT"
_CACHE_ATTR = "_offsite_fp8_wt"


def bwd_weight_mode() -> str:
    """``OFFSITE_FP8_BWD_WEIGHT``: "transpose" (default), "cache" or "strided" (see :func:`bwd_weight_operand`)."""
    import os

    mode = os.environ.get(BWD_WEIGHT_ENV, "").strip().lower() or "transpose"
    if mode not in BWD_WEIGHT_MODES:
        raise ValueError(f"{BWD_WEIGHT_ENV}={mode!r}; choose one of {', '.join(BWD_WEIGHT_MODES)}")
    return mode


def bwd_weight_operand(data: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """The backward GEMM's ``B [K, N]`` (``B[k, n] = Wq[n, k]``) for the e4m3 weight ``data [N, K]``.

    - "cache": a contiguous ``Wq^T``, made on the first backward and kept with the weight's
      storage (one entry per weight view on it; freed with the storage; rebuilt when the weight is
      written in place, which bumps its version): K-major, so both operands stream through the
      pipelined async copies. Costs one more byte per weight element: an fp8 layer trained through
      holds 2 bytes per weight, bf16's size.
    - "transpose" (default): the same copy made in every call and freed after it (no lasting
      memory; a pass over the weight, 2 N K bytes, per call).
    - "strided": ``Wq`` read in place as an N-major view; Triton transposes every tile through
      registers (byte-wise shared stores, B not multi-buffered: see the module docs).
    """
    w = data if data.dtype == torch.float8_e4m3fn else data.view(torch.float8_e4m3fn)
    mode = bwd_weight_mode() if mode is None else mode
    if mode == "strided":
        return w.t()
    if mode == "transpose":
        return w.t().contiguous()
    try:
        version = w._version
    except RuntimeError:  # an inference tensor has no version counter: nothing safe to key a cache on
        return w.t().contiguous()
    # the storage's Python object is one per storage (dtype views such as the uint8 one that crosses the
    # custom op boundary share it, and share the version counter)
    storage = w.untyped_storage()
    cache = storage.__dict__.setdefault(_CACHE_ATTR, {})
    key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()))
    hit = cache.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    wt = w.t().contiguous()
    cache[key] = (version, wt)
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
