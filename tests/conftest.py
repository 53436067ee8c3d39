"""Shared fixtures. No test reaches a hub: every model is built from a config."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU (set before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (``-n``) the test processes share the CPUs: one thread each, for this process and the
# scripts its tests start, since threads that outnumber the cores spin and wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
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


_AOT_VARIANT_ARGS = ("kernel", "fmt", "dtype", "cfg", "arch")  # test_aot_compile's frozen-linear parameters


@pytest.fixture(scope="module")
def aot_prefetched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Compile the ahead-of-time cases of the requesting module's selected tests that use this fixture at once,
    one compile per CPU (``aot.prefetch``); each test then checks its cached report row. Parametrized tests name
    either ``case`` and ``arch`` (an ``aot.KernelCase``) or the frozen-linear variant's ``kernel, fmt, dtype, cfg, arch``.
    Under pytest-xdist every worker that runs such a test asks for the whole set: the workers share the rows
    through one file in the run's temporary directory (``prefetch(share=)``), so each case compiles once."""
    aot = pytest.importorskip("offsite_kernels.ops.aot", reason="triton is not installed")
    if not aot.availability()[0]:
        return  # the tests skip themselves and say why
    variants, cases = [], []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is not request.module or "aot_prefetched" not in getattr(item, "fixturenames", ()):
            continue
        if "case" in params and "arch" in params:
            cases.append((params["case"], params["arch"]))
        elif all(name in params for name in _AOT_VARIANT_ARGS):
            variants.append(tuple(params[name] for name in _AOT_VARIANT_ARGS))
    share = tmp_path_factory.getbasetemp().parent / "aot-rows.json" if os.environ.get("PYTEST_XDIST_WORKER") else None
    aot.prefetch(variants, cases, share=share)


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


# --- CUDA graphs on the CPU ------------------------------------------------------------------------
class StandInGraph:
    """A CPU stand-in for one callable captured by ``torch.cuda.make_graphed_callables``, with a
    captured graph's hazards: static inputs, static outputs the next replay overwrites, and one
    saved state that the next forward replaces."""

    def __init__(self, fn, samples: tuple[torch.Tensor, ...]) -> None:
        self.fn, self.static_inputs = fn, samples
        self.static_outputs: list[torch.Tensor] | None = None
        self.static_grads: list[torch.Tensor | None] = []
        self.saved: tuple | None = None  # the last forward's autograd state: the next forward replaces it
        self.fn(*samples)  # a capture runs the function once (a failure there is a capture failure)
        graph = self

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                for static, x in zip(graph.static_inputs, inputs, strict=True):
                    static.detach().copy_(x)
                with torch.enable_grad():
                    live = [s.detach().requires_grad_(s.requires_grad) for s in graph.static_inputs]
                    outs = graph.fn(*live)
                graph.saved = (live, outs)
                if graph.static_outputs is None:
                    graph.static_outputs = [torch.empty_like(o) for o in outs]
                for static, o in zip(graph.static_outputs, outs, strict=True):
                    static.copy_(o.detach())
                return tuple(static.detach() for static in graph.static_outputs)

            @staticmethod
            def backward(ctx, *grads_out):
                live, outs = graph.saved
                need = [t for t in live if t.requires_grad]
                pairs = [(o, g) for o, g in zip(outs, grads_out, strict=True) if o.requires_grad]
                outputs, grad_outputs = zip(*pairs, strict=True)
                grads = iter(torch.autograd.grad(outputs, need, grad_outputs, retain_graph=True))
                if not graph.static_grads:
                    graph.static_grads = [torch.empty_like(t) if t.requires_grad else None for t in live]
                result = []
                for static in graph.static_grads:
                    if static is not None:
                        static.copy_(next(grads))
                    result.append(None if static is None else static.detach())
                return tuple(result)

        self.replay = Replay

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.replay.apply(*tensors)


class StandInGraphEngine:
    def __init__(self) -> None:
        self.captures = 0
        self.fail: Exception | None = None

    def __call__(self, callables, sample_args, pool):
        if self.fail is not None:
            raise self.fail
        self.captures += 1
        return tuple(StandInGraph(fn, samples) for fn, samples in zip(callables, sample_args, strict=True))


@pytest.fixture
def cuda_graphs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> StandInGraphEngine:
    """``offsite_kernels.nn.cuda_graphs`` graphs calls on the CPU too, captured by the stand-in."""
    from offsite_kernels.nn import cuda_graphs as cg

    stand_in = StandInGraphEngine()
    monkeypatch.setattr(cg, "GRAPH_DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setattr(cg, "_make_graphed_callables", stand_in)
    return stand_in
