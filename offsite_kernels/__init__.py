"""offsite-kernels: fast fine-tuning through a frozen, compressed emulator (Offsite-Tuning).

Importing the package initialises no GPU, compiles nothing and needs no built extension.
"""

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

__all__ = [
    "AdapterMismatchError",
    "BackendError",
    "Layout",
    "LayoutError",
    "OffsiteError",
    "OffsiteModel",
    "OutputExistsError",
    "PackageError",
    "UnsupportedModelError",
    "__version__",
    "get_family",
    "make_emulator",
    "plug_in",
    "supported_model_types",
]
