"""Fused activations of the emulator's frozen MLPs, differentiable in their inputs only.

- :func:`bias_gelu`: ``gelu(x + b)``, exact (erf) or tanh form (Hugging Face's ``gelu_new`` /
  ``gelu_pytorch_tanh``); :func:`bias_relu` (OPT) and :func:`bias_silu` follow the same pattern.
- :func:`swiglu`: ``silu(gate) * up``, the Llama family's ``act_fn(gate_proj(x)) * up_proj(x)``;
  :func:`geglu`: ``gelu(gate) * up`` (erf or tanh form: Gemma's gated MLP).
- :func:`activation_by_name`: a Hugging Face activation name (``config.hidden_act`` /
  ``activation_function``) resolved to the fused op, or a clear error.

Layers of this file, from the bottom up: the pure-PyTorch references, backend dispatch to the
Triton kernels (``activation_triton.py``), ``torch.library`` custom ops with fake (meta)
implementations (``offsite_kernels::bias_gelu``, ``::bias_relu``, ``::bias_silu``, ``::swiglu``,
``::geglu``, ``::geglu_tanh``, each with a ``*_backward`` op) joined by ``register_autograd``, and the public functionals.

Autograd saves the inputs only (``x`` before the bias, and the frozen bias itself; ``gate`` and
``up``): the backward recomputes ``x + b`` and the derivative. The bias gets no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backends import use_triton
from ..errors import OffsiteError
from .eager import EagerOp

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GELU_APPROXIMATIONS = ("none", "tanh")
_GELU_ACTS = {"none": "gelu", "tanh": "gelu_tanh"}


class ActivationInputError(OffsiteError, ValueError):
    """Inputs of a fused activation that do not fit together, or an activation name without a fused op."""


# --- reference --------------------------------------------------------------------------------
def _pre_activation(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias.to(x.dtype)


def bias_act_torch(x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """Reference forward in plain PyTorch, in ``x.dtype``: ``act(x + bias)``; ``act`` one of
    ``gelu``, ``gelu_tanh``, ``relu``, ``silu``."""
    z = _pre_activation(x, bias)
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "relu":
        return F.relu(z)
    if act == "silu":
        return F.silu(z)
    raise ValueError(f"unknown activation {act!r}")


def bias_act_input_grad_torch(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """Reference input gradient: ``grad_y * act'(x + bias)`` (PyTorch's own backward formulas)."""
    z = _pre_activation(x, bias)
    if act in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad_y, z, approximate="none" if act == "gelu" else "tanh")
    if act == "relu":
        return torch.where(z > 0, grad_y, torch.zeros_like(grad_y))
    if act == "silu":
        return torch.ops.aten.silu_backward(grad_y, z)
    raise ValueError(f"unknown activation {act!r}")


def bias_gelu_torch(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """Reference: ``F.gelu(x + bias, approximate=approximate)``."""
    return bias_act_torch(x, bias, _GELU_ACTS[approximate])


def gated_act_torch(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """Reference forward: ``act(gate) * up``; ``act`` one of ``gelu``, ``gelu_tanh``, ``relu``, ``silu``."""
    return bias_act_torch(gate, None, act) * up


def gated_act_input_grad_torch(
    grad_y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference gradients: ``(grad_y * up * act'(gate), grad_y * act(gate))``."""
    return bias_act_input_grad_torch(grad_y * up, gate, None, act), grad_y * bias_act_torch(gate, None, act)


