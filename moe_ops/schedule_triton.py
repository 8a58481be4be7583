"""Triton kernels of ``moe_ops::block_schedule`` (and the pieces ``moe_ops::apply_capacity`` shares).

A stable counting sort of the slots by expert, over chunks of ``CHUNK`` consecutive slots, with no host
synchronisation and no atomics (deterministic, CUDA-graph safe):

1. ``_chunk_histogram_kernel`` (grid: chunks): ``counts_CE[c, e]`` = slots of expert ``e`` in chunk ``c``
   (``tl.histogram``; ids outside ``[0, E)`` are masked out).
2. ``_chunk_scan_kernel`` (grid: expert tiles): scans ``counts_CE`` down the chunk axis with a running
   carry, overwriting it in place with the exclusive prefix (slots of ``e`` in earlier chunks), and
   writes the totals ``expert_counts``.
3. ``_schedule_scatter_kernel`` (grid: max(chunks, block tiles)): every program rebuilds the padded expert
   offsets from ``expert_counts`` (an E-long cumsum). As a *chunk* program it sorts its chunk by
   ``(expert, slot)`` (``tl.sort`` on a packed key), takes each slot's rank among the same expert in
   the chunk from a segmented scan, and stores the slot at ``padded_start[e] + prefix[c, e] + rank``.
   As a *block-tile* program it writes ``block_expert`` of its blocks (searchsorted by comparison) and
   the sentinel into their padding rows, so ``sorted_slots`` needs no separate fill. Program 0 writes
   ``expert_offsets`` and ``num_padded``.

When all slots fit in one chunk (decode: T*K <= MAX_CHUNK), steps 1-2 are skipped (``SINGLE``): the
scatter kernel takes the counts from a histogram of that chunk, so the schedule is one launch.

The sort-based rank replaced a ``CHUNK x CHUNK`` comparison matrix, which was 3-5x slower on an H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ops._dispatch import launch_jit
from moe_ops.layout import BlockSchedule, schedule_sizes

# Slots per chunk: one program sorts a chunk. 512 measured best on an H100 at S = 524288, E = 256.
MAX_CHUNK = 512
# Tile elements per warp of the scatter kernel: more warps only for tiles past one warp's 1024.
_ELEMENTS_PER_WARP = 1024


# --------------------------------------------------------------------------------------------------
# Shared jit helpers (also used by moe_ops.capacity_triton)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_chunk_ids(ids_ptr, chunk, num_slots, num_experts, CHUNK: tl.constexpr):
    """Slots of chunk ``chunk``: (slot numbers (int64), raw ids, int32 expert (0 where invalid), valid)."""
    slot = chunk * CHUNK + tl.arange(0, CHUNK).to(tl.int64)
    in_range = slot < num_slots
    raw = tl.load(ids_ptr + slot, mask=in_range, other=-1)
    valid = in_range & (raw >= 0) & (raw < num_experts)
    expert = tl.where(valid, raw, 0).to(tl.int32)
    return slot, raw, expert, valid


@triton.jit
def _run_start_combine(expert_a, start_a, expert_b, start_b):
    # Associative on sorted experts: if the left part ends in b's expert, b's run started there.
    return expert_b, tl.where(expert_a == expert_b, start_a, start_b)


@triton.jit
def _sort_chunk(expert, valid, num_experts, CHUNK: tl.constexpr):
    """Sort a chunk's slots by (expert, slot), invalid slots last.

    Returns, in sorted order: (expert, slot index within the chunk, rank among the earlier slots of
    the same expert in the chunk, valid).
    """
    idx = tl.arange(0, CHUNK)
    key = tl.sort(tl.where(valid, expert, num_experts) * CHUNK + idx)
    s_expert = key // CHUNK
    s_local = key % CHUNK
    _, run_start = tl.associative_scan((s_expert, idx), 0, _run_start_combine)
    return s_expert, s_local, idx - run_start, s_expert < num_experts


@triton.jit
def _chunk_histogram_kernel(
    ids_ptr, counts_ptr, num_slots, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr
):
    chunk = tl.program_id(0)
    _, _, expert, valid = _load_chunk_ids(ids_ptr, chunk, num_slots, num_experts, CHUNK)
    hist = tl.histogram(expert, E_PAD, mask=valid)
    bins = tl.arange(0, E_PAD)
    tl.store(counts_ptr + chunk.to(tl.int64) * num_experts + bins, hist, mask=bins < num_experts)


@triton.jit
def _chunk_scan_kernel(
    counts_ptr, expert_counts_ptr, num_chunks, num_experts, C_TILE: tl.constexpr, E_TILE: tl.constexpr
):
    """counts_CE[:, tile] -> exclusive prefix over chunks (in place); expert_counts[tile] = totals."""
    e = tl.program_id(0) * E_TILE + tl.arange(0, E_TILE)
    e_mask = e < num_experts
    carry = tl.zeros([E_TILE], dtype=tl.int32)
    for c0 in range(0, num_chunks, C_TILE):
        c = c0 + tl.arange(0, C_TILE)
        mask = (c < num_chunks)[:, None] & e_mask[None, :]
        ptrs = counts_ptr + c.to(tl.int64)[:, None] * num_experts + e[None, :]
        x = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(x, axis=0) - x + carry[None, :], mask=mask)
        carry += tl.sum(x, axis=0)
    tl.store(expert_counts_ptr + e, carry, mask=e_mask)


@triton.jit
def _expert_counts(
    ids_ptr,
    expert_counts_ptr,
    num_slots,
    num_experts,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """(E_PAD,) valid slots per expert: a histogram of the only chunk, or the scan's totals."""
    e = tl.arange(0, E_PAD)
    if SINGLE:
        _, _, expert, valid = _load_chunk_ids(ids_ptr, 0, num_slots, num_experts, CHUNK)
        counts = tl.histogram(expert, E_PAD, mask=valid)
    else:
        counts = tl.load(expert_counts_ptr + e, mask=e < num_experts, other=0)
    return counts


