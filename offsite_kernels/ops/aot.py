"""Ahead-of-time compile check of the frozen-linear Triton kernels for real GPUs, without one.

Triton compiles for any NVIDIA target on a CPU-only machine (``triton.compile`` with a
``GPUTarget``); the ``cuobjdump`` shipped with Triton's NVIDIA backend then reads the cubin's
resource usage and its SASS. For every kernel x weight format x activation dtype x autotune
configuration x architecture this module reports registers, stack bytes (register spills),
shared memory against the device limit, and whether the GEMM runs on tensor cores (``HGMMA``,
Hopper's warpgroup MMA, on sm_90; ``UTCHMMA``, Blackwell's tcgen05 MMA, on sm_100; ``HMMA`` on sm_80,
sm_86 and sm_120; TF32 ones for fp32 activations where TF32 is allowed) or, for exact fp32
activations, on none. Other kernels describe their launches as
:class:`KernelCase` objects (the fp8 GEMM: ``QGMMA ... E4M3`` on sm_90, ``QMMA`` on sm_89).

Arguments are specialised the way the JIT specialises a typical launch: contiguous row-major
tensors (unit inner strides become the constant 1), 16-byte-aligned pointers, ``N``, ``K`` and
the row strides multiples of 16, ``M`` arbitrary; int4 uses group size 128, its per-group
scale stride is left unspecialised. ``DOT_PRECISION`` "ieee" ("tf32" for the TF32 variants) and the
interpreter-only switch (``INTERPRETER_BF16``) False, as on a GPU.

Nothing here needs a GPU, and nothing here runs a kernel.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import triton
import triton.language

from . import frozen_linear_triton as _flt
from . import triton_common

KERNELS = ("fwd", "bwd")
FORMATS = tuple(_flt.FMT_CODES)  # dense, int8, int4, fp8
# activation dtypes: "tf32" is fp32 activations with TF32 allowed (DOT_PRECISION "tf32"), "fp32" with exact fp32 FMAs
ACT_DTYPES = ("bf16", "fp16", "tf32", "fp32")
ACT_OPERANDS = {"bf16": _flt.HALF, "fp16": _flt.HALF, "tf32": _flt.TF32, "fp32": _flt.FP32}
_ACT_POINTERS = {"bf16": "*bf16", "fp16": "*fp16", "tf32": "*fp32", "fp32": "*fp32"}
# compile targets: one per GPU class of the frozen linear (frozen_linear_triton.gpu_arch), and consumer Blackwell's
# sm_120, which runs class 86's lists (gpu_class)
ARCHS = (80, 86, 90, 100, 120)
ARCH_NAMES = {
    80: "A100 (sm_80)",
    86: "RTX 3090/A10 (sm_86; sm_89's L4/L40S/RTX 4090 share its 99 KiB)",
    89: "L40S/RTX 4090 (sm_89)",
    90: "H100/H200 (sm_90)",
    100: "B200/GB200 (sm_100)",
    120: "RTX 5090/RTX PRO 6000 Blackwell (sm_120)",
}
# cudaDevAttrMaxSharedMemoryPerBlockOptin: what one block may use, static + dynamic.
SHARED_LIMITS = {  # 166912, 101376, 101376, 232448, 232448, 101376 bytes
    80: triton_common.A100_SHARED_BYTES,
    86: triton_common.SMALL_SHARED_BYTES,
    89: triton_common.SMALL_SHARED_BYTES,
    90: triton_common.HOPPER_SHARED_BYTES,
    100: triton_common.HOPPER_SHARED_BYTES,
    120: triton_common.SMALL_SHARED_BYTES,
}
# tensor-core MMAs in SASS: bf16/fp16 and TF32 (HMMA; HGMMA = Hopper's warpgroup MMA; UTCHMMA = Blackwell's
# tcgen05 MMA) and fp8 (QMMA on Ada; QGMMA on Hopper; UTCQMMA on Blackwell)
MMA_MNEMONICS = ("HGMMA", "HMMA", "QGMMA", "QMMA", "UTCHMMA", "UTCQMMA")
_TENSOR_CORE_PATTERNS = tuple(rf"\b{m}\b" for m in MMA_MNEMONICS)
# Hopper's warpgroup MMA (HGMMA) and Blackwell's tcgen05 MMA (UTCHMMA) work on tiles of 64 rows or more; a
# tile of fewer rows (the skinny-M configurations, which are bandwidth-bound) runs on the classic MMA (HMMA).
WGMMA_MIN_BLOCK_M = 64
_WIDE_MMA = {90: "HGMMA", 100: "UTCHMMA"}  # sm_120 (consumer Blackwell) has neither: HMMA


def gpu_class(arch: int) -> int:
    """The frozen linear's GPU class (its tile lists) that compile target ``sm_<arch>`` runs."""
    return _flt.SMALL_SHARED if arch == 120 else arch


