"""The fp8 tensor-core frozen linear: when it runs, its PyTorch reference, and its backends.

An fp8 (e4m3, per-channel scales) weight can be used two ways:

- **fp8 GEMM** (the fp8 tensor-core path): the activations are quantized too, per row, and the
  GEMM runs on fp8 operands (``offsite_kernels/ops/fp8_gemm_triton.py``; its math is stated there).
  Needs fp8 tensor cores: CUDA compute capability >= 8.9 (Ada, Hopper and later).
- **weight-only fp8** (the emulation/fallback): the weight is decoded to the activation dtype in
  the GEMM main loop (``frozen_linear_triton``, FMT 3) and the activations stay as they are.

Which one (``OFFSITE_FP8_GEMM``): ``auto`` (default) takes the fp8 GEMM for bf16/fp16 activations
on a CUDA device of compute capability >= 8.9, weight-only fp8 elsewhere (CPUs, A100, fp32
activations); ``on`` takes the fp8 GEMM math for every bf16/fp16 activation, on any device (on a
CPU: the Triton kernels in the interpreter, or the PyTorch reference below; a CUDA GPU below
sm_89 is refused); ``off`` always takes weight-only fp8. The choice changes the numerics (the
activations lose precision to e4m3), so it is made per device and dtype, never per shape.

Backends of the fp8 GEMM math: "triton" (the kernels) and "torch" (the reference below: the
same quantization, bit-exact, then an fp32 matmul of the codes); "native" has no fp8 GEMM and
runs the reference.
"""

from __future__ import annotations

import os

import torch

from ..errors import BackendError
from ..quant.formats import quantize_rows_fp8

ENV_VAR = "OFFSITE_FP8_GEMM"
MODES = ("auto", "on", "off")
MIN_CAPABILITY = (8, 9)  # fp8 (e4m3) tensor cores: Ada (sm_89), Hopper (sm_90) and later
_DTYPES = (torch.bfloat16, torch.float16)


def fp8_gemm_mode() -> str:
    """``OFFSITE_FP8_GEMM``: "auto" (unset), "on" or "off"."""
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in MODES:
        raise BackendError(f"{ENV_VAR}={mode!r} is not a mode; choose one of {', '.join(MODES)}")
    return mode


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU with fp8 tensor cores (compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def uses_fp8_gemm(x: torch.Tensor) -> bool:
    """Whether an fp8 weight applied to activations like ``x`` runs the fp8 GEMM math (module docs)."""
    mode = fp8_gemm_mode()
    if mode == "off" or x.dtype not in _DTYPES:
        return False
    return mode == "on" or has_fp8_tensor_cores(x.device)


# --- reference --------------------------------------------------------------------------------
def fp8_linear_torch(x, data, scales, bias):
    """Reference forward: ``Y = s_x s_w (qX @ Wq^T) (+ b)`` with ``qX, s_x`` = per-row e4m3 of ``x`` (2-D);
    the codes multiplied in fp32 (exact products, fp32 sums), the scales applied after, ``Y`` in ``x.dtype``."""
    q, s = quantize_rows_fp8(x)
    acc = q.float() @ _codes(data).float().T
    y = acc * s[:, None] * scales.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_linear_input_grad_torch(grad_y, data, scales):
    """Reference input gradient: ``dX = s_g (qG @ Wq)`` with ``qG, s_g`` = per-row e4m3 of ``dY * s_w`` (2-D)."""
    q, s = quantize_rows_fp8(grad_y, col_scale=scales)
    return ((q.float() @ _codes(data).float()) * s[:, None]).to(grad_y.dtype)


def _codes(data: torch.Tensor) -> torch.Tensor:
    return data if data.dtype == torch.float8_e4m3fn else data.view(torch.float8_e4m3fn)


# --- backends ---------------------------------------------------------------------------------
def _check_triton_device(t: torch.Tensor) -> None:
    if t.is_cuda and not has_fp8_tensor_cores(t.device):
        cap = ".".join(map(str, torch.cuda.get_device_capability(t.device)))
        raise BackendError(
            f"the Triton fp8 GEMM needs fp8 tensor cores (compute capability >= 8.9); {torch.cuda.get_device_name(t.device)} "
            f"is {cap}. Unset {ENV_VAR} (or set it to off) for weight-only fp8, or OFFSITE_BACKEND=torch for the reference"
        )


def fp8_linear_fwd(x, data, scales, bias, backend: str):
    """Forward of the fp8 GEMM math on a 2-D ``x`` with ``backend`` ("triton"; anything else: the reference)."""
    if backend == "triton":
        _check_triton_device(x)
        from .fp8_gemm_triton import fp8_linear_fwd as launch

        return launch(x, data, scales, bias)
    return fp8_linear_torch(x, data, scales, bias)


def fp8_linear_bwd(grad_y, data, scales, backend: str):
    """Input gradient of the fp8 GEMM math on a 2-D ``grad_y`` with ``backend`` (as :func:`fp8_linear_fwd`)."""
    if backend == "triton":
        _check_triton_device(grad_y)
        from .fp8_gemm_triton import fp8_linear_bwd as launch

        return launch(grad_y, data, scales)
    return fp8_linear_input_grad_torch(grad_y, data, scales)
