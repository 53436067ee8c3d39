"""Training steps measured on a real device: time per step, peak memory and its parts, and the
matmul ceiling that MFU is taken against.

Time: the median (with p20 and p80) of ``steps`` training steps after ``warmup`` steps, each
bracketed by a device synchronisation. Memory on CUDA: ``torch.cuda.max_memory_allocated`` over
the timed steps (weights included; not the warm-up steps, where Triton autotunes and compiles), and allocated-bytes deltas in one more, untimed step for the
parts. With CUDA graphs (``+graph``) the graphs' memory pool (the emulator's saved activations and
workspace, held between steps, invisible to the allocated-bytes counters during replays) is added
to the timed steps' peak and to the activations; the capture, in a warm-up step, counts too. With
compiled blocks (``+compile``) one more warm-up step runs (compilation, then PyTorch's cudagraph
trees record in their second call), the first step's time is reported beside the median, and
with ``+compile+graph`` the bytes reserved in private memory pools (the cudagraph trees') are added
as for ``+graph``; a compiled row starts and ends with Dynamo and the cudagraph trees reset, so it
sees no compiled code, shapes or pools of another row. On the CPU (no allocator statistics): that untimed step runs under
:class:`~offsite_kernels.memtrack.MemoryTracker`, and the peak is the weights plus its peak.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..memtrack import MemoryTracker
from ..nn.compiled_blocks import compile_report
from ..nn.cuda_graphs import graph_report
from .account import MemoryBreakdown
from .methods import BenchMethod, Trainee, build_trainee
from .models import BenchModel
from .step import Step, TorchStep, weight_bytes


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    steps: int


@dataclass
class Measurement:
    timing: Timing
    memory: MemoryBreakdown
    loss: float
    trainable_params: int
    graphs: dict | None = None  # with CUDA graphs: sets captured, block replays, pool bytes, failed captures
    first_step_s: float = float("nan")  # the first warm-up step: Triton tuning, compilation, graph capture
    compiled: dict | None = None  # with compiled blocks: mode, blocks, training calls compiled, private pool bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure_training(
    bench_model: BenchModel,
    method: BenchMethod,
    batch: int,
    seq: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    scaled: bool,
    warmup: int = 2,
    steps: int = 5,
    seed: int = 0,
) -> Measurement:
    """Build ``method`` on ``bench_model`` (random weights) on ``device`` and time its training step."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"need at least one warm-up and one timed step, got warmup={warmup}, steps={steps}")
    with _own_compile_state(device, method.compiled):  # a compiled row sees no code, shapes or pools of another
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        config = bench_model.hf_config(scaled)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
        trainee = build_trainee(model, bench_model.layout, method, amp_dtype)
        del model  # the emulator is a copy: the dropped blocks go now
        gc.collect()
        generator = torch.Generator(device=device).manual_seed(seed)
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=generator)
        step = make_step(trainee, method, batch, amp_dtype)
        weights = weight_bytes(trainee.module)
        if device.type == "cuda":
            torch.cuda.empty_cache()

        warmup += 1 if method.compiled else 0
        times, loss, warmup_peak, first_step_s = [], float("nan"), 0, float("nan")
        for i in range(warmup + steps):
            if device.type == "cuda" and (i == warmup or (method.cuda_graphs and i == warmup - 1)):
                # the peak of the timed steps (and of the capture): not the first steps' autotuning, whose
                # timing runs allocate buffers of their own (Triton's L2 flush: 256 MiB), nor compilation
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            loss_t = step(ids)
            _sync(device)
            if i == 0:
                first_step_s = time.perf_counter() - start
            if i >= warmup:
                times.append(time.perf_counter() - start)
            loss = float(loss_t)
            if method.cuda_graphs and i == warmup - 1 and device.type == "cuda":  # the capture's peak, then the replays'
                warmup_peak = torch.cuda.max_memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
        timing = Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))

        graphs = graph_report(trainee.module) if method.cuda_graphs and not method.compiled else None
        compiled = compile_report(trainee.module) if method.compiled else None
        if compiled is not None and method.cuda_graphs and device.type == "cuda":
            compiled["pool_bytes"] = private_pool_bytes()
        if device.type == "cuda":
            pool = graphs["pool_bytes"] if graphs else (compiled or {}).get("pool_bytes", 0)
            peak = max(warmup_peak, torch.cuda.max_memory_allocated(device) + pool)
            activations, gradients = step.phases(ids, lambda: torch.cuda.memory_allocated(device))
            activations += pool
        else:  # the optimizer state (and an offloaded one, in the same memory here) predates the tracker
            with MemoryTracker() as tracker:
                activations, gradients = step.phases(ids, lambda: tracker.current_bytes)
            peak = weights + step.optimizer_bytes() + step.host_bytes() + tracker.peak_bytes
        memory = MemoryBreakdown(weights, gradients, step.optimizer_bytes(), activations, peak, host=step.host_bytes())
        return Measurement(timing, memory, loss, sum(p.numel() for p in trainee.params), graphs, first_step_s, compiled)


@contextlib.contextmanager
def _own_compile_state(device: torch.device, compiled: bool) -> Iterator[None]:
    """Dynamo and PyTorch's cudagraph trees reset before and after a compiled row."""
    if compiled:
        _reset_compiled_state(device)
    try:
        yield
    finally:
        if compiled:
            _reset_compiled_state(device)


def _reset_compiled_state(device: torch.device) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    if device.type == "cuda":
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
        gc.collect()
        torch.cuda.empty_cache()


def private_pool_bytes() -> int:
    """Device memory reserved in the caching allocator's private pools (CUDA graph pools), in bytes.

    Reserved segments: the pool's high-water mark (its warm-up runs in it too) with any free space."""
    return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))


def make_step(trainee: Trainee, method: BenchMethod, batch: int, amp_dtype: torch.dtype | None) -> Step:
    """The training step of ``method``: DeepSpeed's for ``ft+zero``, PyTorch's for the others."""
    if method.zero:
        from .zero import ZeroStep

        return ZeroStep(trainee, batch)
    return TorchStep(trainee, amp_dtype)


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul in ``dtype``: the MFU denominator."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):  # do_bench's events and synchronisation use the current device
            ms = triton.testing.do_bench(lambda: torch.mm(a, b), warmup=50, rep=300, quantiles=[0.5])[0]  # the median
        return 2 * n**3 / (ms * 1e-3)
    times = []
    for i in range(6):
        start = time.perf_counter()
        torch.mm(a, b)
        if i:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)