def expected_tensor_core(arch: int, block_m: int, act_dtype: str = "bf16") -> str | None:
    """The tensor-core instruction a GEMM tile of ``block_m`` rows must use on ``arch``; None for exact fp32
    (``act_dtype`` "fp32"), whose SASS must show no tensor-core MMA at all."""
    if act_dtype == "fp32":
        return None
    return _WIDE_MMA.get(arch, "HMMA") if block_m >= WGMMA_MIN_BLOCK_M else "HMMA"


INT4_GROUP = 128

_KERNEL_FNS = {"fwd": "_frozen_linear_fwd_kernel", "bwd": "_frozen_linear_bwd_kernel"}
_WEIGHT_DTYPES = {"int8": "*i8", "int4": "*u8", "fp8": "*u8"}  # dense: the activation dtype; fp8 travels as bytes
_DIVISIBILITY_16 = [["tt.divisibility", 16]]
# constexpr switches that only the CPU interpreter turns on: False on a GPU
INTERPRETER_FLAGS = ("INTERPRETER_BF16",)


class AotUnavailable(RuntimeError):
    """Triton's NVIDIA backend or its ``cuobjdump`` is missing here."""


# --- tools ---------------------------------------------------------------------------------


def cuobjdump_path() -> str:
    """The ``cuobjdump`` bundled with Triton's NVIDIA backend (``TRITON_CUOBJDUMP_PATH`` overrides)."""
    path = os.environ.get("TRITON_CUOBJDUMP_PATH") or os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
    )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise AotUnavailable(f"cuobjdump not found at {path} (Triton's NVIDIA backend is not installed)")
    return path


def availability() -> tuple[bool, str]:
    """Whether the ahead-of-time check can run here, and why (not)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the triton build
        return False, f"Triton's NVIDIA backend is missing: {e}"
    try:
        cuobjdump_path()
    except AotUnavailable as e:
        return False, str(e)
    return True, "triton NVIDIA backend and cuobjdump present"


_TMP: tempfile.TemporaryDirectory | None = None


def _tmpdir() -> str:
    """A per-process scratch folder for cubins, removed when the process exits."""
    global _TMP
    if _TMP is None:
        _TMP = tempfile.TemporaryDirectory(prefix="offsite_aot_")
    return _TMP.name


def kernel_fn(kernel: str) -> Any:
    """The ``@triton.jit`` function of ``kernel`` ("fwd" or "bwd"), as the kernel module holds it."""
    return getattr(_flt, _KERNEL_FNS[kernel])


def compiles_in_process() -> bool:
    """Whether ``triton.compile`` can run in this process.

    Not when Triton was imported under ``TRITON_INTERPRET=1`` (CPU test runs): ``@triton.jit``
    then made interpreter functions, Triton's own ``tl.cdiv`` included, which the compiler
    cannot take. The compiles then go to a worker process with the interpreter off.
    """
    jit = triton.runtime.jit.JITFunction
    return isinstance(triton.language.standard.cdiv, jit) and isinstance(kernel_fn("fwd"), jit)


# --- signature -----------------------------------------------------------------------------


def config_key(config: triton.Config | tuple) -> tuple[int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)`` of a ``triton.Config``."""
    if isinstance(config, tuple):
        return tuple(config)  # type: ignore[return-value]
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], config.num_warps, config.num_stages)


