"""Quickstart: route tokens to experts, run the fused experts op, check it against the reference.

On a GPU the op runs its Triton kernels; on the CPU it runs the plain-PyTorch reference.
"""

import torch

import moe_ops

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
tolerance = {torch.bfloat16: 2e-2, torch.float32: 2e-3}[dtype]  # relative to max |reference|
T, H, F, E, K = 64, 256, 512, 8, 2  # tokens, hidden, expert intermediate, experts, experts per token

torch.manual_seed(0)
x = torch.randn(T, H, device=device, dtype=dtype)
w_router = 0.02 * torch.randn(E, H, device=device, dtype=dtype)
w_gate_up = 0.02 * torch.randn(E, 2 * F, H, device=device, dtype=dtype)  # gate rows, then up rows
w_down = 0.02 * torch.randn(E, H, F, device=device, dtype=dtype)

# Mixtral routing: softmax over the experts, top-k, renormalise the k weights to sum to 1.
topk_weights, topk_ids = moe_ops.route(x @ w_router.T, K, renormalize=True)
assert topk_weights.shape == (T, K) and topk_weights.dtype == torch.float32
assert topk_ids.shape == (T, K) and topk_ids.dtype == torch.int32
assert torch.allclose(topk_weights.sum(-1), torch.ones(T, device=device))

out = moe_ops.fused_experts(x, topk_weights, topk_ids, w_gate_up, w_down)
ref = moe_ops.fused_experts_ref(x, topk_weights, topk_ids, w_gate_up, w_down)
assert out.shape == (T, H) and out.dtype == dtype

rel_err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
print(f"fused_experts vs reference on {device} ({dtype}): relative error {rel_err:.1e}")
assert rel_err <= tolerance, rel_err
