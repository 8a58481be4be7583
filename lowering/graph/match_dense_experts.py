"""Form 5: every token through every expert, the routing weight on the input rows (Llama 4) ->
``moe_ops.fused_experts``.

transformers' ``Llama4TextMoe`` computes (post-grad, views aside)::

    top, ids  = topk(logits, K, dim=1)
    scores    = chain(full((T, E), -inf).scatter(1, ids, top))       chain: sigmoid and casts, elementwise
    routed_in = x.repeat(E, 1) * scores.T.reshape(E * T, 1)          row e*T + t is x[t] * scores[t, e]
    gate_up   = bmm(routed_in.view(E, T, H), W_gu)                   W_gu (E, H, 2F): the op's "EHF" layout
    h         = act(gate_up)                                         up * silu(gate) on the halves
    out       = bmm(h, W_d).view(E, T, H).sum(0)                     W_d (E, F, H)

Why this is the op: ``chain(-inf)`` is evaluated here and must be exactly 0, so an expert that a token
did not choose reads the row ``0 * x[t]``. Where that row is finite, each product in its two GEMMs is
±0 and it adds ±0 to the sum. The sum is then that of the K chosen experts' outputs, each on the row
``x[t] * chain(top[t, k])`` (rounded to x's dtype, as the plain code rounds it) and rounded to x's dtype
itself, added in fp32: the op on one row per slot, ``x[t] * chain(top[t, k])`` with a routing weight of 1
(with K = 1 the token rows, scaled), each token's K rows summed (experts_rewrite.replace). A row of x that
holds an inf or a NaN makes every expert's rows NaN in the plain code (inf * 0); the rewrite adds
``sum(x[t] * 0)`` (±0 for a finite row, NaN for such a row) to the op's output, so that row is NaN there
too. In a training graph it also adds ``moe_ops::unchosen_expert_gradients`` (zeros): its backward gives the
expert weights the NaN that the unchosen rows give their gradients in the plain code (moe_ops/unchosen_experts.py).
Only the sign of a zero output, and for K > 1 the order of an fp32 sum of K values, can differ, given
finite expert weights: a NaN or inf in an expert's weights makes the plain code's rows of every token that did
not choose that expert NaN (0 * inf in its GEMMs), the rewrite's only the rows of the tokens routed to it.
Telling the two apart would read every expert's weights on every call, the traffic the rewrite exists to save;
docs/index.md (form 5) states the assumption.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator

from torch.fx import Graph, Node

from moe_ops.lowering.graph.experts_rewrite import ExpertsMatch, match_any_activation
from moe_ops.lowering.graph.fx_match import VIEWS, Rejected, aten, is_call, prims, same_size, val

# Ops that reorganise a tensor without reordering its elements in row-major order.
_RESHAPES = (*VIEWS, aten.clone.default, aten.unsqueeze.default)
# Elementwise ops allowed between the scatter of the chosen logits and the scores.
_SCORE_CHAIN = (prims.convert_element_type.default, aten.sigmoid.default)
_MAX_ACTIVATION_DEPTH = 64


def _value(node):
    """The node's fake value; Rejected where the graph recorded none (nothing can be checked then)."""
    value = val(node)
    if value is None:
        raise Rejected(f"{getattr(node, 'name', node)} has no recorded value")
    return value


def _through_reshapes(node: Node) -> tuple[Node, list[Node]]:
    """Walk back through order-preserving reshapes: (the first other node, the reshapes passed)."""
    passed = []
    while any(is_call(node, target) for target in _RESHAPES):
        passed.append(node)
        node = node.args[0]
    return node, passed


def _gate_up_gemm(h: Node) -> Node:
    """The one bmm that the activation ``h`` is computed from (walking back through its inputs)."""
    found, seen, frontier = set(), set(), [h]
    while frontier and len(seen) < _MAX_ACTIVATION_DEPTH:
        node = frontier.pop()
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if is_call(arg, aten.bmm.default):
                found.add(arg)
            elif arg.op == "call_function":
                frontier.append(arg)
    if len(found) != 1:
        raise Rejected(f"{h.name} is not an activation of one gate/up bmm")
    return found.pop()


def _scores_chain(scores: Node) -> tuple[list[Node], Node]:
    """``scores`` = elementwise chain applied to ``full(-inf).scatter(1, ids, top)``: (the chain's nodes in
    forward order, the scatter). The chain's value at -inf must be exactly 0."""
    chain = []
    node = scores
    while any(is_call(node, t) for t in _SCORE_CHAIN) and not node.kwargs:
        chain.append(node)
        node = node.args[0]
    if not (is_call(node, aten.scatter.src) and node.args[1] in (1, -1)):
        raise Rejected(f"the scores {scores.name} are not a chain of casts and sigmoid over a scatter of the top-k")
    base = node.args[0]
    if not (is_call(base, aten.full.default) and base.args[1] == float("-inf")):
        raise Rejected(f"the scores {scores.name} scatter the top-k into something other than a tensor of -inf")
    # The chain's value at -inf, in Python (the pass may run under a fake mode): a cast to a floating dtype
    # keeps -inf, 0 and 1/2 as they are; a sigmoid maps -inf to 0 and 0 to 1/2.
    value = float("-inf")
    for link in reversed(chain):
        if link.target is aten.sigmoid.default:
            value = 1.0 / (1.0 + math.exp(-value)) if value != float("-inf") else 0.0
        elif not link.args[1].is_floating_point:
            raise Rejected(f"the scores {scores.name} are cast to {link.args[1]}")
    if value != 0.0:
        raise Rejected(f"the scores {scores.name} of an expert not chosen are {value}, not 0")
    return chain[::-1], node


