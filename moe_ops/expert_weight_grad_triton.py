"""Triton kernel for the weight gradients of the expert GEMMs: dW[e] = sum over expert e's rows of g^T a.

The block schedule keeps each expert's rows contiguous (padded to whole blocks), so a program owns
one (expert, BLOCK_N x BLOCK_K) tile of dW and walks that expert's rows BLOCK_M at a time, reading
``a`` either in schedule order or gathered from the tokens (``GATHER``: row s // top_k for slot s).
Padding rows are masked. Each output element is written once, by one program: no atomics, the sum
over rows runs in a fixed order (deterministic). Experts with no rows get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ops._compat import fp32_matmul_allows_tf32


@triton.jit
def _expert_weight_grad_kernel(
    g_ptr, a_ptr, out_ptr, sorted_slots_ptr, padded_offsets_ptr,
    N, K, num_slots, gather_top_k,
    stride_gm, stride_gn,
    stride_am, stride_ak,
    stride_oe, stride_on, stride_ok,
    GATHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
        if GATHER:
            a_row = tl.where(valid, slot // gather_top_k, 0).to(tl.int64)
        else:
            a_row = rows.to(tl.int64)
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=valid[:, None] & n_valid[None, :], other=0.0)
        a = tl.load(a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=valid[:, None] & k_valid[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), a, acc, input_precision=INPUT_PRECISION)
    out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe + offs_n[:, None].to(tl.int64) * stride_on
                + offs_k[None, :] * stride_ok)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_valid[:, None] & k_valid[None, :])


def expert_weight_grad_triton(g_PN, a, out_ENK, sorted_slots, padded_offsets, num_slots, gather_top_k):
    """Write ``out_ENK[e] = sum over the rows p of expert e of g_PN[p]^T a_row(p)`` (any strides of
    ``out_ENK``, e.g. a view into a gradient laid out like the weight) and return it.

    Args:
        g_PN:           (P, N) in schedule order (the output gradient of the expert GEMM)
        a:              (P, K) in schedule order, or (T, K) tokens when ``gather_top_k`` > 0
        out_ENK:        (E, N, K) destination
        sorted_slots:   (P,) the schedule's slots (padding = ``num_slots``)
        padded_offsets: (E + 1,) int32, where each expert's padded rows start in the schedule
    """
    num_experts, n, k = out_ENK.shape
    if num_experts == 0 or n == 0 or k == 0:
        return out_ENK
    ieee = g_PN.dtype == torch.float32 and not fp32_matmul_allows_tf32()
    # Half precision: (64 x 128) g and a tiles, 32 KB a stage; fp32 halves the tiles to stay within
    # shared memory at three stages.
    block_m, block_n, block_k, warps = (32, 64, 64, 4) if g_PN.dtype == torch.float32 else (64, 128, 128, 8)
    grid = (num_experts, triton.cdiv(n, block_n) * triton.cdiv(k, block_k))
    _expert_weight_grad_kernel[grid](
        g_PN, a, out_ENK, sorted_slots, padded_offsets,
        n, k, num_slots, max(gather_top_k, 1),
        g_PN.stride(0), g_PN.stride(1), a.stride(0), a.stride(1), *out_ENK.stride(),
        GATHER=gather_top_k > 0, INPUT_PRECISION="ieee" if ieee else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3,
    )
    return out_ENK
