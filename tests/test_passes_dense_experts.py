"""Form 5 of the experts rewrite (lowering/graph/match_dense_experts.py): Llama 4's experts, every token
through every expert with its input row scaled by its score, become one ``moe_ops.fused_experts`` call on
the rows scaled by each chosen expert's score (one row per slot for K > 1), with eager's results, NaN rows
included; near-misses are left alone."""

from __future__ import annotations

import logging

import pytest
import torch
from compile_harness import (  # noqa: F401  (fixtures)
    FUSED_EXPERTS_TRAINING,
    check_training,
    compile_and_record,
    fresh_compile_state,
    training_rewrites,
)
from conftest import assert_close_rel
from expecttest import assert_expected_inline
from torch import nn
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers")
from hf_family_blocks import build_block, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_compile_state")


def llama4_block(dtype: torch.dtype, top_k: int = 1) -> nn.Module:
    """transformers' own Llama4TextMoe at tiny sizes (H = 64, E = 8), weights ~N(0, 0.1)."""
    config = tiny_config("llama4")
    config.num_experts_per_tok = top_k
    _, block, _ = build_block("llama4", config)
    torch.manual_seed(0)
    for parameter in block.parameters():  # Llama 4's experts are torch.empty: never compare uninitialised memory
        nn.init.normal_(parameter, std=0.1)
    return block.to(dtype).eval().requires_grad_(False)


