"""Throughput and peak memory per method, as a PNG (matplotlib, the ``bench`` extra).

One row of panels per (model, batch, source) group of benchmark rows: tokens/s on the left
(measured rows only), peak memory on the right, FT first, each bar labelled with its ratio to FT.

    python -m offsite_kernels.benchmark.plot ROWS.jsonl OUT.png   # redraw from saved rows
"""

from __future__ import annotations

import importlib.util
import io
import sys
from typing import Any

MiB = 2**20


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def render_png(rows: list[dict[str, Any]]) -> bytes:
    """The figure as PNG bytes (rows with an error are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import group_rows

    groups = group_rows([row for row in rows if "error" not in row])
    if not groups:
        raise ValueError("no benchmark row without an error to plot")
    fig, axes = plt.subplots(
        len(groups), 2, figsize=(13, 1.2 + 0.45 * max(len(g) for g in groups.values()) * len(groups)), squeeze=False
    )
    for (model, layout, batch, seq, source, hardware, scaled), (ax_speed, ax_mem) in zip(groups, axes, strict=True):
        group = groups[(model, layout, batch, seq, source, hardware, scaled)]
        labels = [r["method"] for r in group][::-1]
        ft = next((r for r in group if r["method"] == "ft"), None)
        device = "CPU" if group[0]["device"] == "cpu" else hardware
        where = (
            "accounted on fake tensors" if source == "accounted" else f"measured on {device}{', scaled down' if scaled else ''}"
        )
        title = f"{model} {layout}, batch {batch}x{seq}: {where}"
        mem = [r["peak_bytes"] / MiB for r in group][::-1]
        bars = ax_mem.barh(labels, mem, color="#c44e52")
        ax_mem.set_xlabel("peak memory (MiB)")
        if ft:
            ax_mem.bar_label(bars, [f"{ft['peak_bytes'] / MiB / m:.1f}x less" if m else "" for m in mem], fontsize=7, padding=2)
        if source == "measured":
            speed = [r["tokens_per_s"] for r in group][::-1]
            bars = ax_speed.barh(labels, speed, color="#4c72b0")
            ax_speed.set_xlabel("tokens/s")
            if ft:
                ax_speed.bar_label(bars, [f"{s / ft['tokens_per_s']:.1f}x" for s in speed], fontsize=7, padding=2)
        else:
            ax_speed.set_xticks([])
            ax_speed.set_yticks([])
            ax_speed.text(
                0.5, 0.5, "accounted: no time, memory only", ha="center", va="center", fontsize=9, transform=ax_speed.transAxes
            )
        ax_speed.set_title(title, fontsize=9, loc="left")
        for ax in (ax_speed, ax_mem):
            ax.tick_params(axis="y", labelsize=7)
            ax.margins(x=0.25)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from ..io import write_new_file
    from .stamp import read_rows

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m offsite_kernels.benchmark.plot ROWS.jsonl OUT.png", file=sys.stderr)
        return 2
    source, target = Path(args[0]), Path(args[1])
    problem = None
    if not source.is_file():
        problem = f"{args[0]!r} is not a file of benchmark rows"
    elif target.exists():
        problem = f"{args[1]!r} already exists; choose a new file name"
    elif not target.parent.is_dir():
        problem = f"the folder of {args[1]!r} does not exist"
    if problem is None:
        try:
            rows = [r for r in read_rows(source) if r.get("bench") == "offsite_bench"]
        except (ValueError, UnicodeDecodeError) as exc:
            problem = f"{args[0]!r} is not JSON lines: {exc}"
        else:
            if not any("error" not in r for r in rows):
                problem = f"{args[0]!r} holds no offsite bench row that ran"
    if problem is not None:
        print(f"offsite bench plot: error: {problem}", file=sys.stderr)
        return 2
    if not matplotlib_available():
        print("offsite bench plot: error: matplotlib is not installed: pip install 'offsite-kernels[bench]'", file=sys.stderr)
        return 2
    write_new_file(target, render_png(rows))
    print(f"wrote {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
