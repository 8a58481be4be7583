"""What the graph-pass tests share: a fresh compile state per test, and the post-grad graph that the
moe_ops pass leaves, summarised so that it reads the same on torch 2.11 and 2.13."""

from __future__ import annotations

import operator
import sys

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import assert_close_rel
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import moe_ops
from moe_ops.lowering.graph import experts_rewrite


@pytest.fixture
def fresh_compile_state():
    """Each case compiles from scratch (no dynamo or FX-graph cache hit skips the pass) and leaves
    the global settings as it found them."""
    saved_rewrites = moe_ops.config.rewrites
    torch._dynamo.reset()
    counters.clear()
    experts_rewrite._explained.clear()  # each test sees its own "not rewritten" messages
    # and its own lines of transformers' experts modules (the module loads with transformers: not imported here)
    hf_experts = sys.modules.get("moe_ops.lowering.hf_experts")
    if hf_experts is not None:
        hf_experts._REPORTED.clear()
    with inductor_config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()
    moe_ops.config.rewrites = saved_rewrites


def config_switched_on(field: str):
    """A fixture that turns ``moe_ops.config.<field>`` on inside the test and restores it after."""

    @pytest.fixture
    def switched_on():
        saved = getattr(moe_ops.config, field)
        setattr(moe_ops.config, field, True)
        yield
        setattr(moe_ops.config, field, saved)

    return switched_on


training_rewrites = config_switched_on("training_rewrites")  # the default too; the tests name it where they rely on it

# What a rewritten training graph's forward calls: fused_experts' training variant (moe_ops/fused_experts.py).
FUSED_EXPERTS_TRAINING = "moe_ops.fused_experts_training.default"


def calls_experts_backward(backward_graph: str) -> bool:
    """Whether a rewritten training graph's backward calls fused_experts' backward op: the training
    variant's where its forward kept the pre-activations (bf16 on sm90/sm100, no biases), the op's own
    (which recomputes them) elsewhere."""
    return ("moe_ops.fused_experts_training_backward.default" in backward_graph
            or "moe_ops.fused_experts_backward.default" in backward_graph)


class _RecordAfter(CustomGraphPass):
    """Runs ``inner``, then keeps the post-grad graph it left."""

    def __init__(self, inner):
        self.inner, self.graphs = inner, []

    def __call__(self, graph):
        self.inner(graph)
        self.graphs.append(graph_summary(graph))

    def uuid(self):
        return None


_aten = torch.ops.aten
_CHECKS = (_aten._assert_async.msg, _aten._assert_async.default, _aten._assert_scalar.default)


def graph_summary(graph: torch.fx.Graph) -> str:
    """The call_function targets in order, each with its non-tensor arguments (a node inside a list
    shows as ``%``): stable across torch versions, unlike node names. Runtime checks (asserts and the
    nodes only they read, e.g. one_hot's range checks) are left out: which ones a decomposition emits
    differs between torch versions."""
    checks: set[torch.fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op == "call_function" and (node.target in _CHECKS or (node.users and checks.issuperset(node.users))):
            checks.add(node)

    def show(arg):
        if isinstance(arg, torch.fx.Node):
            return "%"
        if isinstance(arg, list):
            return f"[{', '.join(map(show, arg))}]"
        if isinstance(arg, tuple):
            return f"({', '.join(map(show, arg))}{',' if len(arg) == 1 else ''})"
        return repr(arg)

    lines = []
    for node in graph.nodes:
        if node.op != "call_function" or node in checks:
            continue
        name = "getitem" if node.target is operator.getitem else str(node.target)
        args = [show(a) for a in node.args if not isinstance(a, torch.fx.Node)]
        lines.append(f"{name}({', '.join(args)})")
    return "\n".join(lines)


def compile_and_record(fn, *args):
    """(compiled result, the post-grad graph after the moe_ops pass)."""
    recorder = _RecordAfter(inductor_config.post_grad_custom_post_pass)
    with inductor_config.patch(post_grad_custom_post_pass=recorder):
        result = torch.compile(fn, backend="inductor", fullgraph=True)(*args)
    (graph,) = recorder.graphs
    return result, graph


def training_step(module: torch.nn.Module, fn, *inputs, seed: int = 7):
    """(output, {name: gradient}) of one forward and backward through ``fn(*inputs)`` with random
    output gradients; the gradients of ``module``'s parameters and of the floating-point inputs."""
    module.zero_grad(set_to_none=True)
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    result = fn(*leaves)
    outputs = [o for o in (result if isinstance(result, tuple) else (result,)) if o.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    torch.autograd.backward(outputs, [torch.randn(o.shape, generator=generator).to(o) for o in outputs])
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    grads.update({f"input {i}": x.grad for i, x in enumerate(leaves) if x.grad is not None})
    return result, grads


def compile_training_and_record(module: torch.nn.Module, *inputs, fn=None):
    """(result, gradients, the forward's and the backward's post-grad graphs) of one compiled
    training step (``fn`` defaults to the module)."""
    recorder = _RecordAfter(inductor_config.post_grad_custom_post_pass)
    compiled = torch.compile(fn or module, backend="inductor", fullgraph=True)
    with inductor_config.patch(post_grad_custom_post_pass=recorder):
        result, grads = training_step(module, compiled, *inputs)
    forward_graph, backward_graph = recorder.graphs
    return result, grads, forward_graph, backward_graph


def check_training(module: torch.nn.Module, *inputs, dtype: torch.dtype, **dynamo_flags):
    """One compiled training step against eager: every output and every gradient within ``dtype``'s
    tolerance. Returns the forward's and the backward's post-grad graphs."""
    with torch._dynamo.config.patch(**dynamo_flags):
        result, grads, forward_graph, backward_graph = compile_training_and_record(module, *inputs)
    expected, expected_grads = training_step(module, module, *inputs)
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    for i, (actual, reference) in enumerate(zip(as_tuple(result), as_tuple(expected), strict=True)):
        assert_close_rel(actual, reference, dtype, f"output {i}")
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert_close_rel(grads[name], grad, dtype, f"gradient of {name}")
    return forward_graph, backward_graph
