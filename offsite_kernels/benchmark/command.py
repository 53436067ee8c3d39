"""The ``offsite bench`` command: options, defaults per device, and what it prints."""

from __future__ import annotations

import argparse

from .methods import ALL_METHODS, DEFAULT_METHODS, BenchError
from .models import BENCH_MODELS, PAPER_MODELS


def _list(option: str, text: str, every: tuple[str, ...], default: tuple[str, ...]) -> list[str]:
    text = text.strip().lower()
    if text == "all":
        return list(every)
    if text == "default":
        return list(default)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise BenchError(f"{option} names nothing; give comma-separated names, 'default' or 'all'")
    return names


def _batches(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BenchError(f"--batch takes comma-separated positive integers (e.g. 1,8), got {text!r}") from None
    if not values or min(values) < 1:
        raise BenchError(f"--batch takes comma-separated positive integers (e.g. 1,8), got {text!r}")
    return values


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .report import ROWS_FILE, check_rows, format_markdown, write_outputs
    from .runner import BenchSettings, run_bench
    from .stamp import append_rows, stamp

    sources = {"auto": None, "both": ("measured", "accounted"), "measured": ("measured",), "accounted": ("accounted",)}
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise BenchError(f"-o {args.output!r} is a file; give a directory for the rows, table and plot")
    provenance = stamp()
    settings = BenchSettings(
        models=_list("--models", args.models, tuple(BENCH_MODELS), PAPER_MODELS),
        methods=_list("--methods", args.methods, ALL_METHODS, DEFAULT_METHODS),
        batches=None if args.batch is None else _batches(args.batch),
        seq=args.seq,
        device=args.device,
        sources=sources[args.source],
        scaled=True if args.scaled else (False if args.full_size else None),
        amp_dtype=None if args.fp32 else torch.bfloat16,
        warmup=args.warmup,
        steps=args.steps,
        ft_fallback=not args.no_ft_fallback,
        progress=None if args.quiet else (lambda msg: print(f"[bench] {msg}", flush=True)),
        on_row=lambda row: append_rows(output / ROWS_FILE, [row], provenance),  # kept even if a later row crashes
    )
    result = run_bench(settings)
    print(format_markdown(result.rows))
    paths = write_outputs(result.rows, output, plot=not args.no_plot, append=False)
    print(f"rows appended to {paths['rows']}; table {paths['table']}", end="")
    if paths["plot"] is not None:
        print(f"; plot {paths['plot']}")
    elif args.no_plot:
        print("")
    elif all("error" in row for row in result.rows):
        print("; no plot (no row ran)")
    else:
        print("; no plot (matplotlib is not installed: pip install 'offsite-kernels[bench]')")
    print(f"({result.seconds:.0f} s)")
    failures = check_rows(result.rows)
    for line in failures:
        print(f"offsite bench: failed: {line}")
    return 1 if failures else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="FT, LoRA, OT and the library's fast paths side by side: tokens/s, peak memory, MFU (table, JSON rows, PNG)",
        description=(
            "With no options: on a CUDA GPU, the paper's models measured at full size; on a CPU, the paper's models "
            "accounted at full size on fake tensors (peak memory, exact) and measured at a scaled-down size (speed)."
        ),
    )
    p.add_argument(
        "--models",
        default="default",
        help=f"comma-separated, 'default' ({','.join(PAPER_MODELS)}) or 'all' ({','.join(BENCH_MODELS)})",
    )
    p.add_argument(
        "--methods", default="default", help="comma-separated (e.g. ft,ot+lora+int4), 'default' or 'all'; see the README"
    )
    p.add_argument("--batch", help="comma-separated batch sizes (default: the paper's 1; on a GPU also a GPU-filling 16)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512, the paper's block)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="where measured rows run (default: cuda if present)")
    p.add_argument(
        "--source",
        choices=("auto", "both", "measured", "accounted"),
        default="auto",
        help="measured steps, fake-tensor accounting, or both; auto (default): measured on a GPU, both on a CPU",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scaled", action="store_true", help="measure the scaled-down configs (the default on a CPU)")
    size.add_argument("--full-size", action="store_true", help="measure the full-size configs (the default on a GPU)")
    p.add_argument("--fp32", action="store_true", help="no autocast (the default is bf16 mixed precision, as the paper)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    p.add_argument(
        "--no-ft-fallback",
        action="store_true",
        help="on a GPU, run plain FT even where it does not fit (default: such FT runs on DeepSpeed ZeRO-2 with CPU offload)",
    )
    p.add_argument("-o", "--output", default="offsite-bench", help="directory for rows (appended), table and plot (new files)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_bench)
