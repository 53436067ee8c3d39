"""Grouped frozen linear: a mixture of experts' projection, ``y[rows of e] = x[rows of e] @ deq(W_e)^T``,
differentiable in ``x`` only.

``x [R, K]`` holds rows sorted by expert, ``offsets`` (``[E + 1]``, from 0, non-decreasing) where each expert's
rows start and end, and the weight is the experts' ``[N, K]`` weights stacked into one ``[E * N, K]`` frozen
weight of any format of the frozen linear (``quantize_weight`` of the stacked matrix: its per-row scales and
groups make it each expert's own quantization). Rows after ``offsets[E]`` (routed to no expert) come out zero,
and so do their gradients.

Layers: dispatch (the Triton kernels of ``grouped_linear_triton.py`` on a GPU for bf16/fp16 activations, with no
host synchronisation; else expert by expert through the frozen linear's own dispatch, which reads the offsets on the
host: its PyTorch reference with ``OFFSITE_BACKEND=torch``, the native kernels on a CPU where built), the custom ops
``offsite_kernels::grouped_frozen_linear`` and ``offsite_kernels::grouped_frozen_linear_input_grad`` with fake
implementations and autograd (saving the offsets and the stored weight, never the activation), and the
functional :func:`grouped_frozen_linear`.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from ..backends import check_triton_device, gpu_runs_triton, requested_backend
from ..quant.weight import QuantizedWeight
from .eager import EagerOp
from .frozen_linear import (
    _ACTIVATION_DTYPES,
    FrozenLinearInputError,
    _autocast_input,
    _frozen_linear_impl,
    _frozen_linear_input_grad_impl,
    _to_op_storage,
    as_quantized,
)

_GROUPED_DTYPES = (torch.bfloat16, torch.float16)  # the Triton kernels' activations; fp32 runs expert by expert


def _expert_fields(data, scales, zeros, expert: int, rows: int) -> tuple:
    """The stored fields of expert ``expert``: its ``rows`` rows of the stacked weight (views)."""
    lo, hi = expert * rows, (expert + 1) * rows
    return data[lo:hi], None if scales is None else scales[lo:hi], None if zeros is None else zeros[lo:hi]


def _spans(offsets: torch.Tensor, experts: int) -> list[tuple[int, int, int]]:
    """``(expert, first row, end row)`` of each expert with rows (one host synchronisation)."""
    bounds = offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(experts) if bounds[e + 1] > bounds[e]]


# --- dispatch ---------------------------------------------------------------------------------
def _runs_grouped_kernels(t: torch.Tensor) -> bool:
    """Whether one grouped Triton launch serves ``t``: forced by ``OFFSITE_BACKEND=triton``, or by default on a GPU that
    runs Triton for bf16/fp16 activations. Otherwise one frozen linear per expert, through its own backend choice
    (the PyTorch reference when forced, the native kernels on a CPU)."""
    forced = requested_backend()
    if forced == "triton":
        check_triton_device(t)
        return True
    return forced is None and t.is_cuda and t.dtype in _GROUPED_DTYPES and gpu_runs_triton(t.device)


def _grouped_impl(
    x: torch.Tensor,
    offsets: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    fmt: str,
    group_size: int,
    experts: int,
    out_features: int,
) -> torch.Tensor:
    if _runs_grouped_kernels(x):
        from .grouped_linear_triton import grouped_linear_fwd

        return grouped_linear_fwd(x, offsets, data, scales, zeros, fmt, group_size, experts, out_features)
    y = x.new_zeros((x.shape[0], out_features))
    for e, lo, hi in _spans(offsets, experts):
        fields = _expert_fields(data, scales, zeros, e, out_features)
        y[lo:hi] = _frozen_linear_impl(x[lo:hi], *fields, None, fmt, group_size, out_features)
    return y


_grouped_op = torch.library.custom_op("offsite_kernels::grouped_frozen_linear", _grouped_impl, mutates_args=())


@_grouped_op.register_fake
def _(x, offsets, data, scales, zeros, fmt, group_size, experts, out_features):
    return x.new_empty((x.shape[0], out_features))


def _grouped_input_grad_impl(
    grad_y: torch.Tensor,
    offsets: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    fmt: str,
    group_size: int,
    experts: int,
    in_features: int,
) -> torch.Tensor:
    if _runs_grouped_kernels(grad_y):
        from .grouped_linear_triton import grouped_linear_bwd

        return grouped_linear_bwd(grad_y, offsets, data, scales, zeros, fmt, group_size, experts, in_features)
    dx = grad_y.new_zeros((grad_y.shape[0], in_features))
    for e, lo, hi in _spans(offsets, experts):
        fields = _expert_fields(data, scales, zeros, e, grad_y.shape[1])
        dx[lo:hi] = _frozen_linear_input_grad_impl(grad_y[lo:hi], *fields, fmt, group_size, in_features)
    return dx


_grouped_input_grad_op = torch.library.custom_op(
    "offsite_kernels::grouped_frozen_linear_input_grad", _grouped_input_grad_impl, mutates_args=()
)
_grouped_input_grad = EagerOp(_grouped_input_grad_op, _grouped_input_grad_impl)


@_grouped_input_grad_op.register_fake
def _(grad_y, offsets, data, scales, zeros, fmt, group_size, experts, in_features):
    return grad_y.new_empty((grad_y.shape[0], in_features))


def _setup_context(ctx, inputs, output):
    x, offsets, data, scales, zeros, fmt, group_size, experts, _out = inputs
    ctx.save_for_backward(offsets, data, scales, zeros)  # the routing and the frozen weight: no activation
    ctx.fmt, ctx.group_size, ctx.experts, ctx.in_features = fmt, group_size, experts, x.shape[-1]


def _backward(ctx, grad_y):
    offsets, data, scales, zeros = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _grouped_input_grad(
            grad_y.contiguous(), offsets, data, scales, zeros, ctx.fmt, ctx.group_size, ctx.experts, ctx.in_features
        )
    return grad_x, None, None, None, None, None, None, None, None


_grouped = EagerOp(_grouped_op, _grouped_impl, _setup_context, _backward)


@register_flop_formula(torch.ops.offsite_kernels.grouped_frozen_linear)
def _grouped_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * out_shape[-1]  # every row counted (rows routed to no expert cost none)


@register_flop_formula(torch.ops.offsite_kernels.grouped_frozen_linear_input_grad)
def _grouped_input_grad_flops(grad_y_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(grad_y_shape) * out_shape[-1]


# --- public functional ------------------------------------------------------------------------
def _check_offsets(offsets: torch.Tensor, experts: int, device: torch.device) -> torch.Tensor:
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.shape[0] != experts + 1:
        shape = tuple(offsets.shape) if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise FrozenLinearInputError(
            f"offsets must be a 1-D tensor of experts + 1 = {experts + 1} row boundaries (from 0, non-decreasing), got {shape}"
        )
    if offsets.dtype not in (torch.int32, torch.int64):
        raise FrozenLinearInputError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.device != device:
        raise FrozenLinearInputError(f"offsets are on {offsets.device} but x is on {device}; move them (.to(device))")
    return offsets.to(torch.int32).contiguous()  # the kernels read E + 1 consecutive int32


def grouped_frozen_linear_from_fields(
    x: torch.Tensor,
    offsets: torch.Tensor,
    experts: int,
    weight_shape: tuple[int, int],
    fmt: str,
    stored: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    group_size: int,
) -> torch.Tensor:
    """:func:`grouped_frozen_linear` on the stored fields of the stacked ``[E * N, K]`` weight (as a
    :class:`~offsite_kernels.nn.FrozenLinear` holds them; no weight object built per call)."""
    data, scales, zeros = stored
    x = _autocast_input(x)
    rows, in_features = weight_shape
    if not isinstance(experts, int) or experts < 1 or rows % experts:
        raise FrozenLinearInputError(
            f"a stacked weight of {rows} rows does not split into {experts} experts; stack E weights of [N, K] into [E * N, K]"
        )
    if not isinstance(x, torch.Tensor) or x.dtype not in _ACTIVATION_DTYPES or x.dim() != 2:
        raise FrozenLinearInputError(
            f"x must be a 2-D float32, float16 or bfloat16 tensor [rows, in_features], got "
            f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[1] != in_features:
        raise FrozenLinearInputError(f"x has {x.shape[1]} features, the experts' weights expect {in_features}")
    if x.device != data.device:
        raise FrozenLinearInputError(f"x is on {x.device} but the weight is on {data.device}; move one of them (.to(device))")
    offsets = _check_offsets(offsets, experts, x.device)
    return _grouped(x, offsets, _to_op_storage(fmt, data), scales, zeros, fmt, group_size, experts, rows // experts)


def grouped_frozen_linear(
    x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor | QuantizedWeight, experts: int
) -> torch.Tensor:
    """Each expert's rows of ``x [R, K]`` through its frozen weight: ``y[offsets[e]:offsets[e + 1]] =
    x[offsets[e]:offsets[e + 1]] @ W_e^T``, with ``weight`` the ``experts`` weights ``[N, K]`` stacked into
    ``[E * N, K]`` (dense or quantized; ``quantize_weight`` of the stacked matrix), ``offsets`` ``[E + 1]``
    row boundaries (int32/int64, from 0, non-decreasing). Rows after ``offsets[E]`` come out zero. Differentiable in
    ``x`` only; on a GPU one Triton launch each way for bf16/fp16 activations, with no host synchronisation."""
    qw = as_quantized(weight)
    return grouped_frozen_linear_from_fields(
        x, offsets, experts, qw.shape, qw.format, (qw.data, qw.scales, qw.zeros), qw.group_size
    )
