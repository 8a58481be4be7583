"""Form 2: per-slot weight gather (``W[ids]`` then batched GEMMs) -> ``moe_ops.fused_experts``.

Two codes compute the routed experts by gathering each slot's expert weights:

- transformers 5.x ``batched_mm_experts_forward`` (``experts_implementation="batched_mm"``), S = T*K slots::

      xr  = x.repeat_interleave(K, 0)                  unsqueeze/expand/clone/view post-grad
      ids = ids_TK.reshape(-1).clamp(0, E-1)
      g   = bmm(W_gu[ids], xr[..., None]).squeeze(-1)  (GPT-OSS: bmm(xr[:, None], W_gu[ids]).squeeze(1))
      g.add_(b_gu[ids])                               (biases: functionalised, g's views re-read)
      h   = act(g)                                     _apply_gate: chunked or interleaved, any of the op's
      y   = bmm(W_d[ids], h[..., None]).squeeze(-1) [+ b_d[ids]]
      out = (y * w_TK.reshape(-1)[:, None]).view(T, K, H).sum(1) [.to(x.dtype)]

- gpt-fast mixtral-moe ``ConditionalFeedForward`` + ``MOEFeedForward`` (einsums, decomposed into
  permutes, reshapes and bmms)::

      x1  = silu(einsum('ti,taoi->tao', x, w1[ids]));  x3 = einsum('ti,taoi->tao', x, w3[ids])
      y   = einsum('tao,taio->tai', x1 * x3, w2[ids])
      out = einsum('tai,ta->ti', y, w)          (K = 1: no sum over one slot; the weighting alone)

Both are ``out[t] = sum_j w[t, j] * down_e(act(gate_up_e(x[t])))`` with ``e = ids[t, j]``: the op with
the same weights (gate_up (E, N, H) and down (E, H, F) are "EFH", their transposes "EHF"; gpt-fast's
separate w1/w3 are ``w_gate_up=w1, w_up=w3``).

How a candidate is proven (walking back from the combine, a sum, a bmm, or for K = 1 the product of the
slot outputs and their weights, the einsum's decomposition having dropped the sum over one slot): every
tensor between the sources (x, the (T, K) ids and weights, the gathered weights) and the result gets a descriptor, one
tuple of named axes per dim (t token, a slot, h hidden, n gate_up output, f intermediate; merged
dims list their axes in row-major order; size-1 axes are left out). Views (reshape, squeeze,
unsqueeze, permute, expand, clone) move axes without changing values, ``W[ids]`` gives ids' axes plus
the weight's, and a bmm must pair equal batch axes and contract exactly the right axis (h, then f,
then a for an einsum combine). So the layouts, the repetition of x, the gathers by the same ids,
the weighting and the sum over the K slots are checked, not assumed, whatever views the einsum
decomposition or a torch version puts in between. The activation is compared node for node with
the op's (``match_any_activation``), on a scratch copy of its nodes in which views of one GEMM
output that are the same tensor (the squeeze(unsqueeze(g)) that the functionalised ``add_`` of
GPT-OSS's bias leaves) are one input.

The ids clamp: batched_mm clamps ids to [0, E-1], so a sentinel id >= E (expert parallelism) computes
expert E-1 and relies on its routing weight being 0; the op skips ids >= E; and for ids < 0 the
clamp (or, without one, PyTorch's negative indexing) reads another expert where the op fails. The
two agree for every input only if the ids are in [0, E). That is provable when, in the same graph, they
are the indices of a top-k (``aten.topk``, or the ``moe_ops.route`` that the routing rewrite put in its
place) or of a max or argmax over at most E scores, or views, a concatenation or a masked_fill of such ids
(``fx_match.ids_bound``): then every clamp is a no-op and is dropped. Ids of any other provenance (a graph
input, an expert-parallel router) leave the block as it is, with the reason logged, even where a
sentinel's zero weight would make them agree.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch.fx import Graph, Node

from moe_ops._checks import INDEX_DTYPES
from moe_ops.activations import CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT
from moe_ops.lowering.graph.experts_rewrite import ExpertsMatch, match_any_activation
from moe_ops.lowering.graph.fx_match import (
    CLAMPS,
    Rejected,
    arg,
    aten,
    ids_bound,
    is_call,
    prims,
    same_size,
    val,
)

# Ops that move values without changing them: each output element is one input element.
_VIEWS = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.permute.default,
    aten.transpose.int, aten.expand.default, aten.clone.default, aten.alias.default,
)
_MAX_ACTIVATION_NODES = 64

Desc = tuple[tuple[str, ...], ...]  # per dim: the named axes it holds, row-major


def _is_view(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in _VIEWS


def _trace_back(node: Node, stop: Callable[[Node], bool] | None = None) -> tuple[Node, list[Node]]:
    """Walk back through views: (the first node that is no view, or where ``stop`` holds; the views
    in between, in forward order)."""
    chain = []
    while _is_view(node) and not (stop is not None and stop(node)):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _views_after(node: Node) -> list[Node]:
    """The views that follow ``node``, each the single user of the one before."""
    chain = []
    while len(node.users) == 1 and _is_view(next(iter(node.users))):
        node = next(iter(node.users))
        chain.append(node)
    return chain


def _gather(node) -> tuple[Node, Node] | None:
    """``W[idx]`` (aten.index with one integer index tensor) -> (W, idx)."""
    if is_call(node, aten.index.Tensor) and len(node.args[1]) == 1:
        idx = node.args[1][0]
        if isinstance(idx, Node) and val(idx).dtype in INDEX_DTYPES:
            return node.args[0], idx
    return None


# ---- Axis descriptors -----------------------------------------------------------------------------


class _Axes:
    """Sizes of the named axes, and how views, gathers and GEMMs move them."""

    def __init__(self, sizes: dict[str, object]):
        self.sizes = sizes

    def label(self, names) -> Desc:
        return tuple(() if same_size(self.sizes[n], 1) else (n,) for n in names)

    def fits(self, desc: Desc, node: Node) -> None:
        shape = val(node).shape
        if len(desc) != len(shape):
            raise Rejected(f"{node.name}: {len(shape)} dims, descriptor {desc}")
        for dim, size in zip(desc, shape, strict=True):
            product = 1
            for axis in dim:
                product = product * self.sizes[axis]
            if not same_size(product, size):
                raise Rejected(f"{node.name}: size {size} is not that of axes {dim}")
        axes = [a for dim in desc for a in dim]
        if len(set(axes)) != len(axes):
            raise Rejected(f"{node.name}: an axis appears twice in {desc}")

    def regroup(self, desc: Desc, shape) -> Desc:
        """A reshape (view, squeeze, unsqueeze): the same axes in row-major order, grouped by size."""
        axes = [a for dim in desc for a in dim]
        out, i = [], 0
        for size in shape:
            if same_size(size, 1):
                out.append(())
                continue
            group, product = [], 1
            while i < len(axes):
                group.append(axes[i])
                product = product * self.sizes[axes[i]]
                i += 1
                if same_size(product, size):
                    break
            else:
                raise Rejected(f"a reshape to {tuple(shape)} splits an axis of {desc}")
            out.append(tuple(group))
        if i != len(axes):
            raise Rejected(f"a reshape to {tuple(shape)} splits an axis of {desc}")
        return tuple(out)

    def through(self, desc: Desc, node: Node) -> Desc:
        """The descriptor of view ``node``'s output, given its input's."""
        shape = val(node).shape
        target = node.target
        if target in (aten.clone.default, aten.alias.default):
            out = desc
        elif target is aten.permute.default:
            out = tuple(desc[d % len(desc)] for d in node.args[1])
        elif target is aten.transpose.int:
            dims = list(desc)
            i, j = node.args[1] % len(desc), node.args[2] % len(desc)
            dims[i], dims[j] = dims[j], dims[i]
            out = tuple(dims)
        elif target is aten.expand.default:
            # A dim broadcast from size 1 repeats the same values along it: it is the slot axis a
            # (x.repeat_interleave(K)) or nothing this form knows.
            in_shape = val(node.args[0]).shape
            new = len(shape) - len(in_shape)
            padded = ((),) * new + tuple(desc)
            in_sizes = (1,) * new + tuple(in_shape)
            dims = []
            for dim, before, after in zip(padded, in_sizes, shape, strict=True):
                if same_size(before, 1) and not same_size(after, 1):
                    if not same_size(after, self.sizes["a"]):
                        raise Rejected(f"{node.name} broadcasts to size {after}, not over the K slots")
                    dim = ("a",)
                dims.append(dim)
            out = tuple(dims)
        else:  # view, reshape, _unsafe_view, squeeze, unsqueeze
            out = self.regroup(desc, shape)
        self.fits(out, node)
        return out

    def along(self, desc: Desc, chain: list[Node]) -> Desc:
        for node in chain:
            desc = self.through(desc, node)
        return desc

    def broadcast(self, p: Desc, q: Desc, node: Node) -> Desc:
        """An elementwise op's output: dims aligned from the right, each equal or one of them ()."""
        n = max(len(p), len(q))
        p, q = ((),) * (n - len(p)) + p, ((),) * (n - len(q)) + q
        out = []
        for a, b in zip(p, q, strict=True):
            if a != b and a and b:
                raise Rejected(f"{node.name} combines axes {a} and {b} elementwise")
            out.append(a or b)
        out = tuple(out)
        self.fits(out, node)
        return out

    def bmm(self, p: Desc, q: Desc, node: Node) -> tuple[Desc, tuple[str, ...]]:
        """(the bmm's output descriptor, the contracted axes)."""
        if p[0] != q[0]:
            raise Rejected(f"{node.name} pairs batch axes {p[0]} with {q[0]}")
        if p[2] != q[1]:
            raise Rejected(f"{node.name} contracts axes {p[2]} with {q[1]}")
        out = (p[0], p[1], q[2])
        self.fits(out, node)
        return out, p[2]


