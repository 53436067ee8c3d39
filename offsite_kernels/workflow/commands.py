"""Handlers and options of the workflow commands: ``distill``, ``finetune``, ``eval``, ``report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import PackageError
from ..nn.compiled_blocks import COMPILE_MODES


def add_training_options(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--warmup", type=int, default=10, help="linear warm-up steps, then cosine decay")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-size", type=int, default=256, help="tokens per training block")
    g.add_argument("--eval-every", type=int, default=50, help="validate every N steps and keep the best weights")
    g.add_argument("--checkpoint-every", type=int, default=0, help="write a resumable checkpoint every N steps")
    g.add_argument("--checkpoint-dir", help="checkpoint directory (default: OUTPUT.ckpt); an existing one is resumed")
    g.add_argument("--max-valid-blocks", type=int, default=64, help="validation blocks used (keeps evaluation quick)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--loss-log", help="append the loss curve to this JSONL file: one line per optimizer step")
    g = p.add_argument_group("distributed (run under torchrun, accelerate launch or deepspeed; see examples/README.md)")
    g.add_argument(
        "--deepspeed",
        metavar="CONFIG",
        help='train on DeepSpeed\'s engine with this JSON config (ZeRO, bf16, offload; batch keys may be "auto")',
    )


def deepspeed_config_of(args: argparse.Namespace) -> str | None:
    """``--deepspeed``, or the config that ``accelerate launch`` with a DeepSpeed plugin hands over."""
    import os

    if args.deepspeed:
        return args.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not config:
            raise PackageError(
                "accelerate launch asks for DeepSpeed but gives no deepspeed_config_file: set deepspeed_config_file in "
                "the accelerate config (see examples/accelerate/) or pass --deepspeed CONFIG"
            )
        return config
    return None


def settings_from(args: argparse.Namespace, allow_stage3: bool = False):
    """Training settings from the command line, checked (with the launch) before any model is loaded."""
    from .checkpoint import check_checkpoint_dir
    from .distributed import check_batch, launch_world
    from .loop import TrainSettings

    for name in ("steps", "batch_size", "grad_accum", "block_size", "eval_every", "max_valid_blocks"):
        if getattr(args, name) < 1:
            raise PackageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.loss_log and not Path(args.loss_log).resolve().parent.is_dir():
        raise PackageError(f"--loss-log {args.loss_log!r}: its folder does not exist; create it or choose another path")
    if args.checkpoint_every < 0:
        raise PackageError(f"--checkpoint-every must be 0 (off) or positive, got {args.checkpoint_every}")
    world = launch_world()
    check_batch(args.batch_size, world)
    deepspeed = deepspeed_config_of(args)
    checkpoint_dir = args.checkpoint_dir or (f"{args.output}.ckpt" if args.checkpoint_every else None)
    if checkpoint_dir:
        out, ckpt = Path(args.output).resolve(), Path(checkpoint_dir).resolve()
        if ckpt == out or out in ckpt.parents or ckpt in out.parents:
            raise PackageError(f"--checkpoint-dir {checkpoint_dir!r} must lie outside the output {args.output!r}")
        if deepspeed:
            from .deepspeed_engine import check_deepspeed_checkpoint_dir

            check_deepspeed_checkpoint_dir(ckpt)
        else:
            check_checkpoint_dir(ckpt)
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip=args.clip,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=checkpoint_dir,
        progress=not args.quiet,
        deepspeed=deepspeed,
        loss_log=args.loss_log,
    )
    if deepspeed:
        from .deepspeed_engine import check_config

        check_config(deepspeed, settings, world, allow_stage3=allow_stage3)
    return settings


def is_main_process() -> bool:
    from .distributed import launch_world

    return launch_world().is_main


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many kinds
        raise PackageError(f"no usable tokenizer in {str(path)!r} ({exc}); copy the model's tokenizer files there") from exc


def load_model_or_emulator(path: str | Path) -> Any:
    """An emulator package (has offsite.json) or a plain Hugging Face model directory."""
    from ..emulator.bottleneck import load_model
    from ..emulator.offsite_model import OffsiteModel
    from ..emulator.package import PACKAGE_FILE

    if (Path(path) / PACKAGE_FILE).is_file():
        return OffsiteModel.from_pretrained(path)
    return load_model(path)


def _data(args: argparse.Namespace, tokenizer: Any, model: Any) -> tuple[Any, Any]:
    from .data import check_tokenizer, load_blocks

    check_tokenizer(tokenizer, model)
    train = load_blocks(args.train, tokenizer, args.block_size)
    valid = load_blocks(args.valid, tokenizer, args.block_size, max_blocks=args.max_valid_blocks) if args.valid else None
    return train, valid


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..emulator.bottleneck import load_model
    from ..emulator.offsite_model import OffsiteModel
    from ..hf_io import save_model_dir
    from ..io import check_output_dir
    from .finetune import finetune
    from .methods import BottleneckSettings, LoraSettings

    check_output_dir(args.output, args.overwrite)
    settings = settings_from(args)
    if args.full_model and args.method != "full":
        raise PackageError("--full-model fine-tunes every weight of a whole model: it takes --method full only")
    if args.full_model and (args.fast or args.recompute or args.cuda_graphs or args.compile):
        raise PackageError(
            "--fast, --recompute, --cuda-graphs and --compile act on an emulator's frozen blocks; a --full-model run has none"
        )
    if args.compile and (args.recompute or args.cuda_graphs):
        raise PackageError(
            "--compile does not combine with --recompute or --cuda-graphs (--compile reduce-overhead replays CUDA graphs itself)"
        )
    lora = LoraSettings(
        args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets.split(",")) if args.lora_targets else None
    )
    bottleneck = BottleneckSettings(args.bottleneck_size)  # both checked before the model is loaded
    model = load_model(args.emulator_dir) if args.full_model else OffsiteModel.from_pretrained(args.emulator_dir)
    if args.fast:
        model.use_fast_blocks()
    if args.recompute:
        model.set_recompute(args.recompute)
    if args.cuda_graphs:
        model.set_cuda_graphs(True)
    if args.compile:
        model.set_compile(args.compile)
    tokenizer = load_tokenizer(args.emulator_dir)
    train, valid = _data(args, tokenizer, model)
    result = finetune(model, train, settings, valid=valid, method=args.method, lora=lora, bottleneck=bottleneck)
    if not is_main_process():  # data parallel: every process holds the same weights; rank 0 writes them
        return 0
    if args.full_model:
        save_model_dir(model, args.output, tokenizer_from=args.emulator_dir, overwrite=args.overwrite)
    else:
        model.save_adapter(args.output, overwrite=args.overwrite)
    best = f", best valid loss {result.best_valid:.4f}" if result.best_valid is not None else ""
    what = "full model" if args.full_model else f"adapter ({args.method})"
    print(
        f"{what} after {result.steps} steps: train loss {result.final_loss:.4f}{best}, {result.tokens_per_second:,.0f} tokens/s -> {args.output}"
    )
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from ..emulator.bottleneck import load_model
    from ..emulator.offsite_model import OffsiteModel
    from ..io import check_output_dir
    from ..quant.formats import check_format
    from .distill import distill

    check_output_dir(args.output, args.overwrite)
    if args.bits is not None:
        check_format(args.bits, args.group_size)
    settings = settings_from(args, allow_stage3=True)
    emu = OffsiteModel.from_pretrained(args.emulator_dir)
    teacher = load_model(args.teacher)
    tokenizer = load_tokenizer(args.emulator_dir)
    train, valid = _data(args, tokenizer, emu)
    result = distill(emu, teacher, train, settings, valid=valid, lm_weight=args.lm_weight, kd_weight=args.kd_weight)
    if not is_main_process():
        return 0
    if args.bits is not None:
        emu.quantize_(args.bits, args.group_size)
    emu.save_pretrained(args.output, overwrite=args.overwrite, tokenizer=tokenizer)
    before = " (dense, before quantizing)" if args.bits is not None else ""
    best = f", best valid loss {result.best_valid:.4f}{before}" if result.best_valid is not None else ""
    print(f"distilled emulator {emu.layout} after {result.steps} steps: loss {result.final_loss:.4f}{best} -> {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..io import check_output_dir
    from .data import check_tokenizer, load_blocks, load_choices
    from .report import evaluate_setting

    if args.json:
        check_output_dir(args.json, args.overwrite)
    model = load_model_or_emulator(args.path)
    tokenizer = load_tokenizer(args.path)
    check_tokenizer(tokenizer, model)
    data = load_blocks(args.data, tokenizer, args.block_size, max_blocks=args.max_blocks)
    choices = load_choices(args.choices) if args.choices else None
    row = evaluate_setting(str(args.path), model, data, tokenizer, choices)
    print(json.dumps(row, indent=2))
    if args.json:
        _write_json(args.json, [row], args.overwrite)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..emulator.adapter import read_adapter
    from ..emulator.bottleneck import load_model
    from ..emulator.offsite_model import OffsiteModel
    from ..io import check_output_dir
    from .data import check_tokenizer, load_blocks, load_choices
    from .report import format_table, four_settings, ordering_holds

    read_adapter(args.adapter)  # a bad adapter fails before any model is loaded
    if args.json:
        check_output_dir(args.json, args.overwrite)
    model = load_model(args.model)
    emu = OffsiteModel.from_pretrained(args.emulator)
    tokenizer = load_tokenizer(args.model)
    check_tokenizer(tokenizer, model)
    data = load_blocks(args.data, tokenizer, args.block_size, max_blocks=args.max_blocks)
    choices = load_choices(args.choices) if args.choices else None
    full_ft = load_model(args.full_finetuned) if args.full_finetuned else None
    rows = four_settings(model, emu, args.adapter, data, tokenizer, choices, full_ft)
    print(format_table(rows))
    print(
        f"paper's ordering (plug-in better than full zero-shot and emulator fine-tuned): {'holds' if ordering_holds(rows) else 'does NOT hold'}"
    )
    if args.json:
        _write_json(args.json, rows, args.overwrite)
    return 0


def _write_json(path: str, rows: list[dict[str, Any]], overwrite: bool) -> None:
    from ..io import write_text_atomic

    write_text_atomic(path, json.dumps(rows, indent=2) + "\n", overwrite)


def register(sub: Any, bits_type: Any) -> None:
    """Add the workflow commands to the ``offsite`` parser."""
    from .methods import METHODS

    p = sub.add_parser("finetune", help="fine-tune the adapter through the frozen emulator")
    p.add_argument("emulator_dir", help="emulator package (from offsite emulate or distill)")
    p.add_argument("--train", required=True, help="training text (.txt, or .jsonl with a 'text' field)")
    p.add_argument("--valid", help="validation text; the adapter with the best validation loss is kept")
    p.add_argument("-o", "--output", required=True, help="adapter directory to create")
    p.add_argument("--method", choices=METHODS, default="full", help="full adapter blocks (default), lora, bitfit or bottleneck")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", help="comma-separated module names inside a block (default: the family's q/v projections)")
    p.add_argument("--bottleneck-size", type=int, default=64, help="width of the bottleneck adapter")
    p.add_argument("--full-model", action="store_true", help="EMULATOR_DIR is a whole model: fine-tune all of it (the baseline)")
    p.add_argument("--fast", action="store_true", help="fused frozen emulator blocks (norms, activations, SwiGLU, SDPA)")
    p.add_argument(
        "--recompute",
        choices=("full", "block", "selective"),
        help="recompute the emulator's activations in the backward: full (save only its input), block (each "
        "block's input, each block rerun once) or selective (keep GEMM and attention outputs)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the emulator blocks as CUDA graphs (on a CUDA GPU; not with --recompute full)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="torch.compile the emulator blocks' training calls, in this mode (default: 'default'; 'reduce-overhead' "
        "adds CUDA graphs); not with --recompute or --cuda-graphs",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_training_options(p, steps=200, lr=1e-4)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("distill", help="distill the emulator blocks from the full model (model owner)")
    p.add_argument("emulator_dir", help="emulator package to start from")
    p.add_argument("--teacher", required=True, help="the full model directory the emulator was made from")
    p.add_argument("--train", required=True, help="owner's training text")
    p.add_argument("--valid", help="validation text; the emulator with the best validation perplexity is kept")
    p.add_argument("-o", "--output", required=True, help="distilled emulator package to create")
    p.add_argument("--lm-weight", type=float, default=1.0, help="weight of the language-modeling loss (paper: 1.0)")
    p.add_argument("--kd-weight", type=float, default=30.0, help="weight of the hidden-state distillation loss (paper: 30.0)")
    p.add_argument(
        "--bits", type=bits_type, default=None, help="store the distilled emulator's linears as 8, 4, fp8, bf16 or fp16"
    )
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_training_options(p, steps=200, lr=1e-4)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="perplexity (and multiple-choice accuracy) of a model, emulator or plugged model")
    p.add_argument("path", help="model directory, emulator package, or plugged-in model")
    p.add_argument("--data", required=True, help="text file for perplexity")
    p.add_argument("--choices", help="multiple-choice JSONL: context, choices, gold")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--max-blocks", type=int, default=None, help="evaluate at most this many blocks")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="the paper's four settings side by side")
    p.add_argument("--model", required=True, help="the full model")
    p.add_argument("--emulator", required=True, help="the emulator package the adapter was trained through")
    p.add_argument("--adapter", required=True, help="the fine-tuned adapter")
    p.add_argument("--data", required=True, help="evaluation text")
    p.add_argument("--choices", help="multiple-choice JSONL")
    p.add_argument("--full-finetuned", help="a fully fine-tuned model to add as a fifth row")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--max-blocks", type=int, default=None)
    p.add_argument("--json", help="write the rows as JSON to this file")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_report)
