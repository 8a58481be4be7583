"""transformers' expert weights through torchao: the ``quantize_`` config that reaches them.

transformers 5 keeps a MoE block's experts as stacked 3-D parameters (``gate_up_proj``, ``up_proj``,
``down_proj``) of one experts module, not as ``nn.Linear`` layers, so ``quantize_``'s default filter
(linear layers) leaves them in bf16 without a word. torchao's ``FqnToConfig`` selects parameters by
name instead; this module builds it for the experts.
"""

from __future__ import annotations

from torchao.core.config import AOBaseConfig
from torchao.quantization import FqnToConfig

# Every transformers experts module's stacked weights, whatever the model's prefix.
EXPERT_WEIGHTS = r"re:(.*\.)?experts\.(gate_up_proj|up_proj|down_proj)$"


def experts_quantization_config(config: AOBaseConfig) -> FqnToConfig:
    """torchao's config that applies ``config`` (e.g. ``Float8WeightOnlyConfig()``) to the stacked expert
    weights of every transformers MoE block and to nothing else:
    ``quantize_(model, moe_ops.experts_quantization_config(config), filter_fn=None)``."""
    if not isinstance(config, AOBaseConfig):
        raise TypeError(f"config: expected a torchao quantization config (AOBaseConfig), got {type(config).__name__}")
    return FqnToConfig({EXPERT_WEIGHTS: config})
