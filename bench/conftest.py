"""pytest configuration for the benchmarks in bench/ (never part of the test run: testpaths is tests/).

Adds the provenance stamp of bench/stamp.py to pytest-benchmark's ``machine_info``, so a
``--benchmark-json`` file names the CPU, GPU, driver and library versions beside its numbers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # bench/ is not a package: make stamp.py importable under any import mode
    sys.path.insert(0, _HERE)

_load_at_start: float | None = None


def pytest_sessionstart(session):
    global _load_at_start
    _load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Called when the results are written, i.e. after the benchmarks: the stamp's load average is the one at the end."""
    from stamp import stamp

    machine_info["offsite_stamp"] = stamp()
    machine_info["offsite_loadavg_1m_at_start"] = _load_at_start
