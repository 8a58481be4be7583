"""Form 4: a static loop over the experts, each an MLP of its own weight tensors (``nn.Linear``\\ s).

mistral-inference ``MoeLayer`` and transformers <= 4.47 ``MixtralSparseMoeBlock`` (and the forks and
remote code that copy them) run every expert in turn on the tokens routed to it:

    for i, expert in enumerate(self.experts):                         # mistral-inference
        batch_idx, nth_expert = torch.where(selected_experts == i)
        results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])

    expert_mask = one_hot(selected_experts, E).permute(2, 1, 0)       # transformers <= 4.47
    for expert_idx in range(E):
        idx, top_x = torch.where(expert_mask[expert_idx])
        y = self.experts[expert_idx](hidden_states[None, top_x].reshape(-1, H)) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, y.to(hidden_states.dtype))

with ``expert(x) = w2(silu(w1(x)) * w3(x))``.

**Only with dynamo's capture flags does a graph pass see the loop.** ``torch.where(mask)`` has a
data-dependent size. With the defaults dynamo breaks the graph there, skips the loop's frame and
runs the loop eagerly, compiling only each expert's MLP as a graph of its own: no graph holds the
loop, there is nothing to match, and this form logs nothing. With
``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` (and ``capture_scalar_outputs``),
the loop is unrolled into one graph, E times, post-grad:

    acc_0 = full([T, H], 0)                                           zero-initialised, x's dtype
    t_e, j_e = unbind(nonzero(ids == e), 1)                           mistral: (token, slot) pairs
             | unbind(nonzero(select(permute(one_hot(ids), [2, 1, 0]), 0, e)), 1) reversed   (HF)
    y_e   = [w[t_e, j_e, None] *] mm(act(mm(x[t_e], W1_e^T), mm(x[t_e], W3_e^T)), W2_e^T) [* w[...]] [.to]
    acc_e+1 = index_put(acc_e, [t_e], index(acc_e, [t_e]) + y_e)     mistral: results[t] += y
            | index_put(acc_e, [t_e], y_e, accumulate=True) | index_add(acc_e, 0, t_e, y_e)       (HF)

plus ``sym_size``/``_assert_scalar`` range checks of each ``nonzero``'s unbacked size.

**What is proved before a rewrite.** The chain starts at a zero (T, H) tensor and each link adds one
expert's term at its rows; every link is one of the forms above, reading the same x, routing
weights and ids. For each link: the rows are exactly the slots whose id is e (``ids == e``, or
column e of the one-hot of the ids), ``t_e`` are their tokens and ``j_e`` their slots; the MLP's
input is ``x[t_e]``; the activation between its GEMMs is, node for node, one the op computes
(``match_any_activation``); the output is multiplied by ``w[t_e, j_e]`` (the weight of the same
slot); the link adds it to rows ``t_e``. Over the chain, each e in 0..E-1 occurs exactly once, and
no other term is added. So the result is ``sum_j w[t, j] * MLP_{ids[t, j]}(x[t])`` over the slots
with ids < E: ``moe_ops.fused_experts`` with the expert weights stacked (ids >= E, as when the
router scores more than E experts, are skipped by both). The ids must come from a ``topk`` over the
last dim (or ``moe_ops.route``), so they are >= 0 and distinct within a row: the
``results[t_e] += y`` form writes rows ``t_e`` without accumulating, which is a sum only if no token
occurs twice among them. The intermediates must die in the block (``check``); the nonzero's range
asserts (tautologies) are removed with it, so that no ``nonzero`` (a host sync on the GPU) is left.

**The weights are E separate (F, H) / (H, F) tensors; the op takes stacked (E, F, H) / (E, H, F)
tensors.** The rewrite inserts ``cat([W_0[None], ..., W_{E-1}[None]])`` per projection, a copy of
every expert's weights on **every call**: it reads and writes 3*E*F*H elements (bf16: 12*E*F*H bytes)
and holds them until the op returns. Estimates, H100 at ~3.3 TB/s, not measured (this form has no
GPU run):

    model             E    F      H     stack per layer   the loop at decode (T=1, K=2)
    Mixtral-8x7B      8  14336  4096    5.6 GB, ~1.7 ms   reads 2 experts: 0.7 GB, ~0.2 ms
    DeepSeek-V3     256   2048  7168    45 GB, ~14 ms     reads <= 8 experts
    Qwen3-30B-A3B   128    768  2048    2.4 GB, ~0.7 ms
    OLMoE            64   1024  2048    1.6 GB, ~0.5 ms

Per expert the copy costs ~12*F*H bytes / bandwidth; the loop's own cost per expert, besides its
GEMMs, is a ``nonzero`` with its host sync and ~10 small kernels (tens of microseconds). So the copy
can pay for many small experts (F*H up to ~1e7, e.g. OLMoE, Qwen3-MoE), never for Mixtral-sized
ones, and never at decode, where the loop reads only the K experts hit while the copy reads all E.
Hence the rewrite is **opt-in**: ``moe_ops.config.stack_expert_weights = True``. Off (the default),
a recognised loop is left as it is and logged (INFO) and counted
(``counters["moe_ops"]["expert_loop_not_stacked"]``).

Not done: stacking once at compile time. Frozen weights (``torch._inductor.config.freezing``) are
constants, so the stack could be computed when compiling, but a post-grad pass runs after the FX
graph cache lookup: a constant it creates is not recreated on a cache hit (and would be stale for
another model of the same shapes). Frozen weights reach ``mm`` as constants, not as transposed
weight tensors, and are not matched.

Not matched (left as they are): per-expert biases (``addmm``), the transformers >= 4.48 loop over
``expert_hit`` (not capturable: it reads the hit experts to the host), the DeepSeek reference
(``bincount().tolist()``: a compile error under the capture flags), a one-hot built by ``scatter`` (what
other torch versions' ``one_hot`` may decompose to).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from moe_ops._compat.dynamo import counters, detect_fake_mode
from moe_ops.activations import CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT
from moe_ops.lowering.graph.experts_rewrite import ExpertsMatch, check, match_any_activation
from moe_ops.lowering.graph.fx_match import (
    Rejected,
    arg,
    aten,
    is_call,
    is_view_call,
    prims,
    same_shape,
    same_size,
    top_k_scores,
    val,
)
from moe_ops.settings import config

log = logging.getLogger("moe_ops")

# Nodes that only check the unbacked size of a nonzero: they have side effects (DCE keeps them).
_SIZE_CHECKS = (aten._assert_scalar.default,)
_SIZE_CONSTRAINTS = (aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default)
_SIZE_COMPARISONS = (operator.ge, operator.gt, operator.le, operator.lt, operator.eq)


def _is_zero_fill(node) -> bool:
    """``full(size, 0)`` (zeros / zeros_like post-grad) of a 2-D floating tensor."""
    return (
        is_call(node, aten.full.default)
        and node.args[1] == 0
        and not isinstance(node.args[1], bool)
        and val(node) is not None
        and val(node).dim() == 2
        and val(node).is_floating_point()
    )


@dataclass
class _Link:
    """One expert's term of the chain: ``acc_out = acc_in + scatter(rows, y)``."""

    acc_out: Node
    rows: Node  # t_e: the tokens of the slots routed to expert e
    y: Node  # (n_e, H): what is added at those rows
    region: set[Node] = field(default_factory=set)


