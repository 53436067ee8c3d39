"""`offsite distill`, `finetune`, `eval` and `report` from the command line, and their bad input."""

import json

import pytest

import offsite_kernels as ok
from offsite_kernels.cli import main
from offsite_kernels.tiny import tiny_model, tiny_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 30


@pytest.fixture
def workdir(tmp_path):
    model = tiny_model("llama", seed=12)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "valid.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i : i + 300]}) for i in range(0, 900, 300)))
    (tmp_path / "mc.jsonl").write_text(json.dumps({"context": "the quick brown", "choices": [" fox", " dog"], "gold": 0}) + "\n")
    assert main(["emulate", str(tmp_path / "model"), "-o", str(tmp_path / "emu"), "--layout", "1-2-1", "-q"]) == 0
    return tmp_path


TRAIN = ["--steps", "4", "--batch-size", "2", "--block-size", "32", "--eval-every", "2", "-q"]


def test_distill_finetune_eval_report(workdir, capsys):
    w = workdir
    args = [
        "distill",
        str(w / "emu"),
        "--teacher",
        str(w / "model"),
        "--train",
        str(w / "train.txt"),
        "--valid",
        str(w / "valid.jsonl"),
    ]
    assert main([*args, "-o", str(w / "distilled"), "--bits", "8", *TRAIN]) == 0
    distilled = ok.OffsiteModel.from_pretrained(w / "distilled")
    assert distilled.quantized and (w / "distilled" / "tokenizer.json").is_file()

    args = ["finetune", str(w / "distilled"), "--train", str(w / "train.txt"), "--valid", str(w / "valid.jsonl")]
    assert main([*args, "-o", str(w / "adapter"), "--checkpoint-every", "2", *TRAIN]) == 0
    assert (w / "adapter" / "adapter.safetensors").is_file() and (w / "adapter.ckpt" / "trainer_state.json").is_file()
    assert main([*args, "-o", str(w / "adapter_lora"), "--method", "lora", "--lora-rank", "2", *TRAIN]) == 0
    assert main([*args, "-o", str(w / "adapter_bn"), "--method", "bottleneck", "--bottleneck-size", "8", *TRAIN]) == 0
    full = ["finetune", str(w / "model"), "--full-model", "--train", str(w / "train.txt"), "-o", str(w / "full_ft"), *TRAIN]
    assert main(full) == 0 and (w / "full_ft" / "config.json").is_file()
    capsys.readouterr()

    assert (
        main(
            [
                "eval",
                str(w / "distilled"),
                "--data",
                str(w / "valid.jsonl"),
                "--choices",
                str(w / "mc.jsonl"),
                "--block-size",
                "32",
            ]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out)
    from offsite_kernels.workflow import load_blocks, load_choices, multiple_choice, perplexity

    tokenizer = tiny_tokenizer()
    direct = perplexity(distilled, load_blocks(w / "valid.jsonl", tokenizer, 32))
    assert row["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6) and row["tokens"] == direct["tokens"]
    assert row["accuracy"] == multiple_choice(distilled, tokenizer, load_choices(w / "mc.jsonl")).accuracy

    report = ["report", "--model", str(w / "model"), "--emulator", str(w / "distilled"), "--adapter", str(w / "adapter")]
    report += ["--full-finetuned", str(w / "full_ft")]
    assert main([*report, "--data", str(w / "valid.jsonl"), "--block-size", "32", "--json", str(w / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "| plug-in |" in out and "paper's ordering" in out
    rows = json.loads((w / "report.json").read_text())
    assert [r["setting"] for r in rows] == [
        "full zero-shot",
        "emulator zero-shot",
        "emulator fine-tuned",
        "plug-in",
        "full fine-tune",
    ]


def test_untouched_adapter_report_is_consistent(workdir, capsys):
    """With an untrained adapter, plug-in equals full zero-shot and emulator fine-tuned equals emulator zero-shot."""
    w = workdir
    ok.OffsiteModel.from_pretrained(w / "emu").save_adapter(w / "adapter0")
    report = ["report", "--model", str(w / "model"), "--emulator", str(w / "emu"), "--adapter", str(w / "adapter0")]
    assert main([*report, "--data", str(w / "train.txt"), "--block-size", "32", "--json", str(w / "r.json")]) == 0
    ppl = {r["setting"]: r["perplexity"] for r in json.loads((w / "r.json").read_text())}
    assert ppl["plug-in"] == pytest.approx(ppl["full zero-shot"], rel=1e-6)
    assert ppl["emulator fine-tuned"] == pytest.approx(ppl["emulator zero-shot"], rel=1e-6)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda w: (w / "bad.txt").write_text(""), "is empty"),
        (lambda w: (w / "bad.txt").write_text("ab"), "fewer than one block"),
        (lambda w: (w / "bad.jsonl").write_text('{"content": "x"}\n'), "string field 'text'"),
    ],
)
def test_finetune_bad_data_writes_nothing(workdir, capsys, setup, message):
    w = workdir
    setup(w)
    data = w / ("bad.jsonl" if (w / "bad.jsonl").exists() else "bad.txt")
    assert main(["finetune", str(w / "emu"), "--train", str(data), "-o", str(w / "out"), *TRAIN]) == 2
    assert message in capsys.readouterr().err
    assert not (w / "out").exists()


def test_finetune_refuses_a_model_dir_and_a_foreign_tokenizer(workdir, capsys):
    w = workdir
    assert main(["finetune", str(w / "model"), "--train", str(w / "train.txt"), "-o", str(w / "out"), *TRAIN]) == 2
    assert "not an emulator package" in capsys.readouterr().err
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(200)}
    big = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t1")
    big.save_pretrained(w / "emu")  # a tokenizer of another model
    assert main(["finetune", str(w / "emu"), "--train", str(w / "train.txt"), "-o", str(w / "out"), *TRAIN]) == 2
    assert "do not belong together" in capsys.readouterr().err
    assert not (w / "out").exists()


def test_existing_output_is_refused_before_work(workdir, capsys):
    w = workdir
    (w / "adapter").mkdir()
    assert main(["finetune", str(w / "emu"), "--train", str(w / "train.txt"), "-o", str(w / "adapter"), *TRAIN]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list((w / "adapter").iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-every", "0"], "--eval-every must be at least 1"),
        (["--checkpoint-every", "1", "--checkpoint-dir", "OUT/ckpt"], "must lie outside the output"),
        (["--loss-log", "OUT/no-such-folder/loss.jsonl"], "its folder does not exist"),
    ],
)
def test_bad_training_options_fail_before_work(workdir, capsys, extra, message):
    w = workdir
    extra = [e.replace("OUT", str(w / "out")) for e in extra]
    args = ["finetune", str(w / "emu"), "--train", str(w / "train.txt"), "-o", str(w / "out"), *TRAIN, *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (w / "out").exists()


def test_blocks_longer_than_a_gpt2_position_table_exit_non_zero_with_the_limit(tmp_path, capsys):
    tiny_model("gpt2", seed=3, n_positions=24).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text(TEXT)
    assert main(["emulate", str(tmp_path / "model"), "-o", str(tmp_path / "emu"), "--layout", "1-2-1", "-q"]) == 0
    train = ["finetune", str(tmp_path / "emu"), "--train", str(tmp_path / "train.txt"), "-o", str(tmp_path / "out")]
    assert main([*train, *TRAIN]) == 2  # TRAIN's blocks are 32 tokens
    assert "longer than the 24 positions of the model's position table" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "model"), "--data", str(tmp_path / "train.txt"), "--block-size", "25"]) == 2
    assert "use a block size of at most 24" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _assert_same_adapter(a, b, rtol: float = 1e-4) -> None:
    """The adapters written to directories ``a`` and ``b`` hold the same tensors, up to ``rtol`` of each one's scale."""
    from safetensors.torch import load_file

    first, second = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert first.keys() == second.keys() and first
    for name in first:
        scale = float(first[name].abs().max().clamp_min(1e-6))
        assert float((first[name] - second[name]).abs().max()) <= rtol * scale, name


