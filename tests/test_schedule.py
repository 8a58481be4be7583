"""moe_ops::block_schedule: reference invariants, Triton == reference bit for bit, op registration.

Triton runs on the GPU when there is one, else under the interpreter (TRITON_DEVICE, conftest.py),
where shapes stay small (S <= 512).
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, zipf_ids

import moe_ops.schedule_triton as schedule_triton
from moe_ops.layout import BlockSchedule, schedule_sizes
from moe_ops.schedule import block_schedule, block_schedule_ref
from moe_ops.schedule_triton import block_schedule_triton


def _random_ids(tokens: int, k: int, num_experts: int) -> torch.Tensor:
    """Top-k style ids: k distinct experts per token."""
    if tokens == 0:
        return torch.empty((0, k), dtype=torch.int32)
    return torch.rand(tokens, num_experts).argsort(dim=1)[:, :k].to(torch.int32)


def _with_sentinels(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Replace ~1/4 of the slots by ids outside [0, E) (dropped slots, expert-parallel sentinels): E and
    above, and negative ids down to the dtype's minimum."""
    ids = ids.clone()
    drop = torch.rand(ids.shape) < 0.25
    outside = torch.tensor([num_experts, num_experts + 2, -1, -2, -5, torch.iinfo(ids.dtype).min], dtype=ids.dtype)
    ids[drop] = outside[torch.randint(0, len(outside), (int(drop.sum()),))]
    return ids


def _cases() -> list[tuple[str, torch.Tensor, int]]:
    torch.manual_seed(1)
    e8 = 8
    no_tokens_for_3 = _random_ids(40, 2, e8)
    no_tokens_for_3[no_tokens_for_3 == 3] = 4  # may duplicate an expert in a token: fine for the schedule
    return [
        # T = 0: no slots; everything is padding / zero / -1.
        ("T0", torch.empty((0, 2), dtype=torch.int32), e8),
        # T = 1: a single token (decode).
        ("T1", _random_ids(1, 2, e8), e8),
        # T < block_m: every expert run is one partial block.
        ("T_lt_block_m", _random_ids(7, 2, e8), e8),
        # An expert (3) with no tokens: zero-length run, no block.
        ("empty_expert", no_tokens_for_3, e8),
        # All tokens on one expert: one long run, every other expert empty.
        ("one_expert", torch.full((50, 1), 5, dtype=torch.int32), e8),
        # k = E: every token uses every expert.
        ("k_eq_E", _random_ids(20, 4, 4), 4),
        # E = 256 (DeepSeek-V3 sized), most experts with 0-2 slots.
        ("E256", _random_ids(64, 8, 256), 256),
        # Ids >= E present (sentinels are skipped), int64 ids.
        ("sentinels_int64", _with_sentinels(_random_ids(60, 4, 16), 16).long(), 16),
        # Zipf-skewed routing: a few hot experts, a long tail of cold ones.
        ("zipf", zipf_ids(128, 4, 32), 32),
        # Plain random routing, odd sizes.
        ("random", _random_ids(97, 3, 12), 12),
    ]


CASES = _cases()
CASE_IDS = [name for name, _, _ in CASES]
BLOCK_MS = (16, 64, 128)


def _check_invariants(ids: torch.Tensor, num_experts: int, block_m: int, sched: BlockSchedule) -> None:
    ids = ids.cpu()
    sched = BlockSchedule(*(t.cpu() for t in sched))
    num_slots = ids.numel()
    s_max, b_max = schedule_sizes(num_slots, num_experts, block_m)
    for t, n in zip(sched, (s_max, b_max, 1, num_experts, num_experts + 1), strict=True):
        assert t.dtype == torch.int32 and t.shape == (n,)

    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    assert torch.equal(sched.expert_counts.long(), counts)
    assert sched.expert_offsets[0] == 0
    assert torch.equal(sched.expert_offsets[1:].long(), counts.cumsum(0))
    padded = (counts + block_m - 1) // block_m * block_m
    num_padded = int(padded.sum())
    assert int(sched.num_padded) == num_padded

    slots = sched.sorted_slots.long()
    is_slot = slots != num_slots
    # The valid entries are a permutation of all valid slots.
    assert torch.equal(slots[is_slot].sort().values, torch.nonzero(valid).flatten())
    assert not is_slot[num_padded:].any()  # rows past num_padded hold the sentinel
    start = 0
    for e in range(num_experts):
        run = slots[start : start + int(padded[e])]
        assert start % block_m == 0  # each run starts at a multiple of block_m
        c = int(counts[e])
        assert (flat[run[:c]] == e).all()
        assert (run[:c].diff() > 0).all()  # ascending within an expert
        assert (run[c:] == num_slots).all()  # padding rows hold the sentinel S
        start += int(padded[e])

    # block_expert: the expert owning each block's rows, -1 past num_padded.
    block_start = torch.arange(b_max) * block_m
    in_use = block_start < num_padded
    assert (sched.block_expert[~in_use] == -1).all()
    owner = torch.repeat_interleave(torch.arange(num_experts), padded)
    assert torch.equal(sched.block_expert[in_use].long(), owner[block_start[in_use]])
    for b in torch.nonzero(in_use).flatten().tolist():
        rows = slots[b * block_m : (b + 1) * block_m]
        rows = rows[rows != num_slots]
        assert (flat[rows] == sched.block_expert[b]).all()