# ---- The pieces of a block ------------------------------------------------------------------------


@dataclass
class _Gemm:
    """``bmm(W[idx] viewed, other viewed)`` [+ ``b[idx]`` viewed]: one batched projection of the slots."""

    bmm: Node
    out: Node  # the bmm, or the bias add
    weight: Node
    idx: Node
    gather: Node
    weight_chain: list[Node]
    weight_first: bool
    other: Node = None  # the operand's source (x or the activation), filled in by the caller
    other_chain: list[Node] = field(default_factory=list)
    bmm_chain: list[Node] = field(default_factory=list)  # bmm -> the add's operand
    bias: Node | None = None
    bias_idx: Node | None = None
    bias_gather: Node | None = None
    bias_chain: list[Node] = field(default_factory=list)

    def nodes(self) -> set[Node]:
        found = {self.bmm, self.out, self.gather, *self.weight_chain, *self.other_chain, *self.bmm_chain}
        if self.bias is not None:
            found |= {self.bias_gather, *self.bias_chain}
        return found

    def operand(self, weight: bool) -> Node:
        return self.bmm.args[0 if weight == self.weight_first else 1]


def _gemm_output(src: Node) -> tuple[Node, list[Node], Node | None, list[Node]] | None:
    """``src`` is a bmm, or a bmm plus a gathered bias: (bmm, views bmm -> add, bias gather, its views)."""
    if is_call(src, aten.bmm.default):
        return src, [], None, []
    if is_call(src, aten.add.Tensor) and len(src.args) == 2 and not src.kwargs:
        for p, q in (src.args, src.args[::-1]):
            if not (isinstance(p, Node) and isinstance(q, Node)):
                continue
            bmm, bmm_chain = _trace_back(p)
            bias_gather, bias_chain = _trace_back(q)
            found = _gather(bias_gather)
            if is_call(bmm, aten.bmm.default) and found is not None and val(found[0]).dim() == 2:
                return bmm, bmm_chain, bias_gather, bias_chain
    return None


