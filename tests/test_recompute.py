"""Recomputation of the frozen emulator: same loss and adapter gradients, far fewer saved activations."""

from __future__ import annotations

import importlib
import inspect
import warnings

import pytest
import torch
from conftest import padded_mask, random_ids

import offsite_kernels as ok
from offsite_kernels.memtrack import MemoryTracker, SavedBytesBetween
from offsite_kernels.nn.recompute import RecomputeError, apply_recompute, recompute_mode
from offsite_kernels.nn.selective_checkpoint import SelectiveCheckpointError
from offsite_kernels.tiny import tiny_model


def _loss_and_grads(emu, ids, mask=None):
    emu.train()
    emu.zero_grad(set_to_none=True)
    out = emu(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in emu.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def _assert_same_grads(grads, grads2, rtol):
    """Each gradient within ``rtol`` of its largest entry. A gradient that is zero in exact arithmetic (the
    key projection's bias: softmax ignores a shift shared by all keys) holds only rounding noise, which the
    order of float32 sums sets; so no tensor's scale is taken below 1e-4 of the model's largest gradient."""
    assert grads.keys() == grads2.keys() and grads
    floor = 1e-4 * max(float(g.abs().max()) for g in grads.values())
    for name in grads:
        scale = max(float(grads[name].abs().max()), floor, 1e-30)
        err = float((grads2[name] - grads[name]).abs().max()) / scale
        assert err <= rtol, f"{name}: error {err:.2e} of the gradient's scale {scale:.2e}"


def _assert_same(reference, other, rtol):
    loss, grads = reference
    loss2, grads2 = other
    torch.testing.assert_close(loss2, loss, rtol=rtol, atol=0)
    _assert_same_grads(grads, grads2, rtol)


@pytest.mark.parametrize("mode", ["full", "block", "selective"])
def test_every_family_same_loss_and_adapter_grads(full_model, mode):
    ids, mask = random_ids(2, 11, seed=3), padded_mask(2, 11)
    plain = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=3)
    recomputed = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=3, recompute=mode)
    assert recomputed.recompute == mode and plain.recompute is None
    _assert_same(_loss_and_grads(plain, ids, mask), _loss_and_grads(recomputed, ids, mask), rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
@pytest.mark.parametrize("mode", ["full", "block", "selective"])
def test_low_bit_emulator_recomputes_to_the_same_gradients(bits, mode):
    model = tiny_model("llama", n_layers=6, seed=5)
    ids = random_ids(2, 9, seed=4)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, bits=bits, group_size=32)
    recomputed = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, bits=bits, group_size=32, recompute=mode)
    _assert_same(_loss_and_grads(plain, ids), _loss_and_grads(recomputed, ids), rtol=1e-5)


def test_dropout_masks_are_replayed_in_the_backward():
    model = tiny_model("gpt2", n_layers=6, seed=2, resid_pdrop=0.3, attn_pdrop=0.2)
    ids = random_ids(2, 10, seed=6)
    runs = []
    for mode in (None, "full", "block", "selective"):
        emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=4, recompute=mode)
        torch.manual_seed(11)
        runs.append(_loss_and_grads(emu, ids))
    _assert_same(runs[0], runs[1], rtol=1e-5)
    _assert_same(runs[0], runs[2], rtol=1e-5)


def _saved_in_emulator(emu, ids):
    """Bytes autograd saves while the emulator blocks run, in one training step."""
    blocks = [b for _, b in emu.emulator_blocks()]
    emu.train()
    with SavedBytesBetween(blocks[0], blocks[-1], weights_of=emu) as saved:
        loss = emu(input_ids=ids, labels=ids).loss
    loss.backward()
    return saved.bytes


