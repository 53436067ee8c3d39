"""``QuantizedWeight``: a frozen weight matrix in one of the library's storage formats.

Formats (the pure-PyTorch code in this package is the reference every kernel is tested against):

- ``"int8"``: symmetric, one fp32 scale per output channel: ``w[n, k] ~= q[n, k] * scale[n]``,
  ``q`` in ``[-127, 127]``.
- ``"int4"``: asymmetric, group-wise along the input dimension (groups of 32, 64 or 128):
  ``w[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g]`` with ``g = k // group_size``,
  ``q`` and ``zero`` in ``[0, 15]``. Two values per byte along the input dimension: byte
  ``data[n, j]`` holds ``k = 2j`` in its low nibble and ``k = 2j + 1`` in its high nibble. The
  input dimension is padded to a whole number of groups (by repeating the row's last value,
  so padding never widens a group's range); kernels mask the padding off.
- ``"fp8"``: float8 e4m3 with one fp32 scale per output channel: ``w ~= q * scale``.
- ``"dense"``: the weight as it was (bf16, fp16 or fp32), so one API serves every format.

Both the forward kernel (``X @ W^T``) and the input-gradient kernel (``dY @ W``) read the same
``[N, K]``-major layout tile by tile, so one stored copy serves both directions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FORMATS = ("dense", "int8", "int4", "fp8")
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what frozen linears, their kernels and inputs run in
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantizedWeight:
    """A frozen ``[out_features, in_features]`` weight in a storage format (see module docs)."""

    format: str
    data: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    group_size: int
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def bits(self) -> int:
        return {"dense": torch.finfo(self.dtype).bits, "int8": 8, "int4": 4, "fp8": 8}[self.format]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (what a state dict or safetensors file holds)."""
        out = {"data": self.data}
        if self.scales is not None:
            out["scales"] = self.scales
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def nbytes(self) -> int:
        """Bytes of storage, scales and zero points included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on ``device`` (the format and every field kept)."""
        if isinstance(device, torch.dtype):
            from .formats import QuantizationError

            raise QuantizationError(
                f"QuantizedWeight.to() moves between devices; casting its stored codes to {device} would corrupt them. "
                "Use .dequantize().to(dtype) for a dense copy, or quantize again"
            )
        device = torch.device(device)
        move = lambda t: None if t is None else t.to(device=device)  # noqa: E731
        return replace(self, data=move(self.data), scales=move(self.scales), zeros=move(self.zeros))

    def dequantize(self) -> torch.Tensor:
        """The dense weight the format stands for, in the original shape and dtype."""
        from .formats import dequantize

        return dequantize(self)
