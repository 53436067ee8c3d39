"""BLOOM's ALiBi attention through SDPA (``AlibiSdpaAttention``) against Hugging Face's eager
``BloomAttention``: outputs and input gradients, with and without padding, with a cache.

Hugging Face's eager attention takes its softmax in fp32 whatever the model's dtype, so in float64
the two agree to fp32 rounding, not to float64's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

from offsite_kernels.nn import AlibiSdpaAttention


def _models(dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    config = BloomConfig(hidden_size=48, n_layer=2, n_head=4, vocab_size=101)
    eager = AutoModelForCausalLM.from_config(config).to(dtype)
    fast = copy.deepcopy(eager)
    for block in fast.transformer.h:
        block.self_attention = AlibiSdpaAttention(block.self_attention)
    return eager, fast


def _mask(kind: str, batch: int, seq: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(batch, seq, dtype=torch.long)
    if kind == "right":
        mask[1, seq - 4 :] = 0
    else:  # left padding: the real tokens of row 1 start at 3
        mask[1, :3] = 0
    return mask


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_same_outputs_and_input_gradients_as_eager(padding, dtype, tol):
    eager, fast = _models(dtype)
    batch, seq = 2, 11
    ids = torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = _mask(padding, batch, seq)
    real = torch.ones(batch, seq, dtype=torch.bool) if mask is None else mask.bool()
    if padding == "left":  # a query before any real token attends to nothing: each side fills it its own way
        real[1, :3] = False
    upstream = torch.randn(batch, seq, 101, dtype=dtype, generator=torch.Generator().manual_seed(2)) * real[..., None]
    results = []
    for model in (eager, fast):
        embeds = model.transformer.word_embeddings(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        (logits * upstream).sum().backward()
        results.append((logits.detach(), embeds.grad))
    (logits_e, grad_e), (logits_f, grad_f) = results
    assert torch.isfinite(logits_f[real]).all() and torch.isfinite(grad_f[real]).all()
    if not torch.isfinite(logits_e[real]).all():
        # Hugging Face's eager BLOOM in float64 with left padding: its fully masked rows turn into NaN
        # (min + min overflows float64's softmax input) and spread to the real ones; ours stay finite
        assert padding == "left" and dtype == torch.float64
        return
    torch.testing.assert_close(logits_f[real], logits_e[real], rtol=tol, atol=tol)
    if padding != "left":  # with left padding eager's fully masked rows feed NaN-free but arbitrary values back
        torch.testing.assert_close(grad_f, grad_e, rtol=tol, atol=tol)


def test_generation_with_a_cache_matches_eager():
    eager, fast = _models(torch.float32, seed=3)
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert fast.generate(ids, **kwargs).tolist() == eager.generate(ids, **kwargs).tolist()


def test_attention_probabilities_are_refused():
    _, fast = _models(torch.float32)
    with pytest.raises(ValueError, match="output_attentions"):
        fast(input_ids=torch.zeros(1, 4, dtype=torch.long), output_attentions=True)


def test_state_dict_is_unchanged():
    eager, fast = _models(torch.float32)
    assert fast.state_dict().keys() == eager.state_dict().keys()


def _saved_biases(model, ids, mask, heads: int) -> list[torch.Tensor]:
    """The [batch, heads, q, k] tensors autograd saves in one forward of ``model``."""
    batch, seq = ids.shape
    saved: list[torch.Tensor] = []

    def pack(t):
        if t.shape == (batch, heads, seq, seq):
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    return saved


@pytest.mark.parametrize("padding", ["none", "right"])
def test_blocks_of_one_forward_share_one_saved_bias(padding):
    torch.manual_seed(5)
    config = BloomConfig(hidden_size=48, n_layer=3, n_head=4, vocab_size=101)
    fast = AutoModelForCausalLM.from_config(config)
    for block in fast.transformer.h:
        block.self_attention = AlibiSdpaAttention(block.self_attention)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(6))
    saved = _saved_biases(fast, ids, _mask(padding, 2, 9), heads=4)
    assert len(saved) >= 3  # SDPA's backward keeps the bias of each of the three blocks ...
    assert len({t.untyped_storage().data_ptr() for t in saved}) == 1  # ... and it is one tensor


def test_shared_bias_follows_each_forward_and_holds_no_memory():
    eager, fast = _models(torch.float32, seed=7)
    ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(8))
    first = fast(input_ids=ids, attention_mask=_mask("right", 2, 10)).logits  # its graph (and bias) alive
    for padding in ("left", "none"):  # later forwards with other masks get their own bias
        mask = _mask(padding, 2, 10)
        real = (torch.ones(2, 10) if mask is None else mask).bool()
        if padding == "left":
            real[1, :3] = False
        got, want = fast(input_ids=ids, attention_mask=mask).logits, eager(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    assert first.requires_grad
    with torch.no_grad():  # nothing saves the bias: the cache keeps none alive after the forward
        fast(input_ids=ids)
    from offsite_kernels.nn.alibi_attention import _SHARED_BIAS

    assert _SHARED_BIAS._slot.entry[-1]() is None


def test_inference_mode_runs_without_the_shared_bias():
    eager, fast = _models(torch.float32, seed=9)
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():  # its tensors have no version counter for the cache's key
        got, want = fast(input_ids=ids).logits, eager(input_ids=ids).logits
        kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert fast.generate(ids, **kwargs).tolist() == eager.generate(ids, **kwargs).tolist()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