def _assert_same(got: BlockSchedule, want: BlockSchedule) -> None:
    for name, g, w in zip(BlockSchedule._fields, got, want, strict=True):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w.cpu()), f"{name} differs"


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_m", BLOCK_MS)
@pytest.mark.parametrize("name,ids,num_experts", CASES, ids=CASE_IDS)
def test_reference_invariants(name, ids, num_experts, block_m):
    _check_invariants(ids, num_experts, block_m, block_schedule_ref(ids, num_experts, block_m))


def test_reference_random_many():
    for seed in range(20):
        torch.manual_seed(seed)
        num_experts = int(torch.randint(1, 40, ()))
        k = int(torch.randint(1, min(num_experts, 6) + 1, ()))
        ids = _with_sentinels(_random_ids(int(torch.randint(0, 80, ())), k, num_experts), num_experts)
        block_m = int(torch.randint(1, 40, ()))  # also block_m that are not powers of two
        _check_invariants(ids, num_experts, block_m, block_schedule_ref(ids, num_experts, block_m))


def test_reference_errors():
    ids = torch.zeros((4, 2), dtype=torch.int32)
    with pytest.raises(ValueError, match="topk_ids.*2-D"):
        block_schedule_ref(ids.reshape(-1), 4, 16)
    with pytest.raises(TypeError, match="topk_ids.*dtype"):
        block_schedule_ref(ids.float(), 4, 16)
    with pytest.raises(ValueError, match="block_m"):
        block_schedule_ref(ids, 4, 0)
    with pytest.raises(ValueError, match="num_experts"):
        block_schedule_ref(ids, 0, 16)


def test_public_wrapper_checks_the_scalars():
    """Before the op, whose schema would take num_experts=True as 1 and truncate nothing."""
    ids = torch.zeros((4, 2), dtype=torch.int32)
    with pytest.raises(TypeError, match=r"num_experts: expected an int, got True"):
        block_schedule(ids, True, 16)
    with pytest.raises(ValueError, match=r"num_experts: expected an int >= 1, got 0"):
        block_schedule(ids, 0, 16)
    with pytest.raises(TypeError, match=r"block_m: expected an int, got True"):
        block_schedule(ids, 4, True)


def test_compiles_with_dynamic_scalars():
    """torch.compile(dynamic=True) makes the int arguments SymInts: the checks take them."""
    compiled = torch.compile(lambda ids, e: block_schedule(ids, e, 16), dynamic=True, fullgraph=True)
    for tokens in (5, 9):
        ids = torch.randint(0, 4, (tokens, 2), dtype=torch.int32)
        got, want = compiled(ids, 4), block_schedule(ids, 4, 16)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


# ------------------------------------------------------------------------------------------------
# Triton (GPU, or the interpreter on CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_m", BLOCK_MS)
@pytest.mark.parametrize("name,ids,num_experts", CASES, ids=CASE_IDS)
def test_triton_matches_reference(name, ids, num_experts, block_m):
    want = block_schedule_ref(ids, num_experts, block_m)
    got = block_schedule_triton(ids.to(TRITON_DEVICE), num_experts, block_m)
    _assert_same(got, want)
    _check_invariants(ids, num_experts, block_m, got)


@pytest.mark.parametrize("name", ["T1", "sentinels_int64", "zipf", "E256", "one_expert"])
def test_triton_multi_chunk(name, monkeypatch):
    """Small chunks force the three-launch path (histogram, scan, scatter) at interpreter sizes."""
    monkeypatch.setattr(schedule_triton, "MAX_CHUNK", 32)
    _, ids, num_experts = CASES[CASE_IDS.index(name)]
    for block_m in (16, 24):
        want = block_schedule_ref(ids, num_experts, block_m)
        _assert_same(block_schedule_triton(ids.to(TRITON_DEVICE), num_experts, block_m), want)


