"""moe_ops.quantise_experts (lowering/quantise_experts.py): transformers' expert weights stored in moe_ops'
own quantised forms (int4 in groups, fp8 in tiles), run as moe_ops.fused_experts eager and compiled, equal
to the block of their dequantised weights; the state dict round-trips."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from compile_harness import compile_and_record, fresh_compile_state  # noqa: F401  (fixture)
from conftest import assert_close_rel
from torch._dynamo.utils import counters

import moe_ops
from moe_ops.quantised import dequantise

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

H, F, E, K = 64, 32, 8, 2


def _block(family: str = "qwen3_moe", seed: int = 0):
    torch.manual_seed(seed)
    if family == "gpt_oss":
        block = GptOssMLP(transformers.GptOssConfig(hidden_size=H, intermediate_size=F, num_local_experts=E,
                                                    num_experts_per_tok=K, experts_implementation="eager"))
    else:
        block = Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(
            hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
            experts_implementation="eager"))
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0.0, 0.1)
    return block.to(torch.bfloat16).eval().requires_grad_(False)


def _output(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def _dequantised_twin(block, family):
    """The unquantised block holding ``block``'s dequantised expert weights (in its own layout)."""
    twin = _block(family)
    experts = block.experts
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            weight = dequantise(getattr(experts, name), getattr(experts, f"{name}_scale"),
                                getattr(experts, f"{name}_zero", None))
            getattr(twin.experts, name).copy_(weight.transpose(1, 2) if twin.experts.is_transposed else weight)
    return twin


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("family,scheme", [("qwen3_moe", "int4"), ("qwen3_moe", "fp8_blocks"), ("gpt_oss", "int4")])
def test_quantised_experts_run_as_fused_experts(family, scheme, caplog):
    """The stored values, scales (and zero points) replace the weights; the block runs as fused_experts,
    eager and compiled, and gives the result of its dequantised weights (GPT-OSS: transposed, interleaved,
    biased, clamped SwiGLU; stored (E, N, K) all the same)."""
    block = moe_ops.quantise_experts(_block(family), scheme, group_size=32)
    experts = block.experts
    packed = scheme == "int4"
    assert experts.gate_up_proj.dtype == (torch.uint8 if packed else torch.float8_e4m3fn)
    assert experts.gate_up_proj.shape == (E, 2 * F, H // 2 if packed else H)
    assert experts.gate_up_proj_scale.shape == ((E, 2 * F, H // 32) if packed else (E, 2 * F // 32, H // 32))
    assert hasattr(experts, "down_proj_zero") == packed
    x = torch.randn(1, 9, H, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = _output(block, x)
    label = "int4 in groups of 32" if packed else "float8_e4m3fn in 32 x 32 blocks"
    assert any(f"quantised={label})" in record.getMessage() for record in caplog.records), caplog.text
    twin = _dequantised_twin(block, family)
    twin.experts.config._experts_implementation = "eager"  # transformers' own loop
    assert_close_rel(out, _output(twin, x), torch.bfloat16, "dequantised block")
    result, graph = compile_and_record(block, x)
    assert counters["moe_ops"]["hf_experts"] == 1 and "moe_ops.fused_experts" in graph
    assert_close_rel(result[0] if isinstance(result, tuple) else result, out, torch.bfloat16, "compiled")


def test_state_dict_round_trip():
    """A model quantised the same way loads a quantised state dict: the same values and the same output."""
    block = moe_ops.quantise_experts(_block(), "int4", group_size=32)
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    restored = moe_ops.quantise_experts(_block(seed=7), "int4", group_size=32)  # other weights until loaded
    x = torch.randn(1, 5, H).to(torch.bfloat16)
    assert not torch.allclose(_output(restored, x), _output(block, x))
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.experts.gate_up_proj, block.experts.gate_up_proj)
    torch.testing.assert_close(_output(restored, x), _output(block, x))


def test_a_call_fused_experts_cannot_take_raises_the_reason():
    """The module's own loop cannot multiply packed values: where fused_experts cannot take a call (here
    under autocast), the call raises the reason instead of running the loop."""
    block = moe_ops.quantise_experts(_block(), "int4", group_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast is on"):
        block(torch.randn(1, 5, H))


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_another_experts_implementation_is_refused(implementation):
    """Set back to one of transformers' implementations, the module would multiply the packed values as if they
    were the weights (opaque shape and dtype errors): the call names the weights' form and the implementation."""
    block = moe_ops.quantise_experts(_block(), "int4", group_size=32)
    block.experts.config._experts_implementation = implementation  # the module's own config, set by hand
    with pytest.raises(RuntimeError, match=rf"moe_ops-quantised \(int4 in groups of 32\), which only the 'moe_ops' "
                                           rf"experts implementation \(moe_ops.fused_experts\) reads; the model's "
                                           rf"config asks for "
                                           rf"'{implementation}'"):
        block(torch.randn(1, 5, H).to(torch.bfloat16))


def test_models_sharing_the_config_keep_their_implementation():
    """The experts implementation lives in a config the whole model shares, often with other models (a reference
    or teacher built from the same config object): quantise_experts sets "moe_ops" on a copy of it, so the other
    model keeps running its own float weights, the model's config is unchanged, and the model's
    set_experts_implementation leaves the quantised experts (whose packed values no other implementation reads)
    on moe_ops."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=H, intermediate_size=F, moe_intermediate_size=F, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=E, num_experts_per_tok=K,
        experts_implementation="grouped_mm")
    torch.manual_seed(0)
    reference = transformers.Qwen3MoeForCausalLM(config).eval()
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    model.load_state_dict(reference.state_dict())
    moe_ops.quantise_experts(model, "int4", group_size=32)
    layers = [layer.mlp.experts for layer in model.model.layers]
    assert [experts.config._experts_implementation for experts in layers] == ["moe_ops", "moe_ops"]
    assert layers[0].config is layers[1].config and layers[0].config is not config  # one copy for its sharers
    assert config._experts_implementation == "grouped_mm" and model.config is config
    assert reference.model.layers[0].mlp.experts.config._experts_implementation == "grouped_mm"
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits  # its float weights, through transformers' grouped_mm
        quantised = model(input_ids=ids).logits
        model.set_experts_implementation("eager")
        assert layers[0].config._experts_implementation == "moe_ops"
        torch.testing.assert_close(model(input_ids=ids).logits, quantised)
    # int4 in groups of 32 of N(0, 0.02) weights: close to the float model, not equal to it
    assert 0 < (quantised - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.parametrize("scheme", ["int4", "fp8_blocks"])
def test_a_cast_after_quantising_is_named(scheme):
    """model.to(bf16) after quantise_experts converts the fp32 scales (and fp8 values): the call says so."""
    block = moe_ops.quantise_experts(_block(), scheme, group_size=32).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"a cast after it \(model.to\(dtype\)\) converts fp8 values and fp32"):
        block(torch.randn(1, 5, H).to(torch.bfloat16))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="scheme: expected one of"):
        moe_ops.quantise_experts(_block(), "int3")
    with pytest.raises(ValueError, match="scheme: 'fp8_blocks' tiles would mix the interleaved gate and up rows"):
        moe_ops.quantise_experts(_block("gpt_oss"), "fp8_blocks", group_size=32)
    with pytest.raises(ValueError, match="model: no transformers experts module"):
        moe_ops.quantise_experts(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"model: its experts are quantised already \(int4 in groups of 32\)"):
        moe_ops.quantise_experts(moe_ops.quantise_experts(_block(), "int4", group_size=32))
    # Values of one byte (a checkpoint's fp8 weights, whose scales live elsewhere) are no float weights either.
    fp8_block = _block()
    fp8_block.experts.down_proj.data = fp8_block.experts.down_proj.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"model: Qwen3MoeExperts.down_proj is quantised already "
                                         r"\(torch.float8_e4m3fn values\); quantise_experts takes float"):
        moe_ops.quantise_experts(fp8_block)
    assert not hasattr(fp8_block.experts, "gate_up_proj_scale")  # nothing changed
    with pytest.raises(ValueError, match=r"group_size: 64 does not fit Qwen3MoeExperts.down_proj \(E, N, K\) = "
                                         r"\(8, 64, 32\): expected at least 16, dividing N=64 and K=32"):
        moe_ops.quantise_experts(_block(), "fp8_blocks", group_size=64)
    with pytest.raises(ValueError, match=r"group_size: 24 does not fit Qwen3MoeExperts.gate_up_proj \(E, N, K\) = "
                                         r"\(8, 64, 64\): expected a multiple of 16 dividing K=64"):
        moe_ops.quantise_experts(_block(), "int4", group_size=24)
    # Groups of 64 divide the gate_up weights' 64 inputs, not down's 32: nothing is changed.
    block = _block()
    with pytest.raises(ValueError, match=r"group_size: 64 does not fit Qwen3MoeExperts.down_proj .*: expected a "
                                         r"multiple of 16 dividing K=32, got 64"):
        moe_ops.quantise_experts(block, "int4", group_size=64)
    assert block.experts.gate_up_proj.dtype == torch.bfloat16 and not hasattr(block.experts, "gate_up_proj_scale")
