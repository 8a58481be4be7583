"""Form 3: torchtitan's MoE (``models/common/moe.py`` + ``token_dispatcher.py``, LocalTokenDispatcher).

What ``MoE.forward`` with the EP=1 dispatcher and ``GroupedExperts`` becomes post-grad (S = T*K slots;
``order`` = the slots sorted by expert id, ``tok`` = the token of each sorted slot):

    n     = sum(scatter(full((T, E), False), -1, ids, True), 0)    # routing_map.sum(0)
          | histc(ids_flat | ids_sorted (as float), bins=E, min=0, max=E or E-1)
    offs  = cumsum(n, dtype=int32)
    order = sort(ids.view(-1), stable=True)[1]                    # argsort(stable=True)
    tok   = order // K
    xg    = x[tok]                                                # no .bfloat16() cast: x is bf16
    h     = act(grouped_mm(xg, w1^T, offs), grouped_mm(xg, w3^T, offs))   # silu(g) * u
    y     = grouped_mm(h, w2^T, offs)                             # .type_as(x): no cast
    ys    = (y.float() * w.view(-1)[order].view(-1, 1)).to(x.dtype)
    out   = scatter_add(zeros_like(x), 0, tok.view(-1, 1).expand(-1, D), ys)
            (or torchtitan::deterministic_scatter_add(zeros_like(x), index, ys), a custom op around it)

Why that is ``moe_ops.fused_experts(x, w, ids, w1, w2, w_up=w3, layout="EFH")`` (weights used
untransposed: "EHF"; the activation: any the op computes on separate gate and up, compared node for
node by ``match_any_activation``; torchtitan's is silu):

- grouped_mm gives rows [offs[e-1], offs[e]) to expert e. The rows are the slots sorted by id, so
  row r holds a slot of expert e exactly when offs[e] counts, for every expert, the slots with
  that id. The rewrite requires ``n`` to count the ids that are sorted (the same node), and the
  ids to come from a top-k over the E experts (``aten.topk`` over the last dim of a (T, E) tensor,
  or ``moe_ops.route`` with E logits, where the routing rewrite ran first): then every id is in
  [0, E) and a token's K ids are distinct, so the routing-map count (tokens per expert) and the
  histogram (ids per expert) both equal the slots per expert. Counts of other ids, or ids of
  unknown provenance (a duplicate id in a row is counted once by the routing map; an id outside
  [0, E) falls outside every group) are not rewritten.
- Row r reads x[order[r] // K] and is weighted by w.view(-1)[order[r]]: the token and weight of
  slot order[r] (row-major flattening of (T, K), the same ``order``), and the scatter_add adds it to
  row order[r] // K of zeros, over all D columns (an index of shape (S, D) repeating ``tok``): each
  token's output is the sum of its K weighted slots.
- torchtitan casts x and the weights to bf16 around each grouped_mm; those casts are no-ops only
  when they are bf16 already. A cast in the graph (fp32 model) means the plain code rounds inputs
  that the op would not: not rewritten.

torchtitan's GPT-OSS experts (``models/gpt_oss/moe.py``) in the same MoE: one grouped_mm on the gate and up
weights interleaved, then ``+ cat([b1, zeros]).repeat_interleave(cat([n, S - offs[-1]]), output_size=S)`` (each
row's expert bias: _bias_rows), ``swiglu`` (``addcmul(glu, glu, up)``: the op's clamped_swiglu), the down
grouped_mm plus its bias the same way (behind ``ScaleBiasForward``, a cast at one tensor-parallel rank): the op
with ``b_gate_up``, ``b_down``, ``interleaved=True``. A bias divided for tensor parallelism is not matched.

Rounding: torchtitan rounds each GEMM output to bf16 and adds the K slots in bf16 (scatter_add into a
bf16 zeros); the op keeps the GEMMs and the sum in fp32 (see lowering/graph/experts_rewrite.py).

Not handled (logged): token-group padding. torchtitan (b5bcd76) no longer pads in the local
dispatcher (no ``generate_permute_indices``); it pads groups to a multiple of 16/32 only in
``TorchAOTokenDispatcher`` (quantized grouped GEMMs: torchao's ``permute_and_pad``, an opaque op) and
HybridEP. There the grouped_mm rows are not ``x[tok]`` and the offsets are not the counts' cumsum.
The EP dispatchers (all-to-all) are other forms.
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
    is_call,
    is_view_call,
    prims,
    same_shape,
    same_size,
    shape,
    top_k_scores,
    val,
    with_registered_op,
)


def _scatter_add_targets() -> tuple:
    """``aten.scatter_add`` and, where it is registered, torchtitan's custom op around it (dim 0)."""
    return with_registered_op(aten.scatter_add.default, "torchtitan", "deterministic_scatter_add")


