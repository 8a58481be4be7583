"""Inductor lowering of ``moe_ops::fused_experts``: the op's own steps, as Inductor nodes.

    block schedule (sort by expert, on the device, no host sync; packed, no padding: the schedule's
                    kernels in Inductor's graph where they can be, else an extern call)
    -> gate_up template: rows gathered from x, gate and up GEMMs, activation      (S, F)
    -> down template: routing weight in registers, written to slot order          (S, H)
    -> combine over K: one Inductor pointwise kernel, into which the graph's consumers fuse

Why the combine is not the down template's epilogue: a token's K slots belong to K different
experts, so K different programs produce them; summing in the template would need atomic adds
(nondeterministic, fp32 only). The combine kernel reads each token's K rows in a fixed order, and
Inductor fuses the pointwise work that follows the MoE layer (the residual add, the shared expert's
output added to the routed output, a dtype cast) into that same kernel. With K = 1 the combine is
pointwise and all of that fuses into the down template's store.

From TMA_MIN_ROWS_PER_EXPERT rows per expert up (prefill), as in the op, both templates load their
tiles through TMA on a persistent grid (expert_gemm_tile), the gate_up one from x's rows copied into
schedule order by one gather kernel before it (TMA loads row blocks, it cannot gather).

A dynamic token count (one graph for every T): the block size that pays differs by T (16 rows at
decode, 128 at prefill: 4x apart at T = 8192), so the graph holds a template pair per range of
``block_m_ranges`` (the 128-row blocks without and with TMA), all over the one packed schedule.
Each pair's grid is zero unless T is in its range (the launch then starts no program), and every
down template writes into one shared output buffer, which the combine reads (so with K = 1 the
graph's epilogue fuses into the combine, not into a template's store). No host-side branch: CUDA
graphs record whichever pair ran.

The lowering is exact where it fires: it computes what the op's CUDA kernel computes (same tile
function, same schedule, same rounding points). It steps aside (the op stays one extern call, to its
CUDA kernel directly) for capacity mode (its drop decision is another kernel and a second output),
dynamic expert shapes, on devices without Triton templates, and when
``moe_ops.config.inductor_templates`` is off.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import sympy
import torch
from torch.utils._sympy.functions import Max, Min

import moe_ops.fused_experts  # noqa: F401  (defines moe_ops::fused_experts, lowered here)
from moe_ops._checks import KERNEL_DTYPES
from moe_ops._compat.inductor import empty_strided, register_lowering
from moe_ops._compat.inductor import lowerings as L
from moe_ops.layout import PackedSchedule
from moe_ops.lowering.inductor.direct_calls import extern_call
from moe_ops.lowering.inductor.expert_gemm_lowering import (
    templates_allowed,
    tma_allowed,
    tuned_expert_gemm,
    weight_views,
)
from moe_ops.lowering.inductor.kernel_calls import (
    block_schedule_in_graph,
    kernels_in_graph,
    rows_in_schedule_order_in_graph,
)
from moe_ops.tiles import TMA_BLOCK_M, block_m_ranges, choose_block_m, tma_applies, tma_pays

log = logging.getLogger("moe_ops")
aten = torch.ops.aten
prims = torch.ops.prims


def _expert_weight_views(w_gate_up, w_down, w_up, b_gate_up, b_up, layout, interleaved, gated,
                         w_gate_up_scale=None, w_up_scale=None, w_gate_up_zero=None, w_up_zero=None):
    """As moe_ops.fused_experts.ExpertWeights, on Inductor IR: (E, N, K) views, never copies, and the
    scales and zero points of quantised weights beside them (a fused gate_up weight's split as its rows
    are): (gate, up, gate bias, up bias, down, gate scale, up scale, gate zero, up zero)."""
    if layout == "EHF":
        w_gate_up = L[aten.permute.default](w_gate_up, [0, 2, 1])
        w_up = None if w_up is None else L[aten.permute.default](w_up, [0, 2, 1])
        w_down = L[aten.permute.default](w_down, [0, 2, 1])
    gate, up, b_gate = w_gate_up, w_up, b_gate_up
    s_gate, s_up, z_gate, z_up = w_gate_up_scale, w_up_scale, w_gate_up_zero, w_up_zero
    if gated and w_up is None:
        def split(t):
            # The halves of dim 1, or its alternate rows (a block scale's dim 1 counts blocks of rows: halved too).
            rows = t.get_size()[1]
            halves = [(0, rows, 2), (1, rows, 2)] if interleaved else [(0, rows // 2, 1), (rows // 2, rows, 1)]
            return tuple(L[aten.slice.Tensor](t, 1, *half) for half in halves)

        gate, up = split(w_gate_up)
        if b_gate_up is not None:
            b_gate, b_up = split(b_gate_up)
        if w_gate_up_scale is not None:
            s_gate, s_up = split(w_gate_up_scale)
        if w_gate_up_zero is not None:
            z_gate, z_up = split(w_gate_up_zero)
    return gate, up, b_gate, b_up, w_down, s_gate, s_up, z_gate, z_up


class _Variant(NamedTuple):
    """One template pair: its block size, and the slot counts S it runs for (fewer < S <= most)."""

    block_m: int
    fewer: int = -1
    most: int | None = None
    tma: bool = False  # TMA tiles (where the weights allow them), as the op chooses for these slot counts

    def active(self, num_slots):
        """1 where the pair runs, else 0: a factor of its grid (sympy, so the wrapper evaluates it per call)."""
        if self.fewer < 0:
            return 1
        runs = Max(0, Min(1, num_slots - self.fewer))
        return runs if self.most is None else runs * Max(0, Min(1, self.most + 1 - num_slots))


def _variants(num_slots, num_experts: int, tma_possible: bool) -> list[_Variant]:
    """A static T: the op's block size and TMA choice. A dynamic T: one pair per range of
    block_m_ranges (its two 128-row ranges as one where TMA tiles are not possible for these weights)."""
    if isinstance(num_slots, (int, sympy.Integer)):
        num_slots = int(num_slots)
        return [_Variant(choose_block_m(num_slots, num_experts),
                         tma=tma_possible and tma_pays(num_slots, num_experts))]
    ranges = block_m_ranges(num_experts)
    if not tma_possible and ranges[-1][3]:
        (block_m, fewer, _, _), _ = ranges[-2:]
        ranges = [*ranges[:-2], (block_m, fewer, None, False)]
    return [_Variant(block_m, fewer, most, tma) for block_m, fewer, most, tma in ranges]


def _quantised_inputs(rows, input_quantisation: str, w_scale):
    """A GEMM's input rows (R, K) as fused_experts quantises them (moe_ops.fused_experts.quantise_inputs), on
    Inductor IR: (fp8 e4m3 values (R, K), fp32 scales (R,) per row, or (R, G) per row and group of the
    weight's G groups); each scale the largest magnitude over 448, as moe_ops.quantised computes it."""
    num_rows, k = rows.get_size()
    groups = 1 if input_quantisation == "fp8_rowwise" else int(w_scale.get_size()[-1])
    grouped = L[aten.view.default](L[prims.convert_element_type.default](rows, torch.float32),
                                   [num_rows, groups, k // groups])
    largest = L[aten.amax.default](L[aten.abs.default](grouped), [-1])
    scale = L[aten.div.Tensor](L[aten.clamp_min.default](largest, torch.finfo(torch.float32).tiny),
                               torch.finfo(torch.float8_e4m3fn).max)
    values = L[prims.convert_element_type.default](
        L[aten.div.Tensor](grouped, L[aten.unsqueeze.default](scale, -1)), torch.float8_e4m3fn)
    values = L[aten.view.default](values, [num_rows, k])
    return values, L[aten.view.default](scale, [num_rows]) if input_quantisation == "fp8_rowwise" else scale


def _rows_in_schedule_order(x, sorted_slots, top_k, active):
    """x[sorted_slots // K] (T, H) -> (S, H); the sentinel positions of unrouted slots read row T - 1.
    The op's kernel in the graph where it can be (lowering/inductor/kernel_calls.py), launching no program where
    ``active`` (the reading template pair's) is 0, else as Inductor IR (an elementwise gather, ~2x slower
    at Mixtral T = 8192: each element loads through its own index)."""
    if kernels_in_graph(x, sorted_slots):
        return rows_in_schedule_order_in_graph(x, sorted_slots, top_k, active)
    token = L[aten.div.Tensor_mode](sorted_slots, top_k, rounding_mode="floor")
    token = L[aten.clamp_max.default](token, x.get_size()[0] - 1)
    return L[aten.index.Tensor](x, [token])


@register_lowering(torch.ops.moe_ops.fused_experts.default, type_promotion_kind=None)
def lower_fused_experts(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
    w_gate_up_scale=None, w_up_scale=None, w_down_scale=None, w_gate_up_zero=None, w_up_zero=None, w_down_zero=None,
    input_quantisation="none",
):
    args = (x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
            layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
            w_gate_up_scale, w_up_scale, w_down_scale, w_gate_up_zero, w_up_zero, w_down_zero, input_quantisation)
    why_not = None
    if not templates_allowed(x.get_device()):
        why_not = "no Triton templates for this device (or moe_ops.config.inductor_templates is off)"
    elif capacity_factor != 0:
        why_not = "capacity mode"
    elif x.get_dtype() not in KERNEL_DTYPES:
        why_not = f"{x.get_dtype()}: the op's own kernel refuses it with the reason"
    elif not all(isinstance(d, (int, sympy.Integer)) for w in (w_gate_up, w_down) for d in w.get_size()):
        why_not = "the expert weights' shapes are dynamic (the schedule and the tiles need them static)"
    elif not isinstance(topk_ids.get_size()[1], (int, sympy.Integer)):
        why_not = "the number of experts per token is dynamic (the schedule needs it static)"
    if why_not is not None:
        log.debug("moe_ops.fused_experts stays one extern call: %s", why_not)
        return extern_call(torch.ops.moe_ops.fused_experts.default, *args)

    T, H = x.get_size()
    K = int(topk_ids.get_size()[1])
    E = int(w_gate_up.get_size()[0])
    num_slots = T * K
    gate, up, b_gate, b_up, down, s_gate, s_up, z_gate, z_up = _expert_weight_views(
        w_gate_up, w_down, w_up, b_gate_up, b_up, layout, interleaved, gated, w_gate_up_scale, w_up_scale,
        w_gate_up_zero, w_up_zero,
    )
    # Packed (block_m = 1: no padding), so that every block size's templates can share it.
    sorted_slots, _, _, _, expert_offsets = block_schedule_in_graph(topk_ids, E, 1)
    slot_weights = L[aten.reshape.default](topk_weights, [num_slots])
    slot_ids = L[aten.reshape.default](topk_ids, [num_slots])
    tma_possible = w_gate_up_scale is None and tma_allowed(x.get_device()) and tma_applies(
        x.get_dtype(), TMA_BLOCK_M, gate.get_size()[1], up is not None, weight_views(gate, up))
    variants = _variants(num_slots, E, tma_possible)
    # Several pairs (a dynamic T) write one output buffer; one pair returns its own, for epilogue fusion.
    shared = None if len(variants) == 1 else empty_strided([num_slots, H], None, dtype=x.get_dtype(),
                                                           device=x.get_device())
    schedule = PackedSchedule(sorted_slots, expert_offsets)
    x_quantised = None if input_quantisation == "none" else _quantised_inputs(x, input_quantisation, w_gate_up_scale)
    for variant in variants:
        common = dict(active=variant.active(num_slots), tma=variant.tma)
        a, gather_top_k = (x, None) if input_quantisation == "none" else x_quantised, K
        if variant.tma:
            # As the op: TMA loads row blocks, so x's rows are copied into schedule order first.
            a, gather_top_k = (_rows_in_schedule_order(x, sorted_slots, K, common["active"]), None), 0
        h_SF = tuned_expert_gemm(
            a[0], gate, schedule, num_slots, variant.block_m, w_up=up, bias=b_gate, bias_up=b_up,
            gather_top_k=gather_top_k, activation=activation, alpha=alpha, limit=limit, w_scale=s_gate,
            w_up_scale=s_up, w_zero=z_gate, w_up_zero=z_up, a_scale=a[1], out_dtype=x.get_dtype(), **common,
        )
        h_scale = None
        if input_quantisation != "none":
            h_SF, h_scale = _quantised_inputs(h_SF, input_quantisation, w_down_scale)
        y_SH = tuned_expert_gemm(
            h_SF, down, schedule, num_slots, variant.block_m, bias=b_down, slot_weights=slot_weights, scatter=True,
            slot_ids=slot_ids, out=shared, w_scale=w_down_scale, w_zero=w_down_zero, a_scale=h_scale,
            out_dtype=x.get_dtype(), **common,
        )
    y_SH = y_SH if shared is None else shared
    # As the op: K summed in fp32, in a fixed order, rounded once to x's dtype. Written as K pointwise
    # adds, not a reduction: in a graph for every T Inductor tunes a reduction's tiles at the first
    # call's T, and at T = 8192 that one took 318 us where the pointwise kernel takes 100 (NOTES v7).
    y_TKH = L[aten.view.default](y_SH, [T, K, H])
    out_TH = None
    for k in range(K):
        y_TH = L[prims.convert_element_type.default](L[aten.select.int](y_TKH, 1, k), torch.float32)
        out_TH = y_TH if out_TH is None else L[aten.add.Tensor](out_TH, y_TH)
    out_TH = L[prims.convert_element_type.default](out_TH, x.get_dtype())
    num_dropped = L[aten.full.default]([], 0, dtype=torch.int32, device=x.get_device())
    return out_TH, num_dropped
