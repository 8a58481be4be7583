"""Form 1 of the experts rewrite: transformers' own MoE blocks (default experts implementation
"grouped_mm"; "grouped_mm_fallback" for non-bf16 weights) compiled with Inductor on the CPU become one
``moe_ops.fused_experts`` call, give eager's results, and near-misses are left alone.
"""

from __future__ import annotations

import logging

import pytest
import torch
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
from hf_family_blocks import TINY_CONFIG, build_block
from torch._dynamo.utils import counters

transformers = pytest.importorskip("transformers")
from transformers.integrations import moe as hf_moe  # noqa: E402
from transformers.models.afmoe.modeling_afmoe import AfmoeSparseMoeBlock  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock  # noqa: E402
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP  # noqa: E402
from transformers.models.laguna.modeling_laguna import LagunaSparseMoeBlock  # noqa: E402
from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2SparseMoeBlock  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_compile_state")

H, F, E, K = 64, 32, 8, 2
# The blocks taken from tests/hf_family_blocks.py are built at its sizes: the same as these.
assert (TINY_CONFIG["hidden_size"], TINY_CONFIG["num_experts"], TINY_CONFIG["num_experts_per_tok"]) == (H, E, K)

BLOCKS = {
    "mixtral": lambda: MixtralSparseMoeBlock(transformers.MixtralConfig(
        hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)),
    "qwen3_moe": lambda: Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(
        hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True)),
    "qwen2_moe": lambda: Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(
        hidden_size=H, moe_intermediate_size=F, shared_expert_intermediate_size=48, num_experts=E,
        num_experts_per_tok=K, norm_topk_prob=False)),
    "olmoe": lambda: OlmoeSparseMoeBlock(transformers.OlmoeConfig(
        hidden_size=H, intermediate_size=F, num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)),
    "deepseek_v3": lambda: DeepseekV3MoE(transformers.DeepseekV3Config(
        hidden_size=H, moe_intermediate_size=F, intermediate_size=48, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5)),
    "gpt_oss": lambda: GptOssMLP(transformers.GptOssConfig(
        hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)),
    # A sigmoid router with a selection bias, eps and a scale (route_scale), beside shared experts.
    "afmoe": lambda: AfmoeSparseMoeBlock(transformers.AfmoeConfig(
        hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, num_shared_experts=1,
        route_scale=2.5)),
    # A sigmoid router over soft-capped logits with a selection bias, beside a shared expert.
    "laguna": lambda: LagunaSparseMoeBlock(transformers.LagunaConfig(
        hidden_size=H, moe_intermediate_size=F, shared_expert_intermediate_size=48, num_experts=E,
        num_experts_per_tok=K, moe_router_logit_softcapping=3.0)),
    # A softmax router with a selection bias and a clamped renormalisation.
    "ernie4_5_moe": lambda: Ernie4_5_MoeSparseMoeBlock(transformers.Ernie4_5_MoeConfig(
        hidden_size=H, moe_intermediate_size=F, moe_num_experts=E, moe_k=K, moe_num_shared_experts=0)),
    # A sigmoid router with a selection bias and no groups.
    "minimax_m2": lambda: MiniMaxM2SparseMoeBlock(transformers.MiniMaxM2Config(
        hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)),
    # DeepSeek-V3's group-limited router with one group (GLM-4.5, Kimi, MiMo, dots1, ...): Inductor turns
    # the one-group scatter of the kept-groups mask into a one-hot compare.
    "glm4_moe": lambda: Glm4MoeMoE(transformers.Glm4MoeConfig(
        hidden_size=H, moe_intermediate_size=F, intermediate_size=48, n_routed_experts=E, num_experts_per_tok=K,
        n_group=1, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5)),
    # SiLU of the gate clamped above times the up clamped both ways (activation "clamped_silu").
    "glm5_next": lambda: build_block("glm5_next")[1],
    # GPT-OSS's clamped SwiGLU on concatenated (not interleaved) gate and up halves.
    "minimax_m3_vl": lambda: build_block("minimax_m3_vl")[1],
    # Ungated experts (up_proj, squared ReLU, down_proj) behind a sigmoid router with a selection bias.
    "nemotron_h": lambda: NemotronHMoE(transformers.NemotronHConfig(
        hidden_size=H, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K, n_group=1, topk_group=1)),
}


def build(name: str, dtype: torch.dtype, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    torch.manual_seed(0)
    block = BLOCKS[name]()
    block.experts.config._experts_implementation = experts_implementation
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.1)
    return block.to(dtype).eval().requires_grad_(False)


def tokens(num_tokens: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(1, num_tokens, H).to(dtype)


def output(result):
    return result[0] if isinstance(result, tuple) else result


def experts_rewrites(form: str | None = None) -> int:
    return counters["moe_ops"]["experts_rewrite" + (f"_{form}" if form else "")]


# ---- The rewrite fires on every model family, compiled == eager -----------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_is_rewritten(name, dtype):
    block = build(name, dtype)
    x = tokens(10, dtype)
    result, graph = compile_and_record(block, x)
    assert "moe_ops.fused_experts.default" in graph
    assert "_grouped_mm" not in graph and "grouped_mm_fallback" not in graph
    # bf16 weights take torch's grouped_mm, others transformers' fallback op (a per-expert mm loop).
    form = "hf_grouped_mm" if dtype == torch.bfloat16 else "hf_grouped_mm_fallback"
    assert experts_rewrites(form) == 1
    assert counters["moe_ops"]["route_rewrite"] == 1  # every router here is one moe_ops.route expresses
    assert_close_rel(output(result), output(block(x)), dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name,bias,call", [
    ("afmoe", "expert_bias", "moe_ops.route.default(2, 'sigmoid', False, True, 1e-20, 1, 1, 2.5)"),
    ("laguna", "gate.e_score_correction_bias", "moe_ops.route.default(2, 'sigmoid', False, True, 0.0, 1, 1, 1.0)"),
])
def test_router_with_a_selection_bias_is_rewritten(name, bias, call, dtype):
    block = build(name, dtype)
    with torch.no_grad():
        block.get_parameter(bias).normal_(0.0, 0.1)
    x = tokens(10, dtype)
    result, graph = compile_and_record(block, x)
    assert counters["moe_ops"]["route_rewrite"] == 1 and "topk" not in graph
    assert call in graph, graph
    assert_close_rel(output(result), output(block(x)), dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ernie_router_with_a_clamped_renormalisation_is_rewritten(dtype):
    block = build("ernie4_5_moe", dtype)
    x = tokens(10, dtype)
    result, graph = compile_and_record(block, x)
    assert counters["moe_ops"]["route_rewrite"] == 1 and "topk" not in graph
    assert "moe_ops.route.default(2, 'softmax', False, True, 0.0, 1, 1, 1.0, 1e-12)" in graph, graph
    assert_close_rel(output(result), output(block(x)), dtype, "ernie4_5_moe")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_minimax_m2_router_with_a_selection_bias_is_rewritten(dtype):
    block = build("minimax_m2", dtype)
    with torch.no_grad():
        block.e_score_correction_bias.normal_(0.0, 0.1)
    x = tokens(10, dtype)
    result, graph = compile_and_record(block, x)
    assert counters["moe_ops"]["route_rewrite"] == 1 and "topk" not in graph
    assert "moe_ops.route.default(2, 'sigmoid', False, True, 0.0, 1, 1, 1.0)" in graph
    assert_close_rel(output(result), output(block(x)), dtype, "minimax_m2")


@pytest.mark.parametrize("num_experts,top_k", [(64, 8), (128, 8)])
def test_many_experts_bf16_every_token_keeps_its_experts(num_experts, top_k):
    """bf16 router logits tie at the K-th expert for ~6% of tokens at E=128, K=8: the compiled block must
    send each token to the experts eager sends it to. A token sent elsewhere is off by O(1) relative,
    far above bf16 rounding (plain torch.compile stays within ~1e-2 per token here)."""
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(
        hidden_size=H, moe_intermediate_size=F, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=True))
    block.experts.config._experts_implementation = "grouped_mm"
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.1)
    block = block.to(torch.bfloat16).eval().requires_grad_(False)
    x = tokens(512, torch.bfloat16)
    result, graph = compile_and_record(block, x)
    assert "moe_ops.route.default" in graph and "moe_ops.fused_experts.default" in graph
    got, want = output(result).float()[0], output(block(x)).float()[0]
    per_token = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)
    assert per_token.max() < 5e-2, f"{(per_token > 5e-2).sum()} of 512 tokens off, worst {per_token.max():.3f}"


def test_expected_graph_qwen3():
    block = build("qwen3_moe", torch.bfloat16)
    _, graph = compile_and_record(block, tokens(10, torch.bfloat16))
    assert_expected_inline(graph, """\
aten.reshape.default([-1, 64])
aten.permute.default([1, 0])
aten.mm.default()
moe_ops.route.default(2, 'softmax', False, True, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
prims.convert_element_type.default(torch.bfloat16)
moe_ops.fused_experts.default(None, None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)
aten.reshape.default([1, 10, 64])""")


def test_expected_graph_gpt_oss():
    """Interleaved gate/up, clamped SwiGLU with GPT-OSS's constants, biases, transposed weights."""
    block = build("gpt_oss", torch.bfloat16)
    _, graph = compile_and_record(block, tokens(10, torch.bfloat16))
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
aten.reshape.default([1, 10, 64])""")


def test_logs_the_rewrite(caplog):
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        compile_and_record(build("mixtral", torch.bfloat16), tokens(10, torch.bfloat16))
    assert "rewrote hf_grouped_mm experts block" in caplog.text and "E=8, K=2, H=64, EFH, silu" in caplog.text


# ---- One graph for every token count ----------------------------------------------------------------


def test_dynamic_tokens_no_recompile():
    block = build("qwen3_moe", torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True)
    first = tokens(7, torch.bfloat16)
    torch._dynamo.mark_dynamic(first, 1)
    assert_close_rel(output(compiled(first)), output(block(first)), torch.bfloat16, "T=7")
    assert experts_rewrites() == 1
    with torch.compiler.set_stance("fail_on_recompile"):
        for num_tokens in (2, 33):
            x = tokens(num_tokens, torch.bfloat16, seed=num_tokens)
            assert_close_rel(output(compiled(x)), output(block(x)), torch.bfloat16, f"T={num_tokens}")


def test_automatic_dynamic_shapes():
    block = build("mixtral", torch.float32)
    compiled = torch.compile(block, fullgraph=True)
    for num_tokens in (4, 9, 21):  # the second size recompiles with a dynamic T, the third reuses it
        x = tokens(num_tokens, torch.float32, seed=num_tokens)
        assert_close_rel(output(compiled(x)), output(block(x)), torch.float32, f"T={num_tokens}")
    assert experts_rewrites() == 2  # the static graph, then the dynamic one


def test_gpt_oss_with_every_float_dynamic_keeps_its_experts(caplog):
    """torch.compile(dynamic=True) passes GPT-OSS's float attribute ``alpha`` into the graph as a tensor, a
    value known only at run time: the experts block stays as written (compiled == eager) and the log
    names alpha. Automatic dynamic shapes (test above) and mark_dynamic keep alpha a number."""
    block = build("gpt_oss", torch.float32)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        for num_tokens in (5, 11):
            x = tokens(num_tokens, torch.float32, seed=num_tokens)
            assert_close_rel(output(compiled(x)), output(block(x)), torch.float32, f"T={num_tokens}")
    assert experts_rewrites() == 0
    assert "its alpha is a tensor read at run time" in caplog.text


# ---- Near-misses are left alone --------------------------------------------------------------------


def _variant(**changes):
    """transformers' grouped_mm experts forward with one thing changed, as a user's fork would be."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        num_top_k, num_tokens = top_k_index.size(-1), hidden_states.size(0)
        sample_weights, expert_ids = top_k_weights.reshape(-1), top_k_index.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        hidden_g = hidden_states[perm // num_top_k]
        tokens_per_expert = torch.histc(expert_ids_g.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        sentinel = (expert_ids_g >= self.num_experts).unsqueeze(-1)
        hidden_g = hidden_g.masked_fill(sentinel, 0.0)
        gate_up = hf_moe._grouped_mm(hidden_g, self.gate_up_proj.transpose(-2, -1), offsets).masked_fill(sentinel, 0)
        gate, up = gate_up.chunk(2, dim=-1)
        act = changes.get("act", self.act_fn)
        h = act(gate) * up
        out = hf_moe._grouped_mm(h, self.down_proj.transpose(-2, -1), offsets).masked_fill(sentinel, 0.0)
        if changes.get("shared_bias"):  # one bias for all experts: no per-expert bias the op takes
            out = out + 0.5
        if not changes.get("skip_weights"):
            out = out * sample_weights[perm].unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0))
        result = out[inv_perm].view(num_tokens, num_top_k, -1).sum(dim=1)
        if changes.get("leak_h"):  # an intermediate read after the block (x * 0 Inductor would fold away)
            result = result + h.sum() * 1e-30
        return result.to(hidden_states.dtype)

    return forward


def _grouped_mm_experts(x, scores, w_gate_up, w_down, top_k=2, bias=None):
    """transformers' grouped_mm experts written out over a top-k of ``scores``, whose columns past the experts are
    expert parallelism's sentinel ids (their rows zeroed, then multiplied by their routing weights);
    ``bias``: an (E, N) per-expert bias of the gate/up projection, or another shape broadcast over it."""
    num_tokens, num_experts = x.shape[0], w_gate_up.shape[0]
    weights, ids = torch.topk(scores, top_k, dim=-1)
    ids_g, perm = torch.sort(ids.reshape(-1))
    offsets = torch.cumsum(torch.histc(ids_g.float(), bins=num_experts, min=0, max=num_experts - 1), dim=0,
                           dtype=torch.int32)
    sentinel = (ids_g >= num_experts).unsqueeze(-1)
    gate_up = torch._grouped_mm(x[perm // top_k].masked_fill(sentinel, 0.0), w_gate_up.transpose(-2, -1), offs=offsets)
    if bias is not None:
        gate_up = gate_up + bias[ids_g.clamp(max=num_experts - 1)]
    gate, up = gate_up.masked_fill(sentinel, 0.0).chunk(2, dim=-1)
    out = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down.transpose(-2, -1), offs=offsets)
    out = out.masked_fill(sentinel, 0.0) * weights.to(x.dtype).reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0))
    return out[inverse].view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


def _grouped_mm_problem(num_scores=12, num_experts=8, hidden=32, ffn=16, num_tokens=6):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(num_tokens, hidden, generator=generator).bfloat16(),
            torch.randn(num_tokens, num_scores, generator=generator),
            (torch.randn(num_experts, 2 * ffn, hidden, generator=generator) * 0.2).bfloat16(),
            (torch.randn(num_experts, hidden, ffn, generator=generator) * 0.2).bfloat16())


@pytest.mark.parametrize("weight", [1.0, float("inf"), float("nan")], ids=["finite", "inf", "nan"])
def test_sentinel_slots_multiply_their_weights_as_the_plain_code_does(weight):
    """A sentinel slot (id >= E) contributes its zeroed row times its routing weight: nothing for a finite
    weight, NaN for an inf or NaN one. The rewritten block keeps both (the op skips sentinel slots)."""
    x, scores, w_gate_up, w_down = _grouped_mm_problem()
    scores[0, 10] = 1e4 if weight == 1.0 else weight  # token 0 picks the sentinel id 10
    result, graph = compile_and_record(_grouped_mm_experts, x, scores, w_gate_up, w_down)
    want = _grouped_mm_experts(x, scores, w_gate_up, w_down)
    assert experts_rewrites() == 1 and "moe_ops.fused_experts" in graph
    assert torch.equal(result[0].isnan(), want[0].isnan()) and want[0].isnan().all() == (weight != 1.0)
    assert_close_rel(result[1:], want[1:], torch.bfloat16, "tokens without a sentinel slot")


