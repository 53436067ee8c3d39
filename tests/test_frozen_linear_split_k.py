"""Split-K of the Triton frozen linear (few tokens): the split kernels and the kernel adding their partials
against float64, in Triton's interpreter; the choice of the split; its refusal of a bad setting."""

import importlib

import pytest
import torch
from conftest import gen

import offsite_kernels as ok

pytest.importorskip("triton")
flt = importlib.import_module("offsite_kernels.ops.frozen_linear_triton")

FORMATS = [None, 8, 4, "fp8"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max |error| / max |reference|
M, N, K = 3, 301, 397  # K and N past two splits of 128; none a multiple of a block or a group


def rel_error(actual, reference):
    assert not torch.isnan(actual).any(), "NaN in output: an element was never written"
    return float((actual.double() - reference).abs().max() / reference.abs().max())


def _run(qw, x, dy, bias, out_dtype):
    """Forward and input gradient through the launchers, into NaN-poisoned outputs."""
    y = torch.full((*x.shape[:-1], N), float("nan"), dtype=out_dtype)
    flt.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, bias, qw.format, qw.group_size, N, out=y)
    dx = torch.full((*dy.shape[:-1], K), float("nan"), dtype=out_dtype)
    flt.frozen_linear_bwd(dy, qw.data, qw.scales, qw.zeros, qw.format, qw.group_size, K, out=dx)
    return y, dx


@pytest.mark.parametrize("bits", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits, lead, with_bias", [("2", (M,), True), ("3", (1,), False), ("5", (2, 2), True)])
def test_split_kernels_match_float64(monkeypatch, bits, dtype, splits, lead, with_bias):
    monkeypatch.setenv(flt.SPLIT_ENV, splits)
    seed = 100 * len(lead) + int(splits)
    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(seed)), bits=bits, group_size=32)
    w64 = qw.dequantize().double()
    x = torch.randn(*lead, K, generator=gen(seed + 1)).to(dtype)
    dy = torch.randn(*lead, N, generator=gen(seed + 2)).to(dtype)
    bias = torch.randn(N, generator=gen(seed + 3)).to(dtype) if with_bias else None
    assert (
        flt.split_length(x[..., 0].numel(), N, K, x.device, "fwd", qw.format, flt.gemm_operands(x.dtype)) < K
    )  # the forward really splits
    assert (
        flt.split_length(x[..., 0].numel(), K, N, x.device, "bwd", qw.format, flt.gemm_operands(x.dtype)) < N
    )  # and so does the backward
    y, dx = _run(qw, x, dy, bias, dtype)
    expected = x.double() @ w64.T + (bias.double() if with_bias else 0)
    assert rel_error(y, expected) < TOLERANCE[dtype]
    assert rel_error(dx, dy.double() @ w64) < TOLERANCE[dtype]


