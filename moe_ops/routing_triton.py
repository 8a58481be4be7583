"""Triton kernel of ``moe_ops::route``: scoring, group-limited top-k and weights in one pass.

Shape legend: T tokens, E experts (E_PAD = next power of two), K experts per token (K_PAD likewise),
N_GROUP expert groups of G = E / N_GROUP experts.

Each program owns BLOCK_T rows and reads its (BLOCK_T, E_PAD) tile of logits once; everything else
happens in registers. With STATS, each program also writes its rows' slots per expert and sums of the
softmax probabilities (the load-balancing loss's statistics) as one row of a (programs, E) partial
table, which torch then sums in a fixed order: no second pass over the logits, no atomics.

The semantics are those of :func:`moe_ops.routing.route_ref` on CUDA tensors,
whose selections are CUDA's ``torch.topk``: it picks by the radix order of the values' bits (NaN above
+inf, +0.0 above -0.0) and, among equal values, the lower index. The kernel selects on that order as an
integer key (:func:`_order_key`), so its experts are torch.topk's on the GPU, ties and NaNs included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from moe_ops._dispatch import launch_jit
from moe_ops.settings import config

# Register tile budget of one program: rows * padded experts, for num_warps=4.
_TILE_ELEMENTS = 4096
# More rows per program only adds serial work once the tile is full; fewer programs than SMs for a
# few thousand tokens would leave the GPU idle.
_MAX_BLOCK_T = 32
# Tile elements per warp. Rows per program follow T and warps follow the tile: one token over 128
# experts is one row on one warp, whose reductions are shuffles (it was 32 rows on four warps for any
# T: 14.5 us for one token on the H100, 5.0 us after; benchmarks/NOTES.md, v5).
_ELEMENTS_PER_WARP = 512


@triton.jit
def _exp(x, PRECISE_EXP: tl.constexpr):
    # tl.exp lowers fp32 to ex2.approx; libdevice's expf is what torch's CUDA softmax/sigmoid use.
    # With IEEE division, GPU sigmoid scores then equal torch's bit for bit (softmax ones up to
    # the order of the row sum), so near-tied selections (sigmoid + bias) come out as torch's.
    # The interpreter has no libdevice, hence the flag.
    if PRECISE_EXP:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _div(a, b, IEEE_DIV: tl.constexpr):
    # fp32 `/` lowers to div.full.f32 (2 ulp); torch divides with IEEE rounding. fp64 `/` is IEEE.
    if IEEE_DIV:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _softmax_rows(x, PRECISE_EXP: tl.constexpr, IEEE_DIV: tl.constexpr):
    """Softmax of each row of x (-inf in padding columns), in x's dtype."""
    e = _exp(x - tl.max(x, axis=1)[:, None], PRECISE_EXP)
    return _div(e, tl.sum(e, axis=1)[:, None], IEEE_DIV)


