"""Inductor lowering of ``moe_ops::fused_experts``: the op's own steps, as Inductor nodes.

    block schedule (extern call: sort by expert, on the device, no host sync)
    -> gate_up template: rows gathered from x, gate and up GEMMs, activation      (P, F)
    -> down template: routing weight in registers, written to slot order          (S, H)
    -> combine over K: one Inductor reduction kernel, into which the graph's consumers fuse

Why the combine is not the down template's epilogue: a token's K slots belong to K different
experts, so K different programs produce them; summing in the template would need atomic adds
(nondeterministic, fp32 only). The combine kernel reads each token's K rows in a fixed order, and
Inductor fuses the pointwise work that follows the MoE layer (the residual add, the shared expert's
output added to the routed output, a dtype cast) into that same kernel. With K = 1 the combine is
pointwise and all of that fuses into the down template's store.

The lowering is exact where it fires: it computes what the op's CUDA kernel computes (same tile
function, same rounding points). It steps aside (the op stays one extern call, to its CUDA kernel
directly) for a dynamic token count (the op picks its block size per call), capacity mode (its drop
decision is another kernel and a second output), on devices without Triton templates, and when
``moe_ops.config.inductor_templates`` is off.
"""

from __future__ import annotations

import logging

import sympy
import torch
from torch._inductor.lowering import lowerings as L
from torch._inductor.lowering import register_lowering

from lowering.direct_calls import extern_call
from lowering.expert_gemm_lowering import templates_allowed, tuned_expert_gemm
from moe_ops.fused_experts import choose_block_m

log = logging.getLogger("moe_ops")
aten = torch.ops.aten
prims = torch.ops.prims


def _expert_weight_views(w_gate_up, w_down, w_up, b_gate_up, b_up, layout, interleaved, gated):
    """As moe_ops.fused_experts.ExpertWeights, on Inductor IR: (E, N, K) views, never copies."""
    if layout == "EHF":
        w_gate_up = L[aten.permute.default](w_gate_up, [0, 2, 1])
        w_up = None if w_up is None else L[aten.permute.default](w_up, [0, 2, 1])
        w_down = L[aten.permute.default](w_down, [0, 2, 1])
    gate, up, b_gate = w_gate_up, w_up, b_gate_up
    if gated and w_up is None:
        two_f = w_gate_up.get_size()[1]
        if interleaved:
            halves = [(0, two_f, 2), (1, two_f, 2)]
        else:
            halves = [(0, two_f // 2, 1), (two_f // 2, two_f, 1)]
        (gate, up) = (L[aten.slice.Tensor](w_gate_up, 1, *half) for half in halves)
        if b_gate_up is not None:
            (b_gate, b_up) = (L[aten.slice.Tensor](b_gate_up, 1, *half) for half in halves)
    return gate, up, b_gate, b_up, w_down


@register_lowering(torch.ops.moe_ops.fused_experts.default, type_promotion_kind=None)
def lower_fused_experts(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
):
    args = (x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
            layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy)
    why_not = None
    if not templates_allowed(x.get_device()):
        why_not = "no Triton templates for this device (or moe_ops.config.inductor_templates is off)"
    elif capacity_factor != 0:
        why_not = "capacity mode"
    elif not all(isinstance(d, (int, sympy.Integer)) for w in (w_gate_up, w_down) for d in w.get_size()):
        why_not = "the expert weights' shapes are dynamic (the schedule and the tiles need them static)"
    elif not isinstance(x.get_size()[0], (int, sympy.Integer)):
        # The op picks its block size per call from T (16 rows at decode, 128 at prefill); a template
        # compiles one. One block size for every T measured 3-4x slower at T = 8192 when it was chosen
        # for T = 32 (benchmarks/NOTES.md, v4), so a graph for a dynamic T keeps the op's own choice.
        why_not = "dynamic token count (the op chooses its block size per call)"
    if why_not is not None:
        log.debug("moe_ops.fused_experts stays one extern call: %s", why_not)
        return extern_call(torch.ops.moe_ops.fused_experts.default, *args)

    T, H = x.get_size()
    K = topk_ids.get_size()[1]
    E = int(w_gate_up.get_size()[0])
    num_slots = T * K
    block_m = choose_block_m(int(num_slots), E)
    gate, up, b_gate, b_up, down = _expert_weight_views(
        w_gate_up, w_down, w_up, b_gate_up, b_up, layout, interleaved, gated
    )
    sorted_slots, block_expert, num_padded, _, _ = extern_call(
        torch.ops.moe_ops.block_schedule.default, topk_ids, E, block_m
    )
    h_PF = tuned_expert_gemm(
        x, gate, up, b_gate, b_up, None, sorted_slots, block_expert, num_padded,
        num_slots, block_m, K, False, activation, alpha, limit,
    )
    slot_weights = L[aten.reshape.default](topk_weights, [num_slots])
    y_SH = tuned_expert_gemm(
        h_PF, down, None, b_down, None, slot_weights, sorted_slots, block_expert, num_padded,
        num_slots, block_m, 0, True, "none", alpha, limit, slot_ids=L[aten.reshape.default](topk_ids, [num_slots]),
    )
    # As the op: K summed in fp32, in a fixed order, rounded once to x's dtype.
    y_TKH = L[prims.convert_element_type.default](L[aten.view.default](y_SH, [T, K, H]), torch.float32)
    out_TH = L[prims.convert_element_type.default](L[aten.sum.dim_IntList](y_TKH, [1]), x.get_dtype())
    num_dropped = L[aten.full.default]([], 0, dtype=torch.int32, device=x.get_device())
    return out_TH, num_dropped
