"""The routing-prologue rewrite: router code as models write it, compiled with Inductor on the CPU,
gives eager's results, and its post-grad graph holds one ``moe_ops.route`` in place of the prologue.

Each router below restates one model family's router (patterns.md, "Routing") as a function of the
router logits (GPT-OSS: of the hidden states, to include its biased linear; DeepSeek-V3: of the
logits and the selection bias).
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from compile_harness import check_training, compile_and_record, fresh_compile_state, graph_summary, training_rewrites  # noqa: F401
from expecttest import assert_expected_inline
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import moe_ops
from moe_ops.lowering.graph.fx_match import MATCHER_FAILED
from moe_ops.lowering.graph.route_rewrite import rewrite_routing_prologues
from moe_ops.lowering.passes import PASSES

T, H, E, K = 6, 16, 8, 2
pytestmark = pytest.mark.usefixtures("fresh_compile_state")


# ---- Routers as the models write them --------------------------------------------------------------


def mixtral_router(router_logits):  # R1: softmax in fp32, topk, renormalise in place
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, K, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights, selected_experts


def qwen2_moe_router(router_logits):  # R1': no renormalisation (norm_topk_prob=False)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    return torch.topk(routing_weights, K, dim=-1)


def qwen3_moe_router(router_logits):  # R1 with the cast back to the logits' dtype
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, K, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights.to(router_logits.dtype), selected_experts


def gpt_oss_router(hidden_states, weight, bias):  # R2: topk on biased logits, softmax over the K values
    router_logits = F.linear(hidden_states, weight, bias)
    router_top_value, router_indices = torch.topk(router_logits, K, dim=-1)
    router_top_value = F.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
    return router_top_value, router_indices


def scaled_sigmoid_router(router_logits):  # R1 with sigmoid scores, eps in the renorm and a scale
    scores = router_logits.float().sigmoid()
    weights, ids = torch.topk(scores, K, dim=-1, sorted=False)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * 2.5, ids


# ---- Harness ---------------------------------------------------------------------------------------


def assert_same_routing(actual, expected):
    (w, ids), (w_ref, ids_ref) = actual, expected
    assert w.dtype == w_ref.dtype and ids.dtype == ids_ref.dtype == torch.int64
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    torch.testing.assert_close(w, w_ref)


def by_expert(weights, ids):
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


def rewrites() -> int:
    return counters["moe_ops"]["route_rewrite"]


def logits(dtype):
    return torch.randn(T, E, dtype=dtype)


# ---- The rewrite fires, and compiled == eager ------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixtral(dtype):
    x = logits(dtype)
    result, graph = compile_and_record(mixtral_router, x)
    assert_same_routing(result, mixtral_router(x))
    assert rewrites() == 1
    if dtype == torch.bfloat16:
        assert_expected_inline(graph, """\
moe_ops.route.default(2, 'softmax', False, True, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.int64)""")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qwen2_moe_no_renorm(dtype):
    x = logits(dtype)
    result, graph = compile_and_record(qwen2_moe_router, x)
    assert_same_routing(result, qwen2_moe_router(x))
    assert rewrites() == 1
    if dtype == torch.float32:
        assert_expected_inline(graph, """\
moe_ops.route.default(2, 'softmax', False, False, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.int64)""")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qwen3_moe_cast_back(dtype):
    x = logits(dtype)
    result, graph = compile_and_record(qwen3_moe_router, x)
    assert_same_routing(result, qwen3_moe_router(x))
    assert rewrites() == 1
    if dtype == torch.bfloat16:
        assert_expected_inline(graph, """\
moe_ops.route.default(2, 'softmax', False, True, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.int64)
prims.convert_element_type.default(torch.bfloat16)""")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt_oss_topk_then_softmax(dtype):
    args = (torch.randn(T, H, dtype=dtype), torch.randn(E, H, dtype=dtype), torch.randn(E, dtype=dtype))
    result, graph = compile_and_record(gpt_oss_router, *args)
    assert_same_routing(result, gpt_oss_router(*args))
    assert rewrites() == 1
    if dtype == torch.bfloat16:
        assert_expected_inline(graph, """\