@dataclass
class _Expert:
    """One link, read back to the expert and its MLP."""

    expert: int
    ids: Node
    weights: Node  # the (T, K) routing weights
    x: Node
    gate: Node  # the (F, H) (or (2F, H)) weight of the first GEMM, as the model holds it
    up: Node | None  # the (F, H) weight of the second GEMM of a "separate" gated MLP
    down: Node  # (H, F)
    gate_up_form: str
    activation: str
    constants: dict
    size_checks: set[Node]  # the range asserts of the nonzero's size, removed with it
    region: set[Node]


def _link_after(acc: Node) -> _Link | None:
    """The node that adds one expert's term to ``acc``, if ``acc``'s users hold exactly one."""
    links = []
    for user in acc.users:
        if is_call(user, aten.index_add.default) and user.args[0] is acc:
            if user.args[1] not in (0, -2) or arg(user, 4, "alpha", 1) != 1:
                raise Rejected(f"{user.name} is not index_add(acc, 0, rows, y)")
            links.append(_Link(user, user.args[2], user.args[3], {user}))
        elif is_call(user, aten.index_put.default) and user.args[0] is acc:
            indices = user.args[1]
            if len(indices) != 1 or not isinstance(indices[0], Node):
                raise Rejected(f"{user.name} does not index the rows of the accumulator")
            (rows,) = indices
            values = user.args[2]
            if arg(user, 3, "accumulate", False):
                links.append(_Link(user, rows, values, {user}))
                continue
            # results[rows] += y: index_put(acc, [rows], index(acc, [rows]) + y)
            if is_call(values, aten.addmm.default):
                # Inductor folds ``results[rows] += mm(h, W2^T)`` into addmm: an unweighted term.
                raise Rejected(
                    f"the term added by {user.name} is a bare GEMM (addmm), "
                    "not an expert output times its routing weight"
                )
            if not is_call(values, aten.add.Tensor) or len(values.args) != 2 or values.kwargs:
                raise Rejected(f"{user.name} overwrites rows of the accumulator with something other than a sum")
            for read, y in (values.args, values.args[::-1]):
                if is_call(read, aten.index.Tensor) and read.args[0] is acc and list(read.args[1]) == [rows]:
                    links.append(_Link(user, rows, y, {user, values, read}))
                    break
            else:
                raise Rejected(f"{user.name} does not add to the rows it reads (results[rows] += y)")
    if len(links) > 1:
        raise Rejected(f"{acc.name} is updated by more than one node")
    return links[0] if links else None


