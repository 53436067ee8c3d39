"""Host-side launch helpers (``ops/triton_launch.py``): integer arithmetic, row views, cached autotuned launches."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen

import offsite_kernels as ok

triton = pytest.importorskip("triton")
from offsite_kernels.ops import triton_launch as tlaunch  # noqa: E402


def test_cdiv_and_next_power_of_2_match_triton():
    assert tlaunch.next_power_of_2(0) == 1  # as triton.next_power_of_2(max(n, 1)), what the launchers used
    for a in [0, 1, 2, 3, 7, 8, 9, 63, 64, 65, 1000, 16383, 16384, 16385, 2**31 + 5]:
        if a:
            assert tlaunch.next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 64, 129):
            assert tlaunch.cdiv(a, b) == triton.cdiv(a, b), (a, b)


def _layouts() -> dict[str, torch.Tensor]:
    g = gen(5)
    base = torch.randn(3, 5, 19, generator=g)
    return {
        "2d": torch.randn(7, 19, generator=g),
        "2d transposed": torch.randn(19, 7, generator=g).t(),
        "3d contiguous": base,
        "3d padded rows (a view)": torch.randn(3, 5, 23, generator=g)[..., :19],
        "3d permuted (a copy)": base.transpose(0, 1),
        "3d strided last dim": torch.randn(3, 5, 38, generator=g)[..., ::2],
        "size-1 dims with odd strides": torch.randn(5, 19, generator=g).unsqueeze(0).unsqueeze(2).transpose(0, 2),
        "expanded (stride 0)": torch.randn(19, generator=g).expand(2, 4, 19),
        "1d": torch.randn(19, generator=g),
        "1d strided": torch.randn(38, generator=g)[::2],
        "0d": torch.tensor(2.5),
        "empty rows": torch.randn(0, 4, 19, generator=g),
        "empty last dim": torch.randn(3, 4, 0, generator=g),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_as_rows_addresses_every_row_of_the_tensor(name):
    t = _layouts()[name]
    rows, m, stride_m, stride_n = tlaunch.as_rows(t)
    n = t.shape[-1] if t.dim() else 1
    expected = t.reshape(math.prod(t.shape[:-1]), n)
    assert m == expected.shape[0]
    # what a kernel reads: row r, column c at data_ptr + r * stride_m + c * stride_n
    read = torch.as_strided(rows, (m, n), (stride_m, stride_n), rows.storage_offset())
    assert torch.equal(read, expected)
    if t.dim() == 2 or t.is_contiguous():
        assert rows is t  # no reshape call where the strides already fit


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors on the Triton path: the interpreter's (CPU) test")
def test_launchers_take_leading_dimensions_without_reshape(monkeypatch):
    """The norm, activation and frozen linear launchers read an N-D input in place (no reshape call)."""
    monkeypatch.setenv("OFFSITE_BACKEND", "triton")
    from offsite_kernels.ops import activation, norm

    x = torch.randn(2, 3, 37, generator=gen(1))
    w = torch.randn(37, generator=gen(2))
    qw = ok.quantize_weight(torch.randn(29, 37, generator=gen(3)), bits=8)
    calls = []
    real = torch.Tensor.reshape
    monkeypatch.setattr(torch.Tensor, "reshape", lambda self, *s: calls.append(s) or real(self, *s))
    y = norm.rms_norm(x, w)
    a = activation.bias_gelu(x, w)
    lin = ok.frozen_linear(x, qw)
    monkeypatch.setattr(torch.Tensor, "reshape", real)
    assert calls == []
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w.double()
    assert y.shape == x.shape and float((y.double() - ref).abs().max()) < 1e-5
    assert a.shape == x.shape and float((a.double() - torch.nn.functional.gelu(x64 + w.double())).abs().max()) < 1e-5
    assert lin.shape == (2, 3, 29) and float((lin.double() - x64 @ qw.dequantize().double().T).abs().max()) < 1e-4


def _full_autotuner_key(tuned, args: tuple, meta: dict) -> tuple:
    """Triton's ``Autotuner`` key of a launch: its key arguments (positional or keyword), then every tensor's dtype."""
    named = {**dict(zip(tuned.arg_names, args, strict=False)), **meta}
    return tuple(named[k] for k in tuned.keys) + tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))


def test_cached_autotune_key_is_as_fine_as_the_autotuners():
    """The cache key holds every value the autotuner keys on (so no launch reuses another key's choice)."""
    from offsite_kernels.ops import fp8_gemm_triton as f8
    from offsite_kernels.ops import frozen_linear_triton as flt

    launches = []
    for bits, dtype in ((None, torch.float16), (8, torch.bfloat16), (4, torch.float32)):
        qw = ok.quantize_weight(torch.randn(24, 64, generator=gen(3)), bits=bits, group_size=32)
        w, s, z, swn, ssn = flt._weight_args(qw.data, qw.scales, qw.zeros)
        x, y = torch.randn(5, 64).to(dtype), torch.empty(5, 24, dtype=dtype)
        meta = dict(
            GROUP=32, FMT=flt.FMT_CODES[qw.format], HAS_BIAS=False, SPLIT_K=False, DOT_PRECISION="ieee", INTERPRETER_BF16=False
        )
        launches.append((flt.autotuned_launch("fwd", 80), (x, w, s, z, y, y, y, 5, 24, 64, 8, 128, 64, 1, swn, ssn, 24, 1), meta))
        meta = {k: v for k, v in meta.items() if k != "HAS_BIAS"}
        launches.append((flt.autotuned_launch("bwd", 80), (y, w, s, z, x, x, 5, 24, 64, 8, 128, 24, 1, swn, ssn, 64, 1), meta))
    a = torch.zeros(5, 64, dtype=torch.float8_e4m3fn)
    b = torch.zeros(24, 64, dtype=torch.float8_e4m3fn)
    launches.append((f8.autotuned_gemm(90), *f8._launch_args(a, torch.ones(5), b, None, None, torch.empty(5, 24))))
    for cached, args, meta in launches:
        key = cached.key(args, meta)
        names = cached.tuned.arg_names
        # structurally: every autotuner key name is a key position or a constexpr in the key, by name
        keyed = {names[i] for i in cached._key_positions if i < len(args)} | {name for name, _ in key[2]}
        assert set(cached.tuned.keys) <= keyed
        # every tensor argument (placeholders included) has its dtype in the key, position by position
        assert [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)] == list(cached._tensor_positions)
        assert key[1] == tuple(args[i].dtype for i in cached._tensor_positions)
        flat = set(key[0]) | set(map(str, key[1])) | {v for _, v in key[2]}
        assert set(_full_autotuner_key(cached.tuned, args, meta)) <= flat


