"""Expert capacity: each expert keeps at most ``capacity`` of its slots, the rest are dropped.

Shape legend: T tokens, K experts per token (top-k), E experts, S = T*K slots (slot s = t*K + j).

A dropped slot gets the id ``E``, the sentinel every op skips (its token gets no contribution from
that choice). Ids already outside ``[0, E)`` pass through unchanged (``E`` where int32 cannot hold them) and are
not counted as dropped.
Which slots an expert keeps:

* ``policy="position"``: its ``capacity`` lowest slot numbers (token order: a token's second choice
  outranks a later token's first; Switch Transformers with K = 1, Megatron's "position");
* ``policy="gshard"``: every token's first choice before any token's second choice, each choice in
  token order (GShard's order: later tokens keep their first choice before earlier tokens' second);
* ``policy="score"``: its ``capacity`` highest ``topk_weights``, ties to the lower slot.

``capacity < 0`` means dropless (ids unchanged). Not differentiable: only ids come out.
"""

from __future__ import annotations

import torch

from moe_ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_int, check_tensor
from moe_ops.capacity_triton import apply_capacity_triton
from moe_ops.layout import apply_capacity_torch, ids_as_int32

POLICIES = ("position", "gshard", "score")


INT64_MIN, INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max


def _check_capacity_scalars(num_experts: int, capacity: int, policy: str) -> None:
    check_int("num_experts", num_experts, minimum=1)
    # A SymInt under torch.compile with a dynamic token count (a capacity computed from T).
    if isinstance(capacity, bool) or not isinstance(capacity, (int, torch.SymInt)):
        raise TypeError(f"capacity: expected an int (< 0 for dropless), got {capacity!r}")
    if isinstance(capacity, int) and not INT64_MIN <= capacity <= INT64_MAX:  # the op's schema holds an int64
        raise ValueError(f"capacity: expected an int in [-2**63, 2**63 - 1] (any capacity >= T * K keeps every "
                         f"slot, any < 0 is dropless), got {capacity}")
    check_choice("policy", policy, POLICIES)


def _check_capacity_args(topk_ids, topk_weights, num_experts: int, capacity: int, policy: str) -> None:
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor(
        "topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtypes=FLOAT_DTYPES, device=topk_ids.device
    )
    _check_capacity_scalars(num_experts, capacity, policy)


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
        return ids_as_int32(topk_ids, num_experts), torch.zeros((), dtype=torch.int32, device=topk_ids.device)
    return apply_capacity_torch(topk_ids, topk_weights, num_experts, capacity, policy)


@torch.library.custom_op("moe_ops::apply_capacity", mutates_args=())
def _apply_capacity_op(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity: int, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_capacity_ref(topk_ids, topk_weights, num_experts, capacity, policy)


@_apply_capacity_op.register_kernel("cuda")
def _(topk_ids, topk_weights, num_experts, capacity, policy):
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
        topk_ids:     (T, K) int32/int64  expert of each slot; ids outside [0, num_experts) pass through (as
                                          num_experts where int32 cannot hold them)
        topk_weights: (T, K) float        routing weights (ranks the slots for ``policy="score"``)
        num_experts:  E
        capacity:     slots each expert keeps; < 0: dropless (see :func:`capacity_from_factor`)
        policy:       "position" (lowest slot numbers kept) | "gshard" (first choices of every token
                      before second choices, each in token order) | "score" (highest weights, ties ->
                      lower slot)

    Returns:
        ``(kept_ids (T, K) int32, num_dropped () int32)``, both on the ids' device, no host sync.
    """
    # The scalars are checked before the op: its schema would turn capacity=True into 1 and refuse 1.5 in
    # its own words. The op checks the tensors.
    _check_capacity_scalars(num_experts, capacity, policy)
    return torch.ops.moe_ops.apply_capacity(topk_ids, topk_weights, num_experts, capacity, policy)
