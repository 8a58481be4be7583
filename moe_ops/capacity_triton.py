"""Triton kernel of ``moe_ops::apply_capacity`` (CUDA registration in :mod:`moe_ops.capacity`).

``policy="position"`` reuses the block schedule's counting sort (:mod:`moe_ops.schedule_triton`): the
rank of a slot among its expert's slots in slot order is ``prefix[c, e]`` (that expert's slots in the
earlier chunks, from the histogram + scan kernels) plus its rank inside its chunk (``_sort_chunk``);
the slot is kept iff that rank is below ``capacity``. One launch when all slots fit in one chunk,
else three. ``num_dropped = sum_e max(count_e - capacity, 0)``, computed by program 0 from the counts,
so no atomics and no second reduction pass.

``policy="score"`` and ``"gshard"`` run device-side torch ops (stable sorts; see ``apply_capacity_torch``).
Neither path synchronises with the host, so both can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ops.layout import apply_capacity_torch, ids_as_int32
from moe_ops.schedule_triton import (
    _expert_counts,
    _load_chunk_ids,
    _sort_chunk,
    chunk_prefix,
    chunk_size,
    expert_pad,
)


@triton.jit
def _capacity_position_kernel(
    ids_ptr,
    prefix_ptr,
    expert_counts_ptr,
    kept_ptr,
    num_dropped_ptr,
    num_slots,
    num_experts,
    capacity,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
    SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    slot, raw, expert, valid = _load_chunk_ids(ids_ptr, pid, num_slots, num_experts, CHUNK)
    # Ids outside [0, E) pass through unchanged (in slot order; E where int32 cannot hold them) ...
    as_int32 = raw.to(tl.int32)
    tl.store(kept_ptr + slot, tl.where(as_int32.to(raw.dtype) == raw, as_int32, num_experts),
             mask=(slot < num_slots) & ~valid)
    # ... the others are ranked within their expert (in (expert, slot) order).
    s_expert, s_local, rank, s_valid = _sort_chunk(expert, valid, num_experts, CHUNK)
    s_expert = tl.where(s_valid, s_expert, 0)
    if not SINGLE:
        rank += tl.load(prefix_ptr + pid.to(tl.int64) * num_experts + s_expert, mask=s_valid, other=0)
    kept = tl.where(rank < capacity, s_expert, num_experts)
    tl.store(kept_ptr + pid.to(tl.int64) * CHUNK + s_local, kept, mask=s_valid)

    if pid == 0:
        counts = _expert_counts(ids_ptr, expert_counts_ptr, num_slots, num_experts, CHUNK, E_PAD, SINGLE)
        dropped = tl.sum(tl.maximum(counts - capacity, 0), axis=0)
        e = tl.arange(0, E_PAD)
        tl.store(num_dropped_ptr + e, tl.zeros([E_PAD], dtype=tl.int32) + dropped, mask=e == 0)


def apply_capacity_triton(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    policy: str = "position",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU version of :func:`moe_ops.capacity.apply_capacity_ref` (bit-exact, no host sync).

    Returns ``(kept_ids (T, K) int32, num_dropped () int32)``; arguments as the reference's.
    """
    device = topk_ids.device
    num_slots = topk_ids.numel()
    if capacity < 0 or num_slots == 0:
        return ids_as_int32(topk_ids, num_experts), torch.zeros((), dtype=torch.int32, device=device)
    if policy != "position":
        return apply_capacity_torch(topk_ids, topk_weights, num_experts, capacity, policy)

    capacity = min(capacity, num_slots)  # keeps the kernel argument in int32
    ids_S = topk_ids.reshape(-1).contiguous()
    chunk = chunk_size(num_slots)
    num_chunks = triton.cdiv(num_slots, chunk)
    single = num_chunks == 1
    if single:
        prefix_CE, expert_counts = ids_S, ids_S  # unused
    else:
        prefix_CE, expert_counts = chunk_prefix(ids_S, num_experts, chunk)
    kept = torch.empty(topk_ids.shape, dtype=torch.int32, device=device)
    num_dropped = torch.empty((), dtype=torch.int32, device=device)
    _capacity_position_kernel[(num_chunks,)](
        ids_S,
        prefix_CE,
        expert_counts,
        kept,
        num_dropped,
        num_slots,
        num_experts,
        capacity,
        CHUNK=chunk,
        E_PAD=expert_pad(num_experts),
        SINGLE=single,
        num_warps=4,
    )
    return kept, num_dropped
