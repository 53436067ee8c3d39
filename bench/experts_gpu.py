"""GPU benchmark of a mixture of experts' expert MLPs: the library's grouped frozen experts against the alternatives.

Usage::

    python bench/experts_gpu.py [--out DIR] [--quick]                   # a CUDA GPU (an H200 expected)
    python bench/experts_gpu.py --device cpu --interpret --out /tmp/smoke   # CPU smoke run of the same code

One expert layer per model, bf16, random weights from the family's config (built on the device), routed by its own
router on random hidden states: Mixtral-8x7B (8 experts, hidden 4096, inner 14336, top 2), Qwen3-30B-A3B (128,
2048, 768, top 8) and OLMoE-1B-7B (64, 2048, 1024, top 8), at 512 and 4096 tokens (``--quick``: Qwen3 and Mixtral
at 4096). Forward + input backward (``torch.autograd.grad`` to the hidden states and the routing weights) of:

- ``hf``: the installed transformers' own experts module (dense bf16; its grouped GEMM where it has one);
- ``dense``: :class:`ok.nn.FrozenExperts` with the dense weights (the grouped Triton kernels, dense format);
- ``int8``, ``int4`` (group 128), ``fp8``: low-bit ``FrozenExperts`` (grouped kernels, dequantization fused);
- ``int4_loop``: the same int4 weights one expert after another through ``ok.frozen_linear`` (the path before the
  grouped kernels: a host synchronisation for the counts, two launches per expert and projection each way).

Per row: the median (p20, p80) in ms of ``triton.testing.do_bench`` (``time.perf_counter`` on a CPU), the stored
expert weight bytes, GB/s over the weight bytes read (twice: forward and backward), TFLOP/s of the routed rows'
GEMMs, the speedup against ``hf``, and the output's max relative error (``--tolerance``) against ``hf`` (dense rows),
against dense experts of the same dequantized weights (low-bit rows) and against ``int4`` (``int4_loop``).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

MODELS = {  # name: (model_type, config overrides)
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)),
    "olmoe-1b-7b": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8)),
}
CPU_MODELS = {  # the smoke run: the same families, tiny
    "mixtral-8x7b": ("mixtral", dict(hidden_size=32, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=32, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3)),
}
TOKENS, QUICK_TOKENS, CPU_TOKENS = (512, 4096), (4096,), (13,)
QUICK_MODELS = ("qwen3-30b-a3b", "mixtral-8x7b")
VARIANTS = ("hf", "dense", "int8", "int4", "fp8", "int4_loop")
_BITS = {"int8": 8, "int4": 4, "fp8": "fp8", "int4_loop": 4}


def expert_layer(torch: Any, ok: Any, model_type: str, overrides: dict, device: str) -> tuple[Any, Any, str]:
    """``(router, experts module, activation name)`` of block 0 of a one-block model built on ``device`` in bf16."""
    from transformers import AutoModelForCausalLM

    from offsite_kernels.models import find_submodule, get_family
    from offsite_kernels.tiny import tiny_config

    config = tiny_config(model_type, n_layers=1, **overrides)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    family = get_family(model)
    block = family.get_blocks(model)[0]
    experts = find_submodule(block, family.experts)
    router = find_submodule(block, family.experts.rpartition(".")[0]).gate
    return router, experts.requires_grad_(False), family.activation_name(config)


def loop_experts(torch: Any, ok: Any, frozen: Any) -> Any:
    """``FrozenExperts``' math one expert after another through ``ok.frozen_linear`` on each expert's slice."""
    e_count, inner = frozen.num_experts, frozen.inner_size

    def rows(linear: Any, e: int, n: int) -> Any:
        w = linear.weight
        cut = slice(e * n, (e + 1) * n)
        return type(w)(
            w.format,
            w.data[cut],
            w.scales[cut],
            None if w.zeros is None else w.zeros[cut],
            w.group_size,
            (n, w.shape[1]),
            w.dtype,
        )

    gate_up = [rows(frozen.gate_up_experts, e, 2 * inner) for e in range(e_count)]
    down = [rows(frozen.down_experts, e, frozen.hidden_size) for e in range(e_count)]

    def run(hidden: Any, index: Any, weights: Any) -> Any:
        k = index.shape[-1]
        order = torch.argsort(index.reshape(-1), stable=True)
        counts = torch.bincount(index.reshape(-1), minlength=e_count).tolist()
        tokens, w_sorted = order // k, weights.reshape(-1)[order]
        out, start = torch.zeros_like(hidden), 0
        for e, count in enumerate(counts[:e_count]):
            if count:
                t = tokens[start : start + count]
                inner_act = frozen.act.gated_packed(ok.frozen_linear(hidden[t], gate_up[e]))
                out.index_add_(0, t, (ok.frozen_linear(inner_act, down[e]) * w_sorted[start : start + count, None]).to(out.dtype))
                start += count
        return out

    return run


def dequantized_twin(torch: Any, ok: Any, frozen: Any) -> Any:
    """Dense bf16 ``FrozenExperts`` of the low-bit experts' dequantized weights, run under ``torch.no_grad``."""
    e, i, h = frozen.num_experts, frozen.inner_size, frozen.hidden_size
    gate_up = frozen.gate_up_experts.weight.dequantize().to(torch.bfloat16).view(e, 2 * i, h)
    down = frozen.down_experts.weight.dequantize().to(torch.bfloat16).view(e, h, i)
    twin = ok.nn.FrozenExperts(gate_up, down, frozen.act.name)
    return torch.no_grad()(twin)


