"""offsite-kernels: fast fine-tuning through a frozen, compressed emulator (Offsite-Tuning).

Importing the package initialises no GPU, compiles nothing and needs no built extension.
"""

from . import nn
from ._version import __version__
from .emulator import Layout, OffsiteModel, make_emulator, plug_in
from .errors import (
    AdapterMismatchError,
    BackendError,
    LayoutError,
    OffsiteError,
    OutputExistsError,
    PackageError,
    UnsupportedModelError,
)
from .models import get_family, supported_model_types
from .ops import frozen_linear
from .quant import QuantizedWeight, quantize_weight

__all__ = [
    "AdapterMismatchError",
    "BackendError",
    "Layout",
    "LayoutError",
    "OffsiteError",
    "OffsiteModel",
    "OutputExistsError",
    "PackageError",
    "QuantizedWeight",
    "UnsupportedModelError",
    "__version__",
    "frozen_linear",
    "get_family",
    "make_emulator",
    "nn",
    "plug_in",
    "quantize_weight",
    "supported_model_types",
]