def config_label(config: triton.Config | tuple) -> str:
    bm, bn, bk, _, w, s = config_key(config)
    return f"{bm}x{bn}x{bk} w{w} s{s}"


def kernel_signature(
    kernel: str, fmt: str, act_dtype: str, config: triton.Config | tuple, split_k: bool = False
) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource``; ``split_k``: the variant
    that writes fp32 partials of one split of the reduction (``frozen_linear_triton.split_length``).

    Triton 3.9's format: ``signature`` maps every parameter name (in order) to a type string
    (``"*bf16"``, ``"*u8"``, ``"i32"``, ...) or to ``"constexpr"``; ``constexprs`` maps the
    constexpr names to their values; ``attrs`` maps ``(param_index,)`` to
    ``[["tt.divisibility", 16]]`` for the arguments the JIT would mark divisible by 16.
    """
    if kernel not in KERNELS or fmt not in FORMATS or act_dtype not in ACT_DTYPES:
        raise ValueError(f"unknown kernel/format/dtype {kernel!r}, {fmt!r}, {act_dtype!r}")
    act = _ACT_POINTERS[act_dtype]
    w = _WEIGHT_DTYPES.get(fmt, act)
    s = "*fp32" if fmt != "dense" else w  # placeholders (the weight pointer) where a format has none
    z = "*u8" if fmt == "int4" else w
    sn_div16 = fmt != "int4"  # int8/fp8 scales are 1-D and dense has none: stride 0, which counts as divisible
    bm, bn, bk, gm, _, _ = config_key(config)
    # runtime arguments: name -> (type, divisible by 16); a type that is not a string is the constant 1 (unit stride)
    runtime: dict[str, tuple[str | int, bool]] = {"w_ptr": (w, True), "s_ptr": (s, True), "z_ptr": (z, True)}
    runtime.update({"M": ("i32", False), "N": ("i32", True), "K": ("i32", True), "M_BUCKET": ("i32", True)})
    runtime.update({"ws_ptr": ("*fp32" if split_k else act, True), "SPLIT_LEN": ("i32", True)})
    runtime.update({"stride_wn": ("i32", True), "stride_sn": ("i32", sn_div16)})
    meta: dict[str, Any] = dict(GROUP=INT4_GROUP if fmt == "int4" else 1, FMT=_flt.FMT_CODES[fmt], SPLIT_K=split_k)
    if kernel == "fwd":
        runtime.update({"x_ptr": (act, True), "b_ptr": (act, True), "y_ptr": (act, True)})
        runtime.update({"stride_xm": ("i32", True), "stride_xk": (1, False), "stride_ym": ("i32", True), "stride_yn": (1, False)})
        meta["HAS_BIAS"] = True
    else:
        runtime.update({"dy_ptr": (act, True), "dx_ptr": (act, True)})
        runtime.update(
            {"stride_dym": ("i32", True), "stride_dyn": (1, False), "stride_dxm": ("i32", True), "stride_dxk": (1, False)}
        )
    meta.update(DOT_PRECISION="tf32" if act_dtype == "tf32" else "ieee", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm)
    meta.update(dict.fromkeys(INTERPRETER_FLAGS, False))

    fn = kernel_fn(kernel)
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name], constexprs[name] = "constexpr", meta[name]
        elif name in runtime:
            ty, div16 = runtime[name]
            if isinstance(ty, str):
                signature[name] = ty
                if div16:
                    attrs[(i,)] = _DIVISIBILITY_16
            else:
                signature[name], constexprs[name] = "constexpr", ty
        else:
            raise RuntimeError(f"{fn.__name__}: no AOT type or value for {name!r}; update offsite_kernels/ops/aot.py")
    return signature, constexprs, attrs


# --- compile and inspect -------------------------------------------------------------------

_RESOURCE_RE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump(cubin: bytes, name: str) -> tuple[dict[str, int], str]:
    path = os.path.join(_tmpdir(), f"{name}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        tool = cuobjdump_path()
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    m = _RESOURCE_RE.search(usage)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump resource usage:\n{usage}")
    regs, stack, shared, local = (int(g) for g in m.groups()[1:])
    return dict(registers=regs, stack_bytes=stack, static_shared_bytes=shared, local_bytes=local), sass


def _count(sass: str, mnemonic: str) -> int:
    return len(re.findall(rf"\b{mnemonic}\b", sass))


def _compile_here(kernel: str, fmt: str, act_dtype: str, key: tuple, arch: int) -> dict[str, Any]:
    bm, bn, bk, gm, warps, stages = key
    row: dict[str, Any] = dict(
        kernel=kernel,
        fmt=fmt,
        act_dtype=act_dtype,
        config=config_label(key),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=gm,
        num_warps=warps,
        num_stages=stages,
        arch=arch,
        shared_limit=SHARED_LIMITS[arch],
        tensor_core_expected=expected_tensor_core(arch, bm, act_dtype),
    )
    try:
        signature, constexprs, attrs = kernel_signature(kernel, fmt, act_dtype, key)
        name = f"{kernel}_{fmt}_{act_dtype}_{'_'.join(map(str, key))}_sm{arch}"
        row.update(_compile_and_inspect(kernel_fn(kernel), signature, constexprs, attrs, warps, stages, arch, name))
    except Exception as e:  # recorded, never raised: one bad combination must not hide the others
        row.update(compiled=False, error=f"{type(e).__name__}: {e}"[:4000])
        return row
    expected = row["tensor_core_expected"]
    row["tensor_core_ok"] = row["mma_counts"][expected] > 0 if expected else not row["tensor_core"]
    row["ok"] = row["shared_ok"] and row["tensor_core_ok"] and not row["spills"]
    return row


def _compile_and_inspect(
    fn: Any,
    signature: dict,
    constexprs: dict,
    attrs: dict,
    warps: int,
    stages: int,
    arch: int,
    name: str,
    patterns: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Compile ``fn`` for ``sm_<arch>`` and read registers, stack, shared memory, spills and MMAs from the cubin
    (and how often each regular expression of ``patterns`` matches its SASS: ``sass_matches``)."""
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    usage, sass = _cuobjdump(compiled.asm["cubin"], name)
    dynamic = int(compiled.metadata.shared)
    total = dynamic + usage["static_shared_bytes"]
    mma = {m: _count(sass, m) for m in MMA_MNEMONICS}
    found = [m for m, n in mma.items() if n]
    first = re.search(rf"\b{found[0]}\.\S+", sass) if found else None
    out: dict[str, Any] = dict(
        compiled=True,
        error=None,
        **usage,
        dynamic_shared_bytes=dynamic,
        shared_bytes=total,
        shared_ok=total <= SHARED_LIMITS[arch],
        spill_stores=_count(sass, "STL"),
        spill_loads=_count(sass, "LDL"),
        tensor_core=bool(found),
        tensor_core_mnemonic=found[0] if found else None,
        tensor_core_instructions=sum(mma.values()),
        mma_counts=mma,
        mma_instruction=first.group(0) if first else None,  # e.g. QGMMA.64x128x32.F32.E4M3.E4M3
        async_copies=_count(sass, "LDGSTS"),  # cp.async global -> shared (pipelined operand loads)
        byte_shared_stores=len(re.findall(r"\bSTS\.U8\b", sass)),  # register -> shared, one byte at a time
    )
    if patterns:
        out["sass_matches"] = {p: len(re.findall(p, sass)) for p in patterns}
    out["spills"] = out["stack_bytes"] > 0 or out["local_bytes"] > 0 or out["spill_stores"] > 0
    return out