def _is_grouped_mm(node) -> bool:
    return is_call(node, aten._grouped_mm.default)


def _is_constant(node, values) -> bool:
    """``full(size, v)`` with v in ``values`` (``zeros_like`` post-grad)."""
    if is_call(node, aten.full.default):
        return node.args[1] in values
    return is_call(node, aten.zeros.default) and 0 in values


def _is_cast(node) -> bool:
    return is_call(node, prims.convert_element_type.default) or is_call(node, aten._to_copy.default)


def _expert_weight(b: Node, name: str) -> tuple[Node, str, set[Node]]:
    """A grouped_mm's (E, in, out) operand -> (the parameter, its layout, the nodes in between)."""
    if is_call(b, aten.permute.default) and list(b.args[1]) in ([0, 2, 1], [0, -1, -2]):
        weight, layout, between = b.args[0], "EFH", {b}
    elif is_call(b, aten.transpose.int) and sorted(d % 3 for d in b.args[1:3]) == [1, 2]:
        weight, layout, between = b.args[0], "EFH", {b}
    else:
        weight, layout, between = b, "EHF", set()
    if _is_cast(weight):
        raise Rejected(f"{name} is cast to {val(weight).dtype} for the grouped_mm (a rounding the op would skip)")
    if val(weight) is None or val(weight).dim() != 3:
        raise Rejected(f"{name} is not an (E, N, K) tensor")
    return weight, layout, between


def _grouped_mm_args(gemm: Node) -> tuple[Node, Node, Node]:
    a, b = gemm.args[:2]
    offsets = arg(gemm, 2, "offs", None)
    if arg(gemm, 3, "bias", None) is not None or arg(gemm, 4, "out_dtype", None) not in (None, val(a).dtype):
        raise Rejected(f"{gemm.name} has a bias or another output dtype")
    return a, b, offsets


def _whole_number_cast(node) -> bool:
    """A cast to an integer dtype, or of integers to a float dtype: on the token counts and slack _bias_rows reads
    (whole numbers below 2**24, exact in float32, the dtype of histc's counts) it changes no value."""
    if not (_is_cast(node) and val(node) is not None and val(node.args[0]) is not None):
        return False
    return not val(node).dtype.is_floating_point or not val(node.args[0]).dtype.is_floating_point


