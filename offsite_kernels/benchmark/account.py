"""Memory and FLOPs of a training step, accounted on fake tensors: no hardware, no weights.

The model is built inside ``FakeTensorMode`` (tensors with shapes, dtypes and devices but no
data), so a 7B model costs nothing to create. Two training steps run under
:class:`~offsite_kernels.memtrack.MemoryTracker` (the second one, with the optimizer state
already there, is the steady state); the peak is the weights plus the tracker's peak. The step is
the same code as on a GPU; two things differ from a CUDA run and are said in every row:

- fake tensors live on the CPU here (a CPU build of PyTorch cannot make fake CUDA tensors), so
  autocast follows the CPU's bf16 policy (which ops run in bf16) rather than CUDA's;
- the library's custom ops count their outputs only, as their Triton kernels allocate nothing
  else; the CUDA caching allocator's rounding and cuBLAS workspaces are not counted.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over forward and backward (matmuls
and attention; the library registers its frozen linear's formulas). For MFU the count is the
method's *model* FLOPs: recomputation is switched off while counting, so work done twice is
not counted as useful work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..memtrack import MemoryTracker
from .methods import BenchMethod, Trainee, build_trainee
from .models import BenchModel
from .step import forward_loss, grad_bytes, make_optimizer, optimizer_state_bytes, train_step, weight_bytes


@dataclass
class MemoryBreakdown:
    """Bytes of one training step. ``activations``: what the forward leaves alive for the backward
    (saved tensors, autocast weight copies, the loss); ``peak``: the most alive at once, in total.
    The parts need not sum to the peak (gradients and activations are not all alive together)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int
    host: int = 0  # training state offloaded to host memory (``ft+zero``), not part of the peak


@contextlib.contextmanager
def _cacheless_mask_decisions() -> Iterator[None]:
    """Let Hugging Face skip the causal mask on fake tensors where it skips it on real ones.

    A training step has no KV cache and no attention mask, so HF looks for sequences packed into one row
    in the position ids (``find_packed_sequence_indices``); unable to read fake ones, it builds the
    ``[batch, 1, seq, seq]`` mask that a real step, whose positions run 0..seq-1, leaves to SDPA's
    ``is_causal``. Here fake position ids are taken as unpacked, as the bench's always are."""
    from torch._subclasses.fake_tensor import FakeTensor

    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def unpacked_if_fake(position_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return None if isinstance(position_ids, FakeTensor) else original(position_ids, *args, **kwargs)

    masking_utils.find_packed_sequence_indices = unpacked_if_fake
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=False)


def _fakify_(module: nn.Module, mode, device: torch.device) -> None:
    """Replace every meta parameter, buffer and tensor attribute of ``module`` by a fake tensor
    of ``mode`` on ``device`` (tied tensors stay tied)."""
    converted: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in converted:
            converted[id(t)] = mode.fake_tensor_converter.from_meta_and_device(mode, t, device)
        return converted[id(t)]

    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                if id(p) not in converted:
                    converted[id(p)] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
                sub._parameters[name] = converted[id(p)]
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = fake(b)
        for name, value in vars(sub).items():  # plain tensor attributes (rotary embeddings keep some)
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                setattr(sub, name, fake(value))


def _no_layerdrop_draw_(module: nn.Module) -> None:
    """Turn off the own training flag of every module with ``layerdrop == 0`` (OPT's decoder; its
    layers keep theirs). In training mode that decoder draws ``torch.rand([])`` per layer and branches
    on it, even at ``layerdrop == 0`` in transformers 5.17 (5.24 skips the draw at 0), and a
    fake tensor cannot be branched on. At 0 the draw never drops a layer: nothing else changes."""
    for sub in module.modules():
        if getattr(sub, "layerdrop", None) == 0:
            sub.training = False