# --------------------------------------------------------------------------------------------------
# block_schedule
# --------------------------------------------------------------------------------------------------


@triton.jit
def _schedule_scatter_kernel(
    ids_ptr,
    prefix_ptr,
    expert_counts_ptr,
    sorted_slots_ptr,
    block_expert_ptr,
    num_padded_ptr,
    expert_offsets_ptr,
    num_slots,
    num_experts,
    num_chunks,
    num_blocks,
    num_block_tiles,
    block_m,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M_PAD: tl.constexpr,
    SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)

    # Padded expert offsets, rebuilt by every program (E values: cheaper than another launch).
    e = tl.arange(0, E_PAD)
    e_mask = e < num_experts
    counts = _expert_counts(ids_ptr, expert_counts_ptr, num_slots, num_experts, CHUNK, E_PAD, SINGLE)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    num_padded = tl.sum(padded, axis=0)

    # Chunk part: every valid slot to its row.
    if pid < num_chunks:
        _, _, expert, valid = _load_chunk_ids(ids_ptr, pid, num_slots, num_experts, CHUNK)
        s_expert, s_local, rank, s_valid = _sort_chunk(expert, valid, num_experts, CHUNK)
        s_expert = tl.where(s_valid, s_expert, 0)
        row = tl.gather(padded_start, s_expert, 0) + rank
        if not SINGLE:
            row += tl.load(prefix_ptr + pid.to(tl.int64) * num_experts + s_expert, mask=s_valid, other=0)
        tl.store(sorted_slots_ptr + row, pid * CHUNK + s_local, mask=s_valid)

    # Block part: expert of each block of this tile, sentinel into the padding rows.
    if pid < num_block_tiles:
        b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = b < num_blocks
        start = b * block_m
        in_use = start < num_padded
        # searchsorted(padded_end, start, right=True): experts whose padded run ends at or before start.
        ended = (padded_end[None, :] <= start[:, None]) & e_mask[None, :]
        block_exp = tl.sum(ended.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(in_use, block_exp, -1), mask=b_mask)
        valid_end = tl.gather(padded_start + counts, tl.minimum(block_exp, num_experts - 1), 0)
        r = tl.arange(0, BLOCK_M_PAD)
        rows = start[:, None] + r[None, :]
        is_padding = (~in_use)[:, None] | (rows >= valid_end[:, None])
        row_mask = b_mask[:, None] & (r < block_m)[None, :] & is_padding
        tl.store(sorted_slots_ptr + rows, tl.zeros(rows.shape, tl.int32) + num_slots, mask=row_mask)

    if pid == 0:
        tl.store(expert_offsets_ptr + 1 + e, tl.cumsum(counts, axis=0), mask=e_mask)
        zeros = tl.zeros([E_PAD], dtype=tl.int32)
        tl.store(expert_offsets_ptr + e, zeros, mask=e == 0)
        tl.store(num_padded_ptr + e, zeros + num_padded, mask=e == 0)
        if SINGLE:
            tl.store(expert_counts_ptr + e, counts, mask=e_mask)


