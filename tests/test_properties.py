"""Seeded property tests: random cases over shapes, dtypes, layouts, activations, k, E, skew, capacity,
ties, NaN and out-of-range ids; each op's Triton path (the interpreter on the CPU, the kernels on a
GPU: fused_experts, route, block_schedule, apply_capacity) against an independent loop written here
from the docs' definitions (float64 where there is arithmetic), not the library's references.

Each case's seed is in its test id, so a failure replays alone: ``pytest -k "case_17"``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, TRITON_DEVICE, zipf_ids

from moe_ops.fused_experts import fused_experts_triton

# The interpreter evaluates NaN rows and sigmoid(-large) through numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Cases per property: the interpreter's budget on the CPU, a larger one where the kernels run on a GPU
# (about 2 s a case there, most of it new kernel specialisations and the float64 loops);
# MOE_OPS_PROPERTY_CASES sets another.
NUM_CASES = int(os.environ.get("MOE_OPS_PROPERTY_CASES", 64 if torch.cuda.is_available() else 24))
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda g: F.relu(g) ** 2,
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
        activation=pick(list(ACTIVATIONS) + (["clamped_swiglu", "clamped_silu"] if gated else [])),
        skew=pick([False, True]), outside_ids=pick([False, True]),
        capacity_factor=pick([0.0, 0.0, 0.5, 1.25]), drop_policy=pick(["position", "gshard", "score"]), generator=g,
    )


def _capacity_keep(ids, weights, num_experts, factor, policy):
    """Which slots an expert keeps under a capacity of ceil(factor * T * K / E) slots: the lowest slot
    numbers ("position"), the first choices of every token before the second choices ("gshard"), or the
    highest weights, the lower slot first among equal ones ("score")."""
    T, K = ids.shape
    keep = [[True] * K for _ in range(T)]
    if factor <= 0:
        return keep
    capacity = math.ceil(factor * T * K / num_experts)
    for e in range(num_experts):
        slots = [(t, k) for t in range(T) for k in range(K) if int(ids[t, k]) == e]
        if policy == "score":
            slots.sort(key=lambda tk: (-float(weights[tk]), tk[0] * K + tk[1]))
        elif policy == "gshard":
            slots.sort(key=lambda tk: (tk[1], tk[0]))
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
            elif case["activation"] == "clamped_silu":
                gate = gate.clamp(max=7.0)
                h = gate / (1 + torch.exp(-gate)) * (up_EFH[e].double() @ x[t]).clamp(-7.0, 7.0)
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


# ---- block_schedule and apply_capacity: integer results, compared exactly ------------------------


def _random_ids(case_seed: int):
    g = torch.Generator().manual_seed(1000 + case_seed)
    num_experts = int(torch.randint(1, 20, (), generator=g))
    top_k = int(torch.randint(1, min(num_experts, 6) + 1, (), generator=g))
    tokens = int(torch.randint(0, 50, (), generator=g))
    ids = torch.rand(tokens, num_experts, generator=g).argsort(-1)[:, :top_k].int()
    if case_seed % 3 == 0:  # crowded: most slots on expert 0
        ids = torch.where(torch.rand(ids.shape, generator=g) < 0.7, 0, ids).int()
    outside = torch.rand(ids.shape, generator=g) < 0.15
    choices = torch.tensor([-1, num_experts, num_experts + 5, -(2**31)], dtype=torch.int32)
    ids = torch.where(outside, choices[torch.randint(4, ids.shape, generator=g)], ids)
    return ids, num_experts, int(torch.randint(1, 40, (), generator=g)), torch.rand(ids.shape, generator=g), g


@pytest.mark.parametrize("seed", range(NUM_CASES), ids=[f"case_{s}" for s in range(NUM_CASES)])
def test_block_schedule_against_a_loop(seed):
    from moe_ops.layout import schedule_sizes
    from moe_ops.schedule_triton import block_schedule_triton

    ids, num_experts, block_m, _, _ = _random_ids(seed)
    num_slots = ids.numel()
    got = block_schedule_triton(ids.to(TRITON_DEVICE), num_experts, block_m)
    s_max, b_max = schedule_sizes(num_slots, num_experts, block_m, minimum=min)
    sorted_slots, block_expert = [num_slots] * s_max, [-1] * b_max
    counts, position = [], 0
    flat = ids.reshape(-1).tolist()
    for e in range(num_experts):  # each expert's slots in ascending order, padded to whole blocks
        slots = [s for s, expert in enumerate(flat) if expert == e]
        counts.append(len(slots))
        sorted_slots[position:position + len(slots)] = slots
        blocks = -(-len(slots) // block_m)
        block_expert[position // block_m:position // block_m + blocks] = [e] * blocks
        position += blocks * block_m
    offsets = [sum(counts[:e]) for e in range(num_experts + 1)]
    assert got.sorted_slots.tolist() == sorted_slots
    assert got.block_expert.tolist() == block_expert
    assert got.num_padded.tolist() == [position]
    assert got.expert_counts.tolist() == counts and got.expert_offsets.tolist() == offsets


@pytest.mark.parametrize("policy", ["position", "gshard", "score"])
@pytest.mark.parametrize("seed", range(NUM_CASES), ids=[f"case_{s}" for s in range(NUM_CASES)])
def test_apply_capacity_against_a_loop(seed, policy):
    from moe_ops.capacity_triton import apply_capacity_triton

    ids, num_experts, _, weights, g = _random_ids(seed)
    if seed % 4 == 0:  # ties among the weights: the lower slot first
        weights = (weights * 4).floor() / 4
    factor = [0.25, 0.5, 1.0, 2.0][seed % 4]
    kept, dropped = apply_capacity_triton(ids.to(TRITON_DEVICE), weights.to(TRITON_DEVICE), num_experts,
                                          math.ceil(factor * ids.numel() / num_experts), policy)
    keep = _capacity_keep(ids, weights, num_experts, factor, policy)
    want = [[int(ids[t, k]) if keep[t][k] else num_experts for k in range(ids.shape[1])] for t in range(ids.shape[0])]
    assert kept.tolist() == want
    assert int(dropped) == sum(not ok for row in keep for ok in row)


# ---- route: selections on exactly tied values, NaN included ---------------------------------------


def _cuda_order(values: list[float]) -> list[int]:
    """Indices by CUDA torch.topk's rule: NaN first, then descending value, the lower index among equals."""
    return sorted(range(len(values)), key=lambda i: (not math.isnan(values[i]), -values[i] if values[i] == values[i]
                                                     else 0.0, i))


