"""A transformers MoE model, unchanged, under plain torch.compile: moe_ops rewrites its MoE blocks.

The model is transformers' own Qwen3-MoE (random weights from a config, nothing downloaded). The
only moe_ops line is the import. The demo prints which blocks Inductor's graph pass rewrote into
moe_ops ops, the largest difference of the compiled logits from eager, and on a GPU the time of a
forward pass: eager, torch.compile without the moe_ops rewrites, and torch.compile with them.
"""

import copy
import logging
import warnings

import torch
from torch._dynamo.utils import counters
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import moe_ops

warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("moe_ops").setLevel(logging.INFO)  # one line per rewritten block
torch._inductor.config.fx_graph_cache = False  # compile afresh, so that the rewrites are logged

on_gpu = torch.cuda.is_available()
device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
if on_gpu:  # Qwen3-30B-A3B's MoE shapes (H 2048, 128 experts of F 768, top-8), 4 layers
    config = Qwen3MoeConfig(
        hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=8192, norm_topk_prob=True,
    )
    batch, seq = 4, 128
else:  # small enough for a CPU in seconds
    config = Qwen3MoeConfig(
        hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=256, norm_topk_prob=True,
    )
    batch, seq = 2, 16

torch.manual_seed(0)
model = Qwen3MoeForCausalLM(config).to(device=device, dtype=dtype).eval()
input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)


def forward(m):
    with torch.no_grad():
        return m(input_ids).logits


compiled = torch.compile(model)  # the user's whole change, besides `import moe_ops`
logits, eager_logits = forward(compiled), forward(model)

stats = counters["moe_ops"]
print(f"{device} {dtype}: {config.num_hidden_layers} MoE blocks (E={config.num_experts}, "
      f"K={config.num_experts_per_tok}, H={config.hidden_size}, F={config.moe_intermediate_size}), "
      f"{batch}x{seq} tokens")
print(f"rewritten: {stats['experts_rewrite']} experts blocks -> moe_ops.fused_experts, "
      f"{stats['route_rewrite']} routers -> moe_ops.route")


def relative_error(result, reference):
    return ((result.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


assert stats["experts_rewrite"] == config.num_hidden_layers, "a MoE block was not rewritten"
if dtype == torch.float32:
    error = relative_error(logits, eager_logits)
    print(f"max |compiled - eager| / max |eager| over the logits = {error:.2e}")
    assert error < 2e-3, "compiled logits differ from eager"
else:
    # In bf16, four layers of rounding separate any two implementations; what matters is whether the
    # compiled model is as close to the exact (fp32) model as eager bf16 is.
    exact_logits = forward(copy.deepcopy(model).float())
    eager_error, error = relative_error(eager_logits, exact_logits), relative_error(logits, exact_logits)
    print(f"max |x - fp32 model| / max |fp32 model| over the logits: eager bf16 {eager_error:.2e}, "
          f"compiled with moe_ops {error:.2e} (compiled vs eager: {relative_error(logits, eager_logits):.2e})")
    assert error < 1.5 * eager_error, "compiled logits are further from the fp32 model than eager's"

if on_gpu:
    from triton.testing import do_bench

    # The baseline compiled and timed inside the switch-off (the switch is read when a function compiles), then
    # compiled again with the rewrites: a new torch.compile of the same model shares its compiled frames.
    with moe_ops.rewrites_disabled():
        torch._dynamo.reset()
        compiled_without = torch.compile(model)
        forward(compiled_without)
        without_ms = do_bench(lambda: forward(compiled_without))
    torch._dynamo.reset()
    forward(compiled)
    times = {
        "eager": do_bench(lambda: forward(model)),
        "torch.compile": without_ms,
        "torch.compile + moe_ops": do_bench(lambda: forward(compiled)),
    }
    for name, ms in times.items():
        print(f"{name:24s} {ms:8.3f} ms  ({times['torch.compile'] / ms:.2f}x torch.compile)")
