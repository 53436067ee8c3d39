"""Fast frozen emulator blocks: the library's fused ops swapped into the Hugging Face blocks.

Inside each (frozen) emulator block, without touching the block's own forward:

- every RMSNorm (Llama-style, Gemma's ``1 + weight``) / LayerNorm (``torch.nn``'s, Cohere's) becomes a :class:`~offsite_kernels.nn.FrozenRMSNorm` /
  :class:`~offsite_kernels.nn.FrozenLayerNorm` (input gradient only, saves the input and the row
  statistics);
- a gated MLP (Llama family, Gemma) becomes a :class:`~offsite_kernels.nn.FrozenGatedMLP` (Phi-3's, with one
  projection for gate and up, a :class:`~offsite_kernels.nn.FrozenFusedGatedMLP`): the
  activation and the product fused into one SwiGLU (GeGLU) op that saves only its two inputs;
- a mixture of experts' experts module (Mixtral, Qwen MoE, OLMoE) stays Hugging Face's when dense (its grouped
  GEMM over the experts); low-bit experts are a :class:`~offsite_kernels.nn.FrozenExperts` already, their gated
  activation fused; a shared expert and a dense block's MLP are gated MLPs as above;
- the MLP activation module of the other families becomes a
  :class:`~offsite_kernels.nn.FrozenActivation` (one op, saves only its input);
- attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (Hugging Face's
  ``"sdpa"`` implementation: flash or memory-efficient kernels on a GPU). This is a setting of the
  whole emulator model (its config), adapters included; an implementation already chosen among
  "sdpa" and flash attention is kept, eager (or another one) is replaced. BLOOM, which Hugging
  Face runs in eager PyTorch only, gets the library's
  :class:`~offsite_kernels.nn.alibi_attention.AlibiSdpaAttention` in each frozen block instead
  (``ModelFamily.alibi_attention``): SDPA with ALiBi and the mask as one additive bias.

Linear layers stay as they are: dense ``nn.Linear`` (PyTorch saves no input for a frozen weight)
or the low-bit ``FrozenLinear`` of a quantized emulator. Parameter names do not change (the
frozen modules hold buffers of the same names), so packages and adapters are unaffected.
Which modules to swap is per-family data (``ModelFamily.gated_mlp``, ``activation_modules``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import OffsiteError
from ..models import ModelFamily, find_submodule
from ..nn.alibi_attention import AlibiSdpaAttention
from ..nn.mlp import FrozenActivation, FrozenFusedGatedMLP, FrozenGatedMLP
from ..nn.norm import FrozenLayerNorm, FrozenRMSNorm, layer_norm_kind, rms_norm_kind
from ..ops.activation import activation_by_name


class FastBlocksError(OffsiteError, ValueError):
    """Fast blocks asked for where they cannot apply."""


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in place of the module there, in that module's train/eval mode."""
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    module.train(getattr(parent, attr).training)  # a new module starts in training mode: dropout would run in eval
    setattr(parent, attr, module)


