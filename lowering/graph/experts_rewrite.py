"""Rewrite: a whole routed-experts block in the post-grad graph -> one ``moe_ops.fused_experts`` call.

The forms (one ``match_*`` module each, listed in pipeline.py) find a candidate block and describe it as
an ``ExpertsMatch``: the op's inputs (graph nodes), its options, the node whose value the op computes
and the set of nodes it replaces (Llama 4's form also a scale of x's rows, which this module inserts with
the term that keeps rows holding an inf or NaN NaN). This module checks what every form must hold before
anything is replaced, and replaces:

- the block's result has x's dtype and shape (T, H), the ids and weights are (..., K), their leading dims
  T tokens (viewed as (T, K) for the op);
- no node of the block other than its result is read outside the block (its intermediates die);
- the activation between the two GEMMs is, node for node, what Inductor makes of the activation the
  op computes (``match_activation``: the candidate is compared with a traced reference, so every
  constant, cast and operand order is checked, not guessed).

Rounding: the op computes each GEMM in fp32 and rounds the activation and each slot's output once,
where the plain code also rounds the GEMM outputs and each step of the activation to the input
dtype; the rewritten block is the same computation with fewer roundings (within the tolerances
that tests/ apply to every moe_ops op). Ties and sentinel ids (>= E: dropped, as the plain code
masks them) behave as in the plain code.
"""

from __future__ import annotations

import functools
import logging
import operator
import struct
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

import moe_ops.fused_experts  # noqa: F401  (defines moe_ops::fused_experts, emitted here)
import moe_ops.routing  # noqa: F401  (defines moe_ops::route, read here)
import moe_ops.unchosen_experts  # noqa: F401  (defines moe_ops::unchosen_expert_gradients, emitted here)
from moe_ops._compat.dynamo import counters, detect_fake_mode
from moe_ops._compat.inductor import select_decomp_table
from moe_ops.activations import CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT, check_clamp_constants
from moe_ops.fused_experts import check_fused_args
from moe_ops.lowering.graph.fx_match import (
    CLAMPS,
    MATCHER_ERRORS,
    MATCHER_FAILED,
    PRIMALS,
    ROUTE_REJECTED,
    TANGENTS,
    Rejected,
    aten,
    closure,
    has_placeholder,
    is_call,
    new_node,
    prims,
    same_shape,
    same_size,
    val,
)
from moe_ops.settings import config

log = logging.getLogger("moe_ops")

# Placeholder constants traced into the activation templates, bound to the graph's own values.
_ALPHA, _LIMIT = 1.2345678, 8.7654321
_COMMUTATIVE = (aten.mul.Tensor, aten.add.Tensor)


@dataclass
class ExpertsMatch:
    """A recognised routed-experts block and the ``moe_ops.fused_experts`` call that replaces it."""

    form: str  # which code it came from, for the log
    result: Node  # (T, H) in x's dtype; its users read the op's output instead
    region: set[Node]  # every node the op replaces (result included, inputs excluded)
    x: Node
    topk_weights: Node
    topk_ids: Node
    w_gate_up: Node
    w_down: Node
    w_up: Node | None = None
    b_gate_up: Node | None = None
    b_up: Node | None = None
    b_down: Node | None = None
    layout: str = "EFH"
    interleaved: bool = False
    activation: str = "silu"
    gated: bool = True
    alpha: float = CLAMPED_SWIGLU_ALPHA
    limit: float = CLAMPED_SWIGLU_LIMIT
    notes: list[str] = field(default_factory=list)
    # Llama 4's form (K = 1): x's rows scaled by these elementwise nodes (a cast, a sigmoid) replayed on
    # topk_weights, routing weights of 1, and each row of x holding an inf or NaN made NaN in the output.
    input_scale_chain: list[Node] | None = None
    # Ids from this value on are sentinel slots (expert parallelism's), whose rows the plain code zeroes and then
    # multiplies by their routing weight: 0 * w, NaN for an inf or NaN weight, which the output keeps. None: the
    # ids are shown to be below it, or the form has no sentinels.
    sentinel_from: int | None = None

    def describe(self) -> str:
        hidden = val(self.x).shape[-1]
        experts, top_k = val(self.w_gate_up).shape[0], val(self.topk_ids).shape[-1]
        parts = [f"E={experts}", f"K={top_k}", f"H={hidden}", self.layout, self.activation]
        if self.interleaved:
            parts.append("interleaved")
        if self.w_up is not None:
            parts.append("separate w_up")
        if any(b is not None for b in (self.b_gate_up, self.b_up, self.b_down)):
            parts.append("biases")
        return ", ".join(parts + self.notes)


# ---- Activations ---------------------------------------------------------------------------------


