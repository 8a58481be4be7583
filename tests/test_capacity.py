"""moe_ops::apply_capacity: reference vs an independent Python loop, Triton/CUDA == reference, op.

Triton runs on the GPU when there is one, else under the interpreter (TRITON_DEVICE, conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE

import moe_ops.schedule_triton as schedule_triton
from moe_ops.capacity import apply_capacity, apply_capacity_ref
from moe_ops.capacity_triton import apply_capacity_triton
from moe_ops.layout import capacity_from_factor

POLICIES = ("position", "gshard", "score")


def _loop_capacity(ids, weights, num_experts, capacity, policy):
    """Independent definition: per expert, list its slots, order them by the policy, drop the tail."""
    out = ids.reshape(-1).tolist()
    w = weights.reshape(-1).tolist()
    dropped = 0
    if capacity >= 0:
        for e in range(num_experts):
            slots = [s for s, x in enumerate(out) if x == e]
            if policy == "score":
                slots.sort(key=lambda s: (-w[s], s))
            elif policy == "gshard":
                slots.sort(key=lambda s: (s % ids.shape[1], s))  # choice j = s % K first, then token
            for s in slots[capacity:]:
                out[s] = num_experts
                dropped += 1
    return torch.tensor(out, dtype=torch.int32).reshape(ids.shape), dropped


def _inputs(tokens, k, num_experts, seed, sentinels=True, ties=True, dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, num_experts, generator=g).argsort(dim=1)[:, :k]
    if sentinels and tokens:
        drop = torch.rand(ids.shape, generator=g) < 0.2
        ids[drop] = num_experts + torch.randint(0, 3, (int(drop.sum()),), generator=g)
    # Few distinct weights -> many ties, which the score policy breaks by the lower slot.
    if ties:
        weights = torch.randint(0, 4, ids.shape, generator=g) / 4.0
    else:
        weights = torch.rand(ids.shape, generator=g)
    return ids.to(dtype), weights


CASES = [
    # (tokens, k, E, capacity)
    (1, 2, 8, 1),  # decode: one token
    (40, 2, 8, 3),  # typical: some experts over capacity
    (64, 8, 256, 1),  # E = 256, capacity 1
    (50, 4, 4, 20),  # k = E
    (30, 2, 6, 0),  # capacity 0 drops every valid slot
    (30, 2, 6, -1),  # dropless
    (25, 3, 5, 1000),  # capacity above every count: nothing dropped
    (0, 2, 4, 3),  # T = 0
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("tokens,k,num_experts,capacity", CASES)
def test_reference_matches_loop(tokens, k, num_experts, capacity, policy):
    for seed, dtype in [(0, torch.int32), (1, torch.int64)]:
        ids, weights = _inputs(tokens, k, num_experts, seed, dtype=dtype)
        kept, num_dropped = apply_capacity_ref(ids, weights, num_experts, capacity, policy)
        want, want_dropped = _loop_capacity(ids, weights, num_experts, capacity, policy)
        assert kept.dtype == torch.int32 and kept.shape == ids.shape
        assert num_dropped.dtype == torch.int32 and num_dropped.shape == ()
        assert torch.equal(kept, want)
        assert int(num_dropped) == want_dropped


def test_reference_semantics():
    ids = torch.tensor([[0, 1], [0, 9], [0, 1], [1, 0]], dtype=torch.int32)  # 9: a sentinel (E = 4)
    weights = torch.tensor([[0.1, 0.5], [0.3, 0.9], [0.3, 0.2], [0.7, 0.3]])
    kept, n = apply_capacity_ref(ids, weights, 4, 2, "position")  # expert 0: slots 0, 2 kept
    assert kept.tolist() == [[0, 1], [0, 9], [4, 1], [4, 4]] and int(n) == 3
    # gshard: expert 1's first choices (slot 6, token 3) go before its second choices (slots 1, 5).
    kept, n = apply_capacity_ref(ids, weights, 4, 2, "gshard")
    assert kept.tolist() == [[0, 1], [0, 9], [4, 4], [1, 4]] and int(n) == 3
    # score: expert 0 has 0.1, 0.3, 0.3, 0.3 at slots 0, 2, 4, 7 -> the tie keeps slots 2 and 4.
    kept, n = apply_capacity_ref(ids, weights, 4, 2, "score")
    assert kept.tolist() == [[4, 1], [0, 9], [0, 4], [1, 4]] and int(n) == 3
    kept, n = apply_capacity_ref(ids, weights, 4, 0, "position")  # capacity 0: all valid dropped
    assert kept.tolist() == [[4, 4], [4, 9], [4, 4], [4, 4]] and int(n) == 7
    kept, n = apply_capacity_ref(ids, weights, 4, -1, "score")  # dropless: unchanged
    assert torch.equal(kept, ids) and kept.data_ptr() != ids.data_ptr() and int(n) == 0


def test_capacity_from_factor():
    assert capacity_from_factor(1.0, 4096, 8, 64) == 512
    assert capacity_from_factor(1.25, 100, 2, 8) == math.ceil(1.25 * 200 / 8) == 32
    assert capacity_from_factor(0.3, 10, 1, 3) == 1
    # The factor as written, not its binary float: 1.1 * 800 / 8 is 110.00000000000001 in floats.
    assert capacity_from_factor(1.1, 100, 8, 8) == 110 and capacity_from_factor(1.1, 90, 1, 3) == 33
    assert capacity_from_factor(1.1, 50, 2, 10) == 11 and capacity_from_factor(1.1, 101, 8, 8) == 112
    assert capacity_from_factor(2 / 3, 9, 1, 2) == 3  # 0.6666666666666666 * 9 / 2 = 2.99..: still 3
    # The same under dynamo with a symbolic T (a graph compiled for every T computes the capacity so).
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x.new_full((), capacity_from_factor(1.1, x.shape[0], 8, 8)), dynamic=True,
                             fullgraph=True)
    assert [int(compiled(torch.zeros(t))) for t in (90, 100, 101)] == [99, 110, 112]
    assert capacity_from_factor(0.0, 100, 2, 8) == -1
    assert capacity_from_factor(-1.0, 100, 2, 8) == -1
    # No expert gets more than T * K slots: a larger factor keeps them all, and so does T * K (1e30 made an int
    # that the op's int64 could not hold).
    assert capacity_from_factor(8.0, 100, 2, 8) == capacity_from_factor(1e30, 100, 2, 8) == 200
    with pytest.raises(ValueError, match="num_experts"):
        capacity_from_factor(1.0, 10, 2, 0)
    with pytest.raises(ValueError, match="capacity_factor: expected a finite number, got nan"):
        capacity_from_factor(float("nan"), 10, 2, 4)
    with pytest.raises(TypeError, match="capacity_factor: expected a number, got True"):
        capacity_from_factor(True, 10, 2, 4)
    with pytest.raises(ValueError, match="num_tokens: expected an int >= 0, got -1"):
        capacity_from_factor(1.0, -1, 2, 4)
    with pytest.raises(TypeError, match="top_k: expected an int, got 2.0"):
        capacity_from_factor(1.0, 10, 2.0, 4)


# ------------------------------------------------------------------------------------------------
# Triton / CUDA path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("tokens,k,num_experts,capacity", CASES)
def test_triton_matches_reference(tokens, k, num_experts, capacity, policy):
    ids, weights = _inputs(tokens, k, num_experts, seed=3, dtype=torch.int64 if tokens % 2 else torch.int32)
    want = apply_capacity_ref(ids, weights, num_experts, capacity, policy)
    dev = TRITON_DEVICE
    got = apply_capacity_triton(ids.to(dev), weights.to(dev), num_experts, capacity, policy)
    assert got[0].device.type == TRITON_DEVICE and got[1].device.type == TRITON_DEVICE
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.int32 and got[1].shape == ()
    assert torch.equal(got[0].cpu(), want[0])
    assert torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("capacity", [0, 2, 7])
def test_triton_position_multi_chunk(capacity, monkeypatch):
    """Small chunks force the histogram + scan + rank path at interpreter sizes."""
    monkeypatch.setattr(schedule_triton, "MAX_CHUNK", 32)
    for tokens, k, num_experts in [(60, 2, 8), (40, 8, 256)]:
        ids, weights = _inputs(tokens, k, num_experts, seed=capacity)
        want = apply_capacity_ref(ids, weights, num_experts, capacity, "position")
        got = apply_capacity_triton(ids.to(TRITON_DEVICE), weights.to(TRITON_DEVICE), num_experts, capacity)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


# ------------------------------------------------------------------------------------------------
# Op registration and argument checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("policy", POLICIES)
def test_opcheck(device, policy):
    ids, weights = _inputs(20, 2, 8, seed=5)
    for capacity in (3, -1):
        args = (ids.to(device), weights.to(device), 8, capacity, policy)
        torch.library.opcheck(torch.ops.moe_ops.apply_capacity.default, args)


def test_public_wrapper_and_grad_inputs():
    ids, weights = _inputs(30, 2, 8, seed=6)
    weights.requires_grad_(True)  # ids only come out: weights that require grad are fine
    kept, n = apply_capacity(ids, weights, 8, 4, policy="score")
    want = _loop_capacity(ids, weights.detach(), 8, 4, "score")
    assert torch.equal(kept, want[0]) and int(n) == want[1]
    kept, _ = apply_capacity(ids, weights, 8, 4)  # default policy: position
    assert torch.equal(kept, _loop_capacity(ids, weights.detach(), 8, 4, "position")[0])


def test_errors():
    ids, weights = _inputs(4, 2, 8, seed=7)
    with pytest.raises(ValueError, match="topk_ids.*2-D"):
        apply_capacity(ids.reshape(-1), weights.reshape(-1), 8, 2)
    with pytest.raises(TypeError, match="topk_ids.*dtype"):
        apply_capacity(ids.float(), weights, 8, 2)
    with pytest.raises(ValueError, match="topk_weights.*shape"):
        apply_capacity(ids, weights[:, :1], 8, 2)
    with pytest.raises(TypeError, match="topk_weights.*dtype"):
        apply_capacity(ids, ids, 8, 2)
    with pytest.raises(ValueError, match="policy"):
        apply_capacity(ids, weights, 8, 2, policy="random")
    with pytest.raises(ValueError, match="num_experts"):
        apply_capacity(ids, weights, 0, 2)
    with pytest.raises(TypeError, match=r"capacity: expected an int"):
        apply_capacity(ids, weights, 8, True)
    with pytest.raises(TypeError, match=r"capacity: expected an int"):
        apply_capacity(ids, weights, 8, 1.5)
    for capacity in (2**63, -(2**64)):
        with pytest.raises(ValueError, match=r"capacity: expected an int in \[-2\*\*63, 2\*\*63 - 1\]"):
            apply_capacity(ids, weights, 8, capacity)


def test_ids_outside_range_pass_through_uncounted():
    """Ids outside [0, E) are routed to no expert already: kept as they are, never counted as dropped."""
    ids = torch.tensor([[0, -1], [0, 4], [0, -(2**31)]], dtype=torch.int32)
    kept, dropped = apply_capacity(ids, torch.ones(3, 2), 4, 1)
    assert kept.tolist() == [[0, -1], [4, 4], [4, -(2**31)]] and int(dropped) == 2


def test_capacity_from_the_token_count_under_dynamic_shapes():
    """A capacity computed from T (ceil(T K / E)) is a SymInt in a graph compiled for any T: taken, and each T
    gives the eager result."""
    def capped(ids, weights):  # 4 experts, 2 per token
        return apply_capacity(ids, weights, 4, (ids.shape[0] * 2 + 3) // 4, "position")

    compiled = torch.compile(capped, dynamic=True, fullgraph=True)
    for tokens in (5, 9, 17):
        ids, weights = _inputs(tokens, 2, 4, seed=tokens)
        ids[:, 0] = 0  # expert 0 over its capacity
        want, got = capped(ids, weights), compiled(ids, weights)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and int(want[1]) > 0


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("capacity", [1, -1])
def test_int64_ids_int32_cannot_hold_come_out_as_the_sentinel(capacity, policy):
    """The kept ids are int32: an int64 id outside [0, E) that int32 cannot hold comes out as E (wrapped, 2**32
    would name expert 0), uncounted, on the reference and the Triton path alike."""
    ids = torch.tensor([[0, 2**32], [1, 2**32 + 1], [0, -(2**32)], [2, -1]], dtype=torch.int64)
    want = [[0, 4], [1, 4], [4 if capacity == 1 else 0, 4], [2, -1]]
    for apply in (apply_capacity_ref, apply_capacity_triton):
        kept, dropped = apply(ids.to(TRITON_DEVICE), torch.ones(4, 2, device=TRITON_DEVICE), 4, capacity, policy)
        assert kept.tolist() == want and int(dropped) == (1 if capacity == 1 else 0), apply.__name__


# ------------------------------------------------------------------------------------------------
# CUDA only
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_large(policy):
    tokens, k, num_experts = 65536, 8, 256
    ids, weights = _inputs(tokens, k, num_experts, seed=8, ties=False)
    capacity = capacity_from_factor(1.0, tokens, k, num_experts)
    kept, n = apply_capacity(ids.cuda(), weights.cuda().bfloat16(), num_experts, capacity, policy)
    want = apply_capacity_ref(ids, weights.bfloat16(), num_experts, capacity, policy)
    assert torch.equal(kept.cpu(), want[0]) and torch.equal(n.cpu(), want[1])


@pytest.mark.cuda
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("tokens", [5, 3000])  # one chunk and several
def test_cuda_graph_capture(policy, tokens):
    """No host synchronisation: capture once, replay on new ids and weights."""
    num_experts, capacity = 16, 7
    ids, weights = _inputs(tokens, 4, num_experts, seed=9)
    static_ids, static_w = ids.cuda(), weights.cuda()
    apply_capacity(static_ids, static_w, num_experts, capacity, policy)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_kept, static_n = apply_capacity(static_ids, static_w, num_experts, capacity, policy)
    for seed in range(3):
        ids, weights = _inputs(tokens, 4, num_experts, seed=10 + seed)
        static_ids.copy_(ids)
        static_w.copy_(weights)
        graph.replay()
        want = apply_capacity_ref(ids, weights, num_experts, capacity, policy)
        assert torch.equal(static_kept.cpu(), want[0]) and torch.equal(static_n.cpu(), want[1])
