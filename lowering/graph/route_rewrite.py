"""Rewrite: a router's top-k prologue in the post-grad graph -> one ``moe_ops.route`` call.

Recognised (T tokens, E experts, K = k; every reduction over the last dim of a (T, E) logits tensor):

    R1   topk(softmax|sigmoid(fp32 logits), k)      Mixtral, Qwen2/3-MoE, OLMoE
    R2   softmax(fp32(topk(logits, k).values))       GPT-OSS, mistral-inference
    R3   scores.gather(1, topk(group-masked(sigmoid(fp32 logits) + bias), k).indices)
                                                     DeepSeek-V3 (the variants that mask with -inf),
                                                     torchtitan's node-limited routing (masked per group)
    R4   scores.gather(1, topk(softmax|sigmoid(fp32 logits) + bias, k).indices)
                                                     MiniMax-M2, AFMoE, Laguna (a selection bias, no groups)

each optionally followed, on the weights, by ``w / (w.sum(-1, keepdim=True) [+ eps])`` (or ERNIE-4.5's
``w / clamp(w.sum(-1, keepdim=True), min=m)``) and then by
``w * scale`` (a Python number). Whatever comes after (e.g. a cast back to the logits' dtype) is
left in place and reads the op's weights. The indices' users read the op's int32 ids cast to int64.

Post-grad, softmax is decomposed: ``amax -> sub -> exp -> sum -> div`` on the CPU, and on CUDA
Inductor's own patterns first turn the amax/sum into ``prims.prepare_softmax_online``; both match.

Not rewritten (each logged at DEBUG with the reason, and at INFO once per source line where the
top-k selects experts: lowering/graph/experts_rewrite.py): scores not computed in fp32 (e.g. a bf16
softmax whose bf16 result feeds topk: its rounding changes the selection), reductions over another
dim, ``largest=False``, logits that are not 2-D, R2 where the top-k values are also used outside
the softmax (the topk would have to stay), and R3 masking with anything but -inf (HF's DeepSeek-V2
fills 0.0: a masked expert then ties with a kept one whose score is 0, or beats one whose biased score is
negative).

Where the scores (the softmax output) have other users, the rewrite still happens and those users
keep reading Inductor's softmax: the op recomputes it. Where the top-k weights have users besides
the renormalisation or the scaling, that step is not folded into the op and stays in the graph.

Ties and NaN: ``moe_ops.route`` selects exactly what ``torch.topk`` selects on the logits' device (its
CPU path calls ``torch.topk``; its CUDA kernel follows CUDA's rule: see moe_ops.routing), so the rewrite
keeps every token's experts. Ties are frequent, not a measure-zero case: bf16 logits cast exactly to
fp32 keep them. Only the order of tied experts among a token's K slots may differ from ``topk``'s.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from moe_ops._compat.dynamo import counters, detect_fake_mode
from moe_ops._compat.inductor import online_softmax_target
from moe_ops.lowering.graph.fx_match import (
    MATCHER_ERRORS,
    MATCHER_FAILED,
    ROUTE_REJECTED,
    Rejected,
    arg,
    aten,
    is_call,
    is_float_scalar,
    is_last_dim,
    is_view_call,
    prims,
    same_shape,
    shape,
    val,
)
from moe_ops.routing import GROUP_SCORE_TOP

log = logging.getLogger("moe_ops")

# Logits dtypes whose cast to fp32 is exact (so the op, which casts them itself, sees the same values).
_EXACT_TO_FP32 = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class RoutePrologue:
    """A matched prologue: what to pass to ``moe_ops.route`` and which nodes its outputs replace."""

    topk: Node
    logits: Node  # fed to the op: the (T, E) logits before any exact cast to fp32
    k: int
    scoring: str  # "softmax" | "sigmoid"
    softmax_after_topk: bool
    renormalize: bool
    renorm_eps: float
    routed_scaling_factor: float
    weights: Node | None  # its users get the op's weights (fp32); None where nothing reads them
    ids: Node | None  # getitem(topk, 1); its users get the op's ids as int64
    correction_bias: Node | None = None
    n_group: int = 1
    topk_group: int = 1
    renorm_min: float = 0.0

    def describe(self) -> str:
        parts = [self.scoring + (" after topk" if self.softmax_after_topk else ""), f"k={self.k}"]
        if self.correction_bias is not None:
            parts.append("correction_bias")
        if self.n_group > 1:
            parts.append(f"n_group={self.n_group}, topk_group={self.topk_group}")
        if self.renormalize:
            parts.append("renormalize" + (f" eps={self.renorm_eps:g}" if self.renorm_eps else "")
                         + (f" min={self.renorm_min:g}" if self.renorm_min else ""))
        if self.routed_scaling_factor != 1.0:
            parts.append(f"scale={self.routed_scaling_factor:g}")
        return ", ".join(parts)


def rewrite_routing_prologues(graph: Graph) -> int:
    """Replace every routing prologue in ``graph`` by ``moe_ops.route``; returns how many."""
    rewritten = 0
    for topk in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.topk.default]:
        try:
            prologue = _match(topk)
        except Rejected as reason:
            log.debug("routing prologue at node %s not rewritten: %s", topk.name, reason)
            topk.meta[ROUTE_REJECTED] = str(reason)
            continue
        except MATCHER_ERRORS as error:
            log.warning("routing prologue at node %s %s (%s: %s); the code runs as written", topk.name,
                        MATCHER_FAILED, type(error).__name__, error)
            topk.meta[ROUTE_REJECTED] = f"the matcher failed ({type(error).__name__})"
            continue
        _replace(graph, prologue)
        counters["moe_ops"]["route_rewrite"] += 1
        log.info(
            "rewrote routing prologue at node %s into moe_ops.route (%s)", topk.name, prologue.describe()
        )
        rewritten += 1
    return rewritten


# ---- Matching -------------------------------------------------------------------------------------












def _fp32_source(node: Node) -> Node:
    """The tensor before ``node``'s cast to fp32 when that cast is exact (the op casts it itself)."""
    if is_call(node, prims.convert_element_type.default) and node.args[1] == torch.float32:
        source_val = val(node.args[0])
        if source_val is not None and source_val.dtype in _EXACT_TO_FP32:
            return node.args[0]
    return node


