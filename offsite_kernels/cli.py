"""The ``offsite`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import OffsiteError

DEFAULT_LAYOUT = "2-8-2"


def _parse_layers(text: str) -> list[int]:
    from .errors import LayoutError

    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise LayoutError(f"--layers must be comma-separated block indices such as 3,7,11; got {text!r}") from None


def _cmd_emulate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .emulator import make_emulator, parse_layout
    from .emulator.bottleneck import load_model
    from .io import check_output_dir
    from .quant.formats import check_format

    layers = _parse_layers(args.layers) if args.layers else None
    bottom, k, top = parse_layout(args.layout or DEFAULT_LAYOUT)
    if layers and args.layout is None:
        k = len(layers)  # the kept blocks set the emulator's size
    check_format(args.bits, args.group_size)
    check_output_dir(args.output, args.overwrite)
    with tqdm(total=3, desc="emulate", unit="step", disable=args.quiet) as bar:
        bar.set_postfix_str("loading model")
        model = load_model(args.model_dir)
        bar.update()
        bar.set_postfix_str("building emulator")
        emu = make_emulator(
            model,
            bottom=bottom,
            top=top,
            emulator_layers=k,
            strategy=layers or "uniform",
            prune=args.prune,
            bits=args.bits,
            group_size=args.group_size,
        )
        bar.update()
        bar.set_postfix_str("writing package")
        emu.save_pretrained(args.output, overwrite=args.overwrite, tokenizer_from=args.model_dir)
        bar.update()
    print(
        f"emulator {emu.layout} of {emu.layout.n_layers} blocks (kept middle blocks {list(emu.layout.emulator)}) -> {args.output}"
    )
    return 0


def _cmd_plug_in(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .emulator import plug_in, read_adapter
    from .emulator.bottleneck import load_model
    from .hf_io import save_model_dir
    from .io import check_output_dir

    check_output_dir(args.output, args.overwrite)
    read_adapter(args.adapter_dir)  # fail on a bad adapter before loading a large model
    with tqdm(total=3, desc="plug-in", unit="step", disable=args.quiet) as bar:
        bar.set_postfix_str("loading model")
        model = load_model(args.model_dir)
        bar.update()
        bar.set_postfix_str("plugging adapter in")
        plug_in(model, args.adapter_dir, check_weights=not args.no_weight_check)
        bar.update()
        bar.set_postfix_str("writing model")
        save_model_dir(model, args.output, tokenizer_from=args.model_dir, overwrite=args.overwrite)
        bar.update()
    print(f"plugged {args.adapter_dir} into {args.model_dir} -> {args.output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(
        layout=args.layout,
        downstream=args.downstream,
        method=args.method,
        distill_steps=args.distill_steps,
        finetune_steps=args.finetune_steps,
        seed=args.seed,
        progress=not args.quiet,
    )
    run_demo(settings, workdir=args.workdir, json_out=args.json, overwrite=args.overwrite)
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from .env import report

    print(report())
    return 0


def _bits(text: str) -> int | str:
    if text in ("8", "4"):
        return int(text)
    if text in ("fp8", "bf16", "fp16"):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a weight format; use 8, 4, fp8, bf16 or fp16")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DOWNSTREAM, DemoSettings

    parser = argparse.ArgumentParser(prog="offsite", description="Offsite-tuning with fast frozen emulators.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("emulate", help="split a model into adapter + compressed emulator package")
    p.add_argument("model_dir", help="local Hugging Face causal LM directory")
    p.add_argument("-o", "--output", required=True, help="emulator package directory to create")
    p.add_argument(
        "--layout",
        help=f"BOTTOM-EMULATOR-TOP block counts, as in the paper (default {DEFAULT_LAYOUT}; with --layers, 2-<count>-2)",
    )
    p.add_argument("--layers", help="explicit comma-separated source indices of the kept middle blocks (instead of uniform drop)")
    p.add_argument("--prune", type=float, default=0.0, help="magnitude-prune this fraction of each emulator weight matrix")
    p.add_argument(
        "--bits",
        type=_bits,
        default=None,
        help="store the emulator's linears as 8 (int8), 4 (int4), fp8, or bf16/fp16 (dense, half the bytes of fp32)",
    )
    p.add_argument("--group-size", type=int, default=128, help="int4 group size along the input dimension: 32, 64 or 128")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_emulate)

    p = sub.add_parser("plug-in", help="put a trained adapter into the full model and save it")
    p.add_argument("model_dir", help="the full model the emulator was made from")
    p.add_argument("adapter_dir", help="adapter directory written by save_adapter / offsite finetune")
    p.add_argument("-o", "--output", required=True, help="directory for the full model with the adapter in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--no-weight-check", action="store_true", help="skip the check that the adapter came from this model's weights"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_plug_in)

    from .workflow.commands import register

    register(sub, _bits)

    from .benchmark.command import register as register_bench

    register_bench(sub)

    p = sub.add_parser("demo", help="the whole loop on the shipped small model and real text, with the four-setting table")
    p.add_argument(
        "--downstream",
        choices=tuple(DOWNSTREAM),
        default=DemoSettings.downstream,
        help="downstream text (see demo_assets/README.md)",
    )
    p.add_argument("--layout", default=DemoSettings.layout, help="BOTTOM-EMULATOR-TOP of the 8-block model")
    p.add_argument(
        "--method", default="full", choices=("full", "lora", "bitfit", "bottleneck"), help="adapter fine-tuning method"
    )
    p.add_argument("--distill-steps", type=int, default=120)
    p.add_argument("--finetune-steps", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the emulator package and adapter in this directory")
    p.add_argument("--json", help="write the table as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file and the packages in --workdir")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("env", help="print versions, GPU and available kernel backends")
    p.set_defaults(func=_cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``offsite``; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OffsiteError as exc:
        print(f"offsite {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # a command that may have joined a launcher's process group
            from .workflow.distributed import leave_process_group

            leave_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