def test_saved_activation_bytes_on_a_2_8_2_model():
    model = tiny_model("llama", n_layers=12, seed=0)
    model.config._attn_implementation = "sdpa"  # Hugging Face's default attention
    ids = random_ids(4, 33, seed=1)
    hidden_bytes = ids.numel() * model.config.hidden_size * 4  # the emulator's input, fp32
    saved, peak = {}, {}
    for mode in (None, "selective", "block", "full"):
        emu = ok.make_emulator(model, bottom=2, top=2, emulator_layers=8, recompute=mode)
        with MemoryTracker() as tracker:
            saved[mode] = _saved_in_emulator(emu, ids)
        peak[mode] = tracker.peak_bytes
    assert saved["full"] == hidden_bytes  # exactly the emulator's input
    assert saved[None] > 8 * hidden_bytes  # each plain block saves several activations
    # each block's input, and what all blocks share (the mask, rotary cos and sin: stored once)
    assert 8 * hidden_bytes <= saved["block"] < 9 * hidden_bytes
    # selective checkpointing keeps its GEMM outputs out of sight of saved-tensor hooks: compare peaks
    assert peak["full"] < peak["block"] < peak["selective"] < peak[None]


def test_only_the_bottom_adapter_upstream_needs_grad():
    """The setting where Hugging Face gradient checkpointing breaks: embeddings frozen, only the
    bottom adapter below the emulator trains. The bottom adapter still gets its gradient."""
    model = tiny_model("opt", n_layers=6, seed=3)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, recompute="full")
    assert not any(p.requires_grad for p in emu.family.get(emu.model, emu.family.token_embedding).parameters())
    _, grads = _loss_and_grads(emu, random_ids(2, 8, seed=2))
    bottom = [n for n in grads if ".layers.0." in n]
    assert bottom and all(grads[n].abs().sum() > 0 for n in bottom)


def test_no_adapter_below_means_nothing_to_recompute():
    model = tiny_model("llama", n_layers=4, seed=3)
    emu = ok.make_emulator(model, bottom=0, top=2, emulator_layers=2, recompute="full")
    plain = ok.make_emulator(model, bottom=0, top=2, emulator_layers=2)
    ids = random_ids(2, 8, seed=5)
    _assert_same(_loss_and_grads(plain, ids), _loss_and_grads(emu, ids), rtol=1e-6)


def test_eval_generation_and_files_are_unchanged(tmp_path):
    model = tiny_model("llama", n_layers=6, seed=4)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, recompute="full").eval()
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2).eval()
    ids = random_ids(1, 5, seed=7)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert torch.equal(emu.generate(ids, **gen), plain.generate(ids, **gen))
    assert emu.state_dict().keys() == plain.state_dict().keys()
    emu.save_pretrained(tmp_path / "emu")
    loaded = ok.OffsiteModel.from_pretrained(tmp_path / "emu")
    torch.testing.assert_close(loaded(input_ids=ids).logits, plain(input_ids=ids).logits)
    emu.set_recompute(None)
    assert emu.recompute is None and type(emu.emulator_blocks()[0][1]) is type(plain.emulator_blocks()[0][1])


def test_switching_modes_and_bad_requests():
    model = tiny_model("bloom", n_layers=6, seed=4)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    emu.set_recompute(True)
    assert emu.recompute == "full"
    emu.set_recompute("selective")
    assert {recompute_mode(b) for _, b in emu.emulator_blocks()} == {"selective"}
    with pytest.raises(RecomputeError, match="one of full, block, selective"):
        emu.set_recompute("everything")
    with pytest.raises(RecomputeError, match="one of full, block, selective"):
        ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, recompute="sometimes")
    with pytest.raises(RecomputeError, match="already recompute"):
        apply_recompute([b for _, b in emu.emulator_blocks()])
    adapter = [b for _, b in emu.adapter_blocks()]
    with pytest.raises(RecomputeError, match="trainable parameters"):
        apply_recompute(adapter)


@pytest.mark.parametrize("mode", ["full", "block", "selective"])
def test_a_block_called_without_its_hidden_states_gets_a_named_error(mode):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8).requires_grad_(False)

        def forward(self, x):
            return self.linear(x)

    blocks = [Block() for _ in range(3)]
    apply_recompute(blocks, mode)
    h = torch.randn(2, 8, requires_grad=True)
    assert blocks[0](h).shape == (2, 8)
    with pytest.raises(RecomputeError, match=r"first positional argument or as hidden_states=.*keywords \['x'\]"):
        blocks[0](x=h)


