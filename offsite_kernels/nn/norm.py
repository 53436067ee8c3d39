"""``FrozenRMSNorm`` and ``FrozenLayerNorm``: norms whose weight and bias are frozen buffers.

Both take an optional ``residual`` in ``forward``: ``forward(x, residual)`` returns ``(y, h)`` with
``h = x + residual`` (the new residual stream) and ``y = norm(h)``, written by one kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import layer_norm, rms_norm


def _frozen_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    # detached (shares storage with the source module, as FrozenLinear does): a buffer, never a parameter
    return None if t is None else t.detach()


# Hugging Face RMSNorm classes that scale by ``1 + weight`` (Gemma 3n and Gemma 4 scale by ``weight``: not these)
GEMMA_RMS_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})
# Llama-style RMSNorm classes (``weight``, ``variance_epsilon``) that multiply by the weight before rounding to x's
# dtype, where Llama rounds ``x * rstd`` first: one rounding point apart in bf16, so told apart by name
WEIGHT_FIRST_RMS_NORMS = frozenset({"Olmo2RMSNorm", "Olmo3RMSNorm"})
# Hugging Face LayerNorm classes that are not ``torch.nn.LayerNorm``: a 1-D ``weight``, no bias, ``variance_epsilon``
# (so they look like Llama's RMSNorm), statistics and weight multiply in fp32 as ``torch.nn.LayerNorm`` computes them
WEIGHT_ONLY_LAYER_NORMS = frozenset({"CohereLayerNorm", "Cohere2LayerNorm"})


def layer_norm_kind(module: nn.Module) -> str | None:
    """Which LayerNorm ``module`` is: "torch" (``torch.nn.LayerNorm``), "weight_only" (Cohere's: a 1-D ``weight``, no
    bias, ``variance_epsilon``), or None (not a LayerNorm :meth:`FrozenLayerNorm.from_module` knows)."""
    if isinstance(module, nn.LayerNorm):
        return "torch"
    weight = getattr(module, "weight", None)
    if type(module).__name__ in WEIGHT_ONLY_LAYER_NORMS and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return "weight_only"
    return None


def rms_norm_kind(module: nn.Module) -> str | None:
    """Which RMSNorm ``module`` is: "torch" (``torch.nn.RMSNorm``), "llama" (Hugging Face Llama-style: a 1-D
    ``weight`` and ``variance_epsilon``), "weight_first" (the same, weight multiplied before rounding: OLMo 2 and 3),
    "gemma" (Hugging Face Gemma, Gemma 2 and Gemma 3: a 1-D ``weight`` used as ``1 + weight``, and ``eps``), or None
    (not an RMSNorm :meth:`FrozenRMSNorm.from_module` knows)."""
    if isinstance(module, nn.RMSNorm):
        return "torch"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or type(module).__name__ in WEIGHT_ONLY_LAYER_NORMS:
        return None
    if hasattr(module, "variance_epsilon"):
        return "weight_first" if type(module).__name__ in WEIGHT_FIRST_RMS_NORMS else "llama"
    if type(module).__name__ in GEMMA_RMS_NORMS and isinstance(getattr(module, "eps", None), float):
        return "gemma"
    return None


class FrozenRMSNorm(nn.Module):
    """RMSNorm with a frozen weight: ``y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset)``.

    The weight is a buffer: it moves with ``.to()``, is saved in the state dict and never collects
    a ``.grad``. ``round_normalized`` rounds ``x * rstd`` to x's dtype before the weight multiply
    (Hugging Face Llama's rounding point); ``weight_offset=1.0`` is Gemma's ``(1 + weight)``.
    """

    def __init__(
        self,
        weight: torch.Tensor | None,
        eps: float | None = 1e-6,
        *,
        weight_offset: float = 0.0,
        round_normalized: bool = False,
        hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        if weight is None and hidden_size is None:
            raise ValueError("FrozenRMSNorm needs a weight or, without one, hidden_size")
        self.hidden_size = int(weight.shape[-1]) if weight is not None else int(hidden_size)  # type: ignore[arg-type]
        self.eps = None if eps is None else float(eps)  # None: see forward (torch.nn.RMSNorm's default)
        self.weight_offset = float(weight_offset)
        self.round_normalized = bool(round_normalized)
        self.register_buffer("weight", _frozen_copy(weight))

    @classmethod
    def from_module(cls, module: nn.Module) -> FrozenRMSNorm:
        """Freeze an RMSNorm module, keeping its output:

        - Hugging Face Llama-style (``weight``, ``variance_epsilon``: Llama, Mistral, Qwen2, ...):
          rounding point as theirs (``round_normalized=True``; OLMo 2 and 3 round after the weight multiply:
          ``round_normalized=False``);
        - Hugging Face Gemma (``GemmaRMSNorm``-style: ``weight``, ``eps``, ``(1 + weight)`` in fp32):
          ``weight_offset=1.0``;
        - ``torch.nn.RMSNorm`` (1-D ``normalized_shape``; ``eps=None`` stays None: resolved per call,
          as torch does, to the machine epsilon of the statistics' dtype, fp32 or fp64).

        The output is always in x's dtype. Where the source module's output is promoted (an fp32
        weight with bf16 activations gives fp32 in Hugging Face's Llama), this is that value rounded
        to x's dtype. For float64 inputs the statistics here are float64; Llama's and Gemma's are
        computed in fp32 (differences ~1e-7 relative).
        """
        weight = getattr(module, "weight", None)
        kind = rms_norm_kind(module)
        if kind == "torch":
            if len(module.normalized_shape) != 1:
                raise ValueError(f"only last-dimension norms are supported, got normalized_shape={module.normalized_shape}")
            return cls(_frozen_copy(weight), module.eps, hidden_size=module.normalized_shape[0])
        if kind in ("llama", "weight_first"):
            return cls(_frozen_copy(weight), module.variance_epsilon, round_normalized=kind == "llama")
        if kind == "gemma":
            return cls(_frozen_copy(weight), module.eps, weight_offset=1.0)
        raise TypeError(
            "expected a Hugging Face RMSNorm (weight and variance_epsilon, as LlamaRMSNorm), a Gemma RMSNorm "
            f"or torch.nn.RMSNorm, got {type(module).__name__}"
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        eps = self.eps
        if eps is None:  # as torch.nn.RMSNorm: the machine epsilon of the dtype the statistics are computed in
            eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
        return rms_norm(x, self.weight, eps, residual, weight_offset=self.weight_offset, round_normalized=self.round_normalized)

    def extra_repr(self) -> str:
        extra = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        extra += ", round_normalized=True" if self.round_normalized else ""
        return f"{self.hidden_size}, eps={self.eps}, weight={self.weight is not None}{extra}"


class FrozenLayerNorm(nn.Module):
    """LayerNorm with frozen weight and bias buffers: ``y = (x - mean) * rsqrt(var + eps) * weight + bias``."""

    def __init__(
        self, weight: torch.Tensor | None, bias: torch.Tensor | None = None, eps: float = 1e-5, *, hidden_size: int | None = None
    ) -> None:
        super().__init__()
        known = weight if weight is not None else bias
        if known is None and hidden_size is None:
            raise ValueError("FrozenLayerNorm needs a weight, a bias or hidden_size")
        self.hidden_size = int(known.shape[-1]) if known is not None else int(hidden_size)  # type: ignore[arg-type]
        self.eps = float(eps)
        self.register_buffer("weight", _frozen_copy(weight))
        self.register_buffer("bias", _frozen_copy(bias))

    @classmethod
    def from_module(cls, module: nn.Module) -> FrozenLayerNorm:
        """Freeze a ``torch.nn.LayerNorm`` (normalising the last dimension only; with or without affine/bias) or a
        Hugging Face LayerNorm without bias (Cohere's)."""
        kind = layer_norm_kind(module)
        if kind == "weight_only":
            return cls(_frozen_copy(module.weight), None, module.variance_epsilon)
        if kind is None:
            raise TypeError(f"expected torch.nn.LayerNorm or a Cohere-style LayerNorm, got {type(module).__name__}")
        if len(module.normalized_shape) != 1:
            raise ValueError(f"only last-dimension norms are supported, got normalized_shape={module.normalized_shape}")
        return cls(_frozen_copy(module.weight), _frozen_copy(module.bias), module.eps, hidden_size=module.normalized_shape[0])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return layer_norm(x, self.weight, self.bias, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, weight={self.weight is not None}, bias={self.bias is not None}"