def _bias_rows(added: Node, gemm: Node, offsets: Node, num_slots, region: set[Node]) -> Node:
    """torchtitan's GPT-OSS experts add each row's expert bias to a grouped_mm's output:
    ``gemm + cat([b, zeros(1, N)]).repeat_interleave(cat([counts, S - offsets[-1]]).long(), output_size=S)``,
    post-grad ``index(cat([b, zeros]), [clamp_max(searchsorted(cumsum(cat([counts, slack])), iota(S), right=True),
    E)])`` (``repeat_interleave(cat([counts, slack]), output_size=S)`` where S is symbolic). Row r gets b[e] for
    the e with offsets[e-1] <= r < offsets[e]: the first E prefix sums are the offsets, and with the slack
    S - offsets[-1] >= 0 the last one, S + slack, is past every row (the slack is 0 here: the counts are the S
    slots'), so the zero row is never read. ``added`` is ``gemm`` (the grouped_mm) plus the rows; returns b,
    Rejected for anything else added."""
    rejected = Rejected(f"{added.name} adds something other than each row's expert bias to the grouped_mm")
    if added.kwargs or gemm not in added.args:
        raise rejected
    rows = added.args[1] if added.args[0] is gemm else added.args[0]
    if not (is_call(rows, aten.index.Tensor) and len(rows.args[1]) == 1):
        raise rejected
    counts, num_experts = offsets.args[0], shape(offsets)[0]
    nodes = [added, rows]
    # rows = cat([b, zeros(1, N)])[index]
    table, (index,) = rows.args
    if not (is_call(table, aten.cat.default) and arg(table, 1, "dim", 0) in (0, -2) and len(table.args[0]) == 2):
        raise rejected
    bias, zero_row = table.args[0]
    if not (val(bias).dim() == 2 and same_shape(shape(bias), (num_experts, shape(gemm)[1]))
            and _is_constant(zero_row, (0, 0.0)) and same_size(shape(zero_row)[0], 1)):
        raise rejected
    nodes += [table, zero_row]
    if is_call(index, aten.repeat_interleave.Tensor):
        # A symbolic S keeps the op: repeat_interleave(repeats, output_size=S)
        if not same_size(arg(index, 1, "output_size", None), num_slots):
            raise rejected
        nodes.append(index)
        repeats = index.args[0]
    else:
        # index = clamp_max(searchsorted(prefix, iota(S), right=True), >= E - 1), prefix = cumsum(repeats)
        if is_call(index, aten.clamp_max.default):
            if not (isinstance(index.args[1], int) and index.args[1] >= num_experts - 1):
                raise rejected
            nodes.append(index)
            index = index.args[0]
        if not (is_call(index, aten.searchsorted.Tensor) and not arg(index, 2, "out_int32", False)
                and (arg(index, 3, "right", False) or arg(index, 4, "side", None) == "right")):
            raise rejected
        prefix, positions = index.args[:2]
        if not (is_call(positions, prims.iota.default) and arg(positions, 1, "start", 0) == 0
                and arg(positions, 2, "step", 1) == 1 and same_size(positions.args[0], num_slots)):
            raise rejected
        if not (is_call(prefix, aten.cumsum.default) and prefix.args[1] in (0, -1)):
            raise rejected
        nodes += [index, positions, prefix]
        repeats = prefix.args[0]
    # repeats = cat([counts, slack]), each maybe cast
    if _whole_number_cast(repeats):
        nodes.append(repeats)
        repeats = repeats.args[0]
    if not (is_call(repeats, aten.cat.default) and arg(repeats, 1, "dim", 0) in (0, -1) and len(repeats.args[0]) == 2):
        raise rejected
    nodes.append(repeats)
    first, slack = repeats.args[0]
    for node in (first, slack):
        if _whole_number_cast(node):
            nodes.append(node)
    first, slack = (node.args[0] if _whole_number_cast(node) else node for node in (first, slack))
    # slack = (S - offsets[-1]).unsqueeze(0)
    difference = slack.args[0] if is_call(slack, aten.unsqueeze.default) and slack.args[1] in (0, -1) else None
    last = (difference.args[1] if is_call(difference, aten.sub.Tensor) and same_size(difference.args[0], num_slots)
            else None)
    if not (first is counts and is_call(last, aten.select.int) and last.args[0] is offsets
            and last.args[1] in (0, -1) and last.args[2] in (-1, num_experts - 1)):
        raise rejected
    nodes += [slack, difference, last]
    if val(bias).dtype != val(gemm).dtype:
        raise Rejected(f"the bias is {val(bias).dtype}, the grouped_mm {val(gemm).dtype}")
    region.update(nodes)
    return bias


def _ids_from_top_k(ids: Node, num_experts: int) -> None:
    """``ids`` are a top-k over the last dim of (T, E) scores: in [0, E), distinct along each row."""
    found = top_k_scores(ids)
    if found is not None:
        scores, dim = val(found[0]), found[1]
        if scores.dim() == 2 and dim in (-1, 1) and same_size(scores.shape[1], num_experts):
            return
    raise Rejected(
        f"the ids ({ids.name}) are not a top-k over the {num_experts} experts: their counts need not be "
        "the slots per expert (a repeated id in a row is counted once, an id outside [0, E) in no group)"
    )


