"""Form 1: transformers 5.x's default experts (``experts_implementation="grouped_mm"``).

What ``grouped_mm_experts_forward`` becomes post-grad (S = T*K slots; ``where(m, 0, y)`` is the
functionalised ``masked_fill`` of the expert-parallel sentinel rows, ids >= E):

    ids_g, perm = sort(ids_TK.view(-1))                      sentinel m = (ids_g >= E)[:, None]
    offs  = cumsum(histc(ids_g.float() | .int(), E, 0, E-1), dtype=int32)
    xg    = where(m, 0, x[perm // K])
    gu    = where(m, 0, grouped_mm(xg, W_gu^T | W_gu, offs) [+ b_gu[clamp(ids_g, max=E-1)]])
    h     = act(gu)                                          concatenated or interleaved gate/up, or ungated
    y     = where(m, 0, grouped_mm(h, W_d^T | W_d, offs) [+ b_d[...]]) * w_TK.view(-1)[perm][:, None]
    out   = y[inv].view(T, K, H).sum(1),  inv = empty(S).index_put([perm], arange(S))

with ``transformers::grouped_mm_fallback`` in place of ``_grouped_mm`` when the weights are not bf16.
That is ``out[t] = sum_j w[t, j] * down_e(act(gate_up_e(x[t])))`` over the slots whose id e < E:
``moe_ops.fused_experts`` with the same weights ("EFH" for (E, 2F, H) weights, transposed to "EHF").
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator

import torch
from torch.fx import Graph, Node

from moe_ops.activations import CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT
from moe_ops.lowering.graph.experts_rewrite import ExpertsMatch, match_any_activation
from moe_ops.lowering.graph.fx_match import (
    Rejected,
    arg,
    aten,
    ids_bound,
    is_call,
    is_view_call,
    prims,
    same_size,
    shape,
    val,
    with_registered_op,
)


def _grouped_mm_targets() -> tuple:
    return with_registered_op(aten._grouped_mm.default, "transformers", "grouped_mm_fallback")


def _is_grouped_mm(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in _grouped_mm_targets()


def _is_zero(node) -> bool:
    if isinstance(node, (int, float)):
        return node == 0
    return is_call(node, aten.full.default) and list(node.args[0]) == [] and node.args[1] == 0


def _single_index(node) -> Node | None:
    """``t[i]`` (aten.index with one index tensor) -> i."""
    if is_call(node, aten.index.Tensor) and len(node.args[1]) == 1:
        return node.args[1][0]
    return None


def _unmask(node: Node, mask: Node | None, region: set[Node]) -> Node:
    """``where(mask, 0, y)`` -> y (the sentinel rows zeroed); the mask must be the block's."""
    if is_call(node, aten.where.self) and node.args[0] is mask and _is_zero(node.args[1]):
        region.add(node)  # the mask is checked by the caller; a shared zero constant may stay
        return node.args[2]
    raise Rejected(f"{node.name} is not the sentinel rows of {node.name} zeroed")


def _expert_weight(view: Node) -> tuple[Node, str, set[Node]]:
    """A grouped_mm's (E, in, out) weight operand -> (the parameter, its layout, nodes in between)."""
    if is_call(view, aten.permute.default) and list(view.args[1]) in ([0, 2, 1], [0, -1, -2]):
        return view.args[0], "EFH", {view}
    if is_call(view, aten.transpose.int) and sorted(d % 3 for d in view.args[1:3]) == [1, 2]:
        return view.args[0], "EFH", {view}
    return view, "EHF", set()


def _bias(gemm_out: Node, ids_sorted: Node, num_experts: int, region: set[Node]) -> tuple[Node, Node | None]:
    """``grouped_mm(...) + b[clamp(ids_g, max=E-1)]`` -> (the grouped_mm, b); no add -> (node, None)."""
    if not is_call(gemm_out, aten.add.Tensor) or gemm_out.kwargs:
        return gemm_out, None
    gemm, gathered = gemm_out.args
    if not _is_grouped_mm(gemm):
        gemm, gathered = gathered, gemm
    clamped = _single_index(gathered)
    if not (
        _is_grouped_mm(gemm)
        and is_call(clamped, aten.clamp_max.default)
        and clamped.args[0] is ids_sorted
        and clamped.args[1] == num_experts - 1
    ):
        raise Rejected(f"{gemm_out.name} adds something other than a per-expert bias")
    region.update((gemm_out, gathered, clamped))
    return gemm, gathered.args[0]


