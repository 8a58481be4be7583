"""Triton path of moe_ops::fused_experts_backward (its CUDA kernel): the backward of the fused experts
without the reference's loop over experts and without host syncs (CUDA-graph safe).

Two kernels of its own beside the expert GEMM (moe_ops/expert_gemm_triton.py):
- ``_activation_grad_kernel``: from the recomputed pre-activations and g W_d (the output gradient
  through the down projection) it writes, per schedule row, the activation as the forward rounds it,
  the gradient of the routing weight (a row sum, in-program: no atomics) and the pre-activation
  gradient, in one pass over the rows;
- ``_expert_weight_grad_kernel``: dW[e] = sum over expert e's rows of g^T a. The block schedule keeps
  each expert's rows contiguous (padded to whole blocks), so a program owns one (expert, BLOCK_N x
  BLOCK_K) tile of dW and walks that expert's rows BLOCK_M at a time, reading each operand in schedule
  order or gathered from the tokens (row s // top_k for slot s), and scaling g's rows by a per-slot
  weight where asked. Padding rows are masked; each element is written once, in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ops._compat.dispatch import fp32_matmul_allows_tf32
from moe_ops.activations import ACTIVATION_CODE
from moe_ops.capacity_triton import apply_capacity_triton
from moe_ops.expert_gemm_triton import expert_gemm_triton, gate_activation, up_factor
from moe_ops.layout import PaddedSchedule, capacity_from_factor, padded_offsets, split_gate_up
from moe_ops.schedule_triton import block_schedule_triton
from moe_ops.tiles import choose_block_m


@triton.jit
def _activation_grad_kernel(
    gate_ptr, up_ptr, g_ptr, slot_weight_ptr, sorted_slots_ptr, h_ptr, d_gate_ptr, d_up_ptr, d_weight_ptr,
    num_rows, F, num_slots, alpha, limit,
    stride_gate_m, stride_gate_f, stride_up_m, stride_up_f, stride_g_m, stride_g_f,
    stride_h_m, stride_h_f, stride_dgate_m, stride_dgate_f, stride_dup_m, stride_dup_f,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < num_rows
    slot = tl.load(sorted_slots_ptr + rows, mask=row_in, other=num_slots)
    weight = tl.load(slot_weight_ptr + slot, mask=slot < num_slots, other=0.0).to(tl.float32)
    rows = rows.to(tl.int64)
    d_weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = row_in[:, None] & (cols < F)[None, :]
        gate = tl.load(gate_ptr + rows[:, None] * stride_gate_m + cols[None, :] * stride_gate_f, mask=mask,
                       other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * stride_g_m + cols[None, :] * stride_g_f, mask=mask,
                    other=0.0).to(tl.float32)
        acted, slope = gate_activation(gate, ACTIVATION, alpha, limit)
        dh = g * weight[:, None]
        if GATED:
            up = tl.load(up_ptr + rows[:, None] * stride_up_m + cols[None, :] * stride_up_f, mask=mask,
                         other=0.0).to(tl.float32)
            factor, up_slope = up_factor(up, ACTIVATION, limit)
            h = acted * factor
            tl.store(d_up_ptr + rows[:, None] * stride_dup_m + cols[None, :] * stride_dup_f,
                     (dh * acted * up_slope).to(d_up_ptr.dtype.element_ty), mask=mask)
            d_gate = dh * factor * slope
        else:
            h = acted
            d_gate = dh * slope
        h_lp = h.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * stride_h_m + cols[None, :] * stride_h_f, h_lp, mask=mask)
        tl.store(d_gate_ptr + rows[:, None] * stride_dgate_m + cols[None, :] * stride_dgate_f,
                 d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)
        d_weight += tl.sum(h_lp.to(tl.float32) * g, axis=1)
    tl.store(d_weight_ptr + rows, d_weight, mask=row_in)


def activation_grad_triton(gate, up, g_PF, slot_weights, sorted_slots, h, d_gate, d_up, activation, alpha, limit):
    """Fill ``h`` (the activation, rounded to its dtype), ``d_gate``/``d_up`` (the pre-activation
    gradients for ``dh = w_s g``) and return the (P,) fp32 gradient of each row's routing weight,
    sum_f h * g. ``gate``/``up``: pre-activations (P, F), any strides (views of one tensor). Each element
    is read before the same program writes that element of the outputs, so ``d_gate``/``d_up`` may be
    ``gate``/``up`` and ``h`` may be ``g_PF`` (in place)."""
    num_rows, F = g_PF.shape
    d_weight = torch.empty(num_rows, dtype=torch.float32, device=g_PF.device)
    if num_rows == 0:
        return d_weight
    gated = up is not None
    block_m, block_f = 32, 128
    _activation_grad_kernel[(triton.cdiv(num_rows, block_m),)](
        gate, up if gated else gate, g_PF, slot_weights, sorted_slots, h, d_gate, d_up if gated else d_gate, d_weight,
        num_rows, F, slot_weights.shape[0], float(alpha), float(limit),
        *gate.stride(), *(up.stride() if gated else (0, 0)), *g_PF.stride(), *h.stride(), *d_gate.stride(),
        *(d_up.stride() if gated else (0, 0)),
        ACTIVATION=ACTIVATION_CODE[activation], GATED=gated, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=4,
    )
    return d_weight


@triton.jit
def _expert_weight_grad_kernel(
    g_ptr, a_ptr, scale_ptr, out_ptr, sorted_slots_ptr, padded_offsets_ptr,
    N, K, num_slots, top_k,
    stride_gm, stride_gn,
    stride_am, stride_ak,
    stride_oe, stride_on, stride_ok,
    GATHER_G: tl.constexpr, GATHER_A: tl.constexpr, HAS_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_n = tl.program_id(1) // num_pid_k
    pid_k = tl.program_id(1) % num_pid_k
    row_start = tl.load(padded_offsets_ptr + expert)
    row_end = tl.load(padded_offsets_ptr + expert + 1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_valid = offs_n < N
    k_valid = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for row0 in range(row_start, row_end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_slots_ptr + rows, mask=rows < row_end, other=num_slots)
        valid = slot < num_slots
        token = tl.where(valid, slot // top_k, 0).to(tl.int64)
        g_row = token if GATHER_G else rows.to(tl.int64)
        a_row = token if GATHER_A else rows.to(tl.int64)
        g = tl.load(g_ptr + g_row[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=valid[:, None] & n_valid[None, :], other=0.0)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + slot, mask=valid, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * scale[:, None]).to(a_ptr.dtype.element_ty)
        a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=valid[:, None] & k_valid[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), a, acc, input_precision=INPUT_PRECISION)
    out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe + offs_n[:, None].to(tl.int64) * stride_on
                + offs_k[None, :] * stride_ok)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_valid[:, None] & k_valid[None, :])


def weight_grad_triton(g, a, out_ENK, sorted_slots, row_offsets, num_slots, top_k, *,
                       gather_g=False, gather_a=False, slot_scale=None, config=None):
    """Write ``out_ENK[e] = sum over the schedule rows p of expert e of (s_p g_p)^T a_p`` and return it.

    ``g`` (rows, N) and ``a`` (rows, K) hold one row per schedule row (P rows), or, gathered
    (``gather_g`` / ``gather_a``), per token: slot s reads row s // top_k. ``slot_scale`` (S,) scales
    each row of g by its slot's value (a routing weight), in fp32 before the product's rounding to a's
    dtype. ``out_ENK`` (E, N, K) may have any strides (a view into a gradient laid out like the weight);
    every element is written. ``row_offsets`` (E + 1,) int32: where each expert's padded rows start
    (``moe_ops.schedule.padded_offsets``).
    ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) replaces the default tiles (for sweeps).
    """
    num_experts, n, k = out_ENK.shape
    if num_experts == 0 or n == 0 or k == 0:
        return out_ENK
    ieee = a.dtype == torch.float32 and not fp32_matmul_allows_tf32()
    # Half precision: (64 x 128) g and a tiles, 32 KB a stage; fp32 halves the tiles to stay within
    # shared memory at three stages. The bf16 tiles were the best of a sweep (benchmarks/sweep_weight_grad.py).
    block_m, block_n, block_k, warps, stages = config or (
        (32, 64, 64, 4, 3) if a.dtype == torch.float32 else (64, 128, 128, 8, 3)
    )
    grid = (num_experts, triton.cdiv(n, block_n) * triton.cdiv(k, block_k))
    _expert_weight_grad_kernel[grid](
        g, a, slot_scale if slot_scale is not None else g, out_ENK, sorted_slots, row_offsets,
        n, k, num_slots, max(top_k, 1),
        g.stride(0), g.stride(1), a.stride(0), a.stride(1), *out_ENK.stride(),
        GATHER_G=gather_g, GATHER_A=gather_a, HAS_SCALE=slot_scale is not None,
        INPUT_PRECISION="ieee" if ieee else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out_ENK


def fused_experts_backward_triton(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy, grads,
):
    """The backward of ``fused_experts`` on the GPU (tests also run it on CPU under the interpreter):
    what differentiating ``fused_experts_ref`` gives, without its loop over experts or host syncs.

    With g the output gradient, t(s) a slot's token, w_s its routing weight and h_s = act(x W_gu^T):
    y_s = w_s (h_s W_d^T + b_d), so dh_s = w_s g_t W_d, d w_s = h_s . (g_t W_d) + g_t . b_d,
    dW_d = sum_s (w_s g_t)^T h_s, and the pre-activation gradient gives dx and dW_gu. Three expert GEMMs
    over the block schedule (the pre-activations recomputed, g_t W_d, dx; each in x's dtype), one pass for
    the activation's gradient (which writes the pre-activations' gradients over them and the activation
    over g_t W_d) and two weight-gradient
    kernels; g is read gathered and scaled inside the kernels, never materialised per slot (except with
    a down bias). Returns the gradients of
    x, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down (an empty tensor for an absent
    argument), each laid out like its argument (``empty_like``), as the backward op's fake kernel says.
    The arguments are checked by the caller (the op's CUDA kernel, moe_ops.fused_experts)."""
    grad_TH = grads[0]
    T, K = topk_ids.shape
    E = w_gate_up.shape[0]
    S = T * K
    inputs = (x, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down)
    if S == 0:
        return [torch.empty(0) if t is None else torch.zeros_like(t) for t in inputs]
    # Every element of each gradient is written below.
    dx, d_topk_weights, dw_gate_up, dw_down, dw_up, db_gate_up, db_up, db_down = (
        torch.empty(0) if t is None else torch.empty_like(t) for t in inputs
    )
    # (E, N, K) orientation of each weight and of its gradient: views, never copies.
    oriented = (lambda t: t) if layout == "EFH" else (lambda t: None if t is None else t.transpose(1, 2))
    w_gu, w_d, w_u = oriented(w_gate_up), oriented(w_down), oriented(w_up)
    dw_gu, dw_d, dw_u = oriented(dw_gate_up), oriented(dw_down), oriented(None if w_up is None else dw_up)

    ids = topk_ids
    capacity = capacity_from_factor(capacity_factor, T, K, E)
    if capacity >= 0:
        ids, _ = apply_capacity_triton(topk_ids, topk_weights, E, capacity, drop_policy)
    block_m = choose_block_m(S, E)
    sorted_slots, block_expert, num_padded, counts_E, _ = block_schedule_triton(ids, E, block_m)
    row_offsets = padded_offsets(counts_E, block_m).to(torch.int32)
    slot_weights = topk_weights.reshape(-1)

    def gemm(a, weight, bias=None, gather_top_k=0, scatter=False, out_dtype=None):
        return expert_gemm_triton(
            a, weight, PaddedSchedule(sorted_slots, block_expert, num_padded), S, block_m, bias=bias,
            gather_top_k=gather_top_k, scatter=scatter, out_dtype=out_dtype,
        )

    def weight_grad(g, a, out_ENK, **options):
        weight_grad_triton(g, a, out_ENK, sorted_slots, row_offsets, S, K, **options)

    slot_P = sorted_slots.long()
    valid_P = slot_P < S
    # Each schedule row's expert, E for padding: only the down bias's term of the weight gradient needs it.
    expert_P = torch.where(valid_P, block_expert.long().repeat_interleave(block_m), E) if b_down is not None else None

    def bias_grad(rows_PN, out_EN):
        # Per-expert sums of the schedule rows without atomics (index_add_ on CUDA would make the
        # gradient differ run to run): a block of block_m rows has one expert and an expert's blocks
        # are contiguous, so a float64 running sum over the block sums, differenced at each expert's
        # first block, gives every expert's sum (the cancellation error, ~1e-16 of the running total,
        # is far below the fp32 result's rounding). Padding rows are zeroed first.
        rows_PN = torch.where(valid_P[:, None], rows_PN, 0.0)
        block_sums = rows_PN.view(-1, block_m, rows_PN.shape[1]).sum(1, dtype=torch.float64)
        running = torch.cat([block_sums.new_zeros(1, block_sums.shape[1]), block_sums.cumsum(0)])
        first_block = (row_offsets // block_m).long()
        out_EN.copy_(running[first_block[1:]] - running[first_block[:-1]])

    # The recomputed pre-activations in x's dtype, which the activation-gradient pass overwrites with their
    # gradients, and g_t W_d in x's dtype, which it overwrites with the activation (it reads each element
    # before it writes that element): per schedule row 3F values in x's dtype (bf16: 6F bytes), nothing
    # else of that size. Gate and up laid out as the weights have them (halves, interleaved, or two tensors).
    pre = [gemm(x, w_gu, b_gate_up, gather_top_k=K, out_dtype=x.dtype)]
    if w_u is not None:
        pre.append(gemm(x, w_u, b_up, gather_top_k=K, out_dtype=x.dtype))
    if len(pre) == 2:
        gate, up = pre
    elif gated:
        gate, up = split_gate_up(pre[0], interleaved)
    else:
        gate, up = pre[0], None
    d_pre = pre  # written in place below

    g_wd_PF = gemm(grad_TH, w_d.transpose(1, 2), gather_top_k=K, out_dtype=x.dtype)  # g_t W_d per row: (P, F)
    h_lp = g_wd_PF
    d_weight_P = activation_grad_triton(gate, up, g_wd_PF, slot_weights, sorted_slots, h_lp, gate, up,
                                        activation, alpha, limit)
    if b_down is not None:
        g_PH = grad_TH[torch.where(valid_P, slot_P // K, 0)].float() * valid_P[:, None]
        d_weight_P += (g_PH * b_down.float()[expert_P.clamp(max=E - 1)]).sum(1)
        weight_P = torch.where(valid_P, slot_weights[slot_P.clamp(max=S - 1)].float(), 0.0)
        bias_grad(g_PH * weight_P[:, None], db_down)
    # Padding rows all scatter to a discarded slot S.
    d_topk_weights.copy_(
        torch.zeros(S + 1, dtype=torch.float32, device=x.device)
        .scatter_(0, torch.where(valid_P, slot_P, S), d_weight_P)[:S].view(T, K)
    )

    weight_grad(grad_TH, h_lp, dw_d, gather_g=True, slot_scale=slot_weights)
    # As the forward: each slot's row in x's dtype, the K of a token summed in fp32 (a separate w_up
    # gives two parts per slot, added in fp32 first).
    slot_dtype = x.dtype if len(d_pre) == 1 else torch.float32
    dx_SH = None
    for d_pre_PN, weight, d_weight, d_bias in zip(d_pre, (w_gu, w_u), (dw_gu, dw_u), (db_gate_up, db_up),
                                                  strict=False):
        weight_grad(d_pre_PN, x, d_weight, gather_a=True)
        if d_bias.numel():
            bias_grad(d_pre_PN.float(), d_bias)
        part = gemm(d_pre_PN, weight.transpose(1, 2), scatter=True, out_dtype=slot_dtype)
        dx_SH = part if dx_SH is None else dx_SH + part
    dx.copy_(dx_SH.view(T, K, -1).sum(1, dtype=torch.float32))
    return [dx, d_topk_weights, dw_gate_up, dw_down, dw_up, db_gate_up, db_up, db_down]