aten.permute.default([1, 0])
aten.addmm.default()
moe_ops.route.default(2, 'softmax', True, False, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.int64)
prims.convert_element_type.default(torch.bfloat16)""")


def test_sigmoid_eps_scale_unsorted():
    x = logits(torch.bfloat16)
    result, graph = compile_and_record(scaled_sigmoid_router, x)
    # sorted=False: any order of the K choices is right, so compare them in one order.
    assert_same_routing(by_expert(*result), by_expert(*scaled_sigmoid_router(x)))
    assert rewrites() == 1
    assert_expected_inline(graph, """\
moe_ops.route.default(2, 'sigmoid', False, True, 1e-20, None, 1, 1, 2.5)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.int64)""")


def biased_router(scoring):
    """MiniMax-M2 (sigmoid) and AFMoE/Laguna-style (softmax) routers: a per-expert bias added to the
    scores for the choice only, the weights the unbiased scores at the chosen ids, renormalised."""
    bias = torch.randn(E) * 0.1

    def router(router_logits):
        scores = router_logits.float().sigmoid() if scoring == "sigmoid" else router_logits.float().softmax(-1)
        _, ids = torch.topk(scores + bias, K, dim=-1, sorted=False)
        weights = scores.gather(1, ids)
        weights /= weights.sum(dim=-1, keepdim=True)
        return weights, ids

    return router


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selection_bias_without_groups(dtype, scoring):
    router = biased_router(scoring)
    x = logits(dtype)
    result, graph = compile_and_record(router, x)
    assert_same_routing(by_expert(*result), by_expert(*router(x)))
    assert rewrites() == 1
    # (the summary leaves out tensor arguments: the bias)
    assert f"moe_ops.route.default(2, '{scoring}', False, True, 0.0, 1, 1, 1.0)" in graph, graph


def ernie_router(router_logits):
    """ERNIE-4.5: a selection bias and w / clamp(w.sum(-1), min=moe_norm_min)."""
    routing_weights = F.softmax(router_logits.float(), dim=1, dtype=torch.float)
    _, ids = torch.topk(routing_weights + ERNIE_BIAS, K, dim=-1)
    routing_weights = torch.gather(routing_weights, dim=-1, index=ids)
    return routing_weights / torch.clamp(routing_weights.sum(dim=-1, keepdim=True), min=0.5), ids


ERNIE_BIAS = torch.randn(E) * 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamped_renormalisation(dtype):
    x = logits(dtype)
    result, graph = compile_and_record(ernie_router, x)
    assert_same_routing(by_expert(*result), by_expert(*ernie_router(x)))
    assert rewrites() == 1
    assert "moe_ops.route.default(2, 'softmax', False, True, 0.0, 1, 1, 1.0, 0.5)" in graph, graph


def test_clamp_with_a_maximum_is_left_alone():
    def router(router_logits):
        weights, ids = torch.topk(router_logits.float().softmax(-1), K, dim=-1)
        return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=0.5, max=0.9), ids

    x = logits(torch.float32)
    result, graph = compile_and_record(router, x)
    assert_same_routing(result, router(x))
    assert "moe_ops.route.default(2, 'softmax', False, False, 0.0, None, 1, 1, 1.0)" in graph  # renormalisation kept


def test_selection_bias_whose_choices_are_used_is_left_alone():
    bias = torch.randn(E) * 0.1

    def router(router_logits):
        scores = router_logits.float().sigmoid()
        choices, ids = torch.topk(scores + bias, K, dim=-1)
        return scores.gather(1, ids) * choices, ids  # the biased values feed the weights

    x = logits(torch.float32)
    result, graph = compile_and_record(router, x)
    assert_same_routing(result, router(x))
    assert rewrites() == 0 and "moe_ops.route" not in graph


# ---- Near misses: not rewritten (or only partly), and still correct --------------------------------


def softmax_over_tokens(router_logits):
    return torch.topk(F.softmax(router_logits, dim=0, dtype=torch.float), K, dim=-1)


def smallest_k(router_logits):
    return torch.topk(F.softmax(router_logits, dim=1, dtype=torch.float), K, dim=-1, largest=False)


def bf16_softmax(router_logits):  # topk on bf16-rounded scores: ties and order differ from fp32
    return torch.topk(F.softmax(router_logits, dim=1), K, dim=-1)


def topk_values_also_returned(hidden_states, weight, bias):  # R2 whose raw top-k logits are used too
    router_top_value, router_indices = torch.topk(F.linear(hidden_states, weight, bias), K, dim=-1)
    return F.softmax(router_top_value, dim=1, dtype=torch.float), router_indices, router_top_value


@pytest.mark.parametrize("router", [softmax_over_tokens, smallest_k, bf16_softmax])
def test_not_rewritten(router, caplog):
    x = logits(torch.bfloat16)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, graph = compile_and_record(router, x)
    torch.testing.assert_close(result, router(x))
    assert rewrites() == 0
    assert "moe_ops.route" not in graph and "aten.topk.default" in graph
    assert "not rewritten" in caplog.text


def test_r2_topk_values_used_elsewhere_not_rewritten():
    args = (torch.randn(T, H), torch.randn(E, H), torch.randn(E))
    result, graph = compile_and_record(topk_values_also_returned, *args)
    torch.testing.assert_close(result, topk_values_also_returned(*args))
    assert rewrites() == 0 and "moe_ops.route" not in graph


def renorm_over_tokens(router_logits):
    weights, ids = torch.topk(F.softmax(router_logits, dim=1, dtype=torch.float), K, dim=-1)
    return weights / weights.sum(dim=0, keepdim=True), ids


def renorm_by_total(router_logits):
    weights, ids = torch.topk(F.softmax(router_logits, dim=1, dtype=torch.float), K, dim=-1)
    return weights / weights.sum(), ids


def weighted_by_tensor(router_logits, gate):
    weights, ids = torch.topk(F.softmax(router_logits, dim=1, dtype=torch.float), K, dim=-1)
    return weights * gate, ids


@pytest.mark.parametrize("router", [renorm_over_tokens, renorm_by_total])
def test_other_denominator_stays_in_graph(router):
    """Only a renormalisation over the last dim is folded: another one stays in the graph and reads
    the op's (unrenormalised) weights."""
    x = logits(torch.bfloat16)
    result, graph = compile_and_record(router, x)
    assert_same_routing(result, router(x))
    assert rewrites() == 1
    assert "moe_ops.route.default(2, 'softmax', False, False, 0.0" in graph
    assert "aten.sum" in graph and "aten.div.Tensor" in graph