def _match_softmax_last_dim(out: Node) -> tuple[Node, set[Node]] | None:
    """``out`` = softmax over the last dim of x, decomposed: returns (x, the nodes computing it)."""
    if not (is_call(out, aten.div.Tensor) and isinstance(out.args[1], Node)):
        return None
    exp, denominator = out.args
    if not (is_call(exp, aten.exp.default) and is_call(exp.args[0], aten.sub.Tensor)):
        return None
    sub = exp.args[0]
    x, row_max = sub.args
    if sub.kwargs or val(x) is None:  # sub's only kwarg is alpha: x - alpha * max is no softmax
        return None
    ndim = val(x).dim()
    if is_call(denominator, aten.sum.dim_IntList):  # amax -> sub -> exp -> sum -> div
        if not (
            denominator.args[0] is exp
            and is_last_dim(denominator.args[1], ndim)
            and arg(denominator, 2, "keepdim", False)
            and is_call(row_max, aten.amax.default)
            and row_max.args[0] is x
            and is_last_dim(row_max.args[1], ndim)
            and arg(row_max, 2, "keepdim", False)
        ):
            return None
        return x, {row_max, sub, exp, denominator, out}
    online = online_softmax_target()
    stats = row_max.args[0] if is_call(row_max, operator.getitem) else None
    if (  # prepare_softmax_online(x, dim) -> (max, sum) -> sub -> exp -> div
        online is not None
        and is_call(stats, online)
        and stats.args[0] is x
        and is_last_dim(stats.args[1], ndim)
        and row_max.args[1] == 0
        and is_call(denominator, operator.getitem)
        and denominator.args[0] is stats
        and denominator.args[1] == 1
    ):
        return x, {stats, row_max, denominator, sub, exp, out}
    return None