def _distinct_ids(ids: Node) -> bool:
    """Ids from a top-k over the last dim (torch's or moe_ops.route's): >= 0, distinct within a row."""
    found = top_k_scores(ids)
    return found is not None and val(found[0]) is not None and val(found[0]).dim() == 2 and found[1] in (-1, 1)


def _one_hot_ids(mask: Node, region: set[Node]) -> Node | None:
    """``(ids.unsqueeze(-1) == arange(C)).to(int)`` (``one_hot`` post-grad) -> ids."""
    eq = mask
    if is_call(eq, prims.convert_element_type.default):
        eq = eq.args[0]
    if not is_call(eq, aten.eq.Tensor):
        return None
    for unsqueezed, classes in (eq.args, eq.args[::-1]):
        if (
            is_call(unsqueezed, aten.unsqueeze.default)
            and val(unsqueezed.args[0]).dim() == 2
            and unsqueezed.args[1] in (-1, 2)
            and is_call(classes, prims.iota.default)
            and classes.kwargs.get("start", 0) == 0
            and classes.kwargs.get("step", 1) == 1
        ):
            region.update((mask, eq, unsqueezed, classes))
            return unsqueezed.args[0]
    return None


def _selection(rows: Node, region: set[Node]) -> tuple[Node, int, Node, set[Node]]:
    """The rows ``t_e`` of a link -> (ids, e, the slots ``j_e`` of those rows, the size checks).

    ``t_e, j_e = where(ids == e)`` or ``j_e, t_e = where(one_hot(ids).permute(2, 1, 0)[e])``: the
    (token, slot) pairs whose id is e, each once."""
    if not (is_call(rows, operator.getitem) and is_call(rows.args[0], aten.unbind.int)):
        raise Rejected(f"the rows {rows.name} are not from torch.where(mask)")
    unbind = rows.args[0]
    nonzero = unbind.args[0]
    if arg(unbind, 1, "dim", 0) not in (1, -1) or not is_call(nonzero, aten.nonzero.default):
        raise Rejected(f"the rows {rows.name} are not a column of nonzero(mask)")
    columns = {user.args[1]: user for user in unbind.users if is_call(user, operator.getitem)}
    if len(columns) != 2 or len(unbind.users) != 2:
        raise Rejected(f"{nonzero.name} is not split into its two index columns")
    mask = nonzero.args[0]
    if is_call(mask, aten.eq.Scalar):  # where(ids == e): (token, slot)
        ids, expert, token_column = mask.args[0], mask.args[1], 0
        region.add(mask)
    elif is_call(mask, aten.select.int) and mask.args[1] == 0:  # where(one_hot(ids).permute(2, 1, 0)[e])
        permuted, expert, token_column = mask.args[0], mask.args[2], 1
        one_hot = permuted.args[0] if is_call(permuted, aten.permute.default) else None
        if one_hot is None or list(permuted.args[1]) != [2, 1, 0]:
            raise Rejected(f"{mask.name} is not one expert's (K, T) mask of a one-hot permuted to (E, K, T)")
        region.update((mask, permuted))
        ids = _one_hot_ids(one_hot, region)
        if ids is None:
            raise Rejected(f"{one_hot.name} is not the one-hot of the ids")
    else:
        raise Rejected(f"{nonzero.name} is not where(ids == e) or where(one_hot(ids)[e])")
    if not isinstance(expert, int) or isinstance(expert, bool) or val(ids).dim() != 2:
        raise Rejected(f"{mask.name} does not select one expert of (T, K) ids")
    if val(ids).dtype not in (torch.int32, torch.int64):
        raise Rejected(f"the ids {ids.name} are not integers")
    if columns[token_column] is not rows:
        raise Rejected(f"the rows {rows.name} are the slots, not the tokens, of {nonzero.name}")
    slots = columns[1 - token_column]
    region.update((unbind, nonzero, rows, slots))

    # The unbacked size's range asserts (u >= 0, u <= T*K): checks of what nonzero guarantees.
    size_checks: set[Node] = set()
    for size in nonzero.users:
        if size is unbind:
            continue
        if not (is_call(size, aten.sym_size.int) and size.args[1] == 0):
            raise Rejected(f"{nonzero.name} is also read by {size.name}")
        region.add(size)
        for comparison in size.users:
            if comparison.target in _SIZE_CONSTRAINTS:
                size_checks.add(comparison)
                continue
            checks = comparison.users
            if comparison.target not in _SIZE_COMPARISONS or any(u.target not in _SIZE_CHECKS for u in checks):
                raise Rejected(f"the size of {nonzero.name} is used by {comparison.name}")
            region.add(comparison)
            size_checks.update(comparison.users)
    region |= size_checks
    return ids, expert, slots, size_checks


