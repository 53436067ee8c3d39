"""Fake-tensor accounting of OPT whatever the transformers version does with LayerDrop at 0.

transformers 5.17's OPT decoder draws ``torch.rand([])`` per layer in training mode and branches on
it even with ``layerdrop == 0`` (5.24 skips the draw at 0). A fake tensor cannot be
branched on, so every accounted OPT row of ``offsite bench`` failed there with
``DataDependentOutputException``. Here the draw is put back into the installed decoder, as 5.17 has it.
"""

from __future__ import annotations

import pytest
import torch

from offsite_kernels.benchmark import BenchMethod, get_bench_model
from offsite_kernels.benchmark.account import account_memory, count_model_flops

opt = pytest.importorskip("transformers.models.opt.modeling_opt")


@pytest.fixture
def draws_at_zero(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The OPT decoder with transformers 5.17's per-layer draw; records whether a draw was made."""
    drawn: list[bool] = []
    forward = opt.OPTDecoder.forward

    def drawing_forward(self, *args, **kwargs):
        if self.training:
            for _ in self.layers:
                drawn.append(True)
                if torch.rand([]) < self.layerdrop:
                    raise AssertionError("layerdrop is 0: no layer may be dropped")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(opt.OPTDecoder, "forward", drawing_forward)
    return drawn


@pytest.mark.parametrize("method", ["ft", "ot+lora"])
def test_opt_is_accounted_on_fake_tensors(draws_at_zero, method):
    bench_model = get_bench_model("opt-1.3b")
    memory = account_memory(bench_model, BenchMethod.parse(method), batch=1, seq=16, scaled=True)
    assert memory.peak > memory.weights > 0
    assert count_model_flops(bench_model, BenchMethod.parse(method), batch=1, seq=16, scaled=True) > 0
    assert not draws_at_zero  # the decoder ran outside training mode: no draw, its layers still trained
