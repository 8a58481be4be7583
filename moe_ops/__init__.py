"""moe_ops: Mixture-of-Experts layers as fused Triton kernels.

The op layer: every op is a ``torch.ops.moe_ops.*`` custom op with a fake kernel (torch.compile,
export), a plain-PyTorch reference (CPU tensors run it) and a Triton kernel (CUDA tensors).

The graph passes: importing moe_ops installs a torch.compile (Inductor) pass that rewrites plain
PyTorch MoE code into these ops; ``disable()``, ``rewrites_disabled()`` and ``config`` control it.
"""

import importlib

from moe_ops.balancing import expert_counts, update_expert_bias
from moe_ops.capacity import apply_capacity
from moe_ops.expert_gemm import expert_gemm
from moe_ops.expert_parallel import fused_experts_ep
from moe_ops.fused_experts import fused_experts, fused_experts_ref
from moe_ops.layout import BlockSchedule, capacity_from_factor
from moe_ops.losses import load_balancing_loss, load_balancing_loss_from_stats, router_z_loss
from moe_ops.lowering.install import disable, enable, rewrites_disabled
from moe_ops.routing import RouterStats, route, route_ref, router_jitter
from moe_ops.schedule import block_schedule
from moe_ops.settings import config

__all__ = [
    # the layer
    "route",
    "fused_experts",
    # the layer with its experts sharded over ranks (expert parallelism)
    "fused_experts_ep",
    "parallelize_experts",
    "clip_grad_norm_",
    # quantised experts: through torchao, or moe_ops' own forms
    "experts_quantization_config",
    "quantise_experts",
    # its parts
    "block_schedule",
    "BlockSchedule",
    "apply_capacity",
    "capacity_from_factor",
    "expert_gemm",
    # training: router losses, router jitter, auxiliary-loss-free balancing
    "load_balancing_loss",
    "load_balancing_loss_from_stats",
    "RouterStats",
    "router_z_loss",
    "router_jitter",
    "expert_counts",
    "update_expert_bias",
    # plain-PyTorch references (the definition of each op's semantics)
    "route_ref",
    "fused_experts_ref",
    # torch.compile rewrites
    "config",
    "enable",
    "disable",
    "rewrites_disabled",
]

enable()


# parallelize_experts, clip_grad_norm_ and quantise_experts import torch.distributed's tensor package (and
# transformers for transformers models), and experts_quantization_config imports torchao: each loaded when first
# asked for, not by ``import moe_ops`` (its import cost). Name -> the module that defines it.
_LOADED_WHEN_ASKED = {
    "parallelize_experts": "moe_ops.lowering.parallelize",
    "clip_grad_norm_": "moe_ops.lowering.parallelize",
    "experts_quantization_config": "moe_ops.lowering.torchao_experts",
    "quantise_experts": "moe_ops.lowering.quantise_experts",
}


def __getattr__(name: str):
    if name in _LOADED_WHEN_ASKED:
        return getattr(importlib.import_module(_LOADED_WHEN_ASKED[name]), name)
    raise AttributeError(f"module 'moe_ops' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LOADED_WHEN_ASKED})
