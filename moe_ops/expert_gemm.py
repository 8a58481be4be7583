"""Grouped expert GEMM over a block schedule, with the expert MLP's pointwise work fused in.

Shape legend: T tokens, E experts, N output features, K reduction features, S slots (= T * top_k),
P = S_MAX schedule positions (rows of the padded, expert-sorted order), B = B_MAX blocks.

For schedule position p holding slot s = sorted_slots[p] of block expert e = block_expert[p // block_m]:

    a_row   = a[s // gather_top_k]        if gather_top_k > 0 (rows gathered from the tokens, no
              a[p]                        permuted copy)    else a is already in schedule order
    y       = a_row @ w[e].T (+ bias[e])                     accumulated in fp32
    y       = act(y, a_row @ w_up[e].T (+ bias_up[e]))       gated (w_up given), else act(y)
    y       = y * slot_weights[s]                            if slot_weights is given
    out[s]  = y    if scatter (out has S rows; slots never scheduled stay 0)
    out[p]  = y    otherwise (out has P rows; padding rows and unused blocks are 0)

Weights are (E, N, K) with any strides, so HF's (E, 2F, H) gate_up halves, GPT-OSS's interleaved
columns and torchtitan's transposed (E, H, F) tensors are all views, never copies. Quantised weights
(int8, fp8 e4m3 or packed int4 values with fp32 scales per row or per group, optional zero points:
moe_ops.quantised) stand for their dequantised values; the kernel reads the stored values, no dequantised
copy made.
"""

from __future__ import annotations

import torch

from moe_ops._autograd import refuse_unsupported_ad, register_reference_autograd
from moe_ops._checks import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    check_bool,
    check_choice,
    check_int,
    check_kernel_dtype,
    check_tensor,
)
from moe_ops.activations import (
    ACTIVATIONS,
    BY_NAME,
    CLAMPED_SWIGLU_ALPHA,
    CLAMPED_SWIGLU_LIMIT,
    activate_ref,
    check_clamp_constants,
    check_constants_read,
)
from moe_ops.expert_gemm_triton import expert_gemm_triton
from moe_ops.fused_experts_backward_triton import (
    activation_grad_triton,
    expert_row_sums,
    slot_positions,
    token_sums_triton,
    weight_grad_triton,
)
from moe_ops.layout import BlockSchedule, PaddedSchedule, schedule_sizes
from moe_ops.quantised import check_quantised_weight, dequantise


