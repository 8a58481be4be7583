"""The experts rewrite, form 3: torchtitan's MoE compiled with Inductor on the CPU gives eager's results,
and its post-grad graph holds one ``moe_ops.fused_experts`` in place of dispatch, experts and combine.

torchtitan is not installed here: the modules below restate ``torchtitan/models/common/moe.py`` and
``token_dispatcher.py`` (pytorch/torchtitan b5bcd76) with the same op sequence, minus the DTensor,
SPMD and expert-parallel branches. The one change: torchtitan computes the router gate under
``torch.autocast(dtype=torch.float32)``, which CPU autocast does not support, so the restatement casts
x and the gate weight to fp32 itself (what that autocast does on CUDA).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from compile_harness import (  # noqa: F401  (fixture)
    FUSED_EXPERTS_TRAINING,
    calls_experts_backward,
    check_training,
    compile_and_record,
    fresh_compile_state,
    training_rewrites,
)
from conftest import assert_close_rel
from expecttest import assert_expected_inline
from torch import nn
from torch._dynamo.utils import counters

import moe_ops  # noqa: F401  (installs the pass)

T, D, F_HIDDEN, E, K = 6, 64, 32, 8, 2
pytestmark = pytest.mark.usefixtures("fresh_compile_state")


# ---- torchtitan's custom op around scatter_add (torchtitan/ops/scatter_add.py) ----------------------

if not hasattr(torch.ops.torchtitan, "deterministic_scatter_add"):

    @torch.library.custom_op("torchtitan::deterministic_scatter_add", mutates_args=())
    def deterministic_scatter_add(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        prev = torch.are_deterministic_algorithms_enabled()
        prev_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=False)
        try:
            return out.scatter_add(dim=0, index=index, src=src)
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn_only)

    @deterministic_scatter_add.register_fake
    def _(out, index, src):
        return torch.empty_like(out)


# ---- torchtitan's MoE, restated ---------------------------------------------------------------------


class TokenChoiceTopKRouter(nn.Module):
    def __init__(self, score_func="sigmoid", route_norm=False, route_scale=1.0, num_expert_groups=None,
                 num_limited_groups=None):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.score_func, self.route_norm, self.route_scale = score_func, route_norm, route_scale
        self.num_expert_groups, self.num_limited_groups = num_expert_groups, num_limited_groups

    def node_limited(self, scores_for_choice_TE):
        # Only the experts of each token's num_limited_groups best groups (a group's score: its two best).
        scores_TGX = scores_for_choice_TE.view(-1, self.num_expert_groups, E // self.num_expert_groups)
        top2_TG2, _ = scores_TGX.topk(2, dim=-1)
        group_scores_TG = top2_TG2.sum(dim=-1)
        _, group_idx = torch.topk(group_scores_TG, k=self.num_limited_groups, dim=-1, sorted=False)
        group_mask_TG = torch.ones_like(group_scores_TG, dtype=torch.bool)
        group_mask_TG.scatter_(1, group_idx, False)  # False: selected groups
        return scores_TGX.masked_fill(group_mask_TG.unsqueeze(-1), float("-inf")).view(-1, E)

    def forward(self, x_TD, expert_bias_E=None):
        scores_TE = F.linear(x_TD.float(), self.gate.weight.float())  # autocast(float32) on CUDA
        if self.score_func == "sigmoid":
            scores_TE = torch.sigmoid(scores_TE)
        else:
            scores_TE = F.softmax(scores_TE, dim=-1)
        scores_for_choice_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E
        if self.num_expert_groups is not None:
            scores_for_choice_TE = self.node_limited(scores_for_choice_TE)
        _, topk_expert_ids_TK = torch.topk(scores_for_choice_TE, k=K, dim=-1, sorted=False)
        topk_scores_TK = scores_TE.gather(dim=-1, index=topk_expert_ids_TK)
        if self.route_norm:
            denominator = topk_scores_TK.sum(dim=-1, keepdim=True) + 1e-20
            topk_scores_TK = topk_scores_TK / denominator
        topk_scores_TK = topk_scores_TK * self.route_scale
        return topk_scores_TK, topk_expert_ids_TK, scores_TE


class LocalTokenDispatcher:
    top_k = K

    def dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK):
        token_indices_experts_sorted_N = torch.argsort(topk_expert_ids_TK.view(-1), stable=True)
        topk_scores_experts_sorted_N = topk_scores_TK.view(-1)[token_indices_experts_sorted_N]
        token_indices_experts_sorted_N = token_indices_experts_sorted_N // self.top_k
        routed_input_ND = x_TD[token_indices_experts_sorted_N]
        return routed_input_ND, (token_indices_experts_sorted_N, topk_scores_experts_sorted_N)

    def weight(self, routed_output_RD, topk_scores_experts_sorted_N):
        return (
            routed_output_RD.to(torch.float32) * topk_scores_experts_sorted_N.reshape(-1, 1)
        ).to(routed_output_RD.dtype)

    def scatter(self, out_TD, index, routed_output_RD):
        return out_TD.scatter_add(0, index, routed_output_RD)

    def combine(self, routed_output_RD, metadata, x_TD):
        token_indices_experts_sorted_N, topk_scores_experts_sorted_N = metadata
        out_TD = torch.zeros_like(x_TD)
        routed_output_RD = self.weight(routed_output_RD, topk_scores_experts_sorted_N)
        dim = x_TD.shape[-1]
        return self.scatter(out_TD, token_indices_experts_sorted_N.reshape(-1, 1).expand(-1, dim), routed_output_RD)


class CustomOpDispatcher(LocalTokenDispatcher):  # what torchtitan calls: its custom op
    def scatter(self, out_TD, index, routed_output_RD):
        return torch.ops.torchtitan.deterministic_scatter_add(out_TD, index, routed_output_RD)


class GroupedExperts(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w1_EFD = nn.Parameter(torch.randn(E, F_HIDDEN, D, dtype=dtype) / D**0.5)
        self.w2_EDF = nn.Parameter(torch.randn(E, D, F_HIDDEN, dtype=dtype) / F_HIDDEN**0.5)
        self.w3_EFD = nn.Parameter(torch.randn(E, F_HIDDEN, D, dtype=dtype) / D**0.5)

    def activation(self, gate, up):
        return F.silu(gate) * up

    def forward(self, x_RD, num_tokens_per_expert_E):
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        gate = torch._grouped_mm(x_RD.bfloat16(), self.w1_EFD.bfloat16().transpose(-2, -1), offs=offsets_E)
        up = torch._grouped_mm(x_RD.bfloat16(), self.w3_EFD.bfloat16().transpose(-2, -1), offs=offsets_E)
        h_RF = self.activation(gate, up)
        return torch._grouped_mm(h_RF, self.w2_EDF.bfloat16().transpose(-2, -1), offs=offsets_E).type_as(x_RD)


class FeedForward(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w1 = nn.Linear(D, F_HIDDEN, bias=False, dtype=dtype)
        self.w2 = nn.Linear(F_HIDDEN, D, bias=False, dtype=dtype)
        self.w3 = nn.Linear(D, F_HIDDEN, bias=False, dtype=dtype)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    def __init__(self, dtype=torch.bfloat16, score_func="sigmoid", route_norm=False, route_scale=1.0,
                 expert_bias=False, shared_experts=False, dispatcher=LocalTokenDispatcher, groups=(None, None)):
        super().__init__()
        self.router = TokenChoiceTopKRouter(score_func, route_norm, route_scale, *groups)
        self.experts = GroupedExperts(dtype)
        self.token_dispatcher = dispatcher()
        self.shared_experts = FeedForward(dtype) if shared_experts else None
        self.register_buffer("expert_bias_E", torch.randn(E) * 0.1 if expert_bias else None)

    def count(self, scores_TE, topk_expert_ids_TK):
        routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(-1, topk_expert_ids_TK, True)
        return routing_map_TE.sum(dim=0)

    def forward(self, x_TD):
        topk_scores_TK, topk_expert_ids_TK, scores_TE = self.router(x_TD, self.expert_bias_E)
        num_tokens_per_expert_E = self.count(scores_TE, topk_expert_ids_TK)
        routed_input_RD, metadata = self.token_dispatcher.dispatch(x_TD, topk_scores_TK, topk_expert_ids_TK)
        routed_output_RD = self.experts(routed_input_RD, num_tokens_per_expert_E)
        out_TD = self.token_dispatcher.combine(routed_output_RD, metadata, x_TD)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        return out_TD


class ScaleBiasForward(torch.autograd.Function):
    """torchtitan's bias scaling for tensor parallelism (gpt_oss/moe.py): divided by the degree where it exceeds 1,
    the gradient passed on as it is."""

    @staticmethod
    def forward(ctx, bias, tp_degree, dtype):
        ctx.tp_degree = tp_degree
        if tp_degree > 1:
            bias = bias / tp_degree
        return bias.to(dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None


def swiglu(x, alpha: float = 1.702, limit: float = 7.0):
    x_glu, x_linear = x[..., ::2], x[..., 1::2]
    x_glu = x_glu.clamp(min=None, max=limit)
    x_linear = x_linear.clamp(min=-limit, max=limit)
    out_glu = x_glu * torch.sigmoid(alpha * x_glu)
    return torch.addcmul(out_glu, out_glu, x_linear)


class GptOssGroupedExperts(nn.Module):
    """torchtitan's GPT-OSS experts (gpt_oss/moe.py, b5bcd76): gate and up interleaved in one weight, each row's
    expert bias added by a repeat_interleave of the biases over the token counts (a zero row for the tail slack)."""

    def __init__(self, dtype=torch.bfloat16, swiglu_limit=7.0, tp_degree=1):
        super().__init__()
        self.swiglu_limit, self.tp_degree = swiglu_limit, tp_degree
        self.mlp1_weight_EGD = nn.Parameter(torch.randn(E, 2 * F_HIDDEN, D, dtype=dtype) / D**0.5)
        self.mlp1_bias_EG = nn.Parameter(torch.randn(E, 2 * F_HIDDEN, dtype=dtype) * 0.5)
        self.mlp2_weight_EDF = nn.Parameter(torch.randn(E, D, F_HIDDEN, dtype=dtype) / F_HIDDEN**0.5)
        self.mlp2_bias_ED = nn.Parameter(torch.randn(E, D, dtype=dtype) * 0.5)

    def forward(self, x_RD, num_tokens_per_expert_E):
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        tail_slack = (x_RD.shape[0] - offsets_E[-1]).unsqueeze(0).to(num_tokens_per_expert_E.dtype)
        num_tokens_per_expert_long = torch.cat([num_tokens_per_expert_E, tail_slack]).long()
        h_RG = torch._grouped_mm(x_RD.bfloat16(), self.mlp1_weight_EGD.transpose(-2, -1).bfloat16(), offs=offsets_E)
        b1 = torch.cat([self.mlp1_bias_EG, self.mlp1_bias_EG.new_zeros(1, self.mlp1_bias_EG.shape[-1])])
        b1_RG = b1.repeat_interleave(num_tokens_per_expert_long, dim=0, output_size=x_RD.shape[0])
        h_RG = h_RG + b1_RG.to(h_RG.dtype)
        h_RF = swiglu(h_RG, limit=self.swiglu_limit)
        h_RD = torch._grouped_mm(h_RF, self.mlp2_weight_EDF.transpose(-2, -1).bfloat16(), offs=offsets_E)
        b2 = torch.cat([self.mlp2_bias_ED, self.mlp2_bias_ED.new_zeros(1, self.mlp2_bias_ED.shape[-1])])
        b2_RD = b2.repeat_interleave(num_tokens_per_expert_long, dim=0, output_size=x_RD.shape[0])
        b2_RD = ScaleBiasForward.apply(b2_RD, self.tp_degree, h_RD.dtype)
        return h_RD + b2_RD


def gpt_oss(**options):
    model = MoE(score_func="softmax", route_norm=True)
    model.experts = GptOssGroupedExperts(**options)
    return model


# ---- Harness ----------------------------------------------------------------------------------------


def rewrites() -> int:
    return counters["moe_ops"]["experts_rewrite"]


def check_against_eager(model, x, dtype=torch.bfloat16):
    with torch.no_grad():
        result, graph = compile_and_record(model, x)
        assert_close_rel(result, model(x), dtype, "compiled vs eager")
    return graph


def inputs(num_tokens=T, dtype=torch.bfloat16):
    return torch.randn(num_tokens, D, dtype=dtype)


# ---- The rewrite fires, and compiled == eager -------------------------------------------------------


def test_softmax_router():
    model = MoE(score_func="softmax").eval()
    graph = check_against_eager(model, inputs())
    assert rewrites() == 1 and counters["moe_ops"]["experts_rewrite_torchtitan"] == 1
    assert_expected_inline(graph, """\