@triton.jit
def _order_key(x):
    """An integer that orders like CUDA's torch.topk orders ``x``: the float's bits with the magnitude
    bits flipped for negatives (so -0.0 ranks below +0.0, -inf below every finite value), and every NaN
    above +inf. fp32 gives int32 keys, fp64 int64."""
    if x.dtype == tl.float64:
        bits = x.to(tl.int64, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        return tl.where(x != x, 0x7FFFFFFFFFFFFFFF, key)
    else:
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return tl.where(x != x, 0x7FFFFFFF, key)


@triton.jit
def _take_best(key, cols, E_PAD: tl.constexpr, NONE: tl.constexpr):
    """Each row's highest key, at the lowest column holding it (torch.topk's pick on CUDA): returns that
    column, its mask, and the keys with it taken (set to NONE)."""
    best = tl.max(key, axis=1)
    best_at = tl.min(tl.where(key == best[:, None], cols[None, :], E_PAD), axis=1)
    is_best = cols[None, :] == best_at[:, None]
    return best_at, is_best, tl.where(is_best, NONE, key)


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, counts_partial_ptr, prob_sum_partial_ptr,
    T, E, group_size,
    stride_lt, stride_le, stride_b,
    renorm_eps, scale, renorm_min,
    E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SCORING: tl.constexpr,  # 0 = softmax, 1 = sigmoid
    SOFTMAX_AFTER_TOPK: tl.constexpr, RENORMALIZE: tl.constexpr, RENORM_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, N_GROUP_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr,
    PRECISE_EXP: tl.constexpr, IEEE_DIV: tl.constexpr,
    NONE: tl.constexpr,  # a key below every value's, -inf's included: padding and experts taken
    STATS: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    compute_dtype = weights_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits

    # int64 before the stride multiply: T * stride can pass 2**31 at long sequences.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < E
    col_ok_2d = (rows >= 0)[:, None] & col_ok[None, :]

    # Rows past T load zeros, not -inf, so their (discarded) softmax stays finite.
    x = tl.load(
        logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(compute_dtype)
    x = tl.where(col_ok_2d, x, NEG_INF)

    if SOFTMAX_AFTER_TOPK:
        scores = x
    elif SCORING == 0:
        scores = _softmax_rows(x, PRECISE_EXP, IEEE_DIV)
    else:
        # torch's formula, 1 / (1 + exp(-x)), so that equal inputs give torch's exact scores.
        scores = _div(1.0, 1.0 + _exp(-x, PRECISE_EXP), IEEE_DIV)

    choice = scores
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_b, mask=col_ok, other=0.0).to(compute_dtype)
        choice = choice + bias[None, :]
    key = tl.where(col_ok_2d, _order_key(choice), NONE)

    if N_GROUP > 1:
        # Groups are contiguous runs of group_size experts; padding columns fall in no group
        # (their group index is >= N_GROUP), which works for any E, not just powers of two.
        col_group = cols // group_size
        groups = tl.arange(0, N_GROUP_PAD)
        group_key = tl.full((BLOCK_T, N_GROUP_PAD), NONE, key.dtype)
        col_group_key = tl.full((BLOCK_T, E_PAD), NONE, key.dtype)
        for g in range(N_GROUP):
            in_g = (col_group == g)[None, :] & col_ok_2d
            # The group's score is the sum of its top-2 choices (routing.GROUP_SCORE_TOP, taken one at a time
            # here; torch.topk(2): the two best keys, the lower index first among equal ones, so a repeated
            # best counts twice).
            _, is_first, v = _take_best(tl.where(in_g, key, NONE), cols, E_PAD, NONE)
            _, is_second, v = _take_best(v, cols, E_PAD, NONE)
            s = tl.sum(tl.where(is_first | is_second, choice, 0.0), axis=1)  # exact: the other terms are +0
            s_key = _order_key(s)
            group_key = tl.where(groups[None, :] == g, s_key[:, None], group_key)
            col_group_key = tl.where(in_g, s_key[:, None], col_group_key)
        # Rank of each column's group = groups that beat it (higher key, or equal key and lower
        # index); the TOPK_GROUP best groups have rank < TOPK_GROUP.
        rank = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
        for h in range(N_GROUP):
            k_h = tl.max(tl.where(groups[None, :] == h, group_key, NONE), axis=1)[:, None]
            beats = (k_h > col_group_key) | ((k_h == col_group_key) & (h < col_group[None, :]))
            rank += beats.to(tl.int32)
        # Masked to -inf as the model code masks them: still selectable, after every kept expert.
        key = tl.where(rank < TOPK_GROUP, key, _order_key(tl.full((BLOCK_T, E_PAD), NEG_INF, compute_dtype)))
        key = tl.where(col_ok_2d, key, NONE)

    # Top-K by repeated (highest key, lowest index holding it); taken experts drop to NONE.
    ks = tl.arange(0, K_PAD)
    sel_score = tl.zeros((BLOCK_T, K_PAD), dtype=compute_dtype)
    sel_id = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for j in range(K):
        best_at, is_best, key = _take_best(key, cols, E_PAD, NONE)
        # Exact gather: every other term of the sum is +0 (a NaN score is kept by the where).
        s = tl.sum(tl.where(is_best, scores, 0.0), axis=1)
        sel_score = tl.where(ks[None, :] == j, s[:, None], sel_score)
        sel_id = tl.where(ks[None, :] == j, best_at[:, None], sel_id)

    k_ok = ks[None, :] < K
    w = sel_score
    if SOFTMAX_AFTER_TOPK:
        w = tl.where(k_ok, w, NEG_INF)
        w = _exp(w - tl.max(w, axis=1)[:, None], PRECISE_EXP)
        w = _div(w, tl.sum(w, axis=1)[:, None], IEEE_DIV)
    w = tl.where(k_ok, w, 0.0)
    if RENORMALIZE:
        # The casts keep the scalars' precision out of the result: a compiled graph may pass them as fp64.
        denominator = (tl.sum(w, axis=1)[:, None] + renorm_eps).to(compute_dtype)
        if RENORM_MIN:  # torch.clamp(sum, min=renorm_min): a NaN sum stays NaN (NaN < x is false)
            denominator = tl.where(denominator < renorm_min, renorm_min, denominator).to(compute_dtype)
        w = _div(w, denominator, IEEE_DIV)
    w = (w * scale).to(compute_dtype)

    out_offs = rows[:, None] * K + ks[None, :]
    out_mask = row_ok[:, None] & k_ok
    tl.store(weights_ptr + out_offs, w, mask=out_mask)
    tl.store(ids_ptr + out_offs, sel_id, mask=out_mask)

    if STATS:
        # The experts taken are the columns left at NONE, a key no value maps to.
        taken = (key == NONE) & col_ok_2d & row_ok[:, None]
        probs = _softmax_rows(x, PRECISE_EXP, IEEE_DIV) if SOFTMAX_AFTER_TOPK or SCORING == 1 else scores
        partial_offs = tl.program_id(0).to(tl.int64) * E + cols
        tl.store(counts_partial_ptr + partial_offs, tl.sum(taken.to(tl.int32), axis=0), mask=col_ok)
        tl.store(prob_sum_partial_ptr + partial_offs, tl.sum(tl.where(row_ok[:, None], probs, 0.0), axis=0),
                 mask=col_ok)


def launch_route(
    launch, logits, bias, weights, ids, num_tokens, num_experts: int, logits_strides, bias_stride: int,
    k: int, scoring: str, softmax_after_topk: bool, renormalize: bool, renorm_eps: float, n_group: int,
    topk_group: int, routed_scaling_factor: float, precise: bool, fp32_weights: bool,
    cdiv=triton.cdiv, any_count: bool = False, renorm_min: float = 0.0, stats_partials=None,
) -> None:
    """The route kernel's launch, written once for the eager op (``launch`` calls the kernel; tensors)
    and the compiled graph (lowering/inductor/kernel_calls.py: ``launch`` adds the kernel to Inductor's graph; IR
    nodes, a symbolic token count with ``cdiv`` and ``any_count``). ``bias`` None: no correction bias.
    ``precise``: libdevice's exp and IEEE division (off only in the interpreter, which lacks libdevice).
    ``any_count``: tiles for any token count (a graph for every T, and batch-invariant mode: the tiles
    decide the order of the softmax's sum), those of a large T. ``stats_partials``: None, or the
    per-program (counts, prob_sums) tables (``route_triton`` allocates them) to write the statistics into."""
    e_pad = triton.next_power_of_2(num_experts)
    block_t, num_warps = route_tiles(num_tokens, num_experts, any_count)
    has_bias = bias is not None
    counts_partial, prob_sum_partial = stats_partials if stats_partials is not None else (ids, weights)
    launch(
        _route_kernel, (cdiv(num_tokens, block_t),), num_warps,
        logits, bias if has_bias else logits, weights, ids, counts_partial, prob_sum_partial,
        num_tokens, num_experts, num_experts // n_group, *logits_strides, bias_stride,
        float(renorm_eps), float(routed_scaling_factor), float(renorm_min),
        E_PAD=e_pad, K=k, K_PAD=triton.next_power_of_2(k), BLOCK_T=block_t,
        SCORING=0 if scoring == "softmax" else 1,
        SOFTMAX_AFTER_TOPK=bool(softmax_after_topk), RENORMALIZE=bool(renormalize),
        RENORM_MIN=renorm_min > 0, HAS_BIAS=has_bias,
        N_GROUP=n_group, N_GROUP_PAD=triton.next_power_of_2(n_group), TOPK_GROUP=topk_group,
        PRECISE_EXP=precise, IEEE_DIV=precise and fp32_weights,
        NONE=-(2**31 - 1) if fp32_weights else -(2**63 - 1),  # _order_key's int32 / int64 range
        STATS=stats_partials is not None,
    )


def route_tiles(num_tokens, num_experts: int, any_count: bool = False) -> tuple[int, int]:
    """(rows per program, warps) of launch_route's grid; ``any_count`` as there (a symbolic token count
    needs it)."""
    e_pad = triton.next_power_of_2(num_experts)
    rows = _MAX_BLOCK_T if any_count or config.batch_invariant else triton.next_power_of_2(num_tokens)
    block_t = max(1, min(_MAX_BLOCK_T, _TILE_ELEMENTS // e_pad, rows))
    return block_t, max(1, min(4, block_t * e_pad // _ELEMENTS_PER_WARP))


def route_triton(
    logits: torch.Tensor,
    k: int,
    scoring: str,
    softmax_after_topk: bool,
    renormalize: bool,
    renorm_eps: float,
    correction_bias: torch.Tensor | None,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renorm_min: float = 0.0,
    any_count: bool = False,
    with_stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the fused router kernel (arguments already checked by moe_ops.routing). ``any_count``: the
    tiles a compiled graph for every token count launches (tested against the same reference).
    ``with_stats``: also return (E,) slots per expert (fp32) and (E,) sums over the tokens of the
    softmax probabilities (the weights' dtype), as moe_ops.routing.route_stats_ref.

    Args:
        logits:          (T, E) float32/float16/bfloat16/float64, any strides
        k:               K
        scoring:         "softmax" | "sigmoid"
        softmax_after_topk, renormalize, renorm_eps, routed_scaling_factor, renorm_min: as in route()
        correction_bias: (E,) float or None
        n_group, topk_group: group-limited selection (n_group=1: none)

    Returns:
        (topk_weights (T, K) float32 [float64 for float64 logits], topk_ids (T, K) int32),
        contiguous.
    """
    num_tokens, num_experts = logits.shape
    weight_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    weights = torch.empty((num_tokens, k), dtype=weight_dtype, device=logits.device)
    ids = torch.empty((num_tokens, k), dtype=torch.int32, device=logits.device)
    partials = None
    if with_stats:
        num_programs = triton.cdiv(num_tokens, route_tiles(num_tokens, num_experts, any_count)[0])
        partials = (torch.zeros((num_programs, num_experts), dtype=torch.int32, device=logits.device),
                    torch.zeros((num_programs, num_experts), dtype=weight_dtype, device=logits.device))
    if num_tokens == 0:
        return (weights, ids) + (() if partials is None else (partials[0].sum(0).float(), partials[1].sum(0)))
    launch_route(
        launch_jit, logits, correction_bias, weights, ids, num_tokens, num_experts, logits.stride(),
        correction_bias.stride(0) if correction_bias is not None else 0, k, scoring, softmax_after_topk,
        renormalize, renorm_eps, n_group, topk_group, routed_scaling_factor,
        precise=logits.is_cuda, fp32_weights=weight_dtype == torch.float32, any_count=any_count,
        renorm_min=renorm_min, stats_partials=partials,
    )
    if partials is None:
        return weights, ids
    # The partial tables summed by torch, in one fixed order (deterministic, no atomics).
    return weights, ids, partials[0].sum(0).float(), partials[1].sum(0)