# --- any other kernel: a described case ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One launch configuration of a Triton kernel, described for an AOT compile.

    ``types`` maps each runtime argument to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``) or to an int constant the JIT would specialise (a unit stride: ``1``);
    ``constexprs`` holds the ``tl.constexpr`` values; ``div16`` names the arguments the JIT
    would mark divisible by 16 (aligned pointers, strides and sizes that are multiples of 16).
    ``tensor_core``: the kernel's main loop is a GEMM whose SASS must show tensor-core MMAs;
    ``mma``: the MMA mnemonic it must show (default: HGMMA on sm_90, HMMA below);
    ``sass_expect`` / ``sass_forbid``: regular expressions that must / must not match the SASS.
    """

    module: str
    fn: str
    types: dict[str, str | int]
    constexprs: dict[str, Any]
    div16: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 1
    label: str = ""
    tensor_core: bool = False
    mma: str | None = None
    sass_expect: tuple[str, ...] = ()
    sass_forbid: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def case_signature(case: KernelCase) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of ``case`` for ``triton.compiler.ASTSource`` (see :func:`kernel_signature`)."""
    fn = getattr(importlib.import_module(case.module), case.fn)
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int], list] = {}
    unknown = set(case.div16) - set(case.types)
    if unknown:
        raise ValueError(f"{case.fn}: div16 names {sorted(unknown)} that are not runtime arguments")
    for i, name in enumerate(fn.arg_names):
        if name in case.constexprs:
            signature[name], constexprs[name] = "constexpr", case.constexprs[name]
        elif name in case.types:
            ty = case.types[name]
            if isinstance(ty, str):
                signature[name] = ty
                if name in case.div16:
                    attrs[(i,)] = _DIVISIBILITY_16
            else:
                signature[name], constexprs[name] = "constexpr", ty
        else:
            raise ValueError(f"{case.fn}: the case gives no type or value for argument {name!r}")
    return signature, constexprs, attrs