prims.convert_element_type.default(torch.float32)
aten.permute.default([1, 0])
aten.mm.default()
aten.amax.default([-1], True)
aten.sub.Tensor()
aten.exp.default()
aten.sum.dim_IntList([-1], True)
aten.div.Tensor()
moe_ops.route.default(2, 'softmax', False, False, 0.0, None, 1, 1, 1.0)
getitem(1)
prims.convert_element_type.default(torch.int64)
aten.gather.default(-1)
aten.mul.Tensor(1.0)
moe_ops.fused_experts.default(None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)""")


def test_sigmoid_bias_router_and_shared_expert():
    model = MoE(score_func="sigmoid", route_norm=True, route_scale=2.5, expert_bias=True, shared_experts=True)
    graph = check_against_eager(model.eval(), inputs())
    assert rewrites() == 1
    assert counters["moe_ops"]["route_rewrite"] == 1  # the selection bias (torchtitan's expert_bias) included
    assert_expected_inline(graph, """\
prims.convert_element_type.default(torch.float32)
aten.permute.default([1, 0])
aten.mm.default()
moe_ops.route.default(2, 'sigmoid', False, True, 1e-20, 1, 1, 2.5)
getitem(0)
getitem(1)
moe_ops.fused_experts.default(None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)
aten.permute.default([1, 0])
aten.mm.default()
prims.convert_element_type.default(torch.float32)
aten.neg.default()
aten.exp.default()
aten.add.Tensor(1)
aten.div.Tensor()
prims.convert_element_type.default(torch.bfloat16)
aten.permute.default([1, 0])
aten.mm.default()
aten.mul.Tensor()
aten.permute.default([1, 0])
aten.addmm.default()""")


@pytest.mark.parametrize("tie", [False, True], ids=["random", "tied_groups"])
def test_node_limited_router(tie):
    """torchtitan's node-limited routing (DeepSeek-V3's groups: the choices viewed per group, the groups not
    kept filled with -inf) is moe_ops.route's n_group / topk_group. Tied: experts 2 and 3 score as 0 and 1 for
    every token, so groups 0 and 1 tie; the op keeps the group torch.topk keeps."""
    model = MoE(score_func="sigmoid", route_norm=True, route_scale=2.5, expert_bias=not tie, groups=(4, 2)).eval()
    if tie:
        with torch.no_grad():
            model.router.gate.weight[2:4] = model.router.gate.weight[0:2]
    graph = check_against_eager(model, inputs())
    assert counters["moe_ops"]["route_rewrite"] == 1 and rewrites() == 1
    bias = "None, " if tie else ""  # no selection bias; expert_bias is an input node (the summary omits nodes)
    assert f"moe_ops.route.default(2, 'sigmoid', False, True, 1e-20, {bias}4, 2, 2.5)" in graph
    assert "aten.topk" not in graph


class HistcCounts(MoE):  # torchtitan before the routing map: a histogram of the flattened ids
    def count(self, scores_TE, topk_expert_ids_TK):
        return torch.histc(topk_expert_ids_TK.view(-1).float(), bins=E, min=0, max=E)


def test_histc_counts():
    graph = check_against_eager(HistcCounts(score_func="softmax").eval(), inputs())
    assert rewrites() == 1
    assert "moe_ops.fused_experts" in graph and "aten.histc" not in graph and "aten._grouped_mm" not in graph


class CountsIntoBuffer(HistcCounts):
    """torchtitan's MoE.forward with load balancing: the token counts the experts run on are also added into a
    buffer (the expert-bias update reads it between steps)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.register_buffer("tokens_per_expert_E", torch.zeros(E))

    def forward(self, x_TD):
        topk_scores_TK, topk_expert_ids_TK, scores_TE = self.router(x_TD, self.expert_bias_E)
        num_tokens_per_expert_E = self.count(scores_TE, topk_expert_ids_TK)
        with torch.no_grad():
            self.tokens_per_expert_E.add_(num_tokens_per_expert_E)
        routed_input_RD, metadata = self.token_dispatcher.dispatch(x_TD, topk_scores_TK, topk_expert_ids_TK)
        routed_output_RD = self.experts(routed_input_RD, num_tokens_per_expert_E)
        return self.token_dispatcher.combine(routed_output_RD, metadata, x_TD)


