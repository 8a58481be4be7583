"""Triton path of moe_ops::fused_experts_backward (its CUDA kernel): the backward of the fused experts
without the reference's loop over experts and without host syncs (CUDA-graph safe).

It runs on the packed schedule the forward uses (each expert's slots contiguous, no padding rows) and
has four kernels of its own beside the expert GEMM (moe_ops/expert_gemm_triton.py) and torch's grouped
GEMM:
- ``_activation_kernel``: the training forward's activation of each schedule row's kept pre-activations
  (``fused_experts_training`` keeps them for the backward; the activation goes into the down GEMM);
- ``_activation_grad_kernel``: from the recomputed pre-activations and g W_d (the output gradient
  through the down projection) it writes, per schedule row, the activation as the forward rounds it
  times the row's routing weight (the down weight's gradient operand), the gradient of the routing
  weight (a row sum, in-program: no atomics) and the pre-activation gradient, in one pass over the rows;
- ``_expert_weight_grad_kernel``: dW[e] = sum over expert e's rows of g^T a, where torch's grouped GEMM
  has no native kernel (fp32, fp16, GPUs before sm90, the interpreter), and the bias gradients (sums
  against a column of ones, kept in fp32) everywhere. A program owns one (expert,
  BLOCK_N x BLOCK_K) tile of dW and walks that expert's rows BLOCK_M at a time, reading each operand in
  schedule order or gathered from the tokens (row s // top_k for slot s). Rows past the routed ones are
  masked; each element is written once, in a fixed order;
- ``_token_sums_kernel``: dx of each token, the sum of its K schedule rows in fp32 (a gather, in k order:
  deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ops._compat.dispatch import fp32_matmul_allows_tf32
from moe_ops._compat.matmul import grouped_mm, native_grouped_mm
from moe_ops.activations import ACTIVATION_CODE
from moe_ops.capacity_triton import apply_capacity_triton
from moe_ops.expert_gemm_triton import expert_gemm_triton, gate_activation, up_factor
from moe_ops.layout import PackedSchedule, capacity_from_factor, split_gate_up
from moe_ops.schedule_triton import block_schedule_triton, rows_in_schedule_order
from moe_ops.settings import config
from moe_ops.tiles import choose_block_m, tma_pays

# _activation_grad_kernel's (BLOCK_M, BLOCK_F, warps): few rows a program keep few live values a thread, which
# brings the pass near the copy rate where 32 rows did not (benchmarks/sweep_activation_grad.py, NOTES.md v26).
ACTIVATION_GRAD_CONFIG = (8, 128, 4)


@triton.jit
def _row_activation(gate_ptr, up_ptr, rows, cols, mask, stride_gate_m, stride_gate_f, stride_up_m, stride_up_f,
                    alpha, limit, ACTIVATION: tl.constexpr, GATED: tl.constexpr):
    """A tile of schedule rows' activation terms in fp32, masked elements from zeros: (act(gate), its slope,
    the up factor, its slope); the activation is act(gate) * factor. Ungated, the factor is 1 and its slope
    0 (up_ptr is not read)."""
    gate = tl.load(gate_ptr + rows[:, None] * stride_gate_m + cols[None, :] * stride_gate_f, mask=mask,
                   other=0.0).to(tl.float32)
    acted, slope = gate_activation(gate, ACTIVATION, alpha, limit)
    if GATED:
        up = tl.load(up_ptr + rows[:, None] * stride_up_m + cols[None, :] * stride_up_f, mask=mask,
                     other=0.0).to(tl.float32)
        factor, up_slope = up_factor(up, ACTIVATION, limit)
    else:
        factor, up_slope = 1.0, 0.0
    return acted, slope, factor, up_slope


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
    routed = slot < num_slots
    weight = tl.load(slot_weight_ptr + slot, mask=routed, other=0.0).to(tl.float32)
    rows = rows.to(tl.int64)
    d_weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        store_mask = row_in[:, None] & (cols < F)[None, :]
        # Rows of no routed slot hold whatever the GEMMs left there: never read, written as zeros.
        mask = store_mask & routed[:, None]
        g = tl.load(g_ptr + rows[:, None] * stride_g_m + cols[None, :] * stride_g_f, mask=mask,
                    other=0.0).to(tl.float32)
        acted, slope, factor, up_slope = _row_activation(
            gate_ptr, up_ptr, rows, cols, mask, stride_gate_m, stride_gate_f, stride_up_m, stride_up_f, alpha,
            limit, ACTIVATION, GATED)
        dh = g * weight[:, None]
        h = acted * factor  # ungated: times 1, exact
        if GATED:
            d_up = tl.where(mask, dh * acted * up_slope, 0.0)
            tl.store(d_up_ptr + rows[:, None] * stride_dup_m + cols[None, :] * stride_dup_f,
                     d_up.to(d_up_ptr.dtype.element_ty), mask=store_mask)
        d_gate = dh * factor * slope
        # The activation as the forward rounds it, for the routing weight's gradient; stored times the
        # routing weight, the down weight's gradient operand (dW_d = sum_s g_t^T (w_s h_s)).
        h_lp = tl.where(mask, h, 0.0).to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + rows[:, None] * stride_h_m + cols[None, :] * stride_h_f,
                 (h_lp * weight[:, None]).to(h_ptr.dtype.element_ty), mask=store_mask)
        tl.store(d_gate_ptr + rows[:, None] * stride_dgate_m + cols[None, :] * stride_dgate_f,
                 tl.where(mask, d_gate, 0.0).to(d_gate_ptr.dtype.element_ty), mask=store_mask)
        d_weight += tl.sum(h_lp * g, axis=1)
    tl.store(d_weight_ptr + rows, d_weight, mask=row_in)


def activation_grad_triton(gate, up, g_PF, slot_weights, sorted_slots, h, d_gate, d_up, activation, alpha, limit,
                           config=None):
    """Fill ``h`` (the activation rounded to its dtype, times the row's routing weight), ``d_gate``/``d_up``
    (the pre-activation gradients for ``dh = w_s g``) and return the (P,) fp32 gradient of each row's
    routing weight, sum_f h * g. ``gate``/``up``: pre-activations (P, F), any strides (views of one
    tensor). Rows of no routed slot (the sentinel S) are not read and come out 0. Each element is read
    before the same program writes that element of the outputs, so ``d_gate``/``d_up`` may be
    ``gate``/``up`` and ``h`` may be ``g_PF`` (in place). ``config`` (BLOCK_M, BLOCK_F, warps) replaces the
    default (for sweeps)."""
    num_rows, F = g_PF.shape
    d_weight = torch.empty(num_rows, dtype=torch.float32, device=g_PF.device)
    if num_rows == 0:
        return d_weight
    gated = up is not None
    block_m, block_f, warps = config or ACTIVATION_GRAD_CONFIG
    _activation_grad_kernel[(triton.cdiv(num_rows, block_m),)](
        gate, up if gated else gate, g_PF, slot_weights, sorted_slots, h, d_gate, d_up if gated else d_gate, d_weight,
        num_rows, F, slot_weights.shape[0], float(alpha), float(limit),
        *gate.stride(), *(up.stride() if gated else (0, 0)), *g_PF.stride(), *h.stride(), *d_gate.stride(),
        *(d_up.stride() if gated else (0, 0)),
        ACTIVATION=ACTIVATION_CODE[activation], GATED=gated, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=warps,
    )
    return d_weight


@triton.jit
def _expert_weight_grad_kernel(
    g_ptr, a_ptr, out_ptr, sorted_slots_ptr, expert_offsets_ptr,
    N, K, num_slots, top_k,
    stride_gm, stride_gn,
    stride_am, stride_ak,
    stride_oe, stride_on, stride_ok,
    GATHER_G: tl.constexpr, GATHER_A: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_n = tl.program_id(1) // num_pid_k
    pid_k = tl.program_id(1) % num_pid_k
    row_start = tl.load(expert_offsets_ptr + expert)
    row_end = tl.load(expert_offsets_ptr + expert + 1)

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
        a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=valid[:, None] & k_valid[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), a, acc, input_precision=INPUT_PRECISION)
    out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe + offs_n[:, None].to(tl.int64) * stride_on
                + offs_k[None, :] * stride_ok)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_valid[:, None] & k_valid[None, :])


def weight_grad_triton(g, a, out_ENK, sorted_slots, expert_offsets, num_slots, top_k, *,
                       gather_g=False, gather_a=False, config=None):
    """Write ``out_ENK[e] = sum over the schedule rows p of expert e of g_p^T a_p`` and return it.

    ``g`` (rows, N) and ``a`` (rows, K) hold one row per schedule position, or, gathered (``gather_g`` /
    ``gather_a``), per token: slot s reads row s // top_k. ``out_ENK`` (E, N, K) may have any strides
    (a view into a gradient laid out like the weight); every element is written. ``expert_offsets``
    (E + 1,) int32: where each expert's rows start (a packed schedule's, or a padded one's
    ``moe_ops.layout.padded_offsets``: rows of the sentinel slot are skipped).
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
        g, a, out_ENK, sorted_slots, expert_offsets,
        n, k, num_slots, max(top_k, 1),
        g.stride(0), g.stride(1), a.stride(0), a.stride(1), *out_ENK.stride(),
        GATHER_G=gather_g, GATHER_A=gather_a, INPUT_PRECISION="ieee" if ieee else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out_ENK