def test_cached_autotune_tunes_one_key_at_a_time():
    """Triton's Autotuner keeps per-call state on itself: the cache's slow path holds a lock around it."""
    seen = []

    class Tuner:
        arg_names, keys, fn = ["x_ptr", "M"], ["M"], None

        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append(lock.locked())
                self.best_config = triton.Config({"BLOCK_M": 16})

            return launch

    cached = tlaunch.CachedAutotune(Tuner())
    lock = cached._tuning
    cached(lambda c: (1,), (torch.zeros(2), 5), {})
    assert seen == [True] and not lock.locked() and len(cached.chosen) == 1


def test_launchers_refuse_an_out_they_cannot_write_in_place():
    from offsite_kernels.ops import frozen_linear_triton as flt
    from offsite_kernels.ops import norm_triton

    qw = ok.quantize_weight(torch.randn(11, 32, generator=gen(4)), bits=8)
    x = torch.randn(3, 5, 32, generator=gen(5))
    permuted = torch.zeros(5, 3, 11).transpose(0, 1)  # the right shape, rows not addressable in place
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \(3, 5, 11\)"):
        flt.frozen_linear_fwd(x, qw.data, qw.scales, qw.zeros, None, qw.format, qw.group_size, 11, out=permuted)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        flt.frozen_linear_bwd(torch.randn(3, 5, 11), qw.data, qw.scales, qw.zeros, qw.format, 0, 32, out=x.transpose(0, 1))
    with pytest.raises(ValueError, match=r"rstd_out must be a contiguous torch.float32 tensor of shape \(3, 5\)"):
        norm_triton.rms_norm_fwd(x, None, None, 1e-6, rstd_out=torch.empty(15))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        norm_triton.layer_norm_bwd(x, x, None, torch.zeros(3, 5), torch.ones(3, 5), out=torch.empty(3, 32, 5).transpose(1, 2))