def _compile_case_here(case: KernelCase, arch: int) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        module=case.module,
        kernel=case.fn,
        label=case.label,
        num_warps=case.num_warps,
        num_stages=case.num_stages,
        arch=arch,
        shared_limit=SHARED_LIMITS[arch],
        tensor_core_expected=(case.mma or _WIDE_MMA.get(arch, "HMMA")) if case.tensor_core else None,
    )
    try:
        signature, constexprs, attrs = case_signature(case)
        fn = getattr(importlib.import_module(case.module), case.fn)
        patterns = (*case.sass_expect, *case.sass_forbid)
        name = f"{case.fn}_sm{arch}"
        row.update(_compile_and_inspect(fn, signature, constexprs, attrs, case.num_warps, case.num_stages, arch, name, patterns))
    except Exception as e:  # recorded, never raised
        row.update(compiled=False, error=f"{type(e).__name__}: {e}"[:4000], ok=False)
        return row
    if not case.tensor_core:
        row["tensor_core_ok"] = True
    elif case.mma:
        row["tensor_core_ok"] = row["mma_counts"].get(case.mma, 0) > 0
    else:
        row["tensor_core_ok"] = row["tensor_core_instructions"] > 0
    matches = row.get("sass_matches", {})
    row["sass_missing"] = [p for p in case.sass_expect if not matches.get(p)]
    row["sass_forbidden"] = [p for p in case.sass_forbid if matches.get(p)]
    row["ok"] = row["shared_ok"] and row["tensor_core_ok"] and not row["spills"]
    row["ok"] = row["ok"] and not row["sass_missing"] and not row["sass_forbidden"]
    return row