def _match_scores(scores: Node) -> tuple[str, Node]:
    """R1: ``scores`` = softmax/sigmoid of fp32 logits; returns (scoring, the fp32 logits)."""
    softmax = _match_softmax_last_dim(scores)
    if softmax is not None:
        scoring, fp32_logits = "softmax", softmax[0]
    elif is_call(scores, aten.sigmoid.default):
        scoring, fp32_logits = "sigmoid", scores.args[0]
    elif is_call(scores, prims.convert_element_type.default):
        raise Rejected(
            f"topk input {scores.name} is a cast to {scores.args[1]}: the selection reads rounded scores"
        )
    else:
        raise Rejected(
            f"topk input {scores.name} is not a softmax/sigmoid over the last dim, and its values "
            "do not feed a softmax"
        )
    if val(fp32_logits).dtype != torch.float32:
        raise Rejected(f"{scoring} computed in {val(fp32_logits).dtype}, not float32")
    return scoring, fp32_logits


def _fold_renorm_and_scale(weights: Node) -> tuple[Node, dict]:
    """Extend the weights over ``w / (w.sum(-1, keepdim=True) [+ eps])`` or ``w / clamp(w.sum(-1,
    keepdim=True), min=m)`` then ``w * scale`` where nothing else reads the intermediate values.
    Returns (end, the route arguments they make: renormalize, renorm_eps, renorm_min, routed_scaling_factor)."""
    found = dict(renormalize=False, renorm_eps=0.0, renorm_min=0.0, routed_scaling_factor=1.0)
    users = set(weights.users)
    sums = [u for u in users if is_call(u, aten.sum.dim_IntList)]
    divs = [u for u in users if is_call(u, aten.div.Tensor) and u.args[0] is weights]
    if len(users) == 2 and len(sums) == 1 and len(divs) == 1:
        (total,), (div,) = sums, divs
        denominator, eps, low = total, 0.0, 0.0
        (after_sum,) = total.users if len(total.users) == 1 else (None,)
        if (
            is_call(after_sum, aten.add.Tensor)
            and after_sum.args[0] is total
            and is_float_scalar(after_sum.args[1])
            and not after_sum.kwargs  # alpha
        ):
            denominator, eps = after_sum, float(after_sum.args[1])
        elif (  # ERNIE-4.5: clamp(sum, min=moe_norm_min), no max
            (is_call(after_sum, aten.clamp_min.default) or is_call(after_sum, aten.clamp.default))
            and after_sum.args[0] is total
            and is_float_scalar(after_sum.args[1])
            and float(after_sum.args[1]) > 0
            and arg(after_sum, 2, "max", None) is None
        ):
            denominator, low = after_sum, float(after_sum.args[1])
        if (
            total.args[0] is weights
            and is_last_dim(total.args[1], 2)
            and arg(total, 2, "keepdim", False)
            and arg(total, 3, "dtype", None) is None
            and div.args[1] is denominator
            and list(denominator.users) == [div]
        ):
            weights = div
            found.update(renormalize=True, renorm_eps=eps, renorm_min=low)
    (only_user,) = weights.users if len(weights.users) == 1 else (None,)
    if is_call(only_user, aten.mul.Tensor):
        a, b = only_user.args
        factor = b if a is weights else a if b is weights else None
        if is_float_scalar(factor):
            weights = only_user
            found["routed_scaling_factor"] = float(factor)
    return weights, found