def _match(total: Node) -> ExpertsMatch:
    region: set[Node] = {total}
    # out = y[inv].view(T, K, H).sum(1)
    if list(total.args[1]) != [1] or arg(total, 2, "keepdim", False) or arg(total, 3, "dtype", None) is not None:
        raise Rejected("not a sum over the K slots")
    viewed = total.args[0]
    unpermuted = viewed.args[0] if is_view_call(viewed) else None
    if not (is_call(unpermuted, aten.index.Tensor) and len(unpermuted.args[1]) == 1):
        raise Rejected("the summed slots are not gathered back to token order")
    region.update((viewed, unpermuted))
    y, (inverse,) = unpermuted.args
    if not is_call(inverse, aten.index_put.default) or arg(inverse, 3, "accumulate", False):
        raise Rejected("the slot order is not undone by an inverse permutation")
    empty, (perm,), positions = inverse.args[:3]
    num_slots = val(perm).shape[0]
    if not (
        is_call(empty, aten.empty.memory_format)
        and is_call(positions, prims.iota.default)
        and arg(positions, 1, "start", 0) == 0
        and arg(positions, 2, "step", 1) == 1
        and same_size(positions.args[0], num_slots)
        and same_size(shape(empty)[0], num_slots)
    ):
        raise Rejected("the inverse permutation is not inv[perm] = arange(S)")
    region.update((inverse, empty, positions))

    # perm: the slots sorted by expert id
    sort = perm.args[0] if is_call(perm, operator.getitem) and perm.args[1] == 1 else None
    if not (is_call(sort, aten.sort.default) or is_call(sort, aten.sort.stable)):
        raise Rejected("the permutation does not come from sorting the ids")
    dim, descending = (
        (arg(sort, 1, "dim", -1), arg(sort, 2, "descending", False))
        if sort.target is aten.sort.default
        else (sort.kwargs.get("dim", -1), sort.kwargs.get("descending", False))
    )
    if dim not in (0, -1) or descending:
        raise Rejected("the ids are not sorted ascending")
    flat_ids = sort.args[0]
    sorted_ids = [u for u in sort.users if is_call(u, operator.getitem) and u.args[1] == 0]
    if not is_view_call(flat_ids) or len(sorted_ids) != 1 or len(sort.users) != 2:
        raise Rejected("the sorted ids are not the flattened (T, K) ids")
    (ids_sorted,) = sorted_ids
    topk_ids = flat_ids.args[0]
    num_tokens, top_k = shape(topk_ids) if val(topk_ids).dim() == 2 else (None, None)
    if top_k is None or not same_size(num_tokens * top_k, num_slots):
        raise Rejected("the ids are not (T, K)")
    ids_below = ids_bound(topk_ids)
    if ids_below is None:
        # An id >= E meets the sentinel mask below in both; a negative one the plain code sorts first and counts
        # in no expert's group (every later row then reads another expert's), where fused_experts routes it to
        # no expert.
        raise Rejected(f"the ids ({topk_ids.name}) are not shown to be >= 0 (a top-k's, max's or moe_ops.route's "
                       "indices in this graph)")
    region.update((sort, flat_ids, ids_sorted, perm))

    # y = where(m, 0, down) * w_TK.view(-1)[perm][:, None]
    if not is_call(y, aten.mul.Tensor) or len(y.args) != 2:
        raise Rejected("the slot outputs are not multiplied by their routing weights")
    region.add(y)
    down_masked, slot_weights = y.args if is_call(y.args[0], aten.where.self) else y.args[::-1]
    if not is_call(down_masked, aten.where.self):
        raise Rejected("the down projection's sentinel rows are not zeroed")
    mask = down_masked.args[0]
    flat_weights = None
    if is_call(slot_weights, aten.unsqueeze.default) and slot_weights.args[1] in (-1, 1):
        gathered = slot_weights.args[0]
        if is_call(gathered, aten.index.Tensor) and list(gathered.args[1]) == [perm]:
            flat_weights = gathered.args[0]
            region.update((slot_weights, gathered))
    if not is_view_call(flat_weights) or val(flat_weights.args[0]).dim() != 2:
        raise Rejected("the routing weights are not the (T, K) weights in slot order")
    region.add(flat_weights)
    topk_weights = flat_weights.args[0]

    # m = (ids_g >= E)[:, None]
    ge = mask.args[0] if is_call(mask, aten.unsqueeze.default) and mask.args[1] in (-1, 1) else None
    if not (is_call(ge, aten.ge.Scalar) and ge.args[0] is ids_sorted and isinstance(ge.args[1], int)):
        raise Rejected("the sentinel mask is not ids_g >= E")
    num_experts = ge.args[1]
    region.update((mask, ge))

    down_out = _unmask(down_masked, mask, region)
    down, b_down = _bias(down_out, ids_sorted, num_experts, region)
    if not _is_grouped_mm(down):
        raise Rejected("the down projection is not a grouped_mm")
    region.add(down)
    h, w_down_view, offsets = down.args[:3]
    w_down, down_layout, between = _expert_weight(w_down_view)
    region |= between

    # offs = cumsum(histc(ids_g, E, 0, E-1), dtype=int32)
    histc = offsets.args[0] if is_call(offsets, aten.cumsum.default) and offsets.args[1] in (0, -1) else None
    counted = histc.args[0] if is_call(histc, aten.histc.default) else None
    if is_call(counted, prims.convert_element_type.default) and counted.args[1] in (torch.int32, torch.float32):
        region.add(counted)
        counted = counted.args[0]
    if not (
        counted is ids_sorted
        and offsets.kwargs.get("dtype") == torch.int32
        and list(histc.args[1:4]) == [num_experts, 0, num_experts - 1]
    ):
        raise Rejected("the group offsets are not cumsum(histc(ids_g, bins=E, min=0, max=E-1))")
    region.update((offsets, histc))

    # the gate_up projection and the activation between the two
    gemm_users = [n for n in offsets.users if _is_grouped_mm(n) and n is not down]
    if len(gemm_users) != 1:
        raise Rejected("not exactly two grouped_mms share the offsets")
    (gate_up,) = gemm_users
    masked_users = list(gate_up.users)
    gate_up_out = masked_users[0] if len(masked_users) == 1 else gate_up
    gate_up_bias = None
    if is_call(gate_up_out, aten.add.Tensor):
        gate_up_out_bias = gate_up_out
        gate_up, gate_up_bias = _bias(gate_up_out_bias, ids_sorted, num_experts, region)
        gate_up_out = next(iter(gate_up_out_bias.users)) if len(gate_up_out_bias.users) == 1 else None
    if not is_call(gate_up_out, aten.where.self):
        raise Rejected("the gate_up projection's sentinel rows are not zeroed")
    activated_input = gate_up_out
    _unmask(gate_up_out, mask, region)
    region.add(gate_up)
    xg_masked, w_gate_up_view = gate_up.args[:2]
    w_gate_up, layout, between = _expert_weight(w_gate_up_view)
    region |= between
    if layout != down_layout:
        raise Rejected("gate_up and down weights in different layouts")
    # Gate and up interleaved (sliced), concatenated (split), or no gate at all: transformers' experts
    # without one (NemotronH: up_proj, act_fn, down_proj) read the projection whole, run as gated=False.
    forms = ("interleaved",) if any(is_call(u, aten.slice.Tensor) for u in activated_input.users) else (
        "concat", "ungated")
    for gate_up_form in forms:
        try:
            activation, act_nodes, constants = match_any_activation(h, [activated_input], gate_up_form)
            break
        except Rejected:
            if gate_up_form == forms[-1]:
                raise
    region |= act_nodes

    # xg = where(m, 0, x[perm // K])
    gathered_x = _unmask(xg_masked, mask, region)
    token_of_slot = _single_index(gathered_x)
    if not (
        is_call(token_of_slot, aten.div.Tensor_mode)
        and token_of_slot.args[0] is perm
        and token_of_slot.args[1] == top_k
        and token_of_slot.kwargs.get("rounding_mode") == "floor"
    ):
        raise Rejected("the slots do not read their tokens' rows (x[perm // K])")
    region.update((gathered_x, token_of_slot))
    x = gathered_x.args[0]

    # fp32 routing weights (Mixtral, DeepSeek-V3) make the slot outputs fp32: the sum is cast back.
    result = total
    if val(total).dtype != val(x).dtype and len(total.users) == 1:
        (cast,) = total.users
        if is_call(cast, prims.convert_element_type.default) and cast.args[1] == val(x).dtype:
            result = cast
            region.add(cast)

    return ExpertsMatch(
        form="hf_grouped_mm" if down.target is aten._grouped_mm.default else "hf_grouped_mm_fallback",
        result=result, region=region, x=x, topk_weights=topk_weights, topk_ids=topk_ids,
        w_gate_up=w_gate_up, w_down=w_down, b_gate_up=gate_up_bias, b_down=b_down, layout=layout,
        interleaved=gate_up_form == "interleaved", activation=activation, gated=gate_up_form != "ungated",
        alpha=constants.get("alpha", CLAMPED_SWIGLU_ALPHA), limit=constants.get("limit", CLAMPED_SWIGLU_LIMIT),
        sentinel_from=num_experts if ids_below > num_experts else None,
    )


def find_grouped_mm_blocks(graph: Graph) -> Iterator[Callable[[], ExpertsMatch]]:
    """Candidates: sums over dim 1 of a (T, K, H) tensor; each call matches one or raises Rejected."""
    for node in list(graph.nodes):
        if is_call(node, aten.sum.dim_IntList) and val(node.args[0]) is not None and val(node.args[0]).dim() == 3:
            yield lambda total=node: _match(total)
