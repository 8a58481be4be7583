"""torch.compile runs transformers' "eager" experts as one moe_ops.fused_experts call.

A Mixtral and a GPT-OSS MoE block from transformers, tiny configs and random weights, with
experts_implementation="eager": per-expert Python loops that dynamo cannot capture. With moe_ops imported,
torch.compile(fullgraph=True) traces each block into one graph that calls moe_ops.fused_experts (on a CPU
its plain-PyTorch reference runs, on a GPU the Triton kernels), and the result matches the uncompiled
block, which still runs transformers' own loop.
"""

import logging

import torch
from torch._dynamo.utils import counters
from transformers import GptOssConfig, MixtralConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import moe_ops  # noqa: F401  (registers the "moe_ops" and "eager" experts implementations)

H, F, E, K = 64, 32, 8, 2  # hidden, expert intermediate, experts, experts per token

logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
logging.getLogger("moe_ops").setLevel(logging.INFO)  # one line per experts class: what it runs as, or why not


torch.manual_seed(0)
blocks = {
    "Mixtral": MixtralSparseMoeBlock(
        MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                      experts_implementation="eager")),
    "GPT-OSS": GptOssMLP(  # interleaved gate/up, clamped SwiGLU, biases
        GptOssConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                     experts_implementation="eager")),
}
for name, block in blocks.items():
    with torch.no_grad():
        for parameter in block.parameters():  # transformers allocates the experts uninitialised
            parameter.normal_(0.0, 0.1)
    block = block.to(torch.bfloat16)
    x = torch.randn(2, 7, H, dtype=torch.bfloat16)

    counters.clear()
    with torch.no_grad():
        # fullgraph=True: any graph break would raise. TORCH_LOGS=graph_code prints the graph with the op.
        compiled_out = torch.compile(block, fullgraph=True)(x)
        eager_out = block(x)  # not compiling: transformers' per-expert loop
    if isinstance(compiled_out, tuple):  # GptOssMLP also returns the router scores
        compiled_out, eager_out = compiled_out[0], eager_out[0]

    # Counted when dynamo traces an experts module into fused_experts ("hf_experts_fallback" when it could not).
    assert counters["moe_ops"]["hf_experts"] == 1, "the experts did not become fused_experts"
    error = ((compiled_out.float() - eager_out.float()).abs().max() / eager_out.float().abs().max()).item()
    assert error < 2e-2, f"{name}: relative error {error:.2e}"
    print(f"{name}: one graph, experts as moe_ops.fused_experts; max error vs eager {error:.1e} (relative, bf16)")
