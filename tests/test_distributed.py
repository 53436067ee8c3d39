"""Data-parallel and DeepSpeed training of `offsite finetune` / `offsite distill`, on CPU with gloo.

Each multi-process check launches real processes (torchrun, accelerate launch, the deepspeed
launcher) on a tiny model for a few steps and compares with a single in-process run of the same
global batch: the same loss curve and the same final weights, to fp32 summation-order tolerance.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offsite_kernels.cli import main
from offsite_kernels.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ZERO2 = ROOT / "examples" / "deepspeed" / "zero2_fp32.json"
TEXT = "the quick brown fox jumps over the lazy dog. " * 30
# global micro-batch 4 (2 rows per process), 2 micro-batches per step, clipping that bites, decay, validation
TRAIN = ["--steps", "6", "--batch-size", "4", "--grad-accum", "2", "--block-size", "16", "--lr", "5e-3", "--warmup", "2"]
TRAIN += ["--clip", "0.5", "--weight-decay", "0.01", "--eval-every", "3", "-q"]
TIMEOUT = 240

has_deepspeed = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not has_deepspeed, reason="deepspeed not installed (pip install --no-build-isolation deepspeed)"
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("dist")
    model = tiny_model("llama", seed=12)
    model.save_pretrained(w / "model")
    tiny_tokenizer().save_pretrained(w / "model")
    (w / "train.txt").write_text(TEXT)
    assert main(["emulate", str(w / "model"), "-o", str(w / "emu"), "--layout", "1-2-1", "-q"]) == 0
    assert main(["emulate", str(w / "model"), "-o", str(w / "emu8"), "--layout", "1-2-1", "--bits", "8", "-q"]) == 0
    return w


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    return e


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, args, cwd, expect_ok=True, script=None):
    """Run the CLI (or ``script``) in 2 processes; return the completed process; a failure shows its output."""
    target = [script] if script else ["-m", "offsite_kernels.cli"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target]
    elif launcher == "accelerate":
        config = ROOT / "examples" / "accelerate" / "multi_cpu.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        cmd += ["--main_process_port", str(free_port()), *target]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank"]
        cmd += ["--master_port", str(free_port()), "--module" if not script else "", *target[-1:]]
        cmd = [c for c in cmd if c]
    else:
        raise ValueError(launcher)
    try:
        run = subprocess.run(cmd + args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{launcher} launch did not finish in {TIMEOUT} s:\n{(exc.stdout or '')[-3000:]}\n{(exc.stderr or '')[-3000:]}"
        )
    if expect_ok and run.returncode != 0:
        pytest.fail(f"{launcher} launch failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
    return run


def losses(path):
    return [json.loads(line)["loss"] for line in Path(path).read_text().splitlines()]


def assert_same_adapter(a_dir, b_dir, rel=1e-4):
    a, b = load_file(Path(a_dir) / "adapter.safetensors"), load_file(Path(b_dir) / "adapter.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        scale = float(a[name].abs().max().clamp_min(1e-6))
        assert float((a[name] - b[name]).abs().max()) <= rel * scale, name


@pytest.fixture(scope="module")
def single(work):
    """The reference: one process, the same global batch, in-process."""
    out = {}
    for emu in ("emu", "emu8"):
        args = ["finetune", str(work / emu), "--train", str(work / "train.txt"), "--valid", str(work / "train.txt")]
        args += ["-o", str(work / f"single_{emu}"), "--loss-log", str(work / f"single_{emu}.jsonl"), *TRAIN]
        if emu == "emu8":
            args.append("--fast")
        assert main(args) == 0
        out[emu] = (work / f"single_{emu}", losses(work / f"single_{emu}.jsonl"))
    return out


def finetune_args(work, name, emu="emu", *extra):
    args = ["finetune", str(work / emu), "--train", str(work / "train.txt"), "--valid", str(work / "train.txt")]
    return [*args, "-o", str(work / name), "--loss-log", str(work / f"{name}.jsonl"), *TRAIN, *extra]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_data_parallel_matches_one_process(work, single, launcher):
    launch(launcher, finetune_args(work, f"dp_{launcher}"), work)
    ref_dir, ref_losses = single["emu"]
    got = losses(work / f"dp_{launcher}.jsonl")
    assert len(got) == len(ref_losses) == 6
    assert got == pytest.approx(ref_losses, rel=1e-5)
    assert_same_adapter(ref_dir, work / f"dp_{launcher}")


@needs_deepspeed
def test_deepspeed_zero2_with_fast_lowbit_emulator_matches_one_process(work, single):
    """ZeRO-2 over 2 processes, through an int8 emulator with the fused frozen blocks (--fast)."""
    launch("torchrun", finetune_args(work, "ds_fast", "emu8", "--fast", "--deepspeed", str(ZERO2)), work)
    ref_dir, ref_losses = single["emu8"]
    assert losses(work / "ds_fast.jsonl") == pytest.approx(ref_losses, rel=1e-5)
    assert_same_adapter(ref_dir, work / "ds_fast")


DIE = """
import os, sys
import offsite_kernels.emulator.offsite_model as m
from offsite_kernels.cli import main
forward, calls = m.OffsiteModel.forward, [0]
def dying(self, *a, **k):
    calls[0] += k.get("labels") is not None  # training forwards only (validation passes no labels)
    if calls[0] > 2 * 4 and os.environ.get("RANK") == "0":  # inside step 5 (2 micro-batches a step)
        os._exit(17)  # killed: no clean-up, no exception handling
    return forward(self, *a, **k)
