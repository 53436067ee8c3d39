"""OffsiteModel's loss through the fused frozen head: the model's own loss, without its logits."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from conftest import padded_mask, random_ids

import offsite_kernels as ok
from offsite_kernels.memtrack import MemoryTracker
from offsite_kernels.tiny import tiny_model


def _run(emu, ids, mask, labels, **kwargs):
    emu.train()
    emu.zero_grad(set_to_none=True)
    out = emu(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in emu.named_parameters() if p.requires_grad}


def test_every_family_fused_loss_and_adapter_grads_match_its_own_head(full_model):
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2)
    ids, mask = random_ids(3, 12, seed=8), padded_mask(3, 12)
    labels = ids.masked_fill(mask == 0, -100)
    fused, fused_grads = _run(emu, ids, mask, labels)
    own, own_grads = _run(emu, ids, mask, labels, return_logits=True)
    soft_capped = getattr(full_model.config, "final_logit_softcapping", None) is not None  # Gemma 2: the model's head
    assert (fused.logits is None) != soft_capped and own.logits is not None
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == own_grads.keys() and fused_grads
    for name, grad in own_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_num_items_in_batch_divides_the_summed_loss_as_hf_trainer_expects():
    emu = ok.make_emulator(tiny_model("llama", n_layers=4, seed=1), bottom=1, top=1, emulator_layers=1)
    ids = random_ids(2, 9, seed=3)
    fused, _ = _run(emu, ids, None, ids, num_items_in_batch=torch.tensor(40))
    own, _ = _run(emu, ids, None, ids, num_items_in_batch=torch.tensor(40), return_logits=True)
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-6, atol=1e-7)
    assert abs(float(fused.loss.detach()) - float(_run(emu, ids, None, ids)[0].loss.detach()) * 16 / 40) < 1e-5


def test_switched_off_or_trainable_head_uses_the_models_own_head():
    emu = ok.make_emulator(tiny_model("gpt2", n_layers=4, seed=1), bottom=1, top=1, emulator_layers=1)
    ids = random_ids(2, 7, seed=4)
    emu.fused_head = False
    assert emu(input_ids=ids, labels=ids).logits is not None
    emu.fused_head = True
    assert emu(input_ids=ids, labels=ids).logits is None
    emu.model.lm_head.weight.requires_grad_(True)  # tied to the embeddings in GPT-2: now trainable
    out = emu(input_ids=ids, labels=ids)
    assert out.logits is not None
    out.loss.backward()
    assert emu.model.lm_head.weight.grad is not None


def test_a_declared_logit_scale_scales_a_biased_head_and_an_undeclared_one_uses_the_models_head():
    """The fused head applies a family's declared logit scale to its input and bias (Phi's head has a bias; no
    Hugging Face model scales a biased head, so this checks the math against the model's logits scaled by hand);
    a scale the family does not declare leaves the loss to the model's own head."""
    from dataclasses import replace

    from offsite_kernels.emulator.fused_loss import fused_head_loss, fused_head_supported

    model = tiny_model("phi", n_layers=2, seed=3)
    assert model.lm_head.bias is not None
    with torch.no_grad():
        model.lm_head.bias.normal_(generator=torch.Generator().manual_seed(4))
    model.requires_grad_(False)
    model.config.logit_scale = 0.3
    family = ok.get_family(model)
    assert not fused_head_supported(model, family, {})  # Phi does not scale its logits: the config's value is not its math
    scaled = replace(family, logit_multiplier="logit_scale", logit_divisor="logits_scaling")
    model.config.logits_scaling = 1.5
    assert fused_head_supported(model, scaled, {})
    ids = random_ids(2, 9, seed=5)
    embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
    got = fused_head_loss(model, scaled, None, None, ids, inputs_embeds=embeds).loss
    logits = model.lm_head(model.model(inputs_embeds=embeds)[0]) * (0.3 / 1.5)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(loss, embeds)[0] for loss in (got, expected)]
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "model_type, scale", [("cohere", dict(logit_scale=0.8333333333333334)), ("granite", dict(logits_scaling=3.0))]
)
@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_a_scaled_head_in_bf16_gives_the_models_own_loss_and_gradient(model_type, scale, mode):
    """The logit scale is applied to the bf16 logits, where the model's head applies it: the same loss and input
    gradient (scaling the hidden states instead rounds elsewhere, 1e-2 off in the gradient for a scale like Command
    R+'s)."""
    from offsite_kernels.emulator.fused_loss import fused_head_loss, fused_head_supported

    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model = tiny_model(model_type, n_layers=2, seed=3, dtype=dtype, **scale).requires_grad_(False)
    family = ok.get_family(model)
    assert fused_head_supported(model, family, {}) and family.logit_scale(model.config) not in (1.0, 0.25)
    ids = random_ids(2, 12, seed=5)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    results = []
    for fused in (True, False):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with context:
            if fused:
                loss = fused_head_loss(model, family, None, None, ids, inputs_embeds=embeds).loss
            else:
                loss = model(inputs_embeds=embeds, labels=ids).loss
        results.append((float(loss), torch.autograd.grad(loss, embeds)[0].double()))
    (fused_loss, fused_grad), (own_loss, own_grad) = results
    assert abs(fused_loss - own_loss) <= 1e-6 * abs(own_loss)
    assert float((fused_grad - own_grad).abs().max()) <= 1e-6 * float(own_grad.abs().max())


