"""Low-bit emulators: make_emulator(bits=...) for every family, through the package and plug-in."""

import importlib

import pytest
import torch
from conftest import padded_mask, random_ids
from safetensors import safe_open

import offsite_kernels as ok
from offsite_kernels.emulator.package import _stored_names
from offsite_kernels.quant import QuantizationError


def dense_twin(full_model, emu, bits, group_size):
    """The same emulator kept dense, each emulator weight replaced by its dequantized value."""
    twin = ok.make_emulator(full_model, bottom=emu.layout.bottom, top=emu.layout.top, strategy=list(emu.layout.emulator))
    for _, block in twin.emulator_blocks():
        for module in block.modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                w = module.weight.detach() if isinstance(module, torch.nn.Linear) else module.weight.detach().t()
                deq = ok.quantize_weight(w, bits=bits, group_size=group_size).dequantize()
                module.weight.data.copy_(deq if isinstance(module, torch.nn.Linear) else deq.t())
        for weights in (p for p in block.parameters() if p.dim() == 3):  # a mixture of experts: each expert's matrix
            for matrix in weights.data:
                matrix.copy_(ok.quantize_weight(matrix, bits=bits, group_size=group_size).dequantize())
    return twin.eval()


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_lowbit_emulator_matches_its_dequantized_twin(full_model, bits):
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2, bits=bits, group_size=32).eval()
    for _, block in emu.emulator_blocks():
        linears = [m for m in block.modules() if isinstance(m, ok.nn.FrozenLinear)]
        assert linears and all(m.format == {8: "int8", 4: "int4", "fp8": "fp8"}[bits] for m in linears)
        assert not any(isinstance(m, torch.nn.Linear) for m in block.modules())
    for _, block in emu.adapter_blocks():
        assert not any(isinstance(m, ok.nn.FrozenLinear) for m in block.modules())
    twin = dense_twin(full_model, emu, bits, 32)
    ids, mask = random_ids(2, 10, seed=3), padded_mask(2, 10)
    out, ref = emu(input_ids=ids, attention_mask=mask, labels=ids), twin(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for (_, a), (_, b) in zip(emu.adapter_blocks(), twin.adapter_blocks(), strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-6)
    assert {n for n, p in emu.named_parameters() if p.requires_grad} == {
        n for n, p in emu.named_parameters() if any(p is q for q in emu.adapter_parameters())
    }


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_lowbit_package_round_trip_and_size(full_model, bits, tmp_path):
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2, bits=bits, group_size=32).eval()
    emu.save_pretrained(tmp_path / "emu")
    loaded = ok.OffsiteModel.from_pretrained(tmp_path / "emu", attn_implementation="eager").eval()
    assert loaded.quantized == emu.quantized
    a, b = emu.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = random_ids(2, 8, seed=4)
    torch.testing.assert_close(loaded(input_ids=ids).logits, emu(input_ids=ids).logits, rtol=0, atol=0)
    # no dense weight of an emulator linear is stored
    with safe_open(str(tmp_path / "emu" / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    for position, records in emu.quantized.items():
        stems = [f"{emu.family.blocks}.{position}.{module}." for module in records]
        stored = _stored_names(emu.model, [stem + field for stem in stems for field in ("weight_data", "weight")])
        for stem in stems:  # under the names transformers stores (Mixtral's experts: block_sparse_moe.experts)
            assert stored[stem + "weight_data"] in names and stored[stem + "weight"] not in names
        in_block = [n for n in names if f"{emu.family.blocks.rsplit('.', 1)[-1]}.{position}." in n and ".experts." in n]
        assert all(n.endswith((".weight_data", ".weight_scales", ".weight_zeros")) for n in in_block)  # no dense expert
    dense = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2)
    dense.save_pretrained(tmp_path / "dense")
    assert (tmp_path / "emu" / "model.safetensors").stat().st_size < (tmp_path / "dense" / "model.safetensors").stat().st_size


def test_adapter_of_lowbit_emulator_plugs_into_full_model(tmp_path):
    from offsite_kernels.tiny import tiny_model

    model = tiny_model("llama", seed=8)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2, bits=4, group_size=32)
    opt = torch.optim.AdamW(list(emu.adapter_parameters()), lr=1e-2)
    ids = random_ids(2, 9, seed=9)
    emu.train()
    emu(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    emu.save_adapter(tmp_path / "adapter")
    plugged = ok.plug_in(model, tmp_path / "adapter", inplace=False)
    adapter = emu.adapter_state_dict()
    assert all(torch.equal(plugged.state_dict()[k], v) for k, v in adapter.items())


def test_bad_bits_fail_before_any_work(full_model):
    with pytest.raises(QuantizationError, match="unsupported bits=3"):
        ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2, bits=3)
    with pytest.raises(QuantizationError, match="group_size must be one of"):
        ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2, bits=4, group_size=100)


