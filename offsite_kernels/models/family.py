"""What the library needs to know about one family of Hugging Face causal LMs.

A family is data, not code: dotted paths to the transformer blocks, the input embeddings,
the final norm and the LM head. Each supported family lives in a small file of this package
that registers one :class:`ModelFamily`; nothing copies a Hugging Face forward method.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModelError


def find_submodule(root: nn.Module, path: str | None) -> nn.Module | None:
    """The submodule of ``root`` at the dotted ``path``, or None where there is none (or no path)."""
    if path is None:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


@dataclass(frozen=True)
class ModelFamily:
    """Where the pieces of one model family live, as dotted module paths from the LM."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    token_embedding: str
    position_embedding: str | None
    final_norm: str
    lm_head: str = "lm_head"
    # a config attribute sizing a table of computed positions that longer sequences overrun (GPT-J's sin/cos table)
    position_table_config: str | None = None
    # default LoRA targets inside a block (module names), as the LoRA paper and PEFT choose them
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # a config attribute the head multiplies its logits by (Cohere's ``logit_scale``) or divides them by (Granite's
    # ``logits_scaling``): the fused head scales each chunk of logits as the head does
    logit_multiplier: str | None = None
    logit_divisor: str | None = None
    # config attributes that hold one entry per block and must follow a layer selection
    per_block_config_lists: tuple[str, ...] = ("layer_types",)
    # fast frozen blocks: a gated MLP (gate_proj, up_proj, down_proj) at this path inside a block,
    # activation modules at these paths, and where the activation's Hugging Face name is found
    gated_mlp: str | None = None
    gated_mlp_fused: bool = False  # the gated MLP projects gate and up at once (``gate_up_proj``, gate first: Phi-3)
    # a mixture of experts: Hugging Face's fused experts module (3-D ``gate_up_proj`` [E, 2I, H], gate first, and
    # ``down_proj`` [E, H, I], called with the router's top-k indices and weights) at this path in a sparse block
    experts: str | None = None
    shared_expert: str | None = None  # a gated MLP every token goes through beside the routed experts (Qwen MoE)
    # how the config names the blocks whose MLP is dense, which a layer selection must renumber: (list of dense block
    # indices, sparse step) as Qwen MoE's ``mlp_only_layers`` and ``decoder_sparse_step``, or (count of leading dense
    # blocks,) as DeepSeek's ``first_k_dense_replace``
    dense_blocks_config: tuple[str, str] | tuple[str] | None = None
    activation_modules: tuple[str, ...] = ()
    activation_config: str | None = None  # config attribute holding the name, e.g. "hidden_act"
    activation_default: str | None = None  # the name when the config holds none (BLOOM)
    sdpa_attention: bool = True  # fast blocks may switch the attention to Hugging Face's "sdpa"
    alibi_attention: str | None = None  # an ALiBi attention module at this path that fast blocks run with SDPA
    # (attention path in a block, config flag): with the flag on, Hugging Face divides that attention's
    # ``scaling`` by ``layer_idx + 1`` when it builds the block; a block rebuilt at another position
    # (an emulator package loaded) must get its source block's scaling back
    depth_scaled_attention: tuple[str, str] | None = None
    # (config flag, why): with the flag on, fast blocks would not reproduce the plain blocks and are refused
    fast_blocks_unsupported: tuple[tuple[str, str], ...] = ()

    def activation_name(self, config: object) -> str | None:
        """The Hugging Face name of the blocks' MLP activation."""
        name = getattr(config, self.activation_config, None) if self.activation_config else None
        return name if isinstance(name, str) else self.activation_default

    def logit_scale(self, config: object) -> float:
        """The factor the head scales its logits by (1.0 for a plain linear head). A divisor becomes its reciprocal:
        the same rounding where it is a power of two (Granite's checkpoints use 8 and 16)."""
        multiplier = getattr(config, self.logit_multiplier, None) if self.logit_multiplier else None
        divisor = getattr(config, self.logit_divisor, None) if self.logit_divisor else None
        return float(1.0 if multiplier is None else multiplier) / float(1.0 if divisor is None else divisor)

    def max_positions(self, config: object) -> int | None:
        """How many tokens a sequence may hold: the position table's size (a learned one, or GPT-J's precomputed
        rotary one: :attr:`position_table_config`); None where positions are computed and no table limits them."""
        if self.position_embedding is None and self.position_table_config is None:
            return None
        limit = getattr(config, self.position_table_config or "max_position_embeddings", None)
        return limit if isinstance(limit, int) else None

    def get(self, model: nn.Module, path: str) -> nn.Module:
        """Return the submodule of ``model`` at the dotted ``path``."""
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no {path!r}: pass the whole causal LM ({self.name}: the *ForCausalLM "
                "model), not its base model or a part of it"
            ) from None

    def get_lm_head(self, model: nn.Module) -> nn.Module:
        """The LM head: Hugging Face's ``get_output_embeddings()`` where the model has one (its attribute's name
        changed across transformers versions: GPT-NeoX's ``embed_out`` became ``lm_head``), else the module at
        :attr:`lm_head`."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return head if isinstance(head, nn.Module) else self.get(model, self.lm_head)

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        """Return the model's list of transformer blocks."""
        blocks = self.get(model, self.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"{self.name}: expected a ModuleList at {self.blocks!r}, found {type(blocks).__name__}")
        return blocks

    def set_blocks(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Replace the model's list of transformer blocks (the new list takes the old one's train/eval mode)."""
        parent_path, _, attr = self.blocks.rpartition(".")
        parent = self.get(model, parent_path) if parent_path else model
        blocks.training = getattr(parent, attr).training  # the list itself only: each block keeps its own mode
        setattr(parent, attr, blocks)
