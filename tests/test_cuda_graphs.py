"""CUDA graphs for the frozen emulator blocks (offsite_kernels.nn.cuda_graphs).

Off the GPU the wrapper's logic (when to capture, what to replay, what runs eagerly, the replay
guards) runs against a CPU stand-in for ``torch.cuda.make_graphed_callables`` that has a captured
graph's hazards: static inputs, a static output that the next replay overwrites, and one saved
state per block that the next forward replaces. The GPU-marked tests run the real captures.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import StandInGraph, gen, random_ids

from offsite_kernels import make_emulator
from offsite_kernels.benchmark import BenchError, BenchMethod, BenchModel, BenchSettings, run_bench
from offsite_kernels.benchmark.measure import measure_training
from offsite_kernels.benchmark.report import _notes
from offsite_kernels.nn import GraphError, apply_cuda_graphs, cuda_graphs_enabled, remove_cuda_graphs, reset_cuda_graphs
from offsite_kernels.nn import cuda_graphs as cg
from offsite_kernels.nn.cuda_graphs import graph_stack
from offsite_kernels.tiny import tiny_model

_TINY_BENCH = BenchModel(
    name="tiny-gpt2",
    model_type="gpt2",
    config=dict(n_embd=32, n_layer=4, n_head=2, n_positions=32, vocab_size=97, bos_token_id=0, eos_token_id=1),
    layout="1-2-1",
    scaled={},
)


@pytest.fixture
def engine(cuda_graphs_on_cpu):
    return cuda_graphs_on_cpu


def _emulator(model_type: str, graphs: bool, **kwargs):
    model = tiny_model(model_type, n_layers=6, seed=7)
    emu = make_emulator(model, bottom=1, top=1, emulator_layers=3, cuda_graphs=graphs, **kwargs)
    return emu.train()


def _step(emu, ids, mask=None) -> tuple[float, list[torch.Tensor]]:
    emu.zero_grad(set_to_none=True)
    loss = emu(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in emu.adapter_parameters()]


def _stack(emu):
    return graph_stack(emu.emulator_blocks()[0][1])


@pytest.mark.parametrize("fast", [False, True], ids=["hf_blocks", "fast_blocks"])
def test_graphed_emulator_matches_eager_and_replays(engine, model_type, fast):
    eager, graphed = _emulator(model_type, False, fast=fast), _emulator(model_type, True, fast=fast)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: a 4-D mask goes into every block as a graph input
    for step in range(4):
        ids = random_ids(2, 9, seed=100 + step)
        loss_e, grads_e = _step(eager, ids, mask)
        loss_g, grads_g = _step(graphed, ids, mask)
        assert loss_g == pytest.approx(loss_e, rel=1e-6)
        for a, b in zip(grads_e, grads_g, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    stack = _stack(graphed)
    assert engine.captures == 1 and len(stack.sets) == 1
    (graphs,) = stack.sets.values()
    assert graphs.replays == 3 * 3  # steps 2-4 replay all three emulator blocks (step 1 warms up)
    assert all(slot.free for slot in graphs.slots)


def test_two_forwards_before_one_backward_run_the_second_eagerly(engine):
    emu = _emulator("llama", True)
    ids = [random_ids(2, 9, seed=s) for s in (1, 2, 3, 4)]
    _step(emu, ids[0]), _step(emu, ids[1])  # warm-up, capture
    reference = copy.deepcopy(emu)
    remove_cuda_graphs([b for _, b in reference.emulator_blocks()])
    for model in (emu, reference):
        model.zero_grad(set_to_none=True)
        loss_a = model(input_ids=ids[2], labels=ids[2]).loss
        loss_b = model(input_ids=ids[3], labels=ids[3]).loss  # block graphs still hold loss_a's state
        (loss_a + 2 * loss_b).backward()
    (graphs,) = _stack(emu).sets.values()
    for p, q in zip(emu.adapter_parameters(), reference.adapter_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert all(slot.free for slot in graphs.slots)


def test_the_stand_in_has_the_hazard_the_guard_prevents():
    """Without the slot guard the second forward would overwrite the first one's saved state."""
    fn = lambda x: ((x * x).sum(-1, keepdim=True) * x,)  # noqa: E731
    graph = StandInGraph(fn, (torch.zeros(3, requires_grad=True),))
    x1, x2 = torch.tensor([1.0, 2.0, 3.0], requires_grad=True), torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    y1 = graph(x1 * 1)[0].sum()
    graph(x2 * 1)
    y1.backward()
    x1_ref = x1.detach().requires_grad_(True)
    fn(x1_ref)[0].sum().backward()
    assert not torch.allclose(x1.grad, x1_ref.grad)


