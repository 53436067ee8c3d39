"""Environment diagnostic: ``python -m offsite_kernels.env`` (or ``offsite env``)."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

from ._version import __version__
from .backends import BACKENDS, backend_status


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    """A multi-line report of versions, GPU and runnable backends."""
    import torch

    lines = [
        f"offsite-kernels {__version__}",
        f"python          {platform.python_version()} ({sys.platform}, {platform.machine()})",
    ]
    for package in ("torch", "triton", "transformers", "deepspeed", "peft", "accelerate", "safetensors"):
        lines.append(f"{package:<15} {_version(package)}")
    lines.append(f"torch CUDA      {torch.version.cuda or 'none (CPU build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(
                f"GPU {i}           {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.1f} GiB"
            )
    else:
        lines.append("GPU             none")
    lines.append("backends:")
    for name in BACKENDS:
        status = backend_status(name)
        lines.append(f"  {name:<7} {'yes' if status.available else 'no ':<4} {status.reason}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
