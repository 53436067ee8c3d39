"""Frozen norms: RMSNorm and LayerNorm, optionally fused with the residual add, differentiable in the input only.

Math (row-wise over the last dimension, statistics in fp32 for fp32/fp16/bf16 inputs, fp64 for
float64; outputs in the input's dtype)::

    RMSNorm    y = x * rstd * (w + weight_offset),    rstd = rsqrt(mean(x^2) + eps)
    LayerNorm  y = (x - mean) * rstd * w + b,          rstd = rsqrt(var + eps)   (biased variance)

``w`` (and ``b``) are frozen: they never receive a gradient, and no ``dw``/``db`` reduction is
computed. ``weight=None`` means ``w = 1`` (and ``bias=None`` means ``b = 0``).

Fused residual: given ``residual``, ``h = x + residual`` (rounded to x's dtype: the new residual
stream) is normalised instead of ``x`` and returned beside ``y``; one kernel writes both. Its
input gradient is ``dx = dresidual = dnorm(dy) + dh``.

Input gradient, ``g = dy * w``, ``xhat`` the normalised row::

    RMSNorm    dx = rstd * (g - xhat * mean(g * xhat))
    LayerNorm  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))

Autograd saves the minimum: the input (or ``h``), the per-row ``rstd`` (and ``mean``) in fp32,
and the frozen weight.

Layers of this file, from the bottom up, as in ``frozen_linear.py``: the PyTorch reference
(``rms_norm_torch``, ``layer_norm_torch`` and their input gradients), backend dispatch to the
Triton kernels (``norm_triton.py``), the custom ops ``offsite_kernels::rms_norm`` /
``offsite_kernels::layer_norm`` and their input-gradient ops
(``offsite_kernels::rms_norm_input_grad`` / ``offsite_kernels::layer_norm_input_grad``) with fake
impls, joined by ``register_autograd``, and the public functionals :func:`rms_norm` and
:func:`layer_norm`.

``round_normalized`` (RMSNorm only) reproduces Hugging Face Llama's rounding point: ``x * rstd``
is rounded to x's dtype before it is multiplied by the weight (``weight * hidden.to(input_dtype)``),
and the product rounded again; without it there is a single rounding at the end (as Gemma, and
as LayerNorm). The backward treats that rounding as the identity, as autograd does for a cast.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from ..backends import requested_backend, use_triton
from ..errors import OffsiteError
from .eager import EagerOp

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class NormInputError(OffsiteError, ValueError):
    """Inputs of a frozen norm that do not fit together."""


# --- reference --------------------------------------------------------------------------------
def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _residual_add(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``x + residual`` computed in the statistics dtype and rounded once to x's dtype."""
    if residual is None:
        return x
    acc = _stats_dtype(x.dtype)
    return (x.to(acc) + residual.to(acc)).to(x.dtype)


def rms_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    round_normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Reference RMSNorm forward in plain PyTorch: ``(y, h, rstd)``; ``h`` is None without a residual.

    ``y`` and ``h`` are contiguous, in x's dtype; ``rstd`` has shape ``x.shape[:-1]``, fp32 (fp64
    for float64 ``x``)."""
    acc = _stats_dtype(x.dtype)
    h = _residual_add(x, residual)
    v = h.to(acc)
    rstd = torch.rsqrt(v.square().mean(-1) + eps)
    xhat = v * rstd.unsqueeze(-1)
    if round_normalized:
        xhat = xhat.to(x.dtype).to(acc)
    if weight is not None:
        xhat = xhat * (weight.to(acc) + weight_offset)
    return xhat.to(x.dtype).contiguous(), None if residual is None else h.contiguous(), rstd.contiguous()


def rms_norm_input_grad_torch(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    grad_h: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor:
    """Reference RMSNorm input gradient from the saved input (or ``h``) and ``rstd`` (plus ``grad_h``)."""
    acc = _stats_dtype(x.dtype)
    r = rstd.to(acc).unsqueeze(-1)
    xhat = x.to(acc) * r
    g = grad_y.to(acc)
    if weight is not None:
        g = g * (weight.to(acc) + weight_offset)
    dx = (g - xhat * (g * xhat).mean(-1, keepdim=True)) * r
    if grad_h is not None:
        dx = dx + grad_h.to(acc)
    return dx.to(x.dtype).contiguous()


def layer_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Reference LayerNorm forward in plain PyTorch: ``(y, h, mean, rstd)`` (see :func:`rms_norm_torch`)."""
    acc = _stats_dtype(x.dtype)
    h = _residual_add(x, residual)
    v = h.to(acc)
    mean = v.mean(-1)
    d = v - mean.unsqueeze(-1)
    rstd = torch.rsqrt(d.square().mean(-1) + eps)
    y = d * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).contiguous(), None if residual is None else h.contiguous(), mean.contiguous(), rstd.contiguous()