def test_counts_also_added_into_a_buffer():
    """The counts stay in the graph for the buffer's add (routing metadata: no value of x or the weights is
    computed twice); the block is the op, and the buffer holds eager's counts."""
    model = CountsIntoBuffer(score_func="sigmoid", expert_bias=True).eval()
    x = inputs()
    with torch.no_grad():
        expected = model(x)
        expected_counts = model.tokens_per_expert_E.clone()
        model.tokens_per_expert_E.zero_()
        result, graph = compile_and_record(model, x)
    assert rewrites() == 1 and "aten._grouped_mm" not in graph and "aten.histc" in graph
    assert_close_rel(result, expected, torch.bfloat16, "compiled vs eager")
    torch.testing.assert_close(model.tokens_per_expert_E, expected_counts, rtol=0, atol=0)


def test_gpt_oss_experts():
    """torchtitan's GPT-OSS experts: the biases added through repeat_interleave are the op's per-expert biases,
    torchtitan's swiglu (an addcmul) its clamped_swiglu on interleaved gate and up, with the limit read."""
    graph = check_against_eager(gpt_oss(swiglu_limit=1.5).eval(), inputs())
    assert rewrites() == 1 and counters["moe_ops"]["experts_rewrite_torchtitan"] == 1
    # No w_up and no b_up: the gate and up weights and biases are one tensor each (nodes, not shown).
    assert "moe_ops.fused_experts.default(None, None, 'EFH', True, 'clamped_swiglu', True, 1.702, 1.5, 0.0" in graph
    assert "aten._grouped_mm" not in graph and "aten.searchsorted" not in graph


