"""Fused linear + cross-entropy of a frozen head: both backends against float64, HF's loss, and memory."""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import gen

from offsite_kernels.memtrack import MemoryTracker
from offsite_kernels.ops.fused_head import (
    DEFAULT_CHUNK_BYTES,
    FusedHeadInputError,
    cross_entropy_chunk_torch,
    default_chunk_size,
    fused_linear_cross_entropy,
    linear_cross_entropy_torch,
)

fh = importlib.import_module("offsite_kernels.ops.fused_head")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |loss - ref| / |ref| and max |grad - ref| / max |ref|; half precision rounds the logits, the
# logits' gradient and the weight in the gradient matmul
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
V, H, T = 1001, 67, 37  # odd: no multiple of a block, a chunk or two
IGNORE = -100


def make_head(dtype: torch.dtype, seed: int, vocab: int = V, hidden: int = H, with_bias: bool = False):
    w = (torch.randn(vocab, hidden, generator=gen(seed)) / hidden**0.25).to(dtype)
    b = torch.randn(vocab, generator=gen(seed + 1)).to(dtype) if with_bias else None
    return w, b


def make_labels(shape: tuple[int, ...], seed: int, vocab: int = V, ignore_index: int = IGNORE) -> torch.Tensor:
    labels = torch.randint(0, vocab, shape, generator=gen(seed))
    mask = torch.rand(shape, generator=gen(seed + 1)) < 0.2
    return labels.masked_fill(mask, ignore_index)