def _parse_gemm(src: Node) -> _Gemm:
    found = _gemm_output(src)
    if found is None:
        raise Rejected(f"{src.name} is not a bmm (plus a gathered bias)")
    bmm, bmm_chain, bias_gather, bias_chain = found
    sides = []
    for weight_first in (True, False):
        gather, weight_chain = _trace_back(bmm.args[0 if weight_first else 1])
        gathered = _gather(gather)
        if gathered is not None and val(gathered[0]).dim() == 3:
            sides.append((weight_first, gather, weight_chain, gathered))
    if len(sides) != 1:
        raise Rejected(f"{bmm.name} does not multiply one gathered (E, ., .) weight by the slots' rows")
    ((weight_first, gather, weight_chain, (weight, idx)),) = sides
    gemm = _Gemm(bmm, src, weight, idx, gather, weight_chain, weight_first, bmm_chain=bmm_chain)
    gemm.other, gemm.other_chain = _trace_back(gemm.operand(weight=False))
    if bias_gather is not None:
        gemm.bias, gemm.bias_idx = _gather(bias_gather)
        gemm.bias_gather, gemm.bias_chain = bias_gather, bias_chain
    return gemm


def _ids_chain(idx: Node) -> tuple[Node, list[Node], list[Node]]:
    """Walk back from a gather's index through views and clamps: (the ids, the chain, the clamps)."""
    chain, clamps = [], []
    node = idx
    while _is_view(node) or is_call(node, CLAMPS):
        chain.append(node)
        if not _is_view(node):
            clamps.append(node)
        node = node.args[0]
    return node, chain[::-1], clamps


