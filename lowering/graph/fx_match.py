"""Helpers the rewrites share to read post-grad FX graphs: node predicates, arguments, shapes."""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from moe_ops._checks import INDEX_DTYPES
from moe_ops._compat.dynamo import detect_fake_mode

aten = torch.ops.aten
prims = torch.ops.prims

VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


class Rejected(Exception):
    """A candidate that is not provably the op's computation; the message says why."""


# Where the routing rewrite leaves the reason a top-k was not rewritten (node.meta), for the experts pass to
# explain at INFO once it knows which top-ks select experts.
ROUTE_REJECTED = "moe_ops_route_rejected"


# AOTAutograd's names of a training step's graph inputs (primals_<i>, and tangents_<i> for the gradients of the
# outputs); an inference graph's are arg<i>_<j>. The graph passes are handed the graph alone, so these names are
# how they tell the two apart.
PRIMALS, TANGENTS = "primals", "tangents"


def has_placeholder(graph: Graph, *prefixes: str) -> bool:
    """Whether an input of ``graph`` is named with one of ``prefixes`` (PRIMALS, TANGENTS)."""
    return any(node.name.startswith(prefixes) for node in graph.find_nodes(op="placeholder"))


# Every form of a clamp in a post-grad graph: (x, min), (x, max), (x, min, max).
CLAMPS = (aten.clamp_min.default, aten.clamp_max.default, aten.clamp.default)


def val(node) -> torch.Tensor | None:
    """The fake value Inductor recorded for ``node`` (None for non-nodes)."""
    return node.meta.get("val") if isinstance(node, Node) else None


# What a matcher raises where a graph it was not written for trips it (a node of another kind read as the one
# it looks for): the matcher's bug, which leaves that code as it is rather than failing the user's compile
# (logged as a warning; tests look for that message).
MATCHER_ERRORS = (AttributeError, IndexError, KeyError, TypeError, ValueError)
MATCHER_FAILED = "not rewritten: the matcher failed on this graph"


def arg(node: Node, index: int, name: str, default):
    """``node``'s argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def new_node(graph, target, args, kwargs=None) -> Node:
    """A call of ``target`` inserted at the graph's insertion point, its meta["val"] computed from its
    arguments' fake values (nodes inside a list argument, such as a size, included)."""
    def fake(a):
        if isinstance(a, list):
            return [fake(item) for item in a]
        return val(a) if isinstance(a, Node) else a

    fake_args = [fake(a) for a in args]
    with detect_fake_mode([v for v in fake_args if isinstance(v, torch.Tensor)]):
        value = target(*fake_args, **(kwargs or {}))
    node = graph.call_function(target, tuple(args), kwargs or {})
    node.meta["val"] = value
    return node


def closure(sources, step) -> set[Node]:
    """The nodes reachable from ``sources`` (the non-nodes among them skipped) through ``step``."""
    seen: set[Node] = set()
    stack = [n for n in sources if isinstance(n, Node)]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(step(node))
    return seen


def is_call(node, target) -> bool:
    """``node`` calls ``target`` (an op, or a tuple of ops: any of them)."""
    if not (isinstance(node, Node) and node.op == "call_function"):
        return False
    return node.target in target if isinstance(target, tuple) else node.target is target


def with_registered_op(target, namespace: str, name: str) -> tuple:
    """``target`` and, where a library has registered it, the custom op ``namespace::name`` that stands
    for it in the graph (transformers' grouped_mm_fallback, torchtitan's deterministic scatter_add)."""
    library = getattr(torch.ops, namespace, None)
    if library is not None and hasattr(library, name):
        return (target, getattr(library, name).default)
    return (target,)


def is_view_call(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in VIEWS


def shape(node: Node) -> tuple:
    return tuple(val(node).shape)


def same_size(a, b) -> bool:
    """Sizes equal for every value of the shape symbols (sizes may be SymInts under dynamic shapes,
    or graph nodes computing one)."""
    a, b = (val(v) if isinstance(v, Node) else v for v in (a, b))
    if a is None or b is None:
        return False
    return statically_known_true(a == b)


def same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b, strict=True))