def test_bf16_autocast_loss_close_to_the_models_own():
    emu = ok.make_emulator(tiny_model("qwen2", n_layers=4, seed=2), bottom=1, top=1, emulator_layers=1)
    ids = random_ids(2, 10, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = emu(input_ids=ids, labels=ids).loss
        own = emu(input_ids=ids, labels=ids, return_logits=True).loss
    fused, own = fused.detach(), own.detach()
    assert torch.isfinite(fused) and abs(float(fused) - float(own)) <= 2e-2 * abs(float(own))


def test_peak_memory_of_a_training_step_drops_without_the_logits():
    model = tiny_model("llama", n_layers=4, seed=0, vocab_size=8192)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=1)
    emu.fused_head_chunk_size = 32  # 8 chunks of the 256 tokens
    ids = random_ids(4, 64, seed=1, vocab=8192)
    peaks = {}
    for name, kwargs in (("fused", {}), ("own", {"return_logits": True})):
        emu.zero_grad(set_to_none=True)
        with MemoryTracker() as tracker:
            emu(input_ids=ids, labels=ids, **kwargs).loss.backward()
        peaks[name] = tracker.peak_bytes
    logits_bytes = ids.numel() * 8192 * 4
    assert peaks["own"] - peaks["fused"] >= logits_bytes  # at least one full fp32 logits tensor never exists


def test_evaluation_and_tuple_callers_get_the_models_own_output():
    emu = ok.make_emulator(tiny_model("llama", n_layers=4, seed=1), bottom=1, top=1, emulator_layers=1)
    ids = random_ids(2, 7, seed=4)
    with torch.no_grad():  # HF Trainer's evaluate/predict: compute_metrics needs the logits
        assert emu(input_ids=ids, labels=ids).logits is not None
    out = emu(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and out[1].shape == (2, 7, emu.config.vocab_size)


def test_fused_output_carries_the_models_own_cache_without_deprecated_names(monkeypatch):
    import transformers.utils.logging  # noqa: F401  (it installs Logger.warning_once on import: patch after)

    logged = []  # transformers logs its renamed-field warnings once per process, through warning_once
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: logged.append(str(msg)), raising=False)
    emu = ok.make_emulator(tiny_model("opt", n_layers=4, seed=3), bottom=1, top=1, emulator_layers=1)
    ids = random_ids(2, 6, seed=2)
    fused = emu(input_ids=ids, labels=ids, use_cache=True)
    own = emu(input_ids=ids, labels=ids, use_cache=True, return_logits=True)
    assert fused.logits is None and fused.to_tuple()[-1] is not None
    fused_cache, own_cache = fused.to_tuple()[-1], own.to_tuple()[-1]
    assert type(fused_cache) is type(own_cache) and fused_cache.get_seq_length() == own_cache.get_seq_length() == 6
    # the warnings transformers logs for renamed fields (``use_return_dict``, ``past_key_values``)
    assert not [m for m in logged if "deprecated" in m]
