"""One Mixtral-style MoE layer through moe_ops, checked against the plain-PyTorch reference.

On a GPU: Mixtral-8x7B's expert shapes in bf16, the Triton kernels, and the time of both paths.
On the CPU: a small layer of the same form, where both calls run the reference (a few seconds).
"""

import torch

import moe_ops

if torch.cuda.is_available():
    device, dtype = "cuda", torch.bfloat16
    E, K, H, F, T = 8, 2, 4096, 14336, 128  # Mixtral-8x7B, a 128-token batch
else:
    device, dtype = "cpu", torch.float32
    E, K, H, F, T = 8, 2, 256, 512, 64

torch.manual_seed(0)
x = torch.randn(T, H, device=device, dtype=dtype)
w_router = 0.02 * torch.randn(E, H, device=device, dtype=dtype)
w_gate_up = 0.02 * torch.randn(E, 2 * F, H, device=device, dtype=dtype)  # HF layout: gate rows, then up rows
w_down = 0.02 * torch.randn(E, H, F, device=device, dtype=dtype)

topk_weights, topk_ids = moe_ops.route(x @ w_router.T, K, renormalize=True)  # softmax -> top-k -> renormalise


def fused():
    return moe_ops.fused_experts(x, topk_weights, topk_ids, w_gate_up, w_down)


def reference():
    return moe_ops.fused_experts_ref(x, topk_weights, topk_ids, w_gate_up, w_down)


out, ref = fused(), reference()
rel_err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
print(f"{device}: E={E} K={K} H={H} F={F} T={T} {dtype}")
print(f"max |fused - reference| / max |reference| = {rel_err:.2e}")

if device == "cuda":
    from triton.testing import do_bench

    fused_ms = do_bench(fused, return_mode="median")
    reference_ms = do_bench(reference, return_mode="median")
    print(f"moe_ops.fused_experts     {fused_ms:8.3f} ms")
    print(f"moe_ops.fused_experts_ref {reference_ms:8.3f} ms  (a loop over experts)")