def test_finetune_with_fast_recomputed_blocks_reaches_the_plain_adapter(workdir):
    w = workdir
    args = ["finetune", str(w / "emu"), "--train", str(w / "train.txt"), *TRAIN]
    assert main([*args, "-o", str(w / "plain")]) == 0
    assert main([*args, "-o", str(w / "fast"), "--fast", "--recompute", "full"]) == 0
    _assert_same_adapter(w / "plain", w / "fast")
    full = ["finetune", str(w / "model"), "--full-model", "--fast", "--train", str(w / "train.txt"), "-o", str(w / "x"), *TRAIN]
    assert main(full) == 2 and not (w / "x").exists()


def test_finetune_with_cuda_graphs_reaches_the_plain_adapter(workdir, cuda_graphs_on_cpu, capsys):
    """--cuda-graphs (captured on the CPU by the stand-in engine) trains the same adapter."""
    w = workdir
    args = ["finetune", str(w / "emu"), "--train", str(w / "train.txt"), *TRAIN]
    assert main([*args, "-o", str(w / "plain"), "--fast"]) == 0
    assert main([*args, "-o", str(w / "graphed"), "--fast", "--cuda-graphs"]) == 0
    assert cuda_graphs_on_cpu.captures >= 1
    _assert_same_adapter(w / "plain", w / "graphed")
    assert main([*args, "-o", str(w / "x"), "--recompute", "full", "--cuda-graphs"]) == 2
    assert "do not combine" in capsys.readouterr().err and not (w / "x").exists()


def test_finetune_with_compiled_blocks_reaches_the_plain_adapter(workdir, capsys):
    """--compile (Inductor's C++ backend on the CPU) trains the same adapter as the eager run."""
    w = workdir
    args = ["finetune", str(w / "emu"), "--train", str(w / "train.txt"), *TRAIN]
    assert main([*args, "-o", str(w / "plain"), "--fast"]) == 0
    assert main([*args, "-o", str(w / "compiled"), "--fast", "--compile"]) == 0
    _assert_same_adapter(w / "plain", w / "compiled")
    assert main([*args, "-o", str(w / "x"), "--compile", "default", "--cuda-graphs"]) == 2
    assert "does not combine" in capsys.readouterr().err and not (w / "x").exists()
