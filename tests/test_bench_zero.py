"""`offsite bench`'s FT on DeepSpeed (``ft+zero``: ZeRO-2, optimizer offloaded) and the FT fallback.

Run for real on the CPU (DeepSpeed's CPU accelerator, gloo, its CPU Adam): the step trains, its
first loss is plain FT's, and the modelled accounting of its memory agrees with a real step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_bench import TINY

from offsite_kernels.benchmark import BenchError, BenchMethod, BenchSettings, get_bench_model, run_bench
from offsite_kernels.benchmark import runner as runner_module
from offsite_kernels.benchmark.account import account_memory, account_zero_memory
from offsite_kernels.benchmark.measure import measure_training
from offsite_kernels.benchmark.report import format_markdown
from offsite_kernels.benchmark.runner import ft_fallback_reason

pytest.importorskip("deepspeed", reason="ft+zero runs on DeepSpeed: pip install 'offsite-kernels[distributed]'")

CPU = torch.device("cpu")


def test_zero_is_a_full_fine_tuning_option():
    method = BenchMethod.parse("FT + zero")
    assert method == BenchMethod("ft", zero=True) and method.name == "ft+zero"
    assert "DeepSpeed" in method.label
    for bad in ("ot+zero", "ft+lora+zero", "ot+fast+zero"):
        with pytest.raises(BenchError, match="ft\\+zero"):
            BenchMethod.parse(bad)


def test_zero_step_trains_like_plain_ft_and_its_memory_model_holds():
    seq = 24
    zero = measure_training(TINY, BenchMethod("ft", zero=True), 2, seq, CPU, torch.bfloat16, False, warmup=1, steps=2)
    plain = measure_training(TINY, BenchMethod("ft"), 2, seq, CPU, torch.bfloat16, False, warmup=1, steps=2)
    assert torch.distributed.get_world_size() == 1  # the one-process group DeepSpeed needs
    # same data and initial weights; bf16 weights (DeepSpeed) against bf16 autocast over fp32 weights
    assert abs(zero.loss - plain.loss) < 0.05 * plain.loss
    assert zero.trainable_params == plain.trainable_params

    params = zero.trainable_params
    memory = zero.memory
    assert memory.weights >= 2 * params  # bf16 on the device (tied weights once, buffers too)
    assert memory.weights < plain.memory.weights
    assert memory.gradients == 0  # every gradient went to the host
    assert memory.host >= 16 * params  # fp32 master, gradient and both AdamW moments

    modelled = account_zero_memory(TINY, 2, seq)
    assert modelled.weights == memory.weights
    assert modelled.host == memory.host
    assert modelled.activations == memory.activations
    # on the CPU the measured peak holds the host state as well; the rest is the device's
    device_peak = memory.peak - memory.host
    assert abs(modelled.peak - device_peak) <= 0.05 * device_peak, (modelled.peak, device_peak)


def test_zero_needs_less_device_memory_than_ft_at_paper_size():
    model = get_bench_model("gpt2-xl")
    ft = account_memory(model, BenchMethod("ft"), 1, 512)
    zero = account_zero_memory(model, 1, 512)
    params = 1_557_611_200  # GPT2-XL
    assert zero.weights == 2 * params
    assert zero.peak < ft.peak / 3
    assert zero.host >= 16 * params


def test_fit_decision():
    gib = 2**30
    assert ft_fallback_reason(100 * gib, 141 * gib) is None
    reason = ft_fallback_reason(140 * gib, 141 * gib)
    assert reason is not None and "140.0 GiB" in reason and "141.0 GiB" in reason


def test_ft_that_runs_out_of_memory_runs_on_deepspeed(monkeypatch):
    real = measure_training
    tried = []

    def measure(bench_model, method, *args, **kwargs):
        tried.append(method.name)
        if method == BenchMethod("ft"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(bench_model, method, *args, **kwargs)

    monkeypatch.setattr(runner_module, "measure_training", measure)
    settings = BenchSettings(
        models=[TINY], methods=["ft"], batches=[1], seq=16, device="cpu", sources=["measured"], scaled=False, steps=1
    )
    (row,) = run_bench(settings).rows
    assert tried == ["ft", "ft+zero"]
    assert "error" not in row, row.get("error")
    assert row["method"] == "ft" and row["ran_as"] == "ft+zero"
    assert "out of memory" in row["ft_fallback"] and row["host_bytes"] > 0
    table = format_markdown([row])
    assert "DeepSpeed" in table and "out of memory" in table

    tried.clear()
    (row,) = run_bench(dataclasses.replace(settings, ft_fallback=False)).rows
    assert tried == ["ft"] and row["error"].startswith("out of memory")


def test_accounted_zero_row_says_it_is_modelled():
    settings = BenchSettings(models=[TINY], methods=["ft", "ft+zero"], batches=[1], seq=16, device="cpu", sources=["accounted"])
    ft, zero = run_bench(settings).rows
    assert "modelled" in zero and "modelled" not in ft
    assert zero["host_bytes"] > 0 and ft.get("host_bytes") is None
    assert zero["peak_bytes"] > zero["weights_bytes"] + zero["gradients_bytes"]  # buckets and activations on top
    assert "modelled" in format_markdown([ft, zero])


def test_an_offload_the_host_cannot_hold_is_refused_before_it_starts(monkeypatch):
    from offsite_kernels.benchmark import zero

    monkeypatch.setenv(zero.HOST_MEMORY_VARIABLE, "0.001")  # 1 MiB of host memory
    with pytest.raises(BenchError, match=r"bytes per parameter in host memory.*OFFSITE_HOST_MEMORY_GIB"):
        measure_training(TINY, BenchMethod("ft", zero=True), 1, 8, CPU, torch.bfloat16, False, warmup=1, steps=1)
    monkeypatch.setenv(zero.HOST_MEMORY_VARIABLE, "lots")
    with pytest.raises(BenchError, match="not a number of GiB"):
        zero.check_host_memory(10)
    monkeypatch.setenv(zero.HOST_MEMORY_VARIABLE, "128")
    zero.check_host_memory(5_000_000_000)  # GPT2-XL-sized and more: 84 GiB of 128
    with pytest.raises(BenchError, match=r"6\.70B parameters"):
        zero.check_host_memory(6_700_000_000)  # OPT-6.7B: 112 GiB, more than 80% of 128
