"""Seeded property tests: random cases over shapes, dtypes, layouts, activations, k, E, skew, capacity
and out-of-range ids, each op's Triton path (the interpreter on the CPU, the kernels on a GPU) against
an independent float64 loop written here from the docs' definitions, not the library's references.

Each case's seed is in its test id, so a failure replays alone: ``pytest -k "case_17"``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, TRITON_DEVICE, zipf_ids

from moe_ops.fused_experts import fused_experts_triton

NUM_CASES = 24
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "relu": F.relu,
}


def _draw(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    num_experts = pick([1, 3, 4, 8, 16])
    gated = pick([True, True, False])
    return dict(
        T=pick([1, 2, 7, 19, 40]), E=num_experts, K=pick([k for k in (1, 2, 3, 4) if k <= num_experts]),
        H=pick([16, 24, 40]), F=pick([8, 16, 24]), dtype=pick([torch.float32, torch.float16, torch.bfloat16]),
        layout=pick(["EFH", "EHF"]), interleaved=gated and pick([False, True]), gated=gated,
        activation=pick(list(ACTIVATIONS) + (["clamped_swiglu"] if gated else [])),
        skew=pick([False, True]), outside_ids=pick([False, True]),
        capacity_factor=pick([0.0, 0.0, 0.5, 1.25]), drop_policy=pick(["position", "score"]), generator=g,
    )


def _capacity_keep(ids, weights, num_experts, factor, policy):
    """Which slots an expert keeps under a capacity of ceil(factor * T * K / E) slots: the lowest slot
    numbers ("position") or the highest weights, the lower slot first among equal ones ("score")."""
    T, K = ids.shape
    keep = [[True] * K for _ in range(T)]
    if factor <= 0:
        return keep
    capacity = math.ceil(factor * T * K / num_experts)
    for e in range(num_experts):
        slots = [(t, k) for t in range(T) for k in range(K) if int(ids[t, k]) == e]
        if policy == "score":
            slots.sort(key=lambda tk: (-float(weights[tk]), tk[0] * K + tk[1]))
        for t, k in slots[capacity:]:
            keep[t][k] = False
    return keep


def _loop_fp64(case, x, weights, ids, gate_EFH, up_EFH, down_EHF):
    """out[t] = sum over kept slots with 0 <= e < E of w * down_e(act(gate_e x_t) [* up_e x_t])."""
    T, K = ids.shape
    x, weights = x.double(), weights.double()
    keep = _capacity_keep(ids, weights, case["E"], case["capacity_factor"], case["drop_policy"])
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if not (0 <= e < case["E"]) or not keep[t][k]:
                continue
            gate = gate_EFH[e].double() @ x[t]
            if case["activation"] == "clamped_swiglu":
                gate = gate.clamp(max=7.0)
                h = (gate * torch.sigmoid(1.702 * gate)) * ((up_EFH[e].double() @ x[t]).clamp(-7.0, 7.0) + 1)
            else:
                h = ACTIVATIONS[case["activation"]](gate)
                if case["gated"]:
                    h = h * (up_EFH[e].double() @ x[t])
            # The op rounds the activation to x's dtype before the down GEMM, as every MoE layer does.
            h = h.to(case["dtype"]).double()
            out[t] += weights[t, k] * (down_EHF[e].double() @ h)
    return out


@pytest.mark.parametrize("seed", range(NUM_CASES), ids=[f"case_{s}" for s in range(NUM_CASES)])
def test_fused_experts_against_a_float64_loop(seed):
    case = _draw(seed)
    g, dtype = case["generator"], case["dtype"]
    T, E, K, H, Fi = case["T"], case["E"], case["K"], case["H"], case["F"]
    x = torch.randn(T, H, generator=g).to(dtype)
    gate = (torch.randn(E, Fi, H, generator=g) / H**0.5).to(dtype)
    up = (torch.randn(E, Fi, H, generator=g) / H**0.5).to(dtype)
    down = (torch.randn(E, H, Fi, generator=g) / Fi**0.5).to(dtype)
    ids = zipf_ids(T, K, E) if case["skew"] else torch.rand(T, E, generator=g).argsort(-1)[:, :K].int()
    if case["outside_ids"]:
        outside = torch.rand(T, K, generator=g) < 0.2
        ids = torch.where(outside, torch.tensor([-1, E, -(2**31)])[torch.randint(3, (T, K), generator=g)], ids).int()
    weights = torch.rand(T, K, generator=g)
    if case["gated"]:
        w_gate_up = torch.stack([gate, up], dim=2).reshape(E, 2 * Fi, H) if case["interleaved"] else torch.cat(
            [gate, up], dim=1)
    else:
        w_gate_up = gate
    w_down = down
    if case["layout"] == "EHF":
        w_gate_up, w_down = w_gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()

    def on_device(t):
        return t.to(TRITON_DEVICE)

    got, _ = fused_experts_triton(
        on_device(x), on_device(weights), on_device(ids), on_device(w_gate_up), on_device(w_down), None, None, None,
        None, case["layout"], case["interleaved"], case["activation"], case["gated"], 1.702, 7.0,
        case["capacity_factor"], case["drop_policy"],
    )
    want = _loop_fp64(case, x, weights, ids, gate, up if case["gated"] else None, down)
    description = {k: v for k, v in case.items() if k != "generator"}
    assert torch.isfinite(got.float()).all(), description
    scale = want.abs().max().clamp_min(1e-6)
    err = (got.double().cpu() - want).abs().max() / scale
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e} for {description}"