def _match(root: Node) -> ExpertsMatch:
    region: set[Node] = {root}
    summed, reshapes = _through_reshapes(root.args[0])
    region.update(reshapes)
    if list(root.args[1]) != [0] or (len(root.args) > 2 and root.args[2]) or root.kwargs:
        raise Rejected(f"{root.name} is not a sum over the experts' dim 0")
    if not is_call(summed, aten.bmm.default) or tuple(_value(summed).shape) != tuple(_value(root.args[0]).shape):
        raise Rejected(f"{root.name} does not sum the (E, T, H) output of a down-projection bmm")
    down, w_down = summed, summed.args[1]
    E, T, H = _value(down).shape
    h = down.args[0]
    gate_up = _gate_up_gemm(h)
    for form in ("concat", "interleaved"):
        try:
            activation, act_nodes, constants = match_any_activation(h, [gate_up], form)
            break
        except Rejected:
            if form == "interleaved":
                raise
    region |= act_nodes | {down, gate_up}
    w_gate_up = gate_up.args[1]
    routed, reshapes = _through_reshapes(gate_up.args[0])
    region.update(reshapes)
    if not (is_call(routed, aten.mul.Tensor) and len(routed.args) == 2 and not routed.kwargs):
        raise Rejected(f"the gate/up bmm {gate_up.name} does not read rows scaled by their scores")
    region.add(routed)
    sides = [(*_through_reshapes(rows), column) for rows, column in (routed.args, routed.args[::-1])
             if isinstance(rows, Node)]
    sides = [s for s in sides if is_call(s[0], aten.repeat.default) and list(s[0].args[1]) == [E, 1]]
    if not sides:
        raise Rejected(f"{routed.name} does not scale x.repeat(E, 1)")
    repeated, row_views, column = sides[0]
    x = repeated.args[0]
    if _value(x).dim() != 2 or not same_size(_value(x).shape[0], T) or not same_size(_value(x).shape[1], H):
        raise Rejected(f"{repeated.name} does not repeat the (T, H) tokens E times")
    region.update([repeated, *row_views])
    transposed, column_views = _through_reshapes(column)
    if not (is_call(transposed, aten.permute.default) and list(transposed.args[1]) == [1, 0]):
        raise Rejected(f"the scale {getattr(column, 'name', column)} is not the scores transposed, one per row "
                       "of x.repeat(E, 1)")
    scores = transposed.args[0]
    if tuple(_value(column).shape)[1:] != (1,) or _value(scores).dim() != 2 or _value(scores).shape[1] != E:
        raise Rejected(f"the scale {column.name} is not a (E*T, 1) column of (T, E) scores")
    if _value(scores).dtype != _value(x).dtype or _value(routed).dtype != _value(x).dtype:
        raise Rejected(f"the scores {scores.name} are {_value(scores).dtype}, x is {_value(x).dtype}")
    chain, scatter = _scores_chain(scores)
    region.update([transposed, *column_views, scores, *chain, scatter, scatter.args[0]])
    ids, top = scatter.args[2], scatter.args[3]
    topk = ids.args[0] if is_call(ids, operator.getitem) else None
    if not (is_call(topk, aten.topk.default) and is_call(top, operator.getitem)
            and top.args[0] is topk and top.args[1] == 0 and ids.args[1] == 1
            and (topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)) in (1, -1)
            and tuple(_value(topk.args[0]).shape) == tuple(_value(scores).shape)):
        raise Rejected(f"the scattered scores {scatter.name} are not one top-k's values at its indices, over "
                       "each token's experts")
    return ExpertsMatch(
        form="dense_input_scaled", result=root, region=region, x=x, topk_weights=top, topk_ids=ids,
        w_gate_up=w_gate_up, w_down=w_down, layout="EHF", interleaved=form == "interleaved",
        activation=activation, gated=True, input_scale_chain=chain, **constants,
        notes=["input rows scaled by the routing weight"],
    )


def find_dense_input_scaled_blocks(graph: Graph) -> Iterator[Callable[[], ExpertsMatch]]:
    """Candidates: a sum over dim 0 of a bmm's (E, T, H) output; each call matches one or raises Rejected."""
    for node in list(graph.nodes):
        if is_call(node, aten.sum.dim_IntList) and val(node.args[0]) is not None and val(node.args[0]).dim() == 3:
            yield lambda root=node: _match(root)