def _activation_fn(activation: str, gate_up_form: str, written: int = 0):
    """The activation as transformers / torchtitan write it, from the gate_up GEMM output(s); ``written`` picks
    one of the ways code writes it (_WRITTEN_FORMS)."""
    act = {
        "silu": F.silu, "relu": F.relu, "gelu": F.gelu,
        "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
        "relu2": lambda g: torch.square(F.relu(g)),  # transformers' ReLUSquaredActivation
    }.get(activation)

    def split(gate_up):
        if gate_up_form == "interleaved":
            return gate_up[..., ::2], gate_up[..., 1::2]
        return gate_up.chunk(2, dim=-1)

    if activation == "clamped_swiglu":
        def fn(*inputs):
            gate, up = split(inputs[0]) if len(inputs) == 1 else inputs
            gate = gate.clamp(min=None, max=_LIMIT)
            up = up.clamp(min=-_LIMIT, max=_LIMIT)
            glu = gate * torch.sigmoid(gate * _ALPHA)
            if written == 1:  # torchtitan's swiglu: glu + glu * up in one op, one rounding (the op's is none)
                return torch.addcmul(glu, glu, up)
            return (up + 1) * glu  # transformers' GPT-OSS _apply_gate
        return fn
    if activation == "clamped_silu":  # GLM-5-Next's, HY-V4's, DeepSeek-V4's experts
        def clamped(*inputs):
            gate, up = split(inputs[0]) if len(inputs) == 1 else inputs
            return F.silu(gate.clamp(min=None, max=_LIMIT)) * up.clamp(min=-_LIMIT, max=_LIMIT)
        return clamped
    if gate_up_form == "ungated":
        return lambda up: act(up)  # one parameter: make_fx traces F.silu's ``inplace`` as a second input

    def gated(*inputs):
        gate, up = split(inputs[0]) if len(inputs) == 1 else inputs
        return act(gate) * up

    return gated


# How many ways code writes an activation (the same function of gate and up): _activation_fn's ``written``.
_WRITTEN_FORMS = {"clamped_swiglu": 2}


@functools.cache
def _activation_template(activation: str, gate_up_form: str, dtype: torch.dtype, width: int, written: int) -> Graph:
    """The post-grad graph of the activation: traced with Inductor's decompositions, as Inductor does.
    ``width`` is the gate_up output width (it appears in the split)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    num_inputs = 2 if gate_up_form == "separate" else 1
    example = [torch.zeros(2, width, dtype=dtype) for _ in range(num_inputs)]
    fn = _activation_fn(activation, gate_up_form, written)
    return make_fx(fn, decomposition_table=select_decomp_table())(*example).graph


def _duplicates(node: Node, other, found: set[Node]) -> bool:
    """Whether ``other`` computes what ``node`` computes: it is ``node``, or it calls the same functional,
    deterministic target with the same constants and with arguments that are ``node``'s or duplicates of
    them. The duplicates found (``node`` excluded) are added to ``found``."""
    if other is node:
        return True
    if not (isinstance(other, Node) and node.op == other.op == "call_function" and node.target == other.target
            and node.kwargs == other.kwargs and len(node.args) == len(other.args)):
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and (
            target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags):
        return False
    if not isinstance(target, torch._ops.OpOverload) and target is not operator.getitem:
        return False
    new = set()
    for mine, theirs in zip(node.args, other.args, strict=True):
        if isinstance(mine, Node):
            if not _duplicates(mine, theirs, new):
                return False
        elif isinstance(theirs, Node) or mine != theirs:
            return False
    found |= new | {other}
    return True


def _round_trip_dtype(t: Node) -> torch.dtype | None:
    """The narrow dtype of a template's ``convert(convert(a, narrow), float32)`` (a rounding to narrow), else
    None. Decompositions of a bf16/fp16 op compute in float32 and round each result to the narrow dtype."""
    if not (is_call(t, prims.convert_element_type.default) and t.args[1] == torch.float32):
        return None
    inner = t.args[0]
    if is_call(inner, prims.convert_element_type.default) and inner.args[1] in (torch.bfloat16, torch.float16):
        return inner.args[1]
    return None


def _narrow_holds(value: float, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` (bfloat16 or float16) holds ``value`` exactly. In Python, not with a tensor: the
    passes also run under a fake mode (training graphs), where a tensor's value cannot be read."""
    try:
        if dtype == torch.float16:
            return struct.unpack("<e", struct.pack("<e", value))[0] == value
        bits = struct.unpack("<I", struct.pack("<f", value))[0]  # bfloat16: float32's upper 16 bits
    except OverflowError:
        return False
    return struct.unpack("<f", struct.pack("<I", bits))[0] == value and bits & 0xFFFF == 0


