"""transformers' expert weights through torchao: the ``quantize_`` config that reaches them, and the stored
values and scales of the weights it quantised, as ``moe_ops.fused_experts`` takes them.

transformers 5 keeps a MoE block's experts as stacked 3-D parameters (``gate_up_proj``, ``up_proj``,
``down_proj``) of one experts module, not as ``nn.Linear`` layers, so ``quantize_``'s default filter
(linear layers) leaves them in bf16 without a word. torchao's ``FqnToConfig`` selects parameters by
name instead; this module builds it for the experts. torchao is imported only by that builder: the
transformers integration reads quantised weights (``torchao_quantised``) without importing it.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from moe_ops._checks import ONE_PER_BYTE_WEIGHT_DTYPES
from moe_ops.quantised import MIN_GROUP_SIZE

# Every transformers experts module's stacked weights, whatever the model's prefix.
EXPERT_WEIGHTS = r"re:(.*\.)?experts\.(gate_up_proj|up_proj|down_proj)$"
# torchao's weight tensors whose weight-only product with x is the one of (Q - zero point) times its scales, per
# output row or per group of input features along the row: Int8Tensor (symmetric by default, its zero points all 0;
# asymmetric ones are handed over with their zero points), Float8Tensor (no zero point).
SCALED_TENSORS = ("Int8Tensor", "Float8Tensor")


def experts_quantization_config(config):
    """torchao's config that applies ``config`` (e.g. ``Float8WeightOnlyConfig()``) to the stacked expert
    weights of every transformers MoE block and to nothing else:
    ``quantize_(model, moe_ops.experts_quantization_config(config), filter_fn=None)``."""
    from torchao.core.config import AOBaseConfig
    from torchao.quantization import FqnToConfig

    if not isinstance(config, AOBaseConfig):
        raise TypeError(f"config: expected a torchao quantization config (AOBaseConfig), got {type(config).__name__}")
    return FqnToConfig({EXPERT_WEIGHTS: config})


@torch.compiler.assume_constant_result
def torchao_tensor_class(kind: type) -> str | None:
    """The name of a torchao tensor class, None for any other class. Dynamo runs it at trace time (it cannot
    trace string methods of a class's module) and keeps the result, which depends on the class alone."""
    return kind.__name__ if kind.__module__.startswith("torchao.") else None


def fp8_rowwise_inputs(act_quant_kwargs) -> bool:
    """Whether a torchao Float8Tensor's activation quantisation is fused_experts' "fp8_rowwise": e4m3, one scale
    per row, no bounds on the values that set it (``Float8DynamicActivationFloat8WeightConfig(granularity=
    PerRow())``'s). Its settings are read here and judged as constants: torch 2.11's dynamo cannot hand the
    settings object itself to a function it keeps the result of."""
    granularity = getattr(act_quant_kwargs, "granularity", None)
    return _fp8_rowwise_settings(getattr(act_quant_kwargs, "float8_dtype", None), type(granularity),
                                 getattr(granularity, "dim", -1), getattr(act_quant_kwargs, "hp_value_lb", None),
                                 getattr(act_quant_kwargs, "hp_value_ub", None))


@torch.compiler.assume_constant_result
def _fp8_rowwise_settings(float8_dtype, granularity: type, dim, lower_bound, upper_bound) -> bool:
    """Dynamo runs it at trace time (a class's name is no traceable value): the settings are constants."""
    return (float8_dtype == torch.float8_e4m3fn and granularity.__name__ == "PerRow" and dim == -1
            and lower_bound is None and upper_bound is None)


# A torchao weight -> (its version, whether any zero point is not 0), for as long as the weight lives: eager calls
# read the answer once per weight rather than synchronising with the device on every call. Keyed by the weight, not
# its zero points: torchao writes those in place below autograd (a state dict loaded into the weight:
# Int8Tensor.copy_), which counts on the weight's version alone.
_NONZERO = WeakIdKeyDictionary()


@torch.compiler.assume_constant_result
def _any_nonzero_zero_point(weight: torch.Tensor) -> bool:
    """Whether a torchao weight's zero points may not all be 0: read once per weight version. An inference tensor
    counts no versions, so a write under inference mode could not be told: its zero points are always taken
    (True: correct whatever they hold; where they are 0, a subtraction per weight value is spent on them).
    Dynamo runs it at trace time and keeps the result: a compiled function keeps the form it was compiled with
    (docs/index.md, Quantised experts)."""
    if weight.is_inference():
        return True
    known = _NONZERO.get(weight)
    if known is not None and known[0] == weight._version:
        return known[1]
    nonzero = bool(weight.zero_point.any())
    _NONZERO[weight] = (weight._version, nonzero)
    return nonzero


def torchao_quantised(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str] | None:
    """(values (E, N, K), fp32 scales, fp32 zero points or None, input quantisation) of a torchao tensor as
    fused_experts takes quantised weights (moe_ops.quantised), or None for any other tensor (a plain one, other
    layouts or groups). torchao's int8 tensors always hold zero points (0 where the mapping is symmetric, torchao's
    default): they are handed over only where one is not 0 (an asymmetric ``Int8Tensor``), so that symmetric weights
    keep the faster form without them.

    - int8 or fp8 e4m3 values with a scale per expert and row ((E, N): ``Int8WeightOnlyConfig()``,
      ``Float8WeightOnlyConfig()``) or per group of input features along the row ((E, N, K / g):
      ``Int8WeightOnlyConfig(granularity=PerGroup(g))``, g a multiple of 16), inputs as they are ("none");
    - fp8 e4m3 values with a scale per row whose inputs are quantised per row on the fly
      (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``): "fp8_rowwise"."""
    if torchao_tensor_class(type(weight)) not in SCALED_TENSORS:
        return None
    values, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if not (isinstance(values, torch.Tensor) and isinstance(scale, torch.Tensor)) or values.dim() != 3:
        return None
    if getattr(weight, "act_pre_scale", None) is not None:
        return None
    experts, rows, columns = values.shape
    block = list(getattr(weight, "block_size", ()))
    if values.dtype not in ONE_PER_BYTE_WEIGHT_DTYPES or len(block) != 3 or block[:2] != [1, 1] or scale.dtype != (
            torch.float32):
        return None
    group = block[2]
    if columns % group or tuple(scale.shape) != (experts, rows, columns // group):
        return None
    zero = getattr(weight, "zero_point", None)
    if zero is not None:
        try:  # torchao keeps a zero point of one element as it is where it slices a tensor: any that broadcasts
            broadcast = torch.broadcast_shapes(zero.shape, scale.shape) == scale.shape
        except (AttributeError, RuntimeError):
            broadcast = False
        if not broadcast:
            return None
        zero = zero.to(torch.float32).expand(scale.shape).contiguous() if _any_nonzero_zero_point(weight) else None
    act_quant_kwargs = getattr(weight, "act_quant_kwargs", None)
    if act_quant_kwargs is not None:
        if (group != columns or values.dtype != torch.float8_e4m3fn or zero is not None
                or not fp8_rowwise_inputs(act_quant_kwargs)):
            return None
        return values, scale.squeeze(-1), None, "fp8_rowwise"
    if group == columns:
        return values, scale.squeeze(-1), None if zero is None else zero.squeeze(-1), "none"
    return (values, scale, zero, "none") if group % MIN_GROUP_SIZE == 0 else None