def _clamp_bounds(clamp: Node) -> tuple[object, object]:
    if clamp.target is aten.clamp_min.default:
        return clamp.args[1], None
    if clamp.target is aten.clamp_max.default:
        return None, clamp.args[1]
    return arg(clamp, 1, "min", None), arg(clamp, 2, "max", None)


def _topo(nodes: set[Node]) -> list[Node]:
    order, done = [], set()
    for start in nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in done:
                continue
            if expanded:
                done.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((n, False) for n in node.all_input_nodes if n in nodes and n not in done)
    return order


# ---- The activation between the two GEMMs ---------------------------------------------------------


@dataclass
class _Activation:
    name: str
    form: str  # "concat" | "interleaved" | "ungated" | "separate"
    constants: dict
    nodes: set[Node]  # the activation's own nodes (inputs excluded)
    inputs: list[tuple[Node, list[Node]]]  # per GEMM output (gate first): (its source, the views the activation reads)


def _activation(h: Node) -> _Activation:
    """What ``h`` computes from one or two GEMM outputs, compared with the op's activations."""
    groups: dict[Node, list[Node]] = {}
    nodes: set[Node] = set()
    stack = [h]
    while stack:
        node = stack.pop()
        if node in nodes or any(node in g for g in groups.values()):
            continue
        src, _ = _trace_back(node)
        if node is not h and _gemm_output(src) is not None:
            groups.setdefault(src, []).append(node)
            continue
        if node.op != "call_function" or len(nodes) >= _MAX_ACTIVATION_NODES:
            raise Rejected(f"{h.name} is not computed from the gate_up projection alone")
        nodes.add(node)
        stack.extend(node.all_input_nodes)
    if len(groups) not in (1, 2):
        raise Rejected(f"{h.name} reads {len(groups)} GEMM outputs, not one gate_up or a gate and an up")
    for readers in groups.values():
        if any(tuple(val(r).shape) != tuple(val(readers[0]).shape) for r in readers):
            raise Rejected(f"{h.name} reads views of different shapes of one GEMM output")

    # A scratch copy of the activation, each GEMM output one input however many views of it it reads
    # (their descriptors are checked equal by the caller).
    scratch = Graph()
    env: dict[Node, Node] = {}
    inputs = []
    for i, readers in enumerate(groups.values()):
        placeholder = scratch.placeholder(f"gemm_out_{i}")
        placeholder.meta["val"] = val(readers[0])
        inputs.append(placeholder)
        env.update(dict.fromkeys(readers, placeholder))

    def copy_arg(node: Node) -> Node:
        if node not in env:
            env[node] = scratch.placeholder(f"other_{len(env)}")
            env[node].meta["val"] = val(node)
        return env[node]

    for node in _topo(nodes):
        env[node] = scratch.node_copy(node, copy_arg)
    original = {copy: node for node, copy in env.items()}

    sources = list(groups)
    if len(groups) == 1:
        tries = [(form, [0]) for form in ("concat", "interleaved", "ungated")]
    else:
        tries = [("separate", [0, 1]), ("separate", [1, 0])]
    reasons = []
    for form, order in tries:
        try:
            name, matched, constants = match_any_activation(env[h], [inputs[i] for i in order], form)
        except Rejected as reason:
            reasons.append(str(reason))
            continue
        return _Activation(
            name, form, constants, {original[n] for n in matched} | nodes,
            [(sources[i], groups[sources[i]]) for i in order],
        )
    raise Rejected("; ".join(dict.fromkeys(reasons)))


