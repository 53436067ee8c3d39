"""``offsite bench``: the paper's efficiency table, reproduced and extended with the library's fast paths.

:func:`run_bench` runs methods (:mod:`.methods`) on models (:mod:`.models`), measured on a device
(:mod:`.measure`) or accounted on fake tensors (:mod:`.account`); :mod:`.report` and :mod:`.plot`
write the table, the JSON rows and the PNG. Importing this package imports nothing heavy.
"""

from .methods import ALL_METHODS, BEST_METHOD, DEFAULT_METHODS, BenchError, BenchMethod
from .models import BENCH_MODELS, PAPER_MODELS, BenchModel, get_bench_model
from .runner import BenchResult, BenchSettings, run_bench

__all__ = [
    "ALL_METHODS",
    "BENCH_MODELS",
    "BEST_METHOD",
    "DEFAULT_METHODS",
    "PAPER_MODELS",
    "BenchError",
    "BenchMethod",
    "BenchModel",
    "BenchResult",
    "BenchSettings",
    "get_bench_model",
    "run_bench",
]
