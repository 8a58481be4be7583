"""The weight-gather experts rewrite (form 2): experts code that gathers each slot's expert weights
(``W[ids]``) and multiplies them with batched GEMMs, compiled with Inductor on the CPU, gives eager's
results, and its post-grad graph holds one ``moe_ops.fused_experts`` in place of the block.

Real transformers blocks run with ``experts_implementation="batched_mm"``; gpt-fast's mixtral-moe
``MOEFeedForward`` is restated below as its source writes it. Near misses are restatements of
``batched_mm_experts_forward`` with one thing changed.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from compile_harness import (  # noqa: F401  (fixture)
    FUSED_EXPERTS_TRAINING,
    calls_experts_backward,
    check_training,
    compile_and_record,
    fresh_compile_state,
    training_rewrites,
    training_step,
)
from conftest import assert_close_rel
from expecttest import assert_expected_inline
from torch._dynamo.utils import counters

import moe_ops  # noqa: F401  (installs the pass)

transformers = pytest.importorskip("transformers")

B, S, H, F_, E, K = 2, 5, 64, 32, 8, 2  # F_: the expert intermediate size (F is torch.nn.functional)
T = B * S
DTYPES = [torch.float32, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("fresh_compile_state")


def rewrites() -> int:
    return counters["moe_ops"]["experts_rewrite"]


def init_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    for p in module.parameters():
        nn.init.normal_(p, std=0.1)
    return module.to(dtype).eval()


def hidden_states(dtype, batch=B):
    return torch.randn(batch, S, H, dtype=dtype)


# ---- transformers 5.x blocks, experts_implementation="batched_mm" ----------------------------------


def hf_config(config_class, **kwargs):
    config = config_class(
        hidden_size=H, intermediate_size=F_, moe_intermediate_size=F_, num_local_experts=E, num_experts=E,
        num_experts_per_tok=K, **kwargs,
    )
    config._experts_implementation = "batched_mm"
    return config


def mixtral_block(dtype):
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    return init_(MixtralSparseMoeBlock(hf_config(MixtralConfig)), dtype)


def qwen3_moe_block(dtype):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock

    return init_(Qwen3MoeSparseMoeBlock(hf_config(Qwen3MoeConfig, norm_topk_prob=True)), dtype)


def gpt_oss_block(dtype):  # transposed, interleaved gate/up, biases, clamped SwiGLU; returns the scores too
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssMLP

    return init_(GptOssMLP(hf_config(GptOssConfig)), dtype)


# ---- gpt-fast mixtral-moe (model.py), restated ------------------------------------------------------


class ConditionalFeedForward(nn.Module):
    def __init__(self, num_experts, intermediate_size, dim):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, intermediate_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, dim))

    def forward(self, x, expert_indices):
        w1_weights = self.w1[expert_indices]  # [T, A, D, D]
        w3_weights = self.w3[expert_indices]  # [T, A, D, D]
        w2_weights = self.w2[expert_indices]  # [T, A, D, D]
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1_weights))
        x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)
        expert_outs = torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)
        return expert_outs


class MOEFeedForward(nn.Module):
    def __init__(self, num_experts=E, intermediate_size=F_, dim=H, num_activated_experts=K):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.cond_ffn = ConditionalFeedForward(num_experts, intermediate_size, dim)
        self.dim = dim
        self.num_activated_experts = num_activated_experts

    def forward(self, x):
        x = x.view(-1, self.dim)
        # T = num_tokens, E = num_experts, D = hidden dim, A = activated experts
        # x: [T, D]
        scores = self.gate(x)  # [T, E]
        expert_weights = F.softmax(scores, dim=-1)
        expert_weights, expert_indices = torch.topk(expert_weights, self.num_activated_experts, dim=-1)  # [T, A]
        expert_weights /= expert_weights.sum(dim=-1, keepdim=True)  # [T, A]
        expert_outs = self.cond_ffn(x, expert_indices)
        return torch.einsum("tai,ta -> ti", expert_outs, expert_weights)


def gpt_fast_block(dtype):
    return init_(MOEFeedForward(), dtype)


# ---- The rewrite fires, and compiled == eager -------------------------------------------------------


def run(block, x):
    """(compiled output, eager output, post-grad graph); a block returning a tuple is compared in full."""
    with torch.no_grad():
        result, graph = compile_and_record(block, x)
        expected = block(x)
    return result, expected, graph


def assert_same(result, expected, dtype):
    result = result if isinstance(result, tuple) else (result,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for i, (actual, reference) in enumerate(zip(result, expected, strict=True)):
        assert_close_rel(actual, reference, dtype, f"output {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixtral_batched_mm(dtype):
    x = hidden_states(dtype)
    result, expected, graph = run(mixtral_block(dtype), x)
    assert_same(result, expected, dtype)
    assert rewrites() == 1 and counters["moe_ops"]["experts_rewrite_weight_gather"] == 1
    if dtype == torch.bfloat16:
        # The router is moe_ops.route; the fp32-weighted sum's cast back to bf16 is part of the block.
        assert_expected_inline(graph, """\