# ---- The block ------------------------------------------------------------------------------------


@dataclass
class _Block:
    """A candidate's pieces, found walking back from the combine."""

    root: Node  # the combine: a sum over one dim, a bmm (einsum), or a mul (einsum, K = 1)
    down: _Gemm
    y_first: bool  # the down projection's output is the combine's (the mul's or bmm's) first operand
    y_chain: list[Node]  # views: down.out -> combine operand
    w_side: Node  # the combine operand carrying the routing weights
    weighted: Node | None = None  # sum: the mul of the slot outputs by their weights
    sum_chain: list[Node] = field(default_factory=list)  # sum: views mul -> sum input
    forward: list[Node] = field(default_factory=list)  # bmm: the single-user views after it
    activation: _Activation | None = None
    gemms: list[_Gemm] = field(default_factory=list)  # [gate_up] or [gate, up]
    ids: Node | None = None
    idx_chains: dict[Node, list[Node]] = field(default_factory=dict)
    clamps: set[Node] = field(default_factory=set)
    x: Node | None = None
    weights: Node | None = None
    w_chain: list[Node] = field(default_factory=list)

    @property
    def combine(self) -> str:
        if self.weighted is not None:
            return "sum"
        return "product (K = 1)" if is_call(self.root, aten.mul.Tensor) else "bmm"

    def gathers(self) -> list[tuple[Node, Node]]:
        """(gather, idx) of every gathered weight and bias."""
        found = []
        for gemm in (*self.gemms, self.down):
            found.append((gemm.gather, gemm.idx))
            if gemm.bias is not None:
                found.append((gemm.bias_gather, gemm.bias_idx))
        return found

    def region(self, result_at: int | None) -> set[Node]:
        region = {self.root, *self.y_chain, *self.w_chain, *self.sum_chain, *self.down.nodes()}
        if self.weighted is not None:
            region.add(self.weighted)
        if result_at is not None:
            region |= set(self.forward[: result_at + 1])
        region |= self.activation.nodes
        for _, readers in self.activation.inputs:
            for reader in readers:
                region |= {reader, *_trace_back(reader)[1]}
        for gemm in self.gemms:
            region |= gemm.nodes()
        for chain in self.idx_chains.values():
            region |= set(chain)
        return region


