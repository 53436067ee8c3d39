"""Atomic, non-clobbering output and safe tensor files.

Everything the library writes goes through :func:`atomic_output_dir`: the files are written
into a hidden temporary directory next to the destination and renamed into place only when
every file is complete, so a failure (an exception, a full disk, a killed process) never
leaves a half-written or clobbered output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import OutputExistsError, PackageError


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early if ``path`` exists and ``overwrite`` is false (before any work starts)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"output path {str(path)!r} already exists; choose a new path or pass overwrite=True "
            "(--overwrite on the command line) to replace it"
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block exits without error.

    With ``overwrite=True`` an existing ``path`` is replaced only after the new content is
    complete; otherwise an existing ``path`` is an error and is never touched.
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output gets the usual permissions
    try:
        yield tmp
        if path.exists():
            check_output_dir(path, overwrite)  # it may have appeared meanwhile
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            try:
                os.replace(path, backup / path.name)
            except BaseException:
                shutil.rmtree(backup, ignore_errors=True)  # the old output never moved: only the empty backup goes
                raise
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(backup / path.name, path)  # put the old output back
                shutil.rmtree(backup, ignore_errors=True)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temp_file_beside(target: Path, data: bytes) -> Path:
    """A complete, synced temporary file holding ``data`` in ``target``'s folder, with the usual permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the output gets the usual permissions
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to the file ``path`` through a temporary file beside it, moved into place when complete.

    An existing ``path`` is an error unless ``overwrite`` is true; it is then replaced only by the whole
    new text, so a failure never leaves a half-written or clobbered file.
    """
    target = check_output_dir(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_file_beside(target, text.encode("utf-8"))
    try:
        check_output_dir(target, overwrite)  # it may have appeared meanwhile
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_new_file(path: Path, data: bytes) -> None:
    """Create the file ``path`` holding ``data``, atomically; an existing file is an error (``FileExistsError``),
    never replaced, even one that appears while writing."""
    tmp = _temp_file_beside(path, data)
    try:
        os.link(tmp, path)  # fails if path exists
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (inside an atomic output directory)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, raising :class:`PackageError` that names ``what`` on any problem."""
    if not path.is_file():
        raise PackageError(f"{what}: missing file {str(path)!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{what}: {str(path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{what}: {str(path)!r} must hold a JSON object")
    return data


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors with safetensors (contiguous, detached copies; no pickle)."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file, raising :class:`PackageError` if it is corrupt."""
    if not path.is_file():
        raise PackageError(f"{what}: missing file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackageError(f"{what}: {str(path)!r} is not a readable safetensors file ({exc})") from exc


def check_safetensors_files(directory: Path, what: str) -> list[Path]:
    """Check every ``*.safetensors`` file of ``directory`` opens; return them (at least one)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise PackageError(f"{what}: no .safetensors weights in {str(directory)!r}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    handle.get_slice(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise PackageError(f"{what}: {str(f)!r} is corrupt or truncated ({exc})") from exc
    return files