@pytest.mark.parametrize("bits", [8, 4, "fp8"])
def test_under_bf16_autocast_every_frozen_linear_runs_in_bf16_like_the_dense_linears(full_model, bits, monkeypatch):
    """Each FrozenLinear called as a module, and each grouped projection of low-bit experts (whose stacked FrozenLinear
    hold the weights), returns bf16."""
    emu = ok.make_emulator(full_model, bottom=1, top=1, emulator_layers=2, bits=bits, group_size=32)
    outputs = {}
    for name, module in emu.named_modules():
        if isinstance(module, ok.nn.FrozenLinear | torch.nn.Linear) or type(module).__name__ == "Conv1D":
            module.register_forward_hook(lambda m, i, o, name=name: outputs.update({name: o.dtype}) and None)
    experts_module = importlib.import_module("offsite_kernels.nn.experts")
    grouped, grouped_dtypes = experts_module.grouped_frozen_linear_from_fields, set()
    monkeypatch.setattr(
        experts_module, "grouped_frozen_linear_from_fields", lambda *a: grouped_dtypes.add((y := grouped(*a)).dtype) or y
    )
    ids = random_ids(2, 8, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emu(input_ids=ids, labels=ids).loss.backward()
    stacked = {
        f"{n}.{w}_experts" for n, m in emu.named_modules() if isinstance(m, ok.nn.FrozenExperts) for w in ("gate_up", "down")
    }
    frozen = {n for n, m in emu.named_modules() if isinstance(m, ok.nn.FrozenLinear)} - stacked
    assert frozen and {outputs[n] for n in frozen} == {torch.bfloat16}
    assert grouped_dtypes == ({torch.bfloat16} if stacked else set())


# --- bf16 / fp16 storage: dense, half the bytes, the same products under autocast ------------------
@pytest.mark.parametrize("bits", ["bf16", "fp16"])
def test_16_bit_storage_is_a_dense_cast(bits):
    w = torch.randn(37, 53, generator=torch.Generator().manual_seed(1))
    qw = ok.quantize_weight(w, bits=bits)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[bits]
    assert qw.format == "dense" and qw.data.dtype == dtype and qw.shape == (37, 53)
    assert torch.equal(qw.dequantize(), w.to(dtype))
    if bits == "fp16":  # past float16's range: refused, not stored as inf
        with pytest.raises(QuantizationError, match=r"beyond torch\.float16's range"):
            ok.quantize_weight(w * 1e5, bits=bits)


def _autocast_step(emu, ids, mask):
    from offsite_kernels.memtrack import SavedBytesBetween

    blocks = [b for _, b in emu.emulator_blocks()]
    emu.train()
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedBytesBetween(blocks[0], blocks[-1], weights_of=emu) as saved:
        loss = emu(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in emu.named_parameters() if p.requires_grad}
    return loss.detach(), grads, saved.bytes


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("fast", [False, True])
def test_bf16_emulator_computes_what_autocast_computes_without_copying_weights(model_type, fast):
    from offsite_kernels.tiny import tiny_model

    model = tiny_model(model_type, n_layers=6, seed=4)
    ids, mask = random_ids(3, 13, seed=5), padded_mask(3, 13)
    fp32 = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, fast=fast)
    bf16 = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, fast=fast, bits="bf16")
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = _autocast_step(fp32, ids, mask), _autocast_step(bf16, ids, mask)
    # nn.Linear casts to bf16 under autocast; GPT-2's Conv1D runs addmm (bias added in the GEMM): close, not equal
    tol = dict(rtol=0, atol=0) if model_type != "gpt2" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss_b, loss_a, **tol)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, **tol)
    # autocast's bf16 copy of every fp32 emulator weight is kept for the backward; stored in bf16, none is made
    weights_bf16 = sum(
        2 * m.weight_data.numel() for _, b in bf16.emulator_blocks() for m in b.modules() if hasattr(m, "weight_data")
    )
    assert saved_a - saved_b >= 0.9 * weights_bf16


def test_bf16_emulator_runs_without_autocast_and_halves_its_package(tmp_path):
    from offsite_kernels.tiny import tiny_model

    model = tiny_model("llama", n_layers=6, seed=4)
    ids = random_ids(2, 9, seed=6)
    fp32 = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3).eval()
    bf16 = ok.make_emulator(model, bottom=1, top=1, emulator_layers=3, bits="bf16").eval()
    torch.testing.assert_close(bf16(input_ids=ids).logits, fp32(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
    fp32.save_pretrained(tmp_path / "fp32")
    bf16.save_pretrained(tmp_path / "bf16")
    loaded = ok.OffsiteModel.from_pretrained(tmp_path / "bf16", attn_implementation="eager").eval()  # as tiny_model's
    assert {m.weight_data.dtype for _, b in loaded.emulator_blocks() for m in b.modules() if hasattr(m, "weight_data")} == {
        torch.bfloat16
    }
    assert torch.equal(loaded(input_ids=ids).logits, bf16(input_ids=ids).logits)

    def emulator_bytes(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return sum(
                f.get_tensor(k).nbytes
                for k in f.keys()  # noqa: SIM118 (a safetensors handle)
                if any(f".layers.{p}." in k for p in bf16.emulator_positions())
            )

    assert emulator_bytes(tmp_path / "bf16") < 0.55 * emulator_bytes(tmp_path / "fp32")
