"""Shared fixtures. No test reaches a hub: every model is built from a config."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU (set before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from offsite_kernels.tiny import TINY_VOCAB, tiny_model, tiny_model_types

MODEL_TYPES = tiny_model_types()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each kernel test twice: the PyTorch reference and the Triton kernels (interpreter on CPU)."""
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("OFFSITE_BACKEND", request.param)
    return request.param


def gen(seed: int) -> torch.Generator:
    """A seeded CPU generator: fresh random inputs, the same in every process."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=MODEL_TYPES)
def model_type(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def full_model(model_type: str) -> torch.nn.Module:
    """A tiny random 6-block model of each supported family."""
    return tiny_model(model_type, n_layers=6, seed=1234)


def random_ids(batch: int, length: int, seed: int, vocab: int = TINY_VOCAB) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def padded_mask(batch: int, length: int) -> torch.Tensor:
    """An attention mask with left padding on every other row (never all zero)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1::2, :3] = 0
    return mask


def state_dict_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def forward_saving_only_weights(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, asserting that autograd saved something and only ``layer``'s own buffers (no activation)."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    weight_ptrs = {t.data_ptr() for t in layer.buffers()}
    assert saved, "the weight must be saved for the backward"
    for t in saved:
        assert t.data_ptr() in weight_ptrs, f"saved a non-weight tensor of shape {tuple(t.shape)}"
    return y