def weight_bytes(module: Any) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers()) + sum(
        p.numel() * p.element_size() for p in module.parameters()
    )


def rel_err(torch: Any, out: Any, ref: Any) -> float | None:
    if not torch.isfinite(out).all():
        return None
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def bench_model(ctx: dict, name: str, model_type: str, overrides: dict, tokens: int, variants: Sequence[str]) -> list[dict]:
    torch, ok, device, timer = ctx["torch"], ctx["ok"], ctx["device"], ctx["timer"]
    router, hf, activation = expert_layer(torch, ok, model_type, overrides, device)
    g = torch.Generator(device=device).manual_seed(tokens)
    hidden = torch.randn(tokens, hf.gate_up_proj.shape[-1], device=device, dtype=torch.bfloat16, generator=g)
    with torch.no_grad():
        _, weights, index = router(hidden)
    weights = weights.to(torch.bfloat16)
    modules: dict[str, Any] = {"hf": hf, "dense": ok.nn.FrozenExperts.from_module(hf, activation)}
    for v in variants:
        if v in _BITS and v not in modules:
            modules[v] = ok.nn.FrozenExperts.from_module(hf, activation, bits=_BITS[v], group_size=ctx["group_size"])
    if "int4_loop" in variants:
        modules["int4_loop"] = loop_experts(torch, ok, modules["int4"])
    e_count, k = hf.gate_up_proj.shape[0], index.shape[-1]
    h, two_i = hf.gate_up_proj.shape[-1], hf.gate_up_proj.shape[1]
    flop = 3 * 2 * tokens * k * (h * two_i + (two_i // 2) * h)  # forward + input backward (twice the forward)
    grad_out = torch.randn(tokens, h, device=device, dtype=torch.bfloat16, generator=g)
    outputs: dict[str, Any] = {}
    rows = []
    for v in variants:
        fn = modules[v]
        row: dict[str, Any] = dict(kind="experts", run_id=ctx["run_id"], model=name, variant=v, tokens=tokens, top_k=k)
        row.update(experts=e_count, hidden=h, inner=two_i // 2, dtype="bf16")
        try:
            x, w = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)

            def step(fn: Any = fn, x: Any = x, w: Any = w) -> Any:
                return torch.autograd.grad(fn(x, index, w), (x, w), grad_out)

            start = time.perf_counter()
            with torch.no_grad():
                outputs[v] = fn(x, index, w)
            step()
            row["first_call_s"] = time.perf_counter() - start
            times = timer(step)
            stored = weight_bytes(modules["int4"] if v == "int4_loop" else fn)
            row.update(median_ms=times[0], p20_ms=times[1], p80_ms=times[2], weight_bytes=stored)
            row["gbps_weights"] = 2 * stored / (times[0] * 1e-3) / 1e9
            row["tflops"] = flop / (times[0] * 1e-3) / 1e12
        except Exception as exc:  # recorded, the run goes on
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        rows.append(row)
    for row in rows:
        out, v = outputs.get(row["variant"]), row["variant"]
        if out is None:
            continue
        if v in ("hf", "dense"):
            twin = outputs.get("hf")
        elif v == "int4_loop":
            twin = outputs.get("int4")
        else:
            twin = dequantized_twin(torch, ok, modules[v])(hidden, index, weights)
        if twin is None:
            continue
        row["max_rel_err"] = rel_err(torch, out, twin)
        row["correct"] = row["max_rel_err"] is not None and row["max_rel_err"] <= ctx["tolerance"]
        hf_row = next((r for r in rows if r["variant"] == "hf" and "median_ms" in r), None)
        if hf_row and "median_ms" in row:
            row["speedup_vs_hf"] = hf_row["median_ms"] / row["median_ms"]
    return rows


def _device_name(st: dict) -> str:
    gpu = st.get("gpu") or {}
    return str(gpu.get("name") or st.get("cpu") or "unknown device") if isinstance(gpu, dict) else str(gpu)


def markdown(rows: list[dict], st: dict) -> str:
    versions = st.get("versions") or {}
    lines = [
        "# Mixture-of-experts expert MLPs: grouped frozen experts",
        "",
        f"{_device_name(st)}; torch {versions.get('torch')}, triton {versions.get('triton')}, "
        f"transformers {versions.get('transformers')}; forward + input backward, bf16. Error: max |out - ref| / max |ref| "
        "against hf (dense rows), the dense twin of the same dequantized weights (low-bit rows), int4 (int4_loop).",
        "",
        "| model | tokens | variant | median ms (p20-p80) | speedup vs hf | weight MiB | GB/s (weights) | TFLOP/s | max rel err | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("kind") != "experts":
            continue
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['tokens']} | {r['variant']} | error | | | | | | {r['error'][:120]} |")
            continue
        err = r.get("max_rel_err")
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['variant']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | "
            f"{r.get('speedup_vs_hf', float('nan')):.2f} | {r['weight_bytes'] / 2**20:.0f} | {r['gbps_weights']:.0f} | "
            f"{r['tflops']:.1f} | {'n/a' if err is None else f'{err:.1e}'} | {'' if r.get('correct', True) else 'EXCEEDS TOLERANCE'} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(_HERE / "results"), help="directory of experts_gpu.jsonl / .md (default bench/results)")
    p.add_argument("--quick", action="store_true", help="Qwen3-30B-A3B and Mixtral-8x7B at 4096 tokens only")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: tiny shapes, perf_counter timer (a smoke run)")
    p.add_argument("--interpret", action="store_true", help="with --device cpu: Triton kernels in the interpreter")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--warmup-ms", type=int, default=10, help="do_bench warm-up time per measurement")
    p.add_argument("--rep-ms", type=int, default=50, help="do_bench repetition time per measurement")
    p.add_argument("--keep-triton-cache", action="store_true", help="use the existing Triton cache (default: a fresh one)")
    p.add_argument("--tolerance", type=float, default=2e-2, help="max |err| / max |ref| allowed (see the module docs)")
    args = p.parse_args(argv)
    if args.interpret and args.device != "cpu":
        p.error("--interpret runs Triton's CPU interpreter; it needs --device cpu")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    if "int4_loop" in args.variants.split(",") and "int4" not in args.variants.split(","):
        p.error("int4_loop reuses the int4 experts' weights: name int4 too")
    return args


def _run(args: argparse.Namespace, torch: Any, ok: Any, backend: str, cache_dir: str | None) -> int:
    from frozen_linear_gpu import do_bench_timer, perf_counter_timer, write_report
    from stamp import append_rows, stamp

    cuda = args.device == "cuda"
    t_start, st, run_id = time.perf_counter(), stamp(), uuid.uuid4().hex[:12]
    out_dir = Path(args.out)
    jsonl, md_path = out_dir / "experts_gpu.jsonl", out_dir / "experts_gpu.md"
    timer = do_bench_timer(args.warmup_ms, args.rep_ms) if cuda else perf_counter_timer(budget_s=0.0, min_reps=2, max_reps=2)
    models = MODELS if cuda else CPU_MODELS
    names = [n for n in (QUICK_MODELS if args.quick else models) if n in models]
    tokens = TOKENS if cuda and not args.quick else QUICK_TOKENS if cuda else CPU_TOKENS
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    run_row = dict(kind="run", run_id=run_id, argv=sys.argv[1:], device=args.device, backend=backend, quick=args.quick)
    append_rows(jsonl, [run_row], st)
    ctx = dict(torch=torch, ok=ok, device=args.device, timer=timer, run_id=run_id, group_size=128 if cuda else 32)
    ctx.update(tolerance=args.tolerance)
    rows: list[dict] = []
    for name in names:
        model_type, overrides = models[name]
        for n_tokens in tokens:
            new = bench_model(ctx, name, model_type, overrides, n_tokens, variants)
            append_rows(jsonl, new, st)
            rows.extend(new)
            write_report(md_path, markdown(rows, st), run_id, rows_so_far=len(rows))
            if cuda:
                torch.cuda.empty_cache()
    end = dict(kind="run_end", run_id=run_id, wall_s=time.perf_counter() - t_start, n_rows=len(rows))
    append_rows(jsonl, [end], st)
    md = markdown(rows, st)
    write_report(md_path, md, run_id)
    print(md)
    failed = [r for r in rows if r.get("error") or r.get("correct") is False]
    if failed:
        print(f"[bench] {len(failed)} rows failed or exceeded the tolerance", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from frozen_linear_gpu import run_gpu_script  # sets the environment before offsite_kernels and triton load

    return run_gpu_script(parse_args(argv), _run)


if __name__ == "__main__":
    sys.exit(main())