def make_hidden(case: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = gen(seed)
    if case == "2d":
        return torch.randn(T, H, generator=g).to(dtype)
    if case == "3d":
        return torch.randn(2, T, H, generator=g).to(dtype)
    if case == "strided3d":  # every other feature of a wider tensor: not contiguous
        return torch.randn(2, T, 2 * H, generator=g).to(dtype)[..., ::2]
    raise ValueError(case)


def reference(hidden, weight, labels, bias=None, ignore_index=IGNORE, shift_labels=True, reduction="mean", logit_scale=1.0):
    """Loss and d(loss)/d(hidden) of the unfused head in float64."""
    h64 = hidden.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.double()
    loss = linear_cross_entropy_torch(h64, weight.double(), labels, b64, ignore_index, shift_labels, reduction, logit_scale)
    loss.backward()
    return loss.detach(), h64.grad


def rel_error(actual, ref) -> float:
    assert not torch.isnan(actual).any(), "NaN in output"
    return float((actual.detach().double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case, with_bias, shift",
    [("2d", True, True), ("3d", False, True), ("3d", True, False), ("strided3d", False, True)],
)
@pytest.mark.parametrize("chunk_size", [10, None])  # 10: several chunks, the last one partial; None: one chunk
def test_loss_and_input_gradient_match_float64(backend, dtype, case, with_bias, shift, chunk_size):
    seed = zlib.crc32(f"{dtype}-{case}-{with_bias}-{shift}".encode()) % 10_000
    w, b = make_head(dtype, seed, with_bias=with_bias)
    hidden = make_hidden(case, dtype, seed + 2).requires_grad_(True)
    labels = make_labels(tuple(hidden.shape[:-1]), seed + 3)
    loss = fused_linear_cross_entropy(hidden, w, labels, b, shift_labels=shift, chunk_size=chunk_size)
    assert loss.dtype == torch.float32 and loss.shape == ()
    ref_loss, ref_grad = reference(hidden, w, labels, b, shift_labels=shift)
    assert abs(float(loss.detach()) - float(ref_loss)) / abs(float(ref_loss)) < LOSS_TOL[dtype]
    loss.backward()
    assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == dtype
    assert rel_error(hidden.grad, ref_grad) < GRAD_TOL[dtype]
    assert w.grad is None and not w.requires_grad


@pytest.mark.parametrize("ignore_index", [IGNORE, 7])
def test_sum_reduction_and_another_ignore_index(backend, ignore_index):
    w, b = make_head(torch.float32, 11, with_bias=True)
    hidden = torch.randn(3, T, H, generator=gen(12), requires_grad=True)
    labels = make_labels((3, T), 13, ignore_index=ignore_index)
    labels[0, 4] = 7
    loss = fused_linear_cross_entropy(hidden, w, labels, b, ignore_index=ignore_index, reduction="sum", chunk_size=16)
    ref_loss, ref_grad = reference(hidden, w, labels, b, ignore_index=ignore_index, reduction="sum")
    assert abs(float(loss.detach()) - float(ref_loss)) / abs(float(ref_loss)) < 1e-5
    loss.backward()
    assert rel_error(hidden.grad, ref_grad) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_hugging_face_causal_lm_loss(backend, dtype):
    """Same logits rounding, same fp32 upcast, same shift and mean: on the CPU the half-precision
    results are bit-identical to HF's; fp32 differs only by the matmul's blocking."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    w, b = make_head(dtype, 21, with_bias=True)
    hidden = torch.randn(2, T, H, generator=gen(22)).to(dtype)
    labels = make_labels((2, T), 23)
    h_hf = hidden.clone().requires_grad_(True)
    hf_loss = ForCausalLMLoss(F.linear(h_hf, w, b), labels, V)
    hf_loss.backward()
    h_ours = hidden.clone().requires_grad_(True)
    loss = fused_linear_cross_entropy(h_ours, w, labels, b, chunk_size=9)
    loss.backward()
    assert abs(float(loss.detach()) - float(hf_loss.detach())) <= 1e-6 * abs(float(hf_loss.detach()))
    assert rel_error(h_ours.grad, h_hf.grad.double()) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logit_scale", [0.8333333333333334, 1 / 3])  # Command R+'s scale; Granite's 1 / logits_scaling
def test_logit_scale_matches_float64_and_rounds_as_the_models_head(backend, dtype, logit_scale):
    """A head that scales its logits (Cohere, Granite): against the float64 math, and against the model's own
    rounding (``logits * scale`` in the logits' dtype, then fp32): in half precision the same up to the order of the
    fp32 sums (scaling the input instead is 1e-2 off in the bf16 gradient)."""
    w, b = make_head(dtype, 41, with_bias=True)
    hidden = torch.randn(2, T, H, generator=gen(42)).to(dtype)
    labels = make_labels((2, T), 43)
    h_ours = hidden.clone().requires_grad_(True)
    loss = fused_linear_cross_entropy(h_ours, w, labels, b, chunk_size=9, logit_scale=logit_scale)
    loss.backward()
    ref_loss, ref_grad = reference(hidden, w, labels, b, logit_scale=logit_scale)
    assert abs(float(loss.detach()) - float(ref_loss)) / abs(float(ref_loss)) < LOSS_TOL[dtype]
    assert rel_error(h_ours.grad, ref_grad) < GRAD_TOL[dtype]
    h_model = hidden.clone().requires_grad_(True)
    model_loss = linear_cross_entropy_torch(h_model, w, labels, b, logit_scale=logit_scale)
    model_loss.backward()
    unscaled = fused_linear_cross_entropy(hidden, w, labels, b)
    assert abs(float(unscaled) - float(model_loss.detach())) > 1e-4  # the scale changes the loss
    if dtype != torch.float32:
        assert abs(float(loss.detach()) - float(model_loss.detach())) <= 1e-6 * abs(float(model_loss.detach()))
        assert rel_error(h_ours.grad, h_model.grad.double()) <= 1e-6
    with pytest.raises(fh.FusedHeadInputError, match="logit_scale must be a finite nonzero number"):
        fused_linear_cross_entropy(hidden, w, labels, b, logit_scale=float("inf"))


def test_no_valid_token_behaves_like_hugging_face(backend):
    w, _ = make_head(torch.float32, 31)
    hidden = torch.randn(2, 5, H, generator=gen(32), requires_grad=True)
    labels = torch.full((2, 5), IGNORE)
    labels[:, 0] = 3  # the first position's label is never a target after the shift
    loss = fused_linear_cross_entropy(hidden, w, labels, chunk_size=4)
    hf = F.cross_entropy(torch.randn(10, V, requires_grad=True), torch.full((10,), IGNORE))
    assert torch.isnan(loss) and torch.isnan(hf)
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert float(fused_linear_cross_entropy(hidden.detach(), w, labels, reduction="sum")) == 0.0


def test_out_of_range_label_gives_nan_not_a_wild_read(backend):
    w, _ = make_head(torch.float32, 41)
    hidden = torch.randn(6, H, generator=gen(42))
    labels = torch.tensor([1, 2, V, 3, IGNORE, 0])  # position 1 targets V: out of range
    assert torch.isnan(fused_linear_cross_entropy(hidden, w, labels))
    labels[2] = -5
    assert torch.isnan(fused_linear_cross_entropy(hidden, w, labels))


def test_empty_token_dimension(backend):
    w, _ = make_head(torch.float32, 51)
    hidden = torch.randn(2, 0, H, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long)
    assert torch.isnan(fused_linear_cross_entropy(hidden, w, labels))
    loss = fused_linear_cross_entropy(hidden, w, labels, reduction="sum")
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [200, 1001, 5003])  # one block of 256, one of 1024, two of 4096
def test_chunk_computations_write_every_element(dtype, vocab):
    """The Triton kernel and the torch reference, on one chunk, against float64."""
    pytest.importorskip("triton")
    from offsite_kernels.ops.cross_entropy_triton import cross_entropy_fwd_bwd

    rows = 7
    logits = (torch.randn(rows, vocab, generator=gen(vocab)) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen(vocab + 1))
    labels[2] = IGNORE
    scale = torch.tensor(1.0 / 5.0)
    lf = logits.double()
    lse = torch.logsumexp(lf, -1)
    valid = labels != IGNORE
    safe = labels.clamp(min=0)
    ref_loss = torch.where(valid, lse - lf.gather(1, safe[:, None]).squeeze(1), 0.0)
    ref_grad = (torch.softmax(lf, -1) - F.one_hot(safe, vocab).double()) * 0.2 * valid[:, None]
    grad_tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]

    loss = torch.full((rows,), float("nan"))
    buf = logits.clone()
    cross_entropy_fwd_bwd(buf, labels, loss, scale, IGNORE, compute_grad=True)
    assert rel_error(loss, ref_loss) < 1e-6  # every row written: NaN never passes
    assert rel_error(buf, ref_grad) < grad_tol and torch.equal(buf[2], torch.zeros_like(buf[2]))

    loss_only = torch.full((rows,), float("nan"))
    untouched = logits.clone()
    cross_entropy_fwd_bwd(untouched, labels, loss_only, scale, IGNORE, compute_grad=False)
    assert torch.equal(untouched, logits) and torch.equal(loss_only, loss)

    t_loss, t_grad = cross_entropy_chunk_torch(logits, labels, scale, IGNORE, compute_grad=True)
    assert rel_error(t_loss, ref_loss) < 1e-6 and t_grad.dtype == dtype
    assert rel_error(t_grad, ref_grad) < grad_tol


def test_forced_triton_backend_runs_the_kernel(monkeypatch):
    pytest.importorskip("triton")
    from offsite_kernels.ops import cross_entropy_triton as kernels

    calls = []
    real = kernels.cross_entropy_fwd_bwd
    monkeypatch.setattr(kernels, "cross_entropy_fwd_bwd", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    w, _ = make_head(torch.float32, 61)
    hidden = torch.randn(T, H, generator=gen(62), requires_grad=True)
    labels = make_labels((T,), 63)
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    fused_linear_cross_entropy(hidden, w, labels, chunk_size=16).backward()
    assert calls == [True, True, True]  # three chunks, gradient on
    calls.clear()
    monkeypatch.setenv("OFFSITE_BACKEND", "torch")
    fused_linear_cross_entropy(hidden, w, labels, chunk_size=16).backward()
    assert calls == []


def test_gradient_work_is_skipped_without_grad(backend, monkeypatch):
    seen = []
    real_chunked = fh._chunked
    monkeypatch.setattr(fh, "_chunked", lambda *a: seen.append(a[7]) or real_chunked(*a))  # compute_grad
    w, b = make_head(torch.float32, 71, with_bias=True)
    hidden = torch.randn(2, T, H, generator=gen(72))
    labels = make_labels((2, T), 73)
    plain = fused_linear_cross_entropy(hidden, w, labels, b)
    with torch.no_grad():
        no_grad = fused_linear_cross_entropy(hidden.clone().requires_grad_(True), w, labels, b)
    with_grad = fused_linear_cross_entropy(hidden.clone().requires_grad_(True), w, labels, b)
    assert seen == [False, False, True]
    assert not plain.requires_grad and not no_grad.requires_grad and with_grad.requires_grad
    assert float(plain) == float(no_grad) == pytest.approx(float(with_grad.detach()), rel=1e-6)


def test_incoming_gradient_scales_the_input_gradient(backend):
    w, _ = make_head(torch.float32, 81)
    hidden = torch.randn(T, H, generator=gen(82), requires_grad=True)
    labels = make_labels((T,), 83)
    (fused_linear_cross_entropy(hidden, w, labels) * -2.5).backward()
    _, ref_grad = reference(hidden, w, labels)
    assert rel_error(hidden.grad, -2.5 * ref_grad) < 1e-5


def test_autograd_saves_nothing_logits_sized_and_no_weight_grad(backend):
    w, b = make_head(torch.float32, 91, with_bias=True)
    hidden = torch.randn(2, T, H, generator=gen(92), requires_grad=True)
    labels = make_labels((2, T), 93)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fused_linear_cross_entropy(hidden, w, labels, b, chunk_size=8)
    assert saved, "the input gradient is saved for the backward"
    for t in saved:
        assert t.numel() <= hidden.numel(), f"saved a tensor of shape {tuple(t.shape)} (logits: {2 * T} x {V})"
    loss.backward()
    assert hidden.grad is not None and w.grad is None and b.grad is None


def test_frozen_weight_and_bad_inputs_name_the_problem():
    w, b = make_head(torch.float32, 101, with_bias=True)
    hidden = torch.randn(T, H)
    labels = make_labels((T,), 102)
    with pytest.raises(FusedHeadInputError, match="requires grad"):
        fused_linear_cross_entropy(hidden, w.clone().requires_grad_(True), labels)
    with pytest.raises(FusedHeadInputError, match="bias requires grad"):
        fused_linear_cross_entropy(hidden, w, labels, b.clone().requires_grad_(True))
    with pytest.raises(FusedHeadInputError, match="expects 67"):
        fused_linear_cross_entropy(torch.randn(T, H + 1), w, labels)
    with pytest.raises(FusedHeadInputError, match="cast the head once"):
        fused_linear_cross_entropy(hidden.bfloat16(), w, labels)
    with pytest.raises(FusedHeadInputError, match="float32, float16 or bfloat16"):
        fused_linear_cross_entropy(hidden.double(), w.double(), labels)
    with pytest.raises(FusedHeadInputError, match="without its last dimension"):
        fused_linear_cross_entropy(hidden, w, labels[:-1])
    with pytest.raises(FusedHeadInputError, match="integer tensor"):
        fused_linear_cross_entropy(hidden, w, labels.float())
    with pytest.raises(FusedHeadInputError, match="bias must have shape"):
        fused_linear_cross_entropy(hidden, w, labels, b[:-1])
    with pytest.raises(FusedHeadInputError, match="'mean' or 'sum'"):
        fused_linear_cross_entropy(hidden, w, labels, reduction="none")
    with pytest.raises(FusedHeadInputError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, w, labels, chunk_size=0)
    with pytest.raises(FusedHeadInputError, match="2-D"):
        fused_linear_cross_entropy(hidden, w[0], labels)
    with pytest.raises(FusedHeadInputError, match="is on meta"):
        fused_linear_cross_entropy(hidden.to("meta"), w, labels)
    with pytest.raises(FusedHeadInputError, match=r"with shift_labels=True hidden must be \[\.\.\., T, H\]"):
        fused_linear_cross_entropy(hidden[0], w, labels[0])
    # without the shift a single token is a legal input
    single = fused_linear_cross_entropy(hidden[0], w, labels[0], shift_labels=False)
    assert torch.isclose(single, F.cross_entropy(F.linear(hidden[0].double(), w.double())[None], labels[:1]).float())
    # int32 labels are accepted (converted)
    assert torch.isclose(fused_linear_cross_entropy(hidden, w, labels.int()), fused_linear_cross_entropy(hidden, w, labels))


def test_default_chunk_fits_the_budget_whatever_the_token_count():
    for vocab, dtype in [(50_257, torch.bfloat16), (128_256, torch.float32), (1001, torch.float16), (10**9, torch.float32)]:
        rows = default_chunk_size(vocab, dtype)
        assert rows >= 1 and (rows == 1 or rows * vocab * torch.finfo(dtype).bits // 8 <= DEFAULT_CHUNK_BYTES)
        assert rows < 16 or rows % 16 == 0
    assert default_chunk_size(50_257, torch.bfloat16) == 656


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(backend, with_bias):
    w, b = make_head(torch.float32, 111, vocab=101, hidden=24, with_bias=with_bias)
    hidden = torch.randn(2, 9, 24, generator=gen(112), requires_grad=True)
    labels = make_labels((2, 9), 113, vocab=101)
    for compute_grad, shift, reduction, scale in [
        (True, True, "mean", 1.0),
        (False, False, "sum", 0.75),
        (True, True, "sum", 0.3),
    ]:
        h = hidden if compute_grad else hidden.detach()
        args = (h, w, labels, b, IGNORE, shift, reduction, 4, compute_grad, scale)
        torch.library.opcheck(fh._fused_linear_cross_entropy_op, args)


def test_torch_compile_traces_without_graph_breaks(backend):
    w, b = make_head(torch.float32, 121, with_bias=True)
    labels = make_labels((2, T), 122)
    fn = lambda t: 3 * fused_linear_cross_entropy(torch.tanh(t), w, labels, b, chunk_size=16)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, T, H, generator=gen(123), requires_grad=True)
    compiled(x).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    fn(x_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def _peak(fn, hidden, labels) -> int:
    with MemoryTracker() as mt:
        fn(hidden, labels).backward()
    return mt.peak_bytes


def test_memory_stays_flat_while_the_logits_grow_8x(backend):
    """Peak extra memory of forward + backward at fixed chunk size: the fused head grows only by
    token-sized tensors (its input gradient, labels, per-token losses) when tokens x vocab grows 8x;
    the unfused head grows with the logits."""
    vocab, hidden_size, chunk = 1001, 16, 16
    w, _ = make_head(torch.float32, 131, vocab=vocab, hidden=hidden_size)
    fused = lambda h, y: fused_linear_cross_entropy(h, w, y, chunk_size=chunk)  # noqa: E731
    unfused = lambda h, y: linear_cross_entropy_torch(h, w, y)  # noqa: E731
    peaks = {}
    for tokens in (64, 512):
        h = torch.randn(tokens, hidden_size, generator=gen(tokens), requires_grad=True)
        y = make_labels((tokens,), tokens + 1, vocab=vocab)
        peaks["fused", tokens] = _peak(fused, h, y)
        peaks["unfused", tokens] = _peak(unfused, h.detach().clone().requires_grad_(True), y)
    logits_bytes = 512 * vocab * 4
    per_token = 3 * hidden_size * 4 + 16  # input-gradient sized tensors, int64 labels, fp32 losses, a mask
    assert peaks["unfused", 512] >= 7 * peaks["unfused", 64] and peaks["unfused", 512] >= 2 * logits_bytes
    assert peaks["fused", 512] - peaks["fused", 64] <= (512 - 64) * per_token, peaks
    assert peaks["fused", 512] <= 6 * chunk * vocab * 4 + 512 * per_token, peaks  # a few chunk-sized buffers
    assert peaks["fused", 512] * 10 < peaks["unfused", 512], peaks


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernel_compiles_ahead_of_time(arch):
    pytest.importorskip("triton")
    from offsite_kernels.ops import aot
    from offsite_kernels.ops.cross_entropy_triton import BLOCK_CONFIGS, aot_cases, block_config

    available, why = aot.availability()
    if not available:
        pytest.skip(f"AOT compile check unavailable: {why}")
    cases = aot_cases()
    assert {(c.constexprs["BLOCK_V"], c.num_warps) for c in cases} == set(BLOCK_CONFIGS)
    assert {block_config(v) for v in (1, 200, 1001, 4096, 50_257, 262_144)} <= set(BLOCK_CONFIGS)
    aot.prefetch(cases=[(case, arch) for case in cases])  # compiled one per CPU, then read from the cache
    for case in cases:
        row = aot.compile_case(case, arch)
        assert row["ok"], f"{case.label} on sm_{arch}: {aot.case_problems(row)}"