def test_a_bias_broadcast_over_the_columns_is_left_alone(caplog):
    """A gate/up bias of one value per expert ((E, 1), broadcast over the columns) is no per-expert bias row that
    fused_experts takes: the block stays as written and compiles (the op's argument check turned the rewrite
    down instead of failing the compile)."""
    x, scores, w_gate_up, w_down = _grouped_mm_problem(num_scores=8)
    bias = (torch.randn(8, 1) * 0.2).bfloat16()
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, _ = compile_and_record(_grouped_mm_experts, x, scores, w_gate_up, w_down, 2, bias)
    assert experts_rewrites() == 0 and "fused_experts would refuse the block's tensors: b_gate_up" in caplog.text
    assert_close_rel(result, _grouped_mm_experts(x, scores, w_gate_up, w_down, 2, bias), torch.bfloat16, "(E, 1) bias")


class UngatedSharedExpert(Qwen2MoeSparseMoeBlock):  # Qwen2-MoE without the shared expert's sigmoid gate
    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(flat)
        routed = self.experts(flat, selected_experts, routing_weights)
        return (routed + self.shared_expert(flat)).reshape(batch_size, sequence_length, hidden_dim)


def test_shared_expert_without_its_gate():
    """The routed experts are the same computation and are rewritten; the shared expert is not part of
    what the op replaces (gated or not), so it stays as written, and the sum is eager's."""
    block = build("qwen2_moe", torch.bfloat16)
    block.__class__ = UngatedSharedExpert
    x = tokens(10, torch.bfloat16)
    result, graph = compile_and_record(block, x)
    assert experts_rewrites() == 1 and graph.count("moe_ops.fused_experts") == 1
    assert "aten.sigmoid" not in graph
    assert_close_rel(result, block(x), torch.bfloat16, "ungated shared expert")


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(act=torch.tanh), "no activation the op computes"),
        (dict(skip_weights=True), "not multiplied by their routing weights"),
        (dict(leak_h=True), "also read outside the block"),
        (dict(shared_bias=True), "the down projection's"),
    ],
    ids=["tanh", "no_weights", "extra_user", "bias_dropped"],
)
def test_near_miss_is_not_rewritten(change, reason, monkeypatch, caplog):
    monkeypatch.setitem(hf_moe.ALL_EXPERTS_FUNCTIONS._global_mapping, "near_miss", _variant(**change))
    block = build("qwen3_moe", torch.bfloat16, experts_implementation="near_miss")
    x = tokens(10, torch.bfloat16)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, graph = compile_and_record(block, x)
    assert experts_rewrites() == 0 and "fused_experts" not in graph
    assert reason in caplog.text
    assert_close_rel(output(result), output(block(x)), torch.bfloat16, str(change))


def test_experts_given_ids_from_outside_are_left_alone(caplog):
    """The experts module compiled on its own: its ids are inputs, which nothing shows to be >= 0. A negative
    id (expert-parallel code's "no local expert") is sorted first by the plain code and counted in no expert's
    group, so every later row reads another expert's weights, where fused_experts would route it to no
    expert: the rewrite must not fire (it did, and changed every row)."""
    experts = build("mixtral", torch.bfloat16).experts
    x = tokens(9, torch.bfloat16)[0]
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(9)])
    weights = torch.rand(9, K).to(torch.bfloat16)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        result, graph = compile_and_record(experts, x, ids, weights)
    assert experts_rewrites() == 0 and "fused_experts" not in graph
    assert "are not shown to be >= 0" in caplog.text
    assert_close_rel(result, experts(x, ids, weights), torch.bfloat16, "experts alone")


