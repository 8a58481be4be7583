"""The activation matcher shared by the experts rewrites: a traced activation is recognised as the one
the op computes, with its form and constants, and a different function is not."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from compile_harness import fresh_compile_state  # noqa: F401  (fixture)
from torch._dynamo.utils import counters
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from moe_ops.lowering.graph.experts_rewrite import match_any_activation
from moe_ops.lowering.graph.fx_match import Rejected

WIDTH = 8


def traced(fn, num_inputs=1):
    """fn's graph as Inductor sees it post-grad: make_fx with Inductor's decompositions."""
    example = [torch.randn(3, WIDTH) for _ in range(num_inputs)]
    graph = make_fx(fn, decomposition_table=select_decomp_table())(*example).graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in graph.nodes if n.op == "output"]
    return output.args[0], inputs


def swiglu_concat(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gpt_oss_interleaved(gate_up, alpha=1.702, limit=7.0):
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@pytest.mark.parametrize(
    "fn, num_inputs, form, expected",
    [
        (swiglu_concat, 1, "concat", "silu"),
        (lambda gate, up: F.gelu(gate) * up, 2, "separate", "gelu"),
        (lambda up: F.relu(up), 1, "ungated", "relu"),  # NemotronH-style act(up) alone
        (lambda up: F.silu(up), 1, "ungated", "silu"),
        (lambda up: F.gelu(up, approximate="tanh"), 1, "ungated", "gelu_tanh"),
        (lambda up: torch.square(F.relu(up)), 1, "ungated", "relu2"),  # NemotronH's default
        (lambda gate, up: F.relu(gate).square() * up, 2, "separate", "relu2"),
    ],
    ids=["swiglu_concat", "gelu_separate", "relu_ungated", "silu_ungated", "gelu_tanh_ungated", "relu2_ungated",
         "relu2_separate"],
)
def test_activation_recognised(fn, num_inputs, form, expected):
    h, inputs = traced(fn, num_inputs)
    activation, nodes, constants = match_any_activation(h, inputs, form)
    assert activation == expected and h in nodes and constants == {}


def test_clamped_swiglu_binds_its_constants():
    h, inputs = traced(functools.partial(gpt_oss_interleaved, alpha=1.5, limit=5.0))
    activation, _, constants = match_any_activation(h, inputs, "interleaved")
    assert activation == "clamped_swiglu" and constants == {"alpha": 1.5, "limit": 5.0}


def test_minimax_m3_vl_swiglu_with_a_float_one_is_clamped_swiglu():
    """MiniMax-M3-VL writes GPT-OSS's SwiGLU on concatenated halves with ``up + 1.0``: the same op."""
    def swiglu(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        gate, up = gate.clamp(max=6.0), up.clamp(min=-6.0, max=6.0)
        return (up + 1.0) * (gate * torch.sigmoid(gate * 1.25))

    h, inputs = traced(swiglu)
    activation, _, constants = match_any_activation(h, inputs, "concat")
    assert activation == "clamped_swiglu" and constants == {"alpha": 1.25, "limit": 6.0}


@pytest.mark.parametrize("form", ["concat", "separate"])
def test_clamped_silu_binds_its_limit(form):
    """GLM-5-Next, HY-V4, DeepSeek-V4: silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)."""
    def clamped(gate, up):
        return F.silu(gate.clamp(min=None, max=10.0)) * up.clamp(min=-10.0, max=10.0)

    if form == "concat":
        h, inputs = traced(lambda gate_up: clamped(*gate_up.chunk(2, dim=-1)))
    else:
        h, inputs = traced(clamped, 2)
    activation, _, constants = match_any_activation(h, inputs, form)
    assert activation == "clamped_silu" and constants == {"limit": 10.0}


@pytest.mark.parametrize("limit, alpha", [(-0.5, 1.702), (4.0, float("inf"))], ids=["negative_limit", "infinite_alpha"])
def test_clamp_constants_the_op_refuses_are_no_activation(limit, alpha):
    """A negative limit (torch's clamp then returns the bound) or a non-finite alpha: constants fused_experts refuses,
    so the code is no activation it computes (the rewrite fired and the compiled call raised)."""
    h, inputs = traced(functools.partial(gpt_oss_interleaved, alpha=alpha, limit=limit))
    with pytest.raises(Rejected, match="is no activation the op computes"):
        match_any_activation(h, inputs, "interleaved")
    if limit < 0:
        h, inputs = traced(lambda gate, up: F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit), 2)
        with pytest.raises(Rejected, match="is no activation the op computes"):
            match_any_activation(h, inputs, "separate")


