"""``moe_ops::route`` and ``moe_ops::block_schedule`` (and fused_experts' copy of x's rows into schedule
order) as Triton kernels in Inductor's graph.

Their CUDA kernels are plain ``@triton.jit`` functions. Called from a compiled graph as an extern op
(even without the dispatcher, lowering/inductor/direct_calls.py), each call runs the op's Python launcher:
allocations and Triton's JIT dispatch, host time that decode cannot hide. Lowered here, the same
kernels become Inductor's own launches (as a user's ``@triton.jit`` kernel would under torch.compile):
outputs are graph buffers, and the launch goes through Inductor's launcher (host time per call of the
compiled block with and without this: benchmarks/results/compiled_profile_*.md).

The launch code is the eager launcher's (``launch_route``, ``launch_block_schedule``), run on IR
nodes. A symbolic token count takes tiles that hold for any count (``any_count``). Elsewhere (CPU
tensors, C++ wrappers, ``moe_ops.config.inductor_templates`` off, zero tokens, Triton's interpreter) the
ops stay extern calls.
"""

from __future__ import annotations

import sympy
import torch
from torch.utils._sympy.functions import CeilDiv, Max, Min
from triton.runtime.jit import JITFunction

import moe_ops.routing  # noqa: F401  (defines moe_ops::route, lowered here)
import moe_ops.schedule  # noqa: F401  (defines moe_ops::block_schedule, lowered here)
from moe_ops._compat.inductor import V, empty_strided, ir, lower_user_triton_kernel, register_lowering
from moe_ops._compat.inductor import lowerings as L
from moe_ops.lowering.inductor.direct_calls import extern_call
from moe_ops.lowering.inductor.expert_gemm_lowering import templates_allowed
from moe_ops.routing_triton import _route_kernel, launch_route
from moe_ops.schedule_triton import launch_block_schedule, launch_rows_in_schedule_order


def kernels_in_graph(*tensors) -> bool:
    """CUDA tensors and a Python wrapper (or CPU code generation with Triton, as for the templates),
    and compiled kernels: under Triton's interpreter they have no source for Inductor to copy."""
    return (isinstance(_route_kernel, JITFunction) and not V.graph.cpp_wrapper
            and all(templates_allowed(t.get_device()) for t in tensors))


def _launch_in_graph(kernel, grid, num_warps, *args, **constexprs) -> None:
    """``launch`` for the shared launchers: the kernel's positional arguments by name."""
    positional = dict(zip(kernel.arg_names[:len(args)], args, strict=True))
    lower_user_triton_kernel(kernel, grid, num_warps, {**positional, **constexprs})


def _contiguous(t):
    t = ir.ExternKernel.require_contiguous(t)
    return t if isinstance(t, ir.TensorBox) else ir.TensorBox(t)


def _static(size) -> int | None:
    return int(size) if isinstance(size, (int, sympy.Integer)) else None


def _count(size):
    """A token or slot count as the launchers take it: a Python int, or a sympy expression."""
    return size if _static(size) is None else _static(size)


_SYMBOLIC = dict(cdiv=CeilDiv, any_count=True)  # a graph for every T: sympy sizes, tiles for any count


@register_lowering(torch.ops.moe_ops.route.default, type_promotion_kind=None)
def lower_route(logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group,
                topk_group, routed_scaling_factor, renorm_min=0.0):
    args = (logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group, topk_group,
            routed_scaling_factor) + ((renorm_min,) if renorm_min else ())
    num_tokens, num_experts = logits.get_size()
    # The kernel's tiles need E and k known (torch.compile(dynamic=True) makes both symbols).
    if (not kernels_in_graph(logits) or _static(num_tokens) == 0 or _static(num_experts) is None
            or not isinstance(k, int)):
        return extern_call(torch.ops.moe_ops.route.default, *args)
    logits = _contiguous(logits)
    bias = None if correction_bias is None else _contiguous(correction_bias)
    weight_dtype = torch.float64 if logits.get_dtype() == torch.float64 else torch.float32
    device = logits.get_device()
    weights = empty_strided([num_tokens, k], None, dtype=weight_dtype, device=device)
    ids = empty_strided([num_tokens, k], None, dtype=torch.int32, device=device)
    launch_route(
        _launch_in_graph, logits, bias, weights, ids, _count(num_tokens), int(num_experts),
        [_count(s) for s in logits.get_stride()], 1 if bias is not None else 0, k, scoring, softmax_after_topk,
        renormalize, renorm_eps, n_group, topk_group, routed_scaling_factor,
        precise=True, fp32_weights=weight_dtype == torch.float32, renorm_min=renorm_min,
        **({} if _static(num_tokens) else _SYMBOLIC),
    )
    return weights, ids


def block_schedule_in_graph(topk_ids, num_experts: int, block_m: int):
    """The five outputs of ``moe_ops::block_schedule`` (IR), as kernels in the graph where they can be."""
    num_slots = topk_ids.get_size()[0] * topk_ids.get_size()[1]
    if (not kernels_in_graph(topk_ids) or _static(num_slots) == 0
            or not (isinstance(num_experts, int) and isinstance(block_m, int))):
        return extern_call(torch.ops.moe_ops.block_schedule.default, topk_ids, num_experts, block_m)
    device = topk_ids.get_device()

    def alloc(*shape):
        return empty_strided(list(shape), None, dtype=torch.int32, device=device)

    ids_S = _contiguous(L[torch.ops.aten.reshape.default](topk_ids, [num_slots]))
    return tuple(launch_block_schedule(
        _launch_in_graph, alloc, ids_S, _count(num_slots), num_experts, block_m,
        **({} if _static(num_slots) else dict(_SYMBOLIC, maximum=Max, minimum=Min)),
    ))


register_lowering(torch.ops.moe_ops.block_schedule.default, type_promotion_kind=None)(block_schedule_in_graph)


def rows_in_schedule_order_in_graph(x, sorted_slots, top_k: int, active=1):
    """(positions, H) IR: x's rows in schedule order, the op's kernel (``kernels_in_graph`` holds);
    no program where ``active`` (see launch_rows_in_schedule_order) is 0."""
    num_tokens, hidden = x.get_size()
    x = _contiguous(x)
    num_positions = sorted_slots.get_size()[0]
    out = empty_strided([num_positions, hidden], None, dtype=x.get_dtype(), device=x.get_device())
    launch_rows_in_schedule_order(
        _launch_in_graph, x, _contiguous(sorted_slots), out, _count(num_positions), _count(num_tokens), int(hidden),
        int(hidden), top_k, active=active, **({} if _static(num_positions) else dict(cdiv=CeilDiv)),
    )
    return out
