"""Weight formats for frozen layers: int8, int4 (packed, group-wise), fp8 e4m3, dense."""

from .formats import QuantizationError, dequantize, pack_int4, quantize_weight, snr_db, unpack_int4
from .weight import FORMATS, INT4_GROUP_SIZES, QuantizedWeight

__all__ = [
    "FORMATS",
    "INT4_GROUP_SIZES",
    "QuantizationError",
    "QuantizedWeight",
    "dequantize",
    "pack_int4",
    "quantize_weight",
    "snr_db",
    "unpack_int4",
]