def _fake_trainee(
    bench_model: BenchModel,
    method: BenchMethod,
    scaled: bool,
    amp_dtype: torch.dtype | None,
    mode,
    weights_dtype: torch.dtype | None = None,
) -> Trainee:
    """The trainee of ``method``, built on the meta device outside ``mode`` (a deep copy of a fake
    tensor would leave its fake mode), cast to ``weights_dtype`` if given, then turned into fake
    CPU tensors of ``mode``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bench_model.hf_config(scaled))
        trainee = build_trainee(model, bench_model.layout, method, amp_dtype)
        if weights_dtype is not None:
            trainee.module.to(weights_dtype)
    _fakify_(trainee.module, mode, torch.device("cpu"))
    _no_layerdrop_draw_(trainee.module)
    return Trainee(trainee.module, [p for p in trainee.module.parameters() if p.requires_grad], trainee.loss)


def account_memory(
    bench_model: BenchModel,
    method: BenchMethod,
    batch: int,
    seq: int,
    amp_dtype: torch.dtype | None = torch.bfloat16,
    scaled: bool = False,
) -> MemoryBreakdown:
    """Peak memory of a training step of ``method`` on ``bench_model``, on fake tensors."""
    mode = _fake_mode()
    trainee = _fake_trainee(bench_model, method, scaled, amp_dtype, mode)
    with mode, _cacheless_mask_decisions():
        ids = torch.zeros((batch, seq), dtype=torch.long)
        optimizer = make_optimizer(trainee.params)
        weights = weight_bytes(trainee.module)
        with MemoryTracker() as tracker:
            train_step(trainee, ids, optimizer, amp_dtype)  # creates the optimizer state
            before = tracker.current_bytes
            loss = forward_loss(trainee, ids, amp_dtype)
            activations = tracker.current_bytes - before
            loss.backward()
            del loss
            gradients = grad_bytes(trainee.params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return MemoryBreakdown(
            weights=weights,
            gradients=gradients,
            optimizer=optimizer_state_bytes(optimizer),
            activations=activations,
            peak=weights + tracker.peak_bytes,
        )


def account_zero_memory(bench_model: BenchModel, batch: int, seq: int, scaled: bool = False) -> MemoryBreakdown:
    """Device memory of a ``ft+zero`` step (DeepSpeed ZeRO-2, optimizer offloaded), modelled.

    Unlike :func:`account_memory` this is a model of DeepSpeed's allocations, not a run of them
    (DeepSpeed cannot run on fake tensors): the bf16 model's forward and backward run on fake
    tensors with each gradient dropped as soon as it is produced (DeepSpeed copies it to the
    host through its buckets); the buckets and the largest parameter's staging buffer are added
    from the config of :mod:`offsite_kernels.benchmark.zero`, and the offloaded state is counted
    in ``host`` (18 bytes per parameter, see ``HOST_BYTES_PER_PARAM``)."""
    from .zero import HOST_BYTES_PER_PARAM, device_gradient_bytes

    mode = _fake_mode()
    trainee = _fake_trainee(bench_model, BenchMethod("ft"), scaled, None, mode, weights_dtype=torch.bfloat16)
    model = trainee.module
    with mode, _cacheless_mask_decisions():
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        ids = torch.zeros((batch, seq), dtype=torch.long)
        weights = weight_bytes(model)
        largest = max(p.numel() for p in params)
        staging = 2 * largest  # bf16 staging buffer of the largest parameter, on the device
        with MemoryTracker() as tracker:
            loss = trainee.loss(ids)
            activations = tracker.current_bytes
            loss.backward()
            del loss
        buckets = device_gradient_bytes()
        host = HOST_BYTES_PER_PARAM * sum(p.numel() for p in params) + 2 * largest
        return MemoryBreakdown(
            weights=weights,
            gradients=buckets,
            optimizer=staging,
            activations=activations,
            peak=weights + staging + buckets + tracker.peak_bytes,
            host=host,
        )


@functools.cache
def _count_cpu_attention() -> None:
    """Give FlopCounterMode the CPU flash attention's FLOPs (it knows only the CUDA kernels' ops): the count
    runs on fake CPU tensors, where SDPA dispatches to the CPU kernel, but stands for a GPU step."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in fc.flop_registry:

        @fc.register_flop_formula(forward)
        def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if backward is not None and backward not in fc.flop_registry:

        @fc.register_flop_formula(backward)
        def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_model_flops(
    bench_model: BenchModel,
    method: BenchMethod,
    batch: int,
    seq: int,
    amp_dtype: torch.dtype | None = torch.bfloat16,
    scaled: bool = False,
) -> int:
    """Matmul and attention FLOPs of one forward + backward of ``method``, recomputation not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_attention()
    counted = dataclasses.replace(method, recompute=False)
    mode = _fake_mode()
    trainee = _fake_trainee(bench_model, counted, scaled, amp_dtype, mode)
    with mode, _cacheless_mask_decisions():
        ids = torch.zeros((batch, seq), dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            forward_loss(trainee, ids, amp_dtype).backward()
        return int(counter.get_total_flops())