def _match(topk: Node) -> RoutePrologue:
    scores = topk.args[0]
    k = arg(topk, 1, "k", None)
    if not isinstance(k, int):
        raise Rejected(f"k={k!r} is not a Python int")
    scores_val = val(scores)
    if scores_val is None or scores_val.dim() != 2:
        raise Rejected("topk input is not a 2-D (tokens, experts) tensor")
    if not is_last_dim(arg(topk, 2, "dim", -1), 2):
        raise Rejected(f"topk over dim {arg(topk, 2, 'dim', -1)}, not the last (experts) dim")
    if not arg(topk, 3, "largest", True):
        raise Rejected("topk with largest=False")
    # sorted=False accepted: the op returns the same experts, in descending order.
    outputs = {u.args[1]: u for u in topk.users if is_call(u, operator.getitem)}
    if len(outputs) != len(topk.users):
        raise Rejected("topk result used other than through getitem")
    values, ids = outputs.get(0), outputs.get(1)

    if is_call(scores, aten.where.self) or (is_view_call(scores) and is_call(scores.args[0], aten.where.self)):
        return _match_group_limited(topk, k, values, ids)  # R3: selection among the experts of the kept groups
    if is_call(scores, aten.add.Tensor):  # R4: a selection bias, no groups
        return _match_biased(topk, k, values, ids)
    softmax_after = _match_softmax_after_topk(values)
    if isinstance(softmax_after, Node):  # R2
        scoring, logits, weights = "softmax", scores, softmax_after
        if scores_val.dtype not in _EXACT_TO_FP32:
            raise Rejected(f"logits of dtype {scores_val.dtype}")
    else:  # R1
        try:
            scoring, fp32_logits = _match_scores(scores)
        except Rejected:
            if softmax_after is not None:  # the values feed a softmax, just not one the op computes
                raise Rejected(softmax_after) from None
            raise
        logits, weights = _fp32_source(fp32_logits), values

    folded = dict(renormalize=False, renorm_eps=0.0, renorm_min=0.0, routed_scaling_factor=1.0)
    if weights is not None:
        weights, folded = _fold_renorm_and_scale(weights)
        if val(weights).dtype != torch.float32:
            raise Rejected(f"weights of dtype {val(weights).dtype}; the op returns float32")
    return RoutePrologue(
        topk=topk, logits=logits, k=k, scoring=scoring, softmax_after_topk=softmax_after is not None,
        weights=weights, ids=ids, **folded,
    )


def _match_softmax_after_topk(values: Node | None) -> Node | str | None:
    """R2: the softmax output over the top-k ``values`` (cast exactly to fp32), when the values and
    every softmax intermediate are read by that softmax only. Where the values feed a softmax that
    fails those conditions, the reason; where they feed none, None."""
    if values is None:
        return None
    (only_user,) = values.users if len(values.users) == 1 else (None,)
    x = only_user if only_user is not None and _fp32_source(only_user) is values else values
    subs = [u for u in x.users if is_call(u, aten.sub.Tensor) and u.args[0] is x]
    exps = [u for sub in subs for u in sub.users if is_call(u, aten.exp.default)]
    outs = [u for exp in exps for u in exp.users if is_call(u, aten.div.Tensor) and u.args[0] is exp]
    if len(outs) != 1:
        return None
    (out,) = outs
    softmax = _match_softmax_last_dim(out)
    if softmax is None or softmax[0] is not x:
        return None
    if val(x).dtype != torch.float32:
        return f"softmax over the top-k values computed in {val(x).dtype}, not float32"
    internal = softmax[1] | {x}
    if any(user not in internal for node in internal - {out} | {values} for user in node.users):
        return "the top-k values (or a softmax intermediate) are also used outside the softmax"
    return out








