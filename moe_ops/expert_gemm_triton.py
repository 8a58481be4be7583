"""Triton kernel of moe_ops::expert_gemm: one launch for all experts' blocks.

The block schedule gives each BLOCK_M rows one expert, so a program computes one
(BLOCK_M, BLOCK_N) output tile with plain tile loads of that expert's weights and a row gather of
the activations. Gate and up tiles share one A tile per K step (two accumulators), and bias,
activation, routing weight and the scatter back to slot order happen in registers before the only
store. No atomics: every output element is written by exactly one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ops._compat.dispatch import fp32_matmul_allows_tf32
from moe_ops._compat.triton_interpreter import fix_interpreter_bf16
from moe_ops.activations import ACTIVATION_CODE, CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT
from moe_ops.layout import PackedSchedule, PaddedSchedule
from moe_ops.tiles import (
    TMA_ALIGN_BYTES,
    device_limits,
    gemm_config,
    packed_blocks_max,
    tma_applies,
    tma_device,
    weight_pair_stride,
)

# bf16 dots under TRITON_INTERPRET=1 are wrong in Triton 3.6 without it (every kernel that dots imports this).
fix_interpreter_bf16()

# The activations' codes, from their one table (moe_ops.activations).
NONE: tl.constexpr = tl.constexpr(ACTIVATION_CODE["none"])
SILU: tl.constexpr = tl.constexpr(ACTIVATION_CODE["silu"])
GELU: tl.constexpr = tl.constexpr(ACTIVATION_CODE["gelu"])
GELU_TANH: tl.constexpr = tl.constexpr(ACTIVATION_CODE["gelu_tanh"])
RELU: tl.constexpr = tl.constexpr(ACTIVATION_CODE["relu"])
CLAMPED_SWIGLU: tl.constexpr = tl.constexpr(ACTIVATION_CODE["clamped_swiglu"])
RELU2: tl.constexpr = tl.constexpr(ACTIVATION_CODE["relu2"])
CLAMPED_SILU: tl.constexpr = tl.constexpr(ACTIVATION_CODE["clamped_silu"])
# Clamps and ReLU keep a NaN, as torch's do: tl.minimum / tl.maximum otherwise return the other operand on the
# GPU (max.f32), which would turn a NaN row into finite outputs (the interpreter's numpy keeps it either way).
NAN_KEPT: tl.constexpr = tl.constexpr(tl.PropagateNan.ALL)

# Hopper's fp8 dots reduce 32 deep at least (Triton refuses a shallower one): fp8 inputs in groups of 16 take
# bf16 dots.
FP8_DOT_MIN_K: tl.constexpr = tl.constexpr(32)
# The shallowest K step whose int4 weights are unpacked by join + reshape (weight_tile).
JOINED_INT4_MIN_K: tl.constexpr = tl.constexpr(32)
# 2^23 as fp32 and its bits (int4_as_float32).
MAGIC: tl.constexpr = tl.constexpr(8388608.0)
MAGIC_BITS: tl.constexpr = tl.constexpr(0x4B000000)
# The powers of two whose unit in the last place is 1 in bf16 (2^7) and fp16 (2^10), and their bits
# (scaled_group_product: an int4 value ORed into them).
BF16_UNIT_BIAS: tl.constexpr = tl.constexpr(128.0)
BF16_UNIT_BITS: tl.constexpr = tl.constexpr(0x4300)
FP16_UNIT_BIAS: tl.constexpr = tl.constexpr(1024.0)
FP16_UNIT_BITS: tl.constexpr = tl.constexpr(0x6400)


@triton.jit
def gate_activation(gate, ACTIVATION: tl.constexpr, alpha, limit):
    """act(gate) and d act / d gate, in fp32 (codes: moe_ops.activations). The forward kernels
    use the first only (Triton drops the unused derivative); the backward uses both."""
    if ACTIVATION == SILU:
        s = tl.sigmoid(gate)
        acted, slope = gate * s, s * (1.0 + gate * (1.0 - s))
    elif ACTIVATION == GELU:  # erf form
        cdf = 0.5 * (1.0 + tl.erf(gate * 0.7071067811865476))
        acted, slope = gate * cdf, cdf + gate * 0.3989422804014327 * tl.exp(-0.5 * gate * gate)
    elif ACTIVATION == GELU_TANH:  # 0.5 (1 + tanh(z)) = sigmoid(2z)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        s = tl.sigmoid(2.0 * inner)
        acted = gate * s
        slope = s + gate * 2.0 * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * gate * gate)
    elif ACTIVATION == RELU:
        # torch's relu backward zeroes the gradient where the value is <= 0: a NaN passes it on.
        acted, slope = tl.maximum(gate, 0.0, propagate_nan=NAN_KEPT), tl.where(gate <= 0.0, 0.0, 1.0)
    elif ACTIVATION == RELU2:
        positive = tl.maximum(gate, 0.0, propagate_nan=NAN_KEPT)
        acted, slope = positive * positive, 2.0 * positive
    elif ACTIVATION == CLAMPED_SWIGLU or ACTIVATION == CLAMPED_SILU:
        # Gate side: clamped above, then x sigmoid(alpha x) (GPT-OSS), or SiLU (alpha = 1).
        steepness = alpha if ACTIVATION == CLAMPED_SWIGLU else 1.0
        clamped = tl.minimum(gate, limit, propagate_nan=NAN_KEPT)
        s = tl.sigmoid(steepness * clamped)
        acted = clamped * s
        slope = tl.where(gate <= limit, s + steepness * clamped * s * (1.0 - s), 0.0)
    else:  # NONE
        acted, slope = gate, tl.full(gate.shape, 1.0, tl.float32)
    return acted, slope


@triton.jit
def up_factor(up, ACTIVATION: tl.constexpr, limit):
    """What multiplies act(gate), and its derivative: the clamped forms clamp up both ways, and GPT-OSS's
    shifts it by one."""
    if ACTIVATION == CLAMPED_SWIGLU or ACTIVATION == CLAMPED_SILU:
        factor = tl.minimum(tl.maximum(up, -limit, propagate_nan=NAN_KEPT), limit, propagate_nan=NAN_KEPT)
        if ACTIVATION == CLAMPED_SWIGLU:
            factor = factor + 1.0
        slope = tl.where((up >= -limit) & (up <= limit), 1.0, 0.0)
    else:
        factor, slope = up, tl.full(up.shape, 1.0, tl.float32)
    return factor, slope


@triton.jit
def _activate(gate, up, ACTIVATION: tl.constexpr, GATED: tl.constexpr, alpha, limit):
    acted, _ = gate_activation(gate, ACTIVATION, alpha, limit)
    if GATED:
        factor, _ = up_factor(up, ACTIVATION, limit)
        acted = acted * factor
    return acted


@triton.jit
def expert_gemm_tile(
    pid, a, w, w_up, bias, bias_up, slot_weight_ptr, schedule, sizes, act_params, descriptors,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_BIAS_UP: tl.constexpr, HAS_SLOT_WEIGHT: tl.constexpr, ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PACKED: tl.constexpr, E_PAD: tl.constexpr, TMA: tl.constexpr, PAIRED: tl.constexpr = False,
    W_SCALED: tl.constexpr = False, w_scales=None, W_GROUP_SIZE: tl.constexpr = 0, W_INT4: tl.constexpr = False,
    W_ZERO_POINT: tl.constexpr = False, A_SCALED: tl.constexpr = False, a_scales=None,
    W_SCALE_ROWS: tl.constexpr = 1, A_GROUPED: tl.constexpr = False, W_LEFT: tl.constexpr = False,
):
    """The (BLOCK_M, BLOCK_N) output tile of program ``pid``: (values in fp32, output rows, output
    columns, store mask). Shared by the eager kernel (which stores it) and the Inductor template
    (whose store_output fuses the graph's epilogue into the store).

    The operands come as tuples, each a tensor's pointer with its strides:
        a                (a_ptr, stride_am, stride_ak)           rows of A (tokens when GATHER)
        w, w_up          (ptr, stride_e, stride_n, stride_k)     the (E, N, K) weights (w_up: w when not GATED)
        bias, bias_up    (ptr, stride_e, stride_n)               read where HAS_BIAS / HAS_BIAS_UP
        schedule         PACKED: (sorted_slots_ptr, expert_offsets_ptr); else the padded schedule's
                         (sorted_slots_ptr, block_expert_ptr, num_padded_ptr) (moe_ops.layout)
        sizes            (N, K, num_slots, gather_top_k, num_blocks_max, num_experts)
        act_params       (alpha, limit) of the activation (moe_ops.activations)
        descriptors      TMA: (a_desc, w_desc, u_desc) from make_descriptors; else unused
        w_scales         quantised weights (moe_ops.quantised): (scale_ptr, stride_e, stride_n, stride_g) of w,
                         of w_up, then the same of the zero points of w and of w_up; read where W_SCALED
                         (per-row scales applied to the accumulated columns, tile_output) or W_GROUP_SIZE
                         (each K step's product scaled, or its weight tile dequantised in registers: k_step)

    ``PACKED``: the schedule has no padding (``block_schedule(..., block_m=1)``: each expert's slots
    follow the previous expert's) and gives each expert's ``expert_offsets`` (E + 1,).
    Each program finds its expert and rows from those offsets (an E-long prefix sum of every expert's
    block count), so one schedule serves any BLOCK_M: a graph compiled for every T holds templates of
    several block sizes over one schedule. Rows are schedule positions; idle programs store nothing.

    ``TMA`` (packed, A already in schedule order): A and weight tiles come through the tensor
    descriptors ``a_desc`` (rows of A, block (BLOCK_M, BLOCK_K)) and ``w_desc``/``u_desc`` (rows of the
    weights as (experts x stride_e / stride_n, K), block (BLOCK_N, BLOCK_K)), which the caller makes
    once per program (``make_descriptors``): Hopper's copy engine fetches them, so the warps spend no
    registers or instructions on addresses and masks. The descriptors zero-fill past K and past A's
    rows; rows of the next expert that a tile reads are never stored. ``PAIRED`` (gated, up a fixed
    distance after gate, as the halves of one gate_up weight: ``weight_pair_stride``): ``w_desc`` covers
    both as a (2, rows, K) array, so each K step is one dot of 2 BLOCK_N columns, A read from shared
    memory once instead of once per weight.

    Quantised weights (moe_ops.quantised): ``W_SCALED``, int8 / fp8 values with per-row scales, dots the values
    (less their zero points with ``W_ZERO_POINT``) and scales the accumulated columns; else ``W_GROUP_SIZE`` (the
    reduction features per scale; ``W_SCALE_ROWS`` output features per scale: 1 but for block scales) scales
    each K step's product (decode tiles) or dequantises each weight tile before its dot (k_step), ``W_INT4``
    unpacking two values per byte and ``W_ZERO_POINT`` subtracting the zero points. A holding fp8
    values with fp32 scales (``a_scales``: (pointer, row stride, group stride)): ``A_SCALED``, one per row,
    applied to the accumulated rows (w8a8 with W_SCALED: fp8
    dots, both scales in the epilogue); ``A_GROUPED``, one per row and group of W_GROUP_SIZE inputs, the
    weights' groups (fp8 weights with block scales): each K step's fp8 dot scaled by both groups' scales
    before it is accumulated. ``W_LEFT`` (weights converted in registers: k_step) accumulates the transposed
    tile, turned back before the epilogue."""
    expert, row0, offs_m, rows_in_range, slot, row_valid, a_row, col0, cols, col_valid, k_end = tile_coords(
        pid, schedule, sizes, GATHER, BLOCK_M, BLOCK_N, GROUP_M, PACKED, E_PAD,
    )
    acc, acc_up = tile_accumulators(BLOCK_M, BLOCK_N, GATED, W_LEFT)
    if TMA:
        tl.static_assert(PACKED and not GATHER, "TMA tiles need a packed schedule and A in its order")
        tl.static_assert(not W_SCALED and W_GROUP_SIZE == 0, "TMA tiles read weights of A's dtype")
        a_desc, w_desc, u_desc = descriptors
        _, stride_we, stride_wn, _ = w
        w_row = (expert * (stride_we // stride_wn) + col0).to(tl.int32)
        if PAIRED:
            # Gate and up rows of one column block, one box apart in a 3-D descriptor: one (2 BLOCK_N)-wide
            # dot per K step instead of two that each read the A tile again.
            tl.static_assert(GATED, "a pair of weights is a gated GEMM's")
            acc_pair = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
            for k0 in range(0, k_end, BLOCK_K):
                a_tile = a_desc.load([row0.to(tl.int32), k0])
                w_pair = w_desc.load([0, w_row, k0]).reshape(2 * BLOCK_N, BLOCK_K)
                acc_pair = tl.dot(a_tile, w_pair.T, acc_pair, input_precision=INPUT_PRECISION)
            acc, acc_up = tl.split(acc_pair.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1))
        else:
            if GATED:
                _, stride_ue, stride_un, _ = w_up
                u_row = (expert * (stride_ue // stride_un) + col0).to(tl.int32)
            for k0 in range(0, k_end, BLOCK_K):
                a_tile = a_desc.load([row0.to(tl.int32), k0])
                acc = tl.dot(a_tile, w_desc.load([w_row, k0]).T, acc, input_precision=INPUT_PRECISION)
                if GATED:
                    acc_up = tl.dot(a_tile, u_desc.load([u_row, k0]).T, acc_up, input_precision=INPUT_PRECISION)
    else:
        a_ptr, stride_am, stride_ak = a
        _, K, _, _, _, _ = sizes
        _, _, _, stride_wk = w
        _, _, _, stride_uk = w_up
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs, u_ptrs = weight_tile_ptrs(w, w_up, expert, cols, BLOCK_K, W_INT4, W_LEFT)
        groups = weight_group_ptrs(w_scales, expert, cols, W_GROUP_SIZE, W_SCALE_ROWS, W_ZERO_POINT)
        a_groups = input_group_ptrs(a_scales, a_row, row_valid, A_GROUPED)
        for k0 in range(0, k_end, BLOCK_K):
            a_tile = tl.load(a_ptrs, mask=row_valid[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            acc, acc_up, w_ptrs, u_ptrs = k_step(a_tile, acc, acc_up, w_ptrs, u_ptrs, K - k0, col_valid, stride_wk,
                                                 stride_uk, GATED, INPUT_PRECISION, BLOCK_K, W_GROUP_SIZE, W_INT4,
                                                 W_ZERO_POINT, groups, k0, A_GROUPED, a_groups, W_LEFT)
            a_ptrs += BLOCK_K * stride_ak
        acc, acc_up = untransposed(acc, acc_up, GATED, W_LEFT)
    if A_SCALED:
        a_scale_ptr, stride_asm, _ = a_scales
        a_scale = tl.load(a_scale_ptr + a_row * stride_asm, mask=row_valid, other=0.0)[:, None]
        acc *= a_scale
        if GATED:
            acc_up *= a_scale
    return tile_output(
        acc, acc_up, expert, slot, row_valid, offs_m, rows_in_range, cols, col_valid, bias, bias_up,
        slot_weight_ptr, act_params, SCATTER, GATED, HAS_BIAS, HAS_BIAS_UP, HAS_SLOT_WEIGHT, ACTIVATION,
        W_SCALED, w_scales,
    )


@triton.jit
def tile_coords(pid, schedule, sizes, GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                GROUP_M: tl.constexpr, PACKED: tl.constexpr, E_PAD: tl.constexpr):
    """Where program ``pid``'s tile is (``schedule`` and ``sizes`` as expert_gemm_tile takes them): (expert,
    first row, its rows, which of them are in the schedule, their slots, which are routed, the rows of A
    they read, the first column, the columns, which of them exist, the K extent: 0 for an idle tile)."""
    N, K, num_slots, gather_top_k, num_blocks_max, num_experts = sizes
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if PACKED:
        sorted_slots_ptr, expert_offsets_ptr = schedule
        e_idx = tl.arange(0, E_PAD)
        e_valid = e_idx < num_experts
        expert_start = tl.load(expert_offsets_ptr + e_idx, mask=e_valid, other=0)
        expert_end = tl.load(expert_offsets_ptr + 1 + e_idx, mask=e_valid, other=0)
        expert_blocks = (expert_end - expert_start + BLOCK_M - 1) // BLOCK_M
        expert_blocks_end = tl.cumsum(expert_blocks, 0)
        num_blocks = tl.sum(expert_blocks, 0)
    else:
        sorted_slots_ptr, block_expert_ptr, num_padded_ptr = schedule
        num_blocks = tl.load(num_padded_ptr) // BLOCK_M
    num_busy = num_blocks * num_pid_n
    busy = pid < num_busy
    # Grouped order: GROUP_M consecutive blocks (mostly of one expert) sweep the N tiles together,
    # so each weight tile is fetched from HBM about once per group instead of once per block.
    num_pid_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.maximum(tl.minimum(num_blocks - first_m, GROUP_M), 1)
    # Blocks past the schedule's end hold only padding: no K loop, a tile of zeros, which the
    # schedule-order output stores (every row of the op's output is defined).
    idle = pid - num_busy
    pid_m = tl.where(busy, first_m + (pid % num_pid_in_group) % group_size_m, num_blocks + idle // num_pid_n)
    pid_n = tl.where(busy, (pid % num_pid_in_group) // group_size_m, idle % num_pid_n)
    k_end = tl.where(busy, K, 0)

    if PACKED:
        # The expert whose blocks cover pid_m: the first whose running block count passes it (E for an
        # idle program, whose rows are then empty).
        expert_of_block = tl.sum((expert_blocks_end <= pid_m).to(tl.int32), 0)
        mine = e_idx == expert_of_block
        first_block = tl.sum(tl.where(mine, expert_blocks_end - expert_blocks, 0), 0)
        rows_end = tl.sum(tl.where(mine, expert_end, 0), 0)
        row0 = tl.sum(tl.where(mine, expert_start, 0), 0) + (pid_m - first_block) * BLOCK_M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        rows_in_range = offs_m < rows_end
        expert = tl.minimum(expert_of_block, num_experts - 1).to(tl.int64)
        slot = tl.load(sorted_slots_ptr + offs_m, mask=rows_in_range, other=num_slots)
    else:
        row0 = pid_m * BLOCK_M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        block_in_range = pid_m < num_blocks_max
        expert = tl.maximum(tl.load(block_expert_ptr + pid_m, mask=block_in_range, other=0), 0).to(tl.int64)
        slot = tl.load(sorted_slots_ptr + offs_m, mask=block_in_range, other=num_slots)
        rows_in_range = offs_m < num_blocks_max * BLOCK_M
    row_valid = slot < num_slots
    if GATHER:
        a_row = tl.where(row_valid, slot // gather_top_k, 0).to(tl.int64)
    else:
        a_row = offs_m.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    return expert, row0, offs_m, rows_in_range, slot, row_valid, a_row, pid_n * BLOCK_N, cols, col_valid, k_end


@triton.jit
def tile_accumulators(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr,
                      W_LEFT: tl.constexpr = False):
    """The gate and up accumulators (up is the gate's when not gated: no second GEMM); W_LEFT (k_step) the
    transposed tile's, (BLOCK_N, BLOCK_M)."""
    if W_LEFT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros(acc.shape, dtype=tl.float32)
    else:
        acc_up = acc
    return acc, acc_up


@triton.jit
def untransposed(acc, acc_up, GATED: tl.constexpr, W_LEFT: tl.constexpr):
    """The accumulators as (BLOCK_M, BLOCK_N) tiles after a K loop that accumulated them transposed (W_LEFT)."""
    if W_LEFT:
        acc = acc.T
        if GATED:
            acc_up = acc_up.T
        else:
            acc_up = acc
    return acc, acc_up


@triton.jit
def weight_tile_ptrs(w, w_up, expert, cols, BLOCK_K: tl.constexpr, W_INT4: tl.constexpr = False,
                     W_LEFT: tl.constexpr = False):
    """Pointers to the first weight tiles (gate, up) of a pointer-load tile, (BLOCK_K, BLOCK_N), or (BLOCK_N,
    BLOCK_K) where the weights are the dot's left operand (W_LEFT: k_step); int4, BLOCK_K / 2 bytes along
    k (a shallower step than JOINED_INT4_MIN_K: each value's byte); ``w`` and ``w_up`` as expert_gemm_tile
    takes them."""
    w_ptr, stride_we, stride_wn, stride_wk = w
    w_up_ptr, stride_ue, stride_un, stride_uk = w_up
    if W_INT4 and BLOCK_K < JOINED_INT4_MIN_K:
        offs_k = tl.arange(0, BLOCK_K) // 2  # each value's byte (weight_tile)
    else:
        offs_k = tl.arange(0, BLOCK_K // 2 if W_INT4 else BLOCK_K)
    if W_LEFT:
        n_index, k_index = cols[:, None].to(tl.int64), offs_k[None, :]
    else:
        n_index, k_index = cols[None, :].to(tl.int64), offs_k[:, None]
    w_ptrs = w_ptr + expert * stride_we + n_index * stride_wn + k_index * stride_wk
    u_ptrs = w_up_ptr + expert * stride_ue + n_index * stride_un + k_index * stride_uk
    return w_ptrs, u_ptrs


@triton.jit
def weight_group_ptrs(w_scales, expert, cols, W_GROUP_SIZE: tl.constexpr, W_SCALE_ROWS: tl.constexpr = 1,
                      W_ZERO_POINT: tl.constexpr = False):
    """For weights quantised in groups (W_GROUP_SIZE > 0), or with zero points: pointers to the first group's
    scales and zero points of its columns (W_SCALE_ROWS output features per scale), for w and w_up, each
    with its stride from group to group (``w_scales`` as expert_gemm_tile takes it; per-row ones have one
    group); an unread placeholder otherwise."""
    if W_GROUP_SIZE > 0 or W_ZERO_POINT:
        (s_ptr, s_e, s_n, s_g, us_ptr, us_e, us_n, us_g,
         z_ptr, z_e, z_n, z_g, uz_ptr, uz_e, uz_n, uz_g) = w_scales
        rows = cols // W_SCALE_ROWS
        groups = (s_ptr + expert * s_e + rows * s_n, s_g, us_ptr + expert * us_e + rows * us_n, us_g,
                  z_ptr + expert * z_e + rows * z_n, z_g, uz_ptr + expert * uz_e + rows * uz_n, uz_g)
    else:
        groups = expert
    return groups


@triton.jit
def input_group_ptrs(a_scales, a_row, row_valid, A_GROUPED: tl.constexpr):
    """For fp8 A scaled per group (A_GROUPED): (pointers to its rows' first group's scales, the stride from
    group to group, which rows are read); an unread placeholder otherwise."""
    if A_GROUPED:
        a_scale_ptr, stride_asm, stride_asg = a_scales
        a_groups = (a_scale_ptr + a_row * stride_asm, stride_asg, row_valid)
    else:
        a_groups = a_row
    return a_groups


@triton.jit
def int4_as_float32(nibbles):
    """Values in [0, 16) as fp32, exactly, without an int-to-float conversion (which runs at an eighth of the
    fp32 add rate on Hopper and bounded int4 decode): the bits of 2^23 ORed with n are the fp32 2^23 + n (n in
    the mantissa's lowest bits); subtracting 2^23 leaves n. (int8 needs no such help: Triton converts it to
    bf16 through packed bf16 adds of its own.)"""
    return (nibbles.to(tl.int32) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC


@triton.jit
def per_feature(v, W_LEFT: tl.constexpr):
    """(BLOCK_N,) values per output feature laid along a weight tile's (or a product's) features: its rows where
    the weights are the left operand (W_LEFT), else its columns."""
    return v[:, None] if W_LEFT else v[None, :]


@triton.jit
def stored_values(ptrs, k_left, col_valid, BLOCK_K: tl.constexpr, W_LEFT: tl.constexpr):
    """A K step's stored weights (one value an element), oriented as ``ptrs``; 0 past K and past the columns."""
    k_valid = tl.arange(0, BLOCK_K) < k_left
    mask = col_valid[:, None] & k_valid[None, :] if W_LEFT else k_valid[:, None] & col_valid[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def packed_int4(ptrs, k_left, col_valid, BLOCK_K: tl.constexpr):
    """A K step's int4 weights as stored, (BLOCK_N, BLOCK_K / 2) bytes along each row, two values a byte; 0 past K
    and past the columns."""
    k_valid = tl.arange(0, BLOCK_K // 2) < k_left // 2  # K is even: whole bytes
    return tl.load(ptrs, mask=col_valid[:, None] & k_valid[None, :], other=0)


@triton.jit
def weight_tile(ptrs, k_left, col_valid, a, BLOCK_K: tl.constexpr, W_GROUP_SIZE: tl.constexpr,
                W_INT4: tl.constexpr, W_ZERO_POINT: tl.constexpr, scale_ptrs, zero_ptrs,
                A_GROUPED: tl.constexpr = False, W_LEFT: tl.constexpr = False):
    """A K step's weights in A's dtype for the dot, oriented as ``ptrs`` (weight_tile_ptrs). Stored values of
    another dtype are converted through fp32 (exact for int8 / fp8 / int4: all fit bf16's 8-bit mantissa;
    Triton 3.6's interpreter misconverts int8 to bf16 directly); with W_GROUP_SIZE, dequantised: ``(values -
    zero) * scale`` of the tile's group (``scale_ptrs`` / ``zero_ptrs``: (BLOCK_N,) pointers, one per output feature),
    unless A_GROUPED (fp8 against fp8: the caller scales the dot); otherwise, with W_ZERO_POINT, the values less
    their zero points (per-row scales: tile_output applies them after the accumulation). W_INT4 (always
    W_LEFT) unpacks BLOCK_K / 2 bytes of each weight row into BLOCK_K values, the even k from the low nibble:
    the pair lies along the row, where the dot's register operand wants it."""
    if W_INT4:
        tl.static_assert(W_LEFT, "int4 weights are unpacked along their rows")
        if BLOCK_K < JOINED_INT4_MIN_K:
            # Triton 3.6 miscompiles the join + reshape below into a 16-deep bf16 left operand (sm90: wrong
            # products; fp32 and deeper steps are right): each value reads its own byte and shifts its nibble out.
            k = tl.arange(0, BLOCK_K)
            packed = tl.load(ptrs, mask=col_valid[:, None] & (k < k_left)[None, :], other=0)
            w = (packed >> ((k % 2) * 4).to(tl.uint8)[None, :]) & 0xF
        else:
            packed = packed_int4(ptrs, k_left, col_valid, BLOCK_K)
            w = tl.join(packed & 0xF, packed >> 4).reshape(packed.shape[0], BLOCK_K)
        w = int4_as_float32(w)
    else:
        w = stored_values(ptrs, k_left, col_valid, BLOCK_K, W_LEFT)
    if W_GROUP_SIZE > 0 and not A_GROUPED:
        # Scales and zero points per output feature: the rows of a left operand, else its columns.
        w = w.to(tl.float32)
        if W_ZERO_POINT:
            w -= per_feature(tl.load(zero_ptrs, mask=col_valid, other=0.0), W_LEFT)
        w *= per_feature(tl.load(scale_ptrs, mask=col_valid, other=0.0), W_LEFT)
    elif W_ZERO_POINT:
        # Per-row scales (W_SCALED: applied to the accumulated columns, tile_output) with zero points: the values
        # less their zero points here. int8 values less whole zero points are whole numbers of magnitude <= 255,
        # exact in bf16 / fp16 (torchao's asymmetric int8: no rounding before the dot).
        w = w.to(tl.float32) - per_feature(tl.load(zero_ptrs, mask=col_valid, other=0.0), W_LEFT)
    if w.dtype != a.dtype:
        w = w.to(tl.float32).to(a.dtype)
    return w


@triton.jit
def dot_step(a, w, acc, INPUT_PRECISION: tl.constexpr, W_LEFT: tl.constexpr):
    """acc + a @ w; W_LEFT, the transposed product: acc (BLOCK_N, BLOCK_M) + w @ a^T, ``w`` (BLOCK_N, BLOCK_K)
    the left operand, which Hopper's wgmma reads from registers (the right one it reads from shared memory,
    where weights converted in registers would have to be written first)."""
    if W_LEFT:
        acc = tl.dot(w, a.T, acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def scaled_group_product(ptrs, k_left, col_valid, a, a_halves, acc, scale_ptrs, zero_ptrs, BLOCK_K: tl.constexpr,
                         W_INT4: tl.constexpr, W_ZERO_POINT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         W_LEFT: tl.constexpr):
    """acc + the step's product of A and one group's weights, scaled after the dot: ``scale * (A @ (values -
    zero))`` per output feature, for a 16-bit A (the scales touch the (BLOCK_N, BLOCK_M) product, not the
    (BLOCK_N, BLOCK_K) weights, which is less work where BLOCK_M < BLOCK_K: decode). int4 values become A's
    dtype with no conversion: a nibble ORed into the bits of 2^7 in bf16 or 2^10 in fp16 (whose last place is
    1) is that power + the nibble; the zero point comes off in A's dtype, two values an instruction: its
    nearest whole number plus the power (exact for zero points that are whole numbers in [0, 128), bf16's
    limit; fp16's is 1024), then its fraction (0 for quantise_groups' zero points, which leaves the values as
    they are; else rounded to A's dtype and again by the subtraction, about one rounding of the value's). The
    low nibbles (even k) and the high ones (odd k) each dot with ``a_halves``, A's matching columns: the
    unpacked values are never interleaved."""
    scale = tl.load(scale_ptrs, mask=col_valid, other=0.0)
    part = tl.zeros(acc.shape, dtype=tl.float32)
    if W_INT4:
        tl.static_assert(W_LEFT, "int4 weights are unpacked along their rows")
        if a.dtype == tl.bfloat16:
            bias, bias_bits = BF16_UNIT_BIAS, BF16_UNIT_BITS
        else:
            bias, bias_bits = FP16_UNIT_BIAS, FP16_UNIT_BITS
        packed = packed_int4(ptrs, k_left, col_valid, BLOCK_K)
        # (The OR with a constexpr widens to int32: back to 16 bits before the bitcast.)
        low = ((packed & 0xF).to(tl.int16) | bias_bits).to(tl.int16).to(a.dtype, bitcast=True)
        high = ((packed >> 4).to(tl.int16) | bias_bits).to(tl.int16).to(a.dtype, bitcast=True)
        zero = tl.load(zero_ptrs, mask=col_valid, other=0.0) if W_ZERO_POINT else tl.zeros_like(scale)
        whole = (zero + bias).to(a.dtype)
        low, high = low - whole[:, None], high - whole[:, None]
        if W_ZERO_POINT:
            fraction = (zero - (whole.to(tl.float32) - bias)).to(a.dtype)[:, None]
            low, high = low - fraction, high - fraction
        a_even, a_odd = a_halves
        part = tl.dot(low, a_even.T, part, input_precision=INPUT_PRECISION)
        part = tl.dot(high, a_odd.T, part, input_precision=INPUT_PRECISION)
    else:
        w = stored_values(ptrs, k_left, col_valid, BLOCK_K, W_LEFT).to(tl.float32)
        if W_ZERO_POINT:
            w -= per_feature(tl.load(zero_ptrs, mask=col_valid, other=0.0), W_LEFT)
        part = dot_step(a, w.to(a.dtype), part, INPUT_PRECISION, W_LEFT)
    return acc + part * per_feature(scale, W_LEFT)


@triton.jit
def k_step(a, acc, acc_up, w_ptrs, u_ptrs, k_left, col_valid, stride_wk, stride_uk, GATED: tl.constexpr,
           INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, W_GROUP_SIZE: tl.constexpr = 0,
           W_INT4: tl.constexpr = False, W_ZERO_POINT: tl.constexpr = False, groups=None, k0=0,
           A_GROUPED: tl.constexpr = False, a_groups=None, W_LEFT: tl.constexpr = False):
    """One K step of a pointer-load tile, given its A tile (loaded by the caller: the eager kernel loads it,
    the Inductor template through load_input, where a fused prologue computes it): both GEMMs' dots, and
    the weight pointers moved on. Weights quantised in groups (W_GROUP_SIZE, ``groups`` from
    weight_group_ptrs) read the scales of the group holding ``k0``, the step's first reduction feature: a
    step never straddles two groups (BLOCK_K divides W_GROUP_SIZE, or W_GROUP_SIZE is K: one group). With a
    16-bit A and fewer rows than the step's depth (decode), the scales multiply the step's product
    (scaled_group_product); else each weight tile is dequantised in registers before its dot (weight_tile).
    A_GROUPED (``a_groups`` from input_group_ptrs): fp8 A and W dotted as stored, the product scaled by the
    group's input-row and weight-column scales. W_LEFT: transposed weight tiles and accumulators (dot_step)."""
    if W_GROUP_SIZE > 0 or W_ZERO_POINT:
        s_ptrs, s_g, us_ptrs, us_g, z_ptrs, z_g, uz_ptrs, uz_g = groups
        if W_GROUP_SIZE > 0:
            group = k0 // W_GROUP_SIZE
        else:  # per-row scales with zero points: one group
            group = 0
        scale_ptrs, zero_ptrs = s_ptrs + group * s_g, z_ptrs + group * z_g
        up_scale_ptrs, up_zero_ptrs = us_ptrs + group * us_g, uz_ptrs + group * uz_g
    else:
        scale_ptrs, zero_ptrs, up_scale_ptrs, up_zero_ptrs = w_ptrs, w_ptrs, u_ptrs, u_ptrs  # unread
    # Scales after the dot (scaled_group_product) where the product tile is the smaller one and A has 16 bits.
    # int4 needs BLOCK_K >= JOINED_INT4_MIN_K there: its halves dot 16 deep at least, and shallower steps read a
    # byte per value (weight_tile_ptrs' pointers), which scaled_group_product does not.
    SCALES_AFTER_DOT: tl.constexpr = (W_GROUP_SIZE > 0 and not A_GROUPED and a.shape[0] < BLOCK_K
                                      and (a.dtype == tl.bfloat16 or a.dtype == tl.float16)
                                      and (BLOCK_K >= JOINED_INT4_MIN_K or not W_INT4))
    if SCALES_AFTER_DOT:
        a_halves = tl.split(a.reshape(a.shape[0], BLOCK_K // 2, 2)) if W_INT4 else a
        acc = scaled_group_product(w_ptrs, k_left, col_valid, a, a_halves, acc, scale_ptrs, zero_ptrs, BLOCK_K,
                                   W_INT4, W_ZERO_POINT, INPUT_PRECISION, W_LEFT)
        if GATED:
            acc_up = scaled_group_product(u_ptrs, k_left, col_valid, a, a_halves, acc_up, up_scale_ptrs,
                                          up_zero_ptrs, BLOCK_K, W_INT4, W_ZERO_POINT, INPUT_PRECISION, W_LEFT)
    else:
        w = weight_tile(w_ptrs, k_left, col_valid, a, BLOCK_K, W_GROUP_SIZE, W_INT4, W_ZERO_POINT, scale_ptrs,
                        zero_ptrs, A_GROUPED, W_LEFT)
        if A_GROUPED:
            a_s_ptrs, a_s_g, row_valid = a_groups
            a_s = tl.load(a_s_ptrs + group * a_s_g, mask=row_valid, other=0.0)[:, None]
            if BLOCK_K < FP8_DOT_MIN_K:  # groups of 16: bf16 dots, which hold every fp8 e4m3 value exactly
                a = a.to(tl.bfloat16)
            acc += tl.dot(a, w.to(a.dtype)) * (a_s * tl.load(scale_ptrs, mask=col_valid, other=0.0)[None, :])
        else:
            acc = dot_step(a, w, acc, INPUT_PRECISION, W_LEFT)
        if GATED:
            u = weight_tile(u_ptrs, k_left, col_valid, a, BLOCK_K, W_GROUP_SIZE, W_INT4, W_ZERO_POINT, up_scale_ptrs,
                            up_zero_ptrs, A_GROUPED, W_LEFT)
            if A_GROUPED:
                acc_up += tl.dot(a, u.to(a.dtype)) * (a_s * tl.load(up_scale_ptrs, mask=col_valid, other=0.0)[None, :])
            else:
                acc_up = dot_step(a, u, acc_up, INPUT_PRECISION, W_LEFT)
    steps = BLOCK_K // 2 if W_INT4 else BLOCK_K  # stored columns per step
    return acc, acc_up, w_ptrs + steps * stride_wk, u_ptrs + steps * stride_uk


@triton.jit
def tile_output(acc, acc_up, expert, slot, row_valid, offs_m, rows_in_range, cols, col_valid, bias, bias_up,
                slot_weight_ptr, act_params, SCATTER: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_BIAS_UP: tl.constexpr, HAS_SLOT_WEIGHT: tl.constexpr, ACTIVATION: tl.constexpr,
                W_SCALED: tl.constexpr = False, w_scales=None):
    """The accumulators made into the tile's output: (values in fp32, output rows, columns, store mask);
    ``bias``, ``bias_up``, ``act_params`` and ``w_scales`` as expert_gemm_tile takes them. A scaled
    weight's scale is per output feature, so it multiplies the accumulated column once, before the bias:
    sum_k a[k] (q[n, k] s[n]) = s[n] sum_k a[k] q[n, k]."""
    if W_SCALED:
        scale_ptr, stride_se, stride_sn, _, up_scale_ptr, stride_use, stride_usn, _ = w_scales[:8]
        acc *= tl.load(scale_ptr + expert * stride_se + cols * stride_sn, mask=col_valid, other=0.0)[None, :]
        if GATED:
            acc_up *= tl.load(up_scale_ptr + expert * stride_use + cols * stride_usn, mask=col_valid,
                              other=0.0)[None, :]
    if HAS_BIAS:
        bias_ptr, stride_be, stride_bn = bias
        acc += tl.load(bias_ptr + expert * stride_be + cols * stride_bn, mask=col_valid, other=0.0
                       ).to(tl.float32)[None, :]
    if HAS_BIAS_UP:
        bias_up_ptr, stride_bue, stride_bun = bias_up
        acc_up += tl.load(bias_up_ptr + expert * stride_bue + cols * stride_bun, mask=col_valid,
                          other=0.0).to(tl.float32)[None, :]
    alpha, limit = act_params
    y = _activate(acc, acc_up, ACTIVATION, GATED, alpha, limit)
    if HAS_SLOT_WEIGHT:
        y *= tl.load(slot_weight_ptr + slot, mask=row_valid, other=0.0).to(tl.float32)[:, None]
    # Padding rows and idle blocks are 0 (a bias or the activation would make them nonzero).
    y = tl.where(row_valid[:, None], y, 0.0)

    if SCATTER:
        # Slot order: only scheduled slots are written, each by exactly one program.
        return y, slot.to(tl.int64), cols, row_valid[:, None] & col_valid[None, :]
    return y, offs_m.to(tl.int64), cols, rows_in_range[:, None] & col_valid[None, :]


@triton.jit
def unrouted_rows_tile(q, ids_ptr, stride_ids, num_slots, N, num_experts,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For program ``q`` of those launched past the GEMM tiles of a slot-order output: (rows, columns,
    mask) of the rows of slots routed to no expert (ids outside [0, E)), which no block owns, so that
    they can be written as zeros. With it the output needs no memset before the GEMM."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    rows = ((q // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (q % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < num_slots
    expert = tl.load(ids_ptr + rows * stride_ids, mask=in_range, other=0)
    unrouted = (expert < 0) | (expert >= num_experts)
    return rows, cols, (unrouted & in_range)[:, None] & (cols < N)[None, :]


@triton.jit
def unrouted_row_blocks(expert_offsets_ptr, num_experts, num_slots, BLOCK_M: tl.constexpr):
    """Row blocks for unrouted_rows_tile to scan in a packed schedule: every block of slot rows where some
    slot is routed to no expert (the last expert offset, the routed count, falls short of the slots), else
    none, so that the usual case pays no pass over the ids (a persistent grid walks those tiles one
    dependent load at a time)."""
    routed = tl.load(expert_offsets_ptr + num_experts)
    return tl.where(routed < num_slots, tl.cdiv(num_slots, BLOCK_M), 0)


@triton.jit
def _expert_gemm_kernel(
    # pointers (each schedule's own: expert_offsets for a packed one, block_expert and num_padded else)
    a_ptr, w_ptr, w_up_ptr, bias_ptr, bias_up_ptr, slot_weight_ptr, out_ptr,
    sorted_slots_ptr, expert_offsets_ptr, block_expert_ptr, num_padded_ptr, ids_ptr, w_scale_ptr, w_up_scale_ptr,
    w_zero_ptr, w_up_zero_ptr, a_scale_ptr,
    # sizes
    N, K, num_slots, gather_top_k, num_blocks_max, num_experts, num_a_rows,
    # strides
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_ue, stride_un, stride_uk,
    stride_be, stride_bn,
    stride_bue, stride_bun,
    stride_om, stride_on, stride_ids,
    stride_se, stride_sn, stride_sg,
    stride_use, stride_usn, stride_usg,
    stride_ze, stride_zn, stride_zg,
    stride_uze, stride_uzn, stride_uzg,
    stride_asm, stride_asg,
    # activation constants
    alpha, limit,
    # meta
    GATHER: tl.constexpr, SCATTER: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_BIAS_UP: tl.constexpr, HAS_SLOT_WEIGHT: tl.constexpr, ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PACKED: tl.constexpr, E_PAD: tl.constexpr, ZERO_UNROUTED: tl.constexpr, TMA: tl.constexpr,
    PAIRED: tl.constexpr, pair_stride, W_SCALED: tl.constexpr, W_GROUP_SIZE: tl.constexpr, W_INT4: tl.constexpr,
    W_ZERO_POINT: tl.constexpr, A_SCALED: tl.constexpr, W_SCALE_ROWS: tl.constexpr, A_GROUPED: tl.constexpr,
    W_LEFT: tl.constexpr,
):
    a = (a_ptr, stride_am, stride_ak)
    w = (w_ptr, stride_we, stride_wn, stride_wk)
    w_up = (w_up_ptr, stride_ue, stride_un, stride_uk)
    if PACKED:
        schedule = (sorted_slots_ptr, expert_offsets_ptr)
    else:
        schedule = (sorted_slots_ptr, block_expert_ptr, num_padded_ptr)
    if TMA:
        descriptors = make_descriptors(a, w, w_up, num_a_rows, N, K, num_experts, GATED, BLOCK_M, BLOCK_N, BLOCK_K,
                                       PAIRED, pair_stride)
    else:
        descriptors = (a_ptr, w_ptr, w_up_ptr)  # unused
    num_tiles = num_blocks_max * tl.cdiv(N, BLOCK_N)
    if ZERO_UNROUTED:
        tl.static_assert(PACKED, "unrouted rows are found from a packed schedule's offsets")
        num_tiles += unrouted_row_blocks(expert_offsets_ptr, num_experts, num_slots, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    # One tile per program, or (a persistent grid of one program per SM) tiles strided by the grid.
    for pid in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        y, rows, cols, mask = expert_gemm_tile(
            pid, a, w, w_up, (bias_ptr, stride_be, stride_bn), (bias_up_ptr, stride_bue, stride_bun), slot_weight_ptr,
            schedule, (N, K, num_slots, gather_top_k, num_blocks_max, num_experts), (alpha, limit), descriptors,
            GATHER, SCATTER, GATED, HAS_BIAS, HAS_BIAS_UP, HAS_SLOT_WEIGHT, ACTIVATION, INPUT_PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PACKED, E_PAD, TMA, PAIRED,
            W_SCALED, (w_scale_ptr, stride_se, stride_sn, stride_sg, w_up_scale_ptr, stride_use, stride_usn, stride_usg,
                       w_zero_ptr, stride_ze, stride_zn, stride_zg, w_up_zero_ptr, stride_uze, stride_uzn, stride_uzg),
            W_GROUP_SIZE, W_INT4, W_ZERO_POINT, A_SCALED, (a_scale_ptr, stride_asm, stride_asg), W_SCALE_ROWS,
            A_GROUPED, W_LEFT,
        )
        if ZERO_UNROUTED:
            q = pid - num_blocks_max * tl.cdiv(N, BLOCK_N)
            if q >= 0:
                rows, cols, mask = unrouted_rows_tile(q, ids_ptr, stride_ids, num_slots, N, num_experts, BLOCK_M,
                                                      BLOCK_N)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, y.to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def make_descriptors(a, w, w_up, num_a_rows, N, K, num_experts, GATED: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIRED: tl.constexpr = False, pair_stride=0):
    """Tensor descriptors of a TMA tile (``a``, ``w``, ``w_up`` as expert_gemm_tile takes them, unit
    stride along K): A's rows, and each weight as the 2-D rows of its (E, N, K) view (expert e's rows
    start at e * stride_e / stride_n); PAIRED, one for both weights, the pair's rows as a (2, rows, K)
    array (up = gate + pair_stride elements)."""
    a_ptr, stride_am, _ = a
    w_ptr, stride_we, stride_wn, _ = w
    w_up_ptr, stride_ue, stride_un, _ = w_up
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[num_a_rows, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    if PAIRED:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[2, (num_experts - 1) * (stride_we // stride_wn) + N, K],
                                           strides=[pair_stride, stride_wn, 1], block_shape=[2, BLOCK_N, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[(num_experts - 1) * (stride_we // stride_wn) + N, K],
                                           strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    if GATED and not PAIRED:
        u_desc = tl.make_tensor_descriptor(w_up_ptr, shape=[(num_experts - 1) * (stride_ue // stride_un) + N, K],
                                           strides=[stride_un, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        u_desc = w_desc
    return a_desc, w_desc, u_desc


def set_descriptor_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors live in global scratch memory that Triton asks the caller's
    allocator for; Inductor's launcher sets one for its kernels, the eager launcher does the same."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def expert_gemm_triton(
    a, w, schedule: PaddedSchedule | PackedSchedule, num_slots: int, block_m: int, *, w_up=None, bias=None,
    bias_up=None, slot_weights=None, gather_top_k: int = 0, scatter: bool = False, activation: str = "none",
    alpha: float = CLAMPED_SWIGLU_ALPHA, limit: float = CLAMPED_SWIGLU_LIMIT, config=None, out_dtype=None,
    slot_ids=None, tma: bool = False, w_scale=None, w_up_scale=None, w_zero=None, w_up_zero=None, a_scale=None,
):
    """Launch the kernel; the arguments and result of moe_ops.expert_gemm.expert_gemm_ref, its schedule
    either the padded one it takes or a PackedSchedule (for any ``block_m``; a schedule-order output then
    has one row per position and only routed rows written).
    ``config`` (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) replaces the heuristic's choice:
    benchmarks/profile_kernels.py sweeps it. ``out_dtype`` (default a's) stores the fp32 accumulator
    in another dtype: the backward keeps the two dx parts of a separate w_up in fp32 until their sum.
    ``slot_ids`` (S,), with ``scatter``: each slot's expert, so that the kernel writes the zeros of the
    slots routed to no expert (ids outside [0, E)) itself (else the output is zero-filled first). ``tma``: load
    through tensor descriptors on a persistent grid (expert_gemm_tile) where the inputs allow it
    (``tma_applies``, A in schedule order with contiguous rows); the caller decides whether it pays.
    ``w_scale`` / ``w_up_scale`` (and zero points ``w_zero`` / ``w_up_zero``): ``w`` / ``w_up`` hold quantised
    values (moe_ops.quantised; pointer loads only: no TMA tiles). ``a_scale`` fp32: ``a`` holds fp8 values,
    with a scale per row (rows of a,) or per row and group of the weights' groups (rows of a, G) (then give
    ``out_dtype``)."""
    sorted_slots = schedule.sorted_slots
    num_positions = sorted_slots.shape[0]
    n, k = w.shape[1], a.shape[1]
    num_experts = w.shape[0]
    out_dtype = out_dtype or a.dtype
    zero_unrouted = scatter and slot_ids is not None
    if scatter:
        out = (torch.empty if zero_unrouted else torch.zeros)((num_slots, n), dtype=out_dtype, device=a.device)
    else:
        out = torch.empty((num_positions, n), dtype=out_dtype, device=a.device)
    packed = isinstance(schedule, PackedSchedule)
    if packed:
        num_blocks_max = packed_blocks_max(num_slots, num_experts, block_m)
    else:
        num_blocks_max = schedule.block_expert.shape[0]
    if num_slots == 0 or num_blocks_max == 0 or n == 0:
        return out.zero_()
    gated = w_up is not None
    # The interpreter (CPU tensors) has no SMs or shared-memory limit to respect.
    num_sms, smem_bytes = device_limits(a.device.index or 0) if a.device.type == "cuda" else (1, 1 << 30)
    # fp32 inputs stay exact unless the user allowed tf32, as torch.matmul does.
    ieee = a.dtype == torch.float32 and not fp32_matmul_allows_tf32()
    quantised = weight_quantisation(w.dtype, None if w_scale is None else w_scale.shape, w_zero is not None, n, k)
    scaled = quantised["W_SCALED"] or quantised["W_GROUP_SIZE"] > 0 or a_scale is not None
    if tma and not scaled:
        weights = [(t.shape, t.stride(), t.data_ptr()) for t in (w, w_up) if t is not None]
        # CPU tensors: the interpreter, which runs descriptors too (the tests' way to check this path).
        tma = (packed and gather_top_k == 0 and a.stride(1) == 1
               and (a.stride(0) * a.element_size()) % TMA_ALIGN_BYTES == 0 and a.data_ptr() % TMA_ALIGN_BYTES == 0
               and (a.device.type == "cpu" or tma_device(a.device))
               and tma_applies(a.dtype, block_m, n, gated, weights))
    tma = tma and not scaled
    if config is None:
        config = gemm_config(block_m, gated, a.element_size(), smem_bytes, ieee, tma,
                             quantised["W_LEFT"], a_scale is not None and a_scale.dim() == 2)
    tma = tma and n % config["BLOCK_N"] == 0
    config = dict(config, BLOCK_K=group_block_k(config["BLOCK_K"], quantised["W_GROUP_SIZE"], k))
    pair_stride = None
    if tma and gated:
        pair_stride = weight_pair_stride((w.shape, w.stride()), (w_up.shape, w_up.stride()),
                                         w_up.data_ptr() - w.data_ptr(), w.element_size())
    unrouted_blocks = triton.cdiv(num_slots, block_m) if zero_unrouted else 0
    num_tiles = (num_blocks_max + unrouted_blocks) * triton.cdiv(n, config["BLOCK_N"])
    # TMA tiles run on a persistent grid: one program per SM walks the tiles.
    grid = (min(num_tiles, num_sms) if tma else num_tiles,)
    if tma:
        set_descriptor_allocator(a.device)
    dummy = out  # placeholder pointer for absent optional tensors; never dereferenced
    _expert_gemm_kernel[grid](
        a, w, w_up if gated else dummy, bias if bias is not None else dummy,
        bias_up if bias_up is not None else dummy,
        slot_weights if slot_weights is not None else dummy, out,
        sorted_slots, schedule.expert_offsets if packed else dummy, dummy if packed else schedule.block_expert,
        dummy if packed else schedule.num_padded, slot_ids if zero_unrouted else dummy,
        w_scale if scaled else dummy, w_up_scale if scaled and gated else dummy,
        w_zero if w_zero is not None else dummy, w_up_zero if w_up_zero is not None else dummy,
        a_scale if a_scale is not None else dummy,
        n, k, num_slots, max(gather_top_k, 1), num_blocks_max, num_experts, a.shape[0],
        a.stride(0), a.stride(1),
        *w.stride(),
        *(w_up.stride() if gated else (0, 0, 0)),
        *(bias.stride() if bias is not None else (0, 0)),
        *(bias_up.stride() if bias_up is not None else (0, 0)),
        out.stride(0), out.stride(1), slot_ids.stride(0) if zero_unrouted else 0,
        *scale_strides(w_scale), *scale_strides(w_up_scale), *scale_strides(w_zero), *scale_strides(w_up_zero),
        *((a_scale.stride(0), a_scale.stride(1) if a_scale.dim() == 2 else 0) if a_scale is not None else (0, 0)),
        float(alpha), float(limit),
        GATHER=gather_top_k > 0, SCATTER=bool(scatter), GATED=gated, HAS_BIAS=bias is not None,
        HAS_BIAS_UP=bias_up is not None, HAS_SLOT_WEIGHT=slot_weights is not None,
        ACTIVATION=ACTIVATION_CODE[activation],
        INPUT_PRECISION="ieee" if ieee else "tf32",
        BLOCK_M=block_m, PACKED=packed, E_PAD=triton.next_power_of_2(num_experts) if packed else 1,
        ZERO_UNROUTED=zero_unrouted, TMA=tma, PAIRED=pair_stride is not None, pair_stride=pair_stride or 0,
        A_SCALED=a_scale is not None and a_scale.dim() == 1, A_GROUPED=a_scale is not None and a_scale.dim() == 2,
        **quantised, **config,
    )
    return out


def weight_quantisation(w_dtype: torch.dtype, scale_shape, has_zero: bool, n: int, k: int) -> dict:
    """The kernel's quantised-weight flags for an (E, ``n``, ``k``) weight of ``w_dtype`` with scales of
    ``scale_shape`` (None: not quantised) and zero points or not (moe_ops.quantised): per-row scales of int8 /
    fp8 values scale the accumulated columns (W_SCALED; zero points, W_ZERO_POINT, come off the values before
    the dot: weight_tile); any other form has W_GROUP_SIZE reduction features and W_SCALE_ROWS output features
    per scale (k_step scales each step's product or dequantises each weight tile).
    int4 weights are the dots' left operand (W_LEFT: k_step); int8 and fp8 weights the right one, which ran
    faster on the H100 (Mixtral-8x7B, benchmarks/NOTES.md v18)."""
    plain = dict(W_SCALED=False, W_GROUP_SIZE=0, W_INT4=False, W_ZERO_POINT=False, W_SCALE_ROWS=1, W_LEFT=False)
    if scale_shape is None:
        return plain
    int4 = w_dtype == torch.uint8
    plain = dict(plain, W_LEFT=int4)
    if not int4 and len(scale_shape) == 2:
        return dict(plain, W_SCALED=True, W_ZERO_POINT=has_zero)
    row_blocks, groups = (int(scale_shape[1]), int(scale_shape[2])) if len(scale_shape) == 3 else (int(n), 1)
    return dict(plain, W_GROUP_SIZE=int(k) // groups, W_INT4=int4, W_ZERO_POINT=has_zero,
                W_SCALE_ROWS=int(n) // row_blocks)


def group_block_k(block_k: int, group_size: int, k: int) -> int:
    """BLOCK_K for weights dequantised in groups of ``group_size``: a K step reads one group's scales, so
    the step divides the group (a power of two, 16 at least: moe_ops.quantised.MIN_GROUP_SIZE), unless the
    group is all of K."""
    if group_size == 0 or group_size == k:
        return block_k
    return min(block_k, group_size & -group_size)


def scale_strides(t) -> tuple:
    """(stride_e, stride_n, stride_g) of an (E, N) or (E, N, G) scale or zero point ((0, 0, 0) absent; the
    group stride of a per-row one is never moved along)."""
    if t is None:
        return 0, 0, 0
    return (*t.stride(), 0) if t.dim() == 2 else tuple(t.stride())