def _holds_exactly(g: Node, dtype: torch.dtype) -> bool:
    """Whether every value of the float32 ``g`` is one ``dtype`` holds: ``g`` clamps (by bounds ``dtype``
    holds) values upcast from ``dtype``. Then rounding ``g`` to ``dtype`` changes nothing, and Inductor may
    drop the rounding (torch 2.11 drops it after the clamp of GLM-5-Next's gate; torch 2.13 keeps it)."""
    while is_call(g, CLAMPS):
        for bound in g.args[1:]:
            if bound is None:
                continue
            if not isinstance(bound, (int, float)) or isinstance(bound, bool):
                return False
            if not _narrow_holds(float(bound), dtype):
                return False
        g = g.args[0]
    return is_call(g, prims.convert_element_type.default) and val(g.args[0]) is not None and (
        val(g.args[0]).dtype == dtype)


class _TemplateMatch:
    """Node-for-node comparison of a template graph with the graph, walking back from the outputs."""

    def __init__(self):
        self.nodes: dict[Node, Node] = {}  # template node -> graph node
        self.constants: dict[str, float] = {}
        # Graph nodes that recompute a matched node (Inductor leaves e.g. a split of a squeeze twice when
        # gate and up are read from two squeezes of one GEMM output): part of the match too.
        self.duplicates: set[Node] = set()
        # Constants (alpha, limit) the graph reads at run time instead: named in the refusal.
        self.runtime_constants: set[str] = set()

    def constant(self, t, g) -> bool:
        if isinstance(t, float) and abs(abs(t) - _LIMIT) < 1e-9 or t == _ALPHA:
            name, sign = ("alpha", 1.0) if t == _ALPHA else ("limit", 1.0 if t > 0 else -1.0)
            if isinstance(g, Node):
                self.runtime_constants.add(name)
            if not isinstance(g, (int, float)) or isinstance(g, bool):
                return False
            return self.constants.setdefault(name, sign * float(g)) == sign * float(g)
        if isinstance(t, (list, tuple)):
            return isinstance(g, (list, tuple)) and len(t) == len(g) and all(map(self.constant_or_node, t, g))
        if isinstance(t, (int, float)) and isinstance(g, (int, float)) and not isinstance(t, bool) and not isinstance(
                g, bool):
            # A Python scalar operand: 1 and 1.0 compute alike (MiniMax-M3-VL writes ``up + 1.0``).
            return t == g
        if isinstance(t, torch.SymInt | int) and isinstance(g, torch.SymInt | int) and not isinstance(t, bool):
            return same_size(t, g)
        return type(t) is type(g) and t == g

    def constant_or_node(self, t, g) -> bool:
        return self.node(t, g) if isinstance(t, Node) else self.constant(t, g)

    def node(self, t: Node, g) -> bool:
        if not isinstance(g, Node):
            return False
        if t in self.nodes:
            return _duplicates(self.nodes[t], g, self.duplicates)
        if t.op == "placeholder":
            self.nodes[t] = g
            return True
        narrow = _round_trip_dtype(t)
        if narrow is not None and g.target != t.target and _holds_exactly(g, narrow):
            # The graph has no rounding where the template rounds a value that the rounding leaves as it is.
            if self.node(t.args[0].args[0], g):
                self.nodes[t] = g
                return True
            return False
        if g.op != "call_function" or g.target != t.target or set(t.kwargs) != set(g.kwargs):
            return False
        self.nodes[t] = g
        orders = [g.args]
        if t.target in _COMMUTATIVE and len(g.args) == 2:
            orders.append(g.args[::-1])
        for args in orders:
            saved = dict(self.nodes), dict(self.constants), set(self.duplicates)
            if len(args) == len(t.args) and all(map(self.constant_or_node, t.args, args)) and all(
                self.constant_or_node(t.kwargs[k], g.kwargs[k]) for k in t.kwargs
            ):
                return True
            self.nodes, self.constants, self.duplicates = saved
        del self.nodes[t]
        return False


