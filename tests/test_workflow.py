"""The workflow pieces: data, training loop and resumption, fine-tuning methods, distillation, evaluation."""

import json
import math
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import offsite_kernels as ok
from offsite_kernels.tiny import tiny_model, tiny_tokenizer
from offsite_kernels.workflow import (
    DataError,
    LoraSettings,
    TrainSettings,
    check_tokenizer,
    distill,
    finetune,
    kd_loss,
    load_blocks,
    load_choices,
    multiple_choice,
    perplexity,
    read_texts,
)
from offsite_kernels.workflow.data import ChoiceItem
from offsite_kernels.workflow.distill import DistillError
from offsite_kernels.workflow.loop import batch_indices, lr_factor
from offsite_kernels.workflow.methods import BottleneckSettings, MethodError

PATTERN = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(PATTERN)
    return path


def quiet(**kwargs):
    return TrainSettings(progress=False, **kwargs)


# --- data ---------------------------------------------------------------------------------
def test_read_plain_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n\nworld")
    assert read_texts(tmp_path / "a.txt") == ["hello\n\nworld"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "  \n", "is empty"),
        ("fields.jsonl", '{"body": "x"}\n', "string field 'text'"),
        ("broken.jsonl", '{"text": "x"\n', "not valid JSON"),
    ],
)
def test_bad_text_files(tmp_path, tokenizer, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_blocks(tmp_path / name, tokenizer, 16)


def test_blocks_and_too_short_file(tmp_path, tokenizer, text_file):
    blocks = load_blocks(text_file, tokenizer, 32)
    assert blocks.ids.shape == (len(PATTERN) // 32, 32)  # one token per character, plus one end-of-text
    assert tokenizer.decode(blocks.ids[0].tolist()) == PATTERN[:32]
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match="fewer than one block of 32"):
        load_blocks(tmp_path / "short.txt", tokenizer, 32)
    with pytest.raises(DataError, match="does not exist"):
        load_blocks(tmp_path / "missing.txt", tokenizer, 32)


def test_tokenizer_that_does_not_fit_the_model(tokenizer):
    model = tiny_model("llama", vocab_size=50)
    with pytest.raises(DataError, match="tokenizer has 78 tokens but the model's vocabulary has 50"):
        check_tokenizer(tokenizer, model)
    check_tokenizer(tokenizer, tiny_model("llama"))


def test_multiple_choice_file_validation(tmp_path):
    good = tmp_path / "mc.jsonl"
    good.write_text(json.dumps({"context": "a b", "choices": ["c", "d"], "gold": 1}) + "\n")
    assert load_choices(good) == [ChoiceItem("a b", ("c", "d"), 1)]
    for record in (
        {"context": "x", "choices": ["a"], "gold": 0},
        {"context": "x", "choices": ["a", "b"], "gold": 2},
        {"choices": ["a", "b"], "gold": 0},
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError, match="needs 'context'"):
            load_choices(bad)


# --- loop -----------------------------------------------------------------------------------
def test_schedule_and_batch_order():
    s = TrainSettings(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, s) == pytest.approx(0.1) and lr_factor(9, s) == pytest.approx(1.0)
    assert lr_factor(10, s) == pytest.approx(1.0) and lr_factor(100, s) == pytest.approx(0.1)
    assert lr_factor(55, s) == pytest.approx(0.55)
    s = TrainSettings(batch_size=3, grad_accum=2, seed=5)
    first_epoch = torch.cat([batch_indices(step, micro, 12, s) for step in range(2) for micro in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(12))  # each block once per epoch
    assert torch.equal(batch_indices(3, 1, 12, s), batch_indices(3, 1, 12, s))


def adapter_snapshot(emu):
    return {k: v.clone() for k, v in emu.adapter_state_dict().items()}


@pytest.mark.parametrize("method", ["full", "lora", "bitfit", "bottleneck"])
def test_finetune_methods_learn_and_touch_only_what_they_should(tokenizer, text_file, method):
    model = tiny_model("opt", seed=3)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    frozen_before = {k: v.clone() for k, v in emu.state_dict().items()}
    data = load_blocks(text_file, tokenizer, 24)
    before = perplexity(emu, data)["loss"]
    result = finetune(
        emu,
        data,
        quiet(steps=25, batch_size=4, lr=3e-3 if method == "full" else 3e-2, warmup=2),
        method=method,
        lora=LoraSettings(rank=4),
    )
    after = perplexity(emu, data)["loss"]
    needed = {"full": 0.5, "lora": 0.15, "bitfit": 0.15, "bottleneck": 0.15}[method]  # the others train far fewer weights
    assert after < before - needed, f"{method}: {before:.3f} -> {after:.3f}"
    assert result.steps == 25 and math.isfinite(result.final_loss)
    adapter_keys = set(emu.adapter_state_dict())
    prefix = {f"model.{emu.family.blocks}.{p}." for p in emu.layout.adapter_positions()}
    state = emu.state_dict()
    if method == "bottleneck":
        added = set(state) - set(frozen_before)
        assert added and all(".offsite_bottleneck." in k for k in added)
        state = {k: v for k, v in state.items() if k not in added}
    assert state.keys() == frozen_before.keys(), "LoRA must be merged away"
    for k, v in state.items():
        if not any(k.startswith(p) for p in prefix):
            assert torch.equal(v, frozen_before[k]), f"{method} changed frozen tensor {k}"
        elif (method == "bitfit" and not k.endswith("bias")) or method == "bottleneck":
            assert torch.equal(v, frozen_before[k]), f"{method} changed {k}"
        elif method == "lora" and not any(t in k for t in emu.family.lora_targets):
            assert torch.equal(v, frozen_before[k]), f"lora changed {k}, which is not a LoRA target"
    assert adapter_keys


def test_bitfit_needs_biases_and_lora_needs_targets():
    emu = ok.make_emulator(tiny_model("llama"), bottom=1, top=1, emulator_layers=2)
    data = load_blocks_from_text("abc " * 50)
    with pytest.raises(MethodError, match="have none"):
        finetune(emu, data, quiet(steps=1), method="bitfit")
    with pytest.raises(MethodError, match="no module of the adapter blocks matches"):
        finetune(emu, data, quiet(steps=1), method="lora", lora=LoraSettings(target_modules=("nope",)))


def load_blocks_from_text(text, block=16):
    from offsite_kernels.workflow.data import TextBlocks

    ids = tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // block
    return TextBlocks(torch.tensor(ids[: n * block]).view(n, block), "memory")


def test_killed_run_resumes_to_the_same_adapter(tokenizer, text_file, tmp_path, monkeypatch):
    data = load_blocks(text_file, tokenizer, 24)
    valid = load_blocks(text_file, tokenizer, 24, max_blocks=4)
    settings = dict(steps=8, batch_size=3, grad_accum=2, lr=5e-3, warmup=2, eval_every=3, seed=7)

    def fresh():
        return ok.make_emulator(tiny_model("gpt2", seed=11), bottom=1, top=1, emulator_layers=2)

    straight = fresh()
    finetune(straight, data, quiet(**settings), valid=valid)

    resumed = fresh()
    ckpt = tmp_path / "ckpt"
    calls = {"n": 0}
    real_forward = type(resumed).forward

    def dying_forward(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5 * settings["grad_accum"] + 2:  # dies inside step 6, after the checkpoint at step 5
            raise KeyboardInterrupt("killed")
        return real_forward(self, *a, **k)

    monkeypatch.setattr(type(resumed), "forward", dying_forward)
    log = tmp_path / "loss.jsonl"
    settings["loss_log"] = str(log)
    with pytest.raises(KeyboardInterrupt):
        finetune(resumed, data, quiet(checkpoint_every=5, checkpoint_dir=str(ckpt), **settings), valid=valid)
    monkeypatch.setattr(type(resumed), "forward", real_forward)
    assert (ckpt / "trainer_state.json").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["counters"]["step"] == 5
    with log.open("a") as f:
        f.write('{"step": 7, "lo')  # a line the kill cut short

    restarted = fresh()  # a new process: nothing kept in memory but the checkpoint
    result = finetune(restarted, data, quiet(checkpoint_every=5, checkpoint_dir=str(ckpt), **settings), valid=valid)
    a, b = straight.adapter_state_dict(), restarted.adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))  # the steps after the checkpoint once, not twice
    again = finetune(fresh(), data, quiet(checkpoint_every=5, checkpoint_dir=str(ckpt), **settings), valid=valid)
    assert again.final_loss == result.final_loss == logged[-1]["loss"]  # a finished run reports its last loss
    assert [r["step"] for r in map(json.loads, log.read_text().splitlines())] == list(range(1, 9))


# --- distillation --------------------------------------------------------------------------
def test_kd_loss_formula():
    t, s = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = (((t.double() - s.double()) / t.double().pow(2).mean().sqrt()) ** 2).mean()
    assert float(kd_loss(t, s)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kd_loss(t, t)) == 0.0


def test_distill_moves_emulator_toward_teacher_and_leaves_adapter(tokenizer, text_file):
    from offsite_kernels.workflow.distill import middle_output_index

    teacher = tiny_model("llama", seed=5)
    emu = ok.make_emulator(teacher, bottom=1, top=1, emulator_layers=2)
    adapter = adapter_snapshot(emu)
    data = load_blocks(text_file, tokenizer, 24)
    s_idx, t_idx = middle_output_index(emu)

    def kd():
        with torch.no_grad():
            t = teacher(input_ids=data.ids[:4], output_hidden_states=True).hidden_states[t_idx]
            s = emu(input_ids=data.ids[:4], output_hidden_states=True).hidden_states[s_idx]
        return float(kd_loss(t, s))

    before = kd()
    distill(
        emu,
        teacher,
        data,
        quiet(steps=20, batch_size=4, lr=3e-3, warmup=2),
        valid=load_blocks(text_file, tokenizer, 24, max_blocks=4),
    )
    assert kd() < 0.7 * before
    after = emu.adapter_state_dict()
    assert all(torch.equal(after[k], adapter[k]) for k in adapter)
    assert {n for n, p in emu.named_parameters() if p.requires_grad} == {
        n for n, p in emu.named_parameters() if any(p is q for q in emu.adapter_parameters())
    }


def test_distill_refuses_wrong_teacher_or_lowbit_emulator(tokenizer, text_file):
    data = load_blocks(text_file, tokenizer, 24)
    emu = ok.make_emulator(tiny_model("llama"), bottom=1, top=1, emulator_layers=2)
    with pytest.raises(DistillError, match="8-block"):
        distill(emu, tiny_model("llama", n_layers=8), data, quiet(steps=1))
    for other in ("gpt_neox", "gemma"):  # blocks at another path, or at the same one: the family is named either way
        with pytest.raises(DistillError, match=rf"the teacher is a '{other}' model; .* 6-block 'llama' model"):
            distill(emu, tiny_model(other), data, quiet(steps=1))
    lowbit = ok.make_emulator(tiny_model("llama"), bottom=1, top=1, emulator_layers=2, bits=8)
    with pytest.raises(DistillError, match="already low-bit"):
        distill(lowbit, tiny_model("llama"), data, quiet(steps=1))
    with pytest.raises(DistillError, match="not those the emulator was made from"):
        distill(emu, tiny_model("llama", seed=7), data, quiet(steps=1))  # same shape, other weights


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_blocks_longer_than_learned_positions_are_refused_with_the_limit(tokenizer, text_file, model_type):
    model = tiny_model(model_type, max_position_embeddings=16)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    long, fits = load_blocks(text_file, tokenizer, 17), load_blocks(text_file, tokenizer, 16, max_blocks=2)
    for run in (
        lambda: perplexity(model, long),
        lambda: finetune(emu, long, quiet(steps=1)),
        lambda: finetune(emu, fits, quiet(steps=1), valid=long),
        lambda: distill(emu, model, long, quiet(steps=1)),
    ):
        with pytest.raises(DataError, match=r"blocks of 17 tokens .* longer than the 16 positions"):
            run()
    assert math.isfinite(perplexity(model, fits)["loss"])


def test_rotary_and_alibi_models_take_blocks_of_any_length(tokenizer, text_file):
    for model_type in ("llama", "bloom"):
        model = tiny_model(model_type, max_position_embeddings=16) if model_type == "llama" else tiny_model(model_type)
        assert math.isfinite(perplexity(model, load_blocks(text_file, tokenizer, 40, max_blocks=1))["loss"])


def test_multiple_choice_keeps_the_end_of_a_context_longer_than_the_positions(tokenizer):
    model = tiny_model("gpt2", max_position_embeddings=16, seed=3)
    context, choices = "a long context that the model cannot take whole", ["xy", "zw"]
    short = context[-(16 - 2) :]  # a character tokenizer: one token per character
    assert multiple_choice(model, tokenizer, [ChoiceItem(context, tuple(choices), 0)]) == multiple_choice(
        model, tokenizer, [ChoiceItem(short, tuple(choices), 0)]
    )
    with pytest.raises(DataError, match="has 16 tokens; the model takes 16 positions"):
        multiple_choice(model, tokenizer, [ChoiceItem("ab", ("x" * 16, "y"), 0)])


def test_finetune_refuses_an_unknown_method_and_adapter_methods_on_a_plain_model(tokenizer, text_file):
    data = load_blocks(text_file, tokenizer, 24, max_blocks=2)
    with pytest.raises(MethodError, match="unknown fine-tuning method 'no-such'"):
        finetune(
            ok.make_emulator(tiny_model("llama"), bottom=1, top=1, emulator_layers=2), data, quiet(steps=1), method="no-such"
        )
    plain = tiny_model("llama")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(MethodError, match=r"plain Hugging Face model .* trains with method 'full'"):
        finetune(plain, data, quiet(steps=1), method="lora")
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


# --- evaluation ----------------------------------------------------------------------------
def test_perplexity_is_exp_of_token_mean_nll(tokenizer, text_file):
    model = tiny_model("bloom", seed=2)
    data = load_blocks(text_file, tokenizer, 20, max_blocks=5)
    result = perplexity(model, data, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=data.ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), data.ids[:, 1:].reshape(-1))
    assert result["loss"] == pytest.approx(float(nll), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert result["tokens"] == 5 * 19


def test_multiple_choice_scores_by_log_likelihood(tokenizer):
    model = tiny_model("llama", seed=4)

    def ll(context, choice):
        c = tokenizer(context, add_special_tokens=False)["input_ids"]
        t = tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([c + t])).logits[0].double().log_softmax(-1)
        return sum(float(logp[len(c) - 1 + i, tok]) for i, tok in enumerate(t))

    context, choices = "abc", ["de", "fghij", "k"]
    raw = [ll(context, ch) for ch in choices]
    norm = [v / len(ch) for v, ch in zip(raw, choices, strict=True)]
    best_raw, best_norm = raw.index(max(raw)), norm.index(max(norm))
    item = ChoiceItem(context, tuple(choices), best_raw)
    scores = multiple_choice(model, tokenizer, [item])
    assert scores.accuracy == 1.0 and scores.accuracy_norm == float(best_norm == best_raw)
    wrong = ChoiceItem(context, tuple(choices), (best_raw + 1) % 3)
    assert multiple_choice(model, tokenizer, [wrong]).accuracy == 0.0


