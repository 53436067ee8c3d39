"""``offsite bench``: every method side by side, in one run, on one device; rows, table, plot.

Two kinds of rows, and every row says which it is (``source``) and where it was taken:

- ``measured``: training steps run on the device (a CUDA GPU, or the CPU at the scaled-down size
  unless ``scaled=False``): tokens/s, peak memory and its parts, MFU.
- ``accounted``: the paper's models at full size, their training step run on fake tensors:
  peak memory and its parts, exact to the byte for what the step allocates (see
  :mod:`offsite_kernels.benchmark.account`), and the step's FLOPs. No time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .account import MemoryBreakdown, account_memory, count_model_flops
from .measure import Measurement, matmul_ceiling, measure_training
from .methods import DEFAULT_METHODS, BenchError, BenchMethod
from .models import PAPER_MODELS, BenchModel, get_bench_model

SOURCES = ("measured", "accounted")


@dataclass
class BenchSettings:
    models: Sequence[str | BenchModel] = PAPER_MODELS
    methods: Sequence[str] = DEFAULT_METHODS
    batches: Sequence[int] = (1,)
    seq: int = 512
    device: str | None = None  # None: cuda if available, else cpu
    sources: Sequence[str] = SOURCES
    scaled: bool | None = None  # measure the scaled-down configs; None: on the CPU only
    amp_dtype: torch.dtype | None = torch.bfloat16
    warmup: int = 2
    steps: int = 5
    seed: int = 0
    progress: Callable[[str], None] | None = None

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
        return device


@dataclass
class BenchResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _hardware(device: torch.device) -> str:
    from .stamp import _cpu_model

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")


def _config_summary(bench_model: BenchModel, scaled: bool) -> dict[str, Any]:
    config = bench_model.hf_config(scaled)
    return {"hidden": config.hidden_size, "layers": config.num_hidden_layers, "vocab": config.vocab_size}


def _memory_fields(memory: MemoryBreakdown) -> dict[str, int]:
    return {
        "peak_bytes": memory.peak,
        "weights_bytes": memory.weights,
        "gradients_bytes": memory.gradients,
        "optimizer_bytes": memory.optimizer,
        "activations_bytes": memory.activations,
    }


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hugging Face's deprecation chatter (from inside PEFT and the models) is noise here."""
    import warnings

    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logging.set_verbosity(level)


def run_bench(settings: BenchSettings) -> BenchResult:
    """Run every (model, batch, method) of ``settings`` for each requested source; rows in order."""
    device = settings.resolved_device()
    methods = [BenchMethod.parse(m) for m in settings.methods]
    models = [m if isinstance(m, BenchModel) else get_bench_model(m) for m in settings.models]
    unknown = set(settings.sources) - set(SOURCES)
    if unknown or not settings.sources:
        raise BenchError(f"sources must be among {SOURCES}, got {list(settings.sources)}")
    if any(b < 1 for b in settings.batches) or settings.seq < 2:
        raise BenchError(f"batch sizes must be >= 1 and seq >= 2; got batches={list(settings.batches)}, seq={settings.seq}")
    if settings.warmup < 1 or settings.steps < 1:
        raise BenchError(f"need at least one warm-up and one timed step, got warmup={settings.warmup}, steps={settings.steps}")
    scaled = settings.scaled if settings.scaled is not None else device.type != "cuda"
    say = settings.progress or (lambda _msg: None)
    start = time.perf_counter()
    result = BenchResult()
    ceiling = None
    with _quiet_transformers():
        if "measured" in settings.sources:
            ceiling = matmul_ceiling(device, settings.amp_dtype or torch.float32)
            say(f"matmul ceiling on {device.type}: {ceiling / 1e12:.2f} TFLOP/s ({_dtype_name(settings.amp_dtype)})")
        for bench_model in models:
            for batch in settings.batches:
                for method in methods:
                    common = {
                        "bench": "offsite_bench",
                        "model": bench_model.name,
                        "layout": bench_model.layout,
                        "method": method.name,
                        "label": method.label,
                        "batch": batch,
                        "seq": settings.seq,
                        "amp_dtype": _dtype_name(settings.amp_dtype),
                        "paper_tokens_per_s": bench_model.paper.get(method.name, (None, None))[0]
                        if settings.seq == 512 and batch == 1
                        else None,
                        "paper_memory_mb": bench_model.paper.get(method.name, (None, None))[1]
                        if settings.seq == 512 and batch == 1
                        else None,
                    }
                    if "accounted" in settings.sources:
                        say(f"accounting {bench_model.name} {method.name} batch {batch}")
                        result.rows.append(_accounted_row(bench_model, method, batch, settings, common))
                    if "measured" in settings.sources:
                        say(
                            f"measuring {bench_model.name}{' (scaled)' if scaled else ''} {method.name} batch {batch} on {device}"
                        )
                        result.rows.append(_measured_row(bench_model, method, batch, settings, device, scaled, ceiling, common))
    result.seconds = time.perf_counter() - start
    return result


def _accounted_row(bench_model, method, batch, settings, common) -> dict[str, Any]:
    row = {
        **common,
        "source": "accounted",
        "device": "fake",
        "hardware": "none (fake tensors, CPU autocast policy)",
        "scaled": False,
        "config": _config_summary(bench_model, False),
    }
    try:
        memory = account_memory(bench_model, method, batch, settings.seq, settings.amp_dtype)
        flops = count_model_flops(bench_model, method, batch, settings.seq, settings.amp_dtype)
    except Exception as exc:  # one failing method must not lose the others' rows
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    return {**row, **_memory_fields(memory), "model_flops_per_step": flops}


def _measured_row(bench_model, method, batch, settings, device, scaled, ceiling, common) -> dict[str, Any]:
    row = {
        **common,
        "source": "measured",
        "device": device.type,
        "hardware": _hardware(device),
        "scaled": scaled,
        "config": _config_summary(bench_model, scaled),
    }
    try:
        measured: Measurement = measure_training(
            bench_model,
            method,
            batch,
            settings.seq,
            device,
            settings.amp_dtype,
            scaled,
            warmup=settings.warmup,
            steps=settings.steps,
            seed=settings.seed,
        )
        flops = count_model_flops(bench_model, method, batch, settings.seq, settings.amp_dtype, scaled=scaled)
    except torch.OutOfMemoryError as exc:
        return {**row, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # one failing method must not lose the others' rows
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timing = measured.timing
    tokens = batch * settings.seq
    return {
        **row,
        "tokens_per_s": tokens / timing.median_s,
        "step_ms_median": timing.median_s * 1e3,
        "step_ms_p20": timing.p20_s * 1e3,
        "step_ms_p80": timing.p80_s * 1e3,
        "timed_steps": timing.steps,
        **_memory_fields(measured.memory),
        "model_flops_per_step": flops,
        "matmul_ceiling_flops": ceiling,
        "mfu": flops / timing.median_s / ceiling if ceiling else None,
        "loss": measured.loss,
        "trainable_params": measured.trainable_params,
    }
