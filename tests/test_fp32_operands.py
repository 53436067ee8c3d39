"""fp32 activations on a GPU: which GEMM the frozen linear runs (TF32 or exact fp32) and on which tiles.

PyTorch decides whether fp32 matmuls may use TF32 tensor cores; the Triton kernels follow it. Each of
the two fp32 GEMMs has its own tile lists (``_FP32_TILES``: the bf16/fp16 lists spill or overflow
shared memory on fp32 operands), which the AOT checks (tests/test_aot_compile.py) compile for every
GPU class. These tests check the choice, not the kernels' arithmetic (tests/test_frozen_linear.py and
tests/test_triton_autotune_launch.py run them on fp32).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
from offsite_kernels.ops import frozen_linear_triton as flt


def _tf32_after(setup: str) -> list[bool]:
    """``tf32_enabled()`` in a fresh interpreter after each line of ``setup`` (PyTorch's flags are global)."""
    script = "import torch\nfrom offsite_kernels.ops.frozen_linear_triton import tf32_enabled\nseen = [tf32_enabled()]\n"
    script += "".join(f"{line}\nseen.append(tf32_enabled())\n" for line in textwrap.dedent(setup).strip().splitlines())
    script += "print(seen)\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])  # a printed list of booleans


def test_tf32_follows_pytorchs_new_precision_api():
    # once the new API is used, reading the legacy allow_tf32 raises in torch 2.13: the launch must not
    assert _tf32_after(
        """
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        """
    ) == [False, True, False]
    # the global setting reaches matmuls left at "none", and a matmul setting overrides it
    assert _tf32_after(
        """
        torch.backends.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        """
    ) == [False, True, False]


def test_tf32_follows_pytorchs_legacy_flags():
    seen = _tf32_after(
        """
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("highest")
        torch.set_float32_matmul_precision("high")
        """
    )
    assert seen == [False, True, False, True]


def test_operands_of_each_activation_dtype(monkeypatch):
    for tf32 in (False, True):
        monkeypatch.setattr(flt, "tf32_enabled", lambda tf32=tf32: tf32)
        assert flt.gemm_operands(torch.bfloat16) == flt.gemm_operands(torch.float16) == flt.HALF
        assert flt.gemm_operands(torch.float32) == (flt.TF32 if tf32 else flt.FP32)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_the_pruner_takes_the_tiles_of_the_launchs_operands(direction):
    """The autotuner's pruner reads the operands from the activation tensor's dtype and DOT_PRECISION: fp32
    launches tune only fp32 tiles (exact or TF32), bf16/fp16 ones only the 16-bit lists."""
    act = "x_ptr" if direction == "fwd" else "dy_ptr"
    for arch in (80, flt.SMALL_SHARED, flt.HOPPER):
        prune = flt._pruner(direction, arch)
        for fmt, code in flt.FMT_CODES.items():
            for dtype, precision, operands in [
                (torch.bfloat16, "ieee", flt.HALF),
                (torch.float16, "ieee", flt.HALF),
                (torch.float32, "tf32", flt.TF32),
                (torch.float32, "ieee", flt.FP32),
            ]:
                allowed = {flt._key(c) for c in flt.candidate_configs(direction, fmt, arch, operands)}
                for m in (1, 16, 17, 200, 5000):
                    for split in (False, True) if m <= flt.SPLIT_MAX_M else (False,):
                        named = {act: torch.empty(0, dtype=dtype), "M_BUCKET": flt.m_bucket(m)}
                        kept = prune(flt.gpu_configs(), named, FMT=code, SPLIT_K=split, DOT_PRECISION=precision)
                        keys = {flt._key(c) for c in kept}
                        assert keys and keys <= allowed, (arch, fmt, dtype, precision, m, split)
                        assert keys == {
                            flt._key(c)
                            for c in flt.pruned_configs(flt.gpu_configs(), direction, arch, fmt, flt.m_bucket(m), split, operands)
                        }


def test_fp32_tiles_are_their_own_and_cover_every_size():
    """Each fp32 list is disjoint from the 16-bit lists of every class (its tiles are checked for fp32 only),
    and the tile heights reach from few tokens to many."""
    half = {t for lists in (flt._CANDIDATES, flt._HOPPER_TILES, flt._SMALL_SHARED_TILES) for ts in lists.values() for t in ts}
    for (direction, operands), tiles in flt._FP32_TILES.items():
        assert operands in (flt.TF32, flt.FP32) and direction in ("fwd", "bwd")
        assert not set(tiles) & half
        assert max(t[0] for t in tiles) >= 64 and min(t[0] for t in tiles) <= 32
    assert {flt._key(c) for c in flt.gpu_configs()} >= {t for ts in flt._FP32_TILES.values() for t in ts}
