"""Expert capacity: each expert keeps at most ``capacity`` of its slots, the rest are dropped.

Shape legend: T tokens, K experts per token (top-k), E experts, S = T*K slots (slot s = t*K + j).

A dropped slot gets the id ``E``, the sentinel every op skips (its token gets no contribution from
that choice). Ids already outside ``[0, E)`` pass through unchanged and are not counted as dropped.
Which slots an expert keeps:

* ``policy="position"``: its ``capacity`` lowest slot numbers (token order, GShard/Switch style);
* ``policy="score"``: its ``capacity`` highest ``topk_weights``, ties to the lower slot.

``capacity < 0`` means dropless (ids unchanged). Not differentiable: only ids come out.
"""

from __future__ import annotations

import math

import torch

from moe_ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_tensor

POLICIES = ("position", "score")


def capacity_from_factor(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots per expert: ``ceil(factor * T * K / E)``; ``factor <= 0`` means dropless (-1)."""
    if num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts}")
    if capacity_factor <= 0:
        return -1
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def _check_capacity_args(topk_ids, topk_weights, num_experts: int, capacity: int, policy: str) -> None:
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor(
        "topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtypes=FLOAT_DTYPES, device=topk_ids.device
    )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity: expected an int (< 0 for dropless), got {capacity!r}")
    check_choice("policy", policy, POLICIES)


def _expert_order(expert_S: torch.Tensor, num_experts: int, first: torch.Tensor | None = None):
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


def _apply_capacity_torch(topk_ids, topk_weights, num_experts: int, capacity: int, policy: str):
    """The capacity rule in device-side torch ops (no host sync); used by the reference and, for
    ``policy="score"``, by the CUDA kernel."""
    expert_S = topk_ids.reshape(-1).long()
    valid_S = (expert_S >= 0) & (expert_S < num_experts)
    if policy == "score":
        # Stable sort by descending weight (ties keep the lower slot), then stably by expert.
        by_weight = torch.sort(topk_weights.reshape(-1), descending=True, stable=True).indices
        order, rank = _expert_order(expert_S, num_experts, first=by_weight)
    else:
        order, rank = _expert_order(expert_S, num_experts)
    rank_S = torch.empty_like(rank).scatter_(0, order, rank)
    drop_S = valid_S & (rank_S >= capacity)
    kept = torch.where(drop_S, num_experts, expert_S).to(torch.int32).reshape(topk_ids.shape)
    return kept, drop_S.sum().to(torch.int32)


def apply_capacity_ref(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    policy: str = "position",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch definition of the capacity rule (the semantics every kernel is tested against)."""
    _check_capacity_args(topk_ids, topk_weights, num_experts, capacity, policy)
    if capacity < 0 or topk_ids.numel() == 0:
        return topk_ids.to(torch.int32, copy=True), torch.zeros((), dtype=torch.int32, device=topk_ids.device)
    return _apply_capacity_torch(topk_ids, topk_weights, num_experts, capacity, policy)


@torch.library.custom_op("moe_ops::apply_capacity", mutates_args=())
def _apply_capacity_op(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity: int, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_capacity_ref(topk_ids, topk_weights, num_experts, capacity, policy)


@_apply_capacity_op.register_kernel("cuda")
def _(topk_ids, topk_weights, num_experts, capacity, policy):
    from moe_ops.capacity_triton import apply_capacity_triton

    _check_capacity_args(topk_ids, topk_weights, num_experts, capacity, policy)
    return apply_capacity_triton(topk_ids, topk_weights, num_experts, capacity, policy)


@_apply_capacity_op.register_fake
def _(topk_ids, topk_weights, num_experts, capacity, policy):
    _check_capacity_args(topk_ids, topk_weights, num_experts, capacity, policy)
    return topk_ids.new_empty(topk_ids.shape, dtype=torch.int32), topk_ids.new_empty((), dtype=torch.int32)


def apply_capacity(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    policy: str = "position",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the slots over each expert's capacity by setting their id to ``num_experts``.

    Args:
        topk_ids:     (T, K) int32/int64  expert of each slot; ids outside [0, num_experts) pass through
        topk_weights: (T, K) float        routing weights (ranks the slots for ``policy="score"``)
        num_experts:  E
        capacity:     slots each expert keeps; < 0: dropless (see :func:`capacity_from_factor`)
        policy:       "position" (lowest slot numbers kept) | "score" (highest weights, ties -> lower slot)

    Returns:
        ``(kept_ids (T, K) int32, num_dropped () int32)``, both on the ids' device, no host sync.
    """
    # Checked before the op: its schema would turn capacity=True into 1 and refuse 1.5 in its own words.
    _check_capacity_args(topk_ids, topk_weights, num_experts, capacity, policy)
    return torch.ops.moe_ops.apply_capacity(topk_ids, topk_weights, num_experts, capacity, policy)