def _counts_region(offsets: Node, ids: Node, flat_ids: Node, sort: Node, num_experts: int) -> set[Node]:
    """``offsets`` = cumsum of the per-expert counts of ``ids``; returns the nodes computing them."""
    if not (
        is_call(offsets, aten.cumsum.default)
        and offsets.args[1] in (0, -1)
        and offsets.kwargs.get("dtype", val(offsets).dtype) == torch.int32
        and val(offsets).dim() == 1
    ):
        raise Rejected("the group offsets are not a cumsum (int32) of per-expert counts")
    counts = offsets.args[0]
    if not same_shape(shape(counts), (num_experts,)):
        raise Rejected(f"the group offsets do not hold one count per expert (E={num_experts})")
    nodes = {offsets, counts}

    # routing_map = zeros_like(scores, dtype=bool).scatter_(-1, ids, True); counts = routing_map.sum(0)
    if is_call(counts, aten.sum.dim_IntList):
        routing_map = counts.args[0]
        if not (
            list(counts.args[1]) in ([0], [-2])
            and not arg(counts, 2, "keepdim", False)
            and is_call(routing_map, aten.scatter.value)
            and val(routing_map).dim() == 2
            and routing_map.args[1] in (-1, 1)
            and routing_map.args[3] in (True, 1)
            and _is_constant(routing_map.args[0], (False, 0))
            and same_size(shape(routing_map)[1], num_experts)
        ):
            raise Rejected("the counts are not routing_map.sum(0), routing_map = zeros.scatter(-1, ids, True)")
        if routing_map.args[2] is not ids:
            raise Rejected("the counts are of other ids than the sorted ones")
        return nodes | {routing_map}

    # counts = histc(ids.view(-1).float(), bins=E, min=0, max=E-1 | E)  (or of the sorted ids)
    if is_call(counts, aten.histc.default):
        counted = counts.args[0]
        bins, low, high = (arg(counts, i, name, d) for i, name, d in ((1, "bins", 100), (2, "min", 0), (3, "max", 0)))
        if not (bins == num_experts and low == 0 and high in (num_experts - 1, num_experts) and high > low):
            raise Rejected(f"the histogram is not bins=E={num_experts}, min=0, max=E-1 or E")
        if _is_cast(counted):
            if val(counted).dtype not in (torch.float32, torch.float64):  # exact for ids < 2**24
                raise Rejected(f"the ids are counted as {val(counted).dtype} (not exact for every id)")
            nodes.add(counted)
            counted = counted.args[0]
        flat_of_ids = is_view_call(counted) and counted.args[0] is ids and val(counted).dim() == 1
        sorted_ids = is_call(counted, operator.getitem) and counted.args[0] is sort and counted.args[1] == 0
        if not (counted is flat_ids or flat_of_ids or sorted_ids):
            raise Rejected("the counts are of other ids than the sorted ones")
        return nodes | {counted}
    raise Rejected("the counts are neither a routing-map sum nor a histc of the ids")