def _match_group_limited(topk: Node, k: int, values: Node | None, ids: Node | None) -> RoutePrologue:
    """R3 (DeepSeek-V3): ``choice = scores + bias`` (or the scores alone, Mistral 4); a group scores the
    sum of its top-2 choices; the experts outside the best ``topk_group`` groups are masked to -inf;
    topk on the masked choices; the weights are the unbiased scores gathered at the chosen ids. The mask is
    the (T, E) choices' (transformers), or the choices viewed as (T, n_group, E / n_group) are masked per group
    and viewed back as (T, E) (torchtitan)."""
    masked = topk.args[0]
    if values is not None and values.users:
        raise Rejected("the top-k masked choices are used, not just their ids")
    if is_view_call(masked):
        group_ids, n_group, group_size, fill, choice = _per_group_mask(masked)
    else:
        group_ids, n_group, group_size, fill, choice = _expert_mask(masked)
    fill_value = fill.args[1] if is_call(fill, aten.full.default) else None
    if is_call(choice, aten.add.Tensor):
        num_experts, scores, bias = _biased_choice(choice)
    else:  # no selection bias (Mistral 4): the groups and the experts are chosen on the scores
        num_experts, scores, bias = shape(choice)[1], choice, None
        if not isinstance(num_experts, int):
            raise Rejected("the number of experts is not static")
    scoring, fp32_logits = _match_scores(scores)
    if not (shape(masked)[1:] == (num_experts,) and isinstance(n_group, int) and isinstance(group_size, int)):
        raise Rejected("the expert mask is not (T, E), or the group sizes are not static")
    group_topk = group_ids.args[0] if is_call(group_ids, operator.getitem) else None
    if not (
        is_call(group_topk, aten.topk.default)
        and group_ids.args[1] == 1
        and is_last_dim(arg(group_topk, 2, "dim", -1), 2)
        and arg(group_topk, 3, "largest", True)
    ):
        raise Rejected("the kept groups are not the top-k of the group scores")
    topk_group = arg(group_topk, 1, "k", None)

    # group score = sum of each group's two best choices
    group_sum = group_topk.args[0]
    best_two = group_sum.args[0] if is_call(group_sum, aten.sum.dim_IntList) else None
    best_two_topk = best_two.args[0] if is_call(best_two, operator.getitem) else None
    grouped = best_two_topk.args[0] if is_call(best_two_topk, aten.topk.default) else None
    if not (
        grouped is not None  # so each node above is of the kind read from it
        and is_last_dim(group_sum.args[1], 3)  # over each group's two best: the last dim of (T, n_group, 2)
        and not arg(group_sum, 2, "keepdim", False)
        and best_two.args[1] == 0
        and arg(best_two_topk, 1, "k", None) == GROUP_SCORE_TOP
        and is_last_dim(arg(best_two_topk, 2, "dim", -1), 3)
        and arg(best_two_topk, 3, "largest", True)
        and is_view_call(grouped)
        and grouped.args[0] is choice
        and shape(grouped)[1:] == (n_group, group_size)
    ):
        raise Rejected("the group scores are not the sum of each group's top-2 choices")
    if not (
        isinstance(topk_group, int)
        and n_group * group_size == num_experts
        and group_size >= GROUP_SCORE_TOP
        and 1 <= topk_group <= n_group
        and k <= topk_group * group_size
    ):
        raise Rejected(f"groups n_group={n_group}, topk_group={topk_group} of size {group_size}, k={k}")
    if topk_group == n_group:
        # Every group kept: the mask masks nothing, whatever it fills with (Mistral 4's and A.X-K2's
        # n_group = topk_group = 1 with a 0.0 fill); the selection is the ungrouped one.
        n_group = topk_group = 1
    elif fill_value != float("-inf"):
        # A 0.0 fill (HF's DeepSeek-V2): a masked expert then ties with a kept one whose score is 0, or
        # beats one whose biased score is negative, which moe_ops.route (-inf) never allows.
        raise Rejected(f"experts masked with {fill_value!r}, not -inf")

    weights, folded = _fold_renorm_and_scale(_gathered_scores(scores, ids))
    return RoutePrologue(
        topk=topk, logits=_fp32_source(fp32_logits), k=k, scoring=scoring, softmax_after_topk=False,
        weights=weights, ids=ids, correction_bias=bias, n_group=n_group, topk_group=topk_group, **folded,
    )


def _expert_mask(masked: Node) -> tuple[Node, int, int, Node, Node]:
    """transformers' R3 mask: ``masked_fill(choice, ~keep, fill)`` or ``where(keep, choice, fill)`` over (T, E),
    keep the kept groups' (T, n_group) mask repeated over each group's experts. Returns (the kept groups' ids,
    n_group, group size, the fill, the choices)."""
    if not is_call(masked, aten.where.self):
        raise Rejected("the masked choices are no masked_fill or where of the choices")
    cond, if_true, if_false = masked.args
    if is_call(cond, aten.bitwise_not.default):  # masked_fill(choice, ~keep, fill)
        keep, fill, choice = cond.args[0], if_true, if_false
    else:  # where(keep, choice, fill)
        keep, fill, choice = cond, if_false, if_true
    if is_call(keep, prims.convert_element_type.default) and keep.args[1] == torch.bool:
        keep = keep.args[0]
    before_view = keep.args[0] if is_view_call(keep) else None
    expanded = before_view.args[0] if is_call(before_view, aten.clone.default) else before_view
    unsqueezed = expanded.args[0] if is_call(expanded, aten.expand.default) else None
    group_keep = unsqueezed.args[0] if is_call(unsqueezed, aten.unsqueeze.default) else None
    group_ids = _kept_groups_ids(group_keep)
    if group_ids is None or unsqueezed.args[1] not in (-1, 2) or not same_shape(shape(keep), shape(masked)):
        raise Rejected("the expert mask is not the kept groups' mask repeated over their experts")
    # where(keep, fill, choice) reads as the choices filled where kept: the fill is then the choices, no constant.
    if not (len(shape(choice)) == 2 and (len(shape(fill)) == 0 or is_call(fill, aten.full.default))):
        raise Rejected("the experts of the kept groups are filled, not the others")
    return group_ids, *shape(expanded)[1:], fill, choice