@pytest.mark.parametrize("mode", ["full", "block", "selective"])
def test_bf16_autocast_is_replayed_in_the_backward(mode):
    model = tiny_model("llama", n_layers=6, seed=7)
    ids = random_ids(2, 10, seed=8)
    runs = []
    for recompute in (None, mode):
        emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, recompute=recompute).train()
        emu.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = emu(input_ids=ids, labels=ids).loss
        loss.backward()  # outside the autocast region, as training loops do
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in emu.named_parameters() if p.requires_grad}))
    _assert_same(runs[0], runs[1], rtol=1e-6)


def test_full_recompute_keeps_only_the_stack_input_until_the_backward():
    """Between forward and backward, a deeper emulator holds no more memory: no block input is kept."""
    model = tiny_model("llama", n_layers=12, seed=0)
    ids = random_ids(2, 17, seed=1)
    alive = {}
    for k in (2, 8):
        emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=k, recompute="full").train()
        with MemoryTracker() as tracker:
            loss = emu(input_ids=ids, labels=ids).loss
            alive[k] = tracker.current_bytes
            loss.backward()
    hidden_bytes = ids.numel() * model.config.hidden_size * 4
    assert abs(alive[8] - alive[2]) < hidden_bytes


def test_two_forwards_one_backward_and_retain_graph():
    model = tiny_model("gpt2", n_layers=6, seed=3)
    a, b = random_ids(2, 8, seed=1), random_ids(2, 8, seed=2)
    grads = []
    for mode in (None, "full"):
        emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, recompute=mode).train()
        loss = emu(input_ids=a, labels=a).loss + 0.5 * emu(input_ids=b, labels=b).loss  # gradient accumulation
        loss.backward(retain_graph=True)
        loss.backward()  # a second backward through the same graph
        grads.append({n: p.grad.clone() for n, p in emu.named_parameters() if p.requires_grad})
    _assert_same_grads(grads[0], grads[1], rtol=1e-5)