def _gathered_weight(node: Node, rows: Node, slots: Node, region: set[Node]) -> Node | None:
    """``w[t_e, j_e, None]`` (or ``w[t_e, j_e][:, None]``) of (T, K) weights -> w."""
    if is_call(node, aten.index.Tensor) and list(node.args[1]) == [rows, slots]:
        unsqueezed = node.args[0]
        if is_call(unsqueezed, aten.unsqueeze.default) and unsqueezed.args[1] in (-1, 2):
            weights = unsqueezed.args[0]
            if val(weights).dim() == 2:
                region.update((node, unsqueezed))
                return weights
    if is_call(node, aten.unsqueeze.default) and node.args[1] in (-1, 1):
        gathered = node.args[0]
        if is_call(gathered, aten.index.Tensor) and list(gathered.args[1]) == [rows, slots]:
            weights = gathered.args[0]
            if val(weights).dim() == 2:
                region.update((node, gathered))
                return weights
    return None


def _gathered_x(rows: Node, region: set[Node]) -> tuple[Node, Node]:
    """The rows ``x[t_e]`` (or ``x[None, t_e].reshape(-1, H)``) of (T, H) x -> (x, the gathered rows)."""
    found = []
    for user in rows.users:
        if user in region or not is_call(user, aten.index.Tensor):
            continue
        source, indices = user.args[0], list(user.args[1])
        if indices == [rows] and val(source).dim() == 2:
            found.append((source, user, {user}))
        elif (
            indices == [None, rows]
            and is_call(source, aten.unsqueeze.default)
            and source.args[1] == 0
            and val(source.args[0]).dim() == 2
            and len(user.users) == 1
        ):
            (flat,) = user.users
            x = source.args[0]
            if is_view_call(flat) and same_shape(val(flat).shape, (val(rows).shape[0], val(x).shape[1])):
                found.append((x, flat, {user, source, flat}))
    if len(found) != 1:
        raise Rejected(f"the expert's input is not one gather x[rows] of the rows {rows.name}")
    x, gathered, nodes = found[0]
    region |= nodes
    return x, gathered


def _linear_weight(mm: Node, region: set[Node]) -> Node:
    """``mm(a, W.T)`` (``F.linear`` without bias) -> W."""
    transposed = mm.args[1]
    if is_call(transposed, aten.permute.default) and list(transposed.args[1]) == [1, 0]:
        region.add(transposed)
        return transposed.args[0]
    raise Rejected(f"{mm.name} does not multiply by a transposed weight (F.linear without bias)")