def _per_group_mask(masked: Node) -> tuple[Node, int, int, Node, Node]:
    """torchtitan's R3 mask: ``grouped.masked_fill(drop.unsqueeze(-1), fill).view(T, E)``, grouped the (T, E)
    choices viewed as (T, n_group, E / n_group) and drop = ``ones(T, n_group).scatter(1, kept group ids, False)``
    (True at the groups not kept): the (T, E) choices of the kept groups' experts, the rest the fill, as
    transformers' mask gives them. Returns what _expert_mask does."""
    where = masked.args[0]
    cond, fill, grouped = where.args
    drop = cond.args[0] if is_call(cond, aten.unsqueeze.default) and cond.args[1] in (-1, 2) else None
    if not (
        is_call(drop, aten.scatter.value)
        and drop.args[1] == 1
        and drop.args[3] in (0, False)
        and is_call(drop.args[0], aten.full.default)
        and drop.args[0].args[1] is True
        and is_view_call(grouped)
        and len(shape(grouped)) == 3
        and same_shape(shape(drop), shape(grouped)[:2])
        and same_shape(shape(where), shape(grouped))
    ):
        raise Rejected("the masked choices are not the groups' choices with the groups not kept filled")
    return drop.args[2], *shape(grouped)[1:], fill, grouped.args[0]


def _kept_groups_ids(group_keep: Node | None) -> Node | None:
    """The (T, topk_group) group ids whose mask (T, n_group) ``group_keep`` is (1 at each id, else 0):
    ``zeros.scatter(1, ids, 1)`` as written, or, where a token keeps one group, the one-hot compare
    Inductor decomposes that scatter into (``where(iota(n_group) == ids, 1, 0)``; GLM-4.5's n_group=1)."""
    if is_call(group_keep, prims.convert_element_type.default):
        group_keep = group_keep.args[0]
    if (
        is_call(group_keep, aten.scatter.value)
        and group_keep.args[1] == 1
        and group_keep.args[3] not in (0, False)
        and is_call(group_keep.args[0], aten.full.default)
        and group_keep.args[0].args[1] in (0, False)
    ):
        return group_keep.args[2]
    if not is_call(group_keep, aten.where.self):
        return None
    compare, one, zero = group_keep.args
    if not (is_call(compare, aten.eq.Tensor) and _scalar(one) == 1 and _scalar(zero) == 0):
        return None
    positions, ids = compare.args
    if is_call(ids, prims.iota.default) or is_view_call(ids) and is_call(ids.args[0], prims.iota.default):
        positions, ids = ids, positions
    iota = positions.args[0] if is_view_call(positions) else positions
    if is_call(ids, aten.expand.default):
        ids = ids.args[0]
    if not (
        is_call(iota, prims.iota.default)
        and arg(iota, 1, "start", 0) == 0
        and arg(iota, 2, "step", 1) == 1
        and shape(positions) == (1, shape(iota)[0])
        and len(shape(ids)) == 2
        and shape(ids)[1] == 1
    ):
        return None
    return ids


def _scalar(node) -> float | None:
    """The value of a Python number, or of a ``scalar_tensor`` / 0-dim ``full`` node."""
    if isinstance(node, (int, float, bool)):
        return node
    if is_call(node, aten.scalar_tensor.default) or (is_call(node, aten.full.default) and node.args[0] == []):
        return node.args[0] if is_call(node, aten.scalar_tensor.default) else node.args[1]
    return None