def tokens(num_tokens: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(1, num_tokens, 64).to(dtype)


def dense_rewrites() -> int:
    return counters["moe_ops"]["experts_rewrite_dense_input_scaled"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_llama4_experts_are_rewritten(dtype):
    block = llama4_block(dtype)
    x = tokens(10, dtype)
    result, graph = compile_and_record(block, x)
    assert dense_rewrites() == 1 and "aten.bmm" not in graph and "aten.repeat" not in graph
    assert_close_rel(result[0], block(x)[0], dtype, "output")
    assert_close_rel(result[1], block(x)[1], dtype, "router logits")


def test_llama4_rewritten_graph():
    """The op reads x times the chosen score (the sigmoid of the top-1 logit, in x's dtype) with a routing
    weight of 1; sum(x * 0) over each row is added to its output (NaN for a row with an inf or NaN)."""
    block = llama4_block(torch.bfloat16)
    _, graph = compile_and_record(block, tokens(10, torch.bfloat16))
    lines = graph.splitlines()  # the experts' part: from the score of the chosen expert to the op's output
    first, last = lines.index("aten.sigmoid.default()") - 1, lines.index("aten.sum.dim_IntList([-1], True)") + 1
    experts = "\n".join(lines[first:last + 1])
    assert "aten.topk.default(1, 1)" in lines
    assert_expected_inline(experts, """\
prims.convert_element_type.default(torch.float32)
aten.sigmoid.default()
prims.convert_element_type.default(torch.bfloat16)
aten.mul.Tensor()
aten.full.default([10, 1], 1.0)
moe_ops.fused_experts.default(None, None, None, None, 'EHF', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)
aten.mul.Tensor(0.0)
aten.sum.dim_IntList([-1], True)
aten.add.Tensor()""")


def test_rows_with_inf_or_nan_are_nan_as_in_eager():
    """Eager multiplies every expert's copy of a row by its score, 0 for the experts not chosen: a row with
    an inf gives inf * 0 = NaN in every expert's GEMMs, so its output row is NaN; the rewrite keeps that."""
    block = llama4_block(torch.float32)
    x = tokens(10, torch.float32)
    x[0, 3, 5], x[0, 6, 0] = float("inf"), float("nan")
    result, _ = compile_and_record(block, x)
    want = block(x)[0]
    assert dense_rewrites() == 1
    nan_rows = result[0].isnan().any(-1)
    assert torch.equal(nan_rows, want.isnan().any(-1)) and nan_rows.nonzero().flatten().tolist() == [3, 6]
    finite = ~nan_rows
    assert_close_rel(result[0][finite], want[finite], torch.float32, "finite rows")


def test_dynamic_token_count():
    """One graph for every T (the ones of the routing weights sized at run time)."""
    block = llama4_block(torch.float32)
    compiled = torch.compile(block, dynamic=True)
    for num_tokens in (5, 17):
        x = tokens(num_tokens, torch.float32, seed=num_tokens)
        assert_close_rel(compiled(x)[0], block(x)[0], torch.float32, f"T={num_tokens}")
    assert dense_rewrites() == 1


@pytest.mark.usefixtures("training_rewrites")
@pytest.mark.parametrize("top_k", [1, 2])
def test_training_graph_is_rewritten(top_k):
    """With training_rewrites, the training step runs the op's training variant, and the input gradient,
    the router's and the experts' gradients are eager's (the scale's gradient flows through the mul)."""
    block = llama4_block(torch.float32, top_k=top_k).train().requires_grad_(True)
    forward_graph, _ = check_training(block, tokens(12, torch.float32), dtype=torch.float32)
    assert FUSED_EXPERTS_TRAINING in forward_graph and "aten.bmm" not in forward_graph


def _nonfinite_step(fn, block: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    fn(x)[0].backward(grad_out)
    return {"input": x.grad, **{name: p.grad for name, p in block.named_parameters()}}


@pytest.mark.usefixtures("training_rewrites")
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("where", ["nan_token", "inf_element", "inf_output_gradient"])
def test_training_gradients_are_nan_where_eagers_are(where, top_k):
    """Eager runs every token through every expert, the ones it did not choose on the row 0 * x[t]: an inf or
    NaN in x[t] makes those experts' weight gradients NaN, and one in the output's gradient too (0 * inf in the
    GEMMs of their backward). The op never reads those rows; the training graph's rewrite brings the NaN all the
    same: every gradient has eager's NaN and infs where eager has them, and eager's values elsewhere."""
    block = llama4_block(torch.float32, top_k=top_k).train().requires_grad_(True)
    x = tokens(12, torch.float32)
    torch.manual_seed(3)
    grad_out = torch.randn(12, 64)  # the block's output: (tokens, hidden)
    if where == "nan_token":
        x[0, 4] = float("nan")
    elif where == "inf_element":
        x[0, 4, 9] = float("inf")
    else:
        grad_out[4, 9] = float("inf")
    got = _nonfinite_step(torch.compile(block, fullgraph=True), block, x, grad_out)
    assert counters["moe_ops"]["joint_rewrite"] == 1 and dense_rewrites() == 1
    want = _nonfinite_step(block, block, x, grad_out)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert torch.equal(got[name].isnan(), grad.isnan()), name
        assert torch.equal(got[name].isinf(), grad.isinf()), name
        assert grad.isnan().any() or name.startswith("shared") or name == "router.weight", name
        finite = grad.isfinite()
        assert_close_rel(got[name][finite], grad[finite], torch.float32, name)


@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_several_experts_per_token_read_their_own_scaled_rows(top_k, dtype):
    """K > 1: each chosen expert reads the row scaled by its own score. The op reads one row per slot, x[t]
    times that slot's score (in x's dtype, as eager rounds it), with routing weights of 1, and each token's K
    outputs are summed: eager's result, NaN rows included, for a static and a dynamic token count."""
    block = llama4_block(dtype, top_k=top_k)
    x = tokens(10, dtype)
    x[0, 4, 7] = float("nan")
    result, graph = compile_and_record(block, x)
    want = block(x)[0]
    assert dense_rewrites() == 1 and "aten.bmm" not in graph and "aten.repeat" not in graph
    nan_rows = result[0].isnan().any(-1)
    assert torch.equal(nan_rows, want.isnan().any(-1)) and nan_rows.nonzero().flatten().tolist() == [4]
    assert_close_rel(result[0][~nan_rows], want[~nan_rows], dtype, f"K={top_k}")
    compiled = torch.compile(block, dynamic=True)
    for num_tokens in (5, 17):
        x = tokens(num_tokens, dtype, seed=num_tokens)
        assert_close_rel(compiled(x)[0], block(x)[0], dtype, f"K={top_k}, T={num_tokens}")


def test_several_experts_per_token_rewritten_graph():
    """K = 2: the slot rows x[t] * score[t, k] (T * K, H), their experts (T * K, 1), routing weights of 1;
    the op's output viewed (T, K, H) and summed over K, then sum(x * 0) added per row."""
    block = llama4_block(torch.bfloat16, top_k=2)
    _, graph = compile_and_record(block, tokens(10, torch.bfloat16))
    lines = graph.splitlines()
    first, last = lines.index("aten.sigmoid.default()") - 1, lines.index("aten.sum.dim_IntList([-1], True)") + 1
    assert_expected_inline("\n".join(lines[first:last + 1]), """\
prims.convert_element_type.default(torch.float32)
aten.sigmoid.default()
prims.convert_element_type.default(torch.bfloat16)
aten.unsqueeze.default(1)
aten.unsqueeze.default(-1)
aten.mul.Tensor()
aten.view.default([-1, 64])
aten.view.default([-1, 1])
aten.full.default([20, 1], 1.0)
moe_ops.fused_experts.default(None, None, None, None, 'EHF', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)
aten.view.default([-1, 2, 64])
aten.sum.dim_IntList([1])
aten.mul.Tensor(0.0)
aten.sum.dim_IntList([-1], True)
aten.add.Tensor()""")


class ScaledDenseExperts(nn.Module):
    """Llama 4's dense experts with the chosen logits scattered into ``fill`` and ``score`` applied to them:
    only -inf with a score that maps it to exactly 0 leaves the experts not chosen out of the sum."""

    def __init__(self, fill: float, score):
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(64, 8, bias=False)
        self.gate_up = nn.Parameter(0.1 * torch.randn(8, 64, 64))
        self.down = nn.Parameter(0.1 * torch.randn(8, 32, 64))
        self.fill, self.score = fill, score

    def forward(self, x):
        logits = self.router(x)
        top, ids = torch.topk(logits, 1, dim=1)
        scores = self.score(torch.full_like(logits, self.fill).scatter_(1, ids, top))
        rows = x.repeat(8, 1) * scores.transpose(0, 1).reshape(-1, 1)
        gate, up = torch.bmm(rows.view(8, -1, 64), self.gate_up).chunk(2, dim=-1)
        return torch.bmm(up * nn.functional.silu(gate), self.down).view(8, -1, 64).sum(0)


@pytest.mark.parametrize("fill, score, rewritten, reason", [
    (float("-inf"), torch.sigmoid, True, None),
    (0.0, torch.sigmoid, False, "into something other than a tensor of -inf"),
    (float("-inf"), torch.exp, False, "not a chain of casts and sigmoid"),
], ids=["llama4", "zeros_filled", "exp_scores"])
def test_scores_other_than_llama4s_are_left_alone(fill, score, rewritten, reason, caplog):
    """Zeros as the fill make each expert not chosen read 0.5 * x (the sum is then no longer the chosen
    expert's output); a score other than casts and a sigmoid is not checked (exp(-inf) is 0, but exp is not
    on the list): both left alone with their reason, with eager's result."""
    module = ScaledDenseExperts(fill, score).eval().requires_grad_(False)
    x = tokens(9, torch.float32)[0]
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, _ = compile_and_record(module, x)
    assert dense_rewrites() == int(rewritten)
    if reason:
        assert reason in caplog.text
    assert_close_rel(result, module(x), torch.float32, "output")