def match_activation(
    h: Node, inputs: list[Node], activation: str, gate_up_form: str, runtime_constants: set[str] | None = None
) -> tuple[set[Node], dict[str, float]] | None:
    """Whether ``h`` is ``activation`` applied to the gate_up GEMM output(s) ``inputs`` (one tensor
    split "concat" or "interleaved", or gate and up "separate"; "ungated": the one tensor).
    Returns the nodes computing it (inputs excluded) and the bound constants (alpha, limit).
    ``runtime_constants`` collects the constants (alpha, limit) found as tensors of the graph where the
    activation has a number: values known only at run time, which the op's float arguments cannot take."""
    width = val(inputs[0]).shape[-1]
    if not isinstance(width, int):
        return None
    for written in range(_WRITTEN_FORMS.get(activation, 1)):
        template = _activation_template(activation, gate_up_form, val(inputs[0]).dtype, width, written)
        placeholders = [n for n in template.nodes if n.op == "placeholder"]
        (output,) = [n for n in template.nodes if n.op == "output"]
        matcher = _TemplateMatch()
        matcher.nodes.update(zip(placeholders, inputs, strict=True))
        if matcher.node(output.args[0], h):
            break
        if runtime_constants is not None:
            runtime_constants |= matcher.runtime_constants
    else:
        return None
    try:  # constants the op refuses (a negative limit: torch's clamp then returns its bound) leave the code as it is
        check_clamp_constants(matcher.constants.get("alpha", CLAMPED_SWIGLU_ALPHA),
                              matcher.constants.get("limit", CLAMPED_SWIGLU_LIMIT))
    except ValueError:
        return None
    return {g for t, g in matcher.nodes.items() if t.op != "placeholder"} | matcher.duplicates, matcher.constants


def match_any_activation(h: Node, inputs: list[Node], gate_up_form: str) -> tuple[str, set[Node], dict]:
    """The first activation the op knows that ``h`` computes from ``inputs``; Rejected if none."""
    activations = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
    if gate_up_form != "ungated":
        activations += ("clamped_swiglu", "clamped_silu")
    runtime_constants: set[str] = set()
    for activation in activations:
        found = match_activation(h, inputs, activation, gate_up_form, runtime_constants)
        if found is not None:
            return activation, *found
    reason = f"{h.name} is no activation the op computes ({', '.join(activations)}, {gate_up_form} gate/up)"
    if runtime_constants:
        # torch.compile(dynamic=True) makes a float attribute (GPT-OSS's alpha) a graph input.
        reason += (f"; its {' and '.join(sorted(runtime_constants))} is a tensor read at run time, not a number "
                   "the op can take (torch.compile(dynamic=True) passes a float attribute so)")
    raise Rejected(reason)


# ---- Checking and replacing ----------------------------------------------------------------------


def strip_int64_cast(ids: Node) -> Node:
    """The op takes int32 or int64 ids: skip a widening cast of int32 ids (e.g. moe_ops.route's)."""
    if is_call(ids, prims.convert_element_type.default) and ids.args[1] == torch.int64:
        source = ids.args[0]
        if val(source) is not None and val(source).dtype == torch.int32:
            return source
    return ids


def check(match: ExpertsMatch) -> None:
    x, ids, weights, result = val(match.x), val(match.topk_ids), val(match.topk_weights), val(match.result)
    if x.dim() != 2 or ids.dim() < 2 or weights.dim() < 2 or not same_size(ids.shape[-1], weights.shape[-1]):
        raise Rejected("x is not (T, H) or ids and weights are not (..., K)")
    if not all(same_size(functools.reduce(operator.mul, t.shape[:-1]), x.shape[0]) for t in (ids, weights)):
        raise Rejected("ids, weights and x have different token counts")
    if ids.dtype not in (torch.int32, torch.int64) or not weights.is_floating_point():
        raise Rejected(f"ids of dtype {ids.dtype}, weights of dtype {weights.dtype}")
    if result.dtype != x.dtype or not same_shape(result.shape, x.shape):
        raise Rejected(f"result {result.dtype} {tuple(result.shape)} is not x's {x.dtype} {tuple(x.shape)}")
    for name in ("w_gate_up", "w_down", "w_up"):
        weight = getattr(match, name)
        if weight is not None and val(weight).dtype != x.dtype:
            raise Rejected(f"{name} is {val(weight).dtype}, x is {x.dtype}")
    _check_op_args(match)
    _add_size_reads(match.region)
    # Routing metadata that the code also reads elsewhere (the token counts torchtitan adds to its
    # load-balancing buffer, or an auxiliary loss reads) stays in the graph for those readers: it is computed
    # from the ids and routing weights alone, O(T K) work, and has the same value beside the op. A value
    # computed from x or the weights and read elsewhere would be computed twice: the block is left alone.
    data = [n for n in (match.x, match.w_gate_up, match.w_down, match.w_up, match.b_gate_up, match.b_up, match.b_down)
            if n is not None]
    from_data = closure(data, lambda node: [user for user in node.users if user in match.region])
    for node in match.region - {match.result}:
        outside = [user.name for user in node.users if user not in match.region]
        if outside and node in from_data:
            raise Rejected(f"{node.name} is also read outside the block (by {', '.join(outside)})")


