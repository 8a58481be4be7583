"""Form 4, static loops over the experts: compiled with Inductor on the CPU, they give eager's
results. With dynamo's capture flags and ``moe_ops.config.stack_expert_weights`` their post-grad
graph holds one ``moe_ops.fused_experts`` in place of the unrolled loop.

The two layers restate code that transformers 5.x no longer ships (patterns.md, 1.1 and 1.5):
mistral-inference's ``MoeLayer`` and transformers <= 4.47's ``MixtralSparseMoeBlock``, each expert a
``w2(silu(w1(x)) * w3(x))`` MLP of ``nn.Linear``\\ s.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from compile_harness import (  # noqa: F401  (fixtures)
    FUSED_EXPERTS_TRAINING,
    calls_experts_backward,
    check_training,
    compile_and_record,
    config_switched_on,
    fresh_compile_state,
    training_rewrites,
)
from conftest import assert_close_rel
from expecttest import assert_expected_inline
from torch import nn
from torch._dynamo.utils import counters

import moe_ops

H, FF, E, K = 64, 32, 4, 2
pytestmark = pytest.mark.usefixtures("fresh_compile_state")

# What makes dynamo put the loop in one graph: torch.where's data-dependent size (and the scalars).
CAPTURE = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)


# ---- The layers as the models write them ----------------------------------------------------------


class FeedForward(nn.Module):  # mistral-inference's expert
    def __init__(self, act=F.silu):
        super().__init__()
        self.w1 = nn.Linear(H, FF, bias=False)
        self.w2 = nn.Linear(FF, H, bias=False)
        self.w3 = nn.Linear(H, FF, bias=False)
        self.act = act

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    """mistral-inference ``moe.py`` (gate and experts built here; the same forward)."""

    def __init__(self, num_experts=E, num_experts_per_tok=K):
        super().__init__()
        self.experts = nn.ModuleList([FeedForward() for _ in range(num_experts)])
        self.gate = nn.Linear(H, num_experts, bias=False)
        self.num_experts_per_tok = num_experts_per_tok

    def forward(self, inputs):
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])
        return results


class MixtralBlockSparseTop2MLP(nn.Module):  # transformers <= 4.47
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(H, FF, bias=False)
        self.w2 = nn.Linear(FF, H, bias=False)
        self.w3 = nn.Linear(H, FF, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states):
        current_hidden_states = self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states)
        current_hidden_states = self.w2(current_hidden_states)
        return current_hidden_states


class MixtralSparseMoeBlock(nn.Module):
    """transformers 4.47 ``modeling_mixtral.py`` (eval mode: no router jitter)."""

    def __init__(self):
        super().__init__()
        self.hidden_dim, self.num_experts, self.top_k = H, E, K
        self.gate = nn.Linear(self.hidden_dim, self.num_experts, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP() for _ in range(self.num_experts)])

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device
        )
        expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


# ---- Harness ---------------------------------------------------------------------------------------


stacking = config_switched_on("stack_expert_weights")


def run(layer, x, **dynamo_flags):
    """(compiled result, eager result, post-grad graph) under no_grad, with the capture flags."""
    with torch.no_grad(), torch._dynamo.config.patch(**(CAPTURE | dynamo_flags)):
        result, graph = compile_and_record(layer, x)
        return result, layer(x), graph


def rewrites() -> int:
    return counters["moe_ops"]["experts_rewrite_expert_loop"]


def tokens(dtype, *shape):
    return torch.randn(*shape, H, dtype=dtype)


DTYPES = [torch.float32, torch.bfloat16]


# ---- The rewrite fires, and compiled == eager ------------------------------------------------------


@pytest.mark.usefixtures("stacking")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mistral_inference(dtype):
    layer, x = MoeLayer().to(dtype).eval(), tokens(dtype, 7)
    result, expected, graph = run(layer, x)
    assert_close_rel(result, expected, dtype, "mistral MoeLayer")
    assert rewrites() == 1 and counters["moe_ops"]["route_rewrite"] == 1
    assert "nonzero" not in graph and "aten.mm" not in graph.split("moe_ops.route")[1]
    if dtype == torch.bfloat16:
        assert_expected_inline(graph, """\