def _find(root: Node) -> _Block:
    if is_call(root, aten.sum.dim_IntList):
        # (y * w).view(T, K, H).sum(1): the sum's input goes back through views to the weighting.
        if len(root.args[1]) != 1 or arg(root, 2, "keepdim", False) or arg(root, 3, "dtype", None) is not None:
            raise Rejected("not a sum over one dim")
        weighted, sum_chain = _trace_back(root.args[0])
        if not (is_call(weighted, aten.mul.Tensor) and len(weighted.args) == 2):
            raise Rejected("the summed slot outputs are not multiplied by their routing weights")
        operands = weighted.args
    else:  # a bmm, or a mul (K = 1): the slot outputs and the weights are its operands
        weighted, sum_chain, operands = None, [], root.args
    reasons = []
    for y_first in (True, False):
        y_side, w_side = operands if y_first else operands[::-1]
        if not (isinstance(y_side, Node) and isinstance(w_side, Node)):
            raise Rejected("the combine is not of two tensors")
        src, y_chain = _trace_back(y_side)
        try:
            down = _parse_gemm(src)
        except Rejected as reason:
            reasons.append(str(reason))
            continue
        block = _Block(root, down, y_first, y_chain, w_side, weighted, sum_chain)
        break
    else:
        raise Rejected("no side of the combine is a gathered-weight projection: " + "; ".join(reasons))
    if weighted is None:
        block.forward = _views_after(root)

    block.activation = _activation(down.other)
    block.gemms = [_parse_gemm(src) for src, _ in block.activation.inputs]

    # Every gather indexes by views and clamps of one (..., K) integer tensor whose leading dims are the
    # tokens (Zaya's router hands the experts (batch, sequence, K) ids).
    for gather, idx in block.gathers():
        ids, chain, clamps = _ids_chain(idx)
        if block.ids is not None and ids is not block.ids:
            raise Rejected(f"{gather.name} gathers by other ids than {block.down.gather.name}")
        block.ids = ids
        block.idx_chains[idx] = chain
        block.clamps |= set(clamps)
    ids_shape = val(block.ids).shape
    if len(ids_shape) < 2 or val(block.ids).dtype not in INDEX_DTYPES:
        raise Rejected(f"the gathers' ids {block.ids.name} are not a (..., K) integer tensor "
                       f"({tuple(ids_shape)}, {val(block.ids).dtype})")
    num_tokens, top_k = functools.reduce(operator.mul, ids_shape[:-1]), ids_shape[-1]

    def token_rows(node: Node) -> bool:
        return val(node).dim() == 2 and same_size(val(node).shape[0], num_tokens)

    for gemm in block.gemms:
        gemm.other, gemm.other_chain = _trace_back(gemm.operand(weight=False), token_rows)
    block.x = block.gemms[0].other
    if not token_rows(block.x) or not val(block.x).is_floating_point():
        raise Rejected("the gate_up projection does not read (T, H) token rows")
    if any(gemm.other is not block.x for gemm in block.gemms):
        raise Rejected("the gate and up projections read different token rows")

    def slot_table(node: Node) -> bool:  # (T, K), or shaped as the ids
        shape = val(node).shape
        return (token_rows(node) and same_size(shape[1], top_k)) or (
            len(shape) == len(ids_shape) > 2 and all(same_size(a, b) for a, b in zip(shape, ids_shape, strict=True)))

    block.weights, block.w_chain = _trace_back(block.w_side, slot_table)
    if not (slot_table(block.weights) and val(block.weights).is_floating_point()):
        raise Rejected("the slot outputs are not weighted by a (T, K) float tensor (or one shaped as the ids)")
    return block