def test_bottleneck_adapter_plugs_in_and_checks_before_changing(tokenizer, text_file, tmp_path):
    model = tiny_model("gpt2", seed=21)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    from offsite_kernels.workflow.methods import prepare

    zero_shot = emu(input_ids=ids).logits
    prepare(emu, "bottleneck")
    torch.testing.assert_close(emu(input_ids=ids).logits, zero_shot, rtol=0, atol=0)  # zero-initialised: identity
    finetune(emu, load_blocks(text_file, tokenizer, 24), quiet(steps=5, batch_size=2, lr=1e-2), method="bottleneck")
    emu.save_adapter(tmp_path / "adapter")

    other = tiny_model("gpt2", seed=22)
    with pytest.raises(ok.AdapterMismatchError):
        ok.plug_in(other, tmp_path / "adapter")
    assert not any("bottleneck" in k for k in other.state_dict())  # refused before anything was added

    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugged = ok.plug_in(model, tmp_path / "adapter", inplace=False)
    state = plugged.state_dict()
    assert {k for k in state if "offsite_bottleneck" in k} == {k for k in emu.adapter_state_dict() if "offsite_bottleneck" in k}
    assert all(torch.equal(state[k], before[k]) for k in before)  # the block weights themselves untouched
    assert not torch.equal(plugged(input_ids=ids).logits, model(input_ids=ids).logits)
    reloaded = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2).load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, emu(input_ids=ids).logits, rtol=0, atol=0)

    # saved as a whole model (offsite plug-in) and loaded back: the bottlenecks come back with it
    from offsite_kernels.emulator.bottleneck import load_model
    from offsite_kernels.hf_io import load_local_model, save_model_dir

    save_model_dir(plugged, tmp_path / "plugged")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing else unexpected or missing to warn about
        loaded = load_model(tmp_path / "plugged", attn_implementation="eager")  # as tiny_model's
    plain = load_local_model(tmp_path / "plugged", attn_implementation="eager")  # Hugging Face alone: no bottlenecks
    assert not any("offsite_bottleneck" in k for k in plain.state_dict())
    assert loaded.state_dict().keys() == state.keys()
    torch.testing.assert_close(loaded(input_ids=ids).logits, plugged(input_ids=ids).logits, rtol=0, atol=0)


