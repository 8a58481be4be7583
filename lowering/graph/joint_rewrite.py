"""Training: the rewrites applied to AOTAutograd's joint forward-backward graph.

In a training graph the post-grad pass comes too late: the backward of the plain code is already
there and reads the block's intermediates, so the block cannot be replaced. Inductor hands the joint
graph (``primals_*`` and ``tangents_*`` in; forward outputs, then one gradient per primal out) to
``joint_custom_post_pass`` (after its own joint-graph patterns) before partitioning it. This pass

1. cuts the forward out of it: the nodes the forward outputs need, as a graph of the primals;
2. runs the same rewrites as the post-grad pass on that forward graph (same matchers, same proofs); the
   nodes a rewrite adds take the activation-checkpointing tags of the nodes it replaced;
3. if anything was rewritten, puts fused_experts' training variant in place of each fused_experts (it
   keeps the pre-activations for its backward where that pays) and traces the joint again from the
   rewritten forward: the forward under autograd, then ``torch.autograd.grad`` of the outputs that
   need gradients with the same tangents,
   with the decompositions Inductor gave AOTAutograd, each node's meta (checkpointing tags included)
   carried onto what it traces. The backward so comes from the moe_ops ops' own autograd formulas,
   not from the plain code's;
4. puts that joint graph in place of the old one (same placeholders, same output structure).

The re-derived backward is the forward's autograd formulas, so what made the user's backward differ from them
must not be in the graph: a ``.detach()`` (or ``.data``) of a value that needs a gradient, a no_grad or
inference_mode block that computes from one, a custom autograd.Function, a tensor hook. The joint graph keeps no
sign of them (Inductor drops the detach, the Function's forward is its aten ops), so they are read off the graph
dynamo made, which Inductor's pre-grad hook sees first (note_gradient_alterations, installed by
moe_ops.lowering.passes); a joint graph whose compile showed any, or that no such look preceded, is left as it is.
_check_gradient_paths also refuses a node it adds reading a value the plain backward does not differentiate.
The backward of everything else in the graph is re-derived too, from the forward's decomposed ops, whose
derivatives can differ from their original op's at boundary points: the re-trace runs the unary ops known to
(silu, whose decomposition overflows below -88.7) as themselves (_UNARY_RUN_AS_THEMSELVES), and
_check_decompositions refuses a graph that differentiates the decomposition of any op not known to differentiate
like it (_DECOMPOSITIONS_DIFFERENTIATED_ALIKE, each checked at its boundary points), both by the ``original_aten``
AOTAutograd left on the nodes.

It steps aside (the joint graph stays as it was, and the reason is logged) where it cannot show the
new joint graph has the old one's interface and keeps everything it did: a compile whose dynamo graph
alters gradients or was not looked at (above), placeholders other than primals and tangents, outputs
needing gradients that do not line up with the tangents, a rewritten block that straddles an
activation-checkpointing boundary, a backward node with an effect that no output reads (a runtime assert
the re-derived backward would not have), a forward assert the new trace loses, an op without an autograd
formula, mutations in the traced graph other than the forward's writes into inputs that need no gradient
(buffers, e.g. token counts), which must be the old graph's, and the training variant's backward writing
over the pre-activations its forward kept for it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import threading
import types
from collections.abc import Callable, Sequence

import torch
import torch.fx.traceback as fx_traceback
from torch.fx import Graph, GraphModule, Node
from torch.multiprocessing.reductions import StorageWeakRef

from moe_ops._compat.dynamo import counters, detect_fake_mode
from moe_ops._compat.inductor import select_decomp_table
from moe_ops.lowering.graph.fx_match import PRIMALS, TANGENTS, has_placeholder

log = logging.getLogger("moe_ops")


class NotRewritable(Exception):
    """The joint graph is left as it is, for the reason given."""


def _placeholders(graph: Graph) -> tuple[list[Node], list[Node]]:
    primals, tangents = [], []
    for node in graph.find_nodes(op="placeholder"):
        if node.name.startswith(PRIMALS):
            primals.append(node)
        elif node.name.startswith(TANGENTS):
            tangents.append(node)
        else:
            raise NotRewritable(f"placeholder {node.name} is neither a primal nor a tangent")
    return primals, tangents


def is_joint_graph(graph: Graph) -> bool:
    """Inductor runs the joint passes on inference graphs too; only a joint graph has tangents."""
    return has_placeholder(graph, TANGENTS)


def _closure(sources, step) -> set[Node]:
    """The nodes reachable from ``sources`` (the non-nodes among them skipped) through ``step``."""
    seen: set[Node] = set()
    stack = [n for n in sources if isinstance(n, Node)]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(step(node))
    return seen


def _downstream(sources) -> set[Node]:
    return _closure(sources, lambda node: node.users)


def _upstream(sources) -> set[Node]:
    return _closure(sources, lambda node: node.all_input_nodes)


def _effects(graph: Graph) -> list[Node]:
    """Nodes kept for their effect alone (runtime asserts on sizes): impure, read by nothing."""
    return [node for node in graph.nodes if node.op == "call_function" and not node.users and node.is_impure()]


def _runtime_asserts(graph: Graph) -> list[Node]:
    """_effects but the writes into inputs (buffers, compared by _buffer_writes): a trace may read such a write
    back (``self.counts += c`` leaves an alias of the copy_ in the graph), and then it has a user."""
    return [node for node in _effects(graph) if node.target is not torch.ops.aten.copy_.default]


# What alters gradients in the graph dynamo made, by the name of a call's target (_call_name).
# x.detach(), x.data, x.new_tensor(x) (torch 2.13's dynamo records it as torch.tensor(x)); x.detach_() (its own:
# dynamo's example values show the tensor as the write left it, no longer needing a gradient).
_DETACHING = frozenset({"detach", "_get_data_attr", "new_tensor", "tensor"})
_DETACHING_IN_PLACE = "detach_"
_HOOKS = frozenset({"register_hook", "retain_grad", "requires_grad_", "register_post_accumulate_grad_hook"})
_CUSTOM_FUNCTIONS = frozenset({"autograd_function_apply"})
# Calls dynamo keeps opaque, their insides not in the graph: nonstrict_trace's flat_apply (and a user function
# marked allow_in_graph, a plain Python function from outside torch: _opaque_call).
_OPAQUE_CALLS = frozenset({"flat_apply", "flat_apply_capture"})


_scanned = threading.local()  # .alterations: what the last look found (None: no look since the last joint graph)


def _opaque_call(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if _call_name(node) in _OPAQUE_CALLS:
        return True
    module = (getattr(node.target, "__module__", None) or "").split(".")[0]
    return isinstance(node.target, types.FunctionType) and module not in ("torch", "math", "operator", "_operator",
                                                                          "builtins")


# Calls that read only a tensor's shape, dtype and device, not its values: their results carry no gradient by
# design (torch.zeros_like(x) starting a scatter_add).
_METADATA_READERS = frozenset({
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "new_zeros",
    "new_ones", "new_empty", "new_full",
})
# Marks in a Python function's source of a gradient cut inside it.
_CUT_MARKS = (".detach(", "no_grad", ".data", "requires_grad_(False)", "set_grad_enabled(False)")


def _cuts_gradient(node: Node) -> bool:
    """Whether ``node`` (reading a value that needs a gradient, with grad mode on) makes floating-point or complex
    values none of which needs one: autograd did not record it, whatever its name."""
    tensors = _differentiable_values(node)
    return bool(tensors) and not any(value.requires_grad for value in tensors)


# Functions of torch.nn.functional whose source cuts a gradient only for some arguments: (position, keyword) of the
# argument, and whether its value makes the cut (the max_norm renorm under no_grad; the hard straight-through
# estimator's detach).
_CUTS_WITH_ARGUMENT = {
    "embedding": (3, "max_norm", lambda max_norm: max_norm is not None),
    "embedding_bag": (3, "max_norm", lambda max_norm: max_norm is not None),
    "gumbel_softmax": (2, "hard", bool),
}


def _alters_gradients_inside(node: Node) -> bool:
    """Whether a Python function dynamo put in its graph whole (torch's own, not traced into) cuts a gradient inside
    at this call: by its arguments where _CUTS_WITH_ARGUMENT knows the function, else where its source holds a
    detach or a no-grad region."""
    target = node.target
    if not isinstance(target, types.FunctionType):
        return False
    if target.__module__ == "torch.nn.functional" and target.__name__ in _CUTS_WITH_ARGUMENT:
        position, keyword, cuts = _CUTS_WITH_ARGUMENT[target.__name__]
        value = node.args[position] if len(node.args) > position else node.kwargs.get(keyword)
        return isinstance(value, Node) or cuts(value)  # a value computed in the graph: it may
    return _source_cuts_gradient(target)


@functools.cache
def _source_cuts_gradient(function: types.FunctionType) -> bool:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return True  # nothing to read: it may
    return any(mark in source for mark in _CUT_MARKS)


def _needs_grad(node: Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.requires_grad


def _call_name(node: Node) -> str:
    """A method's name; a function's or higher-order op's ``__name__``; an aten overload's packet name
    (``aten.detach.default`` -> ``detach``)."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _written(node: Node) -> Node | None:
    """The tensor a call writes into: an in-place call's first argument (``dst.copy_(src)``, ``dst.detach_()``), an
    item assignment's (``dst[index] = src``, dynamo's operator.setitem), an ``out=`` argument."""
    name = _call_name(node)
    if ((name.endswith("_") and not name.startswith("__")) or name == "setitem") and node.args \
            and isinstance(node.args[0], Node):
        return node.args[0]
    out = node.kwargs.get("out")
    return out if isinstance(out, Node) else None


def _differentiable_values(node: Node, meta_key: str = "example_value") -> list[torch.Tensor]:
    """The fake values ``node`` makes (one, or a tuple's) that can carry a gradient: floating-point or complex tensors
    (dynamo's graphs keep them as ``example_value``, AOTAutograd's as ``val``)."""
    values = node.meta.get(meta_key)
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [value for value in values
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())]


