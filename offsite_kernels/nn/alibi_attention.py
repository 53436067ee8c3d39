"""ALiBi self-attention (BLOOM) through ``torch.nn.functional.scaled_dot_product_attention``.

Hugging Face runs BLOOM's attention only in eager PyTorch (its scores and probabilities are
materialised and saved for the backward). :class:`AlibiSdpaAttention` takes the place of one
``BloomAttention`` in a frozen block, keeps its projections (dense or ``FrozenLinear``, under the
same names, so the state dict does not change) and computes the same math with SDPA:

    softmax(beta * alibi + (q @ k^T) / sqrt(head_dim) + mask) @ v

with ALiBi and the block's causal/padding mask folded into one additive ``attn_mask`` (the
memory-efficient kernel on a GPU; flash attention takes no bias). Attention dropout, if the config
has any, is SDPA's. ``output_attentions`` is refused: SDPA does not form the probabilities.

The bias is ``[batch, heads, q_len, k_len]`` and SDPA's backward keeps it, so built per block it
would be saved once per block. Every block of one forward gets the same ``alibi`` and mask tensors
from Hugging Face's model loop, so the blocks share one bias: :class:`_SharedBias` keeps the last
one built while anything (autograd's saved tensors, the caller) still holds it, keyed on the
identity of those tensors. It keeps no bias alive by itself (under recomputation each block still
builds its own), and is bypassed while ``torch.compile`` traces, a CUDA graph is captured, or in
``torch.inference_mode`` (nothing is saved there, and its tensors carry no version counter).
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn


class _SharedBias:
    """One slot: the last bias built, reused by a call with the same ``alibi`` and mask objects (same
    version), the same shapes, dtype, heads and ``beta``, while the bias is alive elsewhere."""

    def __init__(self) -> None:
        self._slot = threading.local()

    @staticmethod
    def _usable(alibi: torch.Tensor, mask: torch.Tensor | None) -> bool:
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
            return False
        if alibi.is_inference() or (mask is not None and mask.is_inference()):  # no version counter to key on
            return False
        return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())

    @staticmethod
    def _key(alibi: torch.Tensor, mask: torch.Tensor | None, shape: tuple) -> tuple:
        return (*shape, alibi._version, None if mask is None else mask._version)

    def get(self, alibi: torch.Tensor, mask: torch.Tensor | None, shape: tuple) -> torch.Tensor | None:
        entry = getattr(self._slot, "entry", None)
        if entry is None or not self._usable(alibi, mask):
            return None
        alibi_ref, mask_ref, key, bias_ref = entry
        same_mask = mask is None if mask_ref is None else mask_ref() is mask
        if alibi_ref() is alibi and same_mask and key == self._key(alibi, mask, shape):
            return bias_ref()
        return None

    def put(self, alibi: torch.Tensor, mask: torch.Tensor | None, shape: tuple, bias: torch.Tensor) -> None:
        if self._usable(alibi, mask):
            mask_ref = None if mask is None else weakref.ref(mask)
            self._slot.entry = (weakref.ref(alibi), mask_ref, self._key(alibi, mask, shape), weakref.ref(bias))


_SHARED_BIAS = _SharedBias()


class AlibiSdpaAttention(nn.Module):
    """BLOOM's attention module, computed by SDPA with ALiBi as an additive bias."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.query_key_value = attention.query_key_value
        self.dense = attention.dense
        self.num_heads: int = attention.num_heads
        self.head_dim: int = attention.head_dim
        self.scale: float = float(attention.inv_norm_factor)
        self.beta: float = float(attention.beta)
        self.attention_dropout: float = float(attention.attention_dropout.p)
        self.hidden_dropout: float = float(attention.hidden_dropout)
        self.layer_idx = getattr(attention, "layer_idx", None)

    def _bias(self, alibi: torch.Tensor, mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, dtype) -> torch.Tensor:
        """``beta * alibi + mask`` as one additive ``[batch, heads, q_len, k_len]``-broadcastable tensor,
        summed in at least fp32 and given to SDPA in the queries' dtype."""
        work = torch.promote_types(dtype, torch.float32)
        bias = self.beta * alibi.view(batch, self.num_heads, 1, -1)[..., -k_len:].to(work)
        if mask is None:  # causal only; the query rows are the last q_len of the k_len positions
            keep = torch.ones(q_len, k_len, dtype=torch.bool, device=alibi.device).tril(k_len - q_len)
        elif mask.dtype == torch.bool:
            keep = mask[..., -k_len:]
        else:
            return (bias + mask[..., -k_len:].to(work)).to(dtype)
        return bias.masked_fill(~keep, torch.finfo(work).min).to(dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layer_past: object | None = None,  # a Hugging Face Cache
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if output_attentions:
            raise ValueError(
                "the fast BLOOM attention (SDPA) does not form attention probabilities; "
                "call without output_attentions, or build the emulator without fast blocks"
            )
        batch, q_len, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(batch, q_len, self.num_heads, 3, self.head_dim)
        query, key, value = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)
        shape = (batch, q_len, key.shape[2], query.dtype, self.num_heads, self.beta)
        bias = _SHARED_BIAS.get(alibi, attention_mask, shape)
        if bias is None:
            bias = self._bias(alibi, attention_mask, batch, q_len, key.shape[2], query.dtype)
            _SHARED_BIAS.put(alibi, attention_mask, shape, bias)
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=bias,
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.scale,
        )
        output = self.dense(context.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim))
        return residual + F.dropout(output, p=self.hidden_dropout, training=self.training), None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim} (ALiBi, SDPA)"
