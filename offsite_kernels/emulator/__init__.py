"""Offsite-tuning core: layout, emulator construction, package files and plug-in."""

from .adapter import load_adapter, plug_in, read_adapter
from .layout import Layout, parse_layout, resolve_layout, uniform_indices
from .offsite_model import OffsiteModel, make_emulator

__all__ = [
    "Layout",
    "OffsiteModel",
    "load_adapter",
    "make_emulator",
    "parse_layout",
    "plug_in",
    "read_adapter",
    "resolve_layout",
    "uniform_indices",
]