class _FakeCudaTensor:
    """What :func:`on_input_device` reads of a tensor on ``cuda:<index>``."""

    is_cuda = True

    def __init__(self, index: int) -> None:
        self.index = index

    def get_device(self) -> int:
        return self.index


def test_launchers_run_with_their_inputs_device_current(monkeypatch):
    """Triton launches on the current device: a launcher switches to its input's device when another is current,
    restores it after (also on an error), and leaves it alone when they agree or the input is on the CPU."""
    current = [0]
    switches = []

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self):
            switches.append(self.index)
            self.before, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", Device)

    @tlaunch.on_input_device
    def launcher(t, scale, *, fail=False):
        """A launcher's docstring."""
        if fail:
            raise ValueError("bad input")
        return current[0], scale

    assert launcher(_FakeCudaTensor(1), 3) == (1, 3) and current == [0] and switches == [1]
    assert launcher(_FakeCudaTensor(0), 4) == (0, 4) and switches == [1]  # already current: no switch
    with pytest.raises(ValueError, match="bad input"):
        launcher(_FakeCudaTensor(2), 5, fail=True)
    assert current == [0] and switches == [1, 2]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("a CPU input asked for the CUDA device"))
    assert launcher(torch.zeros(2), 6) == (0, 6)
    assert launcher.__doc__ == "A launcher's docstring." and launcher.__wrapped__.__name__ == "launcher"


def _launch_sites(tree) -> tuple[dict, dict, set]:
    """Of a module's AST: each top-level function's callees (names), which of them launch a kernel
    directly (``name[grid](...)`` or an autotuned launcher), and which are decorated ``on_input_device``."""
    import ast

    calls, launches, guarded = {}, set(), set()
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        names = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call):
                fn = sub.func
                if isinstance(fn, ast.Subscript):
                    launches.add(node.name)  # kernel[grid](...)
                while isinstance(fn, ast.Call):  # autotuned_launch(...)(grid, args, meta)
                    fn = fn.func
                if isinstance(fn, ast.Name):
                    names.add(fn.id)
                    if fn.id in ("autotuned_launch", "autotuned_gemm"):
                        launches.add(node.name)
        calls[node.name] = names
        if any(isinstance(d, ast.Name) and d.id == "on_input_device" for d in node.decorator_list):
            guarded.add(node.name)
    return calls, launches, guarded


def _reached_guarded(name: str, calls: dict, guarded: set, seen: frozenset = frozenset()) -> bool:
    """``name`` is guarded, or has callers and each of them is reached only through guarded functions."""
    if name in guarded:
        return True
    callers = [f for f, callees in calls.items() if name in callees and f not in seen]
    return bool(callers) and all(_reached_guarded(f, calls, guarded, seen | {name}) for f in callers)


def test_every_kernel_launch_is_reached_only_through_a_device_guarded_launcher():
    """Read from the source of every ``ops/*_triton.py``: a function that launches a kernel is decorated with
    ``on_input_device``, or every function of the module that calls it is (recursively), and it has callers."""
    import ast
    import importlib
    import pathlib

    ops_dir = pathlib.Path(tlaunch.__file__).parent
    checked = 0
    for path in sorted(ops_dir.glob("*_triton.py")):
        calls, launches, guarded = _launch_sites(ast.parse(path.read_text()))

        for name in launches:
            assert _reached_guarded(name, calls, guarded), (
                f"{path.name}: {name} launches a kernel outside an @on_input_device launcher"
            )
            checked += 1
        module = importlib.import_module(f"offsite_kernels.ops.{path.stem}")
        assert all(getattr(module, name).launches_on_input_device for name in guarded)
    assert checked >= 8  # norms (2), activations (a helper), cross-entropy, fp8 (2), frozen linear (a helper, the reduction)