@triton.jit
def _token_sums_kernel(
    rows_ptr, position_ptr, slot_weight_ptr, out_ptr, num_tokens, hidden, num_positions, stride_rows, stride_out,
    TOP_K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < num_tokens
    col_ok = (cols < hidden)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slot = tokens.to(tl.int64) * TOP_K + k
        position = tl.load(position_ptr + slot, mask=token_ok, other=num_positions)
        routed = position < num_positions
        row = tl.load(rows_ptr + position.to(tl.int64)[:, None] * stride_rows + cols[None, :],
                      mask=routed[:, None] & col_ok, other=0.0).to(tl.float32)
        if WEIGHTED:
            row *= tl.load(slot_weight_ptr + slot, mask=routed, other=0.0).to(tl.float32)[:, None]
        acc += row
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok)


def token_sums_triton(rows_PH, position_S, out_TH, top_k, slot_weights=None):
    """``out_TH[t] = sum over k of rows_PH[position_S[t * top_k + k]]``, each row times its slot's weight
    (``slot_weights`` (S,)) where given, in fp32 and in k order (deterministic, no atomics); a slot whose
    position is past the rows (routed to no expert) adds nothing."""
    num_tokens, hidden = out_TH.shape
    block_t, block_h = 16, min(256, triton.next_power_of_2(hidden))
    _token_sums_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))](
        rows_PH, position_S, position_S if slot_weights is None else slot_weights, out_TH, num_tokens, hidden,
        rows_PH.shape[0], rows_PH.stride(0), out_TH.stride(0),
        TOP_K=top_k, WEIGHTED=slot_weights is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
    )
    return out_TH