# --------------------------------------------------------------------------------------------------
# Rows in schedule order
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rows_in_schedule_order_kernel(
    x_ptr, sorted_slots_ptr, out_ptr, num_positions, num_tokens, hidden, stride_xt,
    TOP_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[p] = x[sorted_slots[p] // K]; rows of the sentinel slot S (padding, slots routed to no expert)
    are 0. A (rows x columns) tile, so the row loads are contiguous vectors (a gather written as an
    elementwise kernel loads each element through its own index)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_positions
    num_slots = num_tokens * TOP_K
    slot = tl.load(sorted_slots_ptr + rows, mask=row_ok, other=num_slots)
    routed = slot < num_slots
    token = tl.where(routed, slot // TOP_K, 0).to(tl.int64)
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = (cols < hidden)[None, :]
        values = tl.load(x_ptr + token[:, None] * stride_xt + cols[None, :], mask=routed[:, None] & col_ok,
                         other=0.0)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :], values, mask=row_ok[:, None] & col_ok)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def chunk_size(num_slots: int) -> int:
    """Slots per chunk: MAX_CHUNK, or the power of two (>= 16) that holds all slots when fewer."""
    return min(MAX_CHUNK, max(16, triton.next_power_of_2(num_slots)))


def expert_pad(num_experts: int) -> int:
    """Expert-axis tile: a power of two >= E (>= 32, one bin per lane of a warp for tl.histogram)."""
    return max(32, triton.next_power_of_2(num_experts))


def launch_chunk_prefix(
    launch, alloc, ids_S, num_slots, num_experts: int, chunk: int, num_chunks, cdiv=triton.cdiv, any_count=False
):
    """The histogram and scan kernels on the flat, contiguous ids (more than one chunk), written once for
    eager calls and compiled graphs (see :func:`launch_block_schedule`).

    Returns ``(prefix_CE, expert_counts)``: ``prefix_CE[c, e]`` = slots of expert ``e`` in the chunks
    before ``c`` ((num_chunks, E) int32); ``expert_counts`` (E,) int32 valid slots per expert.
    """
    counts_CE = alloc(num_chunks, num_experts)
    expert_counts = alloc(num_experts)
    e_pad = expert_pad(num_experts)
    launch(_chunk_histogram_kernel, (num_chunks,), 4, ids_S, counts_CE, num_slots, num_experts,
           CHUNK=chunk, E_PAD=e_pad)
    # ~64 programs of a few experts each (H100: E_TILE=4 x C_TILE=1024 at E=256, 1024 chunks: 4 us).
    e_tile = min(e_pad, max(4, triton.next_power_of_2(triton.cdiv(num_experts, 64))))
    if not any_count and num_chunks <= 16:
        e_tile = e_pad
    c_tile = max(1, 4096 // e_tile)
    if not any_count:
        c_tile = min(triton.next_power_of_2(num_chunks), c_tile)
    launch(_chunk_scan_kernel, (cdiv(num_experts, e_tile),), 4, counts_CE, expert_counts, num_chunks, num_experts,
           C_TILE=c_tile, E_TILE=e_tile)
    return counts_CE, expert_counts


def chunk_prefix(ids_S: torch.Tensor, num_experts: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`launch_chunk_prefix` on tensors."""
    num_slots = ids_S.numel()

    def alloc(*shape):
        return torch.empty(shape, dtype=torch.int32, device=ids_S.device)

    return launch_chunk_prefix(launch_jit, alloc, ids_S, num_slots, num_experts, chunk, triton.cdiv(num_slots, chunk))


def launch_block_schedule(
    launch, alloc, ids_S, num_slots, num_experts: int, block_m: int,
    cdiv=triton.cdiv, maximum=max, minimum=min, any_count: bool = False,
) -> BlockSchedule:
    """The schedule's launches, written once for the eager op (``launch`` calls a kernel, ``alloc(*shape)``
    makes an int32 tensor) and the compiled graph (lowering/inductor/kernel_calls.py: the same on Inductor IR, a
    symbolic slot count with sympy's ``cdiv``/``maximum``/``minimum``). ``ids_S``: the flat, contiguous
    ids, ``num_slots`` > 0 of them. ``any_count``: tiles and launches that hold for every slot count (a
    graph for every T): chunks of MAX_CHUNK and the three-launch form even where one chunk would do."""
    s_max, b_max = schedule_sizes(num_slots, num_experts, block_m, minimum, cdiv)
    chunk = MAX_CHUNK if any_count else chunk_size(num_slots)
    num_chunks = cdiv(num_slots, chunk)
    single = not any_count and num_chunks == 1
    if single:
        prefix_CE = ids_S  # unused
        expert_counts = alloc(num_experts)
    else:
        prefix_CE, expert_counts = launch_chunk_prefix(
            launch, alloc, ids_S, num_slots, num_experts, chunk, num_chunks, cdiv, any_count
        )

    sorted_slots = alloc(s_max)
    block_expert = alloc(b_max)
    num_padded = alloc(1)
    expert_offsets = alloc(num_experts + 1)
    e_pad = expert_pad(num_experts)
    block_m_pad = triton.next_power_of_2(block_m)
    block_b = max(1, min(32, 4096 // block_m_pad, 8192 // e_pad))
    if not any_count:
        block_b = min(block_b, triton.next_power_of_2(b_max))
    num_block_tiles = cdiv(b_max, block_b)
    # Tiles sized to the blocks there are, and warps to the tiles: a decode-sized schedule (a few
    # blocks, one chunk) runs on one warp. Measured 4.3 -> 4.1 us for one Qwen3-30B-A3B token on the
    # H100: the kernel is latency-bound (benchmarks/NOTES.md, v5).
    largest_tile = max(chunk, e_pad, block_b * max(e_pad, block_m_pad))
    num_warps = max(1, min(4, largest_tile // _ELEMENTS_PER_WARP))
    launch(
        _schedule_scatter_kernel, (maximum(num_chunks, num_block_tiles),), num_warps,
        ids_S, prefix_CE, expert_counts, sorted_slots, block_expert, num_padded, expert_offsets,
        num_slots, num_experts, num_chunks, b_max, num_block_tiles, block_m,
        CHUNK=chunk, E_PAD=e_pad, BLOCK_B=block_b, BLOCK_M_PAD=block_m_pad, SINGLE=single,
    )
    return BlockSchedule(sorted_slots, block_expert, num_padded, expert_counts, expert_offsets)


def block_schedule_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, any_count: bool = False
) -> BlockSchedule:
    """Triton version of :func:`moe_ops.schedule.block_schedule_ref` (bit-exact, no host sync).
    ``any_count``: the launches a compiled graph for every token count makes (tested against the same
    reference).

    Args:
        topk_ids:    (T, K) int32/int64  expert of each slot; ids outside [0, E) are skipped
        num_experts: E
        block_m:     rows per GEMM block

    Returns:
        :class:`BlockSchedule` (int32, on the ids' device). One launch when T*K <= MAX_CHUNK, else three.
    """
    device = topk_ids.device
    num_slots = topk_ids.numel()
    i32 = dict(dtype=torch.int32, device=device)
    if num_slots == 0:
        s_max, b_max = schedule_sizes(num_slots, num_experts, block_m)
        return BlockSchedule(
            torch.full((s_max,), num_slots, **i32),
            torch.full((b_max,), -1, **i32),
            torch.zeros((1,), **i32),
            torch.zeros((num_experts,), **i32),
            torch.zeros((num_experts + 1,), **i32),
        )

    def alloc(*shape):
        return torch.empty(shape, **i32)

    return launch_block_schedule(
        launch_jit, alloc, topk_ids.reshape(-1).contiguous(), num_slots, num_experts, block_m, any_count=any_count
    )


def launch_rows_in_schedule_order(
    launch, x, sorted_slots, out, num_positions, num_tokens, hidden: int, stride_xt, top_k: int, cdiv=triton.cdiv,
    active=1,
) -> None:
    """``out`` (positions, H) = x's rows in schedule order (what TMA tiles and torch's grouped GEMM load:
    they cannot gather), rows of no routed slot 0; written once for the eager op and the compiled graph
    (see :func:`launch_block_schedule`). ``active`` (0 or 1, a graph's expression in the token count): no
    program where 0, for a graph whose TMA tiles, the only readers, do not run at that count."""
    block_h = min(1024, triton.next_power_of_2(hidden))
    launch(_rows_in_schedule_order_kernel, (cdiv(num_positions, 8) * active,), 4,
           x, sorted_slots, out, num_positions, num_tokens, hidden, stride_xt, TOP_K=top_k, BLOCK_R=8,
           BLOCK_H=block_h)


def rows_in_schedule_order(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """(positions, H): ``x[sorted_slots // top_k]`` for x (T, H), rows of no routed slot 0."""
    x = x if x.stride(1) == 1 else x.contiguous()
    out = x.new_empty((sorted_slots.shape[0], x.shape[1]))
    launch_rows_in_schedule_order(
        launch_jit, x, sorted_slots, out, sorted_slots.shape[0], x.shape[0], x.shape[1], x.stride(0), top_k
    )
    return out