def _check_expert_gemm_args(
    a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
    num_slots, block_m, gather_top_k, activation, w_scale=None, w_up_scale=None, w_zero=None, w_up_zero=None,
) -> None:
    check_tensor("a", a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("w", w, ndim=3)
    E, N, K = w.shape[0], w.shape[1], a.shape[1]
    if w_scale is None:
        if w_zero is not None:
            raise ValueError("w_zero: zero points given without w_scale")
        check_tensor("w", w, shape=("E", "N", K), dtypes=(a.dtype,), device=a.device)
    else:
        check_quantised_weight("w", w, w_scale, w_zero, (E, N, K), a.device, scale_name="w_scale",
                               zero_name="w_zero")
    if w_up is not None:
        check_tensor("w_up", w_up, shape=tuple(w.shape), dtypes=(w.dtype,), device=a.device)
    if (w_up_scale is not None) != (w_up is not None and w_scale is not None):
        raise ValueError("w_up_scale: expected exactly when w_up is given with a scaled (quantised) w")
    if (w_up_zero is not None) != (w_up is not None and w_zero is not None):
        raise ValueError("w_up_zero: expected exactly when w_up is given with zero points of w (w_zero)")
    if w_up_scale is not None:
        check_quantised_weight("w_up", w_up, w_up_scale, w_up_zero, (E, N, K), a.device, scale_name="w_up_scale",
                               zero_name="w_up_zero")
        if w_up_scale.shape != w_scale.shape:
            raise ValueError(f"w_up_scale: expected w_scale's shape {tuple(w_scale.shape)}, got "
                             f"{tuple(w_up_scale.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(E, N), dtypes=FLOAT_DTYPES, device=a.device)
    if bias_up is not None:
        if w_up is None:
            raise ValueError("bias_up: given without w_up")
        check_tensor("bias_up", bias_up, shape=(E, N), dtypes=FLOAT_DTYPES, device=a.device)
    if slot_weights is not None:
        check_tensor("slot_weights", slot_weights, shape=(num_slots,), dtypes=FLOAT_DTYPES, device=a.device)
    check_tensor("sorted_slots", sorted_slots, ndim=1, dtypes=(torch.int32,), device=a.device)
    num_positions = sorted_slots.shape[0]
    if block_m < 1 or num_positions % block_m:
        raise ValueError(f"block_m: expected a positive divisor of len(sorted_slots)={num_positions}, got {block_m}")
    check_tensor("block_expert", block_expert, shape=(num_positions // block_m,), dtypes=(torch.int32,),
                 device=a.device)
    check_tensor("num_padded", num_padded, shape=(1,), dtypes=(torch.int32,), device=a.device)
    if gather_top_k > 0:
        if num_slots % gather_top_k:
            raise ValueError(f"num_slots: expected T * gather_top_k slots (a multiple of gather_top_k="
                             f"{gather_top_k}), got {num_slots}")
        if a.shape[0] * gather_top_k != num_slots:
            raise ValueError(
                f"a: expected ({num_slots // gather_top_k}, K) token rows for num_slots={num_slots} and "
                f"gather_top_k={gather_top_k}, got {tuple(a.shape)}"
            )
    elif a.shape[0] != num_positions:
        raise ValueError(f"a: expected ({num_positions}, K) rows in schedule order, got {tuple(a.shape)}")
    check_choice("activation", activation, ACTIVATIONS)
    if BY_NAME[activation].gated_only and w_up is None:
        raise ValueError(f"activation: {activation!r} is gated and needs w_up")


def expert_gemm_ref(
    a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
    num_slots, block_m, gather_top_k, scatter, activation, alpha, limit, w_scale=None, w_up_scale=None,
    w_zero=None, w_up_zero=None,
):
    """Plain-PyTorch definition of the op: a loop over experts (the semantics kernels are tested against)."""
    check_clamp_constants(alpha, limit)
    _check_expert_gemm_args(
        a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
        num_slots, block_m, gather_top_k, activation, w_scale, w_up_scale, w_zero, w_up_zero,
    )
    acc_dtype = torch.promote_types(a.dtype, torch.float32)
    if w_scale is not None:  # the values the quantised weights stand for
        w = dequantise(w, w_scale, w_zero)
        w_up = None if w_up is None else dequantise(w_up, w_up_scale, w_up_zero)
    num_positions = sorted_slots.shape[0]
    slot_P = sorted_slots.long()
    expert_P = block_expert.long().repeat_interleave(block_m)
    valid_P = (slot_P < num_slots) & (expert_P >= 0)
    a_row_P = slot_P // gather_top_k if gather_top_k > 0 else torch.arange(num_positions, device=a.device)

    out_PN = torch.zeros(num_positions, w.shape[1], dtype=acc_dtype, device=a.device)
    for e in range(w.shape[0]):
        pos = torch.nonzero(valid_P & (expert_P == e)).flatten()
        if pos.numel() == 0:
            continue
        x = a[a_row_P[pos]].to(acc_dtype)
        gate = x @ w[e].to(acc_dtype).T
        if bias is not None:
            gate = gate + bias[e].to(acc_dtype)
        up = None
        if w_up is not None:
            up = x @ w_up[e].to(acc_dtype).T
            if bias_up is not None:
                up = up + bias_up[e].to(acc_dtype)
        y = activate_ref(gate, up, activation, alpha, limit)
        if slot_weights is not None:
            y = y * slot_weights[slot_P[pos]].to(acc_dtype)[:, None]
        out_PN = out_PN.index_copy(0, pos, y)
    out_PN = out_PN.to(a.dtype)
    if not scatter:
        return out_PN
    valid_pos = torch.nonzero(valid_P).flatten()
    out_SN = torch.zeros(num_slots, w.shape[1], dtype=a.dtype, device=a.device)
    return out_SN.index_copy(0, slot_P[valid_pos], out_PN[valid_pos])


@torch.library.custom_op("moe_ops::expert_gemm", mutates_args=())
def _expert_gemm_op(
    a: torch.Tensor,
    w: torch.Tensor,
    w_up: torch.Tensor | None,
    bias: torch.Tensor | None,
    bias_up: torch.Tensor | None,
    slot_weights: torch.Tensor | None,
    sorted_slots: torch.Tensor,
    block_expert: torch.Tensor,
    num_padded: torch.Tensor,
    num_slots: int,
    block_m: int,
    gather_top_k: int,
    scatter: bool,
    activation: str,
    alpha: float,
    limit: float,
    w_scale: torch.Tensor | None = None,
    w_up_scale: torch.Tensor | None = None,
    w_zero: torch.Tensor | None = None,
    w_up_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    return expert_gemm_ref(
        a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
        num_slots, block_m, gather_top_k, scatter, activation, alpha, limit, w_scale, w_up_scale, w_zero, w_up_zero,
    )


@_expert_gemm_op.register_kernel("cuda")
def _(a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
      num_slots, block_m, gather_top_k, scatter, activation, alpha, limit, w_scale=None, w_up_scale=None,
      w_zero=None, w_up_zero=None):
    _check_expert_gemm_args(
        a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
        num_slots, block_m, gather_top_k, activation, w_scale, w_up_scale, w_zero, w_up_zero,
    )
    check_kernel_dtype("a", a)
    return expert_gemm_triton(
        a, w, PaddedSchedule(sorted_slots, block_expert, num_padded), num_slots, block_m, w_up=w_up, bias=bias,
        bias_up=bias_up, slot_weights=slot_weights, gather_top_k=gather_top_k, scatter=scatter,
        activation=activation, alpha=alpha, limit=limit, w_scale=w_scale, w_up_scale=w_up_scale, w_zero=w_zero,
        w_up_zero=w_up_zero,
    )


@_expert_gemm_op.register_fake
def _(a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
      num_slots, block_m, gather_top_k, scatter, activation, alpha, limit, w_scale=None, w_up_scale=None,
      w_zero=None, w_up_zero=None):
    _check_expert_gemm_args(
        a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
        num_slots, block_m, gather_top_k, activation, w_scale, w_up_scale, w_zero, w_up_zero,
    )
    rows = num_slots if scatter else sorted_slots.shape[0]
    return a.new_empty((rows, w.shape[1]))


_expert_gemm_backward_op = register_reference_autograd(
    _expert_gemm_op,
    expert_gemm_ref,
    differentiable=("a", "w", "w_up", "bias", "bias_up", "slot_weights"),
)


def expert_gemm_backward_triton(
    a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded, num_slots, block_m,
    gather_top_k, scatter, activation, alpha, limit, grad,
):
    """The gradients of a, w, w_up, bias, bias_up and slot_weights (an empty tensor for an absent argument, each
    laid out like its argument) of ``expert_gemm_ref`` for the output gradient ``grad``, with the kernels of
    fused_experts' backward and no host sync: the pre-activations recomputed in a's dtype, one pass for the
    activation's gradient (times each slot's weight, and each slot weight's gradient), the weight gradients
    per expert over its schedule rows, and a's gradient as the GEMMs against the transposed weights (summed
    over each token's slots in fp32 where the rows were gathered). The schedule is one ``block_schedule``
    built (each expert's blocks contiguous, in expert order); weights not quantised."""
    def empty():  # an absent argument's gradient, as the backward op's fake kernel gives it (one each: no aliases)
        return torch.empty(0)

    inputs = (a, w, w_up, bias, bias_up, slot_weights)
    if num_slots == 0 or sorted_slots.numel() == 0:
        return [empty() if t is None else torch.zeros_like(t) for t in inputs]
    schedule = PaddedSchedule(sorted_slots, block_expert, num_padded)
    num_experts = w.shape[0]
    slot_P = sorted_slots.long()
    routed_P = slot_P < num_slots
    if scatter:  # the output's slot rows, back in schedule order (rows of no slot: zero)
        g_PN = torch.where(routed_P[:, None], grad[slot_P.clamp(max=num_slots - 1)], 0)
    else:
        g_PN = grad

    def pre_activations(weight, b):
        return expert_gemm_triton(a, weight, schedule, num_slots, block_m, bias=b, gather_top_k=gather_top_k)

    gate = pre_activations(w, bias)
    up = None if w_up is None else pre_activations(w_up, bias_up)
    weights_S = slot_weights if slot_weights is not None else torch.ones(num_slots, device=a.device)
    d_gate = torch.empty_like(gate)
    d_up = None if up is None else torch.empty_like(up)
    # The activation times the slot weight, not needed here: written over g's rows where they are a copy of ours.
    h = g_PN if scatter else torch.empty_like(gate)
    d_weight_P = activation_grad_triton(gate, up, g_PN.to(a.dtype), weights_S, sorted_slots, h, d_gate, d_up,
                                        activation, alpha, limit)
    del gate, up, h
    # Rows of expert e: its blocks, contiguous from where the experts before it end.
    blocks_E = torch.zeros(num_experts + 1, dtype=torch.int64, device=a.device).scatter_add_(
        0, block_expert.long() + 1, torch.ones_like(block_expert, dtype=torch.int64))[1:]
    offsets_E1 = torch.nn.functional.pad((blocks_E * block_m).cumsum(0), (1, 0)).to(torch.int32)

    def weight_grad(d_pre, like):
        return weight_grad_triton(d_pre, a, torch.empty_like(like), sorted_slots, offsets_E1, num_slots,
                                  gather_top_k, gather_a=gather_top_k > 0)

    def bias_grad(d_pre, like):
        ones = torch.ones(d_pre.shape[0], 1, dtype=d_pre.dtype, device=a.device)
        return expert_row_sums(d_pre, ones, like, sorted_slots, offsets_E1, num_slots, gather_top_k)

    parts = [(d_gate, w, bias), *(() if w_up is None else ((d_up, w_up, bias_up),))]
    dw = [weight_grad(d_pre, weight) for d_pre, weight, _ in parts]
    db = [empty() if b is None else bias_grad(d_pre, b) for d_pre, _, b in parts]
    # a's gradient per schedule row, the gate and up parts added in fp32.
    da_PK = None
    for d_pre, weight, _ in parts:
        part = expert_gemm_triton(d_pre, weight.transpose(1, 2), schedule, num_slots, block_m,
                                  out_dtype=torch.float32)
        da_PK = part if da_PK is None else da_PK.add_(part)
    if gather_top_k > 0:
        da = token_sums_triton(da_PK, slot_positions(sorted_slots, num_slots), torch.empty_like(a), gather_top_k)
    else:
        da = torch.empty_like(a).copy_(torch.where(routed_P[:, None], da_PK, 0.0))
    d_slot_weights = empty()
    if slot_weights is not None:
        d_slot_weights = torch.empty_like(slot_weights).copy_(
            torch.zeros(num_slots + 1, dtype=torch.float32, device=a.device)
            .scatter_(0, torch.where(routed_P, slot_P, num_slots), d_weight_P)[:num_slots])
    return [da, dw[0], dw[1] if w_up is not None else empty(), db[0], db[1] if w_up is not None else empty(),
            d_slot_weights]


@_expert_gemm_backward_op.register_kernel("cuda")
def _(a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded, num_slots, block_m,
      gather_top_k, scatter, activation, alpha, limit, w_scale, w_up_scale, w_zero, w_up_zero, grads):
    if w_scale is not None or a.dtype not in KERNEL_DTYPES:  # quantised weights (frozen) or float64: the reference
        return _expert_gemm_backward_op.reference(
            a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded, num_slots, block_m,
            gather_top_k, scatter, activation, alpha, limit, w_scale, w_up_scale, w_zero, w_up_zero, grads)
    return expert_gemm_backward_triton(a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert,
                                       num_padded, num_slots, block_m, gather_top_k, scatter, activation, alpha,
                                       limit, grads[0])


def expert_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    schedule,
    *,
    num_slots: int,
    block_m: int,
    w_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    slot_weights: torch.Tensor | None = None,
    gather_top_k: int = 0,
    scatter: bool = False,
    activation: str = "none",
    alpha: float = CLAMPED_SWIGLU_ALPHA,
    limit: float = CLAMPED_SWIGLU_LIMIT,
    w_scale: torch.Tensor | None = None,
    w_up_scale: torch.Tensor | None = None,
    w_zero: torch.Tensor | None = None,
    w_up_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped GEMM of scheduled rows against their expert's weight (see the module docstring).

    Args:
        a:            (T, K) if gather_top_k > 0, else (P, K); fp32/fp16/bf16
        w:            (E, N, K) same dtype as a (quantised values with w_scale: moe_ops.quantised), any strides
        schedule:     :class:`moe_ops.BlockSchedule`
        num_slots:    S, the slot count the schedule was built for (its padding sentinel)
        block_m:      the block_m the schedule was built with
        w_up:         (E, N, K) optional; makes the op gated: act(a w^T) * (a w_up^T)
        bias/bias_up: (E, N) optional, added before the activation
        slot_weights: (S,) optional routing weight per slot, multiplied after the activation
        gather_top_k: read row s // gather_top_k of a for slot s (a holds tokens); 0: a is in
                      schedule order
        scatter:      write row s of an (S, N) output; else row p of a (P, N) output
        activation:   "none" | "silu" | "gelu" | "gelu_tanh" | "relu" | "relu2" | "clamped_swiglu" |
                      "clamped_silu"
        alpha/limit:  the clamped forms' constants (defaults: GPT-OSS's, moe_ops.activations)
        w_scale/w_up_scale: fp32 optional: w (and w_up) are quantised (moe_ops.quantised): int8 or fp8 e4m3
                      (E, N, K), or int4 packed two per byte, uint8 (E, N, K / 2); scales (E, N) per
                      output feature or (E, R, G) per block of N / R output and K / G reduction features
                      (w_up_scale exactly when w_up is given)
        w_zero/w_up_zero: fp32 optional, the scales' shape: zero points, the weights standing for
                      (values - zero) * scale

    Returns:
        (S, N) if scatter else (P, N), dtype of a; accumulation in fp32.
    """
    if not isinstance(schedule, BlockSchedule):
        raise TypeError(
            f"schedule: expected a moe_ops.BlockSchedule (what moe_ops.block_schedule returns), got "
            f"{type(schedule).__name__}"
        )
    check_tensor("w", w, ndim=3)
    if w.shape[0] != schedule.expert_counts.shape[0]:
        # block_expert's values are data on the device; the schedule's E is its counts' length.
        raise ValueError(
            f"w: expected (E={schedule.expert_counts.shape[0]}, N, K), the experts the schedule was built "
            f"for, got {tuple(w.shape)}"
        )
    check_int("num_slots", num_slots, minimum=0)
    check_int("block_m", block_m, minimum=1)
    check_int("gather_top_k", gather_top_k, minimum=0)
    check_bool("scatter", scatter)
    check_choice("activation", activation, ACTIVATIONS)
    check_constants_read(activation, alpha, limit)
    # The schedule's sizes are those of the slot count and block size it was built for (schedule_sizes): another
    # num_slots would mark other rows as padding, another block_m read other blocks. (Slot counts whose
    # schedules have the same sizes cannot be told apart here without reading the schedule on the host.)
    rows, blocks = schedule.sorted_slots.shape[0], schedule.block_expert.shape[0]
    if rows != blocks * block_m:
        raise ValueError(f"block_m: the schedule has {blocks} blocks over {rows} rows (built with block_m="
                         f"{rows // blocks if blocks else '?'}), got {block_m}")
    if (rows, blocks) != schedule_sizes(num_slots, w.shape[0], block_m):
        raise ValueError(f"num_slots: the schedule's {rows} rows (E={w.shape[0]}, block_m={block_m}) were not built "
                         f"for {num_slots} slots (T * K of the ids given to block_schedule)")
    refuse_unsupported_ad("expert_gemm", a, w, w_up, bias, bias_up, slot_weights, w_scale, w_up_scale, w_zero,
                          w_up_zero)
    return torch.ops.moe_ops.expert_gemm(
        a, w, w_up, bias, bias_up, slot_weights, schedule.sorted_slots, schedule.block_expert,
        schedule.num_padded, num_slots, block_m, gather_top_k, scatter, activation, alpha, limit, w_scale,
        w_up_scale, w_zero, w_up_zero,
    )