def test_torchtitan_scatter_add_custom_op():
    model = MoE(score_func="sigmoid", expert_bias=True, dispatcher=CustomOpDispatcher).eval()
    graph = check_against_eager(model, inputs())
    assert rewrites() == 1
    assert "moe_ops.fused_experts" in graph and "torchtitan.deterministic_scatter_add" not in graph


# ---- Near misses: not rewritten, and still correct -------------------------------------------------


class ScoresNotApplied(LocalTokenDispatcher):
    def weight(self, routed_output_RD, topk_scores_experts_sorted_N):
        return routed_output_RD


class CountsOfOtherIds(MoE):  # offsets from the counts of other (equally valid) ids
    def count(self, scores_TE, topk_expert_ids_TK):
        _, other_ids_TK = torch.topk(scores_TE, k=K, dim=-1, largest=False)
        return super().count(scores_TE, other_ids_TK)


class GeluPlusUp(GroupedExperts):  # gelu on w1, but added to w3's output: no gated activation
    def activation(self, gate, up):
        return F.gelu(gate) + up


class ExpertOutputsAlsoReturned(MoE):  # an intermediate with a user outside the block
    def forward(self, x_TD):
        topk_scores_TK, topk_expert_ids_TK, scores_TE = self.router(x_TD, self.expert_bias_E)
        num_tokens_per_expert_E = self.count(scores_TE, topk_expert_ids_TK)
        routed_input_RD, metadata = self.token_dispatcher.dispatch(x_TD, topk_scores_TK, topk_expert_ids_TK)
        routed_output_RD = self.experts(routed_input_RD, num_tokens_per_expert_E)
        return self.token_dispatcher.combine(routed_output_RD, metadata, x_TD), routed_output_RD


