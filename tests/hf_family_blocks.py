"""transformers' Mixture-of-Experts families, each as its own MoE block built from its config class at tiny
sizes (random weights): what tests/test_hf_families.py compiles to write the family table of the docs.

A family is a ``transformers.models.<name>`` package whose modeling source assigns ``self.experts`` or
defines a "...MoE" class: read from the installed transformers, so a family that transformers adds shows
up without an edit here. The block is the class of that module (not an Attention, a decoder layer or the
experts themselves) whose ``__init__`` assigns ``self.experts`` (or, named "...MoE", builds an experts
module or sizes something by ``num_experts``: Doge's embedding-row experts), built from the
family's config (its text config for multimodal models) with every size field this module knows set small.
Where only a decoder or encoder layer assigns ``self.experts`` (Gemma 4: router and experts beside the dense
MLP), the block is that layer, called with its family's rotary position embeddings (``LayerBlock``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import torch
import transformers

# Config fields set wherever a family's config has them: small sizes, 8 experts, 2 per token, one group.
TINY_CONFIG = dict(
    hidden_size=64, d_model=64, intermediate_size=64, moe_intermediate_size=32, expert_intermediate_size=32,
    shared_expert_intermediate_size=48, ffn_hidden_size=32, d_ff=32, expert_dim=32,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8,
    num_experts_per_tok=2, moe_k=2, moe_topk=2, top_k=2, moe_top_k=2, top_k_experts=2, n_shared_experts=1,
    n_group=1, topk_group=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
    # Gemma 4: its layers' MoE switched on, and no per-layer input (which only the whole model computes).
    enable_moe_block=True, hidden_size_per_layer_input=0,
)
# Fields set per family after TINY_CONFIG, where the family's released models differ from the common tiny
# setting in a way the rewrites depend on: Llama 4's models (Scout, Maverick) route each token to 1 expert;
# Doge's product keys need a square expert count (sqrt(E) keys a side).
FAMILY_CONFIG = {"llama4": dict(num_experts_per_tok=1), "doge": dict(num_experts=16)}
# Families whose experts are no token routing of a language model.
NOT_TOKEN_ROUTING = {"vitpose_backbone": "a vision backbone whose experts are chosen per dataset, not per token"}

# What the MoE code of each family that is not fully rewritten does differently, in a user's words (read from
# its transformers 5.17 source); the family table prints it beside the log's reason. tests/test_hf_families.py
# fails when a family left alone has no entry here, or a fully rewritten one still has one.
DIFFERENT_CODE = {
    "dbrx": "its router's softmax runs in bf16 (the selection reads rounded scores) and divides the chosen "
            "weights by their p-norm; its experts are rewritten",
    "deepseek_v4": "its router scores are sqrt(softplus(logits)) in bf16, a scoring moe_ops.route lacks, and "
                   "its first layers pick experts from a fixed token-id table; its experts are rewritten",
    "doge": "its routed experts are single neurons, a row of two embedding tables each (act(d_e . x) w u_e), "
            "which its two batched matmuls over the gathered rows compute: no gated MLP per expert for the "
            "grouped GEMMs to run; its router (product keys: the top-k of sums of two halves' top keys) is "
            "rewritten",
    "inkling": "its router adds the selection bias to sigmoid scores in bf16 and derives the weights from "
               "log-sigmoids normalised together with the shared experts; its experts are rewritten",
    "lfm2_moe": "its router adds the selection bias to sigmoid scores in bf16 (the bias is bf16 once the model "
                "is), so the selection reads rounded sums; its experts are rewritten",
    "llama4": "its top-k runs on raw logits and the sigmoid follows on a dense score matrix, a router "
              "moe_ops.route does not express; every token goes through every expert with its input row scaled "
              "by its score, which is rewritten (one row per slot for K > 1); its experts are rewritten",
    "mistral4": "its group-limited router computes logits, softmax and top-k in bf16 (no fp32 cast), so the "
                "selection reads rounded scores; its experts are rewritten",
    "nllb_moe": "it picks 2 experts with two argmax calls and drops tokens past an expert's capacity; each "
                "expert is its own ReLU MLP with biases, and its loop re-encodes the selection mask, so only "
                "experts 0 and 1 run",
    "phimoe": "its sparsemixer router picks two experts with successive max() calls on bf16 logits, each "
              "weighted by a softmax over the experts within a jitter threshold; its experts are rewritten",
    "switch_transformers": "it routes top-1 with a max over bf16 softmax probabilities into a one-hot mask, "
                           "and each expert is its own ReLU MLP looked up by name",
    "zaya": "its router is a small MLP over (batch, sequence, E + 1) with a 'skip' class and passes state "
            "between layers; its experts are rewritten",
}


def families() -> list[str]:
    """Every transformers model package whose modeling code assigns ``self.experts`` or defines a "...MoE"
    class, sorted."""
    models = Path(transformers.__file__).parent / "models"
    found = set()
    for path in models.glob("*/modeling_*.py"):
        if re.search(r"self\.experts ?=|^class \w+Mo[Ee]\(", path.read_text(encoding="utf-8"), re.MULTILINE):
            found.add(path.parent.name)
    return sorted(found)


def _config_class(family: str):
    module = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    classes = [cls for name, cls in vars(module).items()
               if inspect.isclass(cls) and issubclass(cls, transformers.PretrainedConfig)
               and cls.__module__ == module.__name__]
    # The model's own config, not an audio or vision tower's.
    main = [cls for cls in classes if not re.search(r"(Audio|Vision|Visual)Config$", cls.__name__)]
    return min(main or classes, key=lambda cls: len(cls.__name__))


def tiny_config(family: str):
    """The family's (text) config with every field of TINY_CONFIG that it has set small."""
    config = _config_class(family)()
    text = config.get_text_config()
    configs = {id(config): config, id(text): text}
    for known in list(configs.values()):
        for value in vars(known).values():
            if isinstance(value, transformers.PretrainedConfig):
                configs[id(value)] = value
    for each in configs.values():
        for name, value in TINY_CONFIG.items():
            try:
                if hasattr(each, name):
                    setattr(each, name, value)
            except Exception:  # noqa: BLE001  (configs validate fields their own way, some per layer)
                continue
    for name, value in FAMILY_CONFIG.get(family, {}).items():
        setattr(text, name, value)
    return text


