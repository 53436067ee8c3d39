"""``offsite bench``: every method side by side, in one run, on one device; rows, table, plot.

Two kinds of rows, and every row says which it is (``source``) and where it was taken:

- ``measured``: training steps run on the device (a CUDA GPU, or the CPU at the scaled-down size
  unless ``scaled=False``): tokens/s, peak memory and its parts, MFU.
- ``accounted``: the paper's models at full size, their training step run on fake tensors:
  peak memory and its parts, exact to the byte for what the step allocates (see
  :mod:`offsite_kernels.benchmark.account`), and the step's FLOPs. No time. ``ft+zero`` is
  modelled there (DeepSpeed cannot run on fake tensors); its rows say so.

The FT baseline on a GPU is what a user would really run: plain FT where it fits, else FT on
DeepSpeed with ZeRO-2 and the optimizer offloaded to the CPU (``ft+zero``). Whether it fits is
decided before building the model, from the accounted peak against the GPU's memory
(``FIT_FRACTION``), and a plain FT that still runs out of memory is run again that way. The
row keeps the method ``ft`` (the ratios are to it) and says how it ran (``ran_as``, ``ft_fallback``).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import get_family
from .account import MemoryBreakdown, account_memory, account_zero_memory, count_model_flops
from .measure import Measurement, matmul_ceiling, measure_training
from .methods import DEFAULT_METHODS, BenchError, BenchMethod
from .models import PAPER_MODELS, BenchModel, get_bench_model

SOURCES = ("measured", "accounted")
FIT_FRACTION = 0.92  # plain FT runs if its accounted peak is at most this share of the GPU's memory
GiB = 2**30


@dataclass
class BenchSettings:
    models: Sequence[str | BenchModel] = PAPER_MODELS
    methods: Sequence[str] = DEFAULT_METHODS
    batches: Sequence[int] | None = None  # None: the paper's 1, plus a GPU-filling 16 on a GPU
    seq: int = 512
    device: str | None = None  # None: cuda if available, else cpu
    sources: Sequence[str] | None = None  # None: measured on a GPU; measured (scaled) and accounted on a CPU
    scaled: bool | None = None  # measure the scaled-down configs; None: on the CPU only
    amp_dtype: torch.dtype | None = torch.bfloat16
    warmup: int = 2
    steps: int = 5
    seed: int = 0
    ft_fallback: bool = True  # on a GPU, FT that does not fit runs on DeepSpeed ZeRO-2 + CPU offload
    progress: Callable[[str], None] | None = None
    on_row: Callable[[dict[str, Any]], None] | None = None  # called with each row as soon as it exists

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
    fields = {
        "peak_bytes": memory.peak,
        "weights_bytes": memory.weights,
        "gradients_bytes": memory.gradients,
        "optimizer_bytes": memory.optimizer,
        "activations_bytes": memory.activations,
    }
    return {**fields, "host_bytes": memory.host} if memory.host else fields


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
    on_gpu = device.type == "cuda"
    sources = list(settings.sources if settings.sources is not None else (("measured",) if on_gpu else SOURCES))
    batches = list(settings.batches if settings.batches is not None else ((1, 16) if on_gpu else (1,)))
    if set(sources) - set(SOURCES) or not sources:
        raise BenchError(f"sources must be among {SOURCES}, got {sources}")
    if not batches or any(b < 1 for b in batches) or settings.seq < 2:
        raise BenchError(f"batch sizes must be >= 1 and seq >= 2; got batches={batches}, seq={settings.seq}")
    if settings.warmup < 1 or settings.steps < 1:
        raise BenchError(f"need at least one warm-up and one timed step, got warmup={settings.warmup}, steps={settings.steps}")
    scaled = settings.scaled if settings.scaled is not None else not on_gpu
    sizes = {False} if "accounted" in sources else set()  # accounted rows run at full size
    if "measured" in sources:
        sizes.add(scaled)
    for bench_model in models:
        for size in sizes:
            config = bench_model.hf_config(scaled=size)
            limit = get_family(config).max_positions(config)
            if limit is not None and settings.seq > limit:
                raise BenchError(
                    f"--seq {settings.seq} is longer than the {limit} positions of {bench_model.name}"
                    f"{' (scaled down)' if size else ''}'s position table; use --seq {limit} or less"
                )
    say = settings.progress or (lambda _msg: None)
    start = time.perf_counter()
    result = BenchResult()
    ceiling = None
    flops = _FlopsCache(settings)

    def add(row: dict[str, Any]) -> None:
        result.rows.append(row)
        if settings.on_row is not None:
            settings.on_row(row)

    with _quiet_transformers():
        if "measured" in sources:
            ceiling = matmul_ceiling(device, settings.amp_dtype or torch.float32)
            say(f"matmul ceiling on {device.type}: {ceiling / 1e12:.2f} TFLOP/s ({_dtype_name(settings.amp_dtype)})")
        # batch outermost: the paper's setting (batch 1) of every model first, should a time limit cut the run short
        for batch in batches:
            for bench_model in models:
                for method in methods:
                    paper_setting = settings.seq == 512 and batch == 1
                    paper = bench_model.paper.get(method.name, (None, None)) if paper_setting else (None, None)
                    common = {
                        "bench": "offsite_bench",
                        "model": bench_model.name,
                        "layout": bench_model.layout,
                        "method": method.name,
                        "label": method.label,
                        "batch": batch,
                        "seq": settings.seq,
                        "amp_dtype": _dtype_name(settings.amp_dtype),
                        "paper_tokens_per_s": paper[0],
                        "paper_memory_mb": paper[1],
                    }
                    if "accounted" in sources and method.cuda_graphs:
                        say(f"not accounting {method.name}: CUDA graphs change where memory sits, not what the step allocates")
                    elif "accounted" in sources and method.compiled:
                        say(
                            f"not accounting {method.name}: compiled kernels allocate otherwise than the eager step on fake tensors"
                        )
                    elif "accounted" in sources:
                        say(f"accounting {bench_model.name} {method.name} batch {batch}")
                        add(_accounted_row(bench_model, method, batch, settings, common, flops))
                    if "measured" in sources and method.cuda_graphs and device.type != "cuda":
                        say(f"not measuring {method.name} on {device.type}: CUDA graphs need a CUDA GPU")
                    elif "measured" in sources:
                        size = " (scaled)" if scaled else ""
                        say(f"measuring {bench_model.name}{size} {method.name} batch {batch} on {device}")
                        add(_measured_row(bench_model, method, batch, settings, device, scaled, ceiling, common, flops))
    result.seconds = time.perf_counter() - start
    return result


class _FlopsCache:
    """Model FLOPs per (model, size, batch, what is trained): the same math whatever the weight format,
    fused ops or recomputation, so it is counted once per group, not once per method."""

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self._done: dict[tuple, int] = {}

    def __call__(self, bench_model: BenchModel, method: BenchMethod, batch: int, scaled: bool) -> int:
        key = (bench_model.name, scaled, batch, method.base, method.lora, method.fused_head)
        if key not in self._done:
            self._done[key] = count_model_flops(
                bench_model, method, batch, self.settings.seq, self.settings.amp_dtype, scaled=scaled
            )
        return self._done[key]


def _accounted_row(bench_model, method, batch, settings, common, flops: _FlopsCache) -> dict[str, Any]:
    row = {
        **common,
        "source": "accounted",
        "device": "fake",
        "hardware": "none (fake tensors, CPU autocast policy)",
        "scaled": False,
        "config": _config_summary(bench_model, False),
    }
    if method.zero:
        row["modelled"] = "DeepSpeed's buffers and offloaded state from its config; the bf16 step on fake tensors"
    try:
        if method.zero:
            memory = account_zero_memory(bench_model, batch, settings.seq)
        else:
            memory = account_memory(bench_model, method, batch, settings.seq, settings.amp_dtype)
        model_flops = flops(bench_model, method, batch, False)
    except Exception as exc:  # one failing method must not lose the others' rows
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    return {**row, **_memory_fields(memory), "model_flops_per_step": model_flops}


def ft_fallback_reason(need: int, capacity: int) -> str | None:
    """Why plain FT that needs ``need`` bytes does not fit a GPU of ``capacity`` bytes, or None if it fits."""
    if need <= FIT_FRACTION * capacity:
        return None
    return f"plain FT needs {need / GiB:.1f} GiB (accounted), more than {FIT_FRACTION:.0%} of the GPU's {capacity / GiB:.1f} GiB"


def _ft_fallback(bench_model, method, batch, settings, device, scaled) -> str | None:
    """For plain FT on a GPU: why it cannot run there (from its accounted peak), or None. Accounting that
    fails (fake tensors on another torch or transformers) decides nothing: plain FT is tried, and an
    out-of-memory error still falls back."""
    if not (settings.ft_fallback and device.type == "cuda" and method == BenchMethod("ft")):
        return None
    try:
        need = account_memory(bench_model, method, batch, settings.seq, settings.amp_dtype, scaled=scaled).peak
    except Exception:  # an estimate only; the measurement itself decides below
        return None
    return ft_fallback_reason(need, torch.cuda.get_device_properties(device).total_memory)


def _measured_row(bench_model, method, batch, settings, device, scaled, ceiling, common, flops: _FlopsCache) -> dict[str, Any]:
    row = {
        **common,
        "source": "measured",
        "device": device.type,
        "hardware": _hardware(device),
        "scaled": scaled,
        "config": _config_summary(bench_model, scaled),
    }

    def measure(run: BenchMethod) -> Measurement:
        return measure_training(
            bench_model,
            run,
            batch,
            settings.seq,
            device,
            settings.amp_dtype,
            scaled,
            warmup=settings.warmup,
            steps=settings.steps,
            seed=settings.seed,
        )

    zero = BenchMethod("ft", zero=True)
    try:
        reason = _ft_fallback(bench_model, method, batch, settings, device, scaled)
        if reason is None:
            try:
                measured = measure(method)
            except torch.OutOfMemoryError as exc:
                if not (settings.ft_fallback and method == BenchMethod("ft")):
                    raise
                reason = f"plain FT ran out of memory ({str(exc).splitlines()[0]})"
        if reason is not None:
            if device.type == "cuda":  # what the failed attempt held died with its exception
                gc.collect()
                torch.cuda.empty_cache()
            row.update(label=zero.label, ran_as=zero.name, ft_fallback=reason)
            measured = measure(zero)
    except torch.OutOfMemoryError as exc:
        return {**row, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # one failing method must not lose the others' rows
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:  # counted on fake tensors: a failure there costs the MFU, not the measured row
        model_flops, flops_error = flops(bench_model, method, batch, scaled), None
    except Exception as exc:
        model_flops, flops_error = None, f"{type(exc).__name__}: {exc}"
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
        "model_flops_per_step": model_flops,
        "matmul_ceiling_flops": ceiling,
        "mfu": model_flops / timing.median_s / ceiling if ceiling and model_flops else None,
        **({"flops_error": flops_error} if flops_error else {}),
        "loss": measured.loss,
        "trainable_params": measured.trainable_params,
        "first_step_ms": measured.first_step_s * 1e3,
        **({"cuda_graphs": measured.graphs} if measured.graphs is not None else {}),
        **({"compiled": measured.compiled} if measured.compiled is not None else {}),
    }