# |fast - original| <= rtol * |original| + atol * max |original| on a sample input, per dtype: a few roundings apart
# (Hugging Face's bf16 GELUs round each step), while a wrong norm offset or activation is far further; in float32
# (activations are always checked there) the tanh and erf GELUs differ by 95 times the bound on the sample
_SWAP_TOLERANCE = {torch.float32: (1e-4, 1e-6), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


CHECK_SWAPS = True  # False skips the sample-input check of each swap (for tools that stub the kernels out)


def _real_tensors(tensors: Iterable[torch.Tensor]) -> bool:
    """All ``tensors`` are real (not meta or fake ones, as the benchmark's accounting builds) and no dispatch mode is
    active, so a sample input can run through them."""
    if torch._C._len_torch_dispatch_stack():
        return False
    return all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta" for t in tensors)


def _sample_like(module: nn.Module, block: nn.Module) -> torch.Tensor | None:
    """A parameter giving the device and dtype the module computes in: its own first, else the block's (a quantized
    linear holds buffers only); None where the block has none."""
    return next(iter((*module.parameters(), *block.parameters())), None)


def _check_same_output(
    original: nn.Module, fast: nn.Module, features: int, block: nn.Module, what: str, dtype: torch.dtype | None = None
) -> None:
    """Run ``original`` and its replacement ``fast`` on one sample input (in ``dtype``, by default the module's); raise
    :class:`FastBlocksError` where they differ beyond rounding. The swap reads a module's math from its class and the
    config (a norm's offset, the activation's name): this catches a Hugging Face module whose math those no longer
    describe, instead of training through other math without a word."""
    like = _sample_like(original, block)
    if not CHECK_SWAPS or like is None or not _real_tensors((like, *original.parameters(), *original.buffers())):
        return
    dtype = dtype or (like.dtype if like.dtype in _SWAP_TOLERANCE else torch.float32)
    sample = torch.randn(2, 3, features, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu") * 2
    x = sample.to(device=like.device, dtype=dtype)
    with torch.no_grad():
        expected, got = original(x).double(), fast(x).double()
    rtol, atol = _SWAP_TOLERANCE[dtype]
    finite = torch.isfinite(expected)  # an overflow (float16) must be the original's too
    expected, got_finite = expected.where(finite, 0.0), got.where(finite, 0.0)
    excess = (got_finite - expected).abs() - (rtol * expected.abs() + atol * float(expected.abs().max()))
    if not torch.equal(torch.isfinite(got), finite) or float(excess.max()) > 0:
        raise FastBlocksError(
            f"the fused replacement of {what} does not reproduce its output on a sample input (up to "
            f"{float((got_finite - expected).abs().max()):.3g} apart in {dtype}): this Hugging Face module computes other "
            "math than the library reads from its class and config; build the emulator without fast blocks "
            "(and report the model type and transformers version)"
        )


def check_fast_block(block: nn.Module, family: ModelFamily, config: object) -> None:
    """Raise :class:`FastBlocksError` where :func:`fast_block_` cannot turn ``block`` into a fast block
    computing the same math; changes nothing."""
    trainable = [name for name, p in block.named_parameters() if p.requires_grad]
    if trainable:
        raise FastBlocksError(
            f"fast blocks are frozen, but this block has trainable parameters ({', '.join(trainable[:3])}...): "
            "distil first, then switch the fast blocks on"
        )
    if any(t.dtype == torch.float64 for t in (*block.parameters(), *block.buffers())):
        raise FastBlocksError(
            "fast blocks run in float32, float16 or bfloat16, but this block holds float64 weights; "
            "cast the model (model.float()) or build the emulator without fast blocks"
        )
    for flag, why in family.fast_blocks_unsupported:
        if getattr(config, flag, None):
            raise FastBlocksError(
                f"{family.name} with {flag}={getattr(config, flag)!r}: {why}; build the emulator without fast blocks"
            )
    activation = family.activation_name(config)
    if (family.activation_modules or family.gated_mlp is not None) and activation is None:
        raise FastBlocksError(f"{family.name}: no activation name in the config ({family.activation_config})")
    if activation is not None and (family.activation_modules or family.gated_mlp is not None):
        try:
            fused = activation_by_name(activation)
        except ValueError as exc:
            raise FastBlocksError(f"{family.name}: {exc}; build the emulator without fast blocks") from None
        if family.gated_mlp is not None and not fused.has_gated:
            raise FastBlocksError(
                f"{family.name}: no fused gated kernel for activation {activation!r} (SiLU and GELU forms have one); "
                "build the emulator without fast blocks"
            )
    if family.alibi_attention is not None:
        attention = block.get_submodule(family.alibi_attention)
        if getattr(attention, "pretraining_tp", 1) > 1 and getattr(attention, "slow_but_exact", False):
            raise FastBlocksError(
                f"{family.name}: with pretraining_tp > 1 and slow_but_exact, Hugging Face's attention projects its output "
                "in slices without the dense bias, which the fast attention does not copy; set slow_but_exact=False "
                "in the config or build the emulator without fast blocks"
            )


def plan_fast_block(block: nn.Module, family: ModelFamily, config: object) -> list[tuple[str, nn.Module, str]]:
    """The fused modules for one frozen ``block`` as ``(path, module, what)``, each checked against the module it
    replaces on a sample input; raises :class:`FastBlocksError` where one cannot apply, and changes nothing."""
    check_fast_block(block, family, config)
    plan: list[tuple[str, nn.Module, str]] = []
    for name, module in list(block.named_modules()):
        if not name:
            continue
        kind = "LayerNorm" if layer_norm_kind(module) is not None else "RMSNorm" if rms_norm_kind(module) is not None else None
        if kind is not None:
            norm = FrozenLayerNorm.from_module(module) if kind == "LayerNorm" else FrozenRMSNorm.from_module(module)
            _check_same_output(module, norm, norm.hidden_size, block, f"{family.name}'s {name} ({type(module).__name__})")
            plan.append((name, norm, kind))
    if family.alibi_attention is not None:
        attention = block.get_submodule(family.alibi_attention)
        plan.append((family.alibi_attention, AlibiSdpaAttention(attention), "ALiBi attention through SDPA"))
    activation = family.activation_name(config)
    for path in _gated_mlp_paths(block, family):
        mlp = block.get_submodule(path)
        assert activation is not None  # check_fast_block
        fused_projection = family.gated_mlp_fused
        gated = (FrozenFusedGatedMLP if fused_projection else FrozenGatedMLP).from_module(mlp, activation)
        what = f"{family.name}'s {path} ({type(mlp).__name__})"
        features = (mlp.gate_up_proj if fused_projection else mlp.gate_proj).in_features
        _check_same_output(mlp, gated, int(features), block, what)
        _check_activation_alone(mlp, activation, block, what)
        plan.append((path, gated, f"{'SwiGLU' if gated.act.kind == 'silu' else 'GeGLU'} MLP"))
    for path in family.activation_modules:
        assert activation is not None  # check_fast_block
        fused = FrozenActivation(activation)
        original = block.get_submodule(path)
        _check_same_output(
            original, fused, 8, block, f"{family.name}'s {path} ({type(original).__name__}, {activation!r})", torch.float32
        )
        plan.append((path, fused, activation))
    return plan


def _gated_mlp_paths(block: nn.Module, family: ModelFamily) -> list[str]:
    """Where ``block`` holds a gated MLP to fuse: the family's ``gated_mlp``; in a mixture of experts, only in its dense
    blocks (in a sparse one that path holds the router and experts), and its shared expert (Qwen MoE)."""
    if family.gated_mlp is None:
        return []
    if family.experts is None:
        return [family.gated_mlp]
    candidates = (family.gated_mlp, *((family.shared_expert,) if family.shared_expert else ()))
    gated = ("gate_up_proj",) if family.gated_mlp_fused else ("gate_proj", "up_proj")
    return [
        path for path in candidates if all(isinstance(getattr(find_submodule(block, path), a, None), nn.Module) for a in gated)
    ]


def _check_activation_alone(module: nn.Module, activation: str, block: nn.Module, what: str) -> None:
    """The module's own activation against the fused one, in float32 (finer than a bf16 run of the whole module)."""
    for attr in ("act_fn", "activation_fn"):
        if isinstance(getattr(module, attr, None), nn.Module):
            _check_same_output(getattr(module, attr), FrozenActivation(activation), 8, block, f"{what}.{attr}", torch.float32)


def apply_fast_block_(block: nn.Module, plan: list[tuple[str, nn.Module, str]]) -> list[str]:
    """Put a :func:`plan_fast_block` plan into ``block``, in place; returns what was swapped."""
    for path, module, _ in plan:
        _replace(block, path, module)
    return [f"{path}: {what}" for path, _, what in plan]


def fast_block_(block: nn.Module, family: ModelFamily, config: object) -> list[str]:
    """Swap the fused frozen modules into one frozen ``block``, in place (all checked first); returns what was swapped."""
    return apply_fast_block_(block, plan_fast_block(block, family, config))


def use_sdpa_attention_(model: nn.Module) -> None:
    """Route the model's attention through PyTorch's scaled-dot-product attention.

    The same math as eager attention for every query that attends to at least one key. A query that
    attends to none (a pad position before the first real token of a left-padded row) has no defined
    output: eager and SDPA fill it differently. Nothing downstream should read it; a label predicted
    from such a position (the first real token of a left-padded row) must be -100 for the loss to match.

    A model whose class has no SDPA attention in this transformers (``_supports_sdpa`` false: GPT-J before 5.2x)
    keeps its attention: naming "sdpa" in its config would only change the mask it builds, which its eager
    attention would then misread."""
    if not getattr(model, "_supports_sdpa", True):
        return
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "flash_attention_2", "flash_attention_3"):
        config._attn_implementation = "sdpa"