def _block_classes(module) -> list[type]:
    classes = []
    for name, cls in vars(module).items():
        if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module) and cls.__module__ == module.__name__):
            continue
        if re.search(r"(Attention|Experts|Expert|Model|(Decoder|Encoder)\w*Layer|ForCausalLM|Router|Gate|TopK)$",
                     name):
            continue
        try:
            source = inspect.getsource(cls.__init__)
        except (OSError, TypeError):
            continue
        # The experts as a module of their own, or a "...MoE" class built from experts modules (JetMoE) or
        # sized by the expert count (Doge's embedding tables).
        assigns_experts = re.search(r"self\.experts ?=", source) or (
            re.search(r"Mo[Ee]$", name) and re.search(r"Experts\(|self\.num_experts\b", source))
        if assigns_experts and "self.layers" not in source:
            classes.append(cls)
    return classes


class LayerBlock(torch.nn.Module):
    """A decoder (or encoder) layer that holds a family's router and experts, called as a block: hidden
    states in, the layer's hidden states out, with the position embeddings of the family's own rotary class
    for positions 0, 1, ... and no attention mask."""

    def __init__(self, layer: torch.nn.Module, rotary: torch.nn.Module, layer_type: str | None):
        super().__init__()
        self.layer, self.rotary, self.layer_type = layer, rotary, layer_type

    def forward(self, hidden_states):
        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        rotary_args = () if self.layer_type is None else (self.layer_type,)
        embeddings = self.rotary(hidden_states, positions, *rotary_args)
        out = self.layer(hidden_states, position_embeddings=embeddings, attention_mask=None, position_ids=positions)
        return out[0] if isinstance(out, tuple) else out


def _layer_block(module, config) -> tuple[str, torch.nn.Module] | None:
    """(layer class name, LayerBlock) for a family whose only holder of ``self.experts`` is a decoder or
    encoder layer, else None."""
    own = {name: cls for name, cls in vars(module).items()
           if inspect.isclass(cls) and cls.__module__ == module.__name__}
    layers = [cls for name, cls in own.items() if re.search(r"(Decoder|Encoder)\w*Layer$", name)
              and re.search(r"self\.experts ?=", inspect.getsource(cls.__init__))]
    rotaries = [cls for name, cls in own.items() if name.endswith("RotaryEmbedding")]
    if not layers or not rotaries:
        return None
    torch.manual_seed(0)
    layer = layers[0](config, layer_idx=0)
    layer_types = getattr(config, "layer_types", None)
    rotary = min(rotaries, key=lambda cls: len(cls.__name__))(config)
    needs_type = "layer_type" in inspect.signature(rotary.forward).parameters
    return layers[0].__name__, LayerBlock(layer, rotary, layer_types[0] if needs_type else None)


def build_block(family: str, config=None, experts_implementation: str = "grouped_mm",
                ) -> tuple[str, torch.nn.Module, transformers.PretrainedConfig]:
    """(class name, block, config) of the family's MoE block, its experts on ``experts_implementation``
    (default: transformers' default, "grouped_mm"), from ``config`` (default: ``tiny_config(family)``).
    Raises with each candidate's error if none builds."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    config = tiny_config(family) if config is None else config
    errors = []
    for cls in _block_classes(module):
        parameters = inspect.signature(cls.__init__).parameters
        extra = {}
        if "layer_idx" in parameters:  # the last layer: past any leading dense or hash-routed layers
            extra["layer_idx"] = max(0, getattr(config, "num_hidden_layers", 1) - 1)
        for size in ("intermediate_size", "ffn_dim"):  # the experts' width, where the block takes it apart
            if size in parameters:
                extra[size] = TINY_CONFIG["moe_intermediate_size"]
        try:
            torch.manual_seed(0)
            block = cls(config, **extra)
        except Exception as error:  # noqa: BLE001  (each family's own error, reported in the table)
            errors.append(f"{cls.__name__}: {type(error).__name__}: {error}")
            continue
        _set_experts_implementation(block, experts_implementation)
        return cls.__name__, block, config
    if not errors:
        layer_block = _layer_block(module, config)
        if layer_block is not None:
            _set_experts_implementation(layer_block[1], experts_implementation)
            return (*layer_block, config)
    raise RuntimeError("; ".join(errors) or "no MoE block class: only an attention, decoder or encoder layer, "
                       "model or experts class assigns self.experts")


def _set_experts_implementation(block: torch.nn.Module, experts_implementation: str) -> None:
    for submodule in block.modules():
        if hasattr(getattr(submodule, "config", None), "_experts_implementation"):
            submodule.config._experts_implementation = experts_implementation
