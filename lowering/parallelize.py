"""``moe_ops.parallelize_experts``: a model's routed experts sharded over the ranks of a DeviceMesh
dimension (expert parallelism), the rest of the model unchanged.

Two kinds of experts modules are sharded, found by what they hold:

- transformers' experts modules (a ``*Experts`` module with stacked weights whose config has an experts
  implementation): their implementation becomes ``"moe_ops_ep"``, set on a copy of their config so that
  nothing else sharing it changes (moe_ops/lowering/hf_experts.py, which
  runs ``fused_experts_ep`` over the sharded weights and checks, as the ``"moe_ops"`` implementation does,
  that the op computes what the class's own code does);
- torchtitan's grouped experts (stacked parameters ``w1``, ``w2``, ``w3``; ``forward(x, counts)`` over
  rows grouped by expert, ``counts[e]`` rows for expert e): its forward becomes ``fused_experts_ep`` over
  those rows, each a single-slot token of weight 1 routed to its expert. torchtitan's releases differ
  in the weights' orientation ((E, F, H) or (E, H, F) for w1 and w3), so before sharding, the module's own
  forward runs on random rows (two per expert) and the layout whose ``fused_experts_ref`` (SiLU-gated,
  w3 the up projection) gives the same rows is the one used; if neither does (another activation, other
  weights), the call raises and shards nothing. The sharded forward computes in the rows' dtype (the
  weights cast to it), where torchtitan's grouped-GEMM path rounds both to bf16 first.

Weights become DTensor parameters ``Shard(0)`` over the mesh (rank r keeps experts [r E / R,
(r + 1) E / R)), so FSDP2 can shard them further over another mesh dimension.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moe_ops._checks import check_choice
from moe_ops.expert_parallel import (
    DISPATCHES,
    PLAN_ATTRIBUTE,
    ExpertParallelPlan,
    check_capacity_factor,
    check_pipeline_chunks,
    fused_experts_ep,
)
from moe_ops.fused_experts import fused_experts_ref

GROUPED_EXPERTS_WEIGHTS = ("w1", "w2", "w3")
# How far the module's own forward may be from fused_experts_ref on the probe rows (max |difference| over
# max |value|): its bf16 rounding passes (~4e-3), another layout or activation does not (order 1).
PROBE_TOLERANCE = 2e-2


def parallelize_experts(model: nn.Module, ep_mesh: DeviceMesh, *, dispatch: str = "padded",
                        capacity_factor: float | None = None, pipeline_chunks: int = 1) -> nn.Module:
    """Shard the routed experts of every MoE block in ``model`` over ``ep_mesh`` (a 1-D DeviceMesh, or a
    mesh dimension), each experts module then running as :func:`moe_ops.fused_experts_ep` with
    ``dispatch``, ``capacity_factor`` and ``pipeline_chunks`` (transformers' experts modules and torchtitan's
    grouped experts: see the module docstring). Every rank must hold the same full weights when this is called (the same
    seed, or the same checkpoint). In place; returns ``model``."""
    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh: expected a 1-D DeviceMesh (or one dimension of a mesh), got {ep_mesh.ndim}-D")
    check_choice("dispatch", dispatch, DISPATCHES)
    check_capacity_factor(capacity_factor, dispatch)
    check_pipeline_chunks(pipeline_chunks, dispatch)
    # Everything that can fail runs before anything changes: a module that cannot run sharded leaves the model as
    # it was. Each experts module: (module, its expert count, its grouped-experts layout or None for transformers').
    found = []
    for module in model.modules():
        if is_transformers_experts(module) or _is_grouped_experts(module):
            quantised = _quantised_weights(module)
            if quantised is not None:
                raise ValueError(f"model: {type(module).__name__}'s expert weights are quantised ({quantised}), and "
                                 "quantised experts do not run sharded (fused_experts_ep takes weights of the "
                                 "activations' dtype)")
            transformers_experts = is_transformers_experts(module)
            num_experts = (module.down_proj if transformers_experts else module.w1).shape[0]
            if num_experts % ep_mesh.size():
                raise ValueError(f"ep_mesh: {type(module).__name__} has {num_experts} experts, not a multiple of "
                                 f"the mesh's {ep_mesh.size()} ranks")
            found.append((module, num_experts, None if transformers_experts else _grouped_experts_layout(module)))
    if not found:
        raise ValueError("model: no experts module found (a transformers *Experts module with stacked weights, "
                         "or grouped experts with stacked w1, w2, w3)")
    transformers_experts = [module for module, _, layout in found if layout is None]
    configs = []
    if transformers_experts:
        from moe_ops.lowering.hf_experts import EP_IMPLEMENTATION_NAME, configs_with_implementation  # transformers

        configs = configs_with_implementation(transformers_experts, EP_IMPLEMENTATION_NAME)
    plan = ExpertParallelPlan(ep_mesh.get_group(), dispatch, capacity_factor, pipeline_chunks)
    for module, num_experts, layout in found:
        _shard_stacked_parameters(module, num_experts, ep_mesh)
        if layout is not None:
            module.forward = types.MethodType(_grouped_experts_ep_forward, module)
            module._moe_ops_layout = layout
        setattr(module, PLAN_ATTRIBUTE, plan)
    for module, config in zip(transformers_experts, configs, strict=True):
        module.config = config
    return model


def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose gradients mix DTensors and plain tensors, as after
    :func:`parallelize_experts` (the experts' gradients are DTensor shards, the rest plain, maybe DTensors of
    FSDP on another mesh; torch's clip raises on the mix). Arguments and result as torch's: each gradient's
    norm, the norm of those norms (the total), every gradient scaled by ``max_norm / (total + 1e-6)`` where that
    is below 1. A DTensor gradient's norm is its whole tensor's: each shard's share, in fp32, summed (max / min
    for the infinity norms) over the mesh dimensions it is sharded on, one collective per mesh dimension for all
    such gradients; shards may be empty. Norms are computed in fp32 whatever the gradients' dtype (an fp16
    gradient's squares overflow where its norm does not), and the total is an fp32 tensor. Every rank must call
    it with the same parameters, after the plain gradients are the same on every rank (averaged over the
    data-parallel ranks): then every rank gets the same total, and with ``error_if_nonfinite`` every rank raises
    or none does."""
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    norm_type = float(norm_type)
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # gradients grouped by the mesh dimensions their norms are summed over (none for plain tensors)
    groups: dict[tuple, list[int]] = {}
    for index, grad in enumerate(grads):
        key = ()
        if isinstance(grad, DTensor):
            if any(placement.is_partial() for placement in grad.placements):
                raise ValueError(f"parameters: a gradient is a DTensor with a Partial placement {grad.placements}: "
                                 "reduce it before clipping")
            # Shard or _StridedShard (FSDP2 over an already sharded dimension; no is_shard() on torch 2.13)
            dims = tuple(dim for dim, placement in enumerate(grad.placements) if not placement.is_replicate())
            key = (grad.device_mesh, dims) if dims else ()
        groups.setdefault(key, []).append(index)
    norms_G = [None] * len(grads)
    for key, indices in groups.items():
        shards = [grads[i].to_local() if isinstance(grads[i], DTensor) else grads[i] for i in indices]
        statistics = _shard_statistics(shards, norm_type, foreach)
        if key:
            mesh, dims = key
            op = {math.inf: dist.ReduceOp.MAX, -math.inf: dist.ReduceOp.MIN}.get(norm_type, dist.ReduceOp.SUM)
            for dim in dims:
                dist.all_reduce(statistics, op=op, group=mesh.get_group(dim))
        for i, statistic in zip(indices, statistics, strict=True):
            norms_G[i] = statistic
    device = grads[0].device
    stacked = torch.stack([norm.to(device) for norm in norms_G])
    if _summed_as_powers(norm_type):  # shards summed |x|^p: the tensors' norms are the p-th roots
        stacked = stacked ** (1 / norm_type)
    total = torch.linalg.vector_norm(stacked, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so "
                           "it cannot be clipped. To disable this error and scale the gradients by the non-finite "
                           "norm anyway, set `error_if_nonfinite=False`")
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_place: dict[tuple, list[torch.Tensor]] = {}
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        by_place.setdefault((local.device, local.dtype), []).append(local)
    for (place, _), locals_ in by_place.items():
        if foreach is False:
            for local in locals_:
                local.mul_(scale.to(place))
        else:
            torch._foreach_mul_(locals_, scale.to(place))
    return total


