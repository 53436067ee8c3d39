"""Triton kernel of the chunked linear + cross-entropy: per-row loss and, in place, ``dLoss/dLogits``.

One program per row of a chunk of logits ``[rows, V]`` (the hidden dtype, as the head's
matmul wrote it). In fp32 it runs an online softmax over the vocabulary in ``BLOCK_V`` blocks
(running max and rescaled sum of exponentials), takes ``lse - logit[target]`` as the row's
loss, and, when asked, makes a second pass that overwrites the logits with the gradient of the
reduced loss: ``(softmax - onehot(target)) * scale`` (``scale`` is 1 for a sum, ``1/n_valid``
for a mean, read from device memory so that no host sync is needed), rounded to the buffer's
dtype. Rows whose label is ``ignore_index`` get loss 0 and gradient 0; a label outside
``[0, V)`` (and not ``ignore_index``) gives a NaN loss and a NaN gradient row rather than a
read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreter_enabled
from .triton_common import _cast
from .triton_launch import on_input_device


@triton.jit
def _cross_entropy_fwd_bwd_kernel(
    logits_ptr, labels_ptr, loss_ptr, scale_ptr,
    n_cols, stride_row, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
):  # fmt: skip
    """Row ``r``: ``loss[r] = logsumexp(x) - x[label]`` (fp32); if ``COMPUTE_GRAD``, ``x <- (softmax(x) - onehot) * scale``."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < n_cols)
    cols = tl.arange(0, BLOCK_V)

    m = float("-inf")  # running max
    d = 0.0  # running sum of exp(x - m)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    target = tl.load(row_ptr + label, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = tl.where(valid, tl.where(in_range, lse - target, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr)
        row_scale = tl.where(valid, tl.where(in_range, scale, float("nan")), 0.0)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * row_scale
            g = tl.where(offs == label, g - row_scale, g)
            g = tl.where(valid, g, 0.0)  # exact zeros on ignored rows, whatever their logits
            tl.store(row_ptr + offs, _cast(g, logits_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


# --- launch configuration ------------------------------------------------------------------
# (BLOCK_V, num_warps): the smallest block holding the whole row up to 4096 columns, then
# 4096-column blocks (16 fp32 values per thread at 8 warps: no spills on sm_80/sm_90, checked
# ahead of time by tests/test_fused_head.py).
BLOCK_CONFIGS = ((256, 4), (1024, 4), (4096, 8))


def block_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``n_cols`` logits."""
    for block, warps in BLOCK_CONFIGS:
        if n_cols <= block:
            return block, warps
    return BLOCK_CONFIGS[-1]


@on_input_device
def cross_entropy_fwd_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    compute_grad: bool,
) -> None:
    """Launch the kernel on ``logits [rows, V]`` (unit column stride; overwritten with the
    gradient when ``compute_grad``), ``labels [rows]`` int64, into ``loss [rows]`` fp32;
    ``scale`` is a one-element fp32 tensor on the same device."""
    rows, n_cols = logits.shape
    if logits.stride(1) != 1 or labels.dtype != torch.int64 or loss.dtype != torch.float32 or scale.dtype != torch.float32:
        raise ValueError("cross_entropy_fwd_bwd needs unit-stride logits rows, int64 labels, fp32 loss and fp32 scale")
    if rows == 0:
        return
    block, warps = block_config(n_cols)
    interpreter_bf16 = logits.dtype == torch.bfloat16 and triton_interpreter_enabled()
    _cross_entropy_fwd_bwd_kernel[(rows,)](
        logits, labels.contiguous(), loss, scale,
        n_cols, logits.stride(0), ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK_V=block, INTERPRETER_BF16=interpreter_bf16, num_warps=warps,
    )  # fmt: skip


def aot_cases() -> list:
    """Every configuration the launcher can pick: each block size x logits dtype x gradient on/off,
    with a vocabulary of any size; and, for the half-precision training path, a vocabulary that
    is a multiple of 16 (the JIT then marks ``n_cols`` and ``stride_row`` divisible by 16)."""
    from .aot import KernelCase

    types = {
        "logits_ptr": "",
        "labels_ptr": "*i64",
        "loss_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "n_cols": "i32",
        "stride_row": "i32",
        "ignore_index": "i32",
    }
    pointers = ("logits_ptr", "labels_ptr", "loss_ptr", "scale_ptr")
    variants = [(dtype, grad, ()) for dtype in ("bf16", "fp16", "fp32") for grad in (True, False)]
    variants += [(dtype, True, ("n_cols", "stride_row")) for dtype in ("bf16", "fp16")]
    cases = []
    for dtype, grad, aligned in variants:
        for block, warps in BLOCK_CONFIGS:
            cases.append(
                KernelCase(
                    module=__name__,
                    fn="_cross_entropy_fwd_bwd_kernel",
                    types={**types, "logits_ptr": "*" + dtype},
                    constexprs={"COMPUTE_GRAD": grad, "BLOCK_V": block, "INTERPRETER_BF16": False},
                    div16=pointers + aligned,
                    num_warps=warps,
                    num_stages=1,
                    label=f"ce {dtype} BLOCK_V={block} grad={grad}{' V%16=0' if aligned else ''}",
                )
            )
    return cases
