"""Exceptions raised by offsite-kernels.

Every error names the problem and, where there is one, the fix. The CLI turns an
``OffsiteError`` into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations


class OffsiteError(Exception):
    """Base class of every error this library raises on bad input."""


class UnsupportedModelError(OffsiteError, TypeError):
    """The model's ``config.model_type`` has no registered family."""


class LayoutError(OffsiteError, ValueError):
    """A bottom/emulator/top layout that does not fit the model."""


class PackageError(OffsiteError, ValueError):
    """An emulator package or adapter directory that is missing, corrupt or of another kind."""


class AdapterMismatchError(OffsiteError, ValueError):
    """An adapter that was trained for another model or layout."""


class OutputExistsError(OffsiteError, FileExistsError):
    """An output path that already exists (nothing is overwritten unless asked)."""


class BackendError(OffsiteError, RuntimeError):
    """A requested kernel backend that cannot run here."""


class ForwardADError(OffsiteError, NotImplementedError):
    """Forward-mode automatic differentiation (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``)
    through a library op: the ops define input gradients for the backward only."""