class _ToyBlock(torch.nn.Module):
    """A block called with ``hidden_states=`` as a keyword, returning a tuple (as some HF blocks do)."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(width, width).requires_grad_(False)

    def forward(self, hidden_states, scale=1.0):
        return (torch.tanh(self.lin(hidden_states)) * scale + hidden_states, None)


def _toy_stack(mode):
    blocks = torch.nn.ModuleList(_ToyBlock(13, seed=i) for i in range(4))
    if mode:
        apply_recompute(blocks, mode)
    return blocks


def _toy_grad(blocks, x):
    x = x.clone().requires_grad_(True)
    h = x * 2
    for block in blocks:
        h = block(hidden_states=h, scale=0.5)[0]
    h.square().sum().backward()
    return x.grad


@pytest.mark.parametrize("mode", ["full", "block", "selective"])
def test_keyword_hidden_states_and_tuple_outputs(mode):
    x = torch.randn(3, 13, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_toy_grad(_toy_stack(mode), x), _toy_grad(_toy_stack(None), x))


def test_threads_sharing_one_stack_do_not_mix_their_passes():
    """DataParallel replicas share the blocks' stack and run in threads of their own."""
    import threading

    blocks, plain = _toy_stack("full"), _toy_stack(None)
    inputs = [torch.randn(5, 13, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results: dict[int, torch.Tensor] = {}

    def work(i):
        results[i] = _toy_grad(blocks, inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(inputs):
        torch.testing.assert_close(results[i], _toy_grad(plain, x))


def _hooked_grad(mode, hook_block: int, pre: bool):
    """The toy stack with a hook on one block that doubles its output (or halves its input)."""
    blocks = _toy_stack(mode)
    if pre:
        blocks[hook_block].register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 0.5}), with_kwargs=True
        )
    else:
        blocks[hook_block].register_forward_hook(lambda m, args, out: (out[0] * 2, *out[1:]))
    return _toy_grad(blocks, torch.randn(3, 13, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("pre", [False, True])
def test_selective_recompute_keeps_module_hooks_exact(pre):
    for hook_block in (0, 1, 3):
        torch.testing.assert_close(_hooked_grad("selective", hook_block, pre), _hooked_grad(None, hook_block, pre))


@pytest.mark.parametrize("pre", [False, True])
def test_full_recompute_with_hooks_at_the_stack_edges_is_exact(pre):
    """The first block's pre-hooks run before the stack, the last block's forward hooks after it."""
    hook_block = 0 if pre else 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(_hooked_grad("full", hook_block, pre), _hooked_grad(None, hook_block, pre))


@pytest.mark.parametrize("pre", [False, True])
def test_full_recompute_warns_on_hooks_between_blocks(pre):
    with pytest.warns(UserWarning, match="hooks between them"):
        wrong = _hooked_grad("full", 1 if pre else 2, pre)
    assert not torch.allclose(wrong, _hooked_grad(None, 1 if pre else 2, pre))  # why it warns


def test_full_recompute_warns_on_backward_hooks_of_inner_blocks():
    """Blocks before the last run without autograd in a full recompute: their backward hooks never fire."""
    blocks = _toy_stack("full")
    fired = []
    blocks[1].register_full_backward_hook(lambda m, gin, gout: fired.append(1))
    with pytest.warns(UserWarning, match="backward hooks"):
        _toy_grad(blocks, torch.randn(3, 13))
    assert fired == []  # what the warning is about


@pytest.mark.parametrize("mode", ["full", "block", "selective"])
def test_a_kv_cache_under_grad_is_filled_or_refused(mode):
    """A checkpointed block cannot fill a cache (its rerun would append again; left out, the cache would come back
    without its keys): "block" and "selective" refuse, "full" fills it; under no_grad every mode fills it."""
    model = tiny_model("llama", n_layers=6, seed=6)
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2).train()
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, recompute=mode).train()
    ids, step = random_ids(1, 6, seed=8), random_ids(1, 1, seed=9)

    # transformers 5.2x renames past_key_values to cache (the old name warns there)
    field = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def next_logits(m):
        cache = getattr(m(input_ids=ids, use_cache=True, return_logits=True), field)
        assert all(cache.get_seq_length(i) == ids.shape[1] for i in range(len(cache.layers)))
        with torch.no_grad():
            return m(input_ids=step, use_cache=True, return_logits=True, **{field: cache}).logits

    expected = next_logits(plain)
    if mode == "full":
        torch.testing.assert_close(next_logits(emu), expected)
    else:
        with pytest.raises(RecomputeError, match=rf"recompute='{mode}' with a KV cache while grad is enabled"):
            next_logits(emu)
    with torch.no_grad():
        torch.testing.assert_close(next_logits(emu), expected)


