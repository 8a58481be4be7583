"""Triton kernel for the weight gradients of the expert GEMMs: dW[e] = sum over expert e's rows of g^T a.

The block schedule keeps each expert's rows contiguous (padded to whole blocks), so a program owns
one (expert, BLOCK_N x BLOCK_K) tile of dW and walks that expert's rows BLOCK_M at a time, reading
each operand either in schedule order or gathered from the tokens (row s // top_k for slot s), and
scaling g's rows by a per-slot weight where asked (the routing weight of the down projection's
output). Padding rows are masked. Each output element is written once, by one program: no atomics, the sum
over rows runs in a fixed order (deterministic). Experts with no rows get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ops._compat import fp32_matmul_allows_tf32


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


def expert_weight_grad_triton(g, a, out_ENK, sorted_slots, padded_offsets, num_slots, top_k, *,
                              gather_g=False, gather_a=False, slot_scale=None):
    """Write ``out_ENK[e] = sum over the schedule rows p of expert e of (s_p g_p)^T a_p`` and return it.

    ``g`` (rows, N) and ``a`` (rows, K) hold one row per schedule row (P rows), or, gathered
    (``gather_g`` / ``gather_a``), per token: slot s reads row s // top_k. ``slot_scale`` (S,) scales
    each row of g by its slot's value (a routing weight), in fp32 before the product's rounding to a's
    dtype. ``out_ENK`` (E, N, K) may have any strides (a view into a gradient laid out like the weight);
    every element is written. ``padded_offsets`` (E + 1,) int32: where each expert's padded rows start.
    """
    num_experts, n, k = out_ENK.shape
    if num_experts == 0 or n == 0 or k == 0:
        return out_ENK
    ieee = a.dtype == torch.float32 and not fp32_matmul_allows_tf32()
    # Half precision: (64 x 128) g and a tiles, 32 KB a stage; fp32 halves the tiles to stay within
    # shared memory at three stages.
    block_m, block_n, block_k, warps = (32, 64, 64, 4) if a.dtype == torch.float32 else (64, 128, 128, 8)
    grid = (num_experts, triton.cdiv(n, block_n) * triton.cdiv(k, block_k))
    _expert_weight_grad_kernel[grid](
        g, a, slot_scale if slot_scale is not None else g, out_ENK, sorted_slots, padded_offsets,
        n, k, num_slots, max(top_k, 1),
        g.stride(0), g.stride(1), a.stride(0), a.stride(1), *out_ENK.stride(),
        GATHER_G=gather_g, GATHER_A=gather_a, HAS_SCALE=slot_scale is not None,
        INPUT_PRECISION="ieee" if ieee else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3,
    )
    return out_ENK