def split_k_cases(arch: int) -> list[KernelCase]:
    """The split-K launches (``frozen_linear_triton.split_length``) on GPU class ``arch``: for each kernel,
    weight format and activations (bf16, fp32 with TF32, exact fp32), the configurations its autotuner keeps
    for M <= 16 with the partial-writing epilogue, and the kernel that adds the partials (bf16, fp16 and
    fp32 outputs, with and without a bias)."""
    cases = []
    for kernel, fmt, act_dtype in ((k, f, a) for k in KERNELS for f in FORMATS for a in ("bf16", "tf32", "fp32")):
        operands = ACT_OPERANDS[act_dtype]
        configs = _flt.pruned_configs(_flt.gpu_configs(), kernel, gpu_class(arch), fmt, 16, split=True, operands=operands)
        for config in configs:
            key = config_key(config)
            sig, constexprs, attrs = kernel_signature(kernel, fmt, act_dtype, key, split_k=True)
            names = list(sig)
            types = {n: t for n, t in sig.items() if t != "constexpr"}
            types.update({n: v for n, v in constexprs.items() if n.startswith("stride") and v == 1})
            consts = {n: v for n, v in constexprs.items() if n not in types}
            exact = act_dtype == "fp32"  # fp32 FMAs: no tensor-core MMA may appear
            cases.append(
                KernelCase(
                    module=_flt.__name__,
                    fn=kernel_fn(kernel).__name__,
                    types=types,
                    constexprs=consts,
                    div16=tuple(names[i] for (i,) in attrs),
                    num_warps=key[4],
                    num_stages=key[5],
                    label=f"{kernel} {fmt} {act_dtype} split-K {config_label(key)}",
                    tensor_core=not exact,
                    mma=expected_tensor_core(arch, key[0], act_dtype),
                    sass_forbid=_TENSOR_CORE_PATTERNS if exact else (),
                )
            )
    for out in ("bf16", "fp16", "fp32"):
        for bias in (False, True):
            cases.append(
                KernelCase(
                    module=_flt.__name__,
                    fn="_split_reduce_kernel",
                    types={"ws_ptr": "*fp32", "b_ptr": "*" + out, "y_ptr": "*" + out, "SIZE": "i32", "N": "i32", "SPLITS": "i32"},
                    constexprs=dict(HAS_BIAS=bias, INTERPRETER_BF16=False, BLOCK=_flt.REDUCE_BLOCK),
                    div16=("ws_ptr", "b_ptr", "y_ptr", "N"),
                    num_warps=4,
                    label=f"split-K reduce {out}" + (" +bias" if bias else ""),
                )
            )
    return cases


def compile_case(case: KernelCase, arch: int) -> dict[str, Any]:
    """Compile ``case`` for ``sm_<arch>`` and describe the cubin (keys as :func:`compile_report`;
    ``ok``: compiled, no spills, shared memory within the limit, tensor cores where asked).
    Cached per process; under ``TRITON_INTERPRET=1`` the compile runs in the worker process."""
    return _rows([_case_request(case, arch)])[0]


def case_problems(row: dict[str, Any]) -> list[str]:
    """Failed checks of one :func:`compile_case` row, in words (empty when it passes)."""
    return problems(row)