def _check_op_args(match: ExpertsMatch) -> None:
    """The op's own argument checks (shapes, dtypes, K <= E; a bias of (E, 1) broadcast over the columns is no
    per-expert bias row): a call the op would refuse is a rejection, never emitted."""
    x, weights, ids, *tensors = [None if n is None else val(n) for n in (
        match.x, match.topk_weights, match.topk_ids, match.w_gate_up, match.w_down, match.w_up, match.b_gate_up,
        match.b_up, match.b_down)]
    with detect_fake_mode([x, ids, weights]):
        top_k = ids.shape[-1]  # (..., K) routing goes to the op viewed (T, K) (replace)
        try:
            check_fused_args(x, weights.reshape(-1, top_k), ids.reshape(-1, top_k), *tensors, match.layout,
                             match.interleaved, match.activation, match.gated, 0.0, "position")
        except (ValueError, TypeError) as error:
            raise Rejected(f"fused_experts would refuse the block's tensors: {error}") from None


_SIZE_ARITHMETIC = (aten.sym_size.int, operator.mul, operator.add, operator.sub, operator.floordiv)


def _add_size_reads(region: set[Node]) -> None:
    """Under dynamic shapes, sizes are read off intermediates (``sym_size``) to size other
    intermediates: such reads belong to the block when everything they feed does."""
    grown = True
    while grown:
        grown = False
        for node in list(region):
            for user in node.users:
                if (
                    user not in region
                    and user.op == "call_function"
                    and user.target in _SIZE_ARITHMETIC
                    and user.users
                    and all(u in region for u in user.users)
                ):
                    region.add(user)
                    grown = True


def replace(graph: Graph, match: ExpertsMatch) -> None:
    for name in ("topk_ids", "topk_weights"):
        # (..., K) routing viewed as the (T, K) the op takes (check() compared their token counts).
        node = getattr(match, name)
        if val(node).dim() > 2:
            top_k = val(node).shape[-1]
            with graph.inserting_before(match.result):
                view = graph.call_function(aten.view.default, (node, [-1, top_k]))
            view.meta["val"] = val(node).view(-1, top_k)
            setattr(match, name, view)
    unscaled_x, ids_TK = match.x, match.topk_ids
    top_k = val(match.topk_ids).shape[1]
    if match.input_scale_chain is not None:
        match.x, match.topk_ids, match.topk_weights = _scaled_input_rows(graph, match)
    args = (
        match.x, match.topk_weights, match.topk_ids, match.w_gate_up, match.w_down, match.w_up,
        match.b_gate_up, match.b_up, match.b_down, match.layout, match.interleaved, match.activation,
        match.gated, float(match.alpha), float(match.limit), 0.0, "position",
    )
    fake_args = [val(a) if isinstance(a, Node) else a for a in args]
    # New nodes need meta["val"] (Inductor lowers from it): the op's fake kernel gives it.
    with detect_fake_mode([v for v in fake_args if isinstance(v, torch.Tensor)]):
        out_val, dropped_val = torch.ops.moe_ops.fused_experts.default(*fake_args)
    with graph.inserting_before(match.result):
        fused = graph.call_function(torch.ops.moe_ops.fused_experts.default, args)
        fused.meta["val"] = (out_val, dropped_val)
        out = graph.call_function(operator.getitem, (fused, 0))
        out.meta["val"] = out_val
        if match.input_scale_chain is not None:
            if top_k > 1:
                # One row per slot: each token's K outputs (each rounded to x's dtype) summed, accumulated in
                # fp32 and rounded once, as the plain code's sum over the experts adds them.
                per_slot = new_node(graph, aten.view.default, (out, [-1, top_k, val(out).shape[-1]]))
                out = new_node(graph, aten.sum.dim_IntList, (per_slot, [1]))
            # + sum(x[t] * 0): ±0 for a finite row, NaN for a row with an inf or NaN (as every expert's
            # rows 0 * x[t] are in the plain code).
            zeros = new_node(graph, aten.mul.Tensor, (unscaled_x, 0.0))
            row_nan = new_node(graph, aten.sum.dim_IntList, (zeros, [-1], True))
            out = new_node(graph, aten.add.Tensor, (out, row_nan))
            if has_placeholder(graph, PRIMALS):
                # The forward of a training graph: + zeros whose backward gives the expert weights the NaN of
                # the plain code's unchosen rows (moe_ops/unchosen_experts.py).
                zeros = new_node(graph, torch.ops.moe_ops.unchosen_expert_gradients.default,
                                 (unscaled_x, ids_TK, match.w_gate_up, match.w_down))
                out = new_node(graph, aten.add.Tensor, (out, zeros))
        if match.sentinel_from is not None:
            # + sum over the sentinel slots of 0 * w, in out's dtype: 0 for finite weights, NaN otherwise (the
            # op skips those slots; the plain code's zeroed rows times an inf or NaN weight are NaN).
            sentinel = new_node(graph, aten.ge.Scalar, (match.topk_ids, match.sentinel_from))
            weights_times_0 = new_node(graph, aten.mul.Tensor, (match.topk_weights, 0.0))
            zero = new_node(graph, aten.full.default, ([], 0.0), {
                "dtype": val(weights_times_0).dtype, "layout": torch.strided, "device": val(out).device,
                "pin_memory": False})
            terms = new_node(graph, aten.where.self, (sentinel, weights_times_0, zero))
            row_nan = new_node(graph, aten.sum.dim_IntList, (terms, [-1], True))
            row_nan = new_node(graph, prims.convert_element_type.default, (row_nan, val(out).dtype))
            out = new_node(graph, aten.add.Tensor, (out, row_nan))
    match.result.replace_all_uses_with(out)