def test_an_output_kept_across_steps_is_not_overwritten(engine):
    emu = _emulator("gpt2", True)
    kept = []
    last = emu.emulator_blocks()[-1][1]
    handle = last.register_forward_hook(lambda m, a, out: kept.append(out if isinstance(out, torch.Tensor) else out[0]))
    for step in range(4):
        _step(emu, random_ids(2, 9, seed=step))
    handle.remove()
    assert _stack(emu).sets, "nothing was captured"
    snapshots = [k.detach().clone() for k in kept]
    _step(emu, random_ids(2, 9, seed=99))
    for k, snap in zip(kept, snapshots, strict=True):
        assert torch.equal(k, snap)
    assert not torch.equal(kept[-1], kept[-2])


def test_second_backward_through_an_old_graph_after_a_new_replay_raises(engine):
    emu = _emulator("opt", True)
    _step(emu, random_ids(2, 9, seed=1)), _step(emu, random_ids(2, 9, seed=2))
    old = emu(input_ids=random_ids(2, 9, seed=3), labels=random_ids(2, 9, seed=3)).loss
    old.backward(retain_graph=True)
    _step(emu, random_ids(2, 9, seed=4))  # replays every block again
    with pytest.raises(GraphError, match="second backward through a CUDA-graphed block"):
        old.backward()