def is_last_dim(dims, ndim: int) -> bool:
    """``dims`` (an int or a one-element list) names the last of ``ndim`` dims."""
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        (dims,) = dims
    return isinstance(dims, int) and dims in (-1, ndim - 1)


def is_float_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _uncast_ids(ids: Node) -> Node:
    """``ids`` before a cast between index dtypes (value-preserving for indices)."""
    if is_call(ids, prims.convert_element_type.default) and ids.args[1] in INDEX_DTYPES:
        return ids.args[0]
    return ids


def top_k_scores(ids: Node) -> tuple[Node, int] | None:
    """``ids`` as the indices of a top-k (``aten.topk``, or ``moe_ops.route``, which selects over the
    last dim), possibly cast between int32 and int64 (value-preserving for indices): (the scores node,
    the dim selected over), or None. Such ids are in [0, scores.shape[dim]) and distinct along that dim."""
    source = _uncast_ids(ids)
    if not (is_call(source, operator.getitem) and source.args[1] == 1):
        return None
    producer = source.args[0]
    if is_call(producer, aten.topk.default):
        return producer.args[0], arg(producer, 2, "dim", -1)
    route = getattr(getattr(torch.ops, "moe_ops", None), "route", None)
    if route is not None and is_call(producer, route.default):
        return producer.args[0], -1
    return None


def ids_bound(ids: Node) -> int | None:
    """An upper bound E' with 0 <= ids < E' for every input: the ids are a top-k's indices over E'
    scores (``aten.topk``, or ``moe_ops.route`` over E' logits), the indices of a max or argmax over E'
    scores, or views, a concatenation (PhiMoE's sparsemixer picks its experts with successive max()
    calls and concatenates their indices) or a masked_fill of such ids."""
    while is_call(ids, (*VIEWS, aten.unsqueeze.default)):
        ids = ids.args[0]  # views keep the values
    if is_call(ids, aten.cat.default):
        bounds = [ids_bound(part) for part in ids.args[0]]
        return None if None in bounds else max(bounds)
    if is_call(ids, aten.where.self):
        return _masked_ids_bound(*ids.args)
    found = top_k_scores(ids)
    if found is None:
        found = _max_scores(ids)
    if found is None:
        return None
    size = val(found[0]).shape[found[1]]
    return size if isinstance(size, int) else None


def _masked_ids_bound(condition, filled, ids) -> int | None:
    """``where(ids == c, v, ids)`` (a masked_fill: Zaya maps its skip class c = E to expert 0, weighted
    0): ids' bound with c, if it was the largest id, no longer reached, and v (a constant) below it."""
    if not (is_call(condition, aten.eq.Scalar) and condition.args[0] is ids and isinstance(condition.args[1], int)):
        return None
    if not (is_call(filled, aten.full.default) and list(filled.args[0]) == [] and isinstance(filled.args[1], int)):
        return None
    bound = ids_bound(ids)
    if bound is None or filled.args[1] < 0:
        return None
    replaced, value = condition.args[1], filled.args[1]
    return max(bound - 1 if replaced == bound - 1 else bound, value + 1)


def _max_scores(ids: Node) -> tuple[Node, int] | None:
    """``ids`` as the indices of a max or argmax over one dim (possibly cast between integer types):
    (the scores node, that dim), or None."""
    ids = _uncast_ids(ids)
    if is_call(ids, operator.getitem) and ids.args[1] == 1 and is_call(ids.args[0], aten.max.dim):
        producer = ids.args[0]
    elif is_call(ids, aten.argmax.default) and arg(ids, 1, "dim", None) is not None:
        producer = ids
    else:
        return None
    return producer.args[0], arg(producer, 1, "dim", None)
