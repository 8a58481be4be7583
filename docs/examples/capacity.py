"""Capacity mode: each expert takes at most ceil(capacity_factor * T * K / E) slots; the rest drop.

A dropped slot contributes nothing to its token's output. The default (capacity_factor=0.0) is
dropless. With return_num_dropped=True the op also returns how many slots it dropped.
"""

import math

import torch

import moe_ops

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
tolerance = {torch.bfloat16: 2e-2, torch.float32: 2e-3}[dtype]
T, H, F, E, K = 64, 128, 256, 8, 2

torch.manual_seed(0)
x = torch.randn(T, H, device=device, dtype=dtype)
w_gate_up = 0.02 * torch.randn(E, 2 * F, H, device=device, dtype=dtype)
w_down = 0.02 * torch.randn(E, H, F, device=device, dtype=dtype)


def rel_diff(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# Skewed routing: experts 0 and 1 are asked for far more than their share of the T*K slots.
router_logits = torch.randn(T, E, device=device)
router_logits[:, :2] += 4.0
topk_weights, topk_ids = moe_ops.route(router_logits, K, renormalize=True)

# Dropless (the default): nothing dropped.
dropless, num_dropped = moe_ops.fused_experts(
    x, topk_weights, topk_ids, w_gate_up, w_down, return_num_dropped=True
)
assert int(num_dropped) == 0

# capacity_factor=1.0: each expert keeps at most T*K/E = 16 slots.
capacity = math.ceil(1.0 * T * K / E)
demand = torch.bincount(topk_ids.flatten().long(), minlength=E)
expected_dropped = int((demand - capacity).clamp_min(0).sum())
capped, num_dropped = moe_ops.fused_experts(
    x, topk_weights, topk_ids, w_gate_up, w_down, capacity_factor=1.0, return_num_dropped=True
)
print(f"slots asked of each expert: {demand.tolist()}; capacity {capacity}: {int(num_dropped)} dropped")
assert int(num_dropped) == expected_dropped > 0

# The same thing in two steps: apply_capacity marks the dropped slots with the sentinel id E,
# which fused_experts skips.
kept_ids, num_dropped = moe_ops.apply_capacity(topk_ids, topk_weights, E, capacity, "position")
assert int(num_dropped) == expected_dropped
assert int((kept_ids == E).sum()) == expected_dropped
assert rel_diff(capped, moe_ops.fused_experts(x, topk_weights, kept_ids, w_gate_up, w_down)) <= tolerance

# drop_policy="position" (the default) keeps each expert's earliest slots in token order: tokens that
# kept all their slots (the first `capacity` tokens among them) are unchanged, the others are not.
kept_all = (kept_ids == topk_ids).all(dim=-1)
assert kept_all[:capacity].all()
assert rel_diff(capped[kept_all], dropless[kept_all]) <= tolerance
assert rel_diff(capped[~kept_all], dropless[~kept_all]) > 10 * tolerance

# drop_policy="score" keeps each expert's highest-weight slots instead: as many drops, other tokens.
_, num_dropped_by_score = moe_ops.fused_experts(
    x, topk_weights, topk_ids, w_gate_up, w_down,
    capacity_factor=1.0, drop_policy="score", return_num_dropped=True,
)  # fmt: skip
assert int(num_dropped_by_score) == expected_dropped
