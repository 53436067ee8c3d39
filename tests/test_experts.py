"""FrozenExperts: a mixture of experts' expert MLPs, frozen, against float64 math and Hugging Face's own module."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import gen

import offsite_kernels as ok
from offsite_kernels.nn import FrozenExperts
from offsite_kernels.tiny import tiny_model

E, H, INNER, T, K = 5, 24, 13, 11, 2  # odd sizes; 11 tokens over 5 experts, two each


def expert_weights(dtype, seed):
    gate_up = (torch.randn(E, 2 * INNER, H, generator=gen(seed)) / H**0.5).to(dtype)
    down = (torch.randn(E, H, INNER, generator=gen(seed + 1)) / INNER**0.5).to(dtype)
    return gate_up, down


def routing(seed, unused_expert=True, sentinel=True):
    """Top-k expert indices (expert 3 chosen by no token; one slot routed nowhere: index E) and fp32 weights."""
    choices = [e for e in range(E) if not (unused_expert and e == 3)]
    g = gen(seed)
    index = torch.stack([torch.tensor(choices)[torch.randperm(len(choices), generator=g)[:K]] for _ in range(T)])
    if sentinel:
        index[4, 1] = E
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    return index, weights


def reference(x, gate_up, down, index, weights):
    """The math in float64: each token's weighted sum of its experts' SwiGLU MLPs (index E: no expert)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            if e == E:
                continue
            gate, up = (gate_up[e].double() @ x[t].double()).chunk(2)
            out[t] += weights[t, j].double() * (down[e].double() @ (F.silu(gate) * up))
    return out


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_match_float64(backend, dtype):
    gate_up, down = expert_weights(dtype, 1)
    index, weights = routing(3)
    x = torch.randn(T, H, generator=gen(4)).to(dtype).requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    experts = FrozenExperts(gate_up, down, "silu")
    y = experts(x, index, w)
    assert y.dtype == dtype and y.shape == (T, H)
    x64, w64 = x.detach().double().requires_grad_(True), weights.double().requires_grad_(True)
    expected = reference(x64, gate_up, down, index, w64)
    scale = float(expected.abs().max())
    assert float((y.double() - expected).abs().max()) <= TOL[dtype] * scale
    gy = torch.randn(T, H, generator=gen(5)).to(dtype)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    ex, ew = torch.autograd.grad(expected, (x64, w64), gy.double())
    assert float((gx.double() - ex).abs().max()) <= TOL[dtype] * float(ex.abs().max())
    assert float((gw.double() - ew).abs().max()) <= TOL[dtype] * float(ew.abs().max())
    assert float(gw[4, 1]) == 0.0  # the slot routed nowhere adds nothing
    assert not any(isinstance(b, torch.nn.Parameter) for b in experts.buffers()) and not list(experts.parameters())


def low_bit(gate_up, down, bits):
    return FrozenExperts.from_module(FrozenExperts(gate_up, down), "silu", bits=bits, group_size=32)