def _expert(link: _Link) -> _Expert:
    region = set(link.region)
    ids, expert, slots, size_checks = _selection(link.rows, region)

    # y = [convert](w[t_e, j_e, None] * down), either operand order
    product = link.y
    if is_call(product, prims.convert_element_type.default):
        region.add(product)
        product = product.args[0]
    if not is_call(product, aten.mul.Tensor) or len(product.args) != 2:
        raise Rejected(f"the term added by {link.acc_out.name} is not an expert output times its routing weight")
    region.add(product)
    weights = down = None
    for gathered, other in (product.args, product.args[::-1]):
        if isinstance(gathered, Node) and weights is None:
            weights, down = _gathered_weight(gathered, link.rows, slots, region), other
    if weights is None:
        raise Rejected(f"{product.name} does not multiply by the routing weights of the expert's slots")
    if not is_call(down, aten.mm.default):
        raise Rejected(f"{product.name} does not weight a down projection (mm)")
    region.add(down)
    w_down = _linear_weight(down, region)
    h = down.args[0]

    # the gate/up GEMMs read x[t_e]
    x, gathered_x = _gathered_x(link.rows, region)
    first_gemms = [u for u in gathered_x.users if is_call(u, aten.mm.default) and u.args[0] is gathered_x]
    if len(first_gemms) != len(gathered_x.users):
        raise Rejected(f"x[rows] of {link.acc_out.name} is read by something other than the expert's GEMMs")
    region.update(first_gemms)

    if len(first_gemms) == 2:
        orders = [("separate", list(first_gemms)), ("separate", list(first_gemms[::-1]))]
    elif len(first_gemms) == 1:
        orders = [("concat", first_gemms), ("ungated", first_gemms)]
    else:
        raise Rejected(f"x[rows] of {link.acc_out.name} feeds {len(first_gemms)} GEMMs")
    reasons = []
    for gate_up_form, gemms in orders:
        try:
            activation, act_nodes, constants = match_any_activation(h, gemms, gate_up_form)
        except Rejected as reason:
            reasons.append(str(reason))
            continue
        region |= act_nodes
        gate = _linear_weight(gemms[0], region)
        up = _linear_weight(gemms[1], region) if len(gemms) == 2 else None
        return _Expert(
            expert, ids, weights, x, gate, up, w_down, gate_up_form, activation, constants, size_checks, region
        )
    raise Rejected("; ".join(dict.fromkeys(reasons)))


def _stack(graph: Graph, weights: list[Node], before: Node) -> tuple[Node, list[Node]]:
    """``cat([w[None] for w in weights])``: the (E, ...) stack of per-expert weights, a copy."""
    with detect_fake_mode([val(w) for w in weights]), graph.inserting_before(before):
        parts = []
        for weight in weights:
            part = graph.call_function(aten.unsqueeze.default, (weight, 0))
            part.meta["val"] = val(weight).unsqueeze(0)
            parts.append(part)
        stacked = graph.call_function(aten.cat.default, (parts, 0))
        stacked.meta["val"] = torch.cat([val(p) for p in parts])
    return stacked, [*parts, stacked]