def _scaled_input_rows(graph: Graph, match: ExpertsMatch) -> tuple[Node, Node, Node]:
    """Llama 4's form (match_dense_experts): the rows the op reads, one per slot, x[t] * chain(top[t, k]) in
    x's dtype as the plain code rounds them ((T * K, H)); each row's expert ((T * K, 1)); routing weights of
    1. With K = 1 the rows are x's tokens, scaled."""
    with graph.inserting_before(match.result):
        scale = match.topk_weights
        for link in match.input_scale_chain:
            scale = new_node(graph, link.target, (scale, *link.args[1:]))
        top_k = val(match.topk_ids).shape[1]
        ids = match.topk_ids
        if top_k == 1:
            rows = new_node(graph, aten.mul.Tensor, (match.x, scale))
        else:
            token_rows = new_node(graph, aten.unsqueeze.default, (match.x, 1))
            slot_scales = new_node(graph, aten.unsqueeze.default, (scale, -1))
            slot_rows = new_node(graph, aten.mul.Tensor, (token_rows, slot_scales))
            rows = new_node(graph, aten.view.default, (slot_rows, [-1, val(match.x).shape[-1]]))
            ids = new_node(graph, aten.view.default, (ids, [-1, 1]))
        num_rows = val(rows).shape[0]
        if not isinstance(num_rows, int):  # a dynamic token count: read off the tensor at run time
            num_rows = new_node(graph, aten.sym_size.int, (rows, 0))
        ones = new_node(graph, aten.full.default, ([num_rows, 1], 1.0), {
            "dtype": torch.float32, "layout": torch.strided, "device": val(match.x).device, "pin_memory": False})
    return rows, ids, ones


def rewrite_experts(graph: Graph, forms) -> int:
    """Replace every routed-experts block that one of ``forms`` recognises; returns how many.
    A form maps the graph to candidates: callables that return an ExpertsMatch or raise Rejected."""
    rewritten = 0
    reasons: list[str] = []
    for find in forms:
        for candidate in find(graph):
            try:
                match = candidate()
                check(match)
            except Rejected as reason:
                log.debug("experts block not rewritten: %s", reason)
                reasons.append(str(reason))
                continue
            except MATCHER_ERRORS as error:
                log.warning("experts block %s (%s: %s); the code runs as written", MATCHER_FAILED,
                            type(error).__name__, error)
                continue
            match.topk_ids = strip_int64_cast(match.topk_ids)
            replace(graph, match)
            counters["moe_ops"]["experts_rewrite"] += 1
            counters["moe_ops"][f"experts_rewrite_{match.form}"] += 1
            log.info("rewrote %s experts block at node %s into moe_ops.fused_experts (%s)",
                     match.form, match.result.name, match.describe())
            rewritten += 1
    _explain_routers_left_alone(graph, reasons)
    return rewritten


# (what, source line) already explained, what being "router" or "experts": recompiles of the same code
# would repeat the message, with other node names in it.
_explained: set[tuple[str, str]] = set()
_PASS_THROUGH = (prims.convert_element_type.default, aten.view.default, aten.reshape.default, aten.clone.default,
                 aten._to_copy.default)
_ROUTERS = (aten.topk.default, torch.ops.moe_ops.route.default)
# Top-1 routers written as a max or argmax over the experts' softmax (Switch Transformers): explained
# like the top-ks; a max over anything else (a sampler's logits, attention scores) is no router.
_TOP1 = (aten.max.dim, aten.argmax.default)
_MASK_WRITES = (aten.scatter.value, aten.scatter_.value, aten.scatter.src)
# Ids read only to count the slots per expert (load-balancing statistics) feed no expert computation.
_COUNTS = (aten.histc.default, aten.bincount.default)