def _match(combine: Node) -> ExpertsMatch:
    region: set[Node] = {combine}
    if combine.target is aten.scatter_add.default:
        base, dim, index, weighted = combine.args[:4]
        if dim not in (0, -2):
            raise Rejected("the scatter_add is not over dim 0 (tokens)")
    else:  # torchtitan::deterministic_scatter_add(out, index, src): out.scatter_add(0, index, src)
        base, index, weighted = combine.args[:3]
    if not _is_constant(base, (0, 0.0, False)) or val(base).dim() != 2:
        raise Rejected("the slot outputs are not scattered into a (T, D) zeros")
    num_tokens, hidden = shape(base)

    # index = tok.view(-1, 1).expand(-1, D): row i of every column goes to token tok[i]
    column = index.args[0] if is_call(index, aten.expand.default) else None
    if not (column is not None and same_shape(shape(index), shape(weighted)) and same_size(shape(index)[1], hidden)):
        raise Rejected("the scatter index is not one token per slot row, expanded over all D columns")
    if is_call(column, aten.unsqueeze.default) and column.args[1] in (1, -1):
        tok = column.args[0]
    elif is_view_call(column) and len(shape(column)) == 2 and same_size(shape(column)[1], 1):
        tok = column.args[0]
    else:
        raise Rejected("the scatter index is not tok[:, None]")
    if val(tok).dim() != 1:
        raise Rejected("the scatter index is not tok[:, None] of a 1-D tok")
    region.update((index, column))

    # tok = order // K, order = argsort(ids.view(-1))
    if not (
        (is_call(tok, aten.div.Tensor_mode) and tok.kwargs.get("rounding_mode") == "floor")
        or is_call(tok, aten.floor_divide.default)
    ):
        raise Rejected("the slot rows do not map to their tokens by order // K")
    order, top_k = tok.args[:2]
    sort = order.args[0] if is_call(order, operator.getitem) and order.args[1] == 1 else None
    if not (is_call(sort, aten.sort.default) or is_call(sort, aten.sort.stable)):
        raise Rejected("the slot order does not come from sorting the ids")
    if sort.target is aten.sort.default:
        dim, descending = arg(sort, 1, "dim", -1), arg(sort, 2, "descending", False)
    else:
        dim, descending = sort.kwargs.get("dim", -1), sort.kwargs.get("descending", False)
    flat_ids = sort.args[0]
    if dim not in (0, -1) or descending or not is_view_call(flat_ids):
        raise Rejected("the slot order is not the ascending sort of the flattened ids")
    ids = flat_ids.args[0]
    if not isinstance(top_k, int) or val(ids).dim() != 2 or val(flat_ids).dim() != 1 or shape(ids)[1] != top_k:
        raise Rejected("the sorted ids are not (T, K) with tok = order // K")
    num_slots = shape(flat_ids)[0]
    if not same_size(shape(tok)[0], num_slots):
        raise Rejected("the scattered rows are not the T*K slots")
    region.update((tok, order, sort, flat_ids))
    region.update(u for u in sort.users if is_call(u, operator.getitem))

    # weighted = (y.float() * w.view(-1)[order].view(-1, 1)).to(x.dtype)
    product = weighted
    if _is_cast(product):
        region.add(product)
        product = product.args[0]
    operands = product.args if is_call(product, aten.mul.Tensor) else ()
    if not (len(operands) == 2 and all(isinstance(operand, Node) for operand in operands)):
        raise Rejected("the slot outputs are not multiplied by their routing weights")
    region.add(product)
    topk_weights = down = None
    for scores, y in (product.args, product.args[::-1]):
        gathered = scores.args[0] if is_view_call(scores) or is_call(scores, aten.unsqueeze.default) else None
        if not (is_call(gathered, aten.index.Tensor) and list(gathered.args[1]) == [order]):
            continue
        flat_weights = gathered.args[0]
        if not (same_shape(shape(scores), (num_slots, 1)) and is_view_call(flat_weights)):
            continue
        if val(flat_weights).dim() != 1 or val(flat_weights.args[0]).dim() != 2:
            continue
        region.update((scores, gathered, flat_weights))
        topk_weights = flat_weights.args[0]
        if _is_cast(y) and val(y).dtype == torch.float32:
            region.add(y)
            y = y.args[0]
        down = y
        break
    if topk_weights is None:
        raise Rejected("the slot outputs are not multiplied by the (T, K) weights in slot order")

    # y = grouped_mm(h, w2^T, offs) (+ each row's expert bias: GPT-OSS)
    biased_down = down if is_call(down, aten.add.Tensor) else None
    if biased_down is not None:
        down = next((n for n in biased_down.args if _is_grouped_mm(n)), down)
    if not _is_grouped_mm(down):
        raise Rejected(f"the weighted slot outputs ({down.name}) are not a grouped_mm (or are cast first)")
    region.add(down)
    h, w_down_view, offsets = _grouped_mm_args(down)
    w_down, layout, between = _expert_weight(w_down_view, "w2")
    region |= between
    num_experts = shape(w_down)[0]

    _ids_from_top_k(ids, num_experts)
    region |= _counts_region(offsets, ids, flat_ids, sort, num_experts)
    b_down = None if biased_down is None else _bias_rows(biased_down, down, offsets, num_slots, region)

    # h = act(grouped_mm(xg, w1^T, offs), grouped_mm(xg, w3^T, offs)), xg = x[tok]; or (GPT-OSS) one grouped_mm on
    # the gate and up weights interleaved, each row's expert bias added, act(gate_up)
    gate_up = [n for n in offsets.users if _is_grouped_mm(n) and n is not down]
    b_gate_up = None
    if len(gate_up) == 1:
        (gemm,) = gate_up
        activated = gemm
        if len(gemm.users) == 1 and is_call(next(iter(gemm.users)), aten.add.Tensor):
            activated = next(iter(gemm.users))
            b_gate_up = _bias_rows(activated, gemm, offsets, num_slots, region)
        gate_up_form = "interleaved" if any(is_call(u, aten.slice.Tensor) for u in activated.users) else "concat"
        activation, act_nodes, constants = match_any_activation(h, [activated], gate_up_form)
    elif len(gate_up) == 2:
        gate_up_form = "separate"
        try:
            activation, act_nodes, constants = match_any_activation(h, gate_up, "separate")
        except Rejected:
            gate_up = gate_up[::-1]
            activation, act_nodes, constants = match_any_activation(h, gate_up, "separate")
    else:
        raise Rejected(f"not two or three grouped_mms share the offsets (w1, w3, w2): {len(gate_up) + 1}")
    region |= act_nodes
    x = None
    weights = []
    for gemm, name in zip(gate_up, ("w1", "w3"), strict=False):
        gathered_x, weight_view, gemm_offsets = _grouped_mm_args(gemm)
        if gemm_offsets is not offsets:
            raise Rejected(f"the {name} grouped_mm has other offsets")
        if _is_cast(gathered_x):
            raise Rejected(f"x is cast to {val(gathered_x).dtype} for the grouped_mm (a rounding the op would skip)")
        if not (is_call(gathered_x, aten.index.Tensor) and list(gathered_x.args[1]) == [tok]):
            raise Rejected("the grouped_mm rows are not x[tok] (padded or otherwise permuted token groups)")
        if x is not None and gathered_x.args[0] is not x:
            raise Rejected("the w1 and w3 grouped_mms read different inputs")
        x = gathered_x.args[0]
        weight, weight_layout, between = _expert_weight(weight_view, name)
        if weight_layout != layout:
            raise Rejected("w1, w3 and w2 in different layouts")
        weights.append(weight)
        region |= between | {gemm, gathered_x}
    if not same_size(shape(x)[0], num_tokens) or not same_size(shape(x)[1], hidden):
        raise Rejected("the output is not x's shape")
    # The op's shapes (grouped_mm alone would let w3's output broadcast against w1's). EFH: w1 (E, F, H), w2
    # (E, H, F); EHF the reverse; a gate and up in one weight have 2F features.
    w1_shape = shape(weights[0])
    features, inputs = (1, 2) if layout == "EFH" else (2, 1)
    num_features = w1_shape[features] if len(weights) == 2 else w1_shape[features] // 2
    down_shape = [w1_shape[0], None, None]
    down_shape[features], down_shape[inputs] = w1_shape[inputs], num_features
    w_up = weights[1] if len(weights) == 2 else None
    if not ((w_up is None or same_shape(w1_shape, shape(w_up))) and same_shape(shape(w_down), tuple(down_shape))
            and (w_up is not None or same_size(num_features * 2, w1_shape[features]))):
        raise Rejected(f"w1 {w1_shape}, w3 {None if w_up is None else shape(w_up)} and w2 {shape(w_down)} are not one "
                       "MLP's shapes")

    return ExpertsMatch(
        form="torchtitan", result=combine, region=region, x=x, topk_weights=topk_weights, topk_ids=ids,
        w_gate_up=weights[0], w_up=w_up, w_down=w_down, b_gate_up=b_gate_up, b_down=b_down, layout=layout,
        interleaved=gate_up_form == "interleaved", activation=activation,
        alpha=constants.get("alpha", CLAMPED_SWIGLU_ALPHA), limit=constants.get("limit", CLAMPED_SWIGLU_LIMIT),
    )


def find_torchtitan_blocks(graph: Graph) -> Iterator[Callable[[], ExpertsMatch]]:
    """Candidates: scatter_adds (and torchtitan::deterministic_scatter_add); each call matches one block
    or raises Rejected."""
    targets = _scatter_add_targets()
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in targets:
            yield lambda combine=node: _match(combine)