class _Candidate:
    """One zero-initialised accumulator and the chain of expert terms added to it."""

    def __init__(self, graph: Graph, zeros: Node):
        self.graph, self.zeros = graph, zeros
        self.match: ExpertsMatch | None = None
        self.inserted: list[Node] = []
        self.size_checks: set[Node] = set()
        self.result_users = 0

    def __call__(self) -> ExpertsMatch:
        links, acc = [], self.zeros
        while (link := _link_after(acc)) is not None:
            links.append(link)
            acc = link.acc_out
        if not links:
            raise Rejected(f"nothing is added to {self.zeros.name}")
        experts = [_expert(link) for link in links]
        first = experts[0]
        for name in ("ids", "weights", "x"):
            if any(getattr(e, name) is not getattr(first, name) for e in experts):
                raise Rejected(f"the experts of the loop read different {name}")
        for name in ("gate_up_form", "activation", "constants"):
            if any(getattr(e, name) != getattr(first, name) for e in experts):
                raise Rejected(f"the experts of the loop differ in their {name.replace('_', ' ')}")
        num_experts = len(experts)
        order = sorted(e.expert for e in experts)
        if order != list(range(num_experts)):
            raise Rejected(f"the loop's experts are {order}, not each of 0..{num_experts - 1} once")
        if not _distinct_ids(first.ids):
            # Negative ids would be skipped by the loop, refused by the op; with repeated ids in a row,
            # results[rows] += y (not accumulating) would keep one of a token's terms, not their sum.
            raise Rejected(f"the ids {first.ids.name} are not from a top-k (nor moe_ops.route)")
        x, ids = val(first.x), val(first.ids)
        if not same_shape(val(self.zeros).shape, x.shape):
            raise Rejected(f"the accumulator {self.zeros.name} is not x's (T, H)")
        if val(self.zeros).dtype != x.dtype:
            raise Rejected(f"the accumulator is {val(self.zeros).dtype}, x is {x.dtype}")
        top_k = ids.shape[1]
        if not isinstance(top_k, int) or top_k > num_experts:
            raise Rejected(f"K={top_k} choices among E={num_experts} experts")
        by_expert = sorted(experts, key=lambda e: e.expert)
        for role in ("gate", "up", "down"):
            tensors = [getattr(e, role) for e in by_expert]
            if tensors[0] is None:
                continue
            if any(val(t).dim() != 2 or not same_shape(val(t).shape, val(tensors[0]).shape) for t in tensors):
                raise Rejected(f"the experts' {role} weights differ in shape")
            if any(val(t).dtype != x.dtype for t in tensors):
                raise Rejected(f"the experts' {role} weights are not x's {x.dtype}")
        # What the op requires of (E, F', H) gate (and up) and (E, H, F) down weights.
        gate_rows, hidden = val(first.gate).shape
        intermediate = gate_rows // 2 if first.gate_up_form == "concat" else gate_rows
        if not (
            same_size(hidden, x.shape[1])
            and (first.up is None or same_shape(val(first.up).shape, val(first.gate).shape))
            and same_shape(val(first.down).shape, (x.shape[1], intermediate))
        ):
            raise Rejected("the experts' weights are not (F, H) gate/up and (H, F) down weights of x's H")

        region = set().union(*(e.region for e in experts))
        result = links[-1].acc_out
        description = (
            f"E={num_experts}, K={top_k}, H={x.shape[1]}, {first.activation}, {first.gate_up_form} gate/up"
        )
        if not config.stack_expert_weights:
            counters["moe_ops"]["expert_loop_not_stacked"] += 1
            log.info(
                "expert loop at node %s (%s) not rewritten: its experts hold separate weight tensors, and "
                "moe_ops.fused_experts would need them stacked, a copy of all expert weights on every call "
                "(set moe_ops.config.stack_expert_weights = True to rewrite it anyway; see "
                "lowering/graph/match_expert_loop.py)", result.name, description,
            )
            raise Rejected("expert loop recognised; stacking its weights per call is off (stack_expert_weights)")

        stacks = {}
        for role in ("gate", "up", "down"):
            tensors = [getattr(e, role) for e in by_expert]
            if tensors[0] is not None:
                stacks[role], inserted = _stack(self.graph, tensors, result)
                self.inserted += inserted
        gated = first.gate_up_form != "ungated"
        match = ExpertsMatch(
            form="expert_loop", result=result, region=region, x=first.x, topk_weights=first.weights,
            topk_ids=first.ids, w_gate_up=stacks["gate"], w_down=stacks["down"], w_up=stacks.get("up"),
            layout="EFH", activation=first.activation, gated=gated,
            alpha=first.constants.get("alpha", CLAMPED_SWIGLU_ALPHA),
            limit=first.constants.get("limit", CLAMPED_SWIGLU_LIMIT),
            notes=([] if first.gate_up_form == "separate" else [f"{first.gate_up_form} gate/up"])
            + ["weights stacked per call"],
        )
        try:
            check(match)
        except Rejected:
            self.undo()
            raise
        self.match = match
        self.size_checks = set().union(*(e.size_checks for e in experts))
        self.result_users = len(result.users)
        return match

    def undo(self) -> None:
        for node in reversed(self.inserted):
            if not node.users:
                self.graph.erase_node(node)
        self.inserted = []

    def finish(self) -> None:
        """After the rewrite: drop the nonzero's range asserts (DCE keeps side effects), so that the
        nonzero dies with the block. If the block was not rewritten, drop the stacks."""
        if self.match is None:
            return
        if self.result_users and not self.match.result.users:
            for node in self.size_checks:
                if not node.users:
                    self.graph.erase_node(node)
        else:
            self.undo()


def find_expert_loop_blocks(graph: Graph) -> Iterator[Callable[[], ExpertsMatch]]:
    """Candidates: zero-initialised (T, H) accumulators that per-expert terms are added to.

    A generator: after each candidate has been rewritten (or not) by ``rewrite_experts``, it resumes
    and tidies up (the range asserts of the replaced nonzeros; the stacks of a block not replaced)."""
    for zeros in [n for n in graph.nodes if _is_zero_fill(n)]:
        try:
            has_link = _link_after(zeros) is not None
        except Rejected:
            has_link = True  # let the candidate say why
        if not has_link:
            continue
        candidate = _Candidate(graph, zeros)
        yield candidate
        candidate.finish()
