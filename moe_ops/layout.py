"""Shared types and sizes of the op layer, below both the ops and their kernels (which import it, never
each other the wrong way): the block schedule's type and static sizes, the capacity rule in device-side
torch, and the split of a fused gate/up weight.

Shape legend: T tokens, K experts per token, E experts, S = T*K slots (slot s = t*K + j).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from moe_ops._checks import check_int, check_number
from moe_ops._compat.tracing import register_for_export, sym_ceil, sym_min


@functools.partial(register_for_export, name="moe_ops.BlockSchedule")
class BlockSchedule(NamedTuple):
    """Routing metadata consumed by :func:`moe_ops.expert_gemm`. All int32, all on the ids' device."""

    sorted_slots: torch.Tensor  # (S_MAX,) slots by expert, ascending within an expert; padding = S
    block_expert: torch.Tensor  # (B_MAX,) expert of each block; -1 for blocks past num_padded
    num_padded: torch.Tensor  # (1,) rows in use = sum over experts of counts rounded up to block_m
    expert_counts: torch.Tensor  # (E,) valid slots per expert (ids outside [0, E) are skipped)
    expert_offsets: torch.Tensor  # (E + 1,) exclusive cumsum of expert_counts; [E] = valid slots


class PaddedSchedule(NamedTuple):
    """What an expert GEMM reads of a BlockSchedule built for its block_m: each expert's slots padded to
    whole blocks, each block's expert listed."""

    sorted_slots: torch.Tensor  # BlockSchedule.sorted_slots
    block_expert: torch.Tensor  # BlockSchedule.block_expert
    num_padded: torch.Tensor  # BlockSchedule.num_padded


class PackedSchedule(NamedTuple):
    """A schedule without padding (``block_schedule(ids, E, 1)``): each expert's slots follow the previous
    expert's, so one schedule serves a GEMM of any block_m (its programs find their blocks from the
    offsets) and a graph compiled for every T shares it between several block sizes."""

    sorted_slots: torch.Tensor  # (S,) BlockSchedule.sorted_slots
    expert_offsets: torch.Tensor  # (E + 1,) BlockSchedule.expert_offsets


def _cdiv(a, b):
    return (a + b - 1) // b


def schedule_sizes(num_slots, num_experts: int, block_m: int, minimum=sym_min, cdiv=_cdiv):
    """(S_MAX, B_MAX): the worst case is every expert that can have a slot (at most min(E, S) of
    them) ending in a partial block. ``num_slots`` may be symbolic: a SymInt under torch.compile, or
    a sympy expression in a lowering, which passes sympy's ``Min`` and ``CeilDiv``."""
    padded_experts = minimum(num_experts, num_slots)
    s_max = cdiv(num_slots + padded_experts * (block_m - 1), block_m) * block_m
    return s_max, cdiv(s_max, block_m)


def padded_offsets(counts_E: torch.Tensor, block_m: int) -> torch.Tensor:
    """(E + 1,): where each expert's run starts in the schedule, each run padded to whole blocks."""
    return torch.nn.functional.pad(((counts_E + block_m - 1) // block_m * block_m).cumsum(0), (1, 0))


def capacity_from_factor(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots per expert: ``ceil(factor * T * K / E)`` (see :func:`scaled_ceil`), at most T * K (no expert gets
    more slots than there are, so a larger capacity keeps the same ones); ``factor <= 0`` means dropless (-1)."""
    check_number("capacity_factor", capacity_factor)
    check_int("num_tokens", num_tokens, minimum=0)
    check_int("top_k", top_k, minimum=1)
    check_int("num_experts", num_experts, minimum=1)
    if capacity_factor <= 0:
        return -1
    if capacity_factor >= num_experts:  # ceil(factor * T * K / E) >= T * K: every slot fits
        return num_tokens * top_k
    return scaled_ceil(capacity_factor, num_tokens * top_k, num_experts)


# Relative slack that absorbs a float product's rounding error (scaled_ceil).
_FLOAT_PRODUCT_SLACK = 2.0**-40


def scaled_ceil(factor: float, count, divisor: int):
    """``ceil(factor * count / divisor)`` without the float product's rounding error: 1.1 * 800 / 8 is
    110.00000000000001 in floats, one slot more than asked for. The product is lowered by 2**-40 of itself
    first, far more than its error (a few units of 2**-53) and less than any fraction a factor of up to six
    decimals can leave above a whole number while factor digits * count stays below 10**12. Plain
    arithmetic: ``count`` may be a SymInt, the call traced by dynamo and saved by torch.export (sym_ceil)."""
    return sym_ceil(factor * count / divisor * (1 - _FLOAT_PRODUCT_SLACK))


def expert_order(expert_S: torch.Tensor, num_experts: int, first: torch.Tensor | None = None):
    """Slots grouped by expert (invalid ids last), stable, optionally pre-ordered by ``first``.

    Returns ``(order, rank)``: ``order`` the slot numbers in that order, ``rank[i]`` the position of
    ``order[i]`` among its expert's slots. Device-side torch only (no host synchronisation).
    """
    key = torch.where((expert_S >= 0) & (expert_S < num_experts), expert_S, num_experts)
    if first is not None:
        key = key[first]
    sorted_key, order = torch.sort(key, stable=True)
    if first is not None:
        order = first[order]
    starts = torch.searchsorted(sorted_key, torch.arange(num_experts + 1, device=key.device, dtype=key.dtype))
    rank = torch.arange(key.numel(), device=key.device) - starts[sorted_key]
    return order, rank


def ids_as_int32(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``ids`` as int32 (a copy), each id int32 cannot hold (outside [0, E), so skipped) as ``num_experts``: a
    wrapped int64 id could name a real expert."""
    as_int32 = ids.to(torch.int32, copy=True)
    return torch.where(as_int32.to(ids.dtype) == ids, as_int32, num_experts)


def apply_capacity_torch(topk_ids, topk_weights, num_experts: int, capacity: int, policy: str):
    """The capacity rule in device-side torch ops (no host sync); used by the reference and, for
    ``policy="score"`` and ``"gshard"``, by the CUDA kernel."""
    expert_S = topk_ids.reshape(-1).long()
    valid_S = (expert_S >= 0) & (expert_S < num_experts)
    if policy == "score":
        # Stable sort by descending weight (ties keep the lower slot), then stably by expert.
        by_weight = torch.sort(topk_weights.reshape(-1), descending=True, stable=True).indices
        order, rank = expert_order(expert_S, num_experts, first=by_weight)
    elif policy == "gshard":
        # Slots by choice, then token: (j, t) order is the transposed (T, K) slot grid.
        by_choice = torch.arange(expert_S.numel(), device=expert_S.device).view(topk_ids.shape).t().reshape(-1)
        order, rank = expert_order(expert_S, num_experts, first=by_choice)
    else:
        order, rank = expert_order(expert_S, num_experts)
    rank_S = torch.empty_like(rank).scatter_(0, order, rank)
    drop_S = valid_S & (rank_S >= capacity)
    kept = ids_as_int32(torch.where(drop_S, num_experts, expert_S), num_experts).reshape(topk_ids.shape)
    return kept, drop_S.sum().to(torch.int32)


def split_gate_up(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up parts of a shared 2F axis (dim 1) as views: HF concatenates the two halves,
    GPT-OSS interleaves them."""
    if interleaved:
        return t[:, 0::2], t[:, 1::2]
    half = t.shape[1] // 2
    return t[:, :half], t[:, half:]
