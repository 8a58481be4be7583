"""Run every op's CUDA kernels at the edge shapes, forward and backward, for compute-sanitizer's memcheck:

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/memcheck_edges.py

Not collected by pytest (no test_ prefix): it needs a GPU and the sanitizer. Each case also checks
the result against the reference, so a clean run means in-bounds and correct.
"""

from __future__ import annotations

import torch
from conftest import zipf_ids  # tests/ is this script's folder, hence on its path

import moe_ops
from moe_ops.fused_experts import fused_experts_ref

# (name, T, K, E, H, F, routing)
EDGES = [
    ("T=1", 1, 2, 8, 256, 384, "uniform"),
    ("T<block_m", 5, 2, 8, 256, 384, "uniform"),
    ("empty expert", 40, 2, 8, 256, 384, "skip-expert-3"),
    ("all on one expert", 64, 1, 8, 256, 384, "one-expert"),
    ("k=E", 16, 8, 8, 256, 384, "uniform"),
    ("E=256", 33, 8, 256, 256, 128, "uniform"),
    ("non-pow2 H and F", 37, 2, 6, 200, 333, "uniform"),
    ("zipf", 300, 4, 32, 256, 128, "zipf"),
    ("sentinels", 50, 2, 8, 256, 384, "sentinels"),
]


def routed_ids(T, K, E, routing):
    if routing == "zipf":
        return zipf_ids(T, K, E, device="cuda")
    ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :K]
    if routing == "skip-expert-3":
        ids[ids == 3] = 4
    elif routing == "one-expert":
        ids[:] = 5
    elif routing == "sentinels":  # ids outside [0, E): routed to no expert
        ids[::3, 0] = E
        ids[1::3, 0] = -1
    return ids


def check_backward(name, x, weights, ids, w_gate_up, w_down) -> None:
    """The backward kernels (fused_experts_backward_triton) against autograd through the reference."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weights, w_gate_up, w_down)]
    grad = torch.randn_like(x)
    got = torch.autograd.grad(moe_ops.fused_experts(leaves[0], leaves[1], ids, *leaves[2:]), leaves, grad)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    want = torch.autograd.grad(fused_experts_ref(ref_leaves[0], ref_leaves[1], ids, *ref_leaves[2:]), ref_leaves, grad,
                               allow_unused=True)
    for what, g, w in zip(("dx", "d_weights", "dw_gate_up", "dw_down"), got, want, strict=True):
        w = torch.zeros_like(g) if w is None else w
        err = ((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-6)).item()
        assert err < 2e-2, (name, what, x.dtype, err)


def main() -> None:
    torch.manual_seed(0)
    for name, T, K, E, H, F, routing in EDGES:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(T, H, dtype=dtype, device="cuda")
            logits = torch.randn(T, E, device="cuda")
            w_gate_up = torch.randn(E, 2 * F, H, dtype=dtype, device="cuda") / H**0.5
            w_down = torch.randn(E, H, F, dtype=dtype, device="cuda") / F**0.5
            weights, _ = moe_ops.route(logits, K, renormalize=True)
            ids = routed_ids(T, K, E, routing)
            for capacity_factor in (0.0, 1.0):
                out, dropped = moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down,
                                                     capacity_factor=capacity_factor, return_num_dropped=True)
                want, want_dropped = fused_experts_ref(
                    x, weights, ids, w_gate_up, w_down, None, None, None, None, "EFH", False, "silu", True,
                    1.702, 7.0, capacity_factor, "position", return_num_dropped=True)
                err = ((out.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()
                assert err < 2e-2 and int(dropped) == int(want_dropped), (name, dtype, err)
            check_backward(name, x, weights, ids, w_gate_up, w_down)
            if E % 8 == 0 and E >= 16:
                moe_ops.route(logits, K, scoring="sigmoid", correction_bias=torch.randn(E, device="cuda"),
                              n_group=8, topk_group=4, renormalize=True, renorm_eps=1e-20,
                              routed_scaling_factor=2.5)
        print(f"ok  {name}")
    empty = torch.empty(0, 64, device="cuda")
    moe_ops.route(torch.empty(0, 8, device="cuda"), 2)
    moe_ops.fused_experts(empty, torch.empty(0, 2, device="cuda"), torch.empty(0, 2, dtype=torch.int32, device="cuda"),
                          torch.randn(8, 32, 64, device="cuda"), torch.randn(8, 64, 16, device="cuda"))
    torch.cuda.synchronize()
    print("ok  T=0")


if __name__ == "__main__":
    main()