def test_a_damaged_saved_bottleneck_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from offsite_kernels.emulator.bottleneck import load_model
    from offsite_kernels.errors import PackageError

    model = tiny_model("gpt2", seed=23)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    for block, down, what in [
        ("transformer.h.9", torch.zeros(4, model.config.n_embd), "name no block"),
        ("transformer.h.0", torch.zeros(4), "no 2-D down.weight"),
        ("transformer.h.0", torch.zeros(4, model.config.n_embd + 1), "do not fit"),
    ]:
        save_file({**tensors, f"{block}.offsite_bottleneck.down.weight": down}, str(weights))
        with pytest.raises(PackageError, match=what):
            load_model(tmp_path / "m")


# --- review fixes: checkpoints never clobber, never resume another run ------------------------
def test_foreign_checkpoint_dir_is_refused_and_left_alone(tokenizer, text_file, tmp_path):
    from offsite_kernels.errors import PackageError

    ckpt = tmp_path / "mine"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("keep me")
    emu = ok.make_emulator(tiny_model("llama"), bottom=1, top=1, emulator_layers=2)
    data = load_blocks(text_file, tokenizer, 24)
    with pytest.raises(PackageError, match="holds no training checkpoint"):
        finetune(emu, data, quiet(steps=2, checkpoint_every=1, checkpoint_dir=str(ckpt)))
    assert [p.name for p in ckpt.iterdir()] == ["notes.txt"]


