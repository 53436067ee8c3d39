"""torch.compile of the emulator blocks' training calls (offsite_kernels.nn.compiled_blocks), on the CPU (Inductor's C++ backend)."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_mask, random_ids
from torch._dynamo.utils import counters

import offsite_kernels as ok
from offsite_kernels.benchmark import BenchSettings, run_bench
from offsite_kernels.benchmark.report import format_markdown
from offsite_kernels.errors import OffsiteError
from offsite_kernels.memtrack import MemoryTracker
from offsite_kernels.nn import (
    CompileError,
    GraphError,
    RecomputeError,
    apply_compile,
    apply_recompute,
    compile_mode,
    remove_compile,
)
from offsite_kernels.nn.compiled_blocks import compile_report
from offsite_kernels.tiny import tiny_model


def _step(emu, ids, mask):
    emu.train()
    emu.zero_grad(set_to_none=True)
    out = emu(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in emu.named_parameters() if p.requires_grad}


def _assert_same(a, b, rtol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        scale = float(grad.abs().max().clamp_min(1e-6))
        assert float((grad - grads_b[name]).abs().max()) <= rtol * 10 * scale, name


def _blocks(emu):
    return [block for _, block in emu.emulator_blocks()]


@pytest.mark.parametrize(("family", "bits"), [("gpt2", None), ("opt", 8), ("bloom", None), ("llama", 4), ("qwen3", None)])
def test_compiled_training_step_matches_eager_and_the_blocks_share_one_graph(family, bits):
    # ten blocks: more than Dynamo's recompile limit (8), were each block its own compilation
    emu = ok.make_emulator(tiny_model(family, n_layers=12, seed=3), bottom=1, top=1, emulator_layers=10, fast=True, bits=bits)
    ids, mask = random_ids(2, 13, seed=5), padded_mask(2, 13)
    eager = _step(emu, ids, mask)
    emu.set_compile("default")
    assert emu.compiled == "default" and all(compile_mode(b) == "default" for b in _blocks(emu))
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = _step(emu, ids, mask)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # one graph for the ten blocks, not ten
    again = _step(emu, ids, mask)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # same shapes: no recompilation
    assert compile_report(emu) == {"blocks": 10, "mode": "default", "compiled_calls": 20}
    _assert_same(eager, compiled)
    _assert_same(compiled, again, rtol=0)


def test_evaluation_generation_and_traced_calls_run_eagerly():
    emu = ok.make_emulator(tiny_model("llama", n_layers=5, seed=1), bottom=1, top=1, emulator_layers=2, fast=True, compile=True)
    ids = random_ids(2, 7, seed=2)
    emu.eval()
    with torch.no_grad():
        logits = emu(input_ids=ids).logits
        generated = emu.generate(ids, max_new_tokens=3, do_sample=False)
    assert compile_report(emu)["compiled_calls"] == 0
    emu.set_compile(None)
    with torch.no_grad():
        torch.testing.assert_close(emu(input_ids=ids).logits, logits)
        assert torch.equal(emu.generate(ids, max_new_tokens=3, do_sample=False), generated)
    emu.set_compile(True).train()
    with MemoryTracker():  # a dispatch mode (the memory tracker, fake tensors): eager
        emu(input_ids=ids, labels=ids).loss.backward()
    assert compile_report(emu)["compiled_calls"] == 0
    emu(input_ids=ids, labels=ids).loss.backward()
    assert compile_report(emu)["compiled_calls"] == 2


def test_dropout_in_sdpa_blocks_traces_as_one_graph():
    """The benchmark's setting: SDPA attention and dropout 0.1 in training (random numbers inside the graph)."""
    model = tiny_model("gpt2", n_layers=6, seed=4, attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=4, fast=True, compile="default")
    ids, mask = random_ids(2, 11, seed=3), padded_mask(2, 11)
    graphs_before = counters["stats"]["unique_graphs"]
    losses = [_step(emu, ids, mask)[0] for _ in range(2)]
    assert counters["stats"]["unique_graphs"] - graphs_before == 1 and compile_report(emu)["compiled_calls"] == 8
    assert all(torch.isfinite(loss) for loss in losses) and losses[0] != losses[1]  # fresh dropout masks each step


def test_two_emulators_compile_apart_and_checkpointed_blocks_run_eagerly():
    model = tiny_model("llama", n_layers=5, seed=6)
    first = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True, compile=True)
    second = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True, compile=True)
    graphs_before = counters["stats"]["unique_graphs"]
    _step(first, random_ids(1, 9, seed=1), padded_mask(1, 9))
    _step(second, random_ids(3, 9, seed=2), padded_mask(3, 9))  # another batch: its own static graph, not a shared one
    assert counters["stats"]["unique_graphs"] - graphs_before == 2
    eager = _step(first.set_compile(None), random_ids(2, 9, seed=4), padded_mask(2, 9))
    hf = first.set_compile(True).model
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed = _step(first, random_ids(2, 9, seed=4), padded_mask(2, 9))
    assert compile_report(first)["compiled_calls"] == 0  # not even in the backward's rerun
    _assert_same(eager, checkpointed)


