"""Fused linear + cross-entropy for a frozen language-model head, chunked over tokens.

``loss = CE(hidden @ W^T (+ b), labels)`` with the semantics of Hugging Face's causal-LM loss
(``transformers.loss.loss_utils.ForCausalLMLoss``): logits in the hidden dtype, upcast to fp32
for the log-sum-exp; with ``shift_labels`` position ``t`` predicts label ``t + 1`` (the last
position of each sequence is ignored); ``ignore_index`` labels are excluded; ``"mean"`` divides
by the number of counted tokens (NaN when there is none, as in HF; the gradient is then zero),
``"sum"`` does not.

The full ``[tokens, V]`` logits never exist. Tokens go through in chunks whose logits stay
under a fixed byte budget (:data:`DEFAULT_CHUNK_BYTES`, independent of the token count); per
chunk:

1. ``logits = h_chunk @ W^T (+ b)`` (torch matmul: cuBLAS / CPU BLAS) into one reused buffer,
   times ``logit_scale`` where the head scales its logits (Cohere, Granite), rounded as the model does;
2. one kernel computes each row's fp32 loss and overwrites the buffer with ``dLoss/dLogits``
   (``(softmax - onehot) * scale``, zero on ignored rows): the Triton kernel of
   ``cross_entropy_triton`` or the torch reference :func:`cross_entropy_chunk_torch`;
3. ``grad_h_chunk = dLogits @ W`` (``dLogits`` times ``logit_scale`` first).

So the input gradient is computed during the forward (as Liger Kernel does) and kept (the size
of ``hidden``); the backward only scales it by the incoming gradient. Nothing logits-sized is
saved for the backward, the weight gets no gradient (it must not require one) and, when
``hidden`` does not require grad (or grad mode is off), steps 2's gradient and 3 are skipped.
Double backward through this op is not supported (the saved gradient is a constant).

Layers: torch references (:func:`linear_cross_entropy_torch`, the unfused statement of the
math; :func:`cross_entropy_chunk_torch`, one chunk's step 2), the chunk loop, backend dispatch,
the custom op ``offsite_kernels::fused_linear_cross_entropy`` (returns the loss and the input
gradient) with a fake implementation and ``register_autograd``, and the public functional.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..backends import use_triton
from ..errors import OffsiteError
from ..memtrack import register_workspace
from .eager import refuse_forward_ad

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum")
DEFAULT_CHUNK_BYTES = 64 * 2**20  # one chunk's logits buffer, in the hidden dtype


class FusedHeadInputError(OffsiteError, ValueError):
    """Inputs of the fused linear + cross-entropy that do not fit together."""


# --- references -------------------------------------------------------------------------------
def shift_and_flatten_labels(labels: torch.Tensor, ignore_index: int, shift_labels: bool) -> torch.Tensor:
    """Labels aligned with the flattened positions: shifted left by one per sequence (last
    position ``ignore_index``) when ``shift_labels``, as HF's ``ForCausalLMLoss`` does."""
    if shift_labels:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return labels.reshape(-1).to(torch.int64)


def linear_cross_entropy_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: bool = True,
    reduction: str = "mean",
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """The unfused reference: full logits with ``F.linear`` (times ``logit_scale`` in their dtype), upcast to fp32,
    ``F.cross_entropy``."""
    logits = F.linear(hidden, weight, bias)
    logits = (logits * logit_scale if logit_scale != 1.0 else logits).float()
    target = shift_and_flatten_labels(labels, ignore_index, shift_labels)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=ignore_index, reduction=reduction)


