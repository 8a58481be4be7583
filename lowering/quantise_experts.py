"""``moe_ops.quantise_experts``: transformers' stacked expert weights quantised into a form of
``moe_ops.fused_experts`` that torchao has no tensor for (int4 in groups with zero points; fp8 in square
tiles, DeepSeek-V3's form), read by the "moe_ops" experts implementation.

Each quantised weight ``name`` (``gate_up_proj`` / ``up_proj``, ``down_proj``) of an experts module becomes
its stored values (a frozen parameter, layout (E, N, K): output features first, whatever the module's own
layout) beside ``{name}_scale`` and, for int4, ``{name}_zero`` (frozen fp32 parameters), so that the usual
state-dict round trip keeps them: quantise a fresh model the same way, then load the state dict. The module
is marked (``QUANTISED_ATTRIBUTE`` of lowering/hf_experts.py, which reads such weights) and its
experts implementation set to "moe_ops" (on a copy of its config: other modules and models sharing the
config keep theirs): its own loop cannot multiply packed values, so where
fused_experts cannot take the module's call that implementation raises the reason instead of falling back
to the loop.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

from moe_ops._checks import check_choice, check_int
from moe_ops.lowering.hf_experts import IMPLEMENTATION_NAME, QUANTISED_ATTRIBUTE, configs_with_implementation
from moe_ops.lowering.parallelize import is_transformers_experts, quantised_form
from moe_ops.quantised import quantise_weight

SCHEMES = ("int4", "fp8_blocks")


def quantise_experts(model: nn.Module, scheme: str = "int4", *, group_size: int = 128) -> nn.Module:
    """Quantise the stacked expert weights of every transformers MoE block in ``model``, in place:
    ``"int4"``: asymmetric int4 in groups of ``group_size`` input features, packed two per byte
    (moe_ops.quantised.quantise_groups); ``"fp8_blocks"``: fp8 e4m3 with a scale per ``group_size`` x
    ``group_size`` tile (quantise_blocks). Returns ``model``; its experts then run as moe_ops.fused_experts
    (experts implementation "moe_ops"), eager and compiled."""
    check_choice("scheme", scheme, SCHEMES)
    check_int("group_size", group_size, minimum=1)
    experts = [module for module in model.modules() if is_transformers_experts(module)]
    modules = [module for module in experts if getattr(module, QUANTISED_ATTRIBUTE, None) is None]
    if not experts:
        raise ValueError("model: no transformers experts module with stacked weights (gate_up_proj / up_proj, "
                         "down_proj) to quantise")
    if not modules:
        raise ValueError(f"model: its experts are quantised already ({getattr(experts[0], QUANTISED_ATTRIBUTE)}); "
                         "quantise_experts takes a model with float expert weights")
    for module in modules:  # every module checked before any is changed
        if scheme == "fp8_blocks" and module.has_gate and not module.is_concatenated:
            raise ValueError(f"scheme: 'fp8_blocks' tiles would mix the interleaved gate and up rows of "
                             f"{type(module).__name__}; 'int4' scales each row's groups")
        for name in _weight_names(module):
            if isinstance(getattr(module, name), DTensor):
                raise ValueError(f"model: {type(module).__name__}.{name} is sharded (parallelize_experts), and sharded "
                                 "experts run in the activations' dtype only: quantise before sharding is refused "
                                 "too, so keep them in bf16 / fp16 / fp32")
            form = quantised_form(getattr(module, name))
            if form is not None:
                raise ValueError(f"model: {type(module).__name__}.{name} is quantised already ({form}); "
                                 "quantise_experts takes float expert weights")
    # Every weight quantised before any is replaced: a weight that cannot be leaves the model as it was.
    stored = []
    for module in modules:
        for name in _weight_names(module):
            weight = getattr(module, name).detach()
            weight_ENK = weight.transpose(1, 2) if module.is_transposed else weight
            form = f"int4_g{group_size}" if scheme == "int4" else f"fp8_b{group_size}"
            try:
                values, scale, zero = quantise_weight(weight_ENK, form)
            except ValueError as error:  # its words name quantised.py's argument (group_size, block): dropped
                raise ValueError(f"group_size: {group_size} does not fit {type(module).__name__}.{name} "
                                 f"(E, N, K) = {tuple(weight_ENK.shape)}: {str(error).split(': ', 1)[-1]}") from None
            stored.append((module, name, values, scale, zero))
    label = f"int4 in groups of {group_size}" if scheme == "int4" else f"fp8 in {group_size} x {group_size} tiles"
    configs = configs_with_implementation(modules, IMPLEMENTATION_NAME)
    for module, name, values, scale, zero in stored:
        setattr(module, name, nn.Parameter(values, requires_grad=False))
        setattr(module, f"{name}_scale", nn.Parameter(scale, requires_grad=False))
        if zero is not None:
            setattr(module, f"{name}_zero", nn.Parameter(zero, requires_grad=False))
        setattr(module, QUANTISED_ATTRIBUTE, label)
    for module, config in zip(modules, configs, strict=True):
        module.config = config
    return model


def _weight_names(module: nn.Module) -> list[str]:
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]