def layer_norm_input_grad_torch(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grad_h: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference LayerNorm input gradient from the saved input (or ``h``), ``mean`` and ``rstd`` (plus ``grad_h``)."""
    acc = _stats_dtype(x.dtype)
    r = rstd.to(acc).unsqueeze(-1)
    xhat = (x.to(acc) - mean.to(acc).unsqueeze(-1)) * r
    g = grad_y.to(acc)
    if weight is not None:
        g = g * weight.to(acc)
    dx = (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) * r
    if grad_h is not None:
        dx = dx + grad_h.to(acc)
    return dx.to(x.dtype).contiguous()


# --- dispatch ---------------------------------------------------------------------------------
def _use_triton(t: torch.Tensor) -> bool:
    """Forced by ``OFFSITE_BACKEND``, else on a CUDA tensor (:func:`use_triton`) whose rows fit one tile
    (longer rows: the reference). A forced Triton backend with too long rows fails in the launcher."""
    if not use_triton(t):  # first: the common CPU case imports no Triton module
        return False
    from .norm_triton import MAX_N

    return t.shape[-1] <= MAX_N or requested_backend() == "triton"


def _no_residual_output(x: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: an empty tensor stands for "no h" (never saved, never read)
    return x.new_empty((0,))


# --- custom ops -------------------------------------------------------------------------------
def _rms_norm_impl(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    weight_offset: float,
    round_normalized: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        from .norm_triton import rms_norm_fwd

        y, h, rstd = rms_norm_fwd(x, weight, residual, eps, weight_offset, round_normalized)
    else:
        y, h, rstd = rms_norm_torch(x, weight, residual, eps, weight_offset, round_normalized)
    return y, _no_residual_output(x) if h is None else h, rstd


_rms_norm_op = torch.library.custom_op("offsite_kernels::rms_norm", _rms_norm_impl, mutates_args=())


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, weight_offset, round_normalized):
    h = x.new_empty(x.shape) if residual is not None else _no_residual_output(x)
    return x.new_empty(x.shape), h, x.new_empty(x.shape[:-1], dtype=_stats_dtype(x.dtype))


def _rms_norm_input_grad_impl(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    grad_h: torch.Tensor | None,
    weight_offset: float,
) -> torch.Tensor:
    if _use_triton(x):
        from .norm_triton import rms_norm_bwd

        return rms_norm_bwd(grad_y, x, weight, rstd, grad_h, weight_offset)
    return rms_norm_input_grad_torch(grad_y, x, weight, rstd, grad_h, weight_offset)


_rms_norm_input_grad_op = torch.library.custom_op(
    "offsite_kernels::rms_norm_input_grad", _rms_norm_input_grad_impl, mutates_args=()
)
_rms_norm_input_grad = EagerOp(_rms_norm_input_grad_op, _rms_norm_input_grad_impl)


@_rms_norm_input_grad_op.register_fake
def _(grad_y, x, weight, rstd, grad_h, weight_offset):
    return x.new_empty(x.shape)


def _layer_norm_impl(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        from .norm_triton import layer_norm_fwd

        y, h, mean, rstd = layer_norm_fwd(x, weight, bias, residual, eps)
    else:
        y, h, mean, rstd = layer_norm_torch(x, weight, bias, residual, eps)
    return y, _no_residual_output(x) if h is None else h, mean, rstd


_layer_norm_op = torch.library.custom_op("offsite_kernels::layer_norm", _layer_norm_impl, mutates_args=())


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, eps):
    h = x.new_empty(x.shape) if residual is not None else _no_residual_output(x)
    stats = _stats_dtype(x.dtype)
    return x.new_empty(x.shape), h, x.new_empty(x.shape[:-1], dtype=stats), x.new_empty(x.shape[:-1], dtype=stats)


def _layer_norm_input_grad_impl(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grad_h: torch.Tensor | None,
) -> torch.Tensor:
    if _use_triton(x):
        from .norm_triton import layer_norm_bwd

        return layer_norm_bwd(grad_y, x, weight, mean, rstd, grad_h)
    return layer_norm_input_grad_torch(grad_y, x, weight, mean, rstd, grad_h)


_layer_norm_input_grad_op = torch.library.custom_op(
    "offsite_kernels::layer_norm_input_grad", _layer_norm_input_grad_impl, mutates_args=()
)
_layer_norm_input_grad = EagerOp(_layer_norm_input_grad_op, _layer_norm_input_grad_impl)


@_layer_norm_input_grad_op.register_fake
def _(grad_y, x, weight, mean, rstd, grad_h):
    return x.new_empty(x.shape)


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _rms_setup_context(ctx, inputs, output):
    x, weight, residual, _eps, weight_offset, _round = inputs
    _y, h, rstd = output
    ctx.has_residual = residual is not None
    # the minimum: the normalised tensor (x, or h when fused), the row rstd, the frozen weight
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)
    ctx.weight_offset = weight_offset
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # no zeros made for unused outputs: the backward takes None


def _rms_backward(ctx, grad_y, grad_h, _grad_rstd):
    src, weight, rstd = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        grad_h = grad_h if ctx.has_residual else None
        dx = _rms_norm_input_grad(_grad_or_zeros(grad_y, src), src, weight, rstd, grad_h, ctx.weight_offset)
    return (
        dx if ctx.needs_input_grad[0] else None,
        None,  # the weight is frozen
        dx if ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
    )


_rms_norm = EagerOp(_rms_norm_op, _rms_norm_impl, _rms_setup_context, _rms_backward)


def _ln_setup_context(ctx, inputs, output):
    x, weight, _bias, residual, _eps = inputs
    _y, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)  # the bias is not needed
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zeros made for unused outputs: the backward takes None


def _ln_backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
    src, weight, mean, rstd = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
        grad_h = grad_h if ctx.has_residual else None
        dx = _layer_norm_input_grad(_grad_or_zeros(grad_y, src), src, weight, mean, rstd, grad_h)
    return (
        dx if ctx.needs_input_grad[0] else None,
        None,  # weight and bias are frozen
        None,
        dx if ctx.needs_input_grad[3] else None,
        None,
    )


_layer_norm = EagerOp(_layer_norm_op, _layer_norm_impl, _ln_setup_context, _ln_backward)


# --- input checks -----------------------------------------------------------------------------
def _check_x(x: torch.Tensor, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise NormInputError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise NormInputError(f"{op}: x must be a float32, float16, bfloat16 or float64 tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise NormInputError(f"{op}: x needs a non-empty last dimension to normalise, got shape {tuple(x.shape)}")


def _check_frozen(t: torch.Tensor | None, name: str, x: torch.Tensor, op: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise NormInputError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise NormInputError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != x.shape[-1]:  # (a Size-to-tuple comparison costs more)
        raise NormInputError(
            f"{op}: {name} must have shape ({x.shape[-1]},) to match x's last dimension (x shape {tuple(x.shape)}), "
            f"got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise NormInputError(f"{op}: x is on {x.device} but {name} is on {t.device}; move one of them (.to(device))")
    if t.requires_grad:
        raise NormInputError(
            f"{op}: {name} requires grad, but a frozen norm computes no {name} gradient; "
            f"call {name}.requires_grad_(False) (or use torch.nn.functional for a trainable norm)"
        )


def _check_residual(residual: torch.Tensor | None, x: torch.Tensor, op: str) -> None:
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise NormInputError(f"{op}: residual must be a tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise NormInputError(f"{op}: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}; they must match")
    if residual.dtype != x.dtype:
        raise NormInputError(
            f"{op}: residual is {residual.dtype} but x is {x.dtype}; h = x + residual is stored in x's dtype, "
            "cast the residual (residual.to(x.dtype))"
        )
    if residual.device != x.device:
        raise NormInputError(f"{op}: x is on {x.device} but residual is on {residual.device}; move one of them (.to(device))")


def _check_number(value: object, name: str, op: str, positive: bool) -> float:
    # a float skips the (slower) abstract-base-class check
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, Real)):
        raise NormInputError(f"{op}: {name} must be a finite real number, got {value!r}")
    if not math.isfinite(float(value)):
        raise NormInputError(f"{op}: {name} must be a finite real number, got {value!r}")
    if positive and float(value) <= 0:
        raise NormInputError(f"{op}: {name} must be > 0 (it keeps rsqrt finite on a zero row), got {value!r}")
    return float(value)


# --- public functionals -----------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    weight_offset: float = 0.0,
    round_normalized: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Frozen RMSNorm over the last dimension: ``x * rsqrt(mean(x^2) + eps) * (weight + weight_offset)``.

    ``weight`` (``[N]``, any float dtype, frozen; None = no scale) never gets a gradient.
    ``weight_offset=1.0`` gives Gemma's ``(1 + w)``. ``round_normalized=True`` rounds ``x * rstd``
    to x's dtype before the weight multiply, as Hugging Face's ``LlamaRMSNorm`` does.
    With ``residual`` (x's shape and dtype): returns ``(y, h)`` with ``h = x + residual`` (the new
    residual stream) and ``y = rms_norm(h)``; otherwise ``y``. Statistics in fp32, outputs in x's dtype.
    """
    op = "rms_norm"
    _check_x(x, op)
    _check_frozen(weight, "weight", x, op)
    _check_residual(residual, x, op)
    eps = _check_number(eps, "eps", op, positive=True)
    weight_offset = _check_number(weight_offset, "weight_offset", op, positive=False)
    y, h, _ = _rms_norm(x, weight, residual, eps, weight_offset, bool(round_normalized))
    return y if residual is None else (y, h)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Frozen LayerNorm over the last dimension: ``(x - mean) * rsqrt(var + eps) * weight + bias``.

    ``weight``/``bias`` (``[N]``, frozen; None = 1 / 0) never get gradients. With ``residual``:
    returns ``(y, h)``, ``h = x + residual``, ``y = layer_norm(h)``; otherwise ``y``. Statistics
    in fp32 (biased variance, as ``torch.nn.LayerNorm``), outputs in x's dtype.
    """
    op = "layer_norm"
    _check_x(x, op)
    _check_frozen(weight, "weight", x, op)
    _check_frozen(bias, "bias", x, op)
    _check_residual(residual, x, op)
    eps = _check_number(eps, "eps", op, positive=True)
    y, h, _, _ = _layer_norm(x, weight, bias, residual, eps)
    return y if residual is None else (y, h)