def _match_biased(topk: Node, k: int, values: Node | None, ids: Node | None) -> RoutePrologue:
    """R4 (MiniMax-M2, AFMoE, Laguna): ``topk(scores + bias, k)`` over all experts, the weights the
    unbiased scores gathered at the chosen ids."""
    if values is not None and values.users:
        raise Rejected("the top-k biased choices are used, not just their ids")
    _, scores, bias = _biased_choice(topk.args[0])
    scoring, fp32_logits = _match_scores(scores)
    weights, folded = _fold_renorm_and_scale(_gathered_scores(scores, ids))
    return RoutePrologue(
        topk=topk, logits=_fp32_source(fp32_logits), k=k, scoring=scoring, softmax_after_topk=False,
        weights=weights, ids=ids, correction_bias=bias, **folded,
    )


def _biased_choice(choice: Node) -> tuple[int, Node, Node]:
    """``choice = scores + bias`` in fp32, the (E,) bias broadcast over the tokens: (E, scores, bias)."""
    num_experts = shape(choice)[1]
    if not isinstance(num_experts, int):
        raise Rejected("the number of experts is not static")
    if not (is_call(choice, aten.add.Tensor) and not choice.kwargs and val(choice).dtype == torch.float32):
        raise Rejected("the choices are not an fp32 add of scores and a bias")
    scores, bias = choice.args
    if is_call(bias, aten.unsqueeze.default) and bias.args[1] == 0:
        bias = bias.args[0]
    if not (isinstance(bias, Node) and shape(bias) == (num_experts,)):
        raise Rejected("the selection bias is not an (E,) tensor")
    return num_experts, scores, bias


def _gathered_scores(scores: Node, ids: Node | None) -> Node:
    """The one ``scores.gather(1, ids)``: the unbiased scores at the chosen ids."""
    gathers = [
        user
        for user in (ids.users if ids is not None else ())
        if is_call(user, aten.gather.default)
        and user.args[0] is scores
        and user.args[1] in (1, -1)
        and user.args[2] is ids
        and not arg(user, 3, "sparse_grad", False)
    ]
    if len(gathers) != 1:
        raise Rejected("the weights are not the scores gathered at the chosen ids")
    return gathers[0]


# ---- Replacing ------------------------------------------------------------------------------------


def _replace(graph: Graph, prologue: RoutePrologue) -> None:
    route_args = (
        prologue.logits, prologue.k, prologue.scoring, prologue.softmax_after_topk, prologue.renormalize,
        prologue.renorm_eps, prologue.correction_bias, prologue.n_group, prologue.topk_group,
        prologue.routed_scaling_factor,
    ) + ((prologue.renorm_min,) if prologue.renorm_min else ())  # graphs without one read as before
    logits_val = val(prologue.logits)
    # New nodes need meta["val"] (Inductor lowers from it): the op's fake kernel gives it.
    with detect_fake_mode([logits_val]):
        weights_val, ids_val = torch.ops.moe_ops.route.default(
            logits_val, *route_args[1:6], val(prologue.correction_bias), *route_args[7:]
        )
        ids_int64_val = prims.convert_element_type.default(ids_val, torch.int64)

    with graph.inserting_before(prologue.topk):
        route = graph.call_function(torch.ops.moe_ops.route.default, route_args)
        route.meta["val"] = (weights_val, ids_val)
        # The user's source line, for the log of whatever happens to the experts after it.
        route.meta["stack_trace"] = prologue.topk.meta.get("stack_trace")
        if prologue.weights is not None:
            weights = graph.call_function(operator.getitem, (route, 0))
            weights.meta["val"] = weights_val
            prologue.weights.replace_all_uses_with(weights)
        if prologue.ids is not None:
            ids = graph.call_function(operator.getitem, (route, 1))
            ids.meta["val"] = ids_val
            # topk's indices are int64; the op's are int32.
            ids_int64 = graph.call_function(prims.convert_element_type.default, (ids, torch.int64))
            ids_int64.meta["val"] = ids_int64_val
            prologue.ids.replace_all_uses_with(ids_int64)
