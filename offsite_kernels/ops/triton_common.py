"""Triton helpers shared by the kernels of every op."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """``v.to(dtype)`` with round-to-nearest-even. GPUs round so; Triton's CPU interpreter
    truncates fp32 to bf16, so there the rounding is done on the bits first (then exact)."""
    if INTERPRETER_BF16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)