def gelu_plus_up():
    model = MoE()
    model.experts = GeluPlusUp(torch.bfloat16)
    return model


def bias_scaled_for_tensor_parallelism():
    model = gpt_oss()
    model.experts.tp_degree = 2  # the down bias halved: not the op's bias
    return model


NEAR_MISSES = {
    "bias scaled (tensor parallel)": (bias_scaled_for_tensor_parallelism, "adds something other than each row's "),
    "scores not applied": (lambda: MoE(dispatcher=ScoresNotApplied), "not multiplied by their routing weights"),
    "counts of other ids": (lambda: CountsOfOtherIds(score_func="softmax"), "counts are of other ids"),
    "gelu(w1 x) + w3 x": (gelu_plus_up, "is no activation the op computes"),
    "expert outputs also returned": (ExpertOutputsAlsoReturned, "also read outside the block"),
    "fp32 model (bf16 casts)": (lambda: MoE(dtype=torch.float32), "cast to torch.bfloat16 for the grouped_mm"),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_not_rewritten(case, caplog):
    make, reason = NEAR_MISSES[case]
    model = make().eval()
    dtype = next(model.experts.parameters()).dtype
    x = inputs(dtype=dtype)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"), torch.no_grad():
        result, graph = compile_and_record(model, x)
        expected = model(x)
    for got, want in zip(*((r,) if isinstance(r, torch.Tensor) else r for r in (result, expected)), strict=True):
        assert_close_rel(got, want, torch.bfloat16, case)  # the fp32 model computes its GEMMs in bf16
    assert rewrites() == 0
    num_gemms = 2 if isinstance(model.experts, GptOssGroupedExperts) else 3
    assert "moe_ops.fused_experts" not in graph and graph.count("aten._grouped_mm") == num_gemms
    assert reason in caplog.text


def plain_block(x_TD, topk_scores_TK, topk_expert_ids_TK, w1, w2, w3):
    """The dispatch, experts and combine of torchtitan's MoE on ids given from outside."""
    routing_map_TE = torch.zeros(x_TD.shape[0], E, dtype=torch.bool).scatter_(-1, topk_expert_ids_TK, True)
    offsets_E = torch.cumsum(routing_map_TE.sum(dim=0), dim=0, dtype=torch.int32)
    order_N = torch.argsort(topk_expert_ids_TK.view(-1), stable=True)
    scores_N = topk_scores_TK.view(-1)[order_N]
    token_N = order_N // K
    x_ND = x_TD[token_N]
    h = F.silu(torch._grouped_mm(x_ND, w1.transpose(-2, -1), offs=offsets_E))
    h = h * torch._grouped_mm(x_ND, w3.transpose(-2, -1), offs=offsets_E)
    y_ND = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets_E)
    y_ND = (y_ND.float() * scores_N.reshape(-1, 1)).to(y_ND.dtype)
    return torch.zeros_like(x_TD).scatter_add(0, token_N.reshape(-1, 1).expand(-1, D), y_ND)