aten.permute.default([1, 0])
aten.mm.default()
moe_ops.route.default(2, 'softmax', True, False, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.bfloat16)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.cat.default([%, %, %, %], 0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.cat.default([%, %, %, %], 0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.cat.default([%, %, %, %], 0)
moe_ops.fused_experts.default(None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)""")


@pytest.mark.usefixtures("stacking")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transformers_4_47_mixtral(dtype):
    layer, x = MixtralSparseMoeBlock().to(dtype).eval(), tokens(dtype, 2, 5)
    result, expected, graph = run(layer, x)
    assert_close_rel(result[0], expected[0], dtype, "MixtralSparseMoeBlock")
    torch.testing.assert_close(result[1], expected[1])
    assert rewrites() == 1 and counters["moe_ops"]["route_rewrite"] == 1
    if dtype == torch.float32:
        # The loop, its nonzeros and their asserts are gone; the weights are stacked per call.
        assert_expected_inline(graph, """\
aten.reshape.default([-1, 64])
aten.permute.default([1, 0])
aten.mm.default()
moe_ops.route.default(2, 'softmax', False, True, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.cat.default([%, %, %, %], 0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.cat.default([%, %, %, %], 0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.unsqueeze.default(0)
aten.cat.default([%, %, %, %], 0)
moe_ops.fused_experts.default(None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)
aten.reshape.default([2, 5, 64])""")


# ---- Off by default: recognised, not rewritten, said so --------------------------------------------


def test_stacking_off_by_default(caplog):
    assert not moe_ops.config.stack_expert_weights
    layer, x = MixtralSparseMoeBlock().eval(), tokens(torch.float32, 2, 5)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        result, expected, graph = run(layer, x)
    assert_close_rel(result[0], expected[0], torch.float32, "MixtralSparseMoeBlock")
    assert rewrites() == 0 and counters["moe_ops"]["expert_loop_not_stacked"] == 1
    assert "fused_experts" not in graph and graph.count("aten.nonzero.default") == E
    assert "stack_expert_weights = True" in caplog.text


# ---- Near misses: not rewritten, and still correct -------------------------------------------------


class SkipsAnExpert(MoeLayer):
    def forward(self, inputs):
        weights, selected_experts = torch.topk(self.gate(inputs), self.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            if i == 2:
                continue
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])
        return results


class OneGeluExpert(MoeLayer):
    def __init__(self):
        super().__init__()
        self.experts[2].act = F.gelu


class WeightsNotApplied(MoeLayer):
    def forward(self, inputs):
        _, selected_experts = torch.topk(self.gate(inputs), self.num_experts_per_tok)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            batch_idx, _ = torch.where(selected_experts == i)
            results[batch_idx] += expert(inputs[batch_idx])
        return results


@pytest.mark.usefixtures("stacking")
@pytest.mark.parametrize(
    "layer_class, reason",
    [
        (SkipsAnExpert, "the loop's experts are [0, 1, 3], not each of 0..2 once"),
        (OneGeluExpert, "the experts of the loop differ in their activation"),
        (WeightsNotApplied, "not an expert output times its routing weight"),
    ],
    ids=["missing_expert", "other_activation", "weights_not_applied"],
)
def test_not_rewritten(layer_class, reason, caplog):
    layer, x = layer_class().eval(), tokens(torch.float32, 7)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, expected, graph = run(layer, x)
    assert_close_rel(result, expected, torch.float32, layer_class.__name__)
    assert rewrites() == 0 and "fused_experts" not in graph and "aten.nonzero.default" in graph
    assert reason in caplog.text


# ---- Default dynamo flags: the loop never reaches a graph ------------------------------------------


@pytest.mark.usefixtures("stacking")
def test_default_flags_graph_break_not_rewritten(caplog):
    """torch.where's data-dependent size breaks the graph; dynamo skips the loop's frame and compiles
    the router and each expert's MLP alone: the pass never sees the loop, rewrites nothing, and says
    nothing about it."""
    layer, x = MoeLayer().eval(), tokens(torch.float32, 7)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count >= 1
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="moe_ops"):
        result = torch.compile(layer, backend="inductor")(x)
        expected = layer(x)
    assert_close_rel(result, expected, torch.float32, "MoeLayer, default flags")
    assert rewrites() == 0 and counters["moe_ops"]["expert_loop_not_stacked"] == 0
    assert "expert loop" not in caplog.text


# ---- Training ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("training_rewrites")
@pytest.mark.usefixtures("stacking")
@pytest.mark.parametrize("layer_class", [MoeLayer, MixtralSparseMoeBlock], ids=["mistral_inference", "mixtral_4_47"])
def test_training(layer_class):
    """The joint graph is rewritten: each expert's nn.Linear weights get their gradients through the
    stacked weights' backward, equal to eager's."""
    layer = layer_class()
    x = tokens(torch.float32, 10) if layer_class is MoeLayer else tokens(torch.float32, 2, 5)
    forward_graph, backward_graph = check_training(layer, x, dtype=torch.float32, **CAPTURE)
    assert rewrites() == 1 and counters["moe_ops"]["joint_rewrite"] == 1
    assert FUSED_EXPERTS_TRAINING in forward_graph
    assert calls_experts_backward(backward_graph)