def test_split_results_are_close_to_the_unsplit_kernel(monkeypatch):
    # (run-to-run determinism needs a GPU to mean anything: tests/test_gpu_kernels.py checks it there)
    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(7)), bits=4, group_size=64)
    x = torch.randn(2, K, generator=gen(8))
    dy = torch.randn(2, N, generator=gen(9))
    bias = torch.randn(N, generator=gen(10))
    monkeypatch.setenv(flt.SPLIT_ENV, "3")
    split = _run(qw, x, dy, bias, x.dtype)
    monkeypatch.setenv(flt.SPLIT_ENV, "off")
    unsplit = _run(qw, x, dy, bias, x.dtype)
    for a, b in zip(split, unsplit, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_the_autograd_op_takes_the_split_path(monkeypatch):
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    monkeypatch.setenv(flt.SPLIT_ENV, "2")
    reduced = []
    real_reduce = flt._reduce_splits
    monkeypatch.setattr(flt, "_reduce_splits", lambda ws, bias, y: reduced.append(ws.shape[0]) or real_reduce(ws, bias, y))
    qw = ok.quantize_weight(torch.randn(N, K, generator=gen(11)), bits=8)
    x = torch.randn(2, K, generator=gen(12), requires_grad=True)
    y = ok.frozen_linear(x, qw)
    gy = torch.randn(y.shape, generator=gen(13))
    y.backward(gy)
    assert reduced == [2, 2]  # the forward's K and the backward's N, each in two pieces
    w64 = qw.dequantize().double()
    assert rel_error(y.detach(), x.detach().double() @ w64.T) < TOLERANCE[torch.float32]
    assert rel_error(x.grad, gy.double() @ w64) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("n, k", [(9, 0), (0, 9)])
def test_an_empty_dimension_still_writes_every_output(monkeypatch, n, k):
    # no reduction (K = 0 forward, N = 0 backward): the outputs are the bias, or zeros, not left unwritten
    monkeypatch.setenv(flt.SPLIT_ENV, "2")
    w = torch.randn(n, k, generator=gen(14))
    bias = torch.randn(n, generator=gen(15))
    y = torch.full((3, n), float("nan"))
    flt.frozen_linear_fwd(torch.randn(3, k), w, None, None, bias, "dense", 0, n, out=y)
    assert torch.equal(y, bias.expand(3, n))  # K = 0: the bias; N = 0: nothing to write
    dx = torch.full((3, k), float("nan"))
    flt.frozen_linear_bwd(torch.randn(3, n), w, None, None, "dense", 0, k, out=dx)
    assert torch.equal(dx, torch.zeros(3, k))  # N = 0: zeros; K = 0: nothing to write


# --- the choice of the split -------------------------------------------------------------------
CUDA = torch.device("cuda", 0)


@pytest.fixture
def sms(monkeypatch):
    """A stand-in CUDA device of 132 SMs, Hopper-class (an H200), for split_length's automatic choice."""
    monkeypatch.delenv(flt.SPLIT_ENV, raising=False)
    monkeypatch.setattr(flt, "_sm_count", lambda index: 132)
    monkeypatch.setattr(flt, "gpu_arch", lambda index: flt.HOPPER)
    return 132


def test_automatic_splits_fill_the_gpu_for_few_tokens(sms):
    # forward, int8: 16 x 128 output tiles at most. 1 token, 2048 x 2048 (OPT-1.3B's attention projections):
    # 16 column tiles, so 2 * 132 / 16 -> 17 splits wanted, at most 16, each at least MIN_SPLIT_LEN (512): 4 of 512
    assert flt.split_length(1, 2048, 2048, CUDA, "fwd", "int8", flt.HALF) == 512
    # GPT2-XL's c_proj (1600 x 1600): 13 tiles -> 16 splits wanted, 512 each -> 4 splits (the last one shorter)
    length = flt.split_length(16, 1600, 1600, CUDA, "fwd", "int8", flt.HALF)
    assert length == 512 and -(-1600 // length) == 4
    # Llama-2-7B's up projection (11008 columns): 86 tiles of 128 columns -> 4 splits; int4's forward tiles
    # are at most 64 columns wide (172 tiles) -> 2 splits
    assert flt.split_length(1, 11008, 4096, CUDA, "fwd", "int8", flt.HALF) == 1024
    assert flt.split_length(1, 11008, 4096, CUDA, "fwd", "int4", flt.HALF) == 2048
    # its down projection's input gradient (11008 output columns, N = 4096 reduced): 32 x 128 tiles -> 4 splits
    assert flt.split_length(1, 11008, 4096, CUDA, "bwd", "int8", flt.HALF) == 1024
    # enough tiles already (a 32000-token vocabulary in 64-column tiles: 500): no split
    assert flt.split_length(1, 32000, 4096, CUDA, "fwd", "int4", flt.HALF) == 4096


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("fmt", ["dense", "int8", "int4", "fp8"])
@pytest.mark.parametrize("operands", flt.OPERANDS)
def test_automatic_splits_give_every_tile_the_autotuner_may_pick_two_programs_per_sm(sms, direction, fmt, operands):
    """Whichever tile the autotuner keeps for a split launch, the grid has at least two programs per SM,
    unless the split is already as fine as allowed (MAX_SPLITS, or MIN_SPLIT_LEN long); for bf16/fp16 and
    both kinds of fp32 activations, whose tiles differ."""
    configs = flt.pruned_configs(flt.gpu_configs(), direction, flt.HOPPER, fmt, 16, split=True, operands=operands)
    cols = "BLOCK_N" if direction == "fwd" else "BLOCK_K"
    assert flt.split_tile(direction, fmt, flt.HOPPER, operands) == (
        max(c.kwargs["BLOCK_M"] for c in configs),
        max(c.kwargs[cols] for c in configs),
    )
    shapes = [(m, c, r) for m in (1, 16) for c in range(64, 12000, 331) for r in range(128, 20000, 487)]
    shapes += [(1, 2048, 2048), (16, 1600, 1600), (1, 11008, 4096), (5, 4096, 11008), (1, 2304, 8192)]
    for m, out_cols, reduce_len in shapes:
        length = flt.split_length(m, out_cols, reduce_len, CUDA, direction, fmt, operands)
        splits = -(-reduce_len // length)
        assert length % flt.SPLIT_ALIGN == 0 and 1 <= splits <= flt.MAX_SPLITS
        finest = length == min(flt.finest_split_length(reduce_len), -(-reduce_len // flt.SPLIT_ALIGN) * flt.SPLIT_ALIGN)
        for c in configs:
            programs = -(-m // c.kwargs["BLOCK_M"]) * -(-out_cols // c.kwargs[cols]) * splits
            assert programs >= 2 * sms or finest, (m, out_cols, reduce_len, flt._key(c), splits)


def test_split_lengths_respect_their_bounds(sms):
    # never more than MAX_SPLITS, never shorter than MIN_SPLIT_LEN, always a multiple of SPLIT_ALIGN
    for m, cols, red in [(1, 64, 1 << 16), (4, 300, 5000), (16, 1000, 777)]:
        length = flt.split_length(m, cols, red, CUDA, "fwd", "int4", flt.HALF)
        assert length % flt.SPLIT_ALIGN == 0 and -(-red // length) <= flt.MAX_SPLITS
        assert length >= min(flt.MIN_SPLIT_LEN, -(-red // flt.SPLIT_ALIGN) * flt.SPLIT_ALIGN)


def test_an_empty_output_takes_one_split(sms):
    for direction in ("fwd", "bwd"):  # N = 0 forward, K = 0 backward: no output tile, nothing to split
        assert flt.split_length(1, 0, 4096, CUDA, direction, "int4", flt.HALF) == 4096


def test_no_automatic_split_past_sixteen_tokens_or_off_the_gpu(sms):
    assert flt.split_length(17, 2048, 2048, CUDA, "fwd", "int8", flt.HALF) == 2048
    assert flt.split_length(1, 2048, 2048, torch.device("cpu"), "fwd", "int8", flt.HALF) == 2048
    assert flt.split_length(1, 2048, 200, CUDA, "fwd", "int8", flt.HALF) == 256  # one split: the whole (aligned) reduction


def test_the_setting_forces_or_turns_off_the_split(monkeypatch, sms):
    monkeypatch.setenv(flt.SPLIT_ENV, "off")
    assert flt.split_length(1, 2048, 2048, CUDA, "fwd", "int8", flt.HALF) == 2048
    monkeypatch.setenv(flt.SPLIT_ENV, "3")  # on any device, 128-aligned, but never past 16 tokens
    assert flt.split_length(16, 2048, 2048, torch.device("cpu"), "bwd", "int4", flt.HALF) == 768
    assert flt.split_length(17, 2048, 2048, torch.device("cpu"), "bwd", "int4", flt.HALF) == 2048
    monkeypatch.setenv(flt.SPLIT_ENV, "1")
    assert flt.split_length(1, 2048, 2048, CUDA, "fwd", "int8", flt.HALF) == 2048


@pytest.mark.parametrize("value", ["two", "-1", "0", "1.5"])
def test_a_bad_setting_names_the_variable_and_the_choices(monkeypatch, value):
    monkeypatch.setenv(flt.SPLIT_ENV, value)
    with pytest.raises(ValueError, match=rf"{flt.SPLIT_ENV}=.*auto, off, or a whole number"):
        flt.split_length(1, 64, 64, CUDA, "fwd", "int8", flt.HALF)


def test_split_lengths_are_whole_blocks_of_every_candidate_tile():
    # the reduction tile: BLOCK_K in the forward, BLOCK_N in the backward, on every architecture's list
    for arch in (80, flt.SMALL_SHARED, flt.HOPPER):
        for fmt in flt.FMT_CODES:
            for ops in flt.OPERANDS:
                assert all(flt.SPLIT_ALIGN % c.kwargs["BLOCK_K"] == 0 for c in flt.candidate_configs("fwd", fmt, arch, ops))
                assert all(flt.SPLIT_ALIGN % c.kwargs["BLOCK_N"] == 0 for c in flt.candidate_configs("bwd", fmt, arch, ops))
    assert flt.SPLIT_ALIGN % flt.INTERPRETER_CONFIG["BLOCK_K"] == 0
    assert flt.SPLIT_ALIGN % flt.INTERPRETER_CONFIG["BLOCK_N"] == 0


@pytest.mark.parametrize("direction, fmt", [("fwd", "int4"), ("bwd", "int8"), ("fwd", "int8"), ("bwd", "int4")])
def test_split_launches_never_tune_the_excluded_tiles(direction, fmt):
    for m in (1, 16):
        split = flt.pruned_configs(flt.gpu_configs(), direction, 80, fmt, m, split=True)
        unsplit = flt.pruned_configs(flt.gpu_configs(), direction, 80, fmt, m, split=False)
        kind = (direction, "int4" if fmt == "int4" else "any")
        excluded = flt._SPLIT_EXCLUDED.get(kind, set())
        kept = {flt._key(c) for c in split}
        assert kept and not kept & excluded and kept <= set(flt._CANDIDATES[kind])
        assert {flt._key(c) for c in unsplit} & excluded or kept == {flt._key(c) for c in unsplit}
