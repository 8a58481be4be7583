"""Block schedule: token slots grouped by expert and padded per expert to whole GEMM blocks.

Shape legend: T tokens, K experts per token (top-k), E experts, S = T*K slots,
S_MAX = static upper bound on padded rows, B_MAX = S_MAX // block_m blocks.

A *slot* is one (token, choice) pair, numbered ``s = t * K + j``. The schedule lists the slots of
expert 0, then expert 1, ..., each expert's run padded with the sentinel ``S`` to a multiple of
``block_m`` so that every GEMM block of ``block_m`` rows belongs to one expert. Every output has a
size that depends only on input shapes (no host synchronisation, CUDA-graph safe); the true sizes
(``num_padded``, counts) stay on the device and the kernels read them.
"""

from __future__ import annotations

import torch

from moe_ops._checks import INDEX_DTYPES, check_int, check_tensor
from moe_ops.layout import BlockSchedule, padded_offsets, schedule_sizes
from moe_ops.schedule_triton import block_schedule_triton


def _check_schedule_scalars(num_experts: int, block_m: int) -> None:
    check_int("num_experts", num_experts, minimum=1)
    check_int("block_m", block_m, minimum=1)


def _check_schedule_args(topk_ids, num_experts: int, block_m: int) -> None:
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    _check_schedule_scalars(num_experts, block_m)


def block_schedule_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> BlockSchedule:
    """Plain-PyTorch definition of the schedule (the semantics every kernel is tested against)."""
    _check_schedule_args(topk_ids, num_experts, block_m)
    device = topk_ids.device
    num_slots = topk_ids.numel()
    s_max, b_max = schedule_sizes(num_slots, num_experts, block_m)

    expert_S = topk_ids.reshape(-1).long()
    valid_S = (expert_S >= 0) & (expert_S < num_experts)  # any other id: routed to no expert
    counts_E = torch.bincount(expert_S[valid_S], minlength=num_experts)
    offsets_E1 = torch.nn.functional.pad(counts_E.cumsum(0), (1, 0))
    padded_offsets_E1 = padded_offsets(counts_E, block_m)
    num_padded = padded_offsets_E1[-1]

    # A stable sort keeps slots of one expert in ascending slot order; sentinels sort last.
    order_S = torch.sort(torch.where(valid_S, expert_S, num_experts), stable=True).indices
    num_valid = int(offsets_E1[-1])
    sorted_expert = expert_S[order_S[:num_valid]]
    rank_in_expert = torch.arange(num_valid, device=device) - offsets_E1[sorted_expert]
    position = padded_offsets_E1[sorted_expert] + rank_in_expert

    sorted_slots = torch.full((s_max,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[position] = order_S[:num_valid].to(torch.int32)

    block_start_B = torch.arange(b_max, device=device) * block_m
    block_expert = torch.searchsorted(padded_offsets_E1[1:], block_start_B, right=True)
    block_expert = torch.where(block_start_B < num_padded, block_expert, -1)

    return BlockSchedule(
        sorted_slots,
        block_expert.to(torch.int32),
        num_padded.reshape(1).to(torch.int32),
        counts_E.to(torch.int32),
        offsets_E1.to(torch.int32),
    )


@torch.library.custom_op("moe_ops::block_schedule", mutates_args=())
def _block_schedule_op(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(block_schedule_ref(topk_ids, num_experts, block_m))


@_block_schedule_op.register_kernel("cuda")
def _(topk_ids, num_experts, block_m):
    _check_schedule_args(topk_ids, num_experts, block_m)
    return tuple(block_schedule_triton(topk_ids, num_experts, block_m))


@_block_schedule_op.register_fake
def _(topk_ids, num_experts, block_m):
    _check_schedule_args(topk_ids, num_experts, block_m)
    s_max, b_max = schedule_sizes(topk_ids.numel(), num_experts, block_m)
    new = lambda n: topk_ids.new_empty((n,), dtype=torch.int32)  # noqa: E731
    return new(s_max), new(b_max), new(1), new(num_experts), new(num_experts + 1)


def block_schedule(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> BlockSchedule:
    """Group the slots of ``topk_ids`` by expert, padded per expert to multiples of ``block_m``.

    Args:
        topk_ids:    (T, K) int32/int64  expert of each slot; ids outside [0, num_experts) are
                                         skipped (routed to no expert: dropped slots, expert-parallel
                                         sentinels)
        num_experts: E
        block_m:     rows per GEMM block

    Returns:
        :class:`BlockSchedule` of int32 tensors with static sizes S_MAX = ceil((S + min(E, S) *
        (block_m - 1)) / block_m) * block_m and B_MAX = S_MAX / block_m. Deterministic: no atomics.
    """
    # The scalars are checked before the op too: its schema would turn num_experts=True into 1. The op checks
    # the tensor.
    _check_schedule_scalars(num_experts, block_m)
    return BlockSchedule(*torch.ops.moe_ops.block_schedule(topk_ids, num_experts, block_m))
