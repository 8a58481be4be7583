"""moe_ops.experts_quantization_config: torchao quantises transformers' stacked expert weights (which
quantize_'s default filter skips) and nothing else; the quantised block runs, compiles with moe_ops to
torchao's own eager result with fused_experts reading the stored fp8 values (no dequantised copy), and its
state dict round-trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from compile_harness import compile_and_record, fresh_compile_state  # noqa: F401  (fixture)
from torch._dynamo.utils import counters

import moe_ops
from moe_ops.quantised import sqnr_db

torchao = pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

H, F, E, K = 64, 32, 8, 2


def _block():
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(
        hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True))
    block.experts.config._experts_implementation = "grouped_mm"
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return block.to(torch.bfloat16).eval().requires_grad_(False)


def _quantised():
    block = _block()
    quantize_(block, moe_ops.experts_quantization_config(Float8WeightOnlyConfig()), filter_fn=None)
    return block


def test_the_experts_and_only_they_are_quantised():
    block = _quantised()
    for name in ("gate_up_proj", "down_proj"):
        assert type(getattr(block.experts, name)).__name__ == "Float8Tensor", name
    assert type(block.gate.weight) is torch.nn.Parameter and block.gate.weight.dtype == torch.bfloat16
    # quantize_'s default filter (linear layers only) leaves the experts as they were: why the helper exists.
    plain = _block()
    quantize_(plain, Float8WeightOnlyConfig())
    assert plain.experts.gate_up_proj.dtype == torch.bfloat16 and type(plain.experts.gate_up_proj) is torch.nn.Parameter


@pytest.fixture
def graph_passes_only():
    """transformers' grouped_mm over torchao weights left to dynamo (config.transformers_quantised_experts off):
    what the graph passes make of torchao's own weight-only path."""
    moe_ops.config.transformers_quantised_experts = False
    yield
    moe_ops.config.transformers_quantised_experts = True