def cross_entropy_chunk_torch(
    logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's per-row fp32 loss and, if asked, ``dLoss/dLogits = (softmax - onehot) * scale``
    in the logits' dtype (zero rows where the label is ``ignore_index``; NaN loss and gradient
    rows for a label outside ``[0, V)``): the same computation as the Triton kernel."""
    v = logits.shape[-1]
    lf = logits.float()
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    safe = torch.where(valid & in_range, labels, 0)[:, None]
    lse = torch.logsumexp(lf, dim=-1)
    nan = torch.full_like(lse, float("nan"))
    loss = torch.where(valid, torch.where(in_range, lse - lf.gather(1, safe).squeeze(1), nan), 0.0)
    if not compute_grad:
        return loss, None
    row_scale = torch.where(valid, torch.where(in_range, scale.float(), nan), 0.0)[:, None]
    grad = torch.exp(lf - lse[:, None]).mul_(row_scale)
    grad.scatter_add_(1, safe, -row_scale)
    return loss, grad.masked_fill_(~valid[:, None], 0.0).to(logits.dtype)


# --- the chunk loop ---------------------------------------------------------------------------
def default_chunk_size(vocab: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's logits (``rows x vocab`` in ``dtype``) fit ``budget_bytes``;
    a multiple of 16 when at least 16 (GEMM-friendly)."""
    rows = max(1, budget_bytes // (max(vocab, 1) * torch.finfo(dtype).bits // 8))
    return rows - rows % 16 if rows >= 16 else rows


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    compute_grad: bool,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses ``[N]`` (fp32) and, if ``compute_grad``, ``dLoss/dHidden [N, H]`` for 2-D ``hidden``."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    triton_path = use_triton(hidden)
    if triton_path:
        from .cross_entropy_triton import cross_entropy_fwd_bwd
    losses = torch.empty(n, device=hidden.device, dtype=torch.float32)
    grad = torch.empty_like(hidden, memory_format=torch.contiguous_format) if compute_grad else None
    buffer = torch.empty((min(chunk_size, n), vocab), device=hidden.device, dtype=hidden.dtype)
    w_t = weight.t()
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        logits = buffer[: end - start]
        if bias is None:
            torch.mm(hidden[start:end], w_t, out=logits)
        else:
            torch.addmm(bias, hidden[start:end], w_t, out=logits)
        if logit_scale != 1.0:
            logits.mul_(logit_scale)  # in the logits' dtype, as ``logits * scale`` rounds in the model's head
        if triton_path:
            cross_entropy_fwd_bwd(logits, target[start:end], losses[start:end], scale, ignore_index, compute_grad)
        else:
            rows, dlogits = cross_entropy_chunk_torch(logits, target[start:end], scale, ignore_index, compute_grad)
            losses[start:end] = rows
            if dlogits is not None:
                logits.copy_(dlogits)
                del dlogits
        if grad is not None:
            if logit_scale != 1.0:
                logits.mul_(logit_scale)  # the gradient through the scale, rounded as autograd rounds it
            torch.mm(logits, weight, out=grad[start:end])
    return losses, grad


# --- custom op --------------------------------------------------------------------------------
@torch.library.custom_op("offsite_kernels::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    shift_labels: bool,
    reduction: str,
    chunk_size: int,
    compute_grad: bool,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    target = shift_and_flatten_labels(labels, ignore_index, shift_labels)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    count = (target != ignore_index).sum()
    if reduction == "mean":
        scale = count.to(torch.float32).reciprocal()  # inf without a counted token: then every row is ignored
    else:
        scale = torch.ones((), device=hidden.device, dtype=torch.float32)
    b = None if bias is None else bias.to(hidden.dtype)
    losses, grad = _chunked(h2, weight, target, b, scale, ignore_index, chunk_size, compute_grad, logit_scale)
    total = losses.sum()
    loss = total / count if reduction == "mean" else total  # 0 / 0 = NaN, as HF
    grad_hidden = grad.reshape(hidden.shape) if grad is not None else hidden.new_empty((0,))
    return loss, grad_hidden


@_fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, shift_labels, reduction, chunk_size, compute_grad, logit_scale=1.0):
    loss = hidden.new_empty((), dtype=torch.float32)
    return loss, hidden.new_empty(hidden.shape if compute_grad else (0,))


def _setup_context(ctx, inputs, output):
    _loss, grad_hidden = output
    ctx.save_for_backward(grad_hidden)  # hidden-sized: nothing logits-sized is kept
    ctx.mark_non_differentiable(grad_hidden)
    ctx.set_materialize_grads(False)  # no hidden-sized zeros for the gradient of grad_hidden
    ctx.hidden_shape = inputs[0].shape


def _backward(ctx, grad_loss, _grad_of_grad_hidden):
    (grad_hidden,) = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        if grad_hidden.shape != ctx.hidden_shape:
            raise RuntimeError(
                "fused_linear_cross_entropy was called with compute_grad=False, so it has no input gradient; "
                "call it through fused_linear_cross_entropy() with hidden requiring grad"
            )
        grad = grad_hidden * grad_loss.to(grad_hidden.dtype)
    return grad, None, None, None, None, None, None, None, None, None


_fused_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# accounting: the chunk of logits is the op's only large scratch; its GEMMs (logits, and the input
# gradient computed in the forward) are hidden from FlopCounterMode by the custom op
def _workspace_bytes(
    hidden, weight, labels, bias, ignore_index, shift_labels, reduction, chunk_size, compute_grad, logit_scale=1.0
) -> int:
    rows = hidden.numel() // hidden.shape[-1]
    return min(chunk_size, rows) * weight.shape[0] * hidden.element_size()


@register_flop_formula(torch.ops.offsite_kernels.fused_linear_cross_entropy)
def _flops(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    compute_grad = args[6] if len(args) >= 7 else kwargs.get("compute_grad", True)
    gemm = 2 * math.prod(hidden_shape) * weight_shape[0]
    return gemm * (2 if compute_grad else 1)


register_workspace(torch.ops.offsite_kernels.fused_linear_cross_entropy, _workspace_bytes)


# --- public functional ------------------------------------------------------------------------
def _check_inputs(hidden, weight, labels, bias, reduction, chunk_size) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in _DTYPES:
        raise FusedHeadInputError(
            f"hidden must be a float32, float16 or bfloat16 tensor, got {getattr(hidden, 'dtype', type(hidden))}"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise FusedHeadInputError(
            f"weight must be a dense 2-D [vocab, hidden] floating-point tensor, got {getattr(weight, 'dtype', type(weight))} "
            f"{tuple(getattr(weight, 'shape', ()))}"
        )
    if weight.requires_grad:
        raise FusedHeadInputError(
            "fused_linear_cross_entropy's weight requires grad, but the fused head is frozen and computes no weight "
            "gradient; call weight.requires_grad_(False) (or use linear_cross_entropy_torch for a trainable head)"
        )
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise FusedHeadInputError(
            f"hidden has {hidden.shape[-1] if hidden.dim() else 'no'} features in its last dimension (shape {tuple(hidden.shape)}), "
            f"the weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    if weight.dtype != hidden.dtype:
        raise FusedHeadInputError(
            f"weight is {weight.dtype} but hidden is {hidden.dtype}; cast the head once (weight.to({hidden.dtype})), "
            "a per-call cast would copy the whole [vocab, hidden] matrix"
        )
    if weight.device != hidden.device:
        raise FusedHeadInputError(
            f"hidden is on {hidden.device} but the weight is on {weight.device}; move one of them (.to(device))"
        )
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise FusedHeadInputError(f"labels must be an integer tensor (int64), got {getattr(labels, 'dtype', type(labels))}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise FusedHeadInputError(
            f"labels must have hidden's shape without its last dimension, {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.device != hidden.device:
        raise FusedHeadInputError(f"labels are on {labels.device} but hidden is on {hidden.device}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise FusedHeadInputError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise FusedHeadInputError(f"bias is on {bias.device} but hidden is on {hidden.device}")
        if bias.requires_grad:
            raise FusedHeadInputError("the head's bias requires grad; a frozen head's bias is frozen (requires_grad_(False))")
    if reduction not in REDUCTIONS:
        raise FusedHeadInputError(
            f"reduction must be 'mean' or 'sum', got {reduction!r} (per-token losses would need the logits in the backward)"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise FusedHeadInputError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: bool = True,
    reduction: str = "mean",
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Causal-LM loss of a frozen head ``weight [V, H]`` on ``hidden [..., T, H]`` against ``labels [..., T]``.

    Equals ``ForCausalLMLoss(F.linear(hidden, weight, bias), labels, V)`` (HF) for
    ``shift_labels=True, reduction="mean"``; returns an fp32 scalar, differentiable in ``hidden``
    only. ``chunk_size`` (tokens per chunk) defaults to what keeps one chunk's logits under
    :data:`DEFAULT_CHUNK_BYTES`. On a GPU the Triton kernel runs between the two matmuls;
    elsewhere the torch reference, unless ``OFFSITE_BACKEND`` forces a backend. Labels outside
    ``[0, V)`` other than ``ignore_index`` give a NaN loss (HF raises; checking would cost a sync).
    ``logit_scale`` multiplies the logits (in their dtype, before the fp32 log-sum-exp) for a head that
    scales them (Cohere's ``logit_scale``, one over Granite's ``logits_scaling``).
    """
    _check_inputs(hidden, weight, labels, bias, reduction, chunk_size)
    if (
        isinstance(logit_scale, bool)
        or not isinstance(logit_scale, (int, float))
        or not math.isfinite(logit_scale)
        or logit_scale == 0
    ):
        raise FusedHeadInputError(f"logit_scale must be a finite nonzero number, got {logit_scale!r}")
    if forward_ad._current_level >= 0:  # inside a dual level: the custom op would give a zero tangent
        refuse_forward_ad("offsite_kernels::fused_linear_cross_entropy", (hidden, weight, bias))
    if shift_labels and hidden.dim() < 2:
        raise FusedHeadInputError(
            f"with shift_labels=True hidden must be [..., T, H] (a sequence of tokens), got shape {tuple(hidden.shape)}; "
            "add a sequence dimension or pass shift_labels=False"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], hidden.dtype)
    compute_grad = hidden.requires_grad and torch.is_grad_enabled()
    loss, _ = _fused_linear_cross_entropy_op(
        hidden,
        weight,
        labels.to(torch.int64),
        bias,
        ignore_index,
        shift_labels,
        reduction,
        chunk_size,
        compute_grad,
        float(logit_scale),
    )
    return loss