def _floating(node: Node, meta_key: str = "example_value") -> bool:
    """Whether ``node`` makes a tensor that can carry a gradient (_differentiable_values)."""
    return bool(_differentiable_values(node, meta_key))


def _aliases(node: Node) -> list[Node]:
    """The nodes of ``node``'s graph whose fake values share its value's storage: its base and every view of it
    (dynamo's fake tensors keep the aliasing of the real ones)."""
    storage = _storage(node)
    if storage is None:
        return [node]
    return [other for other in node.graph.nodes if (other_storage := _storage(other)) is not None
            and other_storage == storage]


def _storage(node: Node) -> StorageWeakRef | None:
    """The storage of ``node``'s fake value; None for a value with none to compare (not a strided tensor, or a
    tensor subclass whose storage is not its own: a DTensor's is its local shard's)."""
    value = node.meta.get("example_value")
    if type(value) is not torch._subclasses.FakeTensor or value.layout != torch.strided:
        return None
    return StorageWeakRef(value.untyped_storage())


def _reaches_gradient(node: Node) -> bool:
    """Whether ``node``'s value (no gradient taken through it) flows, through floating-point values, into one that
    needs a gradient or into the graph's output: re-traced with gradients through it, that would take one. Integer
    steps (top-k ids) carry none; a value that only updates a buffer (token counts) reaches neither. An in-place
    write carries the value into the tensor written and every tensor sharing its storage (its base, its other
    views: their readers are their users in dynamo's graph)."""
    seen, stack = {node}, [node]
    while stack:
        current = stack.pop()
        written = _written(current) if current.op in ("call_function", "call_method") else None
        aliases = _aliases(written) if written is not None else []
        for user in [*current.users, *aliases]:
            if user.op == "output" or _needs_grad(user):
                return True
            if user not in seen and (_floating(user) or user in aliases or _written(user) is not None):
                seen.add(user)
                stack.append(user)
    return False