def dequantized(experts):
    """The low-bit experts' weights as float64 ``[E, 2I, H]`` and ``[E, H, I]``."""
    gate_up, down = (getattr(experts, f"{w}_experts").weight.dequantize().double() for w in ("gate_up", "down"))
    return gate_up.view(E, 2 * INNER, H), down.view(E, H, INNER)


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_bit_experts_match_float64_of_their_dequantized_weights(backend, bits, dtype):
    """Through the grouped frozen linear (Triton's grouped kernels, or the reference): output, input and routing-weight
    gradients against the float64 math of the stored weights; an unused expert and a slot routed nowhere."""
    gate_up, down = expert_weights(dtype, 21)
    index, weights = routing(22)
    experts = low_bit(gate_up, down, bits)
    x = torch.randn(T, H, generator=gen(23)).to(dtype).requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    y = experts(x, index, w)
    x64, w64 = x.detach().double().requires_grad_(True), weights.double().requires_grad_(True)
    expected = reference(x64, *dequantized(experts), index, w64)
    assert y.dtype == dtype and float((y.double() - expected).abs().max()) <= TOL[dtype] * float(expected.abs().max())
    gy = torch.randn(T, H, generator=gen(24)).to(dtype)
    for got, want in zip(torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(expected, (x64, w64), gy.double()), strict=True):
        assert float((got.double() - want).abs().max()) <= TOL[dtype] * float(want.abs().max())
    assert all(not b.requires_grad and b.grad is None for b in experts.buffers()) and not list(experts.parameters())


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_experts_by_default_on_the_cpu_run_expert_by_expert(monkeypatch, bits):
    """Off a GPU each expert's rows go through the frozen linear's own backend (the native kernels where built): the
    same values as the reference, to the native GEMM's rounding."""
    gate_up, down = expert_weights(torch.float32, 25)
    index, weights = routing(26)
    experts, x = low_bit(gate_up, down, bits), torch.randn(T, H, generator=gen(27))
    monkeypatch.delenv("OFFSITE_BACKEND", raising=False)
    y = experts(x, index, weights)
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")
    torch.testing.assert_close(y, experts(x, index, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_stacked_quantization_is_each_experts_own(bits):
    """The stacked [E * N, K] weight holds, row for row, what quantizing each expert's weight alone stores."""
    gate_up, down = expert_weights(torch.float32, 28)
    experts = low_bit(gate_up, down, bits)
    for name, weights in (("gate_up", gate_up), ("down", down)):
        stacked = getattr(experts, f"{name}_experts").weight
        rows = weights.shape[1]
        for e, w in enumerate(weights):
            alone = ok.quantize_weight(w, bits=bits, group_size=32)
            for field in ("data", "scales", "zeros"):
                mine = getattr(stacked, field)
                if mine is None:
                    assert getattr(alone, field) is None
                    continue
                assert torch.equal(mine[e * rows : (e + 1) * rows].view(torch.uint8), getattr(alone, field).view(torch.uint8))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hugging_face_experts(model_type, dtype):
    """Same output and input gradients as the Hugging Face module it replaces, on its own router's choices."""
    model = tiny_model(model_type, n_layers=3, seed=6, dtype=dtype)
    sparse = next(block.mlp for block in model.model.layers if hasattr(block.mlp, "experts"))  # DeepSeek: dense first
    hf_experts = sparse.experts
    frozen = FrozenExperts.from_module(hf_experts, model.config.hidden_act)
    x = torch.randn(T, model.config.hidden_size, generator=gen(7)).to(dtype)
    _, weights, index = sparse.gate(x)
    results = []
    for module in (hf_experts, frozen):
        xi, wi = x.clone().requires_grad_(True), weights.detach().clone().requires_grad_(True)
        y = module(xi, index, wi)
        results.append((y.detach().double(), *(g.double() for g in torch.autograd.grad(y.sum(), (xi, wi)))))
    for got, expected in zip(results[1], results[0], strict=True):
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= (1e-5 if dtype == torch.float32 else 2e-2) * scale


def test_saves_no_expert_input_and_no_activation_output():
    """Per expert the fused activation saves the projection's output only; the frozen projections save no input (the
    weights they keep are views of the buffers). Each expert's output is kept for the routing weights' gradient, as in
    Hugging Face's module."""
    gate_up, down = expert_weights(torch.float32, 8)
    index, weights = routing(9, sentinel=False)
    x = torch.randn(T, H, generator=gen(10), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        FrozenExperts(gate_up, down)(x, index, weights)
    weights_storage = {gate_up.untyped_storage().data_ptr(), down.untyped_storage().data_ptr()}
    activations = [t for t in saved if t.is_floating_point() and t.untyped_storage().data_ptr() not in weights_storage]
    widths = sorted({t.shape[-1] for t in activations})
    assert widths == [1, H, 2 * INNER]  # routing weights, expert outputs, gate_up outputs: no input, no act output
    assert sum(t.numel() for t in activations if t.shape[-1] == 2 * INNER) == T * K * 2 * INNER


def test_bad_weights_name_the_problem():
    gate_up, down = expert_weights(torch.float32, 11)
    with pytest.raises(ValueError, match="3-D"):
        FrozenExperts(gate_up[0], down)
    with pytest.raises(ValueError, match="do not fit together"):
        FrozenExperts(gate_up, down[:, :, :-1])
    with pytest.raises(ValueError, match="no fused gated kernel"):
        FrozenExperts(gate_up, down, "relu")
    stacked = low_bit(gate_up, down, 8)
    with pytest.raises(ValueError, match=r"do not fit together.*\[E \* 2I, H\] and \[E \* H, I\]"):
        FrozenExperts(stacked.gate_up_experts, ok.nn.FrozenLinear.from_linear(torch.nn.Linear(INNER, H * (E - 1)), bits=8))
    with pytest.raises(TypeError, match="must both be 3-D tensors"):
        FrozenExperts(gate_up, stacked.down_experts)
    with pytest.raises(ValueError, match="low-bit already"):
        FrozenExperts.from_module(stacked, "silu", bits=4)


@pytest.mark.parametrize("bits", [None, 4])
def test_dense_and_low_bit_experts_train_through_fast_blocks(bits):
    """Fast blocks keep dense experts as Hugging Face runs them and low-bit ones as quantized (FrozenExperts, fused);
    with selective recomputation the adapters' gradients are those of the plain emulator of the same weights."""
    model = tiny_model("mixtral", n_layers=5, seed=12)
    kwargs = dict(bottom=1, top=1, emulator_layers=2, bits=bits, group_size=32)
    plain = ok.make_emulator(model, **kwargs)
    fast = ok.make_emulator(model, **kwargs, fast=True, recompute="selective")
    experts = [b.mlp.experts for _, b in fast.emulator_blocks()]
    assert all(isinstance(e, FrozenExperts) == (bits is not None) for e in experts)
    assert fast.fast_blocks and not any("experts" in entry for entry in fast.fast_blocks)
    ids = torch.randint(0, 97, (2, 9), generator=gen(13))
    grads = []
    for emu in (plain, fast):
        emu.train()
        loss = emu(input_ids=ids, labels=ids).loss
        grads.append(torch.autograd.grad(loss, list(emu.adapter_parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_low_bit_experts_compile_whole_and_take_cuda_graphs():
    """Low-bit experts route on the device and run each projection as one grouped op: a compile of the whole graph
    traces them without a break (the routing, the grouped custom ops and the scatter of the outputs), and CUDA graphs
    are accepted (the capture itself needs a GPU)."""
    model = tiny_model("olmoe", n_layers=5, seed=14)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, bits=8, fast=True)
    block = emu.emulator_blocks()[0][1]
    experts = block.mlp.experts
    assert isinstance(experts, FrozenExperts) and experts.low_bit
    x = torch.randn(T, model.config.hidden_size, generator=gen(15), requires_grad=True)
    index, weights = torch.randint(0, experts.num_experts, (T, K), generator=gen(16)), torch.rand(T, K, generator=gen(17))
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, index, weights), experts(x, index, weights), rtol=0, atol=0)
    torch.autograd.grad(compiled(x, index, weights).sum(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to graph breaks any more
        assert emu.set_compile("default").compiled == "default"
    emu.set_compile(None)
    assert emu.set_cuda_graphs(True).cuda_graphs


def test_router_logits_give_the_models_own_loss_and_full_recompute_refuses_them():
    """With output_router_logits the load-balancing loss is part of the loss: the model's own head computes it (the
    fused head has none); full recomputation, whose emulator forward keeps no graph, refuses it by name."""
    model = tiny_model("mixtral", n_layers=5, seed=18, output_router_logits=True, router_aux_loss_coef=0.5)
    ids = torch.randint(0, 97, (2, 9), generator=gen(19))
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, fast=True, recompute="selective").train()
    out = emu(input_ids=ids, labels=ids)
    assert out.logits is not None and out.aux_loss is not None and float(out.aux_loss) > 0
    cross_entropy = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, cross_entropy + 0.5 * out.aux_loss, rtol=1e-5, atol=1e-6)
    emu.set_recompute("full")
    with pytest.raises(ok.nn.RecomputeError, match=r"router logits carry no gradient.*'block' or 'selective'"):
        emu(input_ids=ids, labels=ids)
    with torch.no_grad():
        assert emu(input_ids=ids, labels=ids).loss is not None  # evaluation keeps them


def test_low_bit_experts_whose_activation_is_not_the_configs_are_refused():
    model = tiny_model("qwen3_moe", n_layers=5, seed=20)
    model.config.hidden_act = "gelu"  # the experts were built with SiLU
    with pytest.raises(ok.LayoutError, match=r"experts' activation .* is not the config's 'gelu'"):
        ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, bits=4, group_size=32)


def test_a_dense_block_among_sparse_ones_stays_dense_through_a_package(tmp_path):
    """Qwen MoE names its dense blocks by index (``mlp_only_layers``): the emulator renumbers them, so the package
    rebuilds a dense MLP exactly where the kept block has one, and fast blocks fuse it as a gated MLP."""
    model = tiny_model("qwen2_moe", n_layers=6, seed=15)  # source block 2 is dense
    emu = ok.make_emulator(model, bottom=1, top=1, strategy=[2, 3]).eval()
    assert emu.layout.kept_indices == (0, 2, 3, 5)
    assert emu.config.mlp_only_layers == [1] and emu.config.decoder_sparse_step == 1
    emu.save_pretrained(tmp_path / "emu")
    loaded = ok.OffsiteModel.from_pretrained(tmp_path / "emu").eval()
    assert [hasattr(block.mlp, "experts") for block in loaded.blocks] == [True, False, True, True]
    ids = torch.randint(0, 97, (2, 9), generator=gen(16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, emu(input_ids=ids).logits)  # attention: SDPA vs eager
    loaded.use_fast_blocks()
    assert "1.mlp: SwiGLU MLP" in loaded.fast_blocks and "2.mlp.shared_expert: SwiGLU MLP" in loaded.fast_blocks
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, emu(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_deepseeks_leading_dense_blocks_are_counted_again_through_a_low_bit_package(tmp_path):
    """DeepSeek-V3 counts its leading dense blocks (``first_k_dense_replace``): the emulator counts the kept ones, so a
    low-bit package rebuilds dense MLPs exactly where the kept blocks have them, and the same logits."""
    model = tiny_model("deepseek_v3", n_layers=7, seed=31)  # source blocks 0 and 1 are dense
    emu = ok.make_emulator(model, bottom=1, top=1, strategy=[1, 3], bits=4, group_size=32).eval()
    assert emu.layout.kept_indices == (0, 1, 3, 6) and emu.config.first_k_dense_replace == 2
    assert [isinstance(block.mlp.experts, FrozenExperts) for block in emu.blocks[2:3]] == [True]
    emu.save_pretrained(tmp_path / "emu")
    loaded = ok.OffsiteModel.from_pretrained(tmp_path / "emu").eval()
    assert [hasattr(block.mlp, "experts") for block in loaded.blocks] == [False, False, True, True]
    ids = torch.randint(0, 97, (2, 9), generator=gen(32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, emu(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "llama"])
def test_lora_reaches_the_adapter_blocks_only_where_peft_rewrites_a_mixtures_targets(model_type):
    """PEFT turns Mixtral's LoRA targets into bare module names (its transformers-5 conversion), which matched the
    low-bit emulator blocks' projections too and failed on them; the adapter blocks are now named by index."""
    from offsite_kernels.workflow.methods import LoraSettings, prepare

    emu = ok.make_emulator(tiny_model(model_type, n_layers=4, seed=17), bottom=1, top=1, emulator_layers=2, bits=8)
    trainable = prepare(emu, "lora", LoraSettings(rank=2))
    assert trainable and all("lora_" in name for name in trainable)
    blocks = {name.split("layers.")[1].split(".")[0] for name in trainable}  # ...model.layers.<position>...
    assert blocks == {str(p) for p in emu.layout.adapter_positions()} == {"0", "3"}


def test_packages_of_low_bit_experts_are_format_2_and_per_expert_ones_are_refused_by_name(tmp_path):
    """Stacked low-bit experts make a package of format version 2 (an older library refuses it as newer); a package
    without them stays version 1; a version-1 package of low-bit experts (one matrix per expert) is refused, naming the
    layout and the fix, before any weight loads."""
    import json

    model = tiny_model("olmoe", n_layers=5, seed=30)
    ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, bits=8).save_pretrained(tmp_path / "low_bit")
    ok.make_emulator(model, bottom=1, top=1, emulator_layers=2).save_pretrained(tmp_path / "dense")
    record_path = tmp_path / "low_bit" / "offsite.json"
    record = json.loads(record_path.read_text())
    assert record["format_version"] == 2 and json.loads((tmp_path / "dense" / "offsite.json").read_text())["format_version"] == 1
    old = {
        pos: {name.replace("gate_up_experts", "gate_up_experts.0"): r for name, r in recs.items()}
        for pos, recs in record["quantized"].items()
    }
    record_path.write_text(json.dumps({**record, "format_version": 1, "quantized": old}))
    with pytest.raises(
        ok.PackageError, match=r"format version 1\) stores its low-bit experts one matrix per expert.*offsite emulate"
    ):
        ok.OffsiteModel.from_pretrained(tmp_path / "low_bit")


def test_dense_blocks_that_a_count_cannot_name_are_refused():
    """A count of leading dense blocks cannot name a dense block after a sparse one: refused, not rebuilt sparse."""
    from torch import nn

    from offsite_kernels.emulator.build import keep_dense_blocks_dense_

    model = tiny_model("deepseek_v3", n_layers=4, seed=33)
    family = ok.get_family(model)
    blocks = family.get_blocks(model)
    family.set_blocks(model, nn.ModuleList([blocks[2], blocks[0], blocks[3]]))
    with pytest.raises(ok.LayoutError, match=r"count of leading blocks \(first_k_dense_replace\).*dense ones at \[1\]"):
        keep_dense_blocks_dense_(model, family)