def test_ids_not_from_topk(caplog):
    """Ids from outside the graph could repeat an expert in a row (the routing map counts it once, the
    groups then miss a sorted slot, whose grouped_mm row is left unwritten) or lie outside [0, E): the
    pass cannot tell, so even these valid ids are not rewritten."""
    experts = GroupedExperts(torch.bfloat16)
    ids = torch.rand(T, E).argsort(dim=-1)[:, :K].contiguous()  # K distinct experts a token
    args = (inputs(), torch.rand(T, K), ids, experts.w1_EFD.detach(), experts.w2_EDF.detach(), experts.w3_EFD.detach())
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, graph = compile_and_record(plain_block, *args)
    assert_close_rel(result, plain_block(*args), torch.bfloat16)
    assert rewrites() == 0 and "moe_ops.fused_experts" not in graph
    assert "are not a top-k over the 8 experts" in caplog.text


# ---- Dynamic token count ----------------------------------------------------------------------------


def gpt_oss_with_histc_counts():
    model = HistcCounts(score_func="softmax", route_norm=True)  # float counts: the tail slack is cast to float
    model.experts = GptOssGroupedExperts()
    return model


def test_gpt_oss_experts_with_histc_counts():
    graph = check_against_eager(gpt_oss_with_histc_counts().eval(), inputs())
    assert rewrites() == 1 and "aten._grouped_mm" not in graph and "aten.histc" not in graph