@pytest.mark.parametrize("name", ["T1", "T_lt_block_m", "sentinels_int64", "zipf", "E256", "random"])
def test_triton_any_count_tiles(name, monkeypatch):
    """The launches of a compiled graph for every T (lowering/inductor/kernel_calls.py): chunks of MAX_CHUNK and
    the three-launch form even for one chunk, block tiles not sized to the slot count."""
    _, ids, num_experts = CASES[CASE_IDS.index(name)]
    for max_chunk in (512, 32):  # one chunk, several
        monkeypatch.setattr(schedule_triton, "MAX_CHUNK", max_chunk)
        for block_m in (1, 16):
            want = block_schedule_ref(ids, num_experts, block_m)
            _assert_same(block_schedule_triton(ids.to(TRITON_DEVICE), num_experts, block_m, any_count=True), want)


def test_triton_non_contiguous_ids():
    ids = _random_ids(30, 4, 8)
    strided = ids.to(TRITON_DEVICE).t().contiguous().t()  # same values, column-major storage
    _assert_same(block_schedule_triton(strided, 8, 16), block_schedule_ref(ids, 8, 16))


# ------------------------------------------------------------------------------------------------
# Op registration
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_opcheck(device):
    for ids, num_experts, block_m in [
        (_with_sentinels(_random_ids(20, 2, 8), 8), 8, 16),
        (torch.empty((0, 2), dtype=torch.int32), 4, 16),
    ]:
        args = (ids.to(device), num_experts, block_m)
        torch.library.opcheck(torch.ops.moe_ops.block_schedule.default, args)


def test_public_wrapper_cpu():
    ids = zipf_ids(40, 2, 8)
    got = block_schedule(ids, 8, 16)
    assert isinstance(got, BlockSchedule)
    _assert_same(got, block_schedule_ref(ids, 8, 16))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ids = torch.empty((10, 4), dtype=torch.int32)
        out = torch.ops.moe_ops.block_schedule(ids, 16, 32)
    s_max, b_max = schedule_sizes(40, 16, 32)
    assert [tuple(t.shape) for t in out] == [(s_max,), (b_max,), (1,), (16,), (17,)]


# ------------------------------------------------------------------------------------------------
# CUDA only
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("block_m", [16, 128])
def test_cuda_large(block_m):
    ids = zipf_ids(65536, 8, 256, device="cuda")
    ids[::7, 3] = 256  # some sentinels
    got = block_schedule(ids, 256, block_m)
    want = block_schedule_ref(ids.cpu(), 256, block_m)
    _assert_same(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [3, 5000])  # one launch (one chunk) and three launches
def test_cuda_graph_capture(tokens):
    """The CUDA path has no host synchronisation: capture it once, replay it on new ids."""
    num_experts, block_m = 64, 16
    static_ids = zipf_ids(tokens, 4, num_experts, device="cuda")
    block_schedule(static_ids, num_experts, block_m)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = block_schedule(static_ids, num_experts, block_m)
    for seed in range(3):
        torch.manual_seed(100 + seed)
        new_ids = _random_ids(tokens, 4, num_experts).cuda()
        static_ids.copy_(new_ids)
        graph.replay()
        _assert_same(static_out, block_schedule_ref(new_ids.cpu(), num_experts, block_m))


@pytest.mark.parametrize("hidden", [48, 1500])  # one column tile; two, the second partial
def test_rows_in_schedule_order_matches_indexing(hidden):
    """The copy of x's rows into schedule order (the TMA tiles' A, the grouped GEMM's operands): position
    p holds token sorted_slots[p] // K's row, sentinel positions (slot S) 0; x read through its row stride."""
    from moe_ops.schedule_triton import rows_in_schedule_order

    ids = _with_sentinels(_random_ids(13, 3, 8), 8)
    sorted_slots = block_schedule_ref(ids, 8, 1).sorted_slots
    x_wide = torch.randn(13, hidden + 7, dtype=torch.bfloat16)
    x = x_wide[:, 3 : 3 + hidden]  # row stride hidden + 7
    routed = sorted_slots.long() < ids.numel()
    want = torch.where(routed[:, None], x[sorted_slots.long().clamp_max(ids.numel() - 1) // 3], 0.0)
    got = rows_in_schedule_order(x.to(TRITON_DEVICE), sorted_slots.to(TRITON_DEVICE), 3)
    assert torch.equal(got.cpu(), want)
    assert (~routed).any()  # sentinels present