def gradient_alterations(graph: Graph) -> list[str]:
    """What in a dynamo graph (and in the subgraphs it calls: checkpointed bodies) makes its backward differ from the
    autograd formulas of its ops: a detach of a value that needs a gradient, or an op computed from one with grad
    mode off, whose result flows on into gradients (_reaches_gradient); a custom autograd.Function or a call dynamo
    keeps opaque (allow_in_graph, nonstrict_trace) taking one; a tensor hook. Each as ``"<node>: <what>"``."""
    found = []
    grad_off, before_inference_mode = False, []
    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(sub := getattr(graph.owning_module, node.target, None), GraphModule):
            found += gradient_alterations(sub.graph)
        if node.op not in ("call_function", "call_method"):
            continue
        name = _call_name(node)
        reads_grad = any(_needs_grad(n) for n in node.all_input_nodes)
        if name == "_set_grad_enabled":
            grad_off = node.args[:1] == (False,)
        elif name == "_enter_inference_mode":  # its exit restores the mode it entered from (a no_grad block's)
            before_inference_mode.append(grad_off)
            grad_off = True
        elif name == "_exit_inference_mode":
            grad_off = before_inference_mode.pop() if before_inference_mode else False
        elif grad_off and reads_grad and (_floating(node) or _written(node) is not None) and _reaches_gradient(node):
            found.append(f"{node.name}: computed without grad from a value that needs one")
        elif ((name in _DETACHING and reads_grad) or name == _DETACHING_IN_PLACE) and _reaches_gradient(node):
            found.append(f"{node.name}: a detach of a value that needs a gradient")
        elif (reads_grad and not grad_off and name not in _METADATA_READERS and _cuts_gradient(node)
              and _reaches_gradient(node)):
            found.append(f"{node.name}: a value computed from one that needs a gradient, without one (a detach by "
                         "another name: torch.asarray(x, requires_grad=False))")
        elif name in _CUSTOM_FUNCTIONS and reads_grad:
            found.append(f"{node.name}: a custom autograd.Function")
        elif _opaque_call(node) and reads_grad:
            found.append(f"{node.name}: a call whose inside dynamo does not show (allow_in_graph, nonstrict_trace)")
        elif reads_grad and _alters_gradients_inside(node):
            found.append(f"{node.name}: a torch function dynamo keeps whole that detaches or turns grad off inside "
                         "(F.gumbel_softmax's straight-through estimator)")
        elif name in _HOOKS:
            found.append(f"{node.name}: a tensor hook or requires_grad_")
    return found