def test_checkpoint_of_another_run_is_refused(tokenizer, text_file, tmp_path):
    from offsite_kernels.errors import PackageError

    ckpt = str(tmp_path / "ckpt")
    data = load_blocks(text_file, tokenizer, 24)
    first = ok.make_emulator(tiny_model("llama", seed=1), bottom=1, top=1, emulator_layers=2)
    finetune(first, data, quiet(steps=2, lr=1e-3, checkpoint_every=1, checkpoint_dir=ckpt))
    for changed in (dict(steps=2, lr=5e-4), dict(steps=3, lr=1e-3)):
        again = ok.make_emulator(tiny_model("llama", seed=1), bottom=1, top=1, emulator_layers=2)
        before = {k: v.clone() for k, v in again.adapter_state_dict().items()}
        with pytest.raises(PackageError, match="belongs to another run"):
            finetune(again, data, quiet(checkpoint_every=1, checkpoint_dir=ckpt, **changed))
        after = again.adapter_state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # refused before its weights were restored
    same = dict(steps=2, lr=1e-3, checkpoint_every=1, checkpoint_dir=ckpt)
    other_data = load_blocks(text_file, tokenizer, 24)
    other_data.ids[[0, 1]] = other_data.ids[[1, 0]]  # the same tokens in another order
    cases = [
        dict(data=other_data),
        dict(valid=load_blocks(text_file, tokenizer, 24, max_blocks=2)),
        dict(method="lora"),
        dict(method="bottleneck", bottleneck=BottleneckSettings(size=4)),
    ]
    for case in cases:
        emu = ok.make_emulator(tiny_model("llama", seed=1), bottom=1, top=1, emulator_layers=2)
        with pytest.raises(PackageError, match="belongs to another run"):
            finetune(emu, case.pop("data", data), quiet(**same), **case)
    lora_ckpt = str(tmp_path / "lora")
    lora_run = dict(steps=2, lr=1e-3, checkpoint_every=1, checkpoint_dir=lora_ckpt)
    emu = ok.make_emulator(tiny_model("llama", seed=1), bottom=1, top=1, emulator_layers=2)
    finetune(emu, data, quiet(**lora_run), method="lora", lora=LoraSettings(alpha=16.0))
    emu = ok.make_emulator(tiny_model("llama", seed=1), bottom=1, top=1, emulator_layers=2)
    with pytest.raises(PackageError, match="belongs to another run"):
        finetune(emu, data, quiet(**lora_run), method="lora", lora=LoraSettings(alpha=512.0))