def _follow_axes(block: _Block, layout: str) -> int | None:
    """Follow the axes from the sources to the result with the weights in ``layout``. Raises Rejected
    unless each GEMM contracts its right axis (h, then f), the activation acts on the gate_up
    features, and the result is the routing-weighted sum over the slots, as (T, H). Returns where
    in ``block.forward`` a bmm or product combine's result is (None for a sum)."""
    down = block.down
    n_dim, f_dim = (1, 2) if layout == "EFH" else (2, 1)
    ids_shape = val(block.ids).shape
    # The token axes: "t", or one per leading dim of (..., K) ids, which x's rows hold merged.
    token_names = ("t",) if len(ids_shape) == 2 else tuple(f"t{i}" for i in range(len(ids_shape) - 1))
    axes = _Axes({
        **dict(zip(token_names, ids_shape[:-1], strict=True)), "a": ids_shape[-1], "h": val(block.x).shape[1],
        "n": val(block.gemms[0].weight).shape[n_dim], "f": val(down.weight).shape[f_dim],
    })
    tokens_split = tuple(() if same_size(axes.sizes[n], 1) else (n,) for n in token_names)
    tokens = (tuple(n for n in token_names if not same_size(axes.sizes[n], 1)),)
    gate_up_names, down_names = ("nh", "hf") if layout == "EFH" else ("hn", "fh")
    ids_desc = tokens_split + axes.label("a")
    axes.fits(ids_desc, block.ids)

    def gathered(gather: Node, idx: Node, names: str) -> Desc:
        desc = ids_desc
        for node in block.idx_chains[idx]:
            if _is_view(node):  # a clamp keeps the axes
                desc = axes.through(desc, node)
        desc = desc + axes.label(names)
        axes.fits(desc, gather)
        return desc

    def projection(gemm: _Gemm, names: str, other_desc: Desc, contracted: str, bias_name: str) -> Desc:
        w_desc = axes.along(gathered(gemm.gather, gemm.idx, names), gemm.weight_chain)
        o_desc = axes.along(other_desc, gemm.other_chain)
        out, contraction = axes.bmm(*((w_desc, o_desc) if gemm.weight_first else (o_desc, w_desc)), gemm.bmm)
        if contraction != axes.label(contracted)[0]:
            raise Rejected(f"{gemm.bmm.name} contracts axes {contraction}, not {contracted}")
        if gemm.bias is not None:
            out = axes.along(out, gemm.bmm_chain)
            b_desc = axes.along(gathered(gemm.bias_gather, gemm.bias_idx, bias_name), gemm.bias_chain)
            same_axes = sorted(a for d in b_desc for a in d) == sorted(a for d in out for a in d)
            if axes.broadcast(out, b_desc, gemm.out) != out or not same_axes:
                raise Rejected(f"{gemm.out.name} does not add each slot's expert bias")
        return out

    # gate_up (gate, up): x's rows against the gathered weights, then the activation on the features.
    x_desc = tokens + axes.label("h")
    axes.fits(x_desc, block.x)
    act_in = None
    for gemm, (_, readers) in zip(block.gemms, block.activation.inputs, strict=True):
        out = projection(gemm, gate_up_names, x_desc, "h", "n")
        for reader in readers:
            desc = axes.along(out, _trace_back(reader)[1])
            if act_in is not None and desc != act_in:
                raise Rejected(f"the activation reads {reader.name} with axes {desc}, not {act_in}")
            act_in = desc
    if act_in[-1] != axes.label("n")[0]:
        raise Rejected(f"the activation's input has axes {act_in}: the gate_up features are not its last dim")
    h_desc = act_in[:-1] + axes.label("f")
    axes.fits(h_desc, down.other)

    # down, then the combine: sum_a y[t, a, h] * w[t, a].
    y_desc = axes.along(projection(down, down_names, h_desc, "f", "h"), block.y_chain)
    weights_tokens = tokens_split if val(block.weights).dim() > 2 else tokens
    w_desc = axes.along(weights_tokens + axes.label("a"), block.w_chain)
    operands = (y_desc, w_desc) if block.y_first else (w_desc, y_desc)
    slot, token_hidden = axes.label("a")[0], tokens + axes.label("h")
    if block.weighted is not None:
        summed = axes.along(axes.broadcast(*operands, block.weighted), block.sum_chain)
        dim = block.root.args[1][0] % len(summed)
        kept = summed[:dim] + summed[dim + 1:]
        if summed[dim] != slot or kept != token_hidden:
            raise Rejected(f"the sum over axes {summed[dim]} leaves {kept}: not the weighted sum over the K slots")
        return None
    if is_call(block.root, aten.mul.Tensor):
        # The weighted sum over the slots is the product itself only where there is one slot.
        if not same_size(axes.sizes["a"], 1):
            raise Rejected(f"{block.root.name} weights the slot outputs with no sum over the K slots")
        desc = axes.broadcast(*operands, block.root)
    else:
        desc, contraction = axes.bmm(*operands, block.root)
        if contraction != slot:
            raise Rejected(f"the combine contracts axes {contraction}, not the K slots")
    for i, node in enumerate(block.forward):
        desc = axes.through(desc, node)
        if desc == token_hidden and val(node).dim() == 2:
            return i
    raise Rejected("the combine's result is not viewed as (T, H)")


