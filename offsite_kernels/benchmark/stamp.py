"""Provenance stamp for benchmark results, and an append-only JSON-lines writer.

Every number a benchmark writes carries :func:`stamp`: when and where it was measured (date,
host, CPU, GPU, driver, compute capability) and with what (torch, triton, transformers,
offsite-kernels, the git commit). :func:`append_rows` adds rows to a ``.jsonl`` file, one JSON
object per line, each with the stamp under the key ``"stamp"``. The whole file is rewritten to a
temporary file beside it and moved into place with ``os.replace``, under an exclusive lock on the
directory, so a crash never leaves a half-written file and two writers never drop each other's rows.

Importing this module imports nothing heavy; :func:`stamp` imports torch lazily and never
initialises CUDA unless a GPU is present.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]  # the source checkout, when installed editable
_ENV_KEYS = ("OFFSITE_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TRITON_CACHE_DIR")


def _package_version(dist: str, module: str | None = None) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module:
        with contextlib.suppress(Exception):
            return str(__import__(module).__version__)
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _nvidia_driver() -> str | None:
    version = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if version:
        return version.splitlines()[0].strip()
    with contextlib.suppress(OSError):  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  ..."
        text = Path("/proc/driver/nvidia/version").read_text()
        for token in text.split():
            if token[:1].isdigit() and token.count(".") >= 1:
                return token
    return None


def _git() -> dict[str, Any]:
    if not (_REPO / ".git").exists():  # an installed package, or a copy of a checkout without its history
        # a copy (a GPU machine lent a working tree) is told its commit by whoever copied it
        return {"commit": os.environ.get("OFFSITE_SOURCE_COMMIT") or None, "dirty": None}
    commit = _run(["git", "rev-parse", "HEAD"], cwd=_REPO)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO)
    return {"commit": commit, "dirty": bool(status)}


def _gpu_info(torch: Any) -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "driver": _nvidia_driver(),
        "cuda_runtime": torch.version.cuda,
        "index": index,
        "count": torch.cuda.device_count(),
    }


def stamp() -> dict[str, Any]:
    """Where, when and with which software a measurement was taken (JSON-serialisable)."""
    try:
        import torch
    except ImportError:  # a stamp is still useful without torch (e.g. for a failed run)
        torch = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": _gpu_info(torch) if torch is not None else None,
        "versions": {
            "torch": torch.__version__ if torch is not None else None,
            "triton": _package_version("triton", "triton"),
            "transformers": _package_version("transformers", "transformers"),
            "deepspeed": _package_version("deepspeed"),  # metadata only: importing it starts its accelerator
            "liger_kernel": _package_version("liger-kernel"),  # a baseline of bench/fused_ops_gpu.py
            "offsite_kernels": _package_version("offsite-kernels", "offsite_kernels"),
        },
        "git": _git(),
        "env": {key: os.environ[key] for key in _ENV_KEYS if key in os.environ},
    }


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``directory`` itself (no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic replace still holds, only concurrent writers are unguarded
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has neither; a NaN loss is a finding, not a crash)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def append_rows(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], stamp_: Mapping[str, Any] | None = None) -> Path:
    """Append ``rows`` to the JSON-lines file ``path``, each with ``"stamp"`` set; returns the path.

    The stamp is taken once per call (or ``stamp_`` is used as given). NaN and infinite floats are
    written as null. Rows are serialised before
    the file is touched, so a row that is not JSON-serialisable changes nothing. The existing
    content is kept byte for byte (a missing final newline is added before the new rows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st = dict(stamp_) if stamp_ is not None else stamp()
    lines = [json.dumps(_finite({**row, "stamp": st}), sort_keys=False, allow_nan=False) + "\n" for row in rows]
    if not lines:
        return path
    with _locked(path.parent):
        try:
            old = path.read_bytes()
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            old = b""
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        if old and not old.endswith(b"\n"):
            old += b"\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(old)
                f.write("".join(lines).encode())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every row of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    print(json.dumps(stamp(), indent=2))
