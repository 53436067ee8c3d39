"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds the trainable tensors, the best tensors so far, the optimizer's state, the
random number generators and the loop's counters: enough for a killed run to resume and end
exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import PackageError
from ..io import atomic_output_dir, load_tensors, read_json, save_tensors, write_json

STATE_FILE = "trainer_state.json"
TENSOR_FILE = "trainer_tensors.safetensors"


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _interrupted_saves(path: Path) -> list[Path]:
    """Complete checkpoints that a save killed between its two renames left beside a missing ``path``: the
    previous checkpoint, moved aside (``.<name>.old-*/<name>``; see :func:`offsite_kernels.io.atomic_output_dir`).
    The new one, not yet moved in (``.<name>.tmp-*``), is not taken: a complete temporary folder is also
    what a kill just before the renames leaves, of whatever run wrote it; the checkpoint that was in
    place is the one known to be this path's."""
    found = path.parent.glob(f".{path.name}.old-*/{path.name}")
    return [c for c in found if (c / STATE_FILE).is_file() and (c / TENSOR_FILE).is_file()]


def _recover_interrupted_save(path: Path) -> bool:
    """Put back the checkpoint an interrupted save moved aside from a now missing ``path`` (the newest, by
    step, should there be several)."""
    steps = []
    for candidate in _interrupted_saves(path):
        try:
            steps.append((int(read_json(candidate / STATE_FILE, "training checkpoint")["counters"]["step"]), candidate))
        except (PackageError, KeyError, TypeError, ValueError):
            continue
    if not steps:
        return False
    step, newest = max(steps)
    os.replace(newest, path)
    newest.parent.rmdir()
    warnings.warn(
        f"{str(path)!r}: a checkpoint save was interrupted; resuming from the checkpoint of step {step} it had moved aside",
        stacklevel=3,
    )
    return True


def check_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a checkpoint to resume; False if it is free. A directory that holds
    anything else is refused: a checkpoint never replaces other files. A save that was killed
    between moving the previous checkpoint aside and moving the new one in is recovered."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return True
    if not path.exists() and _recover_interrupted_save(path):
        return True
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PackageError(
            f"checkpoint directory {str(path)!r} exists and holds no training checkpoint; "
            "give an empty or new --checkpoint-dir (its contents would be replaced)"
        )
    return False


def save_checkpoint(
    path: str | os.PathLike,
    params: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    counters: dict[str, Any],
) -> None:
    """Write a checkpoint directory atomically, replacing the previous one only when complete."""
    tensors = {f"param.{k}": v for k, v in params.items()}
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best.items()})
    optim_tensors, optim_meta = _optimizer_to_flat(optimizer)
    tensors.update(optim_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    with atomic_output_dir(path, overwrite=True) as tmp:
        save_tensors(tmp / TENSOR_FILE, tensors)
        write_json(tmp / STATE_FILE, {"counters": counters, "optimizer": optim_meta})


def saved_counters(path: str | os.PathLike) -> dict[str, Any]:
    """The loop's counters of the checkpoint in ``path``, read without restoring anything."""
    counters = read_json(Path(path) / STATE_FILE, "training checkpoint").get("counters")
    if not isinstance(counters, dict):
        raise PackageError(f"training checkpoint {str(path)!r} has no counters; delete it or use a new --checkpoint-dir")
    return counters


def load_checkpoint(
    path: str | os.PathLike, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Restore optimizer and RNG state; return ``(params, best_or_None, counters)``."""
    path = Path(path)
    meta = read_json(path / STATE_FILE, "training checkpoint")
    tensors = load_tensors(path / TENSOR_FILE, "training checkpoint")
    params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    best = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")} or None
    try:
        _optimizer_from_flat(optimizer, tensors, meta["optimizer"])
        torch.set_rng_state(tensors["rng.cpu"])
        counters = meta["counters"]
    except (KeyError, ValueError, TypeError) as exc:
        raise PackageError(
            f"training checkpoint {str(path)!r} is incomplete or of another run ({exc}); delete it or use a new --checkpoint-dir"
        ) from exc
    if torch.cuda.is_available():
        cuda = sorted((int(k[len("rng.cuda") :]), v) for k, v in tensors.items() if k.startswith("rng.cuda"))
        if cuda:
            torch.cuda.set_rng_state_all([v for _, v in cuda])
    return params, best, counters