def note_gradient_alterations(graph: Graph) -> None:
    """Inductor's pre-grad hook: what the dynamo ``graph`` (the one about to be traced into a joint graph) alters in
    gradients, for rewrite_joint_graph. Its subgraphs are looked at with it (Inductor's pre-grad passes see them
    first, alone: a later look, the whole graph's, replaces theirs)."""
    _scanned.alterations = gradient_alterations(graph)


_CHECKPOINT_KEYS = ("recompute", "ac_graph_id")


def _checkpoint_tags(node: Node) -> tuple | None:
    """The activation-checkpointing tags torch.utils.checkpoint left on ``node`` (None: outside a region)."""
    tags = tuple(node.meta.get(key) for key in _CHECKPOINT_KEYS)
    return tags if any(tag is not None for tag in tags) else None


def _pieces(nodes: set[Node], neighbours: Callable[[Node], list[Node]]) -> list[tuple[set[Node], set[Node]]]:
    """``nodes`` split into the pieces their edges among themselves join, each with the tensor-valued nodes outside
    ``nodes`` it borders (placeholders and sizes excepted: a model's layers share those)."""
    pieces, seen = [], set()
    for start in nodes:
        if start in seen:
            continue
        piece, border, stack = set(), set(), [start]
        while stack:
            node = stack.pop()
            if node in piece:
                continue
            piece.add(node)
            for other in neighbours(node):
                if other in nodes:
                    stack.append(other)
                elif other.op != "placeholder" and isinstance(other.meta.get("val"), torch.Tensor):
                    border.add(other)
        seen |= piece
        pieces.append((piece, border))
    return pieces


def _tag_new_nodes(forward: Graph, tags_before: dict[Node, tuple | None],
                   neighbours_before: dict[Node, list[Node]]) -> None:
    """Give the nodes a rewrite added the checkpointing tags of the nodes they replaced, so that the partitioner
    recomputes (or saves) the moe_ops ops as it would have the plain code: each piece of new nodes takes the tags
    of the replaced pieces it shares a border with (the same surviving nodes around them), so that blocks in
    regions of their own (a model's checkpointed layers) keep each theirs. A piece that replaced nodes from inside
    and outside a checkpointed region, or from two regions, has no one answer."""
    present = set(forward.nodes)
    removed = {node for node in tags_before if node not in present and node.op == "call_function"}
    replaced = _pieces(removed, lambda node: neighbours_before[node])
    added = {node for node in present if node not in tags_before}
    for piece, border in _pieces(added, lambda node: [*node.all_input_nodes, *node.users]):
        tags = {tags_before[node] for old_piece, old_border in replaced if old_border & border for node in old_piece}
        if not tags:  # bordering no replaced piece: every replaced node's tags
            tags = {tags_before[node] for node in removed}
        if len(tags) > 1:
            raise NotRewritable("a rewritten block straddles an activation-checkpointing boundary")
        (tag,) = tags or {None}
        if tag is not None:
            for node in piece:
                node.meta.update(zip(_CHECKPOINT_KEYS, tag, strict=True))


# Forward ops whose backward may pass the gradient on with no node of its own (so no node carries their seq_nr): a
# residual add; a cast between floating dtypes, whose backward casts Inductor's joint patterns fold away (a round
# trip x.float().to(torch.bfloat16) leaves two casts back that cancel). A detach or a no_grad region between such
# casts is the pre-grad look's to refuse (gradient_alterations).
_PASS_THROUGH_BACKWARD = (torch.ops.aten.add.Tensor, torch.ops.prims.convert_element_type.default)


def _differentiated_ops(tangents: list[Node]) -> set:
    """The autograd sequence numbers of the forward ops whose backward the joint graph holds: AOTAutograd tags
    each backward node with its forward op's ``seq_nr``."""
    return {node.meta["seq_nr"] for node in _downstream(tangents) if "seq_nr" in node.meta}


def _check_gradient_paths(forward: Graph, old_nodes: set[Node], differentiated: set, wants_grad: list[bool]) -> None:
    """NotRewritable where the new trace would differentiate a path the old joint graph does not: a floating input
    of a node the rewrites added, made by a forward op of the old graph from primals that need gradients, whose
    backward the old graph lacks. The user's code detached that value or computed it without grad (the graph keeps
    no sign of either but the missing backward; re-traced under autograd, it would take a gradient: the router's
    x-gradient of a block whose routing weights were detached)."""
    primals = list(forward.find_nodes(op="placeholder"))
    needs_grad = _downstream([p for p, wants in zip(primals, wants_grad, strict=True) if wants])

    def differentiable(source: Node) -> bool:
        value = source.meta.get("val")
        return (source in needs_grad and source.op != "placeholder" and isinstance(value, torch.Tensor)
                and value.is_floating_point())

    def check(node: Node, source: Node) -> None:
        if source not in old_nodes:  # a node a rewrite added: its own inputs are checked as its reads
            return
        if "seq_nr" not in source.meta and source.target is operator.getitem:  # an output of a multi-output op
            check(node, source.args[0])
            return
        if "seq_nr" not in source.meta:  # made by a joint-graph pattern that kept no autograd record
            raise NotRewritable(f"{node.name} would take a gradient through {source.name}, whose backward in the "
                                "plain graph cannot be told (no seq_nr)")
        if source.meta["seq_nr"] in differentiated:
            return
        if source.target in _PASS_THROUGH_BACKWARD:  # its backward may have no node; its inputs tell
            for operand in filter(differentiable, source.all_input_nodes):
                check(node, operand)
            return
        raise NotRewritable(f"{node.name} would take a gradient through {source.name}, which the plain code does "
                            "not differentiate (detached or computed without grad)")

    for node in forward.nodes:
        if node not in old_nodes and node.op == "call_function":
            for source in filter(differentiable, node.all_input_nodes):
                check(node, source)


# Ops whose Inductor decomposition, differentiated, gives the op's own gradients everywhere, boundary and singular
# points included (each checked there against eager: tests/test_joint_rewrite.py,
# test_accepted_decompositions_differentiate_like_their_op): steps of shape, layout and dtype, and ops real blocks run
# beside the MoE block. AOTAutograd differentiated each op; the re-trace differentiates its decomposition, so a
# differentiated node of any other op's decomposition keeps the plain backward: elu's or softplus's where() over a
# branch that overflows to inf (0 * inf = NaN back), renorm's, dist's or a vector norm's sqrt at 0, adaptive max
# pooling's tie split evenly, relu6 / hardtanh at their bounds, std of a constant row, fmax ties. By overload packet:
# the ``original_aten`` of a node copied into another graph is a copy of the op, not the op.
_DECOMPOSITIONS_DIFFERENTIATED_ALIKE = frozenset({
    "aten.t", "aten.transpose", "aten._unsafe_view", "aten.split", "aten.split_with_sizes", "aten.unbind",
    "aten.stack", "aten._to_copy", "aten.clamp", "aten._softmax", "aten._log_softmax", "aten.logsumexp", "aten.topk",
    "aten.native_layer_norm", "aten.gelu", "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten.nll_loss_forward",
})


def _op_packet(op) -> str:
    """``aten.t.default`` -> ``aten.t``."""
    return str(op).rsplit(".", 1)[0]


def _check_decompositions(forward: Graph, wants_grad: list[bool], unary: tuple[dict[Node, tuple], set[Node]]) -> None:
    """NotRewritable where a node the re-trace differentiates is part of the decomposition of an op (the
    ``original_aten`` AOTAutograd left on it, other than the node's own op) whose decomposition is not known to
    differentiate like the op (_DECOMPOSITIONS_DIFFERENTIATED_ALIKE), but for the decompositions the re-trace runs as
    their op (``unary``: _unary_decompositions of ``forward``) and moe_ops' own ops."""
    # What a gradient can reach: floating-point values computed from primals that want one (an integer step, the
    # top-k ids, carries none: a variance of token counts is not differentiated).
    primals = list(forward.find_nodes(op="placeholder"))
    needs_grad = _closure([p for p, wants in zip(primals, wants_grad, strict=True) if wants],
                          lambda node: [user for user in node.users if _floating(user, "val")])
    run_as_themselves, inner = unary  # differentiated by their own formula
    for node in forward.nodes:
        if node in run_as_themselves or node in inner or node not in needs_grad or node.op != "call_function":
            continue
        original = node.meta.get("original_aten")
        if original is None or str(original) == str(node.target):  # not a decomposition's node
            continue
        packet = _op_packet(original)
        if packet not in _DECOMPOSITIONS_DIFFERENTIATED_ALIKE and not packet.startswith("moe_ops."):
            raise NotRewritable(f"{node.name} is part of {packet}'s decomposition, not known to differentiate like "
                                f"{packet} at its boundary points: the re-derived backward might not be the plain one")


