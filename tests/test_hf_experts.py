"""transformers' experts modules through moe_ops (lowering/hf_experts.py).

Real transformers MoE blocks, built from tiny configs with random weights, with
``experts_implementation="eager"`` under ``torch.compile`` (Inductor, CPU): dynamo traces the experts
into one ``moe_ops.fused_experts`` call with no graph break, and the result matches the uncompiled
block, whose experts run transformers' per-expert loop. Also: the "moe_ops" implementation in eager
mode, the cases that must fall back to the loop (and say why), and the switches.
"""

from __future__ import annotations

import collections
import importlib
import logging
import types

import pytest
import torch
from conftest import assert_close_rel
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx

import moe_ops

transformers = pytest.importorskip("transformers")
moe_integration = pytest.importorskip("transformers.integrations.moe")
hf_experts = importlib.import_module("moe_ops.lowering.hf_experts")
fused_experts = moe_ops.fused_experts  # before any test replaces it with a counting wrapper
mixtral = importlib.import_module("transformers.models.mixtral.modeling_mixtral")
gpt_oss = importlib.import_module("transformers.models.gpt_oss.modeling_gpt_oss")

H, F, E, K = 64, 32, 8, 2  # hidden, expert intermediate, experts, experts per token


def _modeling(model_type: str):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


# Each MoE block as the model builds it: (module, block class, config class, config of the experts' sizes).
BLOCKS = {
    "mixtral": ("mixtral", "MixtralSparseMoeBlock", "MixtralConfig",
                dict(intermediate_size=F, num_local_experts=E)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig",
                  dict(moe_intermediate_size=F, num_experts=E, norm_topk_prob=True)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig",  # with a gated shared expert
                  dict(moe_intermediate_size=F, num_experts=E, shared_expert_intermediate_size=2 * F)),
    "olmoe": ("olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig", dict(intermediate_size=F, num_experts=E)),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config",  # group-limited router, shared expert
                    dict(moe_intermediate_size=F, n_routed_experts=E, n_group=2, topk_group=1, n_shared_experts=1)),
    "gpt_oss": ("gpt_oss", "GptOssMLP", "GptOssConfig",  # interleaved, clamped SwiGLU, biases
                dict(intermediate_size=F, num_local_experts=E)),
}


def tiny_block(name: str, dtype: torch.dtype, **config_overrides):
    """The block with random weights and ``experts_implementation="eager"`` (unless overridden)."""
    model_type, block_name, config_name, sizes = BLOCKS[name]
    config = getattr(transformers, config_name)(
        **{"hidden_size": H, "num_experts_per_tok": K, "experts_implementation": "eager", **sizes, **config_overrides}
    )
    block = getattr(_modeling(model_type), block_name)(config)
    with torch.no_grad():
        for parameter in block.parameters():  # the blocks allocate their experts uninitialised
            parameter.normal_(0.0, 0.1)
    return block.to(dtype)