def _match(root: Node) -> ExpertsMatch:
    block = _find(root)
    reasons = []
    for layout in ("EFH", "EHF"):
        try:
            result_at = _follow_axes(block, layout)
        except Rejected as reason:
            reasons.append(f"{layout} weights: {reason}")
            continue
        break
    else:
        raise Rejected("; ".join(dict.fromkeys(reasons)))
    region = block.region(result_at)
    result = block.root if result_at is None else block.forward[result_at]
    x = block.x
    # fp32 routing weights (Mixtral) make the slot outputs fp32: the sum is cast back.
    if val(result).dtype != val(x).dtype and len(result.users) == 1:
        (cast,) = result.users
        if is_call(cast, prims.convert_element_type.default) and cast.args[1] == val(x).dtype:
            result = cast
            region.add(cast)

    # The ids' range: no id outside the op's [0, E), every clamp a no-op.
    ids, num_experts = block.ids, val(block.down.weight).shape[0]
    bound = ids_bound(ids)
    if bound is None:
        raise Rejected(
            f"the ids {ids.name} are not a top-k's or a max's indices in this graph: ids outside [0, {num_experts}) "
            "would be clamped or wrap around here and be skipped by the op"
        )
    if bound > num_experts:
        raise Rejected(f"the ids are a top-k over {bound} scores, more than the {num_experts} experts")
    for clamp in block.clamps:
        low, high = _clamp_bounds(clamp)
        if not ((low is None or low <= 0) and (high is None or high >= bound - 1)):
            raise Rejected(f"{clamp.name} clamps the ids to [{low}, {high}]: it changes ids in [0, {bound})")
    notes = [f"combine: {block.combine}"]
    if block.clamps:
        notes.append(f"ids clamp dropped (top-k over {bound} experts)")

    gate, up = block.gemms[0], (block.gemms[1] if len(block.gemms) == 2 else None)
    activation = block.activation
    match = ExpertsMatch(
        form="weight_gather", result=result, region=region, x=x, topk_weights=block.weights, topk_ids=ids,
        w_gate_up=gate.weight, w_down=block.down.weight, w_up=up.weight if up else None, b_gate_up=gate.bias,
        b_up=up.bias if up else None, b_down=block.down.bias, layout=layout,
        interleaved=activation.form == "interleaved", activation=activation.name,
        gated=activation.form != "ungated", alpha=activation.constants.get("alpha", CLAMPED_SWIGLU_ALPHA),
        limit=activation.constants.get("limit", CLAMPED_SWIGLU_LIMIT), notes=notes,
    )
    return match


def find_weight_gather_blocks(graph: Graph) -> Iterator[Callable[[], ExpertsMatch]]:
    """Candidates: a sum over one dim of a product (the weighted slot outputs) or of a projection's
    output, a bmm of which no operand is a gathered weight (an einsum combine), or a product of a
    projection's output with something not summed after it (an einsum combine over one slot); each call
    matches one or raises Rejected."""
    for node in list(graph.nodes):
        if is_call(node, aten.sum.dim_IntList) and val(node.args[0]) is not None:
            summed = _trace_back(node.args[0])[0]
            if is_call(summed, aten.mul.Tensor) or _gemm_output(summed) is not None:
                yield lambda root=node: _match(root)
        elif is_call(node, aten.bmm.default):
            if all(_gather(_trace_back(a)[0]) is None for a in node.args[:2]):
                yield lambda root=node: _match(root)
        elif is_call(node, aten.mul.Tensor) and _one_slot_combine(node):
            yield lambda root=node: _match(root)


def _one_slot_combine(node: Node) -> bool:
    """A product of a projection's output and another tensor whose result is not summed (through views) after:
    the combine of one slot, if anything."""
    if not all(isinstance(a, Node) and val(a) is not None for a in node.args):
        return False
    if not any(_gemm_output(_trace_back(a)[0]) is not None for a in node.args):
        return False
    last = (_views_after(node) or [node])[-1]
    return not any(is_call(user, aten.sum.dim_IntList) for user in last.users)
