"""Training through the rewrites (opt-in): transformers' Qwen3-MoE block, compiled with
``moe_ops.config.training_rewrites`` on, gets moe_ops ops in its forward and their backward in its
backward; every gradient matches eager's.

The switch is off by default (a training step is not yet faster than plain torch.compile: see
docs/index.md, "Training"); with it off the same script compiles the plain code's backward.
"""

import torch
from torch._dynamo.utils import counters
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moe_ops

moe_ops.config.training_rewrites = True
# A graph from Inductor's on-disk cache was rewritten when first compiled and counts nothing now.
torch._inductor.config.fx_graph_cache = False

torch.manual_seed(0)
config = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                        norm_topk_prob=True)
config._experts_implementation = "grouped_mm"  # transformers' default for a model built from a config
block = Qwen3MoeSparseMoeBlock(config).to(torch.bfloat16)
for param in block.parameters():
    torch.nn.init.normal_(param, std=0.1)

x = torch.randn(1, 12, 64, dtype=torch.bfloat16)
grad_out = torch.randn(1, 12, 64, dtype=torch.bfloat16)


def gradients(layer):
    """Gradients of the input and every parameter after one forward and backward."""
    block.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    out = layer(leaf)
    (out[0] if isinstance(out, tuple) else out).backward(grad_out)
    return [leaf.grad, *(p.grad for p in block.parameters())]


compiled = gradients(torch.compile(block, fullgraph=True))
eager = gradients(block)
assert counters["moe_ops"]["joint_rewrite"] == 1, "the training graph was not rewritten"
assert counters["moe_ops"]["experts_rewrite"] == 1 and counters["moe_ops"]["route_rewrite"] == 1
for got, want in zip(compiled, eager, strict=True):
    error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert error < 2e-2, f"gradient differs from eager's: {error:.2e}"
print(f"training graph rewritten (route + fused_experts, their backward); {len(eager)} gradients match eager")