aten.reshape.default([-1, 64])
aten.permute.default([1, 0])
aten.mm.default()
moe_ops.route.default(2, 'softmax', False, True, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
moe_ops.fused_experts.default(None, None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)
aten.reshape.default([2, 5, 64])""")


def test_qwen3_moe_batched_mm():
    x = hidden_states(torch.float32)
    result, expected, graph = run(qwen3_moe_block(torch.float32), x)
    assert_same(result, expected, torch.float32)
    assert rewrites() == 1
    assert graph.count("moe_ops.fused_experts") == 1 and "aten.bmm" not in graph


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt_oss_batched_mm(dtype):
    x = hidden_states(dtype)
    result, expected, graph = run(gpt_oss_block(dtype), x)
    assert_same(result, expected, dtype)
    assert rewrites() == 1
    if dtype == torch.bfloat16:
        # Transposed weights ("EHF"), interleaved gate/up, three biases; the router scores stay an output.
        assert_expected_inline(graph, """\
aten.reshape.default([-1, 64])
aten.permute.default([1, 0])
aten.addmm.default()
moe_ops.route.default(2, 'softmax', True, False, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.bfloat16)
moe_ops.fused_experts.default(None, None, 'EHF', True, 'clamped_swiglu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)
aten.reshape.default([2, 5, 64])""")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt_fast_weight_gather(dtype):
    x = hidden_states(dtype)
    result, expected, graph = run(gpt_fast_block(dtype), x)
    assert_same(result, expected, dtype)
    assert rewrites() == 1
    if dtype == torch.bfloat16:
        # bf16 softmax: the router stays (its top-k reads rounded scores); w1/w3 are gate and up.
        assert_expected_inline(graph, """\
aten.reshape.default([-1, 64])
aten.permute.default([1, 0])
aten.mm.default()
prims.convert_element_type.default(torch.float32)
aten.amax.default([-1], True)
aten.sub.Tensor()
aten.exp.default()
aten.sum.dim_IntList([-1], True)
aten.div.Tensor()
prims.convert_element_type.default(torch.bfloat16)
aten.topk.default(2)
getitem(0)
getitem(1)
aten.sum.dim_IntList([-1], True)
aten.div.Tensor()
moe_ops.fused_experts.default(None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)""")


class OneSlotOutputs(MOEFeedForward):
    """gpt-fast's block with its slot outputs weighted but not summed over the K slots ((T, K*H) out)."""

    def forward(self, x):
        x = x.view(-1, self.dim)
        scores = self.gate(x)
        expert_weights, expert_indices = torch.topk(F.softmax(scores, dim=-1), self.num_activated_experts, dim=-1)
        expert_outs = self.cond_ffn(x, expert_indices)
        return (expert_outs * expert_weights[..., None]).reshape(x.shape[0], -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt_fast_one_expert_per_token(dtype):
    """K = 1: the einsum's decomposition drops the sum over the one slot, and the combine is the weighting alone."""
    x = hidden_states(dtype)
    result, expected, graph = run(init_(MOEFeedForward(num_activated_experts=1), dtype), x)
    assert_same(result, expected, dtype)
    assert rewrites() == 1 and "bmm" not in graph


@pytest.mark.parametrize("top_k", [1, K])
def test_weighted_slot_outputs_without_their_sum(top_k, caplog):
    """The same product with K > 1 and no sum is no experts block (its output keeps the slots): not rewritten; with
    K = 1 it is one."""
    x = hidden_states(torch.float32)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, expected, graph = run(init_(OneSlotOutputs(num_activated_experts=top_k), torch.float32), x)
    assert_same(result, expected, torch.float32)
    if top_k == 1:
        assert rewrites() == 1
    else:
        assert rewrites() == 0 and "aten.bmm" in graph
        assert "weights the slot outputs with no sum over the K slots" in caplog.text


# ---- Near misses: not rewritten, and still correct --------------------------------------------------


def batched_mm_moe(x, router_weight, gate_up_proj, down_proj, variant="plain"):
    """Mixtral's router and transformers' batched_mm_experts_forward, with ``variant`` changed."""
    num_experts, top_k = gate_up_proj.shape[0], K
    logits = F.linear(x, router_weight)
    weights = F.softmax(logits, dim=1, dtype=torch.float)
    weights, ids = torch.topk(weights, top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
    if variant in ("null_expert", "skip_class", "skip_class_kept"):
        # The router also scores a "no expert" E. Left as it is, the clamp makes it expert E-1; Zaya masks
        # it to expert 0 with weight 0 ("skip_class"), which the rewrite can prove stays in [0, E); a mask
        # of another id leaves E possible ("skip_class_kept").
        null_logit = logits.mean(dim=1, keepdim=True)
        weights, ids = torch.topk(F.softmax(torch.cat([logits, null_logit], 1), dim=1), top_k, dim=-1)
        if variant != "null_expert":
            skip = ids == (num_experts if variant == "skip_class" else num_experts - 1)
            weights, ids = weights.masked_fill(skip, 0), ids.masked_fill(skip, 0)
    if variant == "sparsemixer":  # PhiMoE: two experts from successive max() calls, their indices concatenated
        first = logits.max(dim=-1, keepdim=True)
        second = logits.scatter(1, first.indices, float("-inf")).max(dim=-1, keepdim=True)
        ids = torch.cat([first.indices, second.indices], dim=-1)
        weights = torch.cat([first.values, second.values], dim=-1).softmax(-1).to(x.dtype)

    xr = x.repeat_interleave(top_k, dim=0)
    slot_weights = weights.reshape(-1)
    expert_ids = ids.reshape(-1).clamp(0, num_experts - 1)
    gate_up = torch.bmm(gate_up_proj[expert_ids], xr.unsqueeze(-1)).squeeze(-1)
    gate, up = gate_up.chunk(2, dim=-1)
    if variant == "tanh":
        h = torch.tanh(gate) * up
    elif variant == "no_gate_multiply":
        h = F.silu(gate)
    else:
        h = F.silu(gate) * up
    y = torch.bmm(down_proj[expert_ids], h.unsqueeze(-1)).squeeze(-1)
    if variant == "weights_after_sum":
        return y.view(-1, top_k, x.shape[1]).sum(1) * weights.sum(-1, keepdim=True)
    out = (y * slot_weights.unsqueeze(-1)).view(-1, top_k, x.shape[1]).sum(1)
    if variant == "activations_returned":
        return out, h
    return out


def batched_mm_args(dtype=torch.float32):
    return (
        torch.randn(T, H, dtype=dtype), 0.1 * torch.randn(E, H, dtype=dtype),
        0.1 * torch.randn(E, 2 * F_, H, dtype=dtype), 0.1 * torch.randn(E, H, F_, dtype=dtype),
    )


@pytest.mark.parametrize("variant", ["skip_class", "sparsemixer"])
def test_ids_proved_in_range_through_masks_and_max_calls(variant):
    """Ids the op takes without a clamp: a skip class masked to expert 0 (Zaya), indices of successive
    max() calls concatenated (PhiMoE's sparsemixer)."""
    args = batched_mm_args()
    result, graph = compile_and_record(lambda *a: batched_mm_moe(*a, variant=variant), *args)
    assert_close_rel(result, batched_mm_moe(*args, variant=variant), torch.float32)
    assert rewrites() == 1 and "aten.bmm" not in graph


def test_skip_class_mask_that_leaves_the_class_is_not_rewritten():
    args = batched_mm_args()
    result, _ = compile_and_record(lambda *a: batched_mm_moe(*a, variant="skip_class_kept"), *args)
    assert_close_rel(result, batched_mm_moe(*args, variant="skip_class_kept"), torch.float32)
    assert rewrites() == 0


@pytest.mark.parametrize("family", ["zaya", "phimoe", "openai_privacy_filter"])
@pytest.mark.parametrize("batch", [1, 2])
def test_hf_blocks_rewritten_in_batched_mm(family, batch):
    """transformers' batched_mm experts of Zaya ((batch, sequence, K) ids, its skip class masked to expert
    0), PhiMoE (sparsemixer's max() calls) and OpenAI's privacy filter (clamped SwiGLU on concatenated
    halves, gate and up read through two identical squeezes of the GEMM output) are rewritten and
    compute eager's result."""
    pytest.importorskip("transformers")
    from hf_family_blocks import build_block

    _, block, config = build_block(family, experts_implementation="batched_mm")
    block = init_(block, torch.float32)
    x = torch.randn(batch, S, config.hidden_size)
    result, expected, graph = run(block, x)
    if isinstance(result, tuple):  # Zaya's block also returns its router state
        result, expected = result[0], expected[0]
    assert_close_rel(result, expected, torch.float32)
    assert rewrites() == 1 and "moe_ops.fused_experts" in graph


def test_restated_batched_mm_is_rewritten():
    """The restatement the near misses start from is itself rewritten."""
    args = batched_mm_args()
    result, graph = compile_and_record(batched_mm_moe, *args)
    assert_close_rel(result, batched_mm_moe(*args), torch.float32)
    assert rewrites() == 1 and "aten.bmm" not in graph


@pytest.mark.parametrize(
    "variant, reason",
    [
        ("weights_after_sum", "not multiplied by their routing weights"),
        ("tanh", "is no activation the op computes"),
        ("no_gate_multiply", "is no activation the op computes"),
        ("activations_returned", "also read outside the block"),
        ("null_expert", "a top-k over 9 scores, more than the 8 experts"),
    ],
)
def test_near_miss_not_rewritten(variant, reason, caplog):
    args = batched_mm_args()
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, graph = compile_and_record(lambda *a: batched_mm_moe(*a, variant=variant), *args)
    expected = batched_mm_moe(*args, variant=variant)
    assert_same(result, expected, torch.float32)
    assert rewrites() == 0 and "moe_ops.fused_experts" not in graph and "aten.bmm" in graph
    assert reason in caplog.text


def test_ids_from_outside_not_rewritten(caplog):
    """The experts module alone: its ids could hold sentinels (>= E), which the clamp sends to expert
    E-1 and the op skips; nothing in the graph bounds them, so the block is left alone."""
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralExperts

    experts = init_(MixtralExperts(hf_config(MixtralConfig)), torch.float32)
    x, ids = torch.randn(T, H), torch.randint(0, E, (T, K))
    weights = torch.rand(T, K)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"), torch.no_grad():
        result, graph = compile_and_record(experts, x, ids, weights)
        expected = experts(x, ids, weights)
    assert_close_rel(result, expected, torch.float32)
    assert rewrites() == 0 and "moe_ops.fused_experts" not in graph
    assert "are not a top-k's or a max's indices in this graph" in caplog.text


# ---- Dynamic token count -----------------------------------------------------------------------------


@pytest.mark.parametrize("make_block", [mixtral_block, gpt_fast_block], ids=["mixtral", "gpt_fast"])
@pytest.mark.parametrize("dynamic", [None, True], ids=["batch_marked", "dynamic=True"])
def test_one_graph_serves_every_token_count(make_block, dynamic):
    """The batch marked dynamic, or every size symbolic (torch.compile(dynamic=True), the gathered weights'
    shapes too): one rewritten graph for every token count."""
    block = make_block(torch.float32)
    compiled = torch.compile(block, backend="inductor", fullgraph=True, dynamic=dynamic)
    warm_up = hidden_states(torch.float32)
    if dynamic is None:
        torch._dynamo.mark_dynamic(warm_up, 0)
    with torch.no_grad():
        assert_same(compiled(warm_up), block(warm_up), torch.float32)
        with torch.compiler.set_stance("fail_on_recompile"):
            for batch in (3, 7):
                x = hidden_states(torch.float32, batch)
                assert_same(compiled(x), block(x), torch.float32)
    assert rewrites() == 1


@pytest.mark.parametrize("act", ["relu", "relu2"])  # relu2: NemotronH's default
def test_ungated_nemotron_h_batched_mm(act):
    """NemotronH's experts have no gate (up_proj -> act -> down_proj): batched_mm of them is rewritten
    with gated=False, and matches eager."""
    nemotron_h = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    torch.manual_seed(0)
    config = transformers.NemotronHConfig(
        hidden_size=H, moe_intermediate_size=F_, n_routed_experts=E, num_experts_per_tok=K,
        mlp_hidden_act=act, experts_implementation="batched_mm",
    )
    experts = nemotron_h.NemotronHExperts(config)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(0.0, 0.1)
    router = torch.nn.Linear(H, E, bias=False)

    def block(x):
        weights, ids = torch.topk(torch.softmax(router(x), dim=-1, dtype=torch.float32), K, dim=-1)
        return experts(x, ids, weights.to(x.dtype))

    x = torch.randn(7, H)
    result, expected, graph = run(block, x)
    assert_same(result, expected, torch.float32)
    assert rewrites() == 1
    (call,) = [line for line in graph.splitlines() if line.startswith("moe_ops.fused_experts")]
    # layout, interleaved, activation, gated, ...
    assert f"'EFH', False, '{act}', False," in call


# ---- Training ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("training_rewrites")
@pytest.mark.parametrize(
    "make_block, dtype",
    [(mixtral_block, torch.bfloat16), (gpt_oss_block, torch.float32), (gpt_fast_block, torch.float32)],
    ids=["mixtral_batched_mm", "gpt_oss_batched_mm", "gpt_fast"],
)
def test_training(make_block, dtype):
    """The joint graph is rewritten (lowering/graph/joint_rewrite.py): the backward is the ops' formulas, not
    the gathers' and bmms', and every gradient equals eager's."""
    block = make_block(dtype).train().requires_grad_(True)
    forward_graph, backward_graph = check_training(block, hidden_states(dtype), dtype=dtype)
    assert rewrites() == 1 and counters["moe_ops"]["joint_rewrite"] == 1
    assert FUSED_EXPERTS_TRAINING in forward_graph and "bmm" not in forward_graph
    assert calls_experts_backward(backward_graph) and "bmm" not in backward_graph


class WithLoadBalancingLoss(MOEFeedForward):
    """Returns a load-balancing loss over the softmax scores too, which so are read outside the block: the route op
    reads the logits where the replaced top-k read the scores."""

    def forward(self, x):
        x = x.view(-1, self.dim)
        scores = F.softmax(self.gate(x), dim=-1)
        weights, ids = torch.topk(scores, self.num_activated_experts, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        balance = (scores.mean(0) ** 2).sum() * scores.shape[-1]
        return torch.einsum("tai,ta -> ti", self.cond_ffn(x, ids), weights), balance


class BlocksAround(nn.Module):
    """The block with what real models put around it: a residual, two blocks on one input, one block twice."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.first, self.second = MOEFeedForward(), MOEFeedForward()

    def forward(self, x):
        x = x.view(-1, H)
        if self.form == "residual":
            return self.first(x) + x
        if self.form == "two blocks on one input":
            return self.first(x) + self.second(x)
        return self.first(self.first(x))  # one block twice


@pytest.mark.usefixtures("training_rewrites")
@pytest.mark.parametrize("form", ["load-balancing loss over the scores", "residual", "two blocks on one input",
                                  "one block twice"])
def test_training_with_the_block_in_a_model(form):
    """Values the block reads or makes that the model also reads: the replaced backward's parts of their gradients
    are told apart and replaced (an input read twice, by the block's two projections; the scores, whose part the
    route op now gives the logits), in fp32, where a part counted twice or lost would stand out."""
    block = WithLoadBalancingLoss() if form.startswith("load") else BlocksAround(form)
    check_training(init_(block, torch.float32).train(), hidden_states(torch.float32), dtype=torch.float32)
    assert counters["moe_ops"]["joint_rewrite"] == 1


@pytest.mark.usefixtures("training_rewrites")
def test_training_one_expert_per_token():
    """K = 1 in training: the experts' and the input's gradients equal eager's. The router's is zero up to rounding
    on both sides (its one weight renormalised is 1 whatever the logits), so it is held to a bound, not compared."""
    block = init_(MOEFeedForward(num_activated_experts=1), torch.float32).train()
    x = hidden_states(torch.float32)
    _, grads = training_step(block, torch.compile(block, fullgraph=True), x)
    _, expected = training_step(block, block, x)
    assert rewrites() == 1 and counters["moe_ops"]["joint_rewrite"] == 1
    for name, grad in expected.items():
        if name == "gate.weight":
            assert grads[name].abs().max() < 1e-5 and grad.abs().max() < 1e-5
        else:
            assert_close_rel(grads[name], grad, torch.float32, f"gradient of {name}")