@pytest.mark.usefixtures("fresh_compile_state", "graph_passes_only")
def test_quantised_block_compiles_to_torchaos_result():
    """fp8 weight-only experts: torchao's eager block stays within fp8's error of bf16 (SQNR), and the
    block compiled with moe_ops gives torchao's eager result. Traced as torchao's own path (transformers'
    grouped_mm over the dequantised weights), its experts are rewritten to fused_experts, which reads the
    stored fp8 values and their per-row scales (layout EFH): the graph holds no dequantisation of the expert
    weights (torchao's own weight-only path dequantises them on every call)."""
    x = torch.randn(1, 12, H, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    reference = _block()(x)
    block = _quantised()
    want = block(x)
    assert sqnr_db(reference, want) >= 25.0
    # No cache of any kind (the FX graph's, AOTAutograd's for subclass inputs): the passes must run.
    with torch._inductor.config.patch(force_disable_caches=True):
        got, graph = compile_and_record(block, x)
    error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert error <= 2e-2, error
    assert counters["moe_ops"]["experts_rewrite"] == 1 and counters["moe_ops"]["route_rewrite"] == 1
    assert counters["moe_ops"]["quantised_weights_rewrite"] == 1
    # The router's scores and the routing weights' cast are the only conversions left; the weights' scales
    # are squeezed to (E, N) views.
    conversions = "\n".join(line for line in graph.splitlines() if "convert_element_type" in line or "squeeze" in line
                           or "fused_experts" in line)
    assert conversions == (
        "prims.convert_element_type.default(torch.bfloat16)\n"
        "aten.squeeze.dim(-1)\n"
        "aten.squeeze.dim(-1)\n"
        "moe_ops.fused_experts.default(None, None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, "
        "'position', None, None, None, None, 'none')"  # no w_up's scale; no zero points; inputs as they are
    ), graph


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("config", [Int8WeightOnlyConfig, Float8WeightOnlyConfig, "int8-g32", "fp8-dynamic"],
                         ids=["int8", "fp8", "int8-g32", "fp8-dynamic"])
def test_transformers_implementations_over_torchao_weights_compile_to_fused_experts(config, implementation):
    """transformers' grouped_mm and batched_mm experts over torchao's tensors, compiled: fused_experts over the
    stored values and scales (fp8 inputs per row for the dynamic-activation tensors, which torchao would
    multiply with _scaled_grouped_mm; int8, which torchao 0.18 cannot run there: no transpose), the result of
    the "moe_ops" implementation over the same tensors; uncompiled, transformers' own implementation runs."""
    from torchao.quantization.granularity import PerGroup

    if config == "fp8-dynamic":
        block = _fp8_dynamic_block()
    else:
        block = _block()
        torchao_config = Int8WeightOnlyConfig(granularity=PerGroup(32)) if config == "int8-g32" else config()
        quantize_(block, moe_ops.experts_quantization_config(torchao_config), filter_fn=None)
    x = torch.randn(1, 12, H, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    block.experts.config._experts_implementation = "moe_ops"
    want = block(x)
    block.experts.config._experts_implementation = implementation
    if config is Float8WeightOnlyConfig and implementation == "grouped_mm":
        # Uncompiled: torchao's own path (its fp8 tensors take grouped_mm, not batched_mm's indexing), within
        # fp8's error of moe_ops'.
        assert sqnr_db(want, block(x)) >= 25.0
    with torch._inductor.config.patch(force_disable_caches=True):
        got, graph = compile_and_record(block, x)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert counters["moe_ops"]["hf_experts"] == 1 and counters["moe_ops"]["quantised_weights_rewrite"] == 0
    experts_call = next(line for line in graph.splitlines() if "fused_experts" in line)
    assert experts_call.endswith("'fp8_rowwise')" if config == "fp8-dynamic" else "'position', None)")
    assert "aten.mul" not in graph and "_scaled_grouped_mm" not in graph


@pytest.mark.usefixtures("fresh_compile_state")
def test_an_apply_gate_grouped_mm_applies_and_the_loop_does_not_keeps_grouped_mm(caplog):
    """A class whose eager loop applies act_fn(gate) * up but whose _apply_gate (what transformers' grouped_mm
    applies) is another gate: grouped_mm over its torchao weights is not the loop moe_ops verified, so it runs
    as transformers' grouped_mm, with the reason logged, and gives that implementation's result."""
    import logging

    block = _quantised()

    class DoubledGate(type(block.experts)):
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return 2 * self.act_fn(gate) * up

    block.experts.__class__ = DoubledGate
    x = torch.randn(1, 12, H, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    want = block(x)
    with caplog.at_level(logging.INFO, logger="moe_ops"), torch._inductor.config.patch(force_disable_caches=True):
        got, _ = compile_and_record(block, x)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert counters["moe_ops"]["hf_experts"] == 0 and counters["moe_ops"]["hf_experts_fallback"] == 1
    assert any("runs transformers' grouped_mm_experts_forward, not moe_ops.fused_experts: its _apply_gate"
               in record.getMessage() for record in caplog.records)


def _dequantised_twin(block):
    """The bf16 block whose expert weights are ``block``'s dequantised ones."""
    twin = _block()
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(twin.experts, name).copy_(getattr(block.experts, name).dequantize())
    return twin


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("config", [Int8WeightOnlyConfig, Float8WeightOnlyConfig, "int8-g32"],
                         ids=["int8", "fp8", "int8-g32"])
def test_weight_only_experts_run_as_fused_experts_over_the_stored_values(config, caplog):
    """experts_implementation="moe_ops" with torchao's weight-only tensors (int8 / fp8 per row, int8 in groups
    of 32 input features): fused_experts reads their stored values and scales, in eager mode (where torchao
    0.18's int8 tensors cannot run transformers' experts: no transpose) and compiled into one graph, giving
    the dequantised weights' result; the log says so."""
    import logging

    from torchao.quantization.granularity import PerGroup

    block = _block()
    torchao_config = Int8WeightOnlyConfig(granularity=PerGroup(32)) if config == "int8-g32" else config()
    quantize_(block, moe_ops.experts_quantization_config(torchao_config), filter_fn=None)
    block.experts.config._experts_implementation = "moe_ops"
    x = torch.randn(1, 12, H, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block(x)
    want = _dequantised_twin(block)(x)
    assert ((out.float() - want.float()).abs().max() / want.float().abs().max()).item() <= 2e-2
    scheme = {Int8WeightOnlyConfig: "int8 per row", Float8WeightOnlyConfig: "float8_e4m3fn per row"}.get(
        config, "int8 in groups of 32")
    assert any(f"quantised={scheme})" in record.getMessage() for record in caplog.records)
    with torch._inductor.config.patch(force_disable_caches=True):
        got, graph = compile_and_record(block, x)
    torch.testing.assert_close(got, out, rtol=2e-2, atol=2e-2)
    assert counters["moe_ops"]["hf_experts"] == 1
    experts_call = next(line for line in graph.splitlines() if "fused_experts" in line)
    assert experts_call.endswith("'position', None)")  # the scales' arguments: the stored values are read
    assert "aten.mul" not in graph  # no dequantisation


@pytest.mark.usefixtures("fresh_compile_state")
def test_asymmetric_int8_weights_keep_their_zero_points():
    """torchao's int8 tensors quantised with an asymmetric mapping (``Int8Tensor.from_hp(..., mapping_type=
    ASYMMETRIC)``: zero points not 0): fused_experts takes the zero points too and gives the dequantised weights'
    result, eager and compiled (it read the values and scales alone: 67% off)."""
    from torchao.quantization import PerRow
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    def asymmetric_block():
        block = _block()
        for name in ("gate_up_proj", "down_proj"):
            shifted = getattr(block.experts, name) + 0.05  # a range off centre: zero points not 0
            quantised = Int8Tensor.from_hp(shifted, PerRow(), mapping_type=MappingType.ASYMMETRIC)
            assert (quantised.zero_point != 0).float().mean() > 0.5
            setattr(block.experts, name, torch.nn.Parameter(quantised, requires_grad=False))
        block.experts.config._experts_implementation = "moe_ops"
        return block

    block = asymmetric_block()
    x = torch.randn(1, 12, H, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = _dequantised_twin(block)(x)
    out = block(x)
    assert ((out.float() - want.float()).abs().max() / want.float().abs().max()).item() <= 2e-2
    with torch.inference_mode():  # a server's way: weights made and run under inference mode (no versions)
        torch.testing.assert_close(asymmetric_block()(x), out)
    with torch._inductor.config.patch(force_disable_caches=True):
        got, graph = compile_and_record(block, x)
    assert counters["moe_ops"]["hf_experts"] == 1
    torch.testing.assert_close(got, out, rtol=2e-2, atol=2e-2)


def test_a_loaded_state_dict_with_other_zero_points_is_read():
    """A block run once over symmetric int8 weights (zero points of 0: the form without them), then loaded with an
    asymmetric checkpoint: the next eager call takes the loaded zero points (torchao's copy_ writes them below
    autograd, so they count no version of their own; a cache keyed by them kept the old answer: 80% off), also
    under inference mode."""
    from torchao.quantization import PerRow
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    def int8_block(shift, mapping):
        block = _block()
        for name in ("gate_up_proj", "down_proj"):
            quantised = Int8Tensor.from_hp(getattr(block.experts, name) + shift, PerRow(), mapping_type=mapping)
            setattr(block.experts, name, torch.nn.Parameter(quantised, requires_grad=False))
        block.experts.config._experts_implementation = "moe_ops"
        return block

    block, checkpoint = int8_block(0.0, MappingType.SYMMETRIC), int8_block(0.05, MappingType.ASYMMETRIC)
    x = torch.randn(1, 12, H, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        block(x)
        assert not block.experts.gate_up_proj.zero_point.any()
        block.load_state_dict(checkpoint.state_dict())
        assert block.experts.gate_up_proj.zero_point.any()
        want = _dequantised_twin(block)(x)
        out = block(x)
    assert ((out.float() - want.float()).abs().max() / want.float().abs().max()).item() <= 2e-2
    # The same written under inference mode (copy_: its load_state_dict refuses torchao's tensors), whose tensors
    # count no writes: their zero points are always taken.
    with torch.inference_mode():
        block = int8_block(0.0, MappingType.SYMMETRIC)
        block(x)
        for name in ("gate_up_proj", "down_proj"):
            getattr(block.experts, name).copy_(getattr(checkpoint.experts, name))
        block.gate.weight.copy_(checkpoint.gate.weight)
        torch.testing.assert_close(block(x), out)


def _fp8_dynamic_block():
    """The block with fp8 expert weights scaled per row whose inputs torchao quantises to fp8 per row on the fly:
    the tensors ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` makes, built directly (the
    config itself refuses machines without an fp8 GPU)."""
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
        Float8Tensor,
        QuantizeTensorToFloat8Kwargs,
    )

    block = _block()
    for name in ("gate_up_proj", "down_proj"):
        weight = Float8Tensor.from_hp(getattr(block.experts, name), granularity=PerRow(),
                                      act_quant_kwargs=QuantizeTensorToFloat8Kwargs(granularity=PerRow()))
        setattr(block.experts, name, torch.nn.Parameter(weight, requires_grad=False))
    return block


@pytest.mark.usefixtures("fresh_compile_state")
def test_fp8_inputs_run_as_fused_experts_with_fp8_rowwise_inputs(caplog):
    """fp8 weights with fp8 per-row inputs (torchao's dynamic-activation tensors) under the "moe_ops"
    implementation: fused_experts(input_quantisation="fp8_rowwise") over the stored values, eager and compiled,
    giving the reference of the dequantised weights over per-row fp8 inputs, within fp8's error of bf16."""
    import logging

    from moe_ops.fused_experts import fused_experts_ref

    block = _fp8_dynamic_block()
    block.experts.config._experts_implementation = "moe_ops"
    x = torch.randn(1, 12, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block(x)
    assert any("quantised=float8_e4m3fn per row, inputs fp8_rowwise)" in record.getMessage()
               for record in caplog.records)
    # The block's routing, then the op's reference over the same stored tensors.
    logits = torch.nn.functional.linear(x.reshape(-1, H), block.gate.weight)
    weights, ids = torch.topk(logits.float().softmax(-1), K, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)
    experts = block.experts
    want = fused_experts_ref(x.reshape(-1, H), weights, ids, experts.gate_up_proj.qdata, experts.down_proj.qdata,
                             w_gate_up_scale=experts.gate_up_proj.scale.squeeze(-1),
                             w_down_scale=experts.down_proj.scale.squeeze(-1), input_quantisation="fp8_rowwise")
    torch.testing.assert_close(out.reshape(-1, H), want, rtol=2e-2, atol=2e-2)
    assert sqnr_db(_dequantised_twin(block)(x), out) >= 20.0
    with torch._inductor.config.patch(force_disable_caches=True):
        got, graph = compile_and_record(block, x)
    torch.testing.assert_close(got, out, rtol=2e-2, atol=2e-2)
    assert counters["moe_ops"]["hf_experts"] == 1
    assert next(line for line in graph.splitlines() if "fused_experts" in line).endswith("'fp8_rowwise')")


@pytest.mark.cuda
@pytest.mark.parametrize("config", ["fp8-dynamic", "fp8-weight-only", "int8-g128"])
def test_cuda_moe_ops_experts_agree_with_torchaos_eager_path(config):
    """On the GPU, at Qwen3-30B-A3B's expert sizes: the "moe_ops" implementation over torchao's tensors gives
    torchao's own eager result (its grouped_mm experts: _scaled_grouped_mm with fp8 inputs, or the
    dequantised weights; int8 groups: the dequantised weights' layer)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    model_config = transformers.Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                               num_experts_per_tok=8, norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(copy.deepcopy(model_config))
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    block = block.to("cuda", torch.bfloat16).eval().requires_grad_(False)
    x = torch.randn(1, 64, 2048, device="cuda", dtype=torch.bfloat16)
    unquantised = block(x)
    torchao_config = {"fp8-dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                      "fp8-weight-only": Float8WeightOnlyConfig,
                      "int8-g128": lambda: Int8WeightOnlyConfig(granularity=PerGroup(128))}[config]()
    quantize_(block, moe_ops.experts_quantization_config(torchao_config), filter_fn=None)
    if config == "int8-g128":  # torchao's int8 tensors cannot run transformers' experts code
        twin = Qwen3MoeSparseMoeBlock(copy.deepcopy(model_config)).to("cuda", torch.bfloat16).eval()
        twin.load_state_dict({name: value.dequantize() if hasattr(value, "dequantize") else value
                              for name, value in block.state_dict().items()})
        twin.experts.config._experts_implementation = "grouped_mm"
        want = twin(x)
    else:
        block.experts.config._experts_implementation = "grouped_mm"
        want = block(x)
    block.experts.config._experts_implementation = "moe_ops"
    got = block(x)
    if config == "fp8-dynamic":
        # torchao rounds gate and up to bf16 before the activation and the op does not: an element of the
        # activation can land a step of fp8 (1/8) away from torchao's and reach the output (the H100 measured
        # 3.2e-2 of the output's norm). The two fp8 layers stay closer to each other than torchao's is to the
        # unquantised layer (fp8's own error), by 3 dB at least.
        assert sqnr_db(want, got) >= sqnr_db(unquantised, want) + 3.0, (sqnr_db(want, got),
                                                                          sqnr_db(unquantised, want))
        return
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert error <= 1e-2, error  # relative to the output's norm: 40 dB


def test_groups_the_kernels_do_not_take_run_their_own_loop(caplog):
    """int8 scales per group of 8 input features (the kernels take groups of a multiple of 16) are no form
    fused_experts reads: the experts run their own loop (torchao dequantises), and the log names the reason."""
    import logging

    from torchao.quantization.granularity import PerGroup

    block = _block()
    quantize_(block, moe_ops.experts_quantization_config(Int8WeightOnlyConfig(granularity=PerGroup(8))),
              filter_fn=None)
    block.experts.config._experts_implementation = "moe_ops"
    x = torch.randn(1, 5, H).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        out = block(x)
    torch.testing.assert_close(out, _dequantised_twin(block)(x), rtol=2e-2, atol=2e-2)
    assert any("no int8 / fp8 quantisation per row or in groups of a multiple of 16" in record.getMessage()
               for record in caplog.records)


def test_a_loop_that_cannot_multiply_torchao_weights_raises_the_reason():
    """GPT-OSS's experts store (E, K, N) weights, whose int8 scales (per stored row) scale input features: no form
    fused_experts reads, and its own loop's matmul over torchao's Int8Tensor is not implemented there. The call
    raises why fused_experts did not run, not only torchao's missing operator."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    torch.manual_seed(0)
    block = GptOssMLP(transformers.GptOssConfig(hidden_size=H, intermediate_size=F, num_local_experts=E,
                                                num_experts_per_tok=K))
    block = block.to(torch.bfloat16).eval().requires_grad_(False)
    quantize_(block, moe_ops.experts_quantization_config(Int8WeightOnlyConfig()), filter_fn=None)
    block.experts.config._experts_implementation = "moe_ops"
    with pytest.raises(RuntimeError, match=r"GptOssExperts: fused_experts cannot take this call \(its quantised "
                                           r"weights are stored \(E, K, N\).*cannot multiply its torchao weights"):
        block(torch.randn(1, 5, H).to(torch.bfloat16))


def test_state_dict_round_trip():
    block = _quantised()
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    restored = _block()
    with torch.no_grad():
        for parameter in restored.parameters():  # other weights, so that only the load can restore them
            parameter.normal_(std=0.3)
    quantize_(restored, moe_ops.experts_quantization_config(Float8WeightOnlyConfig()), filter_fn=None)
    x = torch.randn(1, 5, H).to(torch.bfloat16)
    assert not torch.allclose(restored(x), block(x))
    restored.load_state_dict(torch.load(buffer, weights_only=False), assign=True)
    assert type(restored.experts.gate_up_proj).__name__ == "Float8Tensor"
    torch.testing.assert_close(restored(x), block(x))


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.usefixtures("fresh_compile_state")
def test_transformers_torchao_config_quantises_the_experts_at_load(tmp_path):
    """The helper's config through transformers' TorchAoConfig: from_pretrained quantises the experts (and
    nothing else) as quantize_ does, to the same logits; compiled, the model's experts run as fused_experts over
    the stored fp8 values."""
    from transformers import Qwen3MoeForCausalLM, TorchAoConfig

    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=H, intermediate_size=64, moe_intermediate_size=F, num_experts=E,
        num_experts_per_tok=K, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    helper_config = moe_ops.experts_quantization_config(Float8WeightOnlyConfig())
    loaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                 quantization_config=TorchAoConfig(quant_type=helper_config)).eval()
    layer = loaded.model.layers[0]
    assert type(layer.mlp.experts.gate_up_proj).__name__ == "Float8Tensor"
    assert type(layer.self_attn.q_proj.weight) is torch.nn.Parameter  # the helper selects the experts only
    quantised = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    quantize_(quantised, helper_config, filter_fn=None)
    tokens = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = loaded(tokens).logits
        torch.testing.assert_close(quantised(tokens).logits, want, rtol=0, atol=0)
        with torch._inductor.config.patch(force_disable_caches=True):
            got = torch.compile(loaded)(tokens).logits
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert counters["moe_ops"]["hf_experts"] == 1  # transformers' grouped_mm over torchao weights, traced


def test_config_refuses_what_is_not_a_torchao_config():
    with pytest.raises(TypeError, match="config: expected a torchao quantization config"):
        moe_ops.experts_quantization_config("float8")
