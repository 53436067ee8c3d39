"""Both ways the frozen-linear forward can read an int4 weight tile give the same products.

The forward reads the packed tile as [K, N], or as [N, K] transposed in registers where the
installed Triton lays the [K, N] read out badly (``INT4_FWD_READ_NK``, Triton <= 3.6; see
``frozen_linear_triton.py``). A CPU test run only takes the installed version's way: here the
interpreter runs the other one too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gen

import offsite_kernels as ok

tl = pytest.importorskip("triton.language")
k = pytest.importorskip("offsite_kernels.ops.frozen_linear_triton")

pytestmark = pytest.mark.skipif(not k.triton_interpreter_enabled(), reason="switches the read in the interpreter")


@pytest.mark.parametrize("read_nk", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 37])
def test_int4_forward_reads_alike(monkeypatch, read_nk, dtype, m):
    monkeypatch.setattr(k, "INT4_FWD_READ_NK", tl.constexpr(read_nk))
    n, kk = 53, 203  # no multiple of a block or of the group size
    qw = ok.quantize_weight(torch.randn(n, kk, generator=gen(m)), bits=4, group_size=32)
    x = torch.randn(m, kk, generator=gen(m + 1)).to(dtype)
    bias = torch.randn(n, generator=gen(m + 2)).to(dtype)
    y = torch.full((m, n), float("nan"), dtype=dtype)
    k.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, bias, qw.format, qw.group_size, n, out=y)
    ref = x.double() @ qw.dequantize().double().T + bias.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol
