"""Training: the rewrites applied to AOTAutograd's joint forward-backward graph.

In a training graph the post-grad pass comes too late: the backward of the plain code is already
there and reads the block's intermediates, so the block cannot be replaced. Inductor hands the joint
graph (``primals_*`` and ``tangents_*`` in; forward outputs, then one gradient per primal out) to
``joint_custom_post_pass`` (after its own joint-graph patterns) before partitioning it. This pass

1. cuts the forward out of it: the nodes the forward outputs need, as a graph of the primals;
2. runs the same rewrites as the post-grad pass on that forward graph (same matchers, same proofs); the
   nodes a rewrite adds take the activation-checkpointing tags of the nodes it replaced;
3. if anything was rewritten, puts fused_experts' training variant in place of each fused_experts (it
   keeps the pre-activations for its backward where that pays) and finds, in the joint graph, the replaced
   nodes' backward (_find_splice): the backward nodes AOTAutograd made from their autograd records (each
   backward node carries its forward op's ``seq_nr``), the gradients reaching the replaced outputs, and the
   part of each input's gradient that backward makes;
4. traces the joint graph of the new nodes alone (their forward under autograd, ``torch.autograd.grad`` of
   their outputs with those gradients, Inductor's decompositions, each node's meta carried onto what it
   traces) and splices it in place of the replaced nodes and their backward. The block's backward so comes
   from the moe_ops ops' own autograd formulas; every other node of the joint graph, forward and backward,
   stays as AOTAutograd made it.

What made the user's backward differ from the ops' autograd formulas must not be in the graph: a
``.detach()`` (or ``.data``) of a value that needs a gradient, a no_grad or inference_mode block that computes
from one, a custom autograd.Function (but one that passes its input and its gradient on as they are), a tensor
hook. The joint graph keeps no sign of them (Inductor drops the detach, the Function's forward is its aten ops),
so they are read off the graph dynamo made, which Inductor's
pre-grad hook sees first (note_gradient_alterations, installed by moe_ops.lowering.passes); a joint graph whose
compile showed any, or that no such look preceded, is left as it is. The splice also checks it by structure: the
new nodes must take gradients of exactly the inputs whose gradients the replaced backward made.

It steps aside (the joint graph stays as it was, and the reason is logged) where it cannot show the
new joint graph computes what the old one did: a compile whose dynamo graph alters gradients or was not
looked at (above), placeholders other than primals and tangents, a rewritten block that straddles an
activation-checkpointing boundary, a replaced node's backward the autograd records do not tell apart from a
kept node's, a gradient the replaced nodes could pass on with no backward node of theirs, a part of a gradient
not tied to one input, a new node taking gradients of other inputs than the replaced ones did, an op without an
autograd formula, and mutations in the new nodes' joint graph other than the training variant's backward writing
its gradients over the pre-activations its forward kept for it.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import inspect
import logging
import operator
import threading
import types
from collections.abc import Callable, Sequence

import torch
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch.fx import Graph, GraphModule, Node
from torch.multiprocessing.reductions import StorageWeakRef

from moe_ops._compat.dynamo import counters, detect_fake_mode
from moe_ops._compat.inductor import select_decomp_table, stable_topological_sort
from moe_ops.lowering.graph.fx_match import PRIMALS, TANGENTS, closure, has_placeholder, same_shape

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


def _downstream(sources) -> set[Node]:
    return closure(sources, lambda node: node.users)


def _gradients(graph: Graph) -> set[Node]:
    """The joint graph's nodes computed from the tangents: the backward's gradients."""
    return _downstream([n for n in graph.find_nodes(op="placeholder") if n.name.startswith(TANGENTS)])


def _upstream(sources) -> set[Node]:
    return closure(sources, lambda node: node.all_input_nodes)


def _effects(graph: Graph) -> list[Node]:
    """Nodes kept for their effect alone (runtime asserts on sizes): impure, read by nothing."""
    return [node for node in graph.nodes if node.op == "call_function" and not node.users and node.is_impure()]


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
    needs a gradient: in the moe_ops ops' backward, that would take one. Integer steps (top-k ids) carry none; a
    value that only updates a buffer (token counts) or is only returned (a detached statistic a model hands out: an
    output that needs no gradient takes none, spliced or not) reaches none. An in-place
    write carries the value into the tensor written and every tensor sharing its storage (its base, its other
    views: their readers are their users in dynamo's graph)."""
    seen, stack = {node}, [node]
    while stack:
        current = stack.pop()
        written = _written(current) if current.op in ("call_function", "call_method") else None
        aliases = _aliases(written) if written is not None else []
        for user in [*current.users, *aliases]:
            if _needs_grad(user):
                return True
            if user not in seen and (_floating(user) or user in aliases or _written(user) is not None):
                seen.add(user)
                stack.append(user)
    return False


def _passes_gradient_unchanged(node: Node) -> bool:
    """Whether a custom autograd.Function call (dynamo's ``autograd_function_apply``) is one whose forward returns
    its one tensor input, at most cast (``.to(dtype)``) and viewed as itself, and whose backward returns the
    gradient it is given unchanged: what autograd does without the Function (autograd casts a returned gradient
    to the input's dtype, as the cast's own backward does). torchtitan's GPT-OSS experts wrap their down bias in
    one (``ScaleBiasForward``: a division by the tensor-parallel degree only where it exceeds 1)."""
    owner = node.graph.owning_module
    bodies = [getattr(owner, body.target, None) if isinstance(body, Node) and body.op == "get_attr" else None
              for body in node.args[:2]]
    if not all(isinstance(body, GraphModule) for body in bodies):
        return False
    forward, backward = ([n for n in body.graph.nodes if not (n.op == "call_function" and n.target is
                                                               torch._C._set_grad_enabled)] for body in bodies)
    inputs = [n for n in forward if n.op == "placeholder"]
    if len(inputs) != 1 or len([n for n in node.args[2:] if isinstance(n, Node)]) != 1:
        return False
    chain = inputs[:]
    for step in [n for n in forward if n.op not in ("placeholder", "output")]:  # each reads the one before
        if not (step.op == "call_method" and step.args[0] is chain[-1] and not step.kwargs and (
                (step.target == "to" and len(step.args) == 2 and isinstance(step.args[1], torch.dtype))
                or (step.target == "view_as" and step.args[1] is step.args[0]))):
            return False
        chain.append(step)
    # ((outputs), (saved)): the Function's output first; torch 2.11 also returns the value before the view_as,
    # whose gradient (the backward's second input) is unused.
    returned = forward[-1].args[0]
    if not (isinstance(returned, (tuple, list)) and len(returned) == 2 and isinstance(returned[0], (tuple, list))
            and returned[0]):
        return False
    outputs, saved = returned
    gradients = [n for n in backward if n.op == "placeholder"]
    return (outputs[0] is chain[-1] and set(outputs) <= set(chain) and not saved
            and len(gradients) == len(outputs) and not any(n.users for n in gradients[1:])
            and len(backward) == len(gradients) + 1 and backward[-1].args[0] in ((gradients[0],), gradients[0]))


def gradient_alterations(graph: Graph) -> list[str]:
    """What in a dynamo graph (and in the subgraphs it calls: checkpointed bodies) makes its backward differ from the
    autograd formulas of its ops: a detach of a value that needs a gradient, or an op computed from one with grad
    mode off, whose result flows on into gradients (_reaches_gradient); a custom autograd.Function or a call dynamo
    keeps opaque (allow_in_graph, nonstrict_trace) taking one; a tensor hook. Each as ``"<node>: <what>"``."""
    found = []
    grad_off, before_inference_mode = False, []
    unchanged = {node for node in graph.nodes if node.op == "call_function" and _call_name(node) in _CUSTOM_FUNCTIONS
                 and _passes_gradient_unchanged(node)}
    their_bodies = {body for node in unchanged for body in node.args[:2]}
    for node in graph.nodes:
        if node in unchanged or node in their_bodies:
            continue
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


def _pieces(nodes: set[Node], edges: Callable[[Node], tuple[list[Node], list[Node]]]
            ) -> list[tuple[set[Node], set[Node], set[Node]]]:
    """``nodes`` split into the pieces their edges among themselves join (``edges``: a node's inputs and users),
    each with the tensor-valued nodes outside ``nodes`` it reads and those reading it (placeholders and sizes
    excepted: a model's layers share those)."""
    pieces, seen = [], set()
    for start in nodes:
        if start in seen:
            continue
        piece, reads, readers, stack = set(), set(), set(), [start]
        while stack:
            node = stack.pop()
            if node in piece:
                continue
            piece.add(node)
            inputs, users = edges(node)
            for others, border in ((inputs, reads), (users, readers)):
                for other in others:
                    if other in nodes:
                        stack.append(other)
                    elif other.op != "placeholder" and isinstance(other.meta.get("val"), torch.Tensor):
                        border.add(other)
        seen |= piece
        pieces.append((piece, reads, readers))
    return pieces


def _edges(node: Node) -> tuple[list[Node], list[Node]]:
    return list(node.all_input_nodes), list(node.users)


def _tag_new_nodes(forward: Graph, tags_before: dict[Node, tuple | None],
                   edges_before: dict[Node, tuple[list[Node], list[Node]]]) -> None:
    """Give the nodes a rewrite added the checkpointing tags of the nodes they replaced, so that the partitioner
    recomputes (or saves) the moe_ops ops as it would have the plain code: each piece of new nodes takes the tags
    of the replaced pieces it shares a border with on the same side (a surviving value both read, or one reading
    both; not a value one reads and the other is read by: the residual sum between two checkpointed layers), so
    that blocks in regions of their own (a model's checkpointed layers) keep each theirs. A piece that replaced
    nodes from inside and outside a checkpointed region, or from two regions, has no one answer."""
    present = set(forward.nodes)
    removed = {node for node in tags_before if node not in present and node.op == "call_function"}
    replaced = _pieces(removed, edges_before.__getitem__)
    added = {node for node in present if node not in tags_before}
    for piece, reads, readers in _pieces(added, _edges):
        tags = {tags_before[node] for old_piece, old_reads, old_readers in replaced
                if old_reads & reads or old_readers & readers for node in old_piece}
        if not tags:  # bordering no replaced piece: every replaced node's tags
            tags = {tags_before[node] for node in removed}
        if len(tags) > 1:
            raise NotRewritable("a rewritten block straddles an activation-checkpointing boundary")
        (tag,) = tags or {None}
        if tag is not None:
            for node in piece:
                node.meta.update(zip(_CHECKPOINT_KEYS, tag, strict=True))


def _forward_graph(graph: Graph, primals: list[Node], forward_outputs: list) -> tuple[Graph, dict[Node, Node]]:
    """The nodes that ``forward_outputs`` need, and the forward's runtime asserts, copied into a graph
    whose inputs are the primals; and each copied node's copy."""
    backward = _gradients(graph)
    needed = _upstream([*forward_outputs, *(node for node in _effects(graph) if node not in backward)])
    for node in needed:
        if node.op == "placeholder" and node not in primals:
            raise NotRewritable(f"a forward output depends on {node.name}")
    forward = Graph()
    copies: dict[Node, Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node in primals:
            copies[node] = forward.placeholder(node.name)
            copies[node].meta = dict(node.meta)
        elif node in needed:
            copies[node] = forward.node_copy(node, lambda n: copies[n])
    forward.output(tuple(copies[o] if isinstance(o, Node) else o for o in forward_outputs))
    return forward, copies


def _operands(node: Node) -> list:
    """``node``'s arguments, flattened, in order (nodes and the rest)."""
    return pytree.tree_leaves((node.args, node.kwargs))


# Forward ops whose backward may pass the gradient on with no node of its own: a residual add; casts and views, whose
# backward Inductor's joint patterns may fold into their neighbours' (a cast round trip's two casts back cancel).
_PASS_THROUGH = frozenset({
    "aten.add", "aten.sub", "prims.convert_element_type", "aten._to_copy", "aten.clone", "aten.alias", "aten.view",
    "aten._unsafe_view", "aten.reshape", "aten.permute", "aten.t", "aten.transpose", "aten.squeeze", "aten.unsqueeze",
    "aten.expand", "aten.slice", "aten.select", "aten.as_strided", "<built-in function getitem>",
})
# And those whose backward hands one operand the gradient as it is (the tensor accumulated into; a GEMM's bias).
# A path of either from the replaced nodes' inputs to their outputs would carry part of the plain backward through
# no node that the splice can replace.
_MAY_PASS_GRADIENT_AS_IS = _PASS_THROUGH | {
    "aten.addcmul", "aten.addcdiv", "aten.index_add", "aten.scatter_add", "aten.scatter_reduce", "aten.index_put",
    "aten.addmm", "aten.addmv", "aten.addbmm", "aten.baddbmm", "aten.lerp", "aten.where", "aten.masked_fill",
    "aten.cat", "aten.copy", "aten.rsub", "aten.mul", "aten.div",  # by 1: Inductor folds the backward's product
}


def _op_packet(op) -> str:
    """``aten.t.default`` -> ``aten.t``."""
    return str(op).rsplit(".", 1)[0] if isinstance(op, torch._ops.OpOverload) else str(op)


def _back_through_pass_through(value: Node, within: set[Node]) -> set[Node]:
    """``value`` and, while the node reached is a _PASS_THROUGH op, its operands in ``within``: the nodes whose backward
    may be the one that reads ``value``'s gradient (a cast or view passing it on with no node of its own)."""
    return closure([value], lambda node: [n for n in node.all_input_nodes if n in within]
                   if node.op == "call_function" and _op_packet(node.target) in _PASS_THROUGH else [])


@dataclasses.dataclass
class _Splice:
    """Where the rewritten forward's new nodes go into the joint graph and what of it they replace.

    ``added``: the new nodes, in the rewritten forward's order; ``new_inputs``: the nodes of that forward they read;
    ``new_outputs``: those of them that kept nodes read, each standing for a replaced node. ``inputs`` and
    ``outputs``: the joint graph's nodes for the same (``outputs``: the replaced nodes). ``wants_grad``: which inputs
    carry a gradient; ``contributions``: per such input (by index), the node of the plain backward that is the
    replaced nodes' part of its gradient (the first, where they made several), which the new nodes' part replaces.
    ``gradient_of``: per input that the replaced nodes did not read (the route op reads the logits where the replaced
    top-k read the softmax a load-balancing loss also reads), the node of the plain backward that is its gradient and
    where it is read as that (its readers, or a primal's position in the output), to which the new nodes' part is
    added. ``dropped``: the replaced nodes' other parts, and their parts for values the new nodes do not read, each
    summed with the rest of its value's gradient, which the sum becomes. ``grads``: (output index, node of the plain
    backward that is that output's gradient). ``replaced``: every node that goes (the replaced forward nodes and
    their backward)."""

    added: list[Node]
    new_inputs: list[Node]
    new_outputs: list[Node]
    inputs: list[Node]
    wants_grad: list[bool]
    contributions: dict[int, Node]
    gradient_of: dict[int, tuple[Node, list[Node] | int]]
    dropped: list[Node]
    outputs: list[Node]
    grads: list[tuple[int, Node]]
    replaced: set[Node]


class _Records:
    """Which forward op a backward node of the joint graph belongs to, by the autograd sequence numbers AOTAutograd
    puts on both, and which nodes are gradient accumulations (an add of two gradients)."""

    def __init__(self, forward_nodes: set[Node], gradients: set[Node]):
        # A forward op's record is the last autograd node it made; it may have made more (an in-place op on a view):
        # the backward nodes numbered after the previous op's record and up to its own are its.
        self.numbers = sorted({node.meta["seq_nr"] for node in forward_nodes if "seq_nr" in node.meta})
        self.gradients = gradients

    def owner(self, node: Node) -> int | None:
        """The record of the forward op whose backward made ``node`` (None: no number, or after every op's)."""
        number = node.meta.get("seq_nr")
        if number is None:
            return None
        index = bisect.bisect_left(self.numbers, number)
        return self.numbers[index] if index < len(self.numbers) else None

    def accumulation(self, node: Node) -> bool:
        return (node.target is torch.ops.aten.add.Tensor and len(node.all_input_nodes) == 2
                and all(n in self.gradients for n in node.all_input_nodes))


def _find_splice(graph: Graph, forward: Graph, copies: dict[Node, Node], operands_before: dict[Node, list],
                 primals: list[Node], wants_grad: list[bool], num_forward_outputs: int) -> _Splice:
    """The _Splice of the rewrites made on ``forward`` (copied from ``graph`` as ``copies`` say, each node's operands
    before the rewrites in ``operands_before``).

    The backward of the replaced forward nodes is told by the autograd sequence numbers AOTAutograd puts on each
    forward op and on the backward nodes it made from that op's formula; a gradient accumulation (an add of two
    gradients, numbered as it happens) belongs to it where both its operands do. Where the joint graph does not tell
    them apart (a replaced op sharing its number with a kept one that takes a gradient, a node of no number reading
    them, a gradient passed through the replaced nodes by none of their backward's nodes, a part of the gradient not
    tied to one input), NotRewritable."""
    original = {copy: node for node, copy in copies.items()}
    _absorb_trailing_steps(forward, original)
    present = set(forward.nodes)
    added = [node for node in forward.nodes if node not in original and node.op not in ("placeholder", "output")]
    added_set = set(added)
    removed = {original[copy] for copy in original if copy not in present and copy.op == "call_function"}

    # The replaced nodes whose values the new ones stand for, by the operands the rewrites changed.
    stands_for: dict[Node, Node] = {}
    for node in forward.nodes:
        if node in added_set or node.op == "placeholder":
            continue
        before, after = operands_before[node], _operands(node)
        if len(before) != len(after):
            raise NotRewritable(f"a rewrite changed the arguments of {node.name}")
        for old, new in zip(before, after, strict=True):
            if old is new:
                continue
            if new not in added_set or not isinstance(old, Node) or old in present:
                raise NotRewritable(f"a rewrite made {node.name} read another node than a new one")
            if stands_for.setdefault(new, original[old]) is not original[old]:
                raise NotRewritable(f"{new.name} stands for two replaced nodes")
    new_outputs = list(stands_for)
    outputs = [stands_for[node] for node in new_outputs]
    new_inputs = list(dict.fromkeys(n for node in added for n in node.all_input_nodes if n not in added_set))
    inputs = [original[node] for node in new_inputs]

    # What can carry a gradient: floating-point values computed from primals that want one, read on by the forward's
    # outputs or the backward (not a statistic only written into a buffer).
    gradients = _gradients(graph)
    differentiable = closure([p for p, wants in zip(primals, wants_grad, strict=True) if wants],
                             lambda node: [user for user in node.users if _floating(user, "val")])
    differentiable &= _upstream([*graph.output_node().all_input_nodes, *gradients])
    differentiable_removed = removed & differentiable
    read_by_removed = {n for node in removed for n in node.all_input_nodes if n not in removed}
    _check_no_pass_through(removed, read_by_removed, set(outputs), differentiable)
    numbers = set()
    for node in differentiable_removed:
        if "seq_nr" not in node.meta:
            raise NotRewritable(f"{node.name}'s backward cannot be told (no seq_nr)")
        numbers.add(node.meta["seq_nr"])
    forward_nodes = set(copies)
    kept_records = {node.meta.get("seq_nr") for node in forward_nodes - removed if node in differentiable}
    if kept_records & numbers:
        raise NotRewritable("a kept node shares its autograd record with a replaced node")

    records = _Records(forward_nodes, gradients)
    owner, accumulation = records.owner, records.accumulation
    backward = set()
    for node in graph.nodes:
        if node.op != "call_function" or node in forward_nodes:
            continue
        if (accumulation(node) and all(n in backward for n in node.all_input_nodes)) or (
                not accumulation(node) and owner(node) in numbers):
            backward.add(node)
    # A node read only by that backward goes with it where it reads a gradient only from it (a view's backward whose
    # forward functionalization replayed later, numbered otherwise), or where it is an accumulation of one of its parts
    # with a gradient from outside (a value the replaced nodes both read on and hand out: router weights a model also
    # returns; the outside operand is that output's gradient).
    # Nodes of no record (Inductor's joint patterns made them: a matmul's padding on CUDA) go with it where a piece of
    # them reads gradients only from it and is read only by it.
    unnumbered = {node for node in graph.nodes if node.op == "call_function" and node not in forward_nodes
                  and "seq_nr" not in node.meta and not accumulation(node)}
    pieces = [piece for piece, _, _ in _pieces(unnumbered, _edges)]
    changed = True
    while changed:
        changed = False
        for piece in pieces:
            read = {n for node in piece for n in node.all_input_nodes if n not in piece and n in gradients}
            users = {user for node in piece for user in node.users if user not in piece}
            if not piece <= backward and read and read <= backward and users and users <= backward:
                backward |= piece
                changed = True
        for node in graph.nodes:
            if node in backward or node in forward_nodes or node.op != "call_function" or not node.users:
                continue
            read = [n for n in node.all_input_nodes if n in gradients]
            if (all(u in backward for u in node.users) and any(n in backward for n in read) and (
                    accumulation(node) or (all(n in backward for n in read) and owner(node) not in kept_records))):
                backward.add(node)
                changed = True
    replaced = removed | backward
    for node in graph.nodes:
        if node.op != "call_function" or node in replaced:
            continue
        reads = set(node.all_input_nodes)
        if reads & (removed - set(outputs)):
            raise NotRewritable(f"{node.name} reads a value of the replaced nodes")
        if reads & backward and "seq_nr" not in node.meta and not accumulation(node):
            raise NotRewritable(f"{node.name} (no seq_nr) reads the replaced nodes' backward")
    if any(node.is_impure() and not node.users for node in backward):
        raise NotRewritable("the replaced nodes' backward has a node kept for its effect")

    # The gradients reaching the replaced outputs: what their backward reads of the rest of the backward, told
    # apart (blocks of one shape) by the record of the op that made each output (through steps with no backward
    # node of their own). One gradient may reach several outputs (two blocks summed).
    numbers_of = [{n.meta.get("seq_nr") for n in _back_through_pass_through(output, removed)} for output in outputs]
    grads = []
    for node in dict.fromkeys(n for b in graph.nodes if b in backward for n in b.all_input_nodes):
        if node in backward or node not in gradients:
            continue
        readers, stack = set(), [user for user in node.users if user in backward]
        while stack:  # the backward ops reading it, through accumulations
            user = stack.pop()
            if accumulation(user):
                stack += [u for u in user.users if u in backward]
            else:
                readers.add(owner(user))
        matching = [i for i, output in enumerate(outputs) if output in differentiable and _same_value(output, node)]
        if len(matching) > 1:
            matching = [i for i in matching if readers & numbers_of[i]]
        if not matching or any(i in matching for i, _ in grads):
            raise NotRewritable(f"{node.name} is not the gradient of outputs of the replaced nodes")
        grads += [(i, node) for i in matching]

    # Each part of an input's gradient the replaced backward makes: by who reads it (the output's gradient of a
    # primal; the backward of the input's own op, by its number), through accumulations.
    output_node = graph.output_node()
    gradient_slots = list(output_node.args[0])[num_forward_outputs:]
    parts: dict[Node, list[Node]] = {}  # value -> its parts
    for part in graph.nodes:
        if part not in backward or all(user in backward for user in part.users):
            continue
        targets, stack, seen = set(), [part], set()
        while stack:
            node = stack.pop()
            for user in node.users:
                if user in backward or user in seen:
                    continue
                seen.add(user)
                if user is output_node:
                    targets |= {("primal", primals[i]) for i, slot in enumerate(gradient_slots) if slot is node}
                elif accumulation(user):
                    stack.append(user)
                elif "seq_nr" in user.meta:
                    targets.add(("number", owner(user)))
                else:
                    raise NotRewritable(f"{user.name} (no seq_nr) reads the replaced nodes' backward")
        # A gradient has its value's shape and dtype, and is made by the backward of an op that reads the value;
        # inputs alike to both are told apart by the gradient's readers.
        read = _read_by_backward_of(part, removed, backward, records)
        candidates = [value for value in dict.fromkeys([*inputs, *read_by_removed])
                      if value in read and value in differentiable and _same_value(value, part)]
        if len(candidates) > 1:
            candidates = [value for value in candidates if _gradient_readers(value, differentiable) & targets]
        if len(candidates) != 1:
            raise NotRewritable(f"{part.name} is not the gradient of one input of the replaced nodes")
        parts.setdefault(candidates[0], []).append(part)
    # An input's first part becomes the new nodes' gradient of it; its other parts (a value the replaced nodes read
    # twice, each part summed on its own with the rest of its gradient) and the parts of values the new nodes do not
    # read are dropped from their sums.
    contributions = {i: parts[value][0] for i, value in enumerate(inputs) if value in parts}
    dropped = [part for value, its_parts in parts.items() for part in its_parts[value in inputs:]]
    for part in dropped:
        if not all(accumulation(user) and user.args.count(part) == 1 for user in part.users if user not in backward):
            raise NotRewritable(f"{part.name} is a gradient the new nodes do not make, and not one part of a sum")
    # The new nodes' inputs the replaced ones did not read: their gradient in the plain backward, read by the
    # backward of the op that made them (a primal's: the output's).
    gradient_of = {}
    for i, value in enumerate(inputs):
        if value in differentiable and value not in read_by_removed:
            gradient, readers = _gradient_node(value, primals, gradient_slots, forward_nodes, records)
            gradient_of[i] = gradient, readers if isinstance(readers, list) else num_forward_outputs + readers
    wants = [value in differentiable for value in inputs]
    return _Splice(added, new_inputs, new_outputs, inputs, wants, contributions, gradient_of, dropped, outputs, grads,
                   replaced)


def _gradient_node(value: Node, primals: list[Node], gradient_slots: list, forward_nodes: set[Node],
                   records: _Records) -> tuple[Node, list[Node] | int]:
    """The node of the plain backward that is ``value``'s gradient, and where it is read as that: a primal's slot
    (its index among the gradient slots), else the one gradient the backward of the op that made ``value`` reads
    (those backward nodes; NotRewritable where that is not one node: an op whose backward has no node, or that makes
    several values taking gradients). Only there: the same node may be another value's gradient too (through an add)."""
    if value in primals:
        index = primals.index(value)
        if not isinstance(gradient_slots[index], Node):
            raise NotRewritable(f"{value.name} takes no gradient in the plain backward")
        return gradient_slots[index], index
    number = value.meta.get("seq_nr")
    gradients = records.gradients
    own = {node for node in gradients if node not in forward_nodes and number is not None
           and records.owner(node) == number}
    read = {n for node in own for n in node.all_input_nodes if n in gradients and n not in own}
    if len(read) != 1:
        raise NotRewritable(f"{value.name}'s gradient in the plain backward is not one node")
    (gradient,) = read
    return gradient, [node for node in own if gradient in node.all_input_nodes]


def _absorb_trailing_steps(forward: Graph, original: dict[Node, Node]) -> None:
    """Casts and views a rewrite kept after its new nodes that share an autograd record with a node it replaced (the
    cast back to bf16 inside ``softmax(x, dtype=x.dtype)``'s decomposition, whose upcast and arithmetic the route
    rewrite replaced) become new nodes too: one op's backward cannot be split between replaced and kept nodes."""
    present = {node for node in forward.nodes if node in original}
    replaced_records = {original[copy].meta.get("seq_nr") for copy in original if copy not in present} - {None}
    changed = True
    while changed:
        changed = False
        for node in list(forward.nodes):
            if (node in original and node.op == "call_function" and _op_packet(node.target) in _PASS_THROUGH
                    and node.meta.get("seq_nr") in replaced_records and node.all_input_nodes
                    and not any(n in original for n in node.all_input_nodes)):
                with forward.inserting_after(node):
                    copy = forward.node_copy(node, lambda n: n)
                node.replace_all_uses_with(copy)
                forward.erase_node(node)
                changed = True


def _read_by_backward_of(part: Node, removed: set[Node], backward: set[Node], records: _Records) -> set[Node]:
    """The values outside ``removed`` that the replaced ops whose backward made ``part`` read (by its number, or its
    operands' where it is an accumulation), through the replaced ops that may pass a gradient on with no node of
    their own (a transposed weight whose backward's transpose Inductor folded into the GEMM's)."""
    accumulation = records.accumulation
    numbers = {records.owner(node) for node in closure([part], lambda node: [
        n for n in node.all_input_nodes if n in backward] if accumulation(node) else []) if not accumulation(node)}
    ops = closure([node for node in removed if node.meta.get("seq_nr") in numbers], lambda node: [
        n for n in node.all_input_nodes if n in removed and _op_packet(n.target) in _PASS_THROUGH])
    return {n for node in ops for n in node.all_input_nodes if n not in removed}


def _gradient_readers(value: Node, differentiable: set[Node]) -> set[tuple]:
    """Who in the plain backward may read ``value``'s gradient: the graph's output (a primal's), the backward of the op
    that made it (its number), and, where that op may pass the gradient on with no node of its own (_PASS_THROUGH: a
    cast round trip whose casts back Inductor folds), the same of its operands."""
    return {("primal", node) if node.op == "placeholder" else ("number", node.meta.get("seq_nr"))
            for node in _back_through_pass_through(value, differentiable)}


def _same_value(a: Node, b: Node) -> bool:
    """Whether two nodes make tensors of one dtype and shape (for every value of the shape symbols)."""
    x, y = a.meta.get("val"), b.meta.get("val")
    return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
            and same_shape(x.shape, y.shape))


def _check_no_pass_through(removed: set[Node], inputs: set[Node], outputs: set[Node], differentiable: set[Node]):
    """NotRewritable where a path of _PASS_THROUGH ops among the replaced nodes leads from an input to an output: the
    plain backward may hand that part of the gradient on by no node of its own."""
    reached = closure([n for n in inputs if n in differentiable], lambda node: [
        user for user in node.users
        if user in removed and user in differentiable and _op_packet(user.target) in _MAY_PASS_GRADIENT_AS_IS])
    if reached & outputs:
        raise NotRewritable("a gradient may pass through the replaced nodes with no backward node of theirs")


class _DifferentiableInterpreter(torch.fx.Interpreter):
    """Runs a graph of aten ops under autograd: a prims cast (which Inductor's graphs hold) has no autograd formula,
    so it runs as the aten op it came from."""

    def call_function(self, target, args, kwargs):
        if target is torch.ops.prims.convert_element_type.default:
            tensor, dtype = args
            return torch.ops.aten._to_copy.default(tensor, dtype=dtype)
        return super().call_function(target, args, kwargs)


def _region_module(owner: torch.nn.Module, splice: _Splice) -> GraphModule:
    """The new nodes as a graph of their own: the nodes they read in, the replaced nodes' stand-ins out."""
    region = Graph()
    env: dict[Node, Node] = {}
    for i, node in enumerate(splice.new_inputs):
        env[node] = region.placeholder(f"input_{i}")
        env[node].meta = dict(node.meta)
    for node in splice.added:
        env[node] = region.node_copy(node, lambda n: env[n])
    region.output(tuple(env[node] for node in splice.new_outputs))
    return GraphModule(owner, region)


def _trace_region(module: GraphModule, splice: _Splice) -> tuple[GraphModule, list[int]]:
    """The joint graph of the new nodes: (their outputs, then the gradient of each input in
    ``splice.contributions``' order, then of the inputs of ``splice.gradient_of`` that take one, which it returns
    too), from (the inputs, the gradients reaching the outputs in ``splice.grads``' order); traced with fake tensors
    and Inductor's decompositions, as AOTAutograd traces. NotRewritable where the new nodes take gradients other than
    the replaced nodes took: an input's that the replaced nodes read where the plain backward has none (the user's
    code detached it) or none where it has one, an output taking none."""
    from torch.fx.experimental.proxy_tensor import make_fx

    num_inputs = len(splice.inputs)
    wanted = [i for i, wants in enumerate(splice.wants_grad) if wants]
    added: list[int] = []  # the inputs of splice.gradient_of whose gradients the new nodes take, as traced

    def joint(*args):
        values, grads = list(args[:num_inputs]), list(args[num_inputs:])
        with torch.enable_grad():
            leaves = [value.detach().requires_grad_(True) if wants else value
                      for value, wants in zip(values, splice.wants_grad, strict=True)]
            outputs = list(_DifferentiableInterpreter(module).run(*leaves))
            differentiated = [outputs[i] for i, _ in splice.grads]
            if not all(isinstance(o, torch.Tensor) and o.requires_grad for o in differentiated):
                raise NotRewritable("an output of the new nodes takes no gradient where the replaced one took one")
            got = (torch.autograd.grad(differentiated, [leaves[i] for i in wanted], grads, allow_unused=True)
                   if differentiated and wanted else [None] * len(wanted))
        by_input = dict(zip(wanted, got, strict=True))
        taken = {i for i, grad in by_input.items() if grad is not None}
        if not set(splice.contributions) <= taken or taken - set(splice.contributions) - set(splice.gradient_of):
            raise NotRewritable("the new nodes take gradients of other inputs than the replaced nodes did (a detach "
                                "or a no-grad region in the replaced code)")
        added.extend(i for i in splice.gradient_of if i in taken)
        return [*(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs),
                *(by_input[i] for i in splice.contributions), *(by_input[i] for i in added)]

    examples = [node.meta["val"] for node in splice.inputs] + [node.meta["val"] for _, node in splice.grads]
    fake_mode = detect_fake_mode(examples)
    try:
        # The interpreter runs each node with its meta current, so the traced nodes keep its checkpointing tags (and
        # stack traces), as AOTAutograd's own trace does.
        with fake_mode, fx_traceback.preserve_node_meta():
            traced = make_fx(joint, decomposition_table=select_decomp_table())(*examples)
    except RuntimeError as error:  # e.g. an op of the new nodes that has no autograd formula
        raise NotRewritable(f"tracing the new nodes' joint graph failed: {error}") from error
    return traced, added


def _splice_in(graph: Graph, splice: _Splice, traced: GraphModule, added: list[int]) -> None:
    """Put ``traced`` (with ``added``: _trace_region's) into ``graph`` in place of ``splice.replaced``."""
    owner = graph.owning_module
    for node in traced.graph.find_nodes(op="get_attr"):
        # Constants the trace made: they move onto the joint graph's module.
        name = f"_moe_ops_{node.target}"
        while hasattr(owner, name):
            name += "_"
        setattr(owner, name, getattr(traced, node.target))
        node.target = name
    placeholders = list(traced.graph.find_nodes(op="placeholder"))
    with graph.inserting_before(graph.output_node()):
        values = graph.graph_copy(traced.graph, dict(zip(
            placeholders, [*splice.inputs, *(node for _, node in splice.grads)], strict=True)))
    values = iter(values)
    kept = lambda user: user not in splice.replaced  # noqa: E731
    for old in splice.outputs:
        old.replace_all_uses_with(next(values), delete_user_cb=kept)
    for old in splice.contributions.values():
        old.replace_all_uses_with(next(values), delete_user_cb=kept)
    for i in added:
        # Where the plain gradient is read as the input's, it is read plus the new nodes' part.
        old, readers = splice.gradient_of[i]
        with graph.inserting_before(graph.output_node()):
            total = graph.call_function(torch.ops.aten.add.Tensor, (old, next(values)))
        total.meta["val"] = old.meta["val"]
        if isinstance(readers, int):  # a primal's: its slot in the output
            slots = list(graph.output_node().args[0])
            slots[readers] = total
            graph.output_node().args = (slots,)
        else:
            for reader in readers:
                reader.replace_input_with(old, total)
    for part in splice.dropped:
        for total in [user for user in part.users if user not in splice.replaced]:
            (rest,) = (operand for operand in total.args if operand is not part)
            total.replace_all_uses_with(rest)
            graph.erase_node(total)
    for node in reversed(list(graph.nodes)):
        if node in splice.replaced:
            graph.erase_node(node)
    stable_topological_sort(graph)


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
    """Apply ``rewrites`` to the forward of the joint ``graph`` and splice the new nodes' joint graph in place of
    the replaced nodes and their backward; returns how many subgraphs they replaced (0: the graph is unchanged)."""
    alterations, _scanned.alterations = getattr(_scanned, "alterations", None), None
    try:
        if alterations is None:
            raise NotRewritable("no look at the dynamo graph preceded it (Inductor's pre-grad hook did not run)")
        if alterations:
            raise NotRewritable(f"the code alters gradients ({'; '.join(alterations)}): the backward the moe_ops ops "
                                "bring would not be its own")
        primals, tangents = _placeholders(graph)
        outputs = list(graph.output_node().args[0])
        num_forward_outputs = len(outputs) - len(primals)
        if num_forward_outputs < 0:
            raise NotRewritable("fewer outputs than primals")
        wants_grad = [grad is not None for grad in outputs[num_forward_outputs:]]
        forward, copies = _forward_graph(graph, primals, outputs[:num_forward_outputs])
        operands_before = {node: _operands(node) for node in forward.nodes}
        # The rewrites count what they replace; if the joint graph is then kept, nothing was replaced.
        counted = dict(counters["moe_ops"])
        rewritten = 0
        for rewrite in rewrites:
            tags_before = {node: _checkpoint_tags(node) for node in forward.nodes}
            edges_before = {node: _edges(node) for node in forward.nodes}
            replaced = rewrite(forward)
            if replaced:
                # The replaced nodes go (each rewrite's, before the next looks), so that their tags can be read off.
                forward.eliminate_dead_code()
                _tag_new_nodes(forward, tags_before, edges_before)
            rewritten += replaced
        if not rewritten:
            return 0
        _keep_preactivations(forward)
        splice = _find_splice(graph, forward, copies, operands_before, primals, wants_grad, num_forward_outputs)
        traced, added = _trace_region(_region_module(graph.owning_module, splice), splice)
        mutating = [n.target for n in traced.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
                    and n.target._schema.is_mutable and not _overwrites_only_its_kept_preactivations(n)]
        if mutating:
            raise NotRewritable(f"the new nodes' joint graph mutates ({mutating[0]})")
    except NotRewritable as reason:
        if "counted" in locals():
            counters["moe_ops"].clear()
            counters["moe_ops"].update(counted)
        log.debug("joint graph not rewritten (its forward is left as the plain code): %s", reason)
        return 0
    _splice_in(graph, splice, traced, added)
    _mark_forward_and_backward(graph, tangents, num_forward_outputs)
    counters["moe_ops"]["joint_rewrite"] += 1
    log.info("rewrote a training graph: %d subgraph(s) in its forward, their backward from the moe_ops ops",
             rewritten)
    return rewritten
