"""Frozen linear: ``y = x @ deq(W)^T + b``, differentiable in ``x`` only.

Layers of this file, from the bottom up: the pure-PyTorch reference (``frozen_linear_torch``),
backend dispatch to the Triton kernels or the native extension (``offsite_kernels.native``: tiled C++ on
the CPU, a skinny CUDA GEMM for M <= 16), two ``torch.library`` custom ops with fake (meta)
implementations (``offsite_kernels::frozen_linear`` and its input gradient
``offsite_kernels::frozen_linear_input_grad``) joined by ``register_autograd``, and the public
functional :func:`frozen_linear`.

An fp8 weight runs the fp8 tensor-core GEMM (activations quantized per row) on GPUs with fp8 tensor
cores and weight-only fp8 elsewhere: ``offsite_kernels/ops/fp8_linear.py`` decides, per device and dtype.

The autograd node saves the stored weight tensors only (never the activation), computes no
weight gradient and returns ``None`` for the weight and the bias: both are frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..backends import check_triton_device, gpu_runs_triton, requested_backend
from ..errors import OffsiteError
from ..quant.formats import dequantize_fields
from ..quant.weight import COMPUTE_DTYPES, QuantizedWeight
from .eager import EagerOp
from .fp8_linear import fp8_linear_bwd, fp8_linear_fwd, uses_fp8_gemm

_ACTIVATION_DTYPES = COMPUTE_DTYPES


class FrozenLinearInputError(OffsiteError, ValueError):
    """Inputs of a frozen linear that do not fit together."""


# --- reference --------------------------------------------------------------------------------
def _dense(data, scales, zeros, fmt, group_size, out_features, in_features, dtype):
    return dequantize_fields(fmt, data, scales, zeros, group_size, (out_features, in_features), dtype)


def frozen_linear_torch(x, data, scales, zeros, bias, fmt, group_size, out_features):
    """Reference forward in plain PyTorch (dequantize, then ``F.linear`` in ``x.dtype``)."""
    w = _dense(data, scales, zeros, fmt, group_size, out_features, x.shape[-1], x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def frozen_linear_input_grad_torch(grad_y, data, scales, zeros, fmt, group_size, in_features):
    """Reference input gradient: ``dX = dY @ deq(W)``."""
    w = _dense(data, scales, zeros, fmt, group_size, grad_y.shape[-1], in_features, grad_y.dtype)
    return grad_y @ w


# --- op boundary: fp8 weights cross as a uint8 view (bit-identical) ------------------------
def _to_op_storage(fmt: str, data: torch.Tensor) -> torch.Tensor:
    return data.view(torch.uint8) if fmt == "fp8" else data


def _from_op_storage(fmt: str, data: torch.Tensor) -> torch.Tensor:
    return data.view(torch.float8_e4m3fn) if fmt == "fp8" else data


# --- dispatch ---------------------------------------------------------------------------------
def _pick(t: torch.Tensor, fmt: str, direction: str) -> str:
    """The backend of one call: "triton", "native" or "torch".

    Forced (``OFFSITE_BACKEND``): that backend; "native" runs the C++ tiled kernels on the CPU for int8/int4/fp8
    weights, the CUDA skinny GEMM for an int8/int4 forward with M <= 16, and the reference elsewhere (a dense weight
    needs no dequantization; the extension has no general GPU GEMM). Default: the Triton kernels on a GPU, except
    the M buckets where ``offsite_kernels.native.dispatch`` (measured on a GPU, kept in the repo) picks another,
    and GPUs older than Ampere (the reference: ``backends.gpu_runs_triton``); on the CPU the native kernels for
    low-bit weights where the extension is built, else the reference.
    """
    forced = requested_backend()
    if forced == "triton":
        check_triton_device(t)
    if forced in ("triton", "torch"):
        return forced
    skinny = direction == "fwd" and fmt in ("int8", "int4")
    triton_ok = t.is_cuda and gpu_runs_triton(t.device)
    if triton_ok and forced is None and not skinny:
        return "triton"  # the common GPU case decides without the extension's import
    from .. import native

    m = t.numel() // max(t.shape[-1], 1)
    if not t.is_cuda:
        return "native" if fmt != "dense" and native.supports_device(t.device) else "torch"
    if forced == "native":
        return "native" if skinny and m <= 16 else "torch"
    if not triton_ok:
        return "torch"
    if skinny:
        from ..native.dispatch import choose

        return choose(fmt, m, native_ok=native.supports_device(t.device))
    return "triton"


# --- custom ops -------------------------------------------------------------------------------
def _unflatten_rows(y2: torch.Tensor, leading: tuple[int, ...]) -> torch.Tensor:
    """The ``(rows, n)`` result ``y2`` as ``(*leading, n)``, and not a view: autograd forbids an in-place op on a view
    made inside a custom op or ``autograd.Function``, and Hugging Face blocks add into a linear's output in place
    (Falcon's ``mlp_output += attention_output``). A contiguous result is aliased with its new shape, not copied."""
    shape = (*leading, y2.shape[-1])
    y = y2.reshape(shape)
    if not y._is_view():
        return y
    y2 = y2.contiguous()
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return y2.new_empty(0).set_(y2.untyped_storage(), y2.storage_offset(), shape, tuple(reversed(strides)))


def _frozen_linear_impl(
    x: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    backend = _pick(x, fmt, "fwd")
    fp8_gemm = fmt == "fp8" and uses_fp8_gemm(x)  # activations quantized too: the fp8 tensor-core path (ops/fp8_linear.py)
    if backend == "triton" and not fp8_gemm:
        from .frozen_linear_triton import frozen_linear_fwd

        return frozen_linear_fwd(x, data, scales, zeros, bias, fmt, group_size, out_features)  # any leading dimensions
    x2 = x.reshape(-1, x.shape[-1])
    if fp8_gemm:
        y = fp8_linear_fwd(x2, data, scales, bias, backend)
    elif backend == "native":
        from .. import native

        run = native.skinny_gemm if x.is_cuda else native.frozen_linear_fwd
        y = run(x2, data, scales, zeros, bias, fmt, group_size, out_features)
    else:
        y = frozen_linear_torch(x2, _from_op_storage(fmt, data), scales, zeros, bias, fmt, group_size, out_features)
    return _unflatten_rows(y, x.shape[:-1])


_frozen_linear_op = torch.library.custom_op("offsite_kernels::frozen_linear", _frozen_linear_impl, mutates_args=())


@_frozen_linear_op.register_fake
def _(x, data, scales, zeros, bias, fmt, group_size, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _frozen_linear_input_grad_impl(
    grad_y: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    fmt: str,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    backend = _pick(grad_y, fmt, "bwd")
    fp8_gemm = fmt == "fp8" and uses_fp8_gemm(grad_y)
    if backend == "triton" and not fp8_gemm:
        from .frozen_linear_triton import frozen_linear_bwd

        return frozen_linear_bwd(grad_y, data, scales, zeros, fmt, group_size, in_features)  # any leading dimensions
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    if fp8_gemm:
        dx = fp8_linear_bwd(g2, data, scales, backend)
    elif backend == "native":
        from .. import native

        dx = native.frozen_linear_bwd(g2, data, scales, zeros, fmt, group_size, in_features)
    else:
        dx = frozen_linear_input_grad_torch(g2, _from_op_storage(fmt, data), scales, zeros, fmt, group_size, in_features)
    return _unflatten_rows(dx, grad_y.shape[:-1])


_frozen_linear_input_grad_op = torch.library.custom_op(
    "offsite_kernels::frozen_linear_input_grad", _frozen_linear_input_grad_impl, mutates_args=()
)
_frozen_linear_input_grad = EagerOp(_frozen_linear_input_grad_op, _frozen_linear_input_grad_impl)


@_frozen_linear_input_grad_op.register_fake
def _(grad_y, data, scales, zeros, fmt, group_size, in_features):
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


def _setup_context(ctx, inputs, output):
    x, data, scales, zeros, _bias, fmt, group_size, _out = inputs
    ctx.save_for_backward(data, scales, zeros)  # the frozen weight only: no activation is saved
    ctx.fmt, ctx.group_size, ctx.in_features = fmt, group_size, x.shape[-1]


def _backward(ctx, grad_y):
    data, scales, zeros = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _frozen_linear_input_grad(grad_y, data, scales, zeros, ctx.fmt, ctx.group_size, ctx.in_features)
    return grad_x, None, None, None, None, None, None, None


_frozen_linear = EagerOp(_frozen_linear_op, _frozen_linear_impl, _setup_context, _backward)


# FLOP counts for torch.utils.flop_counter.FlopCounterMode (MFU in the benchmarks): one GEMM each
@register_flop_formula(torch.ops.offsite_kernels.frozen_linear)
def _frozen_linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * out_shape[-1]


@register_flop_formula(torch.ops.offsite_kernels.frozen_linear_input_grad)
def _frozen_linear_input_grad_flops(grad_y_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(grad_y_shape) * out_shape[-1]


# --- public functional ------------------------------------------------------------------------
def as_quantized(weight: torch.Tensor | QuantizedWeight) -> QuantizedWeight:
    """A dense tensor becomes a ``"dense"`` :class:`QuantizedWeight`; a quantized one passes through."""
    if isinstance(weight, QuantizedWeight):
        return weight
    if isinstance(weight, torch.Tensor):
        if weight.requires_grad:
            raise FrozenLinearInputError(
                "frozen_linear's weight requires grad, but a frozen linear computes no weight gradient; "
                "call weight.requires_grad_(False) (or use torch.nn.functional.linear for a trainable weight)"
            )
        if weight.dim() != 2 or not weight.is_floating_point():
            raise FrozenLinearInputError(
                f"a dense weight must be a 2-D floating-point tensor, got {weight.dtype} {tuple(weight.shape)}"
            )
        # wrapped as is: no per-call scan of the weight (quantize_weight checks values once, up front)
        return QuantizedWeight("dense", weight.contiguous(), None, None, 0, (weight.shape[0], weight.shape[1]), weight.dtype)
    raise FrozenLinearInputError(f"weight must be a tensor or a QuantizedWeight, got {type(weight).__name__}")


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu")


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype where autocast is on for its device, as ``nn.Linear`` runs there: the GEMM then
    runs in bf16/fp16 (tensor cores) and returns that dtype; its backward casts the gradient back to ``x``'s dtype."""
    if not isinstance(x, torch.Tensor) or x.device.type not in _AUTOCAST_DEVICES or not x.is_floating_point():
        return x
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        compute = torch.get_autocast_dtype(kind)
        if compute in _ACTIVATION_DTYPES and x.dtype != compute and x.dtype in _ACTIVATION_DTYPES:
            return x.to(compute)
    return x


def _check_inputs(
    x: torch.Tensor, weight_device: torch.device, out_features: int, in_features: int, bias: torch.Tensor | None
) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _ACTIVATION_DTYPES:
        raise FrozenLinearInputError(f"x must be a float32, float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise FrozenLinearInputError(
            f"x has {x.shape[-1] if x.dim() else 'no'} features in its last dimension (shape {tuple(x.shape)}), "
            f"the weight expects in_features={in_features} (weight shape {(out_features, in_features)})"
        )
    if x.device != weight_device:
        raise FrozenLinearInputError(f"x is on {x.device} but the weight is on {weight_device}; move one of them (.to(device))")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise FrozenLinearInputError(
                f"bias must be a floating-point tensor, got {getattr(bias, 'dtype', type(bias).__name__)}"
            )
        if bias.dim() != 1 or bias.shape[0] != out_features:
            raise FrozenLinearInputError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise FrozenLinearInputError(f"bias is on {bias.device} but x is on {x.device}")
        if bias.requires_grad:
            raise FrozenLinearInputError(
                "frozen_linear's bias requires grad; a frozen linear's bias is frozen (requires_grad_(False))"
            )


def frozen_linear_from_fields(
    x: torch.Tensor,
    weight_shape: tuple[int, int],
    fmt: str,
    stored: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`frozen_linear` on the fields of a :class:`QuantizedWeight` as ``nn.FrozenLinear`` holds them:
    ``(out_features, in_features)``, the format, the stored ``(data, scales, zeros)`` and the group size
    (no weight object built per call)."""
    data, scales, zeros = stored
    x = _autocast_input(x)
    if fmt == "dense" and data.dtype not in _ACTIVATION_DTYPES:
        raise FrozenLinearInputError(
            f"a dense weight must be float32, float16 or bfloat16, got {data.dtype}"
            + (
                "; store an fp8 weight with quantize_weight(w, bits='fp8') (it carries the scales)"
                if data.element_size() == 1
                else ""
            )
        )
    _check_inputs(x, data.device, weight_shape[0], weight_shape[1], bias)
    return _frozen_linear(x, _to_op_storage(fmt, data), scales, zeros, bias, fmt, group_size, weight_shape[0])


def frozen_linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + b`` for a frozen ``W`` (dense or quantized), differentiable in ``x`` only.

    ``x`` has any leading dimensions and ``in_features`` last; the output has ``x``'s dtype.
    On a GPU the Triton kernels run (dequantization fused into the GEMM); elsewhere the
    PyTorch reference, unless ``OFFSITE_BACKEND`` forces a backend.
    """
    qw = as_quantized(weight)
    return frozen_linear_from_fields(x, qw.shape, qw.format, (qw.data, qw.scales, qw.zeros), qw.group_size, bias)
