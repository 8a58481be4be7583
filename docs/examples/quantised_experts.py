"""Quantised expert weights: fp8 through torchao, compiled; int4 in groups passed to fused_experts.

A Qwen3-MoE block from transformers (tiny config, random weights): torchao's quantize_ with
moe_ops.experts_quantization_config turns its stacked expert weights into fp8 weight-only tensors (one
scale per expert and output row); compiled, transformers' grouped_mm experts over them run as
moe_ops.fused_experts, which reads the fp8 values and their scales as stored, with no dequantised copy of the
weights in the graph. The compiled block gives torchao's own eager result.

Then another block's experts as int4 (groups of 32 inputs, zero points, two values per byte), which
moe_ops.quantise_experts stores and the "moe_ops" experts implementation reads, eager and compiled.
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
print(f"compiled vs torchao eager: relative error {error:.2e}; experts traced as moe_ops.fused_experts over the "
      f"stored fp8 weights {counters['moe_ops']['hf_experts']}x")
assert error <= 2e-2 and counters["moe_ops"]["hf_experts"] == 1

# int4 in groups of 32 (asymmetric, packed two per byte), a form torchao has no 3-D tensor for: moe_ops stores it.
torch.manual_seed(0)
int4_block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E,
                                                   num_experts_per_tok=K))
with torch.no_grad():
    for parameter in int4_block.parameters():
        parameter.normal_(0.0, 0.1)
int4_block = moe_ops.quantise_experts(int4_block.to(torch.bfloat16).eval(), "int4", group_size=32)
print("gate_up_proj is now", int4_block.experts.gate_up_proj.dtype, tuple(int4_block.experts.gate_up_proj.shape),
      "with scales", tuple(int4_block.experts.gate_up_proj_scale.shape))
with torch.no_grad():
    eager_int4 = int4_block(x)
    compiled_int4 = torch.compile(int4_block)(x)
int4_error = ((compiled_int4.float() - eager_int4.float()).abs().max() / eager_int4.float().abs().max()).item()
print(f"int4 experts compiled vs eager (both moe_ops.fused_experts): relative error {int4_error:.2e}")
assert int4_error <= 2e-2