@pytest.mark.parametrize("make", [
    lambda: MoE(score_func="sigmoid", route_norm=True, expert_bias=True, shared_experts=True), gpt_oss],
    ids=["moe", "gpt_oss"])
def test_one_graph_serves_every_token_count(make):
    """A symbolic T: GPT-OSS's repeat_interleave of the biases stays one op (its output_size a SymInt)."""
    model = make().eval()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    warm_up = inputs()
    torch._dynamo.mark_dynamic(warm_up, 0)
    with torch.no_grad():
        assert_close_rel(compiled(warm_up), model(warm_up), torch.bfloat16)
        with torch.compiler.set_stance("fail_on_recompile"):
            for num_tokens in (3, 17):
                x = inputs(num_tokens)
                assert_close_rel(compiled(x), model(x), torch.bfloat16, f"T={num_tokens}")
    assert rewrites() == 1


# ---- Training ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("training_rewrites")
def test_training_with_a_node_limited_router():
    model = MoE(score_func="sigmoid", route_norm=True, expert_bias=True, groups=(4, 2))
    forward_graph, backward_graph = check_training(model, inputs(), dtype=torch.bfloat16)
    assert counters["moe_ops"]["route_rewrite"] == 1 and counters["moe_ops"]["joint_rewrite"] == 1
    assert "aten.topk" not in forward_graph and calls_experts_backward(backward_graph)


@pytest.mark.usefixtures("training_rewrites")
def test_training_with_counts_added_into_a_buffer():
    model = CountsIntoBuffer(score_func="softmax", route_norm=True)
    forward_graph, backward_graph = check_training(model, inputs(), dtype=torch.bfloat16)
    assert counters["moe_ops"]["joint_rewrite"] == 1 and "_grouped_mm" not in forward_graph
    assert calls_experts_backward(backward_graph) and "_grouped_mm" not in backward_graph
    # Counted once by the compiled step and once by check_training's eager step: each slot twice.
    assert model.tokens_per_expert_E.sum().item() == 2 * T * K


@pytest.mark.usefixtures("training_rewrites")
@pytest.mark.parametrize(
    "options",
    [dict(score_func="softmax", route_norm=True),
     dict(expert_bias=True, shared_experts=True, route_scale=2.0)],
    ids=["softmax_router", "sigmoid_bias_shared_expert"],
)
def test_training(options):
    """The joint graph is rewritten: the backward is the ops' formulas (torchtitan trains with this
    code), every gradient equals eager's, the shared expert keeps its own backward."""
    model = MoE(**options)
    forward_graph, backward_graph = check_training(model, inputs(), dtype=torch.bfloat16)
    assert rewrites() == 1 and counters["moe_ops"]["joint_rewrite"] == 1
    assert FUSED_EXPERTS_TRAINING in forward_graph and "_grouped_mm" not in forward_graph
    assert calls_experts_backward(backward_graph) and "_grouped_mm" not in backward_graph


@pytest.mark.usefixtures("training_rewrites")
def test_training_gpt_oss_experts():
    """The custom autograd.Function around the down bias (its forward a cast to the bias's own dtype, its backward
    the gradient as it is) keeps the training rewrite; every gradient, the biases' included, equals eager's."""
    forward_graph, backward_graph = check_training(gpt_oss(), inputs(), dtype=torch.bfloat16)
    assert rewrites() == 1 and counters["moe_ops"]["joint_rewrite"] == 1
    assert FUSED_EXPERTS_TRAINING in forward_graph and "_grouped_mm" not in forward_graph
    assert calls_experts_backward(backward_graph) and "_grouped_mm" not in backward_graph
