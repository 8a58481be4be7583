"""Quantised expert weights: fp8 through torchao, compiled; int4 in groups passed to fused_experts.

A Qwen3-MoE block from transformers (tiny config, random weights): torchao's quantize_ with
moe_ops.experts_quantization_config turns its stacked expert weights into fp8 weight-only tensors (one
scale per expert and output row); torch.compile rewrites the experts to moe_ops.fused_experts, which reads
the fp8 values and their scales as stored, with no dequantised copy of the weights in the graph. The
compiled block gives torchao's own eager result.

Then the same experts as int4 (moe_ops.quantised.quantise_groups: groups of 32 inputs, zero points, two
values per byte) straight into moe_ops.fused_experts, against the layer of their dequantised values.
"""

import torch
from torch._dynamo.utils import counters
from torchao.quantization import Float8WeightOnlyConfig, quantize_
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moe_ops

H, F, E, K = 64, 32, 8, 2  # hidden, expert intermediate, experts, experts per token
# A graph loaded from Inductor's caches was rewritten when it was first compiled, and counts nothing now.
torch._inductor.config.force_disable_caches = True

torch.manual_seed(0)
block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E,
                                              num_experts_per_tok=K, experts_implementation="grouped_mm"))
with torch.no_grad():
    for parameter in block.parameters():  # transformers allocates the experts uninitialised
        parameter.normal_(0.0, 0.1)
block = block.to(torch.bfloat16).eval()

quantize_(block, moe_ops.experts_quantization_config(Float8WeightOnlyConfig()), filter_fn=None)
print("gate_up_proj is now", type(block.experts.gate_up_proj).__name__)

x = torch.randn(2, 7, H, dtype=torch.bfloat16)
with torch.no_grad():
    want = block(x)
    got = torch.compile(block)(x)
error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
print(f"compiled vs torchao eager: relative error {error:.2e}; experts rewritten "
      f"{counters['moe_ops']['experts_rewrite']}x, reading stored fp8 weights "
      f"{counters['moe_ops']['quantised_weights_rewrite']}x")
assert error <= 2e-2 and counters["moe_ops"]["quantised_weights_rewrite"] == 1

# int4 in groups of 32 (asymmetric, packed two per byte), fused_experts' own quantised form.
from moe_ops.quantised import dequantise, quantise_groups  # noqa: E402

w_gate_up = torch.randn(E, 2 * F, H) * 0.1
w_down = torch.randn(E, H, F) * 0.1
q_gate_up, s_gate_up, z_gate_up = quantise_groups(w_gate_up, 32, bits=4)
q_down, s_down, z_down = quantise_groups(w_down, 32, bits=4)
tokens = torch.randn(7, H)
topk_weights, topk_ids = moe_ops.route(torch.randn(7, E), K, renormalize=True)
int4_out = moe_ops.fused_experts(tokens, topk_weights, topk_ids, q_gate_up, q_down, w_gate_up_scale=s_gate_up,
                                 w_down_scale=s_down, w_gate_up_zero=z_gate_up, w_down_zero=z_down)
dequantised_out = moe_ops.fused_experts(tokens, topk_weights, topk_ids, dequantise(q_gate_up, s_gate_up, z_gate_up),
                                        dequantise(q_down, s_down, z_down))
print(f"int4 weights: {q_gate_up.dtype} {tuple(q_gate_up.shape)} for a ({E}, {2 * F}, {H}) weight; "
      f"max difference from the dequantised layer {(int4_out - dequantised_out).abs().max().item():.1e}")
torch.testing.assert_close(int4_out, dequantised_out)