def _summed_as_powers(norm_type: float) -> bool:
    """Whether shards add to a norm of this order as sums of |x|^p (finite p other than 0; the 0-"norm" adds
    counts, the infinity norms take max / min)."""
    return math.isfinite(norm_type) and norm_type != 0


def _shard_statistics(shards: list[torch.Tensor], norm_type: float, foreach: bool | None) -> torch.Tensor:
    """What each tensor (or shard) adds to its whole tensor's norm of order ``norm_type``, in fp32: the sum of
    |x|^p, the count of non-zeros for p = 0, max |x| or min |x| for the infinity norms (an empty shard adds
    nothing: 0, or +inf for the min)."""
    device = shards[0].device
    statistics = torch.full((len(shards),), math.inf if norm_type == -math.inf else 0.0, dtype=torch.float32,
                            device=device)
    filled = [i for i, shard in enumerate(shards) if shard.numel()]
    if filled:
        nonempty = [shards[i].detach() for i in filled]
        if foreach is False:
            norms = [torch.linalg.vector_norm(shard, norm_type, dtype=torch.float32) for shard in nonempty]
        else:
            norms = torch._foreach_norm(nonempty, norm_type, dtype=torch.float32)
        values = torch.stack([norm.to(device) for norm in norms])
        if _summed_as_powers(norm_type):
            values = values ** norm_type
        statistics[filled] = values
    return statistics


def is_transformers_experts(module: nn.Module) -> bool:
    """A transformers experts module with stacked weights (its class decorated by use_experts_implementation)."""
    return (type(module).__name__.endswith("Experts") and hasattr(module, "down_proj")
            and hasattr(getattr(module, "config", None), "_experts_implementation"))