@pytest.mark.parametrize("under_fake_mode", [False, True], ids=["", "under_fake_mode"])
@pytest.mark.parametrize("limit, recognised", [(10.0, True), (7.3, False)])
def test_clamped_silu_without_the_rounding_of_the_clamped_gate(limit, recognised, under_fake_mode):
    """torch 2.11's Inductor drops the bf16 rounding between the clamp of GLM-5-Next's gate and the silu (the
    rounding changes nothing when bf16 holds the limit); torch 2.13 keeps it. Both graphs are the op's. With
    a limit bf16 does not hold (7.3), the graph without the rounding is another function, left alone. The
    same under a fake mode, where the training rewrite runs the matchers."""
    def clamped_silu_unrounded(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate.float().clamp(max=limit)).to(torch.bfloat16)
        return activated * up.float().clamp(min=-limit, max=limit).to(torch.bfloat16)

    graph = make_fx(clamped_silu_unrounded, decomposition_table=select_decomp_table())(
        torch.randn(3, WIDTH, dtype=torch.bfloat16)).graph
    (gate_up,) = [n for n in graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in graph.nodes if n.op == "output"]
    with FakeTensorMode() if under_fake_mode else contextlib.nullcontext():
        if recognised:
            activation, _, constants = match_any_activation(output.args[0], [gate_up], "concat")
            assert activation == "clamped_silu" and constants == {"limit": limit}
        else:
            with pytest.raises(Rejected, match="no activation the op computes"):
                match_any_activation(output.args[0], [gate_up], "concat")


@pytest.mark.parametrize(
    "fn, form",
    [
        (lambda up: torch.tanh(up), "ungated"),
        (lambda gate_up: F.silu(gate_up.chunk(2, -1)[1]) * gate_up.chunk(2, -1)[0], "concat"),  # gate, up swapped
        (lambda gate_up: F.silu(gate_up.chunk(2, -1)[0]) + gate_up.chunk(2, -1)[1], "concat"),  # sum, not product
    ],
    ids=["tanh", "gate_up_swapped", "sum_not_product"],
)
def test_other_functions_rejected(fn, form):
    h, inputs = traced(fn)
    with pytest.raises(Rejected, match="no activation the op computes"):
        match_any_activation(h, inputs, form)


# ---- Why a block that looks like MoE was not rewritten: INFO, once, with the user's line ------------

E, K, H, F_ = 8, 2, 32, 16


def _gpt_fast_block(activation):
    weights = [torch.randn(E, H), torch.randn(E, F_, H), torch.randn(E, F_, H), torch.randn(E, H, F_)]
    w_router, w1, w3, w2 = weights

    def block(x):
        scores = F.softmax(x @ w_router.T, dim=-1, dtype=torch.float)
        w, ids = torch.topk(scores, K, dim=-1)  # ROUTER LINE
        w = w / w.sum(-1, keepdim=True)
        x1 = activation(torch.einsum("ti,taoi->tao", x, w1[ids]))
        x3 = torch.einsum("ti,taoi->tao", x, w3[ids])
        y = torch.einsum("tao,taio->tai", x1 * x3, w2[ids])
        return torch.einsum("tai,ta->ti", y, w.to(x.dtype))

    return block


def _not_rewritten_lines(caplog):
    messages = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    return [m for m in messages if "MoE block not rewritten" in m]


@pytest.mark.usefixtures("fresh_compile_state")
def test_unrewritten_moe_block_says_why_at_info_once(caplog):
    import inspect
    import logging

    block = _gpt_fast_block(torch.tanh)
    line = next(i for i, text in enumerate(inspect.getsource(_gpt_fast_block).splitlines()) if "ROUTER LINE" in text)
    router_line = inspect.getsourcelines(_gpt_fast_block)[1] + line
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        for tokens in (10, 10, 12):  # a second call hits the cache; a third recompiles: one message still
            x = torch.randn(tokens, H)
            torch.testing.assert_close(torch.compile(block)(x), block(x), rtol=1e-4, atol=1e-4)
    messages = _not_rewritten_lines(caplog)
    assert len(messages) == 1, messages
    (message,) = messages
    assert f"test_experts_rewrite.py:{router_line}: w, ids = torch.topk(scores, K, dim=-1)" in message
    assert "is no activation the op computes" in message


@pytest.mark.usefixtures("fresh_compile_state")
def test_an_experts_matcher_that_trips_leaves_the_block_as_written(monkeypatch, caplog):
    """A matcher error on an experts block (a graph it was not written for: its bug) leaves the block as
    written, with a warning, and the compile goes on."""
    import logging

    from moe_ops.lowering.graph import experts_rewrite
    from moe_ops.lowering.graph.fx_match import MATCHER_FAILED

    def trips(match):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(experts_rewrite, "check", trips)
    block = _gpt_fast_block(F.silu)
    x = torch.randn(10, H)
    with caplog.at_level(logging.WARNING, logger="moe_ops"):
        torch.testing.assert_close(torch.compile(block)(x), block(x), rtol=1e-4, atol=1e-4)
    assert counters["moe_ops"]["experts_rewrite"] == 0
    assert MATCHER_FAILED in caplog.text and "IndexError" in caplog.text