def _forward_graph(graph: Graph, primals: list[Node], tangents: list[Node], forward_outputs: list) -> Graph:
    """The nodes that ``forward_outputs`` need, and the forward's runtime asserts, copied into a graph
    whose inputs are the primals."""
    backward = _downstream(tangents)
    effects = _effects(graph)
    for node in effects:
        if node in backward:
            raise NotRewritable(f"node {node.name} ({node.target}) of the backward has an effect and no users")
    needed = _upstream([*forward_outputs, *effects])
    for node in needed:
        if node.op == "placeholder" and node not in primals:
            raise NotRewritable(f"a forward output depends on {node.name}")
    forward = Graph()
    env: dict[Node, Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node in primals:
            env[node] = forward.placeholder(node.name)
            env[node].meta = dict(node.meta)
        elif node in needed:
            env[node] = forward.node_copy(node, lambda n: env[n])
    forward.output(tuple(env[o] if isinstance(o, Node) else o for o in forward_outputs))
    return forward


# Unary ops (one tensor in, one out, no other argument) that the re-trace runs as themselves instead of their
# decomposition's nodes, so that they are differentiated by their own formula, as AOTAutograd differentiated them:
# silu's decomposition x / (1 + exp(-x)) differentiated overflows to NaN below x = -88.7 (fp32) where silu_backward
# is finite; mish likewise, sinc at 0.
# By name: the ``original_aten`` of a node copied into another graph is a copy of the op, not the op.
_UNARY_RUN_AS_THEMSELVES = {str(op): op for op in (
    torch.ops.aten.silu.default, torch.ops.aten.mish.default, torch.ops.aten.sinc.default,
    torch.ops.aten.hardswish.default, torch.ops.aten.hardsigmoid.default,
)}


def _unary_decompositions(graph: Graph) -> tuple[dict[Node, tuple], set[Node]]:
    """The decompositions of _UNARY_RUN_AS_THEMSELVES ops in ``graph``: ``{last node: (op, its input)}`` and the set of
    their other nodes. A decomposition is the nodes that carry the op as ``original_aten`` and one autograd
    sequence number, connected, with one tensor input from outside and one node read outside that has the input's
    shape and dtype; any other shape is left as its nodes."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    groups: dict[tuple, list[Node]] = {}
    for node in graph.nodes:
        op = _UNARY_RUN_AS_THEMSELVES.get(str(node.meta.get("original_aten")))
        if op is not None and node.op == "call_function" and str(node.target) != str(op):
            groups.setdefault((op, node.meta.get("seq_nr")), []).append(node)
    last_nodes, inner = {}, set()
    for (op, _), nodes in groups.items():
        members = set(nodes)
        inputs = {n for node in nodes for n in node.all_input_nodes if n not in members}
        read_outside = [node for node in nodes if any(user not in members for user in node.users)]
        if len(inputs) == 1 and len(read_outside) == 1 and len(_pieces(members, lambda n: [
                *n.all_input_nodes, *n.users])) == 1:
            (source,), (last,) = inputs, read_outside
            value_in, value_out = source.meta.get("val"), last.meta.get("val")
            # The op keeps its input's shape and dtype: so must what the decomposition's last node made.
            if (isinstance(value_in, torch.Tensor) and isinstance(value_out, torch.Tensor)
                    and value_in.dtype == value_out.dtype and value_in.dim() == value_out.dim()
                    and all(guard_or_false(a == b) for a, b in zip(value_in.shape, value_out.shape, strict=True))):
                last_nodes[last] = (op, source)
                inner |= members - {last}
    return last_nodes, inner


class _DifferentiableInterpreter(torch.fx.Interpreter):
    """Runs a decomposed graph under autograd: the prims that decompositions leave in it have no
    autograd formulas, so each runs as the aten op it came from; the decompositions of
    _UNARY_RUN_AS_THEMSELVES ops (``unary``: _unary_decompositions of the module's graph) run as the op."""

    def __init__(self, module: GraphModule, unary: tuple[dict[Node, tuple], set[Node]]):
        # Values stay in the environment to the end: a decomposition's input is read by its last node, after the
        # inner nodes that would otherwise have been its last users.
        super().__init__(module, garbage_collect_values=False)
        self.unary_last, self.unary_inner = unary

    def run_node(self, node: Node):
        if node in self.unary_inner:
            return None  # read only by its decomposition's last node, which runs the op instead
        if node in self.unary_last:
            op, source = self.unary_last[node]
            with self._set_current_node(node):
                return op(self.env[source])
        return super().run_node(node)

    def call_function(self, target, args, kwargs):
        if target is torch.ops.prims.convert_element_type.default:
            tensor, dtype = args
            return torch.ops.aten._to_copy.default(tensor, dtype=dtype)
        return super().call_function(target, args, kwargs)


def _trace_joint(forward: GraphModule, example_primals: list, example_tangents: list, wants_grad: list[bool],
                 unary: tuple[dict[Node, tuple], set[Node]]):
    """The joint graph of ``forward`` (AOTAutograd's interface: forward outputs, then one gradient or
    None per primal), traced with fake tensors and Inductor's decompositions (``unary`` run as their ops)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    num_primals = len(example_primals)

    def joint(*args):
        primals, tangents = list(args[:num_primals]), list(args[num_primals:])
        with torch.enable_grad():
            leaves = [
                p.detach().requires_grad_(True) if wants else p for p, wants in zip(primals, wants_grad, strict=True)
            ]
            outputs = _DifferentiableInterpreter(forward, unary).run(*leaves)
            differentiable = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
            if len(differentiable) != len(tangents) or not all(
                o.dtype == t.dtype and guard_or_false(o.shape == t.shape)
                for o, t in zip(differentiable, tangents, strict=True)
            ):
                raise NotRewritable("the outputs that need gradients do not line up with the tangents")
            inputs = [leaf for leaf, wants in zip(leaves, wants_grad, strict=True) if wants]
            grads = iter(torch.autograd.grad(differentiable, inputs, tangents, allow_unused=True))
        gradients = []
        for leaf, wants in zip(leaves, wants_grad, strict=True):
            grad = next(grads) if wants else None
            gradients.append(torch.zeros_like(leaf) if wants and grad is None else grad)
        return [*(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs), *gradients]

    fake_mode = detect_fake_mode([*example_primals, *example_tangents])
    try:
        # The interpreter runs each forward node with its meta current, so the traced nodes keep the
        # forward's checkpointing tags (and stack traces), as AOTAutograd's own trace does.
        with fake_mode, fx_traceback.preserve_node_meta():
            return make_fx(joint, decomposition_table=select_decomp_table())(*example_primals, *example_tangents)
    except RuntimeError as error:  # e.g. an op of the forward that has no autograd formula
        raise NotRewritable(f"tracing the new joint graph failed: {error}") from error


def _buffer_writes(graph: Graph, wants_grad: list[bool]) -> dict[int, Node]:
    """The forward's in-place updates of inputs that need no gradient (a module's buffers: token counts
    kept for load balancing), as AOTAutograd leaves them: ``copy_`` into the primal. By primal index
    (the primals are the first placeholders, whatever a trace names them)."""
    primals = list(graph.find_nodes(op="placeholder"))[: len(wants_grad)]
    writes = {}
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default):
        destination = node.args[0]
        if destination in primals and not wants_grad[primals.index(destination)]:
            writes[primals.index(destination)] = node
    return writes


def _mark_forward_and_backward(graph: Graph, tangents: list[Node], num_forward_outputs: int) -> None:
    """Tag nodes for the partitioner as AOTAutograd does: forward = what the forward outputs need
    without the tangents; everything else belongs to the backward."""
    forward = _upstream(graph.output_node().args[0][:num_forward_outputs])
    for node in graph.nodes:
        if node.op not in ("placeholder", "output"):
            node.meta["partitioner_tag"] = "is_forward" if node in forward else "is_backward"
    for node in tangents:
        node.meta["partitioner_tag"] = "is_backward"


def _keep_preactivations(forward: Graph) -> None:
    """Training graphs run fused_experts' training variant, which keeps for its backward what it would
    otherwise recompute (moe_ops/fused_experts.py); its first two outputs are fused_experts' own. A call
    that quantises (its arguments past the variant's at other than their defaults: quantised weights a user
    passed) stays fused_experts."""
    plain = torch.ops.moe_ops.fused_experts.default._schema.arguments
    num_training_args = len(torch.ops.moe_ops.fused_experts_training.default._schema.arguments)
    training_names = {argument.name for argument in plain[:num_training_args]}
    for node in forward.find_nodes(op="call_function", target=torch.ops.moe_ops.fused_experts.default):
        given = dict(zip((argument.name for argument in plain), node.args, strict=False)) | dict(node.kwargs)
        if any(given.get(argument.name, argument.default_value) != argument.default_value
               for argument in plain[num_training_args:]):
            continue
        node.args = node.args[:num_training_args]
        node.kwargs = {name: value for name, value in node.kwargs.items() if name in training_names}
        node.target = torch.ops.moe_ops.fused_experts_training.default


def _overwrites_only_its_kept_preactivations(node: Node) -> bool:
    """The training variant's backward writes its gradients over the pre-activations that the forward's
    training variant kept (its outputs 2 and 3), which nothing else reads: the write is invisible to the
    rest of the graph, and the kept tensors become buffers the compiled backward may reuse (AOTAutograd
    donates saved buffers and then refuses ``retain_graph``, which would read them twice)."""
    if node.target is not torch.ops.moe_ops.fused_experts_training_backward.default:
        return False
    schema_args = node.target._schema.arguments
    for index, argument in enumerate(schema_args):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        kept = node.args[index] if index < len(node.args) else node.kwargs[argument.name]
        reader = node
        # Autograd's saved tensors reach the backward through aliases (each read by the next only).
        while kept.target is torch.ops.aten.alias.default and set(kept.users) == {reader}:
            kept, reader = kept.args[0], kept
        if not (kept.target is operator.getitem and kept.args[1] in (2, 3)
                and kept.args[0].target is torch.ops.moe_ops.fused_experts_training.default
                and set(kept.users) == {reader}):
            return False
    return True


def rewrite_joint_graph(graph: Graph, rewrites: Sequence[Callable[[Graph], int]]) -> int:
    """Apply ``rewrites`` to the forward of the joint ``graph`` and re-derive its backward; returns
    how many subgraphs they replaced (0: the graph is unchanged)."""
    alterations, _scanned.alterations = getattr(_scanned, "alterations", None), None
    try:
        if alterations is None:
            raise NotRewritable("no look at the dynamo graph preceded it (Inductor's pre-grad hook did not run)")
        if alterations:
            raise NotRewritable(f"the code alters gradients ({'; '.join(alterations)}): the backward re-derived from "
                                "the forward's autograd formulas would not be its own")
        primals, tangents = _placeholders(graph)
        outputs = list(graph.output_node().args[0])
        num_forward_outputs = len(outputs) - len(primals)
        if num_forward_outputs < 0:
            raise NotRewritable("fewer outputs than primals")
        forward_outputs, gradients = outputs[:num_forward_outputs], outputs[num_forward_outputs:]
        forward = _forward_graph(graph, primals, tangents, forward_outputs)
        old_nodes = set(forward.nodes)
        # The rewrites count what they replace; if the joint graph is then kept, nothing was replaced.
        counted = dict(counters["moe_ops"])
        rewritten = 0
        for rewrite in rewrites:
            tags_before = {node: _checkpoint_tags(node) for node in forward.nodes}
            neighbours_before = {node: [*node.all_input_nodes, *node.users] for node in forward.nodes}
            replaced = rewrite(forward)
            if replaced:
                forward.eliminate_dead_code()  # the replaced nodes go, so that their tags can be read off
                _tag_new_nodes(forward, tags_before, neighbours_before)
            rewritten += replaced
        if not rewritten:
            return 0
        forward.eliminate_dead_code()
        wants_grad = [grad is not None for grad in gradients]
        _check_gradient_paths(forward, old_nodes, _differentiated_ops(tangents), wants_grad)
        unary = _unary_decompositions(forward)
        _check_decompositions(forward, wants_grad, unary)
        _keep_preactivations(forward)
        traced = _trace_joint(
            GraphModule(graph.owning_module, forward),
            [p.meta["val"] for p in primals],
            [t.meta["val"] for t in tangents],
            wants_grad,
            unary,
        )
        if len(_runtime_asserts(traced.graph)) < len(_runtime_asserts(forward)):
            raise NotRewritable("the new trace lost a runtime assert of the forward")
        buffer_writes = _buffer_writes(traced.graph, wants_grad)
        if buffer_writes.keys() != _buffer_writes(graph, wants_grad).keys():
            raise NotRewritable("the new trace writes other inputs than the old one")
        mutating = [n.target for n in traced.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
                    and n.target._schema.is_mutable and n not in buffer_writes.values()
                    and not _overwrites_only_its_kept_preactivations(n)]
        if mutating:
            raise NotRewritable(f"the traced joint graph mutates ({mutating[0]})")
    except NotRewritable as reason:
        if "counted" in locals():
            counters["moe_ops"].clear()
            counters["moe_ops"].update(counted)
        log.debug("joint graph not rewritten (its forward is left as the plain code): %s", reason)
        return 0

    owner = graph.owning_module
    for node in traced.graph.find_nodes(op="get_attr"):
        # Constants the trace made (and the forward's own): they move onto the joint graph's module.
        name = f"_moe_ops_{node.target}"
        while hasattr(owner, name):
            name += "_"
        setattr(owner, name, getattr(traced, node.target))
        node.target = name
    for node in reversed(list(graph.nodes)):
        if node.op != "placeholder":
            graph.erase_node(node)
    traced_placeholders = list(traced.graph.find_nodes(op="placeholder"))
    new_outputs = graph.graph_copy(
        traced.graph, dict(zip(traced_placeholders, [*primals, *tangents], strict=True))
    )
    graph.output(list(new_outputs))
    _mark_forward_and_backward(graph, tangents, num_forward_outputs)
    counters["moe_ops"]["joint_rewrite"] += 1
    log.info("rewrote a training graph: %d subgraph(s) in its forward, backward from the moe_ops ops", rewritten)
    return rewritten