class _Worker:
    """A child process with the Triton interpreter off that compiles on request (JSON lines)."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from offsite_kernels.ops.aot import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        atexit.register(self.close)

    def request(self, request: list) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError, ValueError):
            line = ""
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"the AOT compile worker exited ({self.proc.poll()}):\n{self.log.read()[-4000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


_WORKERS: list[_Worker] = []  # started on first need, reused for the life of the process
_ROWS: dict[str, tuple[tuple[str, Any], ...]] = {}  # request (JSON) -> its report row: each variant compiles once


def _variant_request(kernel: str, fmt: str, act_dtype: str, config: triton.Config | tuple, arch: int) -> list:
    return [kernel, fmt, act_dtype, list(config_key(config)), arch]


def _case_request(case: KernelCase, arch: int) -> list:
    return [{"case": json.loads(case.to_json())}, arch]


def _compile_request(request: list) -> dict[str, Any]:
    """Compile one request in this process: a frozen-linear variant or a described :class:`KernelCase`."""
    if isinstance(request[0], dict):
        return _compile_case_here(KernelCase(**request[0]["case"]), request[1])
    kernel, fmt, act_dtype, key, arch = request
    return _compile_here(kernel, fmt, act_dtype, tuple(key), arch)


def _serve() -> None:
    """Worker loop: one JSON request per stdin line, one JSON row per line on the original stdout."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed (Triton prints the PTX when ptxas fails) goes to stderr
    sys.stdout = sys.stderr
    if not compiles_in_process():
        raise SystemExit("the AOT worker was started with the Triton interpreter on")
    for line in sys.stdin:
        out.write(json.dumps(_compile_request(json.loads(line))) + "\n")
        out.flush()


def default_workers() -> int:
    """The CPUs this process may run on: how many compiles :func:`prefetch` runs at once by default."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _rows(requests: list[list], workers: int = 1) -> list[dict[str, Any]]:
    """The report row of each request, compiling those not yet cached: in this process when it can compile
    and ``workers`` is 1, else over ``workers`` worker processes (at least one), each fed by its own thread.
    Every request's target (its last item) must be one of :data:`SHARED_LIMITS`."""
    for request in requests:
        if request[-1] not in SHARED_LIMITS:
            raise ValueError(f"arch must be one of {sorted(SHARED_LIMITS)}, got {request[-1]}")
    keys = [json.dumps(r, sort_keys=True) for r in requests]
    todo = list({k: r for k, r in zip(keys, requests, strict=True) if k not in _ROWS}.items())
    if todo and workers <= 1 and compiles_in_process():
        for key, request in todo:
            _ROWS[key] = tuple(_compile_request(request).items())
    elif todo:
        count = min(max(workers, 1), len(todo))
        while len(_WORKERS) < count:
            _WORKERS.append(_Worker())
        pending = iter(todo)
        lock = threading.Lock()

        def drain(worker: _Worker) -> None:
            while True:
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                _ROWS[item[0]] = tuple(worker.request(item[1]).items())

        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            for done in [pool.submit(drain, worker) for worker in _WORKERS[:count]]:
                done.result()  # a worker that died raises here, with its log
    return [dict(_ROWS[k]) for k in keys]


def prefetch(
    variants: Iterable[tuple[str, str, str, triton.Config | tuple, int]] = (),
    cases: Iterable[tuple[KernelCase, int]] = (),
    workers: int | None = None,
    share: str | os.PathLike[str] | None = None,
) -> None:
    """Compile many variants at once, ``workers`` at a time (default: :func:`default_workers`), into the
    per-process cache that :func:`compile_report` and :func:`compile_case` read.

    ``variants``: ``(kernel, fmt, act_dtype, config, arch)`` tuples as :func:`compile_report` takes them;
    ``cases``: ``(KernelCase, arch)`` pairs as :func:`compile_case` takes them. Failures are recorded in
    the rows, never raised (a worker process that dies raises ``RuntimeError`` with its log).

    ``share``: a JSON file of rows that processes asking for the same compiles share (pytest-xdist's
    workers, say). Under its lock (``<share>.lock``) the rows it holds are taken as compiled, the others
    compile here, and the file is rewritten atomically with every row this process has: each request
    compiles once across the processes, and a process that waits for the lock finds the rows there.
    """
    requests = [_variant_request(*v) for v in variants] + [_case_request(c, a) for c, a in cases]
    workers = default_workers() if workers is None else workers
    if share is None:
        _rows(requests, workers)
        return
    from filelock import FileLock

    path = Path(share)
    with FileLock(f"{path}.lock"):
        shared = json.loads(path.read_text()) if path.exists() else {}
        for key, row in shared.items():
            _ROWS.setdefault(key, tuple(row.items()))
        _rows(requests, workers)
        if _ROWS.keys() - shared.keys():
            from ..io import write_text_atomic

            write_text_atomic(path, json.dumps({key: dict(row) for key, row in _ROWS.items()}), overwrite=True)