def test_remove_quantize_and_fast_blocks_keep_the_emulator_right():
    model = tiny_model("gpt2", n_layers=6, seed=7)
    ids, mask = random_ids(2, 9, seed=1), padded_mask(2, 9)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, compile="default")
    plain = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    classes = [type(b).__name__ for b in _blocks(plain)]
    _assert_same(_step(plain, ids, mask), _step(emu, ids, mask))
    for target in (plain, emu):  # modules swapped inside compiled blocks: Dynamo compiles again
        target.quantize_(8)
        target.use_fast_blocks()
    assert emu.compiled == "default" and plain.compiled is None
    _assert_same(_step(plain, ids, mask), _step(emu, ids, mask))
    assert compile_report(emu)["compiled_calls"] == 4
    emu.set_compile(None)
    assert emu.compiled is None and [type(b) for b in _blocks(emu)] == [type(b) for b in _blocks(plain)]
    assert [type(b).__name__ for b in _blocks(emu)] == classes


def test_compiled_blocks_refuse_what_they_cannot_combine_with():
    model = tiny_model("opt", n_layers=5, seed=2)
    with pytest.raises(CompileError, match="one of default, reduce-overhead"):
        ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, compile="fastest")
    with pytest.raises(CompileError, match="do not combine with recompute"):
        ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, compile=True, recompute="full")
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, recompute="selective")
    with pytest.raises(CompileError, match="set_recompute"):
        emu.set_compile("default")
    emu.set_recompute(None).set_cuda_graphs(True)
    with pytest.raises(CompileError, match="set_cuda_graphs"):
        emu.set_compile("default")
    emu.set_cuda_graphs(False).set_compile("reduce-overhead")
    with pytest.raises(CompileError, match="set_compile"):
        emu.set_recompute("full")
    with pytest.raises(GraphError, match="reduce-overhead"):
        emu.set_cuda_graphs(True)
    with pytest.raises(RecomputeError, match="remove_compile"):
        apply_recompute(_blocks(emu))
    with pytest.raises(CompileError, match="compiled already"):
        apply_compile(_blocks(emu))
    remove_compile(_blocks(emu))
    adapter = [block for _, block in emu.adapter_blocks()]
    with pytest.raises(CompileError, match="trainable parameters"):
        apply_compile(adapter)
    assert all(isinstance(e, OffsiteError) for e in (CompileError("x"), GraphError("x")))


def test_bench_measures_a_compiled_method_and_notes_its_compilation():
    from test_bench import TINY

    settings = BenchSettings(models=[TINY], methods=["ot+fast+compile"], batches=[1], seq=16, device="cpu", warmup=1, steps=2)
    rows = run_bench(settings).rows
    assert [r["source"] for r in rows] == ["measured"]  # accounted on fake tensors would be the eager step
    (row,) = rows
    assert "error" not in row, row
    assert row["compiled"]["mode"] == "default" and row["compiled"]["compiled_calls"] == 2 * 4  # 2 blocks, 1 + 1 + 2 steps
    assert row["first_step_ms"] > row["step_ms_median"] > 0
    assert "torch.compile mode default" in format_markdown(rows)


# --- on a GPU: Inductor's Triton backend, and PyTorch's CUDA graphs ---------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize(("family", "bits"), [("gpt2", None), ("llama", 4)])
def test_compiled_blocks_match_eager_on_gpu(mode, family, bits):
    def build(compile_mode):
        model = tiny_model(family, n_layers=6, seed=7).cuda()
        return ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, bits=bits, fast=True, compile=compile_mode).train()

    eager, compiled = build(None), build(mode)
    graphs_before, skips_before = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    for step in range(4):  # reduce-overhead: warm-up, recording, then replays
        ids, mask = random_ids(2, 33, seed=step).cuda(), padded_mask(2, 33).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_e, grads_e = _step(eager, ids, mask)
            loss_c, grads_c = _step(compiled, ids, mask)
        assert float(loss_c) == pytest.approx(float(loss_e), rel=2e-2)
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=5e-2, atol=5e-3)
    assert compile_report(compiled)["compiled_calls"] == 4 * 3
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    assert counters["inductor"]["cudagraph_skips"] == skips_before  # reduce-overhead did replay CUDA graphs


@pytest.mark.gpu
def test_reduce_overhead_two_forwards_before_one_backward_on_gpu():
    model = tiny_model("llama", n_layers=6, seed=3).cuda()
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, bits=4, group_size=32, fast=True).train()
    compiled = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, bits=4, group_size=32, fast=True).train()
    compiled.set_compile("reduce-overhead")
    ids = [random_ids(2, 33, seed=s).cuda() for s in range(4)]
    mask = padded_mask(2, 33).cuda()
    for target in (emu, compiled):
        _step(target, ids[0], mask), _step(target, ids[1], mask)
        target.zero_grad(set_to_none=True)
        loss = target(input_ids=ids[2], attention_mask=mask, labels=ids[2]).loss
        loss = loss + target(input_ids=ids[3], attention_mask=mask, labels=ids[3]).loss
        loss.backward()
    for p, q in zip(compiled.adapter_parameters(), emu.adapter_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4)