def test_a_new_shape_is_captured_after_its_own_warm_up_and_max_graph_sets_caps(engine):
    emu = _emulator("gpt2", False)
    blocks = [b for _, b in emu.emulator_blocks()]
    apply_cuda_graphs(blocks, warmup_passes=2, max_graph_sets=1)
    emu.set_recompute(None)  # keeps the graphs (and their settings) on
    assert cuda_graphs_enabled(blocks[0])
    for seed in range(3):
        _step(emu, random_ids(2, 9, seed=seed))
    assert engine.captures == 1  # two warm-up passes, then the capture
    reference = copy.deepcopy(emu)
    remove_cuda_graphs([b for _, b in reference.emulator_blocks()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            ids = random_ids(2, 13, seed=10 + seed)
            assert _step(emu, ids)[0] == pytest.approx(_step(reference, ids)[0], rel=1e-6)
    assert engine.captures == 1
    assert sum("max_graph_sets" in str(w.message) for w in caught) == 1


def test_a_failed_capture_warns_once_and_runs_eagerly(engine):
    engine.fail = RuntimeError("operation not permitted when stream is capturing")
    emu, reference = _emulator("bloom", True), _emulator("bloom", False)
    with pytest.warns(UserWarning, match="capture of the frozen blocks failed"):
        for seed in range(4):
            ids = random_ids(2, 9, seed=seed)
            assert _step(emu, ids)[0] == pytest.approx(_step(reference, ids)[0], rel=1e-6)
    stack = _stack(emu)
    assert not stack.sets and len(stack.failed) == 1 and "not permitted" in next(iter(stack.failed.values()))


def test_moving_the_blocks_or_reset_drops_the_graphs(engine):
    emu = _emulator("llama", True)
    for seed in range(2):
        _step(emu, random_ids(2, 9, seed=seed))
    assert _stack(emu).sets
    emu.to(torch.float32)
    assert not _stack(emu).sets
    for seed in range(2):
        _step(emu, random_ids(2, 9, seed=seed))
    assert _stack(emu).sets and engine.captures == 2
    reset_cuda_graphs([b for _, b in emu.emulator_blocks()])
    assert not _stack(emu).sets


def test_calls_that_cannot_be_graphed_run_eagerly(engine):
    emu = _emulator("gpt2", True)
    ids = random_ids(2, 9, seed=0)
    for _ in range(3):
        with torch.no_grad():
            emu(input_ids=ids, labels=ids)
        emu(input_ids=ids, labels=ids, use_cache=True).loss.backward()  # a KV cache goes into every block
    assert engine.captures == 0
    with torch.autograd.graph.save_on_cpu():  # saved-tensor hooks (as inside a checkpoint)
        for _ in range(3):
            emu(input_ids=ids, labels=ids).loss.backward()
    assert engine.captures == 0


def test_signature_describes_tensors_and_constants():
    block = torch.nn.Identity()
    hidden = torch.randn(2, 3, 4, requires_grad=True) * 1
    mask = torch.zeros(2, 1, 3, 3)
    found = cg.signature(block, (hidden, None), {"attention_mask": mask, "use_cache": False, "pos": (mask, mask)})
    assert found is not None
    sig, tensors = found
    assert tensors[0] is hidden and len(tensors) == 4
    args, kwargs = sig.rebuild(tensors)
    assert args[0] is hidden and args[1] is None and kwargs["use_cache"] is False and kwargs["pos"][1] is mask
    other, _ = cg.signature(block, (hidden, None), {"attention_mask": mask, "use_cache": True, "pos": (mask, mask)})
    assert other != sig
    needs_grad = torch.zeros(3, requires_grad=True)
    assert cg.signature(block, (hidden,), {"alibi": needs_grad}) is None
    assert cg.signature(block, (hidden,), {"cache": object()}) is None


def test_apply_refuses_what_cannot_work(model_type):
    emu = _emulator(model_type, False)
    blocks = [b for _, b in emu.emulator_blocks()]
    with pytest.raises(GraphError, match="trainable parameters"):
        apply_cuda_graphs([b for _, b in emu.adapter_blocks()])
    with pytest.raises(GraphError, match=">= 1"):
        apply_cuda_graphs(blocks, warmup_passes=0)
    emu.set_recompute("full")
    with pytest.raises(GraphError, match="recomputation do not combine"):
        apply_cuda_graphs(blocks)
    with pytest.raises(GraphError, match="recomputation do not combine"):
        emu.set_cuda_graphs(True)
    emu.set_recompute(None)
    apply_cuda_graphs(blocks)
    with pytest.raises(GraphError, match="already replay"):
        apply_cuda_graphs(blocks)
    with pytest.raises(GraphError, match="do not combine"):
        emu.set_recompute("full")
    with pytest.raises(GraphError, match="do not combine"):
        make_emulator(tiny_model(model_type, n_layers=6), bottom=1, top=1, recompute="full", cuda_graphs=True)


def test_offsite_model_keeps_graphs_and_their_settings_through_fast_blocks(engine):
    emu = _emulator("llama", True)
    emu.set_cuda_graphs(True, warmup_passes=2, max_graph_sets=3)
    emu.use_fast_blocks()
    block = emu.emulator_blocks()[0][1]
    assert emu.cuda_graphs and emu.fast_blocks and emu.recompute is None
    assert graph_stack(block).warmup_passes == 2 and graph_stack(block).max_graph_sets == 3
    assert "CUDA graphs" in repr(emu)
    with pytest.raises(GraphError, match="do not combine"):
        emu.set_recompute("selective")
    reference = _emulator("llama", False, fast=True)
    for seed in range(4):
        ids = random_ids(2, 9, seed=seed)
        assert _step(emu, ids)[0] == pytest.approx(_step(reference, ids)[0], rel=1e-6)
    assert engine.captures == 1 and _stack(emu).sets
    emu.quantize_(8)
    assert not _stack(emu).sets  # the graphs read the dense weights: dropped
    emu.set_cuda_graphs(False)
    assert not emu.cuda_graphs
    assert type(block) is type(reference.emulator_blocks()[0][1])


def test_a_leaf_input_gets_its_own_gradient_not_a_static_buffer(engine):
    emu = _emulator("gpt2", True)
    blocks = [b for _, b in emu.emulator_blocks()]
    reference = copy.deepcopy(blocks)
    remove_cuda_graphs(reference)
    grads = {}
    for name, run in (("graphed", blocks), ("eager", reference)):
        kept = []
        for seed in range(4):
            leaf = torch.randn(2, 9, emu.config.hidden_size, generator=gen(seed), requires_grad=True)
            h = leaf
            for block in run:
                out = block(h)
                h = out if isinstance(out, torch.Tensor) else out[0]
            (h * h).sum().backward()
            kept.append(leaf.grad)
        grads[name] = [g.clone() for g in kept] + kept  # values at the end, and the tensors kept
    assert engine.captures == 1
    for a, b in zip(grads["graphed"], grads["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_alternating_signatures_are_each_captured_after_their_own_warm_up(engine):
    emu = _emulator("opt", True)
    for seed in range(3):
        for length in (9, 12):
            _step(emu, random_ids(2, length, seed=seed))
    assert engine.captures == 2 and len(_stack(emu).sets) == 2


def test_a_pass_that_raises_counts_for_nothing(engine, monkeypatch):
    emu = _emulator("gpt2", True)
    last = emu.emulator_blocks()[-1][1]
    handle = last.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        _step(emu, random_ids(2, 9, seed=0))
    handle.remove()
    assert not _stack(emu)._seen
    for seed in range(3):
        _step(emu, random_ids(2, 9, seed=seed))
    assert engine.captures == 1


def test_capture_runs_in_thread_local_mode(monkeypatch):
    seen = {}

    def old_make_graphed_callables(callables, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None):
        seen["mode"] = torch.cuda.graph.keywords["capture_error_mode"]
        return callables

    original = torch.cuda.graph
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", old_make_graphed_callables)
    assert cg._make_graphed_callables(("f",), ((),), None) == ("f",)
    assert seen["mode"] == "thread_local" and torch.cuda.graph is original

    def new_make_graphed_callables(callables, sample_args, pool=None, capture_error_mode="global"):
        seen["new"] = capture_error_mode
        return callables

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", new_make_graphed_callables)
    cg._make_graphed_callables(("f",), ((),), None)
    assert seen["new"] == "thread_local"


# --- offsite bench ---------------------------------------------------------------------------------
def test_bench_graph_modifier_parses_and_refuses_recompute():
    method = BenchMethod.parse("ot+graph+lora+fast")
    assert method.name == "ot+lora+fast+graph" and method.cuda_graphs and "CUDA graphs" in method.label
    with pytest.raises(BenchError, match="pick one"):
        BenchMethod.parse("ot+fast+recompute+graph")
    with pytest.raises(BenchError, match="full fine-tuning takes only"):
        BenchMethod.parse("ft+graph")


def test_bench_skips_graph_rows_off_the_gpu():
    said = []
    settings = BenchSettings(
        models=[_TINY_BENCH], methods=["ot+fast+graph"], batches=[1], seq=8, device="cpu", warmup=1, steps=1, progress=said.append
    )
    assert run_bench(settings).rows == []
    assert any("need a CUDA GPU" in line for line in said) and any("not accounting" in line for line in said)


def test_bench_measurement_reports_the_graphs(engine):
    method = BenchMethod.parse("ot+lora+fast+graph")
    measured = measure_training(_TINY_BENCH, method, 2, 8, torch.device("cpu"), None, False, warmup=2, steps=2)
    # step 1 warms up, steps 2-4 replay both emulator blocks
    assert measured.graphs == {"sets": 1, "block_replays": 3 * 2, "pool_bytes": 0, "failed": []}
    row = {"label": method.label, "cuda_graphs": {"sets": 0, "block_replays": 0, "pool_bytes": 0, "failed": ["Boom: x"]}}
    assert "no CUDA graph was captured, the blocks ran eagerly: Boom" in _notes([row])[1]


# --- on a GPU: real captures ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fast", [False, True], ids=["hf_blocks", "fast_blocks"])
# one family per block structure (the GPU suite's test stage has a time budget; as many as before five families came):
# learned positions and Conv1D, ReLU, ALiBi, rotary with SwiGLU, eager soft-capped attention, query and key norms,
# parallel residuals, a precomputed interleaved rotary table, a fused gate-up projection, in-place adds
@pytest.mark.parametrize(
    "model_type", ["gpt2", "opt", "bloom", "llama", "gemma2", "gemma3_text", "gpt_neox", "gptj", "phi3", "falcon"]
)
def test_cuda_graphs_match_eager_on_gpu(model_type, fast):
    def build(graphs: bool):
        model = tiny_model(model_type, n_layers=6, seed=7).cuda()
        return make_emulator(model, bottom=1, top=1, emulator_layers=3, fast=fast, cuda_graphs=graphs).train()

    eager, graphed = build(False), build(True)
    for step in range(4):
        ids = random_ids(2, 33, seed=step).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_e, grads_e = _step(eager, ids)
            loss_g, grads_g = _step(graphed, ids)
        assert loss_g == pytest.approx(loss_e, rel=2e-2)
        for a, b in zip(grads_e, grads_g, strict=True):
            torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-3)
    stack = _stack(graphed)
    assert len(stack.sets) == 1 and not stack.failed, stack.failed
    (graphs,) = stack.sets.values()
    assert graphs.replays == 3 * 3
    assert stack.pool_bytes() > 0


@pytest.mark.gpu
def test_cuda_graphs_two_forwards_and_int4_on_gpu():
    model = tiny_model("llama", n_layers=6, seed=3).cuda()
    emu = make_emulator(model, bottom=1, top=1, emulator_layers=3, bits=4, group_size=32, fast=True, cuda_graphs=True)
    emu.train()
    reference = copy.deepcopy(emu)
    reference.set_cuda_graphs(False)
    ids = [random_ids(2, 33, seed=s).cuda() for s in range(4)]
    for model_ in (emu, reference):
        _step(model_, ids[0]), _step(model_, ids[1])
        model_.zero_grad(set_to_none=True)
        (model_(input_ids=ids[2], labels=ids[2]).loss + model_(input_ids=ids[3], labels=ids[3]).loss).backward()
    for p, q in zip(emu.adapter_parameters(), reference.adapter_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    assert _stack(emu).sets and not _stack(emu).failed