def compile_report(kernel: str, fmt: str, act_dtype: str, config: triton.Config | tuple, arch: int) -> dict[str, Any]:
    """Compile one kernel variant for ``sm_<arch>`` and describe the cubin.

    ``kernel``: "fwd" or "bwd" (the forward runs with a bias); ``fmt``: dense, int8, int4 or
    fp8; ``act_dtype``: one of :data:`ACT_DTYPES` (bf16, fp16, fp32 with TF32 "tf32", exact fp32 "fp32");
    ``config``: a ``triton.Config`` from ``gpu_configs()`` (or its :func:`config_key` tuple); ``arch``: one of :data:`ARCHS`.

    Keys: ``compiled`` (else ``error`` holds the message), ``registers``, ``stack_bytes``,
    ``local_bytes``, ``spill_stores``/``spill_loads`` (STL/LDL instructions in the SASS),
    ``spills``, ``dynamic_shared_bytes`` (Triton's), ``static_shared_bytes`` (cuobjdump's),
    ``shared_bytes`` (their sum, checked against ``shared_limit``: ``shared_ok``),
    ``tensor_core`` / ``tensor_core_mnemonic`` (HGMMA or HMMA found), ``tensor_core_ok``
    (the architecture's own MMA found) and ``ok`` (all checks pass). Cached per process;
    under ``TRITON_INTERPRET=1`` the compile runs in a worker process (see :func:`compiles_in_process`).
    """
    return _rows([_variant_request(kernel, fmt, act_dtype, config, arch)])[0]


def full_report(archs: tuple[int, ...] = ARCHS, workers: int = 1) -> list[dict[str, Any]]:
    """:func:`compile_report` for both kernels x every format x every activation dtype x ``archs`` x every
    configuration the autotuner may pick for that kernel, format and dtype on that architecture's class,
    compiled ``workers`` at a time (:func:`prefetch`)."""
    variants = [
        (kernel, fmt, dtype, config_key(config), arch)
        for arch in archs
        for kernel in KERNELS
        for fmt in FORMATS
        for dtype in ACT_DTYPES
        for config in _flt.candidate_configs(kernel, fmt, gpu_class(arch), ACT_OPERANDS[dtype])
    ]
    prefetch(variants, workers=workers)
    return [compile_report(*variant) for variant in variants]


def problems(row: dict[str, Any]) -> list[str]:
    """Human-readable failed checks of one report row (empty when it passes)."""
    if not row["compiled"]:
        lines = [line.strip() for line in (row["error"] or "").splitlines() if line.strip()]
        return ["does not compile: " + (lines[-1] if lines else "unknown error")]
    out = []
    if row["spills"]:
        out.append(f"spills: stack {row['stack_bytes']} B, {row['spill_stores']} STL / {row['spill_loads']} LDL")
    if not row["shared_ok"]:
        out.append(f"shared {row['shared_bytes']} B > limit {row['shared_limit']} B")
    if not row["tensor_core_ok"] and row["tensor_core_expected"]:
        out.append(f"no {row['tensor_core_expected']} in SASS (found {row['tensor_core_mnemonic']})")
    elif not row["tensor_core_ok"]:
        out.append(f"tensor-core MMA ({row['tensor_core_mnemonic']}) in an exact-fp32 GEMM")
    out += [f"SASS lacks /{p}/" for p in row.get("sass_missing", [])]
    out += [f"SASS has /{p}/ ({row['sass_matches'][p]} times)" for p in row.get("sass_forbidden", [])]
    return out