def _calls(node, targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _source_line(node: Node) -> str:
    """The user's source line that made ``node`` ("file:line: code"), where the graph recorded it."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines()]
    frames = [i for i, line in enumerate(lines) if line.startswith("File ")]
    if not frames:
        return f"graph node {node.name}"
    last = frames[-1]
    where = lines[last].split(", in ")[0].replace('File "', "").replace('", line ', ":")
    code = lines[last + 1] if last + 1 < len(lines) else ""
    return f"{where}: {code}" if code else where


def _router_ids(node: Node) -> Node | None:
    """The selection whose ids ``node`` carries (through casts and views): a topk, or moe_ops.route."""
    while _calls(node, _PASS_THROUGH):
        node = node.args[0]
    if is_call(node, operator.getitem) and node.args[1] == 1:
        source = node.args[0]
        if _calls(source, _ROUTERS):
            return source
    return None


def _is_softmax_over_last_dim(node) -> bool:
    """``node`` (through casts and views) is a softmax over its last dim, as the op or as Inductor
    decomposes it (exp(x - amax) / sum(exp(x - amax), -1))."""
    while _calls(node, _PASS_THROUGH):
        node = node.args[0]
    if _calls(node, (aten._softmax.default,)):
        return node.args[1] in (-1, val(node).dim() - 1)
    if not _calls(node, (aten.div.Tensor,)):
        return False
    numerator, denominator = node.args[0], node.args[1]
    return (_calls(numerator, (aten.exp.default,)) and _calls(denominator, (aten.sum.dim_IntList,))
            and denominator.args[0] is numerator and list(denominator.args[1]) in ([-1], [val(numerator).dim() - 1]))


def _is_group_scores(node) -> bool:
    """``node`` (through casts and views) sums the top-k values of each group: a group-limited router's
    group scores (DeepSeek-V3), whose top-k picks groups, not experts."""
    while _calls(node, _PASS_THROUGH):
        node = node.args[0]
    if not _calls(node, (aten.sum.dim_IntList,)):
        return False
    values = node.args[0]
    return is_call(values, operator.getitem) and values.args[1] == 0 and _calls(values.args[0], (aten.topk.default,))


def _is_router(node: Node) -> bool:
    if _calls(node, _ROUTERS):
        return not (node.target is aten.topk.default and _is_group_scores(node.args[0]))
    if not _calls(node, _TOP1) or val(node.args[0]) is None:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim in (-1, val(node.args[0]).dim() - 1) and _is_softmax_over_last_dim(node.args[0])


# A top-k over more columns than this is a sampler's over a vocabulary, not a router's over experts.
_MAX_EXPERTS = 1024


def _scores_from_a_router_matmul(router: Node, limit: int = 12) -> bool:
    """Whether the router's scores (at most ``_MAX_EXPERTS`` columns) come from a matmul in this graph within
    ``limit`` nodes upstream (x W_r^T), not from the graph's inputs (a sampler's logits)."""
    scores = router.args[0]
    if val(scores) is None or val(scores).shape[-1] > _MAX_EXPERTS:
        return False
    seen, frontier = {scores}, [scores]
    while frontier and len(seen) <= limit:
        node = frontier.pop()
        if _calls(node, _MATMULS):
            return True
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                frontier.append(arg)
    return False


def _router_id_readers(router: Node) -> list[Node]:
    """The nodes that read a router's ids, past casts, views and tuple indexing."""
    if _calls(router, (aten.argmax.default,)):  # the ids themselves
        readers = list(router.users)
    else:  # (values, ids)
        readers = [u for u in router.users if is_call(u, operator.getitem) and u.args[1] == 1]
    while any(_calls(r, _PASS_THROUGH) or is_call(r, operator.getitem) for r in readers):
        readers = [u for r in readers for u in (r.users if _calls(r, _PASS_THROUGH) or is_call(r, operator.getitem)
                                                  else (r,))]
    return readers


_MATMULS = (aten.mm.default, aten.bmm.default, aten.addmm.default, aten._grouped_mm.default)


def _reaches(node: Node, found, limit: int = 64, through=lambda node: True) -> bool:
    """Whether a node within ``limit`` nodes downstream of ``node`` satisfies ``found``, on paths through
    nodes that satisfy ``through``."""
    seen, frontier = {node}, [node]
    while frontier and len(seen) <= limit:
        current = frontier.pop()
        for user in current.users:
            if found(user):
                return True
            if user not in seen and through(user):
                seen.add(user)
                frontier.append(user)
    return False