@pytest.mark.usefixtures("fresh_compile_state")
def test_rewritten_block_and_plain_topk_say_nothing_at_info(caplog):
    import logging

    def sampler(logits):  # a top-k that is no router: its ids leave the graph
        return torch.topk(logits.softmax(-1), 5, dim=-1)

    def load_counter(logits):  # a top-k whose ids are only counted (load-balancing statistics)
        return torch.histc(torch.topk(logits.softmax(-1), K, dim=-1).indices.float(), bins=E, min=0, max=E - 1)

    def scattered_counter(logits):  # counted through a one-hot scatter whose result no matmul reads
        ids = torch.topk(logits.softmax(-1), K, dim=-1).indices
        return torch.zeros_like(logits).scatter(1, ids, 1.0).sum(0)

    with caplog.at_level(logging.INFO, logger="moe_ops"):
        torch.compile(_gpt_fast_block(F.silu))(torch.randn(10, H))
        torch.compile(sampler)(torch.randn(4, 50))
        torch.compile(load_counter)(torch.randn(10, E))
        torch.compile(scattered_counter)(torch.randn(10, E))
    assert _not_rewritten_lines(caplog) == []


def _counting_block(count: str):
    """A hand-written block that reads its routing to the host, so that dynamo breaks the graph there and
    the router and the experts land in different graphs: ``count`` "bincount" counts the tokens per expert
    with torch.bincount, "mask" sums a one-hot mask written with scatter (JetMoE's router), both looping
    over the counts (.tolist()); "hit" loops over the experts hit (torch.nonzero, as Switch Transformers'
    and Step-3.7's experts do)."""
    w_router, w1, w3, w2 = torch.randn(E, H), torch.randn(E, F_, H), torch.randn(E, F_, H), torch.randn(E, H, F_)

    def mlp(e, r):
        return (F.silu(r @ w1[e].T) * (r @ w3[e].T)) @ w2[e].T

    def block(x):
        w, ids = torch.topk(torch.softmax(x @ w_router.T, dim=-1), K, dim=-1)  # ROUTER LINE
        w = w / w.sum(-1, keepdim=True)
        if count == "hit":
            mask = F.one_hot(ids, E).permute(2, 1, 0)
            out = torch.zeros_like(x)
            for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
                slot, token = torch.where(mask[e[0]])
                out.index_add_(0, token, mlp(e[0], x[token]) * w[token, slot, None])
            return out
        if count == "bincount":
            counts = torch.bincount(ids.flatten(), minlength=E).tolist()
        else:
            counts = torch.zeros(x.shape[0], E).scatter(1, ids, 1).long().sum(0).tolist()
        order = ids.flatten().argsort()
        rows, out, start = x[order // K], torch.zeros(x.shape[0] * K, x.shape[1]), 0
        for e, n in enumerate(counts):
            out[order[start:start + n]] = mlp(e, rows[start:start + n])
            start += n
        return (out.view(-1, K, x.shape[1]) * w[..., None]).sum(1)

    return block


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("count", ["bincount", "mask", "hit"])
def test_block_split_by_a_graph_break_says_so_at_info(caplog, count):
    """The graph holding the router hands its ids (or a mask or counts derived from them) to the code after
    a graph break: the INFO line names the router's line and the break, and the compiled block still
    computes eager's result."""
    import inspect
    import logging

    block = _counting_block(count)
    line = next(i for i, text in enumerate(inspect.getsource(_counting_block).splitlines()) if "ROUTER LINE" in text)
    router_line = inspect.getsourcelines(_counting_block)[1] + line
    x = torch.randn(10, H)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        torch.testing.assert_close(torch.compile(block)(x), block(x), rtol=1e-4, atol=1e-4)
    messages = _not_rewritten_lines(caplog)
    assert len(messages) == 1, messages
    assert f"test_experts_rewrite.py:{router_line}:" in messages[0] and "a graph break after the router" in messages[0]


@pytest.mark.usefixtures("fresh_compile_state")
def test_top1_router_with_capacity_says_it_is_not_rewritten(caplog):
    """Switch Transformers' router (a max over the softmax, then a capacity mask from a cumsum of the
    one-hot choices) is no form the rewrites know, and its experts run after a graph break: the compiled
    block computes eager's result and the log names the router's line and the break; an argmax over a
    softmax is explained alike, a max over other values (attention scores, a sampler's logits) is no
    router."""
    import logging

    transformers = pytest.importorskip("transformers")
    from transformers.models.switch_transformers import modeling_switch_transformers as switch

    config = transformers.SwitchTransformersConfig(d_model=H, d_ff=F_, num_experts=4, expert_capacity=3)
    block = switch.SwitchTransformersSparseMLP(config).eval()
    w_router = torch.randn(E, H)

    def argmax_router(x):
        ids = torch.argmax(F.softmax(x @ w_router.T, dim=-1), dim=-1)  # ARGMAX LINE
        return x * (ids[:, None] + 1).to(x.dtype)

    def max_of_scores(x):
        return x * torch.max(x @ w_router.T, dim=-1).indices[:, None].to(x.dtype)

    with caplog.at_level(logging.INFO, logger="moe_ops"), torch.no_grad():
        x = torch.randn(2, 8, H)
        torch.testing.assert_close(torch.compile(block)(x), block(x))
        x = torch.randn(10, H)
        for fn in (argmax_router, max_of_scores):
            torch.testing.assert_close(torch.compile(fn)(x), fn(x))
    messages = _not_rewritten_lines(caplog)
    assert len(messages) == 2, messages
    assert "modeling_switch_transformers.py" in messages[0] and "torch.max(router_probs, dim=-1" in messages[0]
    # Its experts loop over the experts hit (torch.nonzero): a graph break after the capacity mask.
    assert "a graph break after the router" in messages[0]
    # The argmax's ids scale token values (no routing decision leaves the graph): no graph break is claimed.
    assert "a graph break" not in messages[1]
    assert "ids = torch.argmax(F.softmax(x @ w_router.T, dim=-1), dim=-1)" in messages[1]


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("n_group,topk_group", [(4, 2), (1, 1)])  # (1, 1): NemotronH's default
def test_group_limited_router_is_explained_once_at_its_expert_top_k(caplog, n_group, topk_group):
    """A group-limited router (DeepSeek-V3's form) has two top-ks: the groups' and the experts'. Only
    the second is a router; the message names its line, not the group selection's (whose mask write
    Inductor turns into a comparison with an iota when there is one group)."""
    import logging

    w_router, w1, w2 = torch.randn(E, H), torch.randn(E, F_, H), torch.randn(E, H, F_)

    def block(x):
        scores = (x @ w_router.T).sigmoid()
        group_scores = scores.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        keep = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
        w, ids = torch.topk(scores.masked_fill(keep == 0, float("-inf")), K, dim=-1)  # EXPERT TOP-K
        y = torch.einsum("tao,taio->tai", torch.tanh(torch.einsum("ti,taoi->tao", x, w1[ids])), w2[ids])
        return torch.einsum("tai,ta->ti", y, w)

    with caplog.at_level(logging.INFO, logger="moe_ops"):
        x = torch.randn(10, H)
        torch.testing.assert_close(torch.compile(block)(x), block(x), rtol=1e-4, atol=1e-4)
    messages = _not_rewritten_lines(caplog)
    assert len(messages) == 1, messages
    assert "w, ids = torch.topk(scores.masked_fill(keep == 0" in messages[0]


@pytest.mark.usefixtures("fresh_compile_state")
def test_router_left_alone_says_why_at_info_once(caplog):
    """A router the routing rewrite declines (a top-k over raw logits whose values feed a sigmoid, Llama 4's
    selection) is explained at INFO once, naming its line, beside a rewritten experts block; a recompile
    (another T) does not repeat it."""
    import logging

    w_router, w_gate_up, w_down = torch.randn(E, H), torch.randn(E, 2 * F_, H), torch.randn(E, H, F_)

    def block(x):
        logits, ids = torch.topk(x @ w_router.T, K, dim=-1)
        w = torch.sigmoid(logits)
        gate, up = torch.einsum("th,tkfh->tkf", x, w_gate_up[ids]).chunk(2, dim=-1)
        y = torch.einsum("tkf,tkhf->tkh", F.silu(gate) * up, w_down[ids])
        return torch.einsum("tkh,tk->th", y, w)

    with caplog.at_level(logging.INFO, logger="moe_ops"):
        for tokens in (10, 12):
            x = torch.randn(tokens, H)
            torch.testing.assert_close(torch.compile(block)(x), block(x), rtol=1e-4, atol=1e-4)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    router_lines = [m for m in lines if m.startswith("MoE router not rewritten")]
    assert len(router_lines) == 1, lines
    assert "logits, ids = torch.topk(x @ w_router.T, K, dim=-1)" in router_lines[0], router_lines
    assert "is not a softmax/sigmoid over the last dim" in router_lines[0], router_lines
    assert counters["moe_ops"]["experts_rewrite"] == 2 and not counters["moe_ops"]["route_rewrite"]