def _route_loop(logits, k, scoring, after_topk, renormalize, eps, bias, n_group, topk_group, scale):
    out_w, out_ids = [], []
    for row in logits.double().tolist():
        x = torch.tensor(row, dtype=torch.float64)
        scores = x if after_topk else (torch.softmax(x, 0) if scoring == "softmax" else torch.sigmoid(x))
        choice = (scores + (bias.double() if bias is not None else 0.0)).tolist()
        if n_group > 1:
            size = len(choice) // n_group
            group_score = []
            for g in range(n_group):
                members = choice[g * size:(g + 1) * size]
                best_two = _cuda_order(members)[:2]
                group_score.append(sum(members[i] for i in best_two))
            kept = set(_cuda_order(group_score)[:topk_group])
            choice = [c if e // size in kept else -math.inf for e, c in enumerate(choice)]
        ids = _cuda_order(choice)[:k]
        w = scores[ids]
        if after_topk:
            w = torch.softmax(w, 0)
        if renormalize:
            w = w / (w.sum() + eps)
        out_w.append((w * scale).tolist())
        out_ids.append(ids)
    return torch.tensor(out_w, dtype=torch.float64).reshape(-1, k), torch.tensor(out_ids).reshape(-1, k)


@pytest.mark.parametrize("seed", range(NUM_CASES), ids=[f"case_{s}" for s in range(NUM_CASES)])
def test_route_against_a_loop(seed):
    from moe_ops.routing_triton import route_triton

    g = torch.Generator().manual_seed(2000 + seed)
    num_experts = [1, 4, 8, 16, 60, 64, 128, 256][seed % 8]
    mode = ["softmax", "sigmoid", "after_topk", "groups"][(seed // 8 + seed) % 4]
    if mode == "groups" and num_experts < 16:
        mode = "sigmoid"
    k = int(torch.randint(1, min(num_experts, 8) + 1, (), generator=g))
    n_group, topk_group = (8, 4) if mode == "groups" else (1, 1)
    if mode == "groups":
        k = min(k, topk_group * num_experts // n_group)
    dtype = [torch.float32, torch.bfloat16, torch.float16][seed % 3]
    tokens = int(torch.randint(1, 24, (), generator=g))
    # Multiples of 0.25: exact in every dtype, tie often, and stay far apart when distinct.
    logits = (torch.randint(-12, 13, (tokens, num_experts), generator=g) * 0.25).to(dtype)
    if seed % 5 == 0:
        logits[0, -1] = float("nan")
    bias = (torch.randint(-2, 3, (num_experts,), generator=g) * 0.25) if mode in ("sigmoid", "groups") else None
    args = (k, "sigmoid" if mode in ("sigmoid", "groups") else "softmax", mode == "after_topk", seed % 2 == 0,
            1e-20 if mode == "groups" else 0.0, bias, n_group, topk_group, 2.5 if mode == "groups" else 1.0)
    on_device = bias if bias is None else bias.to(TRITON_DEVICE)
    got_w, got_ids = route_triton(logits.to(TRITON_DEVICE), *args[:5], on_device, *args[6:])
    want_w, want_ids = _route_loop(logits, *args)
    order_got, order_want = got_ids.long().cpu().argsort(-1), want_ids.argsort(-1)
    got_ids = got_ids.long().cpu().gather(1, order_got)
    assert torch.equal(got_ids, want_ids.gather(1, order_want)), (mode, num_experts, k)
    torch.testing.assert_close(got_w.double().cpu().gather(1, order_got), want_w.gather(1, order_want),
                               rtol=1e-5, atol=1e-6, equal_nan=True)