def test_a_checkpoint_save_killed_between_its_renames_is_recovered(tokenizer, text_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    data = load_blocks(text_file, tokenizer, 24)
    run = dict(steps=3, lr=1e-3, checkpoint_every=1, checkpoint_dir=str(ckpt))
    straight = ok.make_emulator(tiny_model("gpt2", seed=2), bottom=1, top=1, emulator_layers=2)
    finetune(straight, data, quiet(steps=3, lr=1e-3))
    first = ok.make_emulator(tiny_model("gpt2", seed=2), bottom=1, top=1, emulator_layers=2)
    finetune(first, data, quiet(**{**run, "steps": 3}))
    # as a save killed after moving the checkpoint aside, before moving the new one in, leaves it ...
    (tmp_path / ".ckpt.old-x1").mkdir()
    os.replace(ckpt, tmp_path / ".ckpt.old-x1" / "ckpt")
    # ... beside a complete temporary folder that is not taken: it may be any run's
    other = ok.make_emulator(tiny_model("gpt2", seed=2), bottom=1, top=1, emulator_layers=2)
    finetune(other, data, quiet(**{**run, "steps": 5, "checkpoint_dir": str(tmp_path / ".ckpt.tmp-x2")}))
    resumed = ok.make_emulator(tiny_model("gpt2", seed=2), bottom=1, top=1, emulator_layers=2)
    with pytest.warns(UserWarning, match="interrupted; resuming from the checkpoint of step 3 it had moved aside"):
        finetune(resumed, data, quiet(**run))
    assert (ckpt / "trainer_state.json").is_file() and not (tmp_path / ".ckpt.old-x1").exists()
    assert (tmp_path / ".ckpt.tmp-x2" / "trainer_state.json").is_file()  # left as it was
    a, b = straight.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(ckpt)  # deleted by hand to start over: only the complete temporary folder is left, and not taken
    fresh = ok.make_emulator(tiny_model("gpt2", seed=2), bottom=1, top=1, emulator_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finetune(fresh, data, quiet(**run))
    a, b = straight.adapter_state_dict(), fresh.adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # trained from step 0, as asked


def test_distill_restores_the_callers_teacher_and_refuses_pruned(tokenizer, text_file):
    teacher = tiny_model("llama", seed=5).train()
    teacher.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in teacher.parameters()]
    emu = ok.make_emulator(teacher, bottom=1, top=1, emulator_layers=2)
    distill(emu, teacher, load_blocks(text_file, tokenizer, 24), quiet(steps=1, batch_size=2))
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == flags
    pruned = ok.make_emulator(teacher, bottom=1, top=1, emulator_layers=2, prune=0.3)
    with pytest.raises(DistillError, match="distill the unpruned emulator, then prune"):
        distill(pruned, teacher, load_blocks(text_file, tokenizer, 24), quiet(steps=1))


def test_distill_runs_a_teacher_in_bf16_without_rounding_or_copying_it(tokenizer, text_file, monkeypatch):
    import importlib

    distill_module = importlib.import_module("offsite_kernels.workflow.distill")  # the package exports distill()
    teacher = tiny_model("llama", seed=6, tie_word_embeddings=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    storages = {k: v.untyped_storage().data_ptr() for k, v in teacher.state_dict().items()}
    seen: list[tuple[torch.dtype, bool, torch.dtype]] = []
    monkeypatch.setattr(distill_module, "_teacher_dtype", lambda device: torch.bfloat16)  # as on a GPU
    real_forward = type(teacher).forward

    def recording_forward(self, *a, **k):
        seen.append((self.lm_head.weight.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_forward(self, *a, **k)

    monkeypatch.setattr(type(teacher), "forward", recording_forward)
    emu = ok.make_emulator(teacher, bottom=1, top=1, emulator_layers=2)
    distill(emu, teacher, load_blocks(text_file, tokenizer, 24), quiet(steps=1, batch_size=2))
    # already on the training device: run under bf16 autocast, its fp32 weights neither cast nor copied
    assert seen and set(seen) == {(torch.float32, True, torch.bfloat16)}
    after = teacher.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert {k: v.untyped_storage().data_ptr() for k, v in after.items()} == storages
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight


def test_a_teacher_moved_and_cast_for_the_run_gets_its_own_tensors_back():
    import importlib

    distill_module = importlib.import_module("offsite_kernels.workflow.distill")
    teacher = tiny_model("llama", seed=6, tie_word_embeddings=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    own = distill_module._own_tensors(teacher)
    teacher.to(torch.bfloat16)  # what distill does with a teacher that is not on the GPU yet
    distill_module._put_back(own)
    after = teacher.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())  # not a bf16 round trip
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight


def test_seed_fixes_lora_initialisation(tokenizer, text_file):
    def run():
        emu = ok.make_emulator(tiny_model("opt", seed=3), bottom=1, top=1, emulator_layers=2)
        finetune(emu, load_blocks(text_file, tokenizer, 24), quiet(steps=2, batch_size=2, seed=9), method="lora")
        return emu.adapter_state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_refuses_an_adapter_that_does_not_fit_before_evaluating(tokenizer, text_file, tmp_path, monkeypatch):
    from offsite_kernels.workflow import report

    evaluated: list[str] = []
    monkeypatch.setattr(report, "evaluate_setting", lambda name, *a, **k: evaluated.append(name) or {"setting": name})
    data = load_blocks(text_file, tokenizer, 24)
    model = tiny_model("llama", seed=1)
    ok.make_emulator(tiny_model("llama", seed=2), bottom=1, top=1, emulator_layers=2).save_adapter(tmp_path / "foreign")
    ok.make_emulator(model, bottom=1, top=1, emulator_layers=3).save_adapter(tmp_path / "layout131")
    for adapter, message in (("foreign", "other weights"), ("layout131", "layout")):
        emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
        with pytest.raises(ok.AdapterMismatchError, match=message):
            report.four_settings(model, emu, tmp_path / adapter, data)
        assert evaluated == []
    ok.make_emulator(model, bottom=1, top=1, emulator_layers=2).save_adapter(tmp_path / "fits")
    rows = report.four_settings(model, ok.make_emulator(model, bottom=1, top=1, emulator_layers=2), tmp_path / "fits", data)
    assert [r["setting"] for r in rows] == list(report.SETTINGS[:4]) == evaluated


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BottleneckSettings(size=0), "bottleneck size"),
        (lambda: BottleneckSettings(size=-3), "bottleneck size"),
        (lambda: LoraSettings(rank=0), "LoRA rank"),
        (lambda: LoraSettings(alpha=0.0), "LoRA alpha"),
        (lambda: LoraSettings(alpha=float("nan")), "LoRA alpha"),
        (lambda: LoraSettings(dropout=1.0), "LoRA dropout"),
        (lambda: LoraSettings(target_modules=()), "target modules"),
        (lambda: LoraSettings(target_modules=("q_proj", "")), "target modules"),
    ],
)
def test_method_settings_out_of_range_are_refused(make, message):
    with pytest.raises(MethodError, match=message):
        make()


def test_a_checkpoint_of_an_older_fingerprint_format_is_refused_by_name(tokenizer, text_file, tmp_path):
    from offsite_kernels.errors import PackageError

    ckpt = tmp_path / "ckpt"
    data = load_blocks(text_file, tokenizer, 24)
    run = dict(steps=2, lr=1e-3, checkpoint_every=1, checkpoint_dir=str(ckpt))
    finetune(ok.make_emulator(tiny_model("llama", seed=1), bottom=1, top=1, emulator_layers=2), data, quiet(**run))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["counters"]["fingerprint"]["run"]  # as the format before the run settings joined it
    state["counters"]["fingerprint"]["data"] = {"shape": list(data.ids.shape), "checksum": int(data.ids.sum())}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(PackageError, match="written by an older offsite-kernels"):
        finetune(ok.make_emulator(tiny_model("llama", seed=1), bottom=1, top=1, emulator_layers=2), data, quiet(**run))


def test_unmerged_lora_is_refused_by_both_writers(tmp_path):
    """PEFT's own tensor names (q_proj.base_layer.weight, q_proj.lora_A.default.weight) would go into the files,
    which plug_in and from_pretrained cannot read: both writers refuse until the LoRA layers are merged."""
    from offsite_kernels.errors import PackageError
    from offsite_kernels.workflow.methods import export, prepare

    model = tiny_model("llama", n_layers=4, seed=3)
    emu = ok.make_emulator(model, bottom=1, top=1, emulator_layers=2)
    prepare(emu, "lora")
    with torch.no_grad():
        for name, p in emu.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)  # a trained LoRA: the merged adapter differs from the source blocks
    with pytest.raises(PackageError, match="unmerged PEFT layers"):
        emu.save_adapter(tmp_path / "adapter")
    with pytest.raises(PackageError, match="unmerged PEFT layers"):
        emu.save_pretrained(tmp_path / "emulator")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "emulator").exists()
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = emu(input_ids=ids, return_logits=True).logits
    export(emu)
    emu.save_adapter(tmp_path / "adapter")
    emu.save_pretrained(tmp_path / "emulator")
    plugged = ok.plug_in(tiny_model("llama", n_layers=4, seed=3), tmp_path / "adapter")
    emulated = ok.make_emulator(plugged, bottom=1, top=1, emulator_layers=2)
    with torch.no_grad():
        torch.testing.assert_close(emulated(input_ids=ids, return_logits=True).logits, before, rtol=1e-5, atol=1e-5)
        loaded = ok.OffsiteModel.from_pretrained(tmp_path / "emulator")
        torch.testing.assert_close(loaded(input_ids=ids, return_logits=True).logits, before, rtol=1e-5, atol=1e-5)