class _ConditionedBlock(torch.nn.Module):
    """A frozen block with a second input (made by a trainable layer upstream)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width).requires_grad_(False)

    def forward(self, hidden, cond):
        return torch.tanh(self.proj(hidden) * cond)


@pytest.mark.parametrize("mode", ["full", "block", "selective"])
def test_a_second_input_that_needs_grad_is_differentiated_or_refused(mode):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(_ConditionedBlock(8) for _ in range(3))
    producer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def grads():
        producer.zero_grad()
        hidden, cond = x.clone().requires_grad_(True), torch.sigmoid(producer(x))
        for block in blocks:
            hidden = block(hidden, cond)
        hidden.square().sum().backward()
        return producer.weight.grad.clone()

    expected = grads()
    apply_recompute(blocks, mode)
    if mode == "full":
        with pytest.raises(RecomputeError, match=r"but argument 1 of the first recomputed block needs grad too"):
            grads()
    else:
        torch.testing.assert_close(grads(), expected)


class _ChangesItsGemmOutput(torch.nn.Module):
    """A frozen block that scales a batched GEMM's output in place (as Falcon's eager attention does with its scores)
    or adds into a linear's output in place (as Falcon's MLP does); or does either out of place."""

    def __init__(self, in_place: bool, frozen_linear: bool) -> None:
        super().__init__()
        self.in_place = in_place
        linear = torch.nn.Linear(12, 12)
        self.proj = ok.nn.FrozenLinear.from_linear(linear, bits=None) if frozen_linear else linear.requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        heads = hidden.unflatten(-1, (2, 6)).transpose(1, 2)  # (batch, heads, tokens, 6)
        scores = heads @ heads.transpose(-1, -2)
        if self.in_place:
            scores /= 3.0
        else:
            scores = scores / 3.0
        mixed = (scores.softmax(-1) @ heads).transpose(1, 2).flatten(-2)
        out = self.proj(mixed)
        if self.in_place:
            out += hidden
        else:
            out = out + hidden
        return torch.tanh(out)


def _selective_grads(in_place: bool, frozen_linear: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The input gradient through two such blocks, plain and under selective recomputation."""
    torch.manual_seed(0)
    blocks = [_ChangesItsGemmOutput(in_place, frozen_linear) for _ in range(2)]
    x = torch.randn(3, 5, 12, requires_grad=True)
    reference = x.detach().clone().requires_grad_(True)
    blocks[1](blocks[0](reference)).square().sum().backward()
    apply_recompute(blocks, "selective")
    blocks[1](blocks[0](x)).square().sum().backward()
    return x.grad, reference.grad


@pytest.mark.parametrize("frozen_linear", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_selective_mode_reruns_a_block_that_changes_a_kept_gemm_output(in_place, frozen_linear):
    """Selective recomputation keeps GEMM outputs; one changed in place after it is kept would come back changed in the
    rerun (PyTorch raises on some, and misses Falcon's attention scores: wrong gradients). The cache keeps a copy."""
    grad, reference = _selective_grads(in_place, frozen_linear)
    torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-6)


def test_selective_mode_refuses_such_a_block_where_it_cannot_copy_the_kept_output(monkeypatch):
    monkeypatch.setattr(importlib.import_module("offsite_kernels.nn.selective_checkpoint"), "_copy_cached", lambda *a: False)
    _selective_grads(False, False)  # nothing written over: nothing to copy
    with pytest.raises(SelectiveCheckpointError, match=r"in place \(aten\.div_\..*recompute='block'"):
        _selective_grads(True, False)


class _ScalesItsGemmOutput(torch.nn.Module):
    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place, self.up, self.down = in_place, torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        self.requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        y = self.up(hidden)  # kept by selective recomputation
        y = y.mul_(0.5) if self.in_place else y * 0.5
        return self.down(torch.relu(y)) + hidden


def test_the_copy_of_a_kept_output_is_seen_by_the_memory_tracker(monkeypatch):
    """The copy goes through the dispatch modes below the guard: a memory tracker counts it (the in-place block then
    holds what the out-of-place one holds: a kept output plus the copy's place taken by the product it no longer keeps)."""
    from offsite_kernels.nn import selective_checkpoint

    copies = []
    copy = selective_checkpoint._copy_cached
    monkeypatch.setattr(selective_checkpoint, "_copy_cached", lambda *a: copies.append(a[1]) or copy(*a))
    alive = {}
    for in_place in (False, True):
        block = _ScalesItsGemmOutput(in_place)
        apply_recompute([block], "selective")
        x = torch.randn(32, 16, requires_grad=True)
        with MemoryTracker() as tracker:
            out = block(x)
        alive[in_place] = tracker.current_bytes
        out.sum().backward()
    assert len(copies) == 1
    assert alive[True] == alive[False] > 0


def test_torch_compile_traces_a_selective_block():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[_ChangesItsGemmOutput(False, False) for _ in range(2)])
    x = torch.randn(3, 5, 12, requires_grad=True)
    reference = x.detach().clone().requires_grad_(True)
    blocks(reference).square().sum().backward()
    apply_recompute(list(blocks), "selective")
    torch.compile(blocks, backend="aot_eager")(x).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-6, atol=1e-6)