def _bias_for(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.to(x.dtype)


def _bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    if use_triton(x):
        from .activation_triton import bias_act_fwd

        return bias_act_fwd(x, _bias_for(x, bias), act)
    return bias_act_torch(x, bias, act).contiguous()  # the fake's layout, whatever x's strides


def _bias_act_input_grad(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    if use_triton(x):
        from .activation_triton import bias_act_bwd

        return bias_act_bwd(grad_y, x, _bias_for(x, bias), act)
    return bias_act_input_grad_torch(grad_y, x, bias, act).contiguous()


# --- custom ops: bias + GELU ------------------------------------------------------------------
def _bias_gelu_impl(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    return _bias_act(x, bias, _GELU_ACTS[approximate])


_bias_gelu_op = torch.library.custom_op("offsite_kernels::bias_gelu", _bias_gelu_impl, mutates_args=())


@_bias_gelu_op.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)


def _bias_gelu_backward_impl(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    return _bias_act_input_grad(grad_y, x, bias, _GELU_ACTS[approximate])


_bias_gelu_backward_op = torch.library.custom_op("offsite_kernels::bias_gelu_backward", _bias_gelu_backward_impl, mutates_args=())
_bias_gelu_backward = EagerOp(_bias_gelu_backward_op, _bias_gelu_backward_impl)


@_bias_gelu_backward_op.register_fake
def _(grad_y, x, bias, approximate):
    return x.new_empty(x.shape)


def _bias_gelu_setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)  # the inputs only: x + b and the derivative are recomputed
    ctx.approximate = approximate


def _bias_gelu_backward_formula(ctx, grad_y):
    x, bias = ctx.saved_tensors
    grad_x = _bias_gelu_backward(grad_y, x, bias, ctx.approximate) if ctx.needs_input_grad[0] else None
    return grad_x, None, None  # the bias is frozen


_bias_gelu = EagerOp(_bias_gelu_op, _bias_gelu_impl, _bias_gelu_setup_context, _bias_gelu_backward_formula)


# --- custom ops: bias + ReLU, bias + SiLU (one pattern, no option) -----------------------------
def _define_bias_act_ops(op: str, act: str) -> tuple[EagerOp, EagerOp]:
    """``offsite_kernels::<op>(x, bias)`` and ``offsite_kernels::<op>_backward(grad_y, x, bias)`` for ``act``."""

    def forward(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _bias_act(x, bias, act)

    def backward_op(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _bias_act_input_grad(grad_y, x, bias, act)

    forward.__name__, backward_op.__name__ = f"{op}_impl", f"{op}_backward_impl"
    fwd = torch.library.custom_op(f"offsite_kernels::{op}", forward, mutates_args=())
    bwd = EagerOp(torch.library.custom_op(f"offsite_kernels::{op}_backward", backward_op, mutates_args=()), backward_op)
    fwd.register_fake(lambda x, bias: x.new_empty(x.shape))
    bwd.op.register_fake(lambda grad_y, x, bias: x.new_empty(x.shape))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # x and the frozen bias

    def backward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        return (bwd(grad_y, x, bias) if ctx.needs_input_grad[0] else None), None

    return EagerOp(fwd, forward, setup_context, backward), bwd


_bias_relu, _bias_relu_backward = _define_bias_act_ops("bias_relu", "relu")
_bias_silu, _bias_silu_backward = _define_bias_act_ops("bias_silu", "silu")
_bias_relu_op, _bias_relu_backward_op = _bias_relu.op, _bias_relu_backward.op
_bias_silu_op, _bias_silu_backward_op = _bias_silu.op, _bias_silu_backward.op


# --- custom ops: gated activations (SwiGLU, GeGLU) ----------------------------------------------
def _define_gated_ops(op: str, act: str) -> tuple[EagerOp, EagerOp]:
    """``offsite_kernels::<op>(gate, up)`` = ``act(gate) * up`` and its ``<op>_backward(grad_y, gate, up)``."""

    def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if use_triton(gate):
            from .activation_triton import gated_act_fwd

            return gated_act_fwd(gate, up, act)
        return gated_act_torch(gate, up, act).contiguous()

    def backward_op(grad_y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if use_triton(gate):
            from .activation_triton import gated_act_bwd

            return gated_act_bwd(grad_y, gate, up, act)
        d_gate, d_up = gated_act_input_grad_torch(grad_y, gate, up, act)
        return d_gate.contiguous(), d_up.contiguous()

    forward.__name__, backward_op.__name__ = f"{op}_impl", f"{op}_backward_impl"
    fwd = torch.library.custom_op(f"offsite_kernels::{op}", forward, mutates_args=())
    bwd = EagerOp(torch.library.custom_op(f"offsite_kernels::{op}_backward", backward_op, mutates_args=()), backward_op)
    fwd.register_fake(lambda gate, up: gate.new_empty(gate.shape))
    bwd.op.register_fake(lambda grad_y, gate, up: (gate.new_empty(gate.shape), up.new_empty(up.shape)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # gate and up only: act(gate) and its derivative are recomputed

    def backward(ctx, grad_y):
        gate, up = ctx.saved_tensors
        if not any(ctx.needs_input_grad):
            return None, None
        d_gate, d_up = bwd(grad_y, gate, up)
        return (d_gate if ctx.needs_input_grad[0] else None), (d_up if ctx.needs_input_grad[1] else None)

    return EagerOp(fwd, forward, setup_context, backward), bwd


_swiglu, _swiglu_backward = _define_gated_ops("swiglu", "silu")
_geglu, _geglu_backward = _define_gated_ops("geglu", "gelu")
_geglu_tanh, _geglu_tanh_backward = _define_gated_ops("geglu_tanh", "gelu_tanh")
_swiglu_op, _swiglu_backward_op = _swiglu.op, _swiglu_backward.op
_geglu_op, _geglu_backward_op = _geglu.op, _geglu_backward.op
_geglu_tanh_op, _geglu_tanh_backward_op = _geglu_tanh.op, _geglu_tanh_backward.op
_GATED = {"silu": _swiglu, "gelu": _geglu, "gelu_tanh": _geglu_tanh}


def _define_packed_gated_ops(op: str, act: str, gated: EagerOp) -> EagerOp:
    """``offsite_kernels::<op>_packed(gate_up)`` = ``act(gate) * up`` for ``gate_up = [gate, up]`` along the last
    dimension (one fused projection: Phi-3's ``gate_up_proj``), with a backward that writes the gradient of
    ``gate_up`` as one tensor: no concatenation of two halves (autograd's backward of ``chunk``) at the MLP's peak."""

    def forward(gate_up: torch.Tensor) -> torch.Tensor:
        return gated.impl(*gate_up.chunk(2, dim=-1))  # the gated op's forward on the two halves, read in place

    def backward_op(grad_y: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        if use_triton(gate_up):
            from .activation_triton import gated_act_bwd_packed

            return gated_act_bwd_packed(grad_y, gate_up, act)
        gate, up = gate_up.chunk(2, dim=-1)
        d = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        d_gate, d_up = d.chunk(2, dim=-1)  # filled in place: one temporary of a half's size alive at a time
        torch.mul(grad_y, bias_act_torch(gate, None, act), out=d_up)
        torch.mul(grad_y, up, out=d_gate)
        d_gate.copy_(bias_act_input_grad_torch(d_gate, gate, None, act))
        return d

    forward.__name__, backward_op.__name__ = f"{op}_packed_impl", f"{op}_packed_backward_impl"
    fwd = torch.library.custom_op(f"offsite_kernels::{op}_packed", forward, mutates_args=())
    bwd = EagerOp(torch.library.custom_op(f"offsite_kernels::{op}_packed_backward", backward_op, mutates_args=()), backward_op)
    fwd.register_fake(lambda gate_up: gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2)))
    bwd.op.register_fake(lambda grad_y, gate_up: gate_up.new_empty(gate_up.shape))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])  # gate_up only

    def backward(ctx, grad_y):
        (gate_up,) = ctx.saved_tensors
        return bwd(grad_y, gate_up) if ctx.needs_input_grad[0] else None

    return EagerOp(fwd, forward, setup_context, backward)


_GATED_PACKED = {
    "silu": _define_packed_gated_ops("swiglu", "silu", _swiglu),
    "gelu": _define_packed_gated_ops("geglu", "gelu", _geglu),
    "gelu_tanh": _define_packed_gated_ops("geglu_tanh", "gelu_tanh", _geglu_tanh),
}


# --- input checks -----------------------------------------------------------------------------
def _check_activation(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
        raise ActivationInputError(f"{name} must be a float32, float16 or bfloat16 tensor, got {getattr(t, 'dtype', type(t))}")


def _check_bias(x: torch.Tensor, bias: object) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.dtype not in _DTYPES:
        raise ActivationInputError(
            f"bias must be a float32, float16 or bfloat16 tensor, got {getattr(bias, 'dtype', type(bias))}"
        )
    if x.dim() == 0:
        raise ActivationInputError("a 0-d x has no feature dimension for a bias; pass bias=None (or add the scalar to x)")
    if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ActivationInputError(
            f"bias must have shape ({x.shape[-1]},), one value per feature of x's last dimension; "
            f"got bias {tuple(bias.shape)} for x {tuple(x.shape)}"
        )
    if bias.device != x.device:
        raise ActivationInputError(f"bias is on {bias.device} but x is on {x.device}; move one of them (.to(device))")
    if bias.requires_grad:
        raise ActivationInputError(
            "the bias requires grad, but a fused activation's bias is frozen and gets no gradient; "
            "call bias.requires_grad_(False) (or add a trainable bias before the activation yourself)"
        )


# --- public functionals -----------------------------------------------------------------------
def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """``gelu(x + bias)``, differentiable in ``x`` only (the bias is frozen).

    ``approximate="none"`` is the exact erf form (HF ``gelu``), ``"tanh"`` the tanh form (HF
    ``gelu_new`` / ``gelu_pytorch_tanh``). ``x`` has any shape; ``bias`` (optional) has one value
    per feature of the last dimension. The output is contiguous, in ``x``'s dtype (math in fp32
    on the Triton path). On a GPU the Triton kernels run, elsewhere the PyTorch reference,
    unless ``OFFSITE_BACKEND`` forces a backend.
    """
    _check_activation("x", x)
    _check_bias(x, bias)
    if approximate not in GELU_APPROXIMATIONS:
        raise ActivationInputError(f"approximate must be 'none' (erf form) or 'tanh' (tanh form), got {approximate!r}")
    return _bias_gelu(x, bias, approximate)


def bias_relu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(x + bias)`` (OPT's activation), differentiable in ``x`` only; as :func:`bias_gelu`."""
    _check_activation("x", x)
    _check_bias(x, bias)
    return _bias_relu(x, bias)


def bias_silu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x + bias)`` (HF ``silu`` / ``swish`` in an ungated MLP), differentiable in ``x`` only; as :func:`bias_gelu`."""
    _check_activation("x", x)
    _check_bias(x, bias)
    return _bias_silu(x, bias)


def _check_gated(gate: object, up: object) -> None:
    _check_activation("gate", gate)
    _check_activation("up", up)
    if gate.shape != up.shape:
        raise ActivationInputError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ActivationInputError(f"gate and up must have the same dtype, got {gate.dtype} and {up.dtype}; cast one of them")
    if gate.device != up.device:
        raise ActivationInputError(f"gate is on {gate.device} but up is on {up.device}; move one of them (.to(device))")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the gated MLP activation of the Llama family, differentiable in both.

    ``gate`` and ``up`` have one shape (no broadcasting), dtype and device; rows may be strided
    (e.g. the two halves of one fused ``gate_up`` projection). The output is contiguous.
    Autograd saves ``gate`` and ``up`` only.
    """
    _check_gated(gate, up)
    return _swiglu(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate) * up`` (GeGLU; ``approximate="tanh"``: the tanh form, Gemma's gated MLP),
    differentiable in both; inputs and outputs as :func:`swiglu`."""
    _check_gated(gate, up)
    if approximate not in GELU_APPROXIMATIONS:
        raise ActivationInputError(f"approximate must be 'none' (erf form) or 'tanh' (tanh form), got {approximate!r}")
    return _GATED[_GELU_ACTS[approximate]](gate, up)


# --- Hugging Face activation names -------------------------------------------------------------
# Each name maps to a function equal to transformers.activations.ACT2FN[name] (tests check it):
# gelu_fast, gelu_accurate and gelu_python_tanh are the tanh form written out (gelu_fast's rounded
# constant 0.7978845608 is sqrt(2/pi) to fp32 precision), gelu_python the erf form.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_FUNCTIONALS = {
    "gelu": lambda x, bias: bias_gelu(x, bias, "none"),
    "gelu_tanh": lambda x, bias: bias_gelu(x, bias, "tanh"),
    "relu": bias_relu,
    "silu": bias_silu,
}


@dataclass(frozen=True)
class FusedActivation:
    """A Hugging Face activation resolved to the library's fused ops.

    ``act(x, bias=None)`` is ``ACT2FN[name](x + bias)``; ``act.gated(gate, up)`` is
    ``ACT2FN[name](gate) * up`` (fused for SiLU, SwiGLU, and both GELU forms, GeGLU; not for ReLU).
    """

    name: str  # the Hugging Face name, as given
    kind: str  # "gelu", "gelu_tanh", "relu" or "silu"

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _FUNCTIONALS[self.kind](x, bias)

    @property
    def has_gated(self) -> bool:
        """Whether :meth:`gated` has a fused kernel for this activation."""
        return self.kind in _GATED

    def _require_gated(self) -> None:
        if not self.has_gated:
            raise ActivationInputError(
                f"no fused gated kernel for activation {self.name!r}: only the SiLU (SwiGLU) and GELU (GeGLU) "
                "forms have one; compute act(gate) * up with the ungated op instead"
            )

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` through the fused gated op (SwiGLU, GeGLU)."""
        self._require_gated()
        _check_gated(gate, up)
        return _GATED[self.kind](gate, up)

    def gated_packed(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` for ``gate_up = [gate, up]`` along the last dimension (one fused projection), through
        the fused gated op; its backward returns the gradient of ``gate_up`` as one tensor. Saves ``gate_up`` only."""
        self._require_gated()
        _check_activation("gate_up", gate_up)
        if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
            raise ActivationInputError(
                f"gate_up must hold gate and up side by side in an even last dimension, got shape {tuple(gate_up.shape)}"
            )
        return _GATED_PACKED[self.kind](gate_up)


def activation_by_name(name: str) -> FusedActivation:
    """The fused activation for a Hugging Face activation name (``config.hidden_act``,
    ``config.activation_function``); :class:`ActivationInputError` for a name without one."""
    if not isinstance(name, str) or name not in HF_ACTIVATIONS:
        raise ActivationInputError(
            f"activation {name!r} has no fused op; supported: {', '.join(sorted(HF_ACTIVATIONS))} "
            "(use transformers.activations.ACT2FN for the others)"
        )
    return FusedActivation(name, HF_ACTIVATIONS[name])