def test_multiplied_by_tensor_is_not_a_scale():
    x, gate = logits(torch.float32), torch.rand(T, 1)
    result, graph = compile_and_record(weighted_by_tensor, x, gate)
    assert_same_routing(result, weighted_by_tensor(x, gate))
    assert_expected_inline(graph, """\
moe_ops.route.default(2, 'softmax', False, False, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.int64)
aten.mul.Tensor()""")


def scores_also_used(router_logits):  # e.g. a load-balancing loss on the full probabilities
    probs = F.softmax(router_logits, dim=1, dtype=torch.float)
    weights, ids = torch.topk(probs, K, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids, probs.mean(0)


def test_scores_used_elsewhere_are_kept():
    """The rewrite happens; the other users of the softmax keep reading Inductor's softmax."""
    x = logits(torch.bfloat16)
    result, graph = compile_and_record(scores_also_used, x)
    expected = scores_also_used(x)
    assert_same_routing(result[:2], expected[:2])
    torch.testing.assert_close(result[2], expected[2])
    assert rewrites() == 1
    assert "aten.topk.default" not in graph and "aten.exp.default" in graph


def test_renormalised_weights_read_before_renorm_too():
    """The raw top-k weights are also returned: the renormalisation is not folded, both read the op."""

    def router(router_logits):
        weights, ids = torch.topk(F.softmax(router_logits, dim=1, dtype=torch.float), K, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids, weights

    x = logits(torch.float32)
    result, graph = compile_and_record(router, x)
    torch.testing.assert_close(result, router(x))
    assert rewrites() == 1 and "aten.topk.default" not in graph
    assert "moe_ops.route.default(2, 'softmax', False, False" in graph


# ---- The online-softmax form (what Inductor leaves on CUDA) ---------------------------------------


def online_softmax(x):
    from torch._inductor.inductor_prims import prepare_softmax_online

    row_max, row_sum = prepare_softmax_online(x, 1)
    return (x - row_max).exp() / row_sum


def mixtral_router_online(router_logits):
    weights, ids = torch.topk(online_softmax(router_logits.float()), K, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def gpt_oss_router_online(router_logits):
    router_top_value, router_indices = torch.topk(router_logits, K, dim=-1)
    return online_softmax(router_top_value.float()), router_indices


@pytest.mark.parametrize(
    "router, expected_call",
    [
        (mixtral_router_online, "moe_ops.route.default(2, 'softmax', False, True"),
        (gpt_oss_router_online, "moe_ops.route.default(2, 'softmax', True, False"),
    ],
)
def test_online_softmax_form(router, expected_call):
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    x = logits(torch.bfloat16)
    # Inductor's decompositions give the post-grad ops (casts as prims.convert_element_type).
    gm = make_fx(router, decomposition_table=select_decomp_table(), tracing_mode="fake")(x)
    assert rewrite_routing_prologues(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert expected_call in graph_summary(gm.graph) and "aten.topk" not in graph_summary(gm.graph)
    assert_same_routing(gm(x), router(x))


# ---- Switches, chaining, cache key -----------------------------------------------------------------


def test_disable_and_rewrites_disabled():
    x = logits(torch.float32)
    with moe_ops.rewrites_disabled():
        _, graph = compile_and_record(mixtral_router, x)
    assert rewrites() == 0 and "aten.topk.default" in graph
    assert moe_ops.config.rewrites

    moe_ops.disable()
    torch._dynamo.reset()
    compile_and_record(mixtral_router, x)
    assert rewrites() == 0
    moe_ops.enable()
    torch._dynamo.reset()
    compile_and_record(mixtral_router, x)
    assert rewrites() == 1


@pytest.mark.parametrize("pass_class", PASSES, ids=lambda p: p.hook)
def test_uuid_tracks_the_switch(pass_class):
    moe_pass = pass_class()
    on = moe_pass.uuid()
    with moe_ops.rewrites_disabled():
        off = moe_pass.uuid()
    assert on and off and on != off


class _CountingPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "counting-pass"


@pytest.mark.parametrize("pass_class", PASSES, ids=lambda p: p.hook)
def test_enable_is_idempotent_and_chains_a_user_pass(pass_class):
    """Both hooks (post-grad: inference graphs; joint: training graphs, and inference graphs pass it
    too) keep a user's pass and run it first."""
    user_pass = _CountingPass()
    with inductor_config.patch({pass_class.hook: user_pass}):
        moe_ops.enable()
        moe_ops.enable()
        installed = getattr(inductor_config, pass_class.hook)
        assert isinstance(installed, pass_class) and installed.previous is user_pass
        assert "counting-pass" in installed.uuid()
        x = logits(torch.float32)
        result = torch.compile(mixtral_router, backend="inductor")(x)
    assert_same_routing(result, mixtral_router(x))
    assert user_pass.calls == 1 and rewrites() == 1
    assert isinstance(getattr(inductor_config, pass_class.hook), pass_class)


# ---- Dynamic token count ---------------------------------------------------------------------------


def test_one_graph_serves_every_token_count():
    compiled = torch.compile(qwen3_moe_router, backend="inductor")
    warm_up = logits(torch.bfloat16)
    torch._dynamo.mark_dynamic(warm_up, 0)
    assert_same_routing(compiled(warm_up), qwen3_moe_router(warm_up))
    with torch.compiler.set_stance("fail_on_recompile"):
        for num_tokens in (3, 17, 40):
            x = torch.randn(num_tokens, E, dtype=torch.bfloat16)
            assert_same_routing(compiled(x), qwen3_moe_router(x))
    assert rewrites() == 1


# ---- DeepSeek-V3: group-limited selection -----------------------------------------------------------

N_GROUP, TOPK_GROUP, GROUPED_E, GROUPED_K = 4, 2, 16, 4


def deepseek_v3_router(router_logits, e_score_correction_bias, masked_value=float("-inf"), n_group=N_GROUP,
                       topk_group=TOPK_GROUP):
    """DeepseekV3TopkRouter.get_topk_indices + the weights of DeepseekV3MoE.route_tokens_to_experts."""
    scores = router_logits.sigmoid()
    scores_for_choice = scores.view(-1, GROUPED_E) + e_score_correction_bias.unsqueeze(0)
    group_scores = (
        scores_for_choice.view(-1, n_group, GROUPED_E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    )
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(-1, n_group, GROUPED_E // n_group).reshape(-1, GROUPED_E)
    )
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), masked_value)
    topk_indices = torch.topk(scores_for_choice, k=GROUPED_K, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    topk_weights /= topk_weights.sum(dim=-1, keepdim=True) + 1e-20
    return topk_weights * 2.5, topk_indices


def test_deepseek_v3_group_limited():
    args = (torch.randn(T, GROUPED_E), 0.1 * torch.randn(GROUPED_E))
    result, graph = compile_and_record(deepseek_v3_router, *args)
    assert_same_routing(by_expert(*result), by_expert(*deepseek_v3_router(*args)))
    assert rewrites() == 1
    assert_expected_inline(graph, """\
moe_ops.route.default(4, 'sigmoid', False, True, 1e-20, 4, 2, 2.5)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.int64)""")


def test_deepseek_v3_masked_with_zero_not_rewritten(caplog):
    """HF fills the masked experts with 0.0, not -inf: not the op's computation when a kept expert's
    biased score is negative."""
    args = (torch.randn(T, GROUPED_E), torch.randn(GROUPED_E), 0.0)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, graph = compile_and_record(deepseek_v3_router, *args)
    assert_same_routing(by_expert(*result), by_expert(*deepseek_v3_router(*args)))
    assert rewrites() == 0 and "moe_ops.route" not in graph
    assert "masked with 0.0, not -inf" in caplog.text


@pytest.mark.parametrize("n_group", [1, 4])
def test_every_group_kept_masks_nothing_whatever_the_fill(n_group):
    """topk_group = n_group keeps every group, so the 0.0 fill (Mistral 4, A.X-K2: n_group = topk_group
    = 1) never applies: the router is the ungrouped selection, and it is rewritten as one."""
    args = (torch.randn(T, GROUPED_E), torch.randn(GROUPED_E), 0.0, n_group, n_group)
    result, graph = compile_and_record(deepseek_v3_router, *args)
    assert_same_routing(by_expert(*result), by_expert(*deepseek_v3_router(*args)))
    assert rewrites() == 1
    assert "moe_ops.route.default(4, 'sigmoid', False, True, 1e-20, 1, 1, 2.5)" in graph


def mistral4_router(router_logits, masked_value, n_group, topk_group, num_experts=GROUPED_E, k=GROUPED_K,
                    group_sum_dim=-1):
    """Mistral 4's: DeepSeek-V3's group-limited selection on softmax scores, with no selection bias."""
    scores = router_logits.softmax(-1)
    group_scores = scores.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=group_sum_dim)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
    topk_indices = torch.topk(scores.masked_fill(~score_mask.bool(), masked_value), k=k, dim=-1,
                              sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    return topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20), topk_indices


@pytest.mark.parametrize("masked_value,n_group,topk_group,call", [
    (0.0, 1, 1, "moe_ops.route.default(4, 'softmax', False, True, 1e-20, None, 1, 1, 1.0)"),
    (float("-inf"), 4, 2, "moe_ops.route.default(4, 'softmax', False, True, 1e-20, None, 4, 2, 1.0)"),
], ids=["one_group_zero_fill", "four_groups"])
def test_group_limited_without_a_selection_bias(masked_value, n_group, topk_group, call):
    args = (torch.randn(T, GROUPED_E), masked_value, n_group, topk_group)
    result, graph = compile_and_record(mistral4_router, *args)
    assert_same_routing(by_expert(*result), by_expert(*mistral4_router(*args)))
    assert rewrites() == 1 and call in graph


@pytest.mark.parametrize("group_sum_dim,rewritten", [(2, True), (1, False)], ids=["last_dim_by_number", "over_groups"])
def test_group_scores_are_sums_of_each_groups_two_best(group_sum_dim, rewritten, caplog):
    """A group's score sums its two best choices: the last dim of the (T, n_group, 2) top-2 values, whether
    named -1 or 2. Summed over dim 1 (the groups) the scores rank the two places, not the groups: another
    selection, which stays the user's code (two groups, so that its masks still line up)."""
    router = functools.partial(mistral4_router, group_sum_dim=group_sum_dim)
    args = (torch.randn(T, GROUPED_E), float("-inf"), 2, 1)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, graph = compile_and_record(router, *args)
    assert_same_routing(by_expert(*result), by_expert(*router(*args)))
    assert rewrites() == int(rewritten)
    if not rewritten:
        assert "moe_ops.route" not in graph and "not the sum of each group's top-2 choices" in caplog.text


def group_limited_variant(router_logits, bias, variant, n_group=N_GROUP, topk_group=TOPK_GROUP):
    """DeepSeek-V3's group-limited router with one part written otherwise: other group scores, or the mask
    inverted (the kept groups' experts filled)."""
    choice = router_logits.sigmoid() + bias.unsqueeze(0)
    grouped = choice.view(-1, n_group, GROUPED_E // n_group)
    group_scores = {
        "group_max": lambda: grouped.amax(-1),
        "group_sum_doubled": lambda: grouped.topk(2, dim=-1)[0].sum(-1) * 2,
        "group_sum_negated": lambda: -grouped.topk(2, dim=-1)[0].sum(-1),
    }.get(variant, lambda: grouped.topk(2, dim=-1)[0].sum(-1))()
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, GROUPED_E // n_group).reshape(-1, GROUPED_E).bool()
    masked = {
        "kept_groups_filled": lambda: choice.masked_fill(score_mask, float("-inf")),
        "where_kept_groups_filled": lambda: torch.where(score_mask, float("-inf"), choice),
    }.get(variant, lambda: choice.masked_fill(~score_mask, float("-inf")))()
    ids = torch.topk(masked, k=GROUPED_K, dim=-1, sorted=False)[1]
    return router_logits.sigmoid().gather(1, ids), ids


@pytest.mark.parametrize("variant", ["group_max", "group_sum_doubled", "group_sum_negated", "kept_groups_filled",
                                     "where_kept_groups_filled"])
@pytest.mark.parametrize("n_group", [1, N_GROUP])
def test_other_group_limited_routers_compile_as_written(variant, n_group, caplog):
    """Routers near DeepSeek-V3's that the matcher must turn down (it read nodes of other kinds as the ones it
    looks for, and the compile failed): compiled, they give eager's experts and no matcher error is logged;
    only the group scores doubled (the same ranking) may be rewritten."""
    args = (torch.randn(T, GROUPED_E), 0.1 * torch.randn(GROUPED_E), variant, n_group, min(TOPK_GROUP, n_group))
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, _ = compile_and_record(group_limited_variant, *args)
    assert_same_routing(by_expert(*result), by_expert(*group_limited_variant(*args)))
    assert MATCHER_FAILED not in caplog.text


def test_a_matcher_that_trips_leaves_the_code_as_written(monkeypatch, caplog):
    """A matcher error (a graph it was not written for) is its bug, not the user's: the compile goes on with
    the router as written, and a warning says so."""
    from moe_ops.lowering.graph import route_rewrite

    def trips(topk):
        raise AttributeError("'NoneType' object has no attribute 'args'")

    monkeypatch.setattr(route_rewrite, "_match", trips)
    x = logits(torch.float32)
    with caplog.at_level(logging.WARNING, logger="moe_ops"):
        result, graph = compile_and_record(mixtral_router, x)
    assert_same_routing(result, mixtral_router(x))
    assert rewrites() == 0 and "moe_ops.route" not in graph
    assert MATCHER_FAILED in caplog.text and "AttributeError" in caplog.text


# ---- Training ---------------------------------------------------------------------------------------


class RouterWithGate(torch.nn.Module):
    def __init__(self, router):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.router = router

    def forward(self, x):
        weights, ids = self.router(self.gate(x))
        return weights * ids.to(weights.dtype)  # ids in the result: a swapped expert would show


@pytest.mark.usefixtures("training_rewrites")
@pytest.mark.parametrize("router", [mixtral_router, qwen2_moe_router], ids=["renormalised", "plain"])
def test_training(router):
    """Routing alone in a training graph: its backward is route's formula; gradients equal eager's."""
    forward_graph, backward_graph = check_training(RouterWithGate(router), torch.randn(T, H), dtype=torch.float32)
    assert rewrites() == 1 and counters["moe_ops"]["joint_rewrite"] == 1
    assert "moe_ops.route.default" in forward_graph and "topk" not in forward_graph
    assert "moe_ops.route_backward.default" in backward_graph


# ---- Ties: the compiled router picks the experts eager picks ---------------------------------------


def routers_at(num_experts, k):
    """The router forms over (T, num_experts) logits, each as the model code writes it."""

    def softmax_router(router_logits):
        weights, ids = torch.topk(F.softmax(router_logits, dim=1, dtype=torch.float), k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

    def softmax_after_topk_router(router_logits):
        values, ids = torch.topk(router_logits, k, dim=-1)
        return F.softmax(values, dim=1, dtype=torch.float), ids

    bias = torch.zeros(num_experts)  # a zero selection bias keeps the ties exact

    def grouped_router(router_logits, n_group=8, topk_group=4):  # DeepSeek-V3's, with the -inf mask
        scores = router_logits.float().sigmoid()
        choice = scores + bias.unsqueeze(0)
        group_scores = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
        ids = torch.topk(choice.masked_fill(~score_mask.bool(), float("-inf")), k=k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids

    def biased_clamped_router(router_logits):  # MiniMax-M2 / AFMoE selection bias, ERNIE's clamp
        scores = router_logits.float().softmax(-1)
        ids = torch.topk(scores + bias, k, dim=-1)[1]
        weights = scores.gather(1, ids)
        return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=0.5), ids

    def one_group_router(router_logits):  # GLM-4.5, Kimi, MiMo: the same code with n_group = 1
        return grouped_router(router_logits, n_group=1, topk_group=1)

    def unbiased_zero_fill_router(router_logits):  # Mistral 4's: no bias, every group kept, a 0.0 fill
        return mistral4_router(router_logits.float(), 0.0, 1, 1, num_experts=num_experts, k=k)

    return [softmax_router, softmax_after_topk_router, biased_clamped_router, one_group_router,
            unbiased_zero_fill_router] + ([grouped_router] if num_experts >= 16 else [])


@pytest.mark.parametrize("logits_kind", ["bf16_randn", "three_values"])
def test_product_key_ties_pick_the_experts_eager_picks(logits_kind):
    """Doge's product-key router (the top sqrt(E) keys of each half of the logits, the top-k of their
    pairwise sums, a softmax over those): the rewrite selects over the sums, and where they tie (every
    token, with keys of three values) it picks the candidates, and so the experts, eager picks."""
    num_keys, k = 4, 2

    def product_key_router(router_logits):
        (scores_x, scores_y), (indices_x, indices_y) = router_logits.view(2, -1, num_keys).topk(num_keys, dim=-1)
        all_scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).flatten(1)
        all_indices = (indices_x.unsqueeze(-1) * num_keys + indices_y.unsqueeze(-2)).flatten(1)
        scores, positions = all_scores.topk(k, dim=-1)
        return torch.softmax(scores, dim=-1), all_indices.gather(-1, positions)

    shape = (2, 512 * num_keys)
    x = torch.randn(shape) if logits_kind == "bf16_randn" else torch.randint(0, 3, shape) * 0.5
    x = x.bfloat16()
    result, _ = compile_and_record(product_key_router, x)
    assert rewrites() == 1
    (w, ids), (w_ref, ids_ref) = by_expert(*result), by_expert(*product_key_router(x))
    assert torch.equal(ids, ids_ref), f"{(ids != ids_ref).any(-1).sum()} tokens differ"
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("logits_kind", ["bf16_randn", "three_values"])
@pytest.mark.parametrize("num_experts,k", [(8, 2), (64, 8), (128, 8), (256, 8)])
def test_ties_pick_the_experts_eager_picks(num_experts, k, logits_kind):
    """bf16 logits tie (6% of tokens at the K-th expert for E=128, K=8); a rewritten router must select,
    for every token, the experts the uncompiled code selects."""
    shape = (512, num_experts)
    x = torch.randn(shape) if logits_kind == "bf16_randn" else torch.randint(0, 3, shape) * 0.5
    x = x.bfloat16()
    for router in routers_at(num_experts, k):
        torch._dynamo.reset()
        counters.clear()
        result, graph = compile_and_record(router, x)
        assert rewrites() == 1, router.__name__
        (w, ids), (w_ref, ids_ref) = by_expert(*result), by_expert(*router(x))
        assert torch.equal(ids, ids_ref), f"{router.__name__}: {(ids != ids_ref).any(-1).sum()} tokens differ"
        torch.testing.assert_close(w, w_ref)
