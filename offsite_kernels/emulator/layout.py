"""Which blocks of the source model become the adapter and which the emulator.

The paper writes a layout as ``bottom-emulator-top`` ("2-8-2"). The middle blocks
``bottom .. n-top-1`` are compressed to ``emulator_layers`` blocks by uniform layer drop:
keep middle block ``round(i * (n_mid - 1) / (k - 1))`` for ``i = 0 .. k-1`` (Python's
``round``, half to even, as the paper's code does). With ``k == 1`` the single kept block is
``round((n_mid - 1) / 2)``, the middle of the middle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import LayoutError


def uniform_indices(n_middle: int, k: int) -> list[int]:
    """Indices (0-based, into the middle) kept by the paper's uniform layer drop."""
    if n_middle < 1:
        raise LayoutError("uniform layer drop needs at least one middle block")
    if not 1 <= k <= n_middle:
        raise LayoutError(f"emulator_layers must be between 1 and the {n_middle} middle blocks, got {k}")
    if k == 1:
        return [round((n_middle - 1) / 2)]
    return [round(i * (n_middle - 1) / (k - 1)) for i in range(k)]


@dataclass(frozen=True)
class Layout:
    """A resolved split: source block indices of the bottom adapter, the emulator and the top adapter."""

    n_layers: int
    bottom: int
    top: int
    emulator: tuple[int, ...]

    @property
    def bottom_indices(self) -> tuple[int, ...]:
        return tuple(range(self.bottom))

    @property
    def top_indices(self) -> tuple[int, ...]:
        return tuple(range(self.n_layers - self.top, self.n_layers))

    @property
    def adapter_indices(self) -> tuple[int, ...]:
        """Source indices of every adapter block, bottom then top."""
        return self.bottom_indices + self.top_indices

    @property
    def kept_indices(self) -> tuple[int, ...]:
        """Source indices of every block the emulator model holds, in order."""
        return self.bottom_indices + self.emulator + self.top_indices

    @property
    def dropped_indices(self) -> tuple[int, ...]:
        kept = set(self.kept_indices)
        return tuple(i for i in range(self.n_layers) if i not in kept)

    def adapter_positions(self) -> tuple[int, ...]:
        """Positions of the adapter blocks inside the emulator model's block list."""
        n_kept = len(self.kept_indices)
        return tuple(range(self.bottom)) + tuple(range(n_kept - self.top, n_kept))

    def __str__(self) -> str:
        return f"{self.bottom}-{len(self.emulator)}-{self.top}"

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "bottom": self.bottom, "top": self.top, "emulator": list(self.emulator)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        try:
            layout = cls(int(data["n_layers"]), int(data["bottom"]), int(data["top"]), tuple(int(i) for i in data["emulator"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(f"malformed layout record {data!r}: {exc}") from exc
        layout.validate()
        return layout

    def validate(self) -> None:
        """Raise :class:`LayoutError` unless the indices form a valid split."""
        n, b, t = self.n_layers, self.bottom, self.top
        if b < 0 or t < 0:
            raise LayoutError(f"bottom and top must be >= 0, got bottom={b}, top={t}")
        if b + t >= n:
            raise LayoutError(f"bottom + top = {b + t} leaves no middle blocks in a {n}-block model; use bottom + top <= {n - 1}")
        if not self.emulator:
            raise LayoutError("the emulator needs at least one block (emulator_layers >= 1)")
        middle = range(b, n - t)
        for i in self.emulator:
            if i not in middle:
                raise LayoutError(f"emulator block {i} is outside the middle blocks {b}..{n - t - 1}")
        if list(self.emulator) != sorted(set(self.emulator)):
            raise LayoutError(f"emulator block indices must be strictly increasing, got {list(self.emulator)}")


def parse_layout(text: str) -> tuple[int, int, int]:
    """Parse ``"2-8-2"`` into ``(bottom, emulator_layers, top)``."""
    parts = text.strip().split("-")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values):
        raise LayoutError(f"layout {text!r} is not of the form BOTTOM-EMULATOR-TOP with non-negative integers, e.g. 2-8-2")
    return values  # type: ignore[return-value]


def resolve_layout(
    n_layers: int,
    bottom: int,
    top: int,
    emulator_layers: int | None = None,
    strategy: str | Sequence[int] = "uniform",
) -> Layout:
    """Resolve a layout for an ``n_layers``-block model.

    ``strategy="uniform"`` keeps ``emulator_layers`` middle blocks by the paper's uniform
    drop (all of them when ``emulator_layers`` is None). A sequence of ints names the kept
    middle blocks by their source indices; ``emulator_layers``, if given, must match its length.
    """
    for name, value in (("bottom", bottom), ("top", top)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise LayoutError(f"{name} must be an int, got {value!r}")
    if bottom < 0 or top < 0:
        raise LayoutError(f"bottom and top must be >= 0, got bottom={bottom}, top={top}")
    if bottom + top >= n_layers:
        raise LayoutError(
            f"bottom + top = {bottom + top} leaves no middle blocks in a {n_layers}-block model; "
            f"use bottom + top <= {n_layers - 1}"
        )
    n_middle = n_layers - bottom - top
    if isinstance(strategy, str):
        if strategy != "uniform":
            raise LayoutError(f"unknown strategy {strategy!r}; use 'uniform' or a list of middle block indices")
        k = n_middle if emulator_layers is None else emulator_layers
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_middle:
            raise LayoutError(
                f"emulator_layers must be an int between 1 and the {n_middle} middle blocks "
                f"(blocks {bottom}..{n_layers - top - 1}), got {k!r}"
            )
        emulator = tuple(bottom + i for i in uniform_indices(n_middle, k))
    else:
        try:
            emulator = tuple(int(i) for i in strategy)
        except (TypeError, ValueError) as exc:
            raise LayoutError(f"strategy must be 'uniform' or a sequence of block indices, got {strategy!r}") from exc
        if emulator_layers is not None and emulator_layers != len(emulator):
            raise LayoutError(f"emulator_layers={emulator_layers} but {len(emulator)} block indices were given")
    layout = Layout(n_layers, bottom, top, emulator)
    layout.validate()
    return layout