def test_the_restated_forward_is_rewritten(monkeypatch):
    """The control for the near-misses: the restatement with nothing changed does fire."""
    monkeypatch.setitem(hf_moe.ALL_EXPERTS_FUNCTIONS._global_mapping, "near_miss", _variant())
    block = build("qwen3_moe", torch.bfloat16, experts_implementation="near_miss")
    x = tokens(10, torch.bfloat16)
    result, _ = compile_and_record(block, x)
    assert experts_rewrites() == 1
    assert_close_rel(output(result), output(block(x)), torch.bfloat16, "restated")


def test_rewrites_disabled_leaves_grouped_mm():
    import moe_ops

    block = build("qwen3_moe", torch.bfloat16)
    with moe_ops.rewrites_disabled():
        _, graph = compile_and_record(block, tokens(10, torch.bfloat16))
    assert "_grouped_mm" in graph and "fused_experts" not in graph


# ---- On the GPU, at real shapes ------------------------------------------------------------------------


REAL_SHAPES = {  # (block, config overrides); bf16 weights ~N(0, 0.02)
    "mixtral": (MixtralSparseMoeBlock, transformers.MixtralConfig, dict(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeSparseMoeBlock, transformers.Qwen3MoeConfig, dict(
        hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)),
    "deepseek_v3": (DeepseekV3MoE, transformers.DeepseekV3Config, dict(
        hidden_size=7168, moe_intermediate_size=2048, intermediate_size=18432, n_routed_experts=256,
        num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5)),
}


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(REAL_SHAPES))
def test_cuda_real_shape_uses_moe_ops_kernels(name):
    from torch._inductor.utils import run_and_get_code

    block_cls, config_cls, overrides = REAL_SHAPES[name]
    with torch.device("meta"):
        block = block_cls(config_cls(**overrides)).to(torch.bfloat16).eval().requires_grad_(False)
    block.experts.config._experts_implementation = "grouped_mm"  # what a model built from the config gets
    block = block.to_empty(device="cuda")
    torch.manual_seed(0)
    for param in block.parameters():
        param.normal_(0.0, 0.02)
    x = torch.randn(1, 96, overrides["hidden_size"], device="cuda", dtype=torch.bfloat16)
    expected = output(block(x))
    result, codes = run_and_get_code(torch.compile(block, fullgraph=True), x)
    assert experts_rewrites() == 1
    assert any("moe_ops.fused_experts" in code for code in codes)
    assert_close_rel(output(result), expected, torch.bfloat16, name)


@pytest.mark.cuda
def test_cuda_graphs_reduce_overhead():
    """mode="reduce-overhead": the rewritten graph is captured in a CUDA graph (nothing in it syncs with
    the host or is skipped by cudagraph trees) and replays give eager's results on new inputs."""
    block = build("qwen3_moe", torch.bfloat16).cuda()
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # warm-up, record, then replays
        x = tokens(16, torch.bfloat16, seed=seed).cuda()
        result = output(compiled(x)).clone()
        assert_close_rel(result, output(block(x)), torch.bfloat16, f"replay {seed}")
    assert experts_rewrites() == 1
    assert counters["inductor"]["cudagraph_skips"] == 0


# ---- Training ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("training_rewrites")
@pytest.mark.parametrize("name", list(BLOCKS))
def test_training(name):
    """The joint graph is rewritten: the forward calls the ops, the backward is their formulas, every
    gradient (input, router, experts, shared expert) equals eager's. bf16 only: the backward of
    transformers' grouped_mm_fallback (other dtypes) does not compile, with or without moe_ops."""
    block = build(name, torch.bfloat16).train().requires_grad_(True)
    forward_graph, backward_graph = check_training(block, tokens(10, torch.bfloat16), dtype=torch.bfloat16)
    assert experts_rewrites("hf_grouped_mm") == 1 and counters["moe_ops"]["joint_rewrite"] == 1
    assert FUSED_EXPERTS_TRAINING in forward_graph and "_grouped_mm" not in forward_graph
    assert calls_experts_backward(backward_graph) and "_grouped_mm" not in backward_graph