def block_output(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out  # GptOssMLP also returns the router scores


def run_graph_as_is(graph_module, example_inputs):
    return graph_module.forward


class RecordingBackend:
    """A torch.compile backend that keeps every dynamo graph (a graph break makes one more) and hands it to
    Inductor, or, where a test only inspects the graphs, runs it as traced (faster to compile)."""

    def __init__(self, compile_graph=compile_fx):
        self.compile_graph = compile_graph
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return self.compile_graph(graph_module, example_inputs)

    def fused_experts_calls(self) -> int:
        return sum(
            node.op == "call_function" and str(node.target).startswith("moe_ops.fused_experts")
            for graph_module in self.graphs
            for node in graph_module.graph.nodes
        )


def set_experts_implementation(block, name: str) -> None:
    block.experts.config._experts_implementation = name


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each case traces from scratch, sees every log line, and leaves the switches as it found them."""
    saved = (moe_ops.config.rewrites, moe_ops.config.transformers_eager_experts)
    torch._dynamo.reset()
    counters.clear()
    hf_experts._REPORTED.clear()
    yield
    torch._dynamo.reset()
    moe_ops.config.rewrites, moe_ops.config.transformers_eager_experts = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_compiled_eager_experts_run_fused_experts(name, dtype):
    block = tiny_block(name, dtype)
    x = torch.randn(2, 5, H, dtype=dtype)
    backend = RecordingBackend()

    out = block_output(torch.compile(block, backend=backend, fullgraph=True), x)

    # fullgraph=True raises on a graph break; one graph, holding the experts as one op.
    assert len(backend.graphs) == 1
    assert backend.fused_experts_calls() == 1
    assert counters["moe_ops"]["hf_experts"] == 1 and counters["moe_ops"]["hf_experts_fallback"] == 0
    with torch.no_grad():
        expected = block_output(block, x)  # not compiling: transformers' own loop
    assert_close_rel(out, expected, dtype, f"{name} compiled vs eager")


@pytest.mark.parametrize("family", ["glm5_next", "hy_v4", "minimax_m3_vl", "deepseek_v4", "lfm2_moe"])
def test_other_families_eager_experts_run_fused_experts(family):
    """Experts loops whose activation is a class's own _apply_gate (clamped SiLU: GLM-5-Next, HY-V4,
    DeepSeek-V4; clamped SwiGLU without interleaving: MiniMax-M3-VL) or a plain function (LFM2-MoE's
    F.silu) run as fused_experts when compiled, with weights large enough that the clamps engage."""
    from hf_family_blocks import build_block

    _, block, config = build_block(family, experts_implementation="eager")
    torch.manual_seed(0)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    block = block.eval().requires_grad_(False)
    x = torch.randn(1, 10, config.hidden_size)
    limit = next((getattr(m, a) for m in block.modules() for a in ("swiglu_limit", "limit") if hasattr(m, a)), None)
    if limit is not None:  # some pre-activation lies beyond the clamp
        experts = block.experts
        pre = torch.einsum("th,efh->tef", x[0], experts.gate_up_proj)
        assert (pre.abs() > limit).any()
    out = block_output(torch.compile(block), x)
    assert counters["moe_ops"]["hf_experts"] == 1 and counters["moe_ops"]["hf_experts_fallback"] == 0
    assert_close_rel(out, block_output(block, x), torch.float32, f"{family} compiled vs eager")


def _changed_gate_up(self, gate_up):  # plain SwiGLU on GPT-OSS's interleaved halves: not its clamped one
    return torch.nn.functional.silu(gate_up[..., ::2]) * gate_up[..., 1::2]


@pytest.mark.parametrize("change", ["act_fn_hook", "act_fn_pre_hook", "global_hook", "instance_apply_gate",
                                    "class_apply_gate"])
def test_code_the_loop_runs_that_moe_ops_did_not_verify_keeps_the_loop(change, monkeypatch, caplog):
    """The eager loop runs what it finds at call time: hooks on its act_fn (its own, or one registered for every
    module), an _apply_gate set on the module, or one patched on the class after a first compile verified the
    class's. Each keeps the loop (the compiled block gives eager's result) instead of the fused_experts call
    verified for other code."""
    block = tiny_block("gpt_oss" if change.endswith("apply_gate") else "mixtral", torch.float32)
    experts = block.experts
    if change == "act_fn_hook":
        experts.act_fn.register_forward_hook(lambda module, inputs, out: out * 2)
    elif change == "global_hook":  # registered in a registry of the test's own, which monkeypatch puts back
        monkeypatch.setattr(torch.nn.modules.module, "_global_forward_hooks", collections.OrderedDict())
        torch.nn.modules.module.register_module_forward_hook(
            lambda module, inputs, out: out * 2 if module is experts.act_fn else None)
    elif change == "act_fn_pre_hook":
        experts.act_fn.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))
    elif change == "instance_apply_gate":
        experts._apply_gate = types.MethodType(_changed_gate_up, experts)
    else:
        torch.compile(block)(torch.randn(1, 4, H))  # verifies the class's own _apply_gate
        assert counters["moe_ops"]["hf_experts"] >= 1
        monkeypatch.setattr(type(experts), "_apply_gate", _changed_gate_up)
        torch._dynamo.reset()
        counters.clear()
    x = torch.randn(1, 10, H)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block_output(torch.compile(block), x)
    assert counters["moe_ops"]["hf_experts"] == 0 and counters["moe_ops"]["hf_experts_fallback"] >= 1
    assert_close_rel(out, block_output(block, x), torch.float32, change)


def _longcat_block() -> torch.nn.Module:
    """LongCat-Flash's MoE block at the test sizes with two zero-compute experts, weights ~N(0, 0.1)."""
    config = transformers.LongcatFlashConfig(hidden_size=H, expert_ffn_hidden_size=F, n_routed_experts=E,
                                             zero_expert_num=2, num_experts_per_tok=K, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    block = _modeling("longcat_flash").LongcatFlashMoE(config)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_longcat_zero_experts_run_as_fused_experts_plus_the_token(dtype, caplog):
    """LongCat-Flash's experts (no experts interface in transformers: its forward is its loop, which reads each
    expert id to the host) pick zero-compute experts beside the routed ones, which return the token times its
    weight. Compiled, the block is one graph: fused_experts over the routed experts plus each token times the
    weights of the zero experts it picked, the loop's result for tokens with no zero expert, one, or two."""
    block = _longcat_block()
    # The selection bias puts the two zero experts in close competition with the routed ones.
    block.router.e_score_correction_bias.copy_(torch.tensor([0.0] * E + [0.1, 0.1]))
    block = block.to(dtype).eval().requires_grad_(False)
    x = torch.randn(1, 32, H).to(dtype)
    zero_picked = (block.router(x.view(-1, H))[1] >= E).sum(-1)
    assert set(zero_picked.tolist()) == {0, 1, 2}, zero_picked  # every case of the identity term
    backend = RecordingBackend()
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = torch.compile(block, backend=backend, fullgraph=True)(x)
    assert len(backend.graphs) == 1 and backend.fused_experts_calls() == 1
    assert counters["moe_ops"]["hf_experts"] == 1 and counters["moe_ops"]["hf_experts_fallback"] == 0
    assert ("runs as moe_ops.fused_experts(activation='silu') plus the token times the weights of the zero-compute "
            "experts it picks") in caplog.text
    assert_close_rel(out, block(x), dtype, "LongCat-Flash compiled vs its loop")
    # The wrapped forward takes its arguments by name as the class's own does.
    rows = x.view(-1, H)
    weights, ids = block.router(rows)
    call = dict(hidden_states=rows, top_k_index=ids, top_k_weights=weights)
    got = torch.compile(block.experts, fullgraph=True)(**call)
    assert_close_rel(got, block.experts(**call), dtype, "LongCat-Flash's experts called by name")


@torch._inductor.config.patch(fx_graph_cache=False)  # a cached graph would skip the joint pass that is counted
def test_longcat_training_gradients_are_its_loops():
    """LongCat-Flash's block trained compiled (training rewrites on, the default): the input's, the router's and
    the experts' gradients are its loop's, with zero experts picked beside routed ones. Where every slot of a
    step picks a zero expert, the loop never touches the expert weights and eager leaves their .grad None; the
    compiled graph, which reads no id to the host, gives zeros (docs/index.md, Training)."""
    block = _longcat_block()
    block.train().requires_grad_(True)
    x = torch.randn(1, 32, H, requires_grad=True)
    grad_out = torch.randn(1, 32, H)

    def gradients(module):
        x.grad = None
        block.zero_grad(set_to_none=True)
        module(x).backward(grad_out)
        return {"x": x.grad, **{name: p.grad for name, p in block.named_parameters()}}

    compiled = torch.compile(block, fullgraph=True)
    for zero_bias, expert_grads in ((0.1, "equal"), (100.0, "zeros")):
        block.router.e_score_correction_bias.copy_(torch.tensor([0.0] * E + [zero_bias] * 2))
        picked_zero = (block.router(x.detach().view(-1, H))[1] >= E).sum(-1)
        assert set(picked_zero.tolist()) == ({0, 1, 2} if expert_grads == "equal" else {2}), picked_zero
        want, got = gradients(block), gradients(compiled)
        for name in want:
            if expert_grads == "zeros" and name.startswith("experts."):
                assert want[name] is None and torch.count_nonzero(got[name]) == 0, name
            else:
                assert_close_rel(got[name], want[name], torch.float32, f"LongCat-Flash {name}.grad")
    assert counters["moe_ops"]["joint_rewrite"] >= 1 and counters["moe_ops"]["hf_experts"] >= 1


def test_step3p7_experts_run_fused_experts_unless_they_clamp_after_the_activation(caplog):
    """Step-3.7's experts have no experts interface (their forward is their loop, GLM-5-Next's code) and an
    _apply_gate that clamps act_fn(gate) after the activation: with no limit (infinity, all but two layers of
    Step-3.7-Flash) that is the op's SiLU and the compiled block runs fused_experts; with a finite limit it is no
    op activation, and the block keeps its loop, the reason logged. Both equal the uncompiled loop."""
    from hf_family_blocks import build_block

    _, block, config = build_block("step3p7")
    torch.manual_seed(0)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    block = block.eval().requires_grad_(False)
    x = torch.randn(1, 10, config.hidden_size)
    assert block.experts.limit == float("inf")
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block_output(torch.compile(block), x)
    assert counters["moe_ops"]["hf_experts"] == 1 and counters["moe_ops"]["hf_experts_fallback"] == 0
    assert_close_rel(out, block_output(block, x), torch.float32, "step3p7 compiled vs its loop")

    torch._dynamo.reset()
    counters.clear()
    block.experts.limit = 0.5  # a finite limit, as Step-3.7-Flash's layers 43-44 have
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block_output(torch.compile(block), x)
    assert counters["moe_ops"]["hf_experts"] == 0 and counters["moe_ops"]["hf_experts_fallback"] >= 1
    assert "Step3p7Experts._apply_gate clamps act_fn(gate) after the activation (limit=0.5)" in caplog.text
    assert_close_rel(out, block_output(block, x), torch.float32, "step3p7 with a limit compiled vs its loop")


# Modules of their own code traced into one fused_experts call (hf_experts' OWN_BLOCKS and OWN_LOOP_EXPERTS): the
# log line each writes.
OWN_CODE_FAMILIES = {
    # The router reads the per-expert counts to the host (.tolist()) and the experts split the sorted tokens by
    # them: the routing is written without the host read, then the block's bias.
    "jetmoe": "JetMoeMoE: runs as moe_ops.fused_experts(activation='silu') after its router, then its bias",
    # One gated MLP per expert over slices of flat (E x F, H) weights, the down projection stored transposed:
    # views of those weights (the bf16 router stays as it is).
    "dbrx": "DbrxExperts: runs as moe_ops.fused_experts(activation='silu')",
    # Tokens sorted by expert with the counts read to the host, one matmul per expert over input-first weights:
    # the routing, then fused_experts over those weights (layout "EHF").
    "aria": "AriaExperts: runs as moe_ops.fused_experts(activation='silu') after its routing",
}


def test_own_code_classes_are_wrapped_from_the_modules_install_watches():
    """Each class of hf_experts' OWN_LOOP_EXPERTS and OWN_BLOCKS is defined in a modeling module that install.py
    registers on import (OWN_CODE_MODELING), and each such module defines one: the two lists name the same code.
    Each class's forward is then the wrapper, unwrapped to the class's own code."""
    install = importlib.import_module("moe_ops.lowering.install")
    wrapped = set(hf_experts.OWN_LOOP_EXPERTS) | set(hf_experts.OWN_BLOCKS)
    found = set()
    for module_name in install.OWN_CODE_MODELING:
        module = importlib.import_module(module_name)
        defined = {name for name in wrapped if name in vars(module)}
        assert defined, f"{module_name} defines no class moe_ops wraps"
        for name in defined:
            forward = vars(getattr(module, name))["forward"]
            assert forward.__code__ is hf_experts._REWRITTEN_FORWARD_CODE, name
            assert hf_experts.original_experts_forward(getattr(module, name)) is forward.__wrapped__
        found |= defined
    assert found == wrapped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", list(OWN_CODE_FAMILIES))
def test_own_code_blocks_run_as_one_graph_with_fused_experts(family, dtype, caplog):
    """JetMoE's block, DBRX's and Aria's experts: no experts interface in transformers, and host reads or slices
    in their code. Compiled, the block is one graph (fullgraph) with one fused_experts call and the block's result.
    Uncompiled, it is the block's own code."""
    from hf_family_blocks import build_block

    _, block, config = build_block(family)
    torch.manual_seed(0)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    block = block.to(dtype).eval().requires_grad_(False)
    x = torch.randn(2, 7, config.hidden_size if hasattr(config, "hidden_size") else config.d_model).to(dtype)
    backend = RecordingBackend()
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block_output(torch.compile(block, backend=backend, fullgraph=True), x)
    assert len(backend.graphs) == 1 and backend.fused_experts_calls() == 1
    assert counters["moe_ops"]["hf_experts"] == 1
    assert OWN_CODE_FAMILIES[family] in caplog.text
    assert_close_rel(out, block_output(block, x), dtype, f"{family} compiled vs its own code")


def test_privacy_filter_experts_run_fused_experts_in_fp32_only(caplog):
    """OpenAI privacy-filter's experts run GPT-OSS's loop with gate and up concatenated and every product in fp32
    whatever the model's dtype: an fp32 block compiles to fused_experts (clamped SwiGLU, weights large enough that
    the clamps engage) with the loop's result; a bf16 block keeps its loop, because fused_experts would round its
    activation to bf16 where the loop does not, and the log says so."""
    from hf_family_blocks import build_block

    _, block, config = build_block("openai_privacy_filter", experts_implementation="eager")
    torch.manual_seed(0)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    block = block.eval().requires_grad_(False)
    x = torch.randn(1, 10, config.hidden_size)
    experts = block.experts
    assert (torch.einsum("th,ehf->tef", x[0], experts.gate_up_proj).abs() > experts.limit).any()
    out = block_output(torch.compile(block), x)
    assert counters["moe_ops"]["hf_experts"] == 1 and counters["moe_ops"]["hf_experts_fallback"] == 0
    assert_close_rel(out, block_output(block, x), torch.float32, "privacy filter compiled vs its loop")

    torch._dynamo.reset()
    counters.clear()
    block = block.to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block_output(torch.compile(block), x.to(torch.bfloat16))
    assert counters["moe_ops"]["hf_experts"] == 0 and counters["moe_ops"]["hf_experts_fallback"] >= 1
    assert "(OpenAIPrivacyFilterExperts) multiplies in fp32 whatever the model's dtype" in caplog.text
    assert_close_rel(out, block_output(block, x.to(torch.bfloat16)), torch.bfloat16, "bf16: its own loop")


def test_wrapped_code_with_hooks_on_what_it_skips_runs_its_own_code(caplog):
    """transformers records router logits with a forward hook on JetMoE's router module, which the fused call
    does not run: with a hook there, the compiled block runs its own code (the hook is called) and says why."""
    from hf_family_blocks import build_block

    _, block, config = build_block("jetmoe")
    torch.manual_seed(0)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    block = block.eval().requires_grad_(False)
    seen = []
    block.router.register_forward_hook(lambda module, inputs, outputs: seen.append(outputs[4]))
    x = torch.randn(2, 7, config.hidden_size)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = torch.compile(block)(x)
    assert seen and counters["moe_ops"]["hf_experts"] == 0
    assert "JetMoeMoE: runs its own code, not moe_ops.fused_experts: its router has forward hooks" in caplog.text
    assert_close_rel(out, block(x), torch.float32, "JetMoE with a hooked router")


def test_dynamic_tokens_compile_once():
    block = tiny_block("mixtral", torch.float32)
    backend = RecordingBackend()
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    x = torch.randn(1, 5, H)
    torch._dynamo.mark_dynamic(x, 1)
    compiled(x)
    with torch.compiler.set_stance("fail_on_recompile"):
        for tokens in (2, 9, 33):  # 1 would recompile: dynamo specialises sizes 0 and 1
            x = torch.randn(1, tokens, H)
            assert_close_rel(compiled(x), block_output(block, x), torch.float32, f"T={tokens}")
    assert len(backend.graphs) == 1 and backend.fused_experts_calls() == 1


def test_eager_outside_compile_runs_transformers_loop(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("moe_ops.fused_experts called outside torch.compile for experts_implementation='eager'")

    monkeypatch.setattr(hf_experts, "fused_experts", fail)
    block = tiny_block("mixtral", torch.float32)
    with torch.no_grad():
        block_output(block, torch.randn(2, 5, H))
    assert not counters["moe_ops"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_moe_ops_implementation_in_eager_mode(name, dtype, monkeypatch):
    block = tiny_block(name, dtype)
    x = torch.randn(2, 5, H, dtype=dtype)
    with torch.no_grad():
        expected = block_output(block, x)
    calls = []

    def counted_fused_experts(*args, **kwargs):
        calls.append(kwargs)
        return fused_experts(*args, **kwargs)

    monkeypatch.setattr(hf_experts, "fused_experts", counted_fused_experts)
    set_experts_implementation(block, "moe_ops")

    with torch.no_grad():
        out = block_output(block, x)

    assert len(calls) == 1
    assert_close_rel(out, expected, dtype, f"{name} moe_ops vs eager")


def test_ungated_nemotron_h_experts():
    """NemotronH's experts have no gate (up_proj, act_fn, down_proj): relu and its default relu2 map onto
    fused_experts; an act_fn with no moe_ops activation (relu6) falls back."""
    nemotron_h = _modeling("nemotron_h")
    x, ids, weights = torch.randn(6, H), torch.randint(0, E, (6, K)), torch.rand(6, K)
    for act, fuses in (("relu", True), ("relu2", True), ("relu6", False)):
        config = transformers.NemotronHConfig(
            hidden_size=H, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K,
            mlp_hidden_act=act, experts_implementation="eager",
        )
        experts = nemotron_h.NemotronHExperts(config)
        with torch.no_grad():
            for parameter in experts.parameters():
                parameter.normal_(0.0, 0.1)
            expected = experts(x, ids, weights)
            config._experts_implementation = "moe_ops"
            counters.clear()
            out = torch.compile(experts, backend="eager")(x, ids, weights)
        assert counters["moe_ops"]["hf_experts" if fuses else "hf_experts_fallback"] >= 1, act
        assert_close_rel(out, expected, torch.float32, act)


def _expect_fallback(caplog, experts_class_name: str, reason: str) -> None:
    messages = [record.getMessage() for record in caplog.records if record.name == "moe_ops"]
    wanted = f"{experts_class_name}: runs its own loop, not moe_ops.fused_experts: {reason}"
    assert any(message.startswith(wanted) for message in messages), messages


def test_unknown_activation_falls_back_when_compiled(caplog):
    block = tiny_block("mixtral", torch.float32, hidden_act="quick_gelu")  # x * sigmoid(1.702 x): no moe_ops op
    x = torch.randn(2, 5, H)
    backend = RecordingBackend(run_graph_as_is)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block_output(torch.compile(block, backend=backend), x)

    assert backend.fused_experts_calls() == 0 and counters["moe_ops"]["hf_experts_fallback"] >= 1
    assert len(backend.graphs) > 1  # transformers' loop breaks the graph, as without moe_ops
    _expect_fallback(caplog, "MixtralExperts", "act_fn QuickGELUActivation has no moe_ops activation")
    assert_close_rel(out, block_output(block, x), torch.float32, "fallback")


class ShiftedGateGptOssExperts(gpt_oss.GptOssExperts):
    """A custom _apply_gate: the GPT-OSS loop calls it, so fused_experts' clamped SwiGLU would be wrong."""

    def _apply_gate(self, gate_up):
        return super()._apply_gate(gate_up) + 1.0


@moe_integration.use_experts_implementation
class DoubledMixtralExperts(mixtral.MixtralExperts):
    """A loop moe_ops has not verified (here: the Mixtral loop, doubled), in a decorated subclass."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return 2 * mixtral.MixtralExperts.forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)


@pytest.mark.parametrize(
    "experts_class, reason",
    [
        (ShiftedGateGptOssExperts,
         "its _apply_gate ShiftedGateGptOssExperts._apply_gate is not one moe_ops has verified"),
        (DoubledMixtralExperts, "its eager loop DoubledMixtralExperts.forward is not one moe_ops has verified"),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_unrecognised_code_falls_back(experts_class, reason, caplog):
    name = "gpt_oss" if issubclass(experts_class, gpt_oss.GptOssExperts) else "mixtral"
    block = tiny_block(name, torch.float32)
    experts = experts_class(block.experts.config)
    experts.load_state_dict(block.experts.state_dict())
    block.experts = experts
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        expected = block_output(block, x)
        set_experts_implementation(block, "moe_ops")
        with caplog.at_level(logging.INFO, logger="moe_ops"):
            out = block_output(block, x)
    _expect_fallback(caplog, experts_class.__name__, reason)
    assert torch.equal(out, expected)  # the same loop ran


@pytest.mark.parametrize("attribute, value", [("limit", -1.0), ("limit", float("nan")), ("alpha", float("inf"))],
                         ids=["negative_limit", "nan_limit", "inf_alpha"])
def test_clamp_constants_the_op_refuses_keep_the_loop(attribute, value, caplog):
    """GPT-OSS experts whose alpha or limit fused_experts refuses (torch's clamp returns its bound where min >
    max; a NaN limit or an infinite alpha makes NaN) keep their loop when compiled, the reason logged, and give
    the loop's result, NaN included, instead of failing to compile."""
    block = tiny_block("gpt_oss", torch.float32).eval().requires_grad_(False)
    setattr(block.experts, attribute, value)
    x = torch.randn(1, 7, H)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block_output(torch.compile(block), x)
    assert counters["moe_ops"]["hf_experts"] == 0 and counters["moe_ops"]["hf_experts_fallback"] >= 1
    _expect_fallback(caplog, "GptOssExperts",
                     "its GptOssExperts._apply_gate constants are none that fused_experts takes")
    expected = block_output(block, x)
    assert torch.equal(out.isnan(), expected.isnan())
    assert_close_rel(out.nan_to_num(), expected.nan_to_num(), torch.float32, f"{attribute}={value}")


def test_autocast_falls_back(caplog):
    block = tiny_block("mixtral", torch.float32)
    set_experts_implementation(block, "moe_ops")
    x = torch.randn(2, 5, H)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block_output(block, x)
        set_experts_implementation(block, "eager")
        expected = block_output(block, x)
    _expect_fallback(caplog, "MixtralExperts", "autocast is on")
    assert torch.equal(out, expected)


def test_switch_off_keeps_transformers_loop():
    moe_ops.config.transformers_eager_experts = False
    block = tiny_block("mixtral", torch.float32)
    x = torch.randn(2, 5, H)
    backend = RecordingBackend(run_graph_as_is)
    out = block_output(torch.compile(block, backend=backend), x)
    assert backend.fused_experts_calls() == 0 and len(backend.graphs) > 1
    assert not counters["moe_ops"]["hf_experts"]
    assert_close_rel(out, block_output(block, x), torch.float32, "switch off")


def test_disable_recompiles_without_reset():
    """Dynamo guards on moe_ops.config: after moe_ops.disable() the same compiled module retraces with
    transformers' loop. After moe_ops.enable() the experts run through fused_experts again, but in a graph of
    their own: the newest entry of the block's frame calls the experts module outside its graph and wins
    over the first one. torch._dynamo.reset() brings back the single graph."""
    block = tiny_block("mixtral", torch.float32)
    x = torch.randn(2, 5, H)
    backend = RecordingBackend(run_graph_as_is)
    compiled = torch.compile(block, backend=backend)
    compiled(x)
    assert backend.fused_experts_calls() == 1 and len(backend.graphs) == 1

    moe_ops.disable()
    out = block_output(compiled, x)
    assert backend.fused_experts_calls() == 1 and len(backend.graphs) > 2  # new graphs, broken, no fused_experts
    assert_close_rel(out, block_output(block, x), torch.float32, "disabled")

    moe_ops.enable()
    out = block_output(compiled, x)
    assert backend.fused_experts_calls() == 2
    assert_close_rel(out, block_output(block, x), torch.float32, "enabled again")

    torch._dynamo.reset()
    backend.graphs.clear()
    block_output(compiled, x)
    assert backend.fused_experts_calls() == 1 and len(backend.graphs) == 1


def test_grouped_mm_experts_keep_their_graphs_across_switches():
    """transformers' default experts ("grouped_mm") over plain weights read no moe_ops switch while dynamo traces
    them: a block compiled (and warmed up) inside rewrites_disabled() keeps its graph outside it, rewrite-free, and
    flipping transformers_quantised_experts recompiles nothing (both recompiled before: demo.py's baseline then
    timed moe_ops' graph)."""
    block = tiny_block("mixtral", torch.float32, experts_implementation="grouped_mm")
    x = torch.randn(2, 5, H)
    backend = RecordingBackend(run_graph_as_is)
    compiled = torch.compile(block, backend=backend)
    with moe_ops.rewrites_disabled():
        block_output(compiled, x)
    graphs = len(backend.graphs)
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            out = block_output(compiled, x)
            moe_ops.config.transformers_quantised_experts = False
            block_output(compiled, x)
    finally:
        moe_ops.config.transformers_quantised_experts = True
    assert len(backend.graphs) == graphs and backend.fused_experts_calls() == 0
    assert_close_rel(out, block_output(block, x), torch.float32, "compiled without the rewrites")


def test_original_forward_of_decorated_subclass():
    """A decorated class derived from a decorated class wraps its parent's dispatching forward; "eager"
    must reach the parent's loop once, not dispatch back into itself."""

    @moe_integration.use_experts_implementation
    class DerivedMixtralExperts(mixtral.MixtralExperts):
        pass

    assert hf_experts.original_experts_forward(DerivedMixtralExperts) is mixtral.MixtralExperts.forward.__wrapped__
    block = tiny_block("mixtral", torch.float32)
    x, ids, weights = torch.randn(6, H), torch.randint(0, E, (6, K)), torch.rand(6, K)
    derived = DerivedMixtralExperts(block.experts.config)
    derived.load_state_dict(block.experts.state_dict())
    with torch.no_grad():
        assert torch.equal(derived(x, ids, weights), block.experts(x, ids, weights))


def test_registration_is_idempotent_and_validated_by_transformers():
    moe_ops.enable()
    moe_ops.enable()
    interface = moe_integration.ALL_EXPERTS_FUNCTIONS
    assert interface["moe_ops"] is hf_experts.moe_ops_experts_forward
    assert interface["eager"] is hf_experts.eager_experts_forward
    config = transformers.MixtralConfig(
        vocab_size=32, hidden_size=H, intermediate_size=F, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=K,
    )
    model = transformers.MixtralForCausalLM._from_config(config, experts_implementation="moe_ops")
    assert model.config._experts_implementation == "moe_ops"


@pytest.mark.cuda
@pytest.mark.whole_gpu
def test_mixtral_8x7b_shapes_compiled_on_gpu():
    """Mixtral-8x7B's expert shapes, bf16, a few tokens: compiled "eager" runs the Triton kernels."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        experts_implementation="eager",
    )
    with torch.device("cuda"), torch.no_grad():
        block = mixtral.MixtralSparseMoeBlock(config)
        for parameter in block.parameters():
            parameter.normal_(0.0, 0.02)
    block = block.to(torch.bfloat16)
    x = torch.randn(1, 16, 4096, device="cuda", dtype=torch.bfloat16)
    backend = RecordingBackend()
    with torch.no_grad():
        out = torch.compile(block, backend=backend, fullgraph=True)(x)
        expected = block(x)
    assert len(backend.graphs) == 1 and backend.fused_experts_calls() == 1
    assert_close_rel(out, expected, torch.bfloat16, "Mixtral-8x7B shapes")


def test_training_backward_through_fused_experts():
    """Training under torch.compile: the traced fused_experts brings its autograd formula, and the
    gradients (input, router, expert weights) match transformers' own loop run uncompiled."""
    block = tiny_block("mixtral", torch.float32).train()
    x = torch.randn(2, 5, H, requires_grad=True)
    upstream = torch.randn(2, 5, H)

    (block_output(torch.compile(block, fullgraph=True), x) * upstream).sum().backward()
    compiled_grads = [x.grad, *(p.grad for p in block.parameters())]
    assert counters["moe_ops"]["hf_experts"] >= 1 and counters["moe_ops"]["hf_experts_fallback"] == 0

    x.grad = None
    block.zero_grad(set_to_none=True)
    (block_output(block, x) * upstream).sum().backward()
    expected_grads = [x.grad, *(p.grad for p in block.parameters())]
    for index, (got, want) in enumerate(zip(compiled_grads, expected_grads, strict=True)):
        assert_close_rel(got, want, torch.float32, f"gradient {index}")


def test_compiled_torch_func_grad_runs_transformers_loop():
    """torch.compile(torch.func.grad(f)) over a block: torch.func's reverse mode cannot differentiate a custom op
    (torch raises about autograd.Function's setup_context), so under a functorch transform the "eager" experts run
    transformers' own loop, compiled, and give the uncompiled grad's gradients; the same function compiled
    without the transform still runs fused_experts."""
    block = tiny_block("mixtral", torch.float32)
    parameters = {name: p.detach() for name, p in block.named_parameters()}
    x = torch.randn(2, 5, H)

    def loss(parameters, x):
        out = torch.func.functional_call(block, parameters, (x,))
        return (out[0] if isinstance(out, tuple) else out).pow(2).sum()

    want = torch.func.grad(loss)(parameters, x)
    got = torch.compile(torch.func.grad(loss))(parameters, x)
    assert counters["moe_ops"]["hf_experts"] == 0
    for name in want:
        assert_close_rel(got[name], want[name], torch.float32, name)
    torch._dynamo.reset()  # dynamo may reuse the frames it compiled under the transform (correct, unrewritten)
    torch.compile(loss)(parameters, x)
    assert counters["moe_ops"]["hf_experts"] == 1


def _fp8_experts(block: int, **config_overrides):
    """transformers' fine-grained FP8 experts module (as its quantiser builds it), H = 256 and F = 128 so that
    ``block`` x ``block`` tiles divide its weights, holding random weights quantised to fp8 in those tiles."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts

    from moe_ops.quantised import quantise_blocks

    config = transformers.Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=E,
                                         num_experts_per_tok=K, **config_overrides)
    experts_class = moe_integration.use_experts_implementation(
        experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS, has_bias=False, has_gate=True)
    experts = experts_class(config=config, block_size=[block, block], activation_scheme="dynamic",
                            scale_fmt="float", has_bias=False, has_gate=True)
    torch.manual_seed(0)
    for name, shape in (("gate_up_proj", (E, 256, 256)), ("down_proj", (E, 256, 128))):
        values, scale = quantise_blocks(torch.randn(shape) / shape[2] ** 0.5, block)
        setattr(experts, name, torch.nn.Parameter(values, requires_grad=False))
        setattr(experts, f"{name}_scale_inv", torch.nn.Parameter(scale, requires_grad=False))
    return experts


def test_transformers_fp8_experts_run_as_fused_experts(caplog):
    """transformers' fine-grained FP8 experts (DeepSeek-V3-style checkpoints: fp8 weights in 128 x 128 tiles,
    inputs quantised per token and group of 128 on the fly) with experts_implementation "moe_ops" (and
    "eager" under torch.compile): fused_experts(input_quantisation="fp8_groupwise") over the stored weights and
    scales, equal to the written-out computation of transformers' loop; the log says so."""
    from moe_ops.quantised import dequantise, sqnr_db

    experts = _fp8_experts(128)
    experts.config._experts_implementation = "moe_ops"
    x = torch.randn(11, 256).to(torch.bfloat16)
    weights, ids = moe_ops.route(torch.randn(11, E), K, renormalize=True)
    weights = weights.to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = experts(x, ids, weights)
    assert any("quantised=float8_e4m3fn in 128 x 128 blocks, inputs fp8_groupwise)" in record.getMessage()
               for record in caplog.records)

    def fp8_linear(rows, weight, scale):  # fp8_linear written out: inputs in groups of 128, weights in tiles
        grouped = rows.float().unflatten(-1, (-1, 128))
        row_scale = grouped.abs().amax(-1, keepdim=True) / 448
        inputs = ((grouped / row_scale).to(torch.float8_e4m3fn).float() * row_scale).flatten(-2)
        return (inputs @ dequantise(weight[None], scale[None])[0].T).to(rows.dtype)

    want = torch.zeros(11, 256)
    for t in range(11):
        for j, e in enumerate(ids[t].tolist()):
            gate, up = fp8_linear(x[t:t + 1], experts.gate_up_proj[e], experts.gate_up_proj_scale_inv[e]).chunk(2, -1)
            h = torch.nn.functional.silu(gate) * up
            y = fp8_linear(h, experts.down_proj[e], experts.down_proj_scale_inv[e])
            want[t] += (y * weights[t, j]).float()[0]
    # transformers rounds gate and up to bf16 before the activation, the op rounds the activation once; where
    # that moves an element of it across an fp8 rounding boundary the two differ by a step of fp8 (1/8): close
    # in the worst element, tens of dB closer than fp8's own error on the whole.
    want = want.to(torch.bfloat16)
    assert ((out.float() - want.float()).abs().max() / want.float().abs().max()).item() <= 6e-2
    assert sqnr_db(want, out) >= 30.0
    experts.config._experts_implementation = "eager"
    backend = RecordingBackend()
    torch.testing.assert_close(torch.compile(experts, backend=backend, fullgraph=True)(x, ids, weights), out,
                               rtol=2e-2, atol=2e-2)
    assert backend.fused_experts_calls() == 1 and counters["moe_ops"]["hf_experts"] == 1


@pytest.mark.parametrize("gate_config", [{}, {"swiglu_limit": 5.0}, {"swiglu_alpha": 1.5, "swiglu_limit": 6.0},
                                         {"swiglu_alpha": 1.5}], ids=["act_fn", "limit", "swiglu", "swiglu-no-limit"])
def test_transformers_fp8_experts_gate_maps_to_the_op_activation(gate_config):
    """Each branch of FP8Experts._apply_gate (SwiGLU-OAI with swiglu_alpha, act_fn clamped by limit, plain
    act_fn) maps to the fused_experts activation that computes it, checked on values past the limits; the
    SwiGLU branch without a limit (no clamp at all) maps to none, and the reason says so."""
    from moe_ops.activations import activate_ref

    experts = _fp8_experts(128, **gate_config)
    arguments = hf_experts.fp8_experts_arguments(experts, torch.randn(3, 256))
    if "swiglu_alpha" in gate_config and "swiglu_limit" not in gate_config:
        assert arguments == "its swiglu_limit is None: clamped_swiglu without a limit is no moe_ops activation"
        return
    assert isinstance(arguments, dict), arguments
    gate_up = 4 * torch.randn(64, 2 * 128, dtype=torch.float64)  # beyond the limits of 5 and 6
    gate, up = gate_up.chunk(2, -1)
    want = experts._apply_gate(gate_up)
    got = activate_ref(gate, up, arguments["activation"], arguments["alpha"], arguments["limit"])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), arguments["activation"]


def test_transformers_fp8_experts_that_are_not_the_op_run_their_own_loop(caplog, monkeypatch):
    """FP8 experts whose tiles do not divide the weights, or whose activations take fixed scales, keep
    transformers' loop (its fp8_linear replaced here by a recording stand-in: its kernels need a GPU), and the
    log names the reason."""
    from transformers.integrations import finegrained_fp8

    calls = []

    def recording_fp8_linear(rows, weight, *args, **kwargs):
        calls.append(weight.shape)
        return rows.new_zeros(rows.shape[0], weight.shape[0])

    monkeypatch.setattr(finegrained_fp8, "fp8_linear", recording_fp8_linear)
    cases = {"activation_scale": ("static", "fixed activation scales are no moe_ops input quantisation"),
             "blocks": ("dynamic", "is no fp8 weight in whole 128 x 128 blocks")}
    for case, (scheme, reason) in cases.items():
        experts = _fp8_experts(64)
        experts.activation_scheme = scheme
        if scheme == "static":  # one fixed input scale per expert, as FP8Experts allocates them for it
            for name in ("gate_up_proj", "down_proj"):
                setattr(experts, f"{name}_activation_scale", torch.nn.Parameter(torch.ones(E)))
        experts.block_size = [128, 128] if case == "blocks" else [64, 64]
        experts.config._experts_implementation = "moe_ops"
        calls.clear()
        with caplog.at_level(logging.INFO, logger="moe_ops"):
            experts(torch.randn(5, 256).to(torch.bfloat16), torch.zeros(5, K, dtype=torch.long),
                    torch.ones(5, K, dtype=torch.bfloat16))
        assert any(reason in record.getMessage() for record in caplog.records), case
        assert calls == [(256, 256), (256, 128)], case  # the loop's two linears of the one expert hit