def _is_grouped_experts(module: nn.Module) -> bool:
    weights = [getattr(module, name, None) for name in GROUPED_EXPERTS_WEIGHTS]
    return (all(isinstance(w, nn.Parameter) and w.dim() == 3 for w in weights)
            and len({w.shape[0] for w in weights}) == 1 and weights[0].shape == weights[2].shape
            and weights[1].shape[1:] == weights[0].shape[1:][::-1])


def _quantised_weights(module: nn.Module) -> str | None:
    """How one of the module's stacked weights is stored quantised ("gate_up_proj: a Float8Tensor"), or None."""
    for name, parameter in module.named_parameters(recurse=False):
        form = quantised_form(parameter) if parameter.dim() >= 3 else None
        if form is not None:
            return f"{name}: {form}"
    return None


def quantised_form(weight: torch.Tensor) -> str | None:
    """How an expert weight is stored quantised: a tensor subclass (torchao's), or values that are no float of
    two bytes or more (int8, fp8, moe_ops' packed int4: meaningless without their scales); None for plain
    float values (sharded or not)."""
    if type(weight) not in (nn.Parameter, torch.Tensor) and not isinstance(weight, DTensor):
        return f"a {type(weight).__name__}"
    if weight.dtype.itemsize == 1 or not weight.dtype.is_floating_point:
        return f"{weight.dtype} values"
    return None


def _shard_stacked_parameters(module: nn.Module, num_experts: int, ep_mesh: DeviceMesh) -> None:
    for name, parameter in list(module.named_parameters(recurse=False)):
        if parameter.dim() >= 2 and parameter.shape[0] == num_experts:
            sharded = distribute_tensor(parameter.detach(), ep_mesh, [Shard(0)])
            setattr(module, name, nn.Parameter(sharded, requires_grad=parameter.requires_grad))


def _grouped_experts_layout(module: nn.Module) -> str:
    """The layout ("EFH": w1 (E, F, H); "EHF": w1 (E, H, F)) under which fused_experts_ref gives what the
    module's own forward gives on random rows, two per expert; raises if neither does."""
    w1, w2, w3 = (getattr(module, name) for name in GROUPED_EXPERTS_WEIGHTS)
    if w1.device.type == "meta":
        raise ValueError(f"model: {type(module).__name__}'s weights are on the meta device; parallelize_experts "
                         "checks its forward on them, so materialise them first")
    num_experts = w1.shape[0]
    counts = torch.full((num_experts,), 2, dtype=torch.int64, device=w1.device)
    ids = torch.arange(num_experts, device=w1.device).repeat_interleave(2)[:, None]
    generator = torch.Generator(device=w1.device).manual_seed(0)
    errors = {}
    for layout, hidden in (("EFH", w1.shape[2]), ("EHF", w1.shape[1])):
        x = torch.randn(2 * num_experts, hidden, generator=generator, device=w1.device, dtype=w1.dtype)
        with torch.no_grad():
            try:
                got = module(x, counts)
            except (RuntimeError, ValueError, IndexError) as error:  # rows too wide or narrow for its weights
                errors[layout] = f"its forward fails on ({2 * num_experts}, {hidden}) rows: {error}"
                continue
            want = fused_experts_ref(x, torch.ones_like(ids, dtype=w1.dtype), ids, w1, w2, w3, layout=layout)
            error = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
        if error <= PROBE_TOLERANCE:
            return layout
        errors[layout] = f"{error:.2g} from fused_experts_ref (layout {layout!r}, SiLU-gated)"
    raise ValueError(f"model: {type(module).__name__}'s forward is not silu(x w1) * (x w3) through w2 per expert "
                     f"in either layout, so it cannot run as fused_experts_ep: {errors}")


def _grouped_experts_ep_forward(self, x_RH: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """The sharded grouped experts: ``x_RH``'s rows grouped by expert (``num_tokens_per_expert_E[e]`` rows
    for expert e; rows past their sum belong to none and come back zero), each a single-slot token of
    weight 1 for fused_experts_ep."""
    plan = getattr(self, PLAN_ATTRIBUTE)
    num_rows = x_RH.shape[0]
    ends_E = torch.cumsum(num_tokens_per_expert_E, dim=0).long()
    ids_R = torch.searchsorted(ends_E, torch.arange(num_rows, device=x_RH.device), right=True)
    w1, w2, w3 = (getattr(self, name) for name in GROUPED_EXPERTS_WEIGHTS)
    w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (w1, w2, w3))
    return fused_experts_ep(
        x_RH, x_RH.new_ones(num_rows, 1), ids_R[:, None], w1.to(x_RH.dtype), w2.to(x_RH.dtype), plan.group,
        dispatch=plan.dispatch, capacity_factor=plan.capacity_factor, pipeline_chunks=plan.pipeline_chunks,
        w_up=w3.to(x_RH.dtype),
        layout=self._moe_ops_layout,
    )
