"""CPU benchmarks of the frozen linear (pytest-benchmark), on scaled-down transformer shapes.

Run (about a minute and a half on 2 cores; not collected by the project's test run)::

    python -m pytest bench/frozen_linear_cpu.py --benchmark-only -q \\
        --benchmark-json bench/results/frozen_linear_cpu.json
    python bench/frozen_linear_cpu.py bench/results/frozen_linear_cpu.json > bench/results/frozen_linear_cpu.md

What runs: the torch reference backend (``OFFSITE_BACKEND=torch``, what ``ok.frozen_linear``
uses on a CPU), i.e. dequantize the whole weight, then ``F.linear`` in fp32. Implementations:

- ``F.linear``: ``torch.nn.functional.linear`` with the dense fp32 weight (the baseline);
- ``ok-dense``: ``ok.frozen_linear`` with a dense fp32 weight (the custom-op dispatch overhead);
- ``ok-int8`` / ``ok-int4``: ``ok.frozen_linear`` with an int8 (per channel) or int4 (group 128) weight.

Directions: ``fwd`` (``y = x @ W^T + b``) and ``fwd+bwd`` (forward, then the input gradient only:
the weight is frozen in every implementation, so no weight gradient is computed by any of them).

Shapes are the widest projection of each model at half width, so that one call stays well under a
second on 2 cores: GPT2-XL's ``mlp.c_fc`` (1600 -> 6400) as 800 -> 3200, OPT-1.3B's ``fc1``
(2048 -> 8192) as 1024 -> 4096; and tokens M in {1, 16, 512}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import offsite_kernels as ok

# name -> (out_features N, in_features K)
SHAPES = {
    "gpt2-xl/2 c_fc": (3200, 800),
    "opt-1.3b/2 fc1": (4096, 1024),
}
TOKENS = (1, 16, 512)
IMPLS = ("F.linear", "ok-dense", "ok-int8", "ok-int4")
DIRECTIONS = ("fwd", "fwd+bwd")
INT4_GROUP = 128
NOISY = 0.3  # IQR / median above which the summary marks a case noisy
_BITS = {"ok-dense": None, "ok-int8": 8, "ok-int4": 4}

_weights: dict[tuple[str, str], tuple[torch.Tensor | ok.QuantizedWeight, torch.Tensor]] = {}


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """Measure the CPU path whatever the caller's environment forces."""
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")


def _weight(shape: str, impl: str) -> tuple[torch.Tensor | ok.QuantizedWeight, torch.Tensor]:
    """The (possibly quantized) weight and an fp32 bias, built once per (shape, impl)."""
    key = (shape, impl)
    if key not in _weights:
        n, k = SHAPES[shape]
        gen = torch.Generator().manual_seed(n * 7 + k)
        w = torch.randn(n, k, generator=gen) * k**-0.5
        bias = torch.randn(n, generator=gen) * 0.1
        _weights[key] = (w if impl == "F.linear" else ok.quantize_weight(w, bits=_BITS[impl], group_size=INT4_GROUP), bias)
    return _weights[key]


def _weight_bytes(weight: torch.Tensor | ok.QuantizedWeight) -> int:
    return weight.nbytes() if isinstance(weight, ok.QuantizedWeight) else weight.numel() * weight.element_size()


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_frozen_linear_cpu(benchmark, shape, m, impl, direction):
    n, k = SHAPES[shape]
    weight, bias = _weight(shape, impl)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen)
    grad_y = torch.randn(m, n, generator=gen)
    linear = F.linear if impl == "F.linear" else ok.frozen_linear

    if direction == "fwd":

        def run():
            return linear(x, weight, bias)

    else:
        x.requires_grad_(True)

        def run():
            (dx,) = torch.autograd.grad(linear(x, weight, bias), x, grad_y)
            return dx

    out = run()  # one untimed call: allocator warm-up, and a shape check
    assert out.shape == ((m, n) if direction == "fwd" else (m, k))

    benchmark.group = f"{shape} M={m} {direction}"
    benchmark.extra_info.update(
        shape=shape,
        M=m,
        N=n,
        K=k,
        impl=impl,
        direction=direction,
        weight_bytes=_weight_bytes(weight),
        threads=torch.get_num_threads(),
    )
    benchmark(run)
    if benchmark.stats is None:  # --benchmark-disable: run once as a smoke test, nothing timed
        return
    median = benchmark.stats.stats.median
    flop = 2 * m * n * k * (1 if direction == "fwd" else 2)
    benchmark.extra_info["gflops_median"] = round(flop / median / 1e9, 3)


# --- markdown summary of a --benchmark-json file ------------------------------------------------
def summarize(json_path: str | Path) -> str:
    """A markdown summary: medians per case, and each frozen_linear time over dense ``F.linear``'s."""
    data = json.loads(Path(json_path).read_text())
    st = data["machine_info"].get("offsite_stamp", {})
    versions = st.get("versions", {})
    cases: dict[tuple, dict[str, float]] = {}
    spread: dict[tuple, float] = {}  # the widest IQR / median among a case's implementations
    for b in data["benchmarks"]:
        e, s = b["extra_info"], b["stats"]
        key = (e["shape"], e["N"], e["K"], e["M"], e["direction"])
        cases.setdefault(key, {})[e["impl"]] = s["median"]
        spread[key] = max(spread.get(key, 0.0), s["iqr"] / s["median"])
    lines = [
        "# Frozen linear on CPU (torch reference backend)",
        "",
        f"- measured: {st.get('date', data.get('datetime'))} on `{st.get('hostname')}`",
        f"- CPU: {st.get('cpu', data['machine_info'].get('cpu', {}).get('brand_raw'))}, "
        f"{st.get('cpu_count')} logical CPUs, torch threads {st.get('torch_threads')}; 1-minute load average "
        f"{data['machine_info'].get('offsite_loadavg_1m_at_start')} at the start, {st.get('loadavg_1m')} at the end",
        f"- torch {versions.get('torch')}, triton {versions.get('triton')}, offsite-kernels {versions.get('offsite_kernels')}, "
        f"commit {str(st.get('git', {}).get('commit'))[:12]}",
        "- fp32 activations and weights; int4 group 128; `OFFSITE_BACKEND=torch` (dequantize the whole weight, then `F.linear`)",
        "- times are pytest-benchmark medians; every ratio is two medians of this one run; ratio > 1: slower than dense `F.linear`",
        f"- spread: the largest IQR / median of the case's four implementations (> {NOISY:.1f}: a noisy case, read its ratios loosely)",
        "",
        "| shape (N x K) | M | direction | F.linear ms | ok-dense ms | ok-int8 ms | ok-int4 ms | dense / F.linear "
        "| int8 / F.linear | int4 / F.linear | spread |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, t in sorted(cases.items(), key=lambda kv: (kv[0][0], kv[0][4], kv[0][3])):
        shape, n, k, m, direction = key
        base = t.get("F.linear")
        ms = [f"{t[i] * 1e3:.3f}" if i in t else "-" for i in IMPLS]
        ratios = [f"{t[i] / base:.2f}x" if i in t and base else "-" for i in IMPLS[1:]]
        noisy = " (noisy)" if spread[key] > NOISY else ""
        lines.append(f"| {shape} ({n} x {k}) | {m} | {direction} | " + " | ".join(ms + ratios) + f" | {spread[key]:.2f}{noisy} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/frozen_linear_cpu.py RESULTS.json  (prints a markdown summary)")
    print(summarize(sys.argv[1]), end="")