def _routing_decision(node: Node) -> bool:
    """Whether ``node`` carries routing decisions rather than token values: integer or boolean tensors
    (ids, counts, a sort's order, a capacity mask), a mask write's one-hot, or a tuple of them (a sort)."""
    value = val(node)
    if isinstance(value, (tuple, list)) or _calls(node, _MASK_WRITES):
        return True
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point


def _feeds_a_matmul(node: Node) -> bool:
    """Whether a matmul reads ``node``'s value a few nodes downstream: a scattered (T, E) score or mask that
    weights the experts' inputs (Llama 4 runs every expert on every token, scaled by it), not one that is
    only counted (a load-balancing statistic)."""
    return _reaches(node, lambda user: _calls(user, _MATMULS))


# The experts calls that read a router's ids (args[2]): inference's, and the training variant and backward calls of
# a rewritten training graph.
_EXPERT_CALLS = (torch.ops.moe_ops.fused_experts.default, torch.ops.moe_ops.fused_experts_training.default,
                 torch.ops.moe_ops.fused_experts_backward.default,
                 torch.ops.moe_ops.fused_experts_training_backward.default)


def _split_after(router: Node, readers: list[Node]) -> bool:
    """Whether a graph break right after ``router`` put its experts in another graph: the scores come from a
    router matmul over this graph's tokens, its ids leave the graph as routing decisions (themselves, or a
    one-hot mask, counts or a sort derived from them), and no matmul here reads them."""
    return (_scores_from_a_router_matmul(router)
            and any(r.op == "output" or (_routing_decision(r) and _reaches(r, lambda user: user.op == "output",
                                                                           through=_routing_decision))
                    for r in readers)
            and not any(_feeds_a_matmul(r) for r in readers))


def _explain_routers_left_alone(graph: Graph, reasons: list[str]) -> None:
    """Log at INFO, once each, why a router that selects experts was left alone: a top-k over (tokens,
    experts) whose ids some expert computation reads. Its own reason where the routing rewrite declined
    it, and why the experts after it were not rewritten where no moe_ops.fused_experts reads its ids
    (also where a graph break split the block: ids of a router's scores from a matmul in this graph
    handed to the next one, ``_split_after``). Other top-ks (a group mask's, a sampler's, a token
    counter's: ids that only feed counts, scatters whose result no matmul reads, or leave the graph) and
    candidates that were no MoE block at all stay at DEBUG."""
    served = {_router_ids(n.args[2]) for n in graph.nodes if is_call(n, _EXPERT_CALLS)}
    training = has_placeholder(graph, PRIMALS, TANGENTS)  # a training step's forward or backward graph
    for router in graph.nodes:
        if not _is_router(router):
            continue
        if val(router.args[0]) is None or val(router.args[0]).dim() != 2:
            continue
        readers = _router_id_readers(router)
        where = _source_line(router)
        # A training step's forward saves the ids for its backward: they leave the graph as a split block's would,
        # so a split is not told from that there.
        if not training and router not in served and _split_after(router, readers):
            # Ids of a router over this graph's tokens handed to the code after the graph, with no expert
            # computation here: a block that a graph break split (a .tolist() of the counts per expert, a
            # loop over the experts hit, a torch.nonzero), its experts in another graph.
            if ("split", where) not in _explained:
                _explained.add(("split", where))
                log.info("MoE block not rewritten (router at %s): a graph break after the router puts the experts "
                         "in another graph (the expert ids leave this one with no expert computation on them: "
                         "data-dependent calls such as "
                         "torch.nonzero, torch.where(mask), torch.bincount, .tolist() or .item() break graphs); "
                         "the rewrite needs the router and the experts in one graph", where)
            continue
        if not readers or all(
            (_calls(r, _MASK_WRITES) and not _feeds_a_matmul(r)) or _calls(r, _COUNTS) or r.op == "output"
            for r in readers
        ):
            continue
        route_reason = router.meta.get(ROUTE_REJECTED)
        if route_reason and ("router", where) not in _explained:
            _explained.add(("router", where))
            log.info("MoE router not rewritten (at %s): %s", where, route_reason)
        if router in served or ("experts", where) in _explained:
            continue
        _explained.add(("experts", where))
        if training:
            # A training step's forward or backward, after partitioning: its blocks are rewritten in the joint graph
            # before it (lowering/graph/joint_rewrite.py) or not at all.
            log.info("MoE block of a training graph not rewritten (router at %s): %s", where,
                     "the joint-graph rewrite left it (its reasons at DEBUG)" if config.training_rewrites
                     else "moe_ops.config.training_rewrites is off")
            continue
        why = "; ".join(dict.fromkeys(reasons)) or "no form of routed-experts code was recognised after it"
        log.info("MoE block not rewritten (router at %s): %s", where, why)