m.OffsiteModel.forward = dying
sys.exit(main(sys.argv[1:]))
"""


@needs_deepspeed
def test_deepspeed_killed_run_resumes_from_its_checkpoint_to_the_same_adapter(work, single):
    """Killed in step 5 after the DeepSpeed checkpoint of step 4; the relaunch resumes and ends where an
    uninterrupted run ends (which matches the single process)."""
    (work / "die.py").write_text(DIE)
    ckpt = work / "ds.ckpt"
    extra = ["--deepspeed", str(ZERO2), "--checkpoint-every", "2", "--checkpoint-dir", str(ckpt)]
    run = launch(
        "torchrun", [*finetune_args(work, "ds_resumed", "emu", *extra)], work, expect_ok=False, script=str(work / "die.py")
    )
    assert run.returncode != 0
    assert not (work / "ds_resumed").exists()
    assert (ckpt / "latest").read_text().strip() == "step4"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step4"]  # older tags removed
    (work / "ds_resumed.jsonl").unlink()
    launch("deepspeed", finetune_args(work, "ds_resumed", "emu", *extra), work)
    assert [json.loads(x)["step"] for x in (work / "ds_resumed.jsonl").read_text().splitlines()] == [5, 6]
    ref_dir, ref_losses = single["emu"]
    assert losses(work / "ds_resumed.jsonl") == pytest.approx(ref_losses[4:], rel=1e-5)
    assert_same_adapter(ref_dir, work / "ds_resumed")
    # the checkpoint holds only the trainable weights: no frozen emulator tensor is copied into it
    model_states = torch.load(ckpt / "step6" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert model_states and all(".layers.1." in k or ".layers.2." not in k for k in model_states)
    assert not any(k.startswith("model.model.layers.1.") or k.startswith("model.model.layers.2.") for k in model_states)


@needs_deepspeed
def test_deepspeed_distill_zero2_matches_one_process(work):
    base = ["distill", str(work / "emu"), "--teacher", str(work / "model"), "--train", str(work / "train.txt"), *TRAIN]
    assert main([*base, "-o", str(work / "distilled1"), "--loss-log", str(work / "distilled1.jsonl")]) == 0
    launch(
        "torchrun",
        [*base, "-o", str(work / "distilled2"), "--loss-log", str(work / "distilled2.jsonl"), "--deepspeed", str(ZERO2)],
        work,
    )
    assert losses(work / "distilled2.jsonl") == pytest.approx(losses(work / "distilled1.jsonl"), rel=1e-5)
    a, b = load_file(work / "distilled1" / "model.safetensors"), load_file(work / "distilled2" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name


# --- errors before any work ------------------------------------------------------------------
def test_world_size_that_does_not_divide_the_batch_fails_before_work(work, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = [
        "finetune",
        str(work / "emu"),
        "--train",
        str(work / "train.txt"),
        "-o",
        str(work / "bad_ws"),
        "--batch-size",
        "3",
        "-q",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--batch-size 3 is the global micro-batch; it must be a multiple of the 2 launched processes" in err
    assert not (work / "bad_ws").exists()


def test_world_size_error_in_a_real_launch(work):
    run = launch(
        "torchrun",
        ["finetune", str(work / "emu"), "--train", str(work / "train.txt"), "-o", str(work / "x3"), "--batch-size", "3"],
        work,
        expect_ok=False,
    )
    assert run.returncode != 0 and "must be a multiple of the 2 launched processes" in run.stderr + run.stdout
    assert not (work / "x3").exists()


BAD_CONFIGS = [
    ("{not json", "is not valid JSON"),
    ('{"train_micro_batch_size_per_gpu": 3}', "'train_micro_batch_size_per_gpu' is 3 but the command line gives 2"),
    ('{"train_batch_size": 64}', "'train_batch_size' is 64 but the command line gives 8"),
    ('{"gradient_clipping": 2.0}', "'gradient_clipping' is 2.0 but the command line gives 1.0"),
    ('{"scheduler": {"type": "WarmupLR"}}', "has a 'scheduler' section"),
    ('{"zero_optimization": {"stage": 3}}', "ZeRO stage 3 would partition the frozen emulator"),
    ('{"zero_optimization": {"stage": 5}}', "stage must be 0, 1, 2 or 3"),
    ('{"optimizer": {"type": "SGD", "params": {}}}', "optimizer type 'SGD' is not supported"),
    ('{"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}', "optimizer.params.'lr' is 0.1 but the command line gives 0.0001"),
    ('{"zero_optimization": {"stage": 2, "overlap_com": true}}', "DeepSpeed rejects the config"),
]


@needs_deepspeed
@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_bad_deepspeed_config_fails_before_work(work, capsys, monkeypatch, text, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    (work / "bad.json").write_text(text)
    args = ["finetune", str(work / "emu"), "--train", str(work / "train.txt"), "-o", str(work / "bad_ds"), "--batch-size", "4"]
    assert main([*args, "--grad-accum", "2", "--deepspeed", str(work / "bad.json"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (work / "bad_ds").exists()


def test_missing_deepspeed_config_file_and_missing_deepspeed(work, capsys, monkeypatch):
    args = ["finetune", str(work / "emu"), "--train", str(work / "train.txt"), "-o", str(work / "nods"), "-q"]
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as on a machine without DeepSpeed
    assert main([*args, "--deepspeed", str(ZERO2)]) == 2
    assert "pip install --no-build-isolation deepspeed" in capsys.readouterr().err
    assert not (work / "nods").exists()


@needs_deepspeed
def test_checkpoint_dirs_of_the_other_kind_are_refused(work, capsys):
    (work / "plain.ckpt").mkdir()
    (work / "plain.ckpt" / "trainer_state.json").write_text("{}")
    args = ["finetune", str(work / "emu"), "--train", str(work / "train.txt"), "-o", str(work / "kind"), "-q"]
    assert main([*args, "--deepspeed", str(ZERO2), "--checkpoint-every", "1", "--checkpoint-dir", str(work / "plain.ckpt")]) == 2
    assert "holds a checkpoint of a run without --deepspeed" in capsys.readouterr().err


@needs_deepspeed
def test_shipped_configs_are_accepted(work):
    from offsite_kernels.workflow.deepspeed_engine import check_config
    from offsite_kernels.workflow.distributed import World
    from offsite_kernels.workflow.loop import TrainSettings

    settings = TrainSettings(batch_size=16, grad_accum=4)
    for path in sorted((ROOT / "examples" / "deepspeed").glob("*.json")):
        config = check_config(path, settings, World(8, 0, 0), allow_stage3="zero3" in path.name)
        assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 2, path.name


# --- leaving the process group -------------------------------------------------------------------
@pytest.mark.parametrize(("world_size", "destroyed"), [("2", True), ("1", False), (None, False), ("two", False)])
def test_cli_leaves_a_launched_process_group_and_keeps_a_one_process_one(monkeypatch, capsys, world_size, destroyed):
    """A launched command destroys its group before exiting (gloo's threads alive at shutdown can abort a
    finished process); a one-process group (DeepSpeed's, cached for the process) and a bad launch are left alone."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append(a))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    assert main(["env"]) == 0
    assert len(calls) == int(destroyed)