# Tiles of the weight-gradient kernel for per-expert row sums (a one-column operand: a narrow K tile).
BIAS_SUM_TILES = (64, 64, 16, 4, 3)


def slot_positions(sorted_slots, num_slots):
    """(S,) int32: each slot's row in a schedule (packed or padded); slots routed to no expert get the row
    count P (past the rows)."""
    num_rows = sorted_slots.shape[0]
    positions = torch.arange(num_rows, dtype=torch.int32, device=sorted_slots.device)
    # The sentinel rows (slot S) all land on the extra element S, which is dropped.
    return (torch.full((num_slots + 1,), num_rows, dtype=torch.int32, device=sorted_slots.device)
            .scatter_(0, sorted_slots.long(), positions)[:num_slots])


@triton.jit
def _activation_kernel(
    gate_ptr, up_ptr, sorted_slots_ptr, h_ptr, num_rows, F, num_slots, alpha, limit,
    stride_gate_m, stride_gate_f, stride_up_m, stride_up_f, stride_h_m,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_in = rows < num_rows
    routed = tl.load(sorted_slots_ptr + rows, mask=row_in, other=num_slots) < num_slots
    rows = rows.to(tl.int64)
    store_mask = row_in[:, None] & (cols < F)[None, :]
    mask = store_mask & routed[:, None]  # rows of no routed slot: never read, written as zeros
    acted, _, factor, _ = _row_activation(gate_ptr, up_ptr, rows, cols, mask, stride_gate_m, stride_gate_f,
                                          stride_up_m, stride_up_f, alpha, limit, ACTIVATION, GATED)
    h = acted * factor
    tl.store(h_ptr + rows[:, None] * stride_h_m + cols[None, :], tl.where(mask, h, 0.0).to(h_ptr.dtype.element_ty),
             mask=store_mask)


def activation_triton(gate, up, sorted_slots, num_slots, activation, alpha, limit):
    """(P, F) in gate's dtype: the activation of each schedule row's pre-activations (``gate``, ``up``:
    (P, F) views, any strides; ``up`` None for an ungated MLP), rows of no routed slot 0."""
    num_rows, F = gate.shape
    h = torch.empty((num_rows, F), dtype=gate.dtype, device=gate.device)
    block_m, block_f = 32, 128
    gated = up is not None
    _activation_kernel[(triton.cdiv(num_rows, block_m), triton.cdiv(F, block_f))](
        gate, up if gated else gate, sorted_slots, h, num_rows, F, num_slots, float(alpha), float(limit),
        *gate.stride(), *(up.stride() if gated else (0, 0)), h.stride(0),
        ACTIVATION=ACTIVATION_CODE[activation], GATED=gated, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=4,
    )
    return h


def grouped_mm_applies(x, widths) -> bool:
    """Whether the weight gradients go to torch's grouped GEMM (:func:`weight_grad_grouped_mm`): where it
    has a native kernel for x's device and dtype, every operand's rows (``widths``) 16-byte aligned."""
    return native_grouped_mm(x.device, x.dtype) and all((w * x.element_size()) % 16 == 0 for w in widths)


def column_halves(width: int, element_size: int) -> list[slice]:
    """Two column slices that split ``width`` near its middle, each starting 16-byte aligned (as torch's
    grouped GEMM wants its operands); one slice where the width is too narrow to split so."""
    align = 16 // element_size
    split = width // 2 // align * align
    return [slice(0, width)] if split == 0 else [slice(0, split), slice(split, width)]


def saves_preactivations(x, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down) -> bool:
    """Whether ``moe_ops::fused_experts_training`` keeps the pre-activations for the backward (which then
    skips recomputing them): where its GEMMs are torch's grouped GEMMs (no biases to add, rows aligned,
    every weight's rows or columns contiguous) and batch-invariant tiles are not asked for."""
    weights = [w for w in (w_gate_up, w_down, w_up) if w is not None]
    return (not config.batch_invariant and b_gate_up is None and b_up is None and b_down is None
            and all(1 in w.stride()[1:] for w in weights)
            and grouped_mm_applies(x, {x.shape[1], *(d for w in weights for d in w.shape[1:])}))


def weight_grad_grouped_mm(g_PN, a_PK, like_ENK, expert_offsets):
    """``out[e] = g_e^T a_e`` over each expert's schedule rows through torch's grouped GEMM: a new (E, N, K)
    tensor with ``like_ENK``'s shape and strides (an oriented weight, whose gradient it is). ``g_PN``
    (positions, N) and ``a_PK`` (positions, K) are contiguous and in schedule order; ``expert_offsets``
    (E + 1,) int32 as for weight_grad_triton (rows past the last expert's end are not read). The product
    is taken in the orientation that yields those strides, so no copy follows for a weight laid out
    either way."""
    ends = expert_offsets[1:]
    if like_ENK.stride(1) == 1 and like_ENK.stride(2) != 1:
        result = grouped_mm(a_PK.t(), g_PN, ends).transpose(1, 2)
    else:
        result = grouped_mm(g_PN.t(), a_PK, ends)
    if result.stride() == like_ENK.stride():
        return result
    return torch.empty_like(like_ENK).copy_(result)


def expert_row_sums(rows_PN, column_P1, like_EN, sorted_slots, expert_offsets, num_slots, top_k, gather_rows=False):
    """Each expert's sum over its schedule rows of ``rows_PN`` times ``column_P1`` (a bias's gradient), laid out
    and typed like ``like_EN``: deterministic (no atomics), the weight-gradient kernel against the one-column
    operand, accumulated and kept in fp32 (torch's grouped GEMM would round them to the rows' dtype).
    ``gather_rows``: ``rows_PN`` holds one row per token, as weight_grad_triton's ``gather_g``."""
    sums = weight_grad_triton(rows_PN, column_P1, torch.empty(*like_EN.shape, 1, device=rows_PN.device), sorted_slots,
                              expert_offsets, num_slots, top_k, gather_g=gather_rows, config=BIAS_SUM_TILES)
    return torch.empty_like(like_EN).copy_(sums[:, :, 0])


def fused_experts_backward_triton(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy, grads, saved=(),
    schedule=None,
):
    """The backward of ``fused_experts`` on the GPU (tests also run it on CPU under the interpreter):
    what differentiating ``fused_experts_ref`` gives, without its loop over experts or host syncs.

    With g the output gradient, t(s) a slot's token, w_s its routing weight and h_s = act(x W_gu^T):
    y_s = w_s (h_s W_d^T + b_d), so dh_s = w_s g_t W_d, d w_s = h_s . (g_t W_d) + g_t . b_d,
    dW_d = sum_s g_t^T (w_s h_s), and the pre-activation gradient gives dx and dW_gu. Three GEMMs over
    the forward's packed schedule (the pre-activations recomputed, g_t W_d, dx; each in x's dtype), one
    pass for the activation's gradient (which writes the pre-activations' gradients over them and w_s h_s
    over g_t W_d) and the weight gradients. Where torch's grouped GEMM has a native kernel (bf16 on
    sm90/sm100) x's and g's rows are copied into schedule order once, the GEMMs and weight gradients
    are torch's grouped GEMMs over the copies (a biased pre-activation GEMM stays the expert GEMM, with
    TMA tiles where they pay) and dx is summed per token from its rows; elsewhere every
    kernel gathers the tokens' rows itself. ``saved``: the pre-activations that
    ``moe_ops::fused_experts_training`` kept (its third and, with ``w_up``, fourth output, rows in the
    packed schedule's order), read instead of recomputed and overwritten with their gradients as
    recomputed ones are (the caller's op declares them mutated). ``schedule``: the forward's packed schedule
    (a PackedSchedule, capacity applied), which the training variant keeps beside them; recomputed when
    None. Returns the gradients of
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
    # Every element of each gradient is written below; the weights' gradients come from weight_grad. dx is
    # allocated only when its rows are summed, so that it is not held through the weight gradients (the
    # backward's peak).
    d_topk_weights = torch.empty_like(topk_weights)
    # (E, N, K) orientation of each weight and of its gradient: views, never copies (its own inverse).
    oriented = (lambda t: t) if layout == "EFH" else (lambda t: t.transpose(1, 2))
    w_gu, w_d = oriented(w_gate_up), oriented(w_down)
    w_u = None if w_up is None else oriented(w_up)

    block_m = choose_block_m(S, E)
    # The forward's packed schedule: S positions, expert e's slots at [offsets[e], offsets[e + 1]),
    # positions past offsets[E] the sentinel S (slots routed to no expert, or dropped by capacity).
    if schedule is None:
        ids = topk_ids
        capacity = capacity_from_factor(capacity_factor, T, K, E)
        if capacity >= 0:
            ids, _ = apply_capacity_triton(topk_ids, topk_weights, E, capacity, drop_policy)
        sorted_slots, _, _, _, expert_offsets = block_schedule_triton(ids, E, 1)
        schedule = PackedSchedule(sorted_slots, expert_offsets)
    sorted_slots, expert_offsets = schedule
    slot_weights = topk_weights.reshape(-1)
    F_all = w_gu.shape[1] + (0 if w_u is None else w_u.shape[1])
    grouped = grouped_mm_applies(x, (x.shape[1], F_all, w_d.shape[2]))
    if grouped:
        # Copies in schedule order (rows of no routed slot 0), each read by a GEMM and a weight gradient. With
        # the pre-activations saved, x's rows are read only by the gate/up weight gradient: copied then, after
        # g's rows are freed, so that the two copies are never held at once.
        x_rows = None if saved else rows_in_schedule_order(x, sorted_slots, K)
        g_rows, gather_top_k = None, 0
    else:
        x_rows, g_rows, gather_top_k = x, grad_TH, K
    tma = grouped and tma_pays(S, E)

    def gemm(a, weight, bias=None, scatter=False, out_dtype=None, gathered=False):
        return expert_gemm_triton(
            a, weight, schedule, S, block_m, bias=bias, gather_top_k=gather_top_k if gathered else 0,
            scatter=scatter, out_dtype=out_dtype, tma=tma,
        )

    def rows_gemm(a, weight, bias=None):
        # (positions, N) in x's dtype: each schedule row of a (gathered from the tokens unless copied into
        # schedule order) times its expert's weight (E, N, K) transposed. torch's grouped GEMM where it
        # runs natively (it leaves rows past the routed ones unwritten; no reader looks at them), the
        # expert GEMM where a bias is to be added too or elsewhere.
        if grouped and bias is None:
            return grouped_mm(a, weight.transpose(1, 2), expert_offsets[1:])
        return gemm(a, weight, bias, out_dtype=x.dtype, gathered=True)

    def weight_grad(g, a, like_ENK, gather_g=False, gather_a=False):
        # (E, N, K) with like_ENK's strides (an oriented weight: its gradient; or a bias's sums).
        if grouped:
            return weight_grad_grouped_mm(g, a, like_ENK, expert_offsets)
        return weight_grad_triton(g, a, torch.empty_like(like_ENK), sorted_slots, expert_offsets, S, K,
                                  gather_g=gather_g and gather_top_k > 0, gather_a=gather_a and gather_top_k > 0)

    # The pre-activations in x's dtype (saved, or recomputed), which the activation-gradient pass
    # overwrites with their gradients, and g_t W_d in x's dtype, which it overwrites with w_s h_s (it reads
    # each element before it writes that element): per schedule row 3F values in x's dtype (bf16: 6F
    # bytes). Gate and up laid out as the weights have them (halves, interleaved, or two tensors).
    if saved:
        pre = list(saved)
    else:
        pre = [rows_gemm(x_rows, w_gu, b_gate_up)]
        if w_u is not None:
            pre.append(rows_gemm(x_rows, w_u, b_up))
    d_pre = pre  # written in place below
    def gate_and_up(tensors):
        if len(tensors) == 2:
            return tensors
        return split_gate_up(tensors[0], interleaved) if gated else (tensors[0], None)

    (gate, up), (d_gate, d_up) = gate_and_up(pre), gate_and_up(d_pre)

    if grouped:
        g_rows = rows_in_schedule_order(grad_TH, sorted_slots, K)
    g_wd_PF = rows_gemm(g_rows, w_d.transpose(1, 2))  # g_t W_d per row: (P, F)
    h_scaled = g_wd_PF
    d_weight_P = activation_grad_triton(gate, up, g_wd_PF, slot_weights, sorted_slots, h_scaled, d_gate, d_up,
                                        activation, alpha, limit)
    del pre, gate, up  # d_pre now
    slot_P = sorted_slots.long()
    routed_P = slot_P < S
    if b_down is not None:
        # d w_s gains g_t . b_d[e]: each row's expert from the offsets (E past the routed rows).
        positions = torch.arange(slot_P.shape[0], device=x.device, dtype=torch.int32)
        expert_P = torch.searchsorted(expert_offsets[1:], positions, right=True).clamp(max=E - 1)
        g_PH = (g_rows if grouped else grad_TH[torch.where(routed_P, slot_P // K, 0)]).float()
        d_weight_P += torch.where(routed_P, (g_PH * b_down.float()[expert_P]).sum(1), 0.0)
    # Rows of no routed slot all scatter to a discarded slot S.
    d_topk_weights.copy_(
        torch.zeros(S + 1, dtype=torch.float32, device=x.device)
        .scatter_(0, torch.where(routed_P, slot_P, S), d_weight_P)[:S].view(T, K)
    )

    def bias_grad(rows_PN, bias, gathered=False, row_scale=None):
        # Per-expert sums of rows against a column of ones (or of each row's routing weight).
        if row_scale is None:
            column = torch.ones(slot_P.shape[0], 1, dtype=rows_PN.dtype, device=x.device)
        else:
            column = torch.where(routed_P, row_scale[slot_P.clamp(max=S - 1)], 0.0)[:, None].to(rows_PN.dtype)
        return expert_row_sums(rows_PN, column, bias, sorted_slots, expert_offsets, S, K,
                               gather_rows=gathered and gather_top_k > 0)

    dw_down = oriented(weight_grad(g_rows, h_scaled, w_d, gather_g=True))
    db_down = torch.empty(0) if b_down is None else bias_grad(g_rows, b_down, gathered=True, row_scale=slot_weights)
    del g_wd_PF, h_scaled, g_rows  # their memory serves the later buffers
    if x_rows is None:
        x_rows = rows_in_schedule_order(x, sorted_slots, K)
    weight_grads = [oriented(weight_grad(d_pre_PN, x_rows, w, gather_a=True)) for d_pre_PN, w in zip(d_pre, (w_gu, w_u),
                                                                                                   strict=False)]
    bias_grads = [torch.empty(0) if bias is None else bias_grad(d_pre_PN, bias)
                  for d_pre_PN, bias in zip(d_pre, (b_gate_up, b_up), strict=False)]
    del x_rows
    if grouped:
        # dx per schedule row (a separate w_up's part added in x's dtype, as autograd of the user's code
        # does), then each token's K rows summed in fp32. This is the backward's peak (the weight gradients
        # and the caller's saved pre-activations are alive), so the rows are made for one half of dx's
        # columns at a time: (P, H/2) held, not (P, H).
        dx = torch.empty_like(x)
        positions_S = slot_positions(sorted_slots, S)
        for cols in column_halves(x.shape[1], x.element_size()):
            dx_rows = None
            for d_pre_PN, w in zip(d_pre, (w_gu, w_u), strict=False):
                part = grouped_mm(d_pre_PN, w[:, :, cols], expert_offsets[1:])
                dx_rows = part if dx_rows is None else dx_rows.add_(part)
            token_sums_triton(dx_rows, positions_S, dx[:, cols], K)
            del dx_rows, part
    else:
        # As the forward: each slot's row in x's dtype, the K of a token summed in fp32 (a separate w_up
        # gives two parts per slot, added in fp32 first).
        slot_dtype = x.dtype if len(d_pre) == 1 else torch.float32
        dx_SH = None
        for d_pre_PN, w in zip(d_pre, (w_gu, w_u), strict=False):
            part = gemm(d_pre_PN, w.transpose(1, 2), scatter=True, out_dtype=slot_dtype)
            dx_SH = part if dx_SH is None else dx_SH + part
        dx = torch.empty_like(x).copy_(dx_SH.view(T, K, -1).sum(1, dtype=torch.float32))
    dw_gate_up, dw_up = (weight_grads + [torch.empty(0)])[:2]
    db_gate_up, db_up = (bias_grads + [torch.empty(0)])[:2]
    return [dx, d_topk_weights, dw_gate_up, dw_down, dw_up, db_gate_up, db_up, db_down]
