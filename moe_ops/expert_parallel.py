"""Expert parallelism: the routed experts of one MoE layer sharded over the ranks of a process group, the
tokens sent to the ranks that hold their experts and the results sent back, through torch.distributed's
functional collectives (so the whole layer traces into one torch.compile graph and has autograd).

Shape legend: T tokens on this rank, K experts per token, E experts in all, R ranks, E_local = E / R
experts on each rank (rank r holds experts [r * E_local, (r + 1) * E_local)), H hidden, S = T * K slots,
C rows each rank sends each rank in padded mode.

Two dispatches:

- ``"padded"``: every rank sends every rank a fixed block of C rows (``capacity_factor`` sets C; by
  default C = T * min(K, E_local), which no routing overflows: a token naming one expert in several slots
  sends it one row, weighted by their weights' sum), so shapes never depend on the routing: no
  host synchronisation, one compiled graph whatever the routing, CUDA-graph safe. Slots past a
  destination's C (in slot order) are dropped and counted. Every rank must pass the same T.
- ``"exact"``: the ranks first exchange how many rows each sends each (one all-to-all of R counts and
  one host synchronisation per call, to size the second), then exactly the routed rows; nothing is
  dropped, and T may differ between ranks.

The exchange is three ops, ``moe_ops::ep_dispatch`` (rows and local expert ids out),
``moe_ops::ep_return`` (result rows back) and ``moe_ops::ep_combine`` (result rows back, weighted and
summed per token), whose one implementation is their decomposition into functional collectives: a compiled
graph shows them by name, and autograd, fake tensors and Inductor see the collectives inside.

Overlap (padded dispatch, ``pipeline_chunks`` = n > 1): each destination's block of rows is sent in n
chunks, every chunk's exchange issued before any expert runs; the experts then run chunk by chunk, each
chunk's results sent back as soon as they exist. A functional collective is waited for where its result is
first read, so chunk i + 1's dispatch is in flight while chunk i's experts run, and chunk i's return while
chunk i + 1's experts run (on NCCL, whose collectives run on their own stream). Each expert GEMM then sees
1 / n of the rows. On the receiving rank the rows are one batch of
single-slot tokens for :func:`moe_ops.fused_experts` over its local experts (its kernels, fake kernel and
backward as they are); the results come back in the same order and each token sums its K weighted rows
in fp32 (deterministic: no atomics, no scatter-add).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from moe_ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_bool, check_choice, check_number, check_tensor
from moe_ops._compat.distributed import all_to_all_single, all_to_all_single_autograd
from moe_ops._compat.tracing import check_value
from moe_ops.fused_experts import fused_experts
from moe_ops.layout import expert_order, scaled_ceil

DISPATCHES = ("padded", "exact")


class ExpertParallelPlan(NamedTuple):
    """How a sharded experts module exchanges tokens (``moe_ops.parallelize_experts`` sets it as the
    module's ``PLAN_ATTRIBUTE``)."""

    group: dist.ProcessGroup
    dispatch: str
    capacity_factor: float | None
    pipeline_chunks: int = 1

    def __deepcopy__(self, memo):
        """A copy of the sharded model (an EMA copy, AveragedModel) exchanges over the same group: the plan is
        shared, as DTensor's mesh is (a ProcessGroup cannot be copied)."""
        return self


PLAN_ATTRIBUTE = "_moe_ops_expert_parallel"


def check_capacity_factor(capacity_factor, dispatch: str) -> None:
    """None (dropless), or a finite positive number with the padded dispatch; else a TypeError / ValueError."""
    if capacity_factor is None:
        return
    check_number("capacity_factor", capacity_factor)
    if dispatch != "padded" or not capacity_factor > 0:
        raise ValueError(f"capacity_factor: a finite positive number with dispatch='padded', got {capacity_factor!r}")


def check_pipeline_chunks(pipeline_chunks, dispatch: str) -> None:
    """A ValueError unless ``pipeline_chunks`` is a positive int, above 1 only with the padded dispatch."""
    chunks_valid = isinstance(pipeline_chunks, int) and pipeline_chunks >= 1
    if not chunks_valid or (pipeline_chunks > 1 and dispatch != "padded"):
        raise ValueError(
            f"pipeline_chunks: a positive int, above 1 only with dispatch='padded', got {pipeline_chunks!r}")


# Dispatch and combine: moe_ops ops whose only implementation is their decomposition into functional
# collectives (CompositeImplicitAutograd), so eager calls, autograd, fake tensors and Inductor all see the
# collectives themselves (torch.compile keeps one graph, and Inductor may schedule compute around them).
_LIBRARY = torch.library.Library("moe_ops", "FRAGMENT")
_LIBRARY.define("ep_dispatch(Tensor x, Tensor send_token, Tensor send_ids, SymInt[] send_splits, "
                "SymInt[] recv_splits, str group_name) -> (Tensor, Tensor)")
_LIBRARY.define("ep_return(Tensor rows, SymInt[] send_splits, SymInt[] recv_splits, str group_name) -> Tensor")
_LIBRARY.define("ep_combine(Tensor rows, Tensor slot_row, Tensor topk_weights, SymInt[] send_splits, "
                "SymInt[] recv_splits, str group_name) -> Tensor")


def _ep_dispatch(x, send_token, send_ids, send_splits, recv_splits, group_name):
    """The rows x[send_token] (send_token T: a zero row) and their local expert ids sent to the ranks in
    ``send_splits`` blocks; returns the rows and ids this rank receives (``recv_splits`` from each rank)."""
    rows = torch.cat([x, x.new_zeros(1, x.shape[1])])[send_token]
    recv_x = all_to_all_single_autograd(rows, recv_splits, send_splits, group_name)
    return recv_x, all_to_all_single(send_ids, recv_splits, send_splits, group_name)


def _ep_return(rows, send_splits, recv_splits, group_name):
    """The experts' result rows sent back to the ranks they came from (``send_splits`` rows to each)."""
    return all_to_all_single_autograd(rows, recv_splits, send_splits, group_name)


def _token_sums(backs, slot_row, topk_weights):
    """Each of this rank's (T, K) slots takes the row ``slot_row`` of the rows that came back (``backs``, one
    tensor or several in turn; past their end: a zero row), weighted in fp32 (fp64 for fp64 rows), and each
    token sums its K slots so (a fixed order, as fused_experts): (T, H) in the rows' dtype."""
    backs = [backs] if isinstance(backs, torch.Tensor) else list(backs)
    slot_rows = torch.cat([*backs, backs[0].new_zeros(1, backs[0].shape[1])])[slot_row]
    acc_dtype = torch.promote_types(slot_rows.dtype, torch.float32)
    weighted = slot_rows.to(acc_dtype) * topk_weights.reshape(-1, 1).to(acc_dtype)
    # H named, not inferred: a rank with no tokens has (0, K, H) slots, whose -1 would be ambiguous.
    return weighted.view(*topk_weights.shape, slot_rows.shape[1]).sum(1).to(backs[0].dtype)


def _ep_combine(rows, slot_row, topk_weights, send_splits, recv_splits, group_name):
    """ep_return, then each token's weighted sum of its slots' rows (_token_sums)."""
    return _token_sums(torch.ops.moe_ops.ep_return(rows, send_splits, recv_splits, group_name), slot_row,
                       topk_weights)


_LIBRARY.impl("ep_dispatch", _ep_dispatch, "CompositeImplicitAutograd")
_LIBRARY.impl("ep_return", _ep_return, "CompositeImplicitAutograd")
_LIBRARY.impl("ep_combine", _ep_combine, "CompositeImplicitAutograd")


def fused_experts_ep(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    dispatch: str = "padded",
    capacity_factor: float | None = None,
    return_num_dropped: bool = False,
    pipeline_chunks: int = 1,
    **options,
):
    """:func:`moe_ops.fused_experts` with the experts sharded over ``group``'s ranks.

    Args:
        x, topk_weights, topk_ids: this rank's tokens, as for fused_experts; ids are global expert ids
                      in [0, E) (ids outside it are routed to no expert)
        w_gate_up, w_down: this rank's E_local experts (and ``options``' ``w_up`` and biases likewise),
                      in any layout fused_experts takes; every rank holds E_local = E / R (an id's rank is
                      id // E_local): "exact" refuses ranks that do not, "padded" cannot check it
        group:        the expert-parallel process group (default: the world)
        dispatch:     "padded" (no host synchronisation; every rank passes the same T) or "exact"
        capacity_factor: padded only: C = ceil(factor * S / R) rows per destination; None: dropless
        return_num_dropped: also return this rank's dropped slots (0-dim int32 tensor; 0 unless padded
                      with a capacity_factor)
        pipeline_chunks: padded only: send each destination's rows in this many chunks, so that one
                      chunk's exchange overlaps another's experts (module docstring); 1: one exchange
        options:      the other keyword arguments of fused_experts (layout, activation, w_up, biases...),
                      except its capacity_factor (capacity is this function's)

    Returns:
        (T, H) in x's dtype [, num_dropped]
    """
    check_choice("dispatch", dispatch, DISPATCHES)
    if "drop_policy" in options:  # capacity_factor is a parameter of its own, so never among the options
        raise ValueError("drop_policy: fused_experts_ep's capacity (its capacity_factor, padded dispatch) keeps each "
                         "expert's first slots; it takes no drop_policy")
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtypes=FLOAT_DTYPES, device=x.device)
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids: expected ({x.shape[0]}, K) like x's tokens, got {tuple(topk_ids.shape)}")
    check_capacity_factor(capacity_factor, dispatch)
    check_pipeline_chunks(pipeline_chunks, dispatch)
    check_bool("return_num_dropped", return_num_dropped)
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup (of a DeviceMesh: mesh.get_group()), got "
                        f"{type(group).__name__}")
    group = dist.group.WORLD if group is None else group
    num_ranks = dist.get_world_size(group)
    num_local = w_gate_up.shape[0]
    T, K = topk_ids.shape
    if not 1 <= K <= num_local * num_ranks:
        raise ValueError(f"topk_ids: expected 1 <= K <= E={num_local * num_ranks} choices per token (E_local = "
                         f"{num_local} experts on each of {num_ranks} ranks), got K={K}")
    S = T * K
    ids_S = topk_ids.reshape(-1).long()
    routed_S = (ids_S >= 0) & (ids_S < num_local * num_ranks)
    if dispatch == "padded" and capacity_factor is None:
        # Dropless: a token's later slots naming an expert that an earlier slot names go nowhere and their
        # weights join that slot's (the expert's output is the same), so a token sends each rank at most
        # min(K, E_local) rows, the block below. (fused_experts allows such ids; its sum is the same.)
        # Only the slots of a repeated id change: a multiply by 0 would carry another slot's inf or NaN weight.
        same_TKK = topk_ids[:, :, None] == topk_ids[:, None, :]
        repeat_TK = (same_TKK & torch.ones(K, K, dtype=torch.bool, device=x.device).tril(-1)).any(-1)
        merged_TK = torch.where(same_TKK, topk_weights[:, None, :], 0).sum(-1)
        topk_weights = torch.where(repeat_TK, 0, torch.where(same_TKK.sum(-1) > 1, merged_TK, topk_weights))
        routed_S = routed_S & ~repeat_TK.reshape(-1)
    dest_S = torch.where(routed_S, ids_S // num_local, num_ranks)  # R: no rank
    local_ids_S = torch.where(routed_S, ids_S - dest_S * num_local, num_local)  # E_local: no expert
    # Slots grouped by destination rank in slot order (unrouted ones last), and each one's place there.
    order, rank_in_order = expert_order(dest_S, num_ranks)

    token_S = torch.arange(S, device=x.device) // K
    group_name = group.group_name
    if dispatch == "padded":
        capacity = (T * min(K, num_local) if capacity_factor is None
                    else scaled_ceil(capacity_factor, S, num_ranks))
        position_S = torch.empty_like(rank_in_order).scatter_(0, order, rank_in_order)
        kept_S = routed_S & (position_S < capacity)
        num_dropped = (routed_S & ~kept_S).sum().to(torch.int32)
        # Each kept slot's row in the fixed send buffer of R blocks of C rows (rounded up to whole chunks:
        # the extra rows are padding); the others point past it (the spare last row below, not sent, and the
        # zero row the combine appends).
        block_rows = math.ceil(capacity / pipeline_chunks) * pipeline_chunks
        num_rows = num_ranks * block_rows
        row_S = torch.where(kept_S, dest_S * block_rows + position_S, num_rows)
        send_token = x.new_full((num_rows + 1,), T, dtype=torch.int64).index_copy(0, row_S, token_S)[:-1]
        send_ids = x.new_full((num_rows + 1,), num_local, dtype=torch.int64).index_copy(0, row_S, local_ids_S)[:-1]
        send_splits = recv_splits = [block_rows // pipeline_chunks] * num_ranks
        slot_row_S = row_S
    else:
        num_dropped = torch.zeros((), dtype=torch.int32, device=x.device)
        send_counts = torch.nn.functional.one_hot(dest_S, num_ranks + 1).sum(0)[:num_ranks]
        # Each destination also gets this rank's expert count: ids map to ranks by it, so the ranks must agree.
        send_meta = torch.stack([send_counts, torch.full_like(send_counts, num_local)], 1).reshape(-1)
        recv_meta = all_to_all_single(send_meta, [2] * num_ranks, [2] * num_ranks, group)
        # The one host synchronisation: the row counts size the exchange.
        send_splits = send_counts.tolist()
        recv_splits, local_counts = recv_meta.view(num_ranks, 2).T.tolist()
        # check_value: a ValueError, and an assertion dynamo can trace.
        message = (f"w_gate_up: every rank holds E / R experts (an id's rank is id // E_local); this rank holds "
                   f"{num_local}, another rank does not")
        for count in local_counts:
            check_value(count == num_local, message)
        num_sent = sum(send_splits)
        sent = order[:num_sent]
        send_token, send_ids = token_S[sent], local_ids_S[sent]
        # Each routed slot's place in the sent rows (unrouted slots come last in ``order``: past them).
        place_S = torch.empty_like(order).scatter_(0, order, torch.arange(S, device=x.device))
        slot_row_S = torch.where(routed_S, place_S, num_sent)

    if pipeline_chunks == 1:
        recv_x, recv_ids = torch.ops.moe_ops.ep_dispatch(x, send_token, send_ids, send_splits, recv_splits,
                                                         group_name)
        out_rows = _local_experts(recv_x, recv_ids, w_gate_up, w_down, options)
        out = torch.ops.moe_ops.ep_combine(out_rows, slot_row_S, topk_weights, recv_splits, send_splits, group_name)
    else:
        # Chunk j: rows [j C / n, (j + 1) C / n) of each destination's block. Every dispatch first, then each
        # chunk's experts and at once its return (module docstring: what overlaps).
        def chunk(t, j):
            return t.view(num_ranks, pipeline_chunks, -1)[:, j].reshape(-1)

        received = [torch.ops.moe_ops.ep_dispatch(x, chunk(send_token, j), chunk(send_ids, j), send_splits,
                                                  recv_splits, group_name) for j in range(pipeline_chunks)]
        backs = [torch.ops.moe_ops.ep_return(_local_experts(recv_x, recv_ids, w_gate_up, w_down, options),
                                             recv_splits, send_splits, group_name) for recv_x, recv_ids in received]
        # The returned rows come chunk by chunk, each chunk destination-major: a kept slot's row there (the
        # others past every chunk, at the zero row).
        chunk_rows = block_rows // pipeline_chunks
        position_S = torch.where(kept_S, position_S, 0)
        chunked_row_S = (position_S // chunk_rows * num_ranks + dest_S.clamp_max(num_ranks - 1)) * chunk_rows + (
            position_S % chunk_rows)
        out = _token_sums(backs, torch.where(kept_S, chunked_row_S, num_rows), topk_weights)
    return (out, num_dropped) if return_num_dropped else out


def _local_experts(rows, local_ids, w_gate_up, w_down, options):
    """fused_experts over received rows as single-slot tokens (weight 1; ids E_local: padding, zeros)."""
    ones = torch.ones((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
    return fused_experts(rows, ones, local_ids[:, None], w_gate_up, w_down, **options)
