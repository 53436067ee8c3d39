"""Triton helpers shared by the kernels of every op."""

from __future__ import annotations

import functools
import re

import triton
import triton.language as tl

# shared memory one block may use (opt-in): Hopper-class GPUs, A100s, and sm_86/sm_89 cards (RTX 3090/4090, A10,
# L4, L40S); what each class's tile lists are checked against ahead of time (ops/aot.py)
HOPPER_SHARED_BYTES = 227 * 1024
A100_SHARED_BYTES = 163 * 1024
SMALL_SHARED_BYTES = 99 * 1024


@functools.cache
def triton_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed Triton, for the few code-generation differences that have no feature to test."""
    major, minor = (int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    return major, minor


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """``v.to(dtype)`` with round-to-nearest-even. GPUs round so; Triton's CPU interpreter
    truncates fp32 to bf16, so there the rounding is done on the bits first (then exact)."""
    if INTERPRETER_BF16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` over a ``num_m x num_n`` grid of output tiles, ordered in
    groups of ``GROUP_M`` rows so that neighbouring programs share the column operand's tiles in L2."""
    group_id = pid // (GROUP_M * num_n)
    first_m = group_id * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    return pid_m, pid_n
