"""Quantize, pack, unpack and dequantize: the reference implementation of every weight format."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import OffsiteError
from .weight import COMPUTE_DTYPES, FORMATS, INT4_GROUP_SIZES, QuantizedWeight

FP8_MAX = 448.0  # largest finite float8 e4m3fn value


class QuantizationError(OffsiteError, ValueError):
    """A weight or format request the quantizer cannot honour."""


# dense formats that store the weight in a 16-bit dtype: half the bytes of fp32, and under autocast in
# that dtype the same products (autocast casts an fp32 weight to it on every call, and autograd keeps
# the copy for the backward)
DENSE_STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def normalize_format(bits: int | str | None) -> str:
    """Map the public ``bits=`` argument (8, 4, "fp8", "bf16", "fp16", None/16/"dense") to a format name."""
    table = {
        None: "dense",
        "dense": "dense",
        16: "dense",
        32: "dense",
        "bf16": "dense",
        "fp16": "dense",
        8: "int8",
        "int8": "int8",
        4: "int4",
        "int4": "int4",
        "fp8": "fp8",
    }
    if isinstance(bits, bool) or not isinstance(bits, int | str | None) or bits not in table:
        raise QuantizationError(f"unsupported bits={bits!r}; use 8, 4, 'fp8', 'bf16', 'fp16' or None (dense as it is)")
    return table[bits]


def check_format(bits: int | str | None, group_size: int = 128) -> str:
    """Validate a format request before any work; returns the format name."""
    fmt = normalize_format(bits)
    if fmt == "int4" and group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    return fmt


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise QuantizationError(f"expected a 2-D [out_features, in_features] weight, got {getattr(w, 'shape', type(w))}")
    if w.numel() == 0:
        raise QuantizationError(f"the weight is empty (shape {tuple(w.shape)}); there is nothing to quantize")
    if not w.is_floating_point():
        raise QuantizationError(f"expected a floating-point weight, got {w.dtype}")
    values = w.float() if w.element_size() == 1 else w  # torch has no isfinite for float8
    if w.device.type != "meta" and not torch.isfinite(values).all():  # a meta tensor has no values to check
        raise QuantizationError("the weight holds NaN or infinite values; it cannot be quantized")


def stored_layout(fmt: str, shape: tuple[int, int], group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The shape and dtype of each stored field (``data``, ``scales``, ``zeros``) of a format; dtype None: any float."""
    n, k = shape
    if fmt == "dense":
        return {"data": ((n, k), None)}
    if fmt in ("int8", "fp8"):
        return {"data": ((n, k), torch.int8 if fmt == "int8" else torch.float8_e4m3fn), "scales": ((n,), torch.float32)}
    groups = -(-k // group_size)
    return {
        "data": ((n, groups * group_size // 2), torch.uint8),
        "scales": ((n, groups), torch.float32),
        "zeros": ((n, groups), torch.uint8),
    }


def check_stored(qw: QuantizedWeight) -> None:
    """Raise :class:`QuantizationError` unless ``qw``'s tensors have the shapes and dtypes its format and shape call for."""
    check_format(qw.format, qw.group_size)
    layout = stored_layout(qw.format, qw.shape, qw.group_size)
    for field in ("data", "scales", "zeros"):
        tensor, want = getattr(qw, field), layout.get(field)
        if want is None:
            if tensor is not None:
                raise QuantizationError(f"a {qw.format} weight stores no {field}, but one was given")
            continue
        if tensor is None:
            raise QuantizationError(f"a {qw.format} weight of shape {list(qw.shape)} needs its {field}")
        shape, dtype = want
        dtype_ok = tensor.is_floating_point() if dtype is None else tensor.dtype == dtype
        if tuple(tensor.shape) != shape or not dtype_ok:
            raise QuantizationError(
                f"the {field} of a {qw.format} weight of shape {list(qw.shape)}"
                f"{f' in groups of {qw.group_size}' if qw.format == 'int4' else ''} must be {list(shape)} "
                f"{dtype or 'floating point'}; it is {list(tensor.shape)} {tensor.dtype}"
            )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack ``[N, K]`` values in ``[0, 15]`` (K even) into ``[N, K // 2]`` uint8, low nibble first."""
    if q.shape[-1] % 2:
        raise QuantizationError(f"pack_int4 needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[N, K // 2]`` uint8 into ``[N, K]`` uint8 in ``[0, 15]``."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-channel int8."""
    wf = w.detach().float()
    scales = (wf.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q, scales, None, 0, tuple(w.shape), w.dtype)


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """Asymmetric group-wise int4 along the input dimension, packed two per byte."""
    check_format(4, group_size)
    n, k = w.shape
    n_groups = -(-k // group_size)
    wf = w.detach().float()
    if n_groups * group_size != k:  # repeat the last column: the last group's range is unchanged
        wf = F.pad(wf[None], (0, n_groups * group_size - k), mode="replicate")[0]
    groups = wf.view(n, n_groups, group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((hi - lo) / 15.0).clamp_min(torch.finfo(torch.float32).tiny)
    zeros = torch.round(-lo / scales).clamp_(0, 15)
    q = torch.round(groups / scales[..., None] + zeros[..., None]).clamp_(0, 15)
    data = pack_int4(q.view(n, -1))
    return QuantizedWeight("int4", data, scales, zeros.to(torch.uint8), group_size, (n, k), w.dtype)


def quantize_fp8(w: torch.Tensor) -> QuantizedWeight:
    """float8 e4m3 with a per-output-channel scale (the row's max maps to 448)."""
    wf = w.detach().float()
    scales = (wf.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (wf / scales[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight("fp8", q, scales, None, 0, tuple(w.shape), w.dtype)


def quantize_rows_fp8(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8 e4m3 quantization of activations (the fp8 tensor-core path's reference).

    ``v = x.float()`` (times ``col_scale[None, :]`` in fp32 if given), ``s[m] = max(amax_m / 448, FLT_MIN)``
    (an all-zero row gets a tiny scale and zero codes), ``q = e4m3(clamp(v * (1 / s[m]), -448, 448))``, rounded
    to nearest even (fp32 arithmetic throughout: one division per row, a multiply per element). Returns
    ``(q [M, K] float8_e4m3fn, s [M] fp32)`` for a 2-D ``x``; ``v ~= q * s[:, None]``.
    """
    v = x.float()
    if col_scale is not None:
        v = v * col_scale.float()[None, :]
    s = (v.abs().amax(dim=-1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (v * (1.0 / s)[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


# --- native kernels (csrc/): bit-exact with the functions above, used where the extension is built --------------
def _native_module(t: torch.Tensor):
    """The native extension if it should quantize/dequantize ``t``: forced by OFFSITE_BACKEND=native, or by default
    where it is built and has kernels for ``t``'s device; None means the PyTorch reference above."""
    from .. import native
    from ..backends import requested_backend

    forced = requested_backend()
    if forced == "native":
        return native.require()
    if forced is not None or t.numel() == 0:
        return None
    return native.get() if native.supports_device(t.device) else None


def _quantize_native(module, w: torch.Tensor, fmt: str, group_size: int) -> QuantizedWeight:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() or w.numel() == 0:
        _check_weight(w)  # raises the reference's error
    w = w.detach().contiguous()
    try:
        if fmt == "int8":
            q, scales = module.quantize_int8(w)
            return QuantizedWeight("int8", q, scales, None, 0, tuple(w.shape), w.dtype)
        data, scales, zeros = module.quantize_int4(w, group_size)
    except ValueError as exc:  # NaN or infinite values, found by the kernel itself (no separate scan)
        raise QuantizationError(str(exc).splitlines()[0]) from None
    return QuantizedWeight("int4", data, scales, zeros, group_size, tuple(w.shape), w.dtype)


def quantize_weight(w: torch.Tensor, bits: int | str | None = 4, group_size: int = 128) -> QuantizedWeight:
    """Store a frozen ``[out_features, in_features]`` weight in a low-bit format.

    ``bits``: 8 (int8 per channel), 4 (int4 group-wise, ``group_size`` 32, 64 or 128), "fp8"
    (e4m3 per channel), "bf16" or "fp16" (dense, stored in that dtype) or None (dense, kept as it
    is). int8 and int4 run in the native extension where it is built (bit-exact with the PyTorch
    reference, which runs otherwise).
    """
    fmt = check_format(bits, group_size)
    if fmt in ("int8", "int4") and isinstance(w, torch.Tensor) and w.dtype in COMPUTE_DTYPES:  # float64 runs the reference
        module = _native_module(w)
        if module is not None:
            return _quantize_native(module, w, fmt, group_size)
    _check_weight(w)
    if fmt == "dense":
        stored = w.detach().to(DENSE_STORAGE.get(bits, w.dtype)).contiguous()  # type: ignore[arg-type]
        if stored.dtype != w.dtype and stored.device.type != "meta" and not torch.isfinite(stored).all():
            limit = torch.finfo(stored.dtype).max
            raise QuantizationError(
                f"the weight holds values beyond {stored.dtype}'s range (|w| > {limit:g}); store it with bits='bf16' "
                "(float32's range) or keep it dense"
            )
        return QuantizedWeight("dense", stored, None, None, 0, tuple(w.shape), stored.dtype)
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w, group_size)
    return quantize_fp8(w)


def dequantize_fields(
    fmt: str,
    data: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    group_size: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference dequantization from the stored fields (what every kernel must reproduce)."""
    n, k = shape
    if fmt == "dense":
        return data.to(dtype)
    if fmt in ("int8", "fp8"):
        return (data.float() * scales[:, None]).to(dtype)
    if fmt == "int4":
        q = unpack_int4(data).float().view(n, -1, group_size)
        w = (q - zeros.float()[..., None]) * scales[..., None]
        return w.view(n, -1)[:, :k].to(dtype)
    raise QuantizationError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The dense ``[out_features, in_features]`` weight of ``qw`` in its original dtype (native kernels where built)."""
    if qw.format != "dense" and qw.dtype in COMPUTE_DTYPES:
        module = _native_module(qw.data)
        if module is not None:
            from .. import native

            return native.dequantize(qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, qw.shape, qw.dtype)
    return dequantize_fields(qw.format, qw.data, qw.scales, qw.zeros, qw.group_size, qw.shape, qw.dtype)


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``approx`` against ``reference`` in decibels."""
    ref = reference.double()
    noise = (approx.double() - ref).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))
