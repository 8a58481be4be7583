"""The whole routed-expert MLP of a MoE layer as one op: the target of the graph passes.

Shape legend: T tokens, H hidden, F expert intermediate size, E experts, K top-k, S = T*K slots.

    out[t] = sum_j  w[t, j] * down_e( act(gate_e(x[t]), up_e(x[t])) ),  e = ids[t, j] < E

On CUDA: [capacity] -> block schedule -> gate_up GEMM with the activation fused (rows gathered
from x, no permuted copy) -> down GEMM with the routing weight fused, scattered to (T, K, H) ->
sum over K in a fixed order (deterministic, fp32 accumulation).
"""

from __future__ import annotations

import functools

import torch

from moe_ops._autograd import register_reference_autograd
from moe_ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_ids_in_range, check_tensor
from moe_ops._dispatch import direct_cuda_call_allowed
from moe_ops.capacity import apply_capacity_ref, capacity_from_factor
from moe_ops.expert_gemm import ACTIVATIONS, activate_ref

LAYOUTS = ("EFH", "EHF")
DROP_POLICIES = ("position", "score")


class ExpertWeights:
    """The expert tensors as (E, N, K) views (N output features, K reduction), never copies."""

    def __init__(self, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down, layout, interleaved, gated):
        if layout == "EHF":
            w_gate_up = w_gate_up.transpose(1, 2)
            w_up = None if w_up is None else w_up.transpose(1, 2)
            w_down = w_down.transpose(1, 2)
        self.gate, self.up, self.b_gate, self.b_up = w_gate_up, w_up, b_gate_up, b_up
        if gated and w_up is None:
            self.gate, self.up = split_gate_up(w_gate_up, interleaved)
            if b_gate_up is not None:
                self.b_gate, self.b_up = split_gate_up(b_gate_up, interleaved)
        self.down, self.b_down = w_down, b_down


def split_gate_up(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up parts of a shared 2F axis (dim 1) as views: HF concatenates the two halves,
    GPT-OSS interleaves them."""
    if interleaved:
        return t[:, 0::2], t[:, 1::2]
    half = t.shape[1] // 2
    return t[:, :half], t[:, half:]


def _check_fused_args(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, capacity_factor, drop_policy,
) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    T, H = x.shape
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: expected shape ({T}, K) like x's {T} tokens, got {tuple(topk_ids.shape)}")
    check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtypes=FLOAT_DTYPES, device=x.device)
    check_choice("layout", layout, LAYOUTS)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("drop_policy", drop_policy, DROP_POLICIES)
    if activation == "clamped_swiglu" and not gated:
        raise ValueError("activation: 'clamped_swiglu' needs gated=True")
    if interleaved and (w_up is not None or not gated):
        raise ValueError("interleaved: only for a gated w_gate_up holding both gate and up (w_up=None)")
    check_tensor("w_gate_up", w_gate_up, ndim=3, dtypes=(x.dtype,), device=x.device)
    E = w_gate_up.shape[0]
    fused_gate_up = gated and w_up is None
    f_axis = 1 if layout == "EFH" else 2
    F2 = w_gate_up.shape[f_axis]
    F = F2 // 2 if fused_gate_up else F2
    want = (E, F2, H) if layout == "EFH" else (E, H, F2)
    if w_gate_up.shape != want or (fused_gate_up and F2 % 2):
        f_name = "2F" if fused_gate_up else "F"
        dims = ("E", f_name, f"H={H}") if layout == "EFH" else ("E", f"H={H}", f_name)
        raise ValueError(
            f"w_gate_up: expected shape ({', '.join(dims)}) for layout={layout!r}"
            + (" with an even 2F" if fused_gate_up else "")
            + f" (H is x's hidden size), got {tuple(w_gate_up.shape)}"
        )
    if w_up is not None:
        if not gated:
            raise ValueError("w_up: given with gated=False")
        check_tensor("w_up", w_up, shape=tuple(w_gate_up.shape), dtypes=(x.dtype,), device=x.device)
    want_down = (E, H, F) if layout == "EFH" else (E, F, H)
    check_tensor("w_down", w_down, shape=want_down, dtypes=(x.dtype,), device=x.device)
    if b_gate_up is not None:
        check_tensor("b_gate_up", b_gate_up, shape=(E, F2), dtypes=FLOAT_DTYPES, device=x.device)
    if b_up is not None:
        if w_up is None:
            raise ValueError("b_up: given without w_up (a fused w_gate_up takes its bias in b_gate_up)")
        check_tensor("b_up", b_up, shape=(E, F), dtypes=FLOAT_DTYPES, device=x.device)
    if b_down is not None:
        check_tensor("b_down", b_down, shape=(E, H), dtypes=FLOAT_DTYPES, device=x.device)
    K = topk_ids.shape[1]
    if not 1 <= K <= E:
        raise ValueError(f"topk_ids: expected 1 <= K <= E={E} choices per token, got K={K}")
    if capacity_factor < 0:
        raise ValueError(f"capacity_factor: expected >= 0 (0 = dropless), got {capacity_factor}")


def fused_experts_ref(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up=None, b_gate_up=None, b_up=None, b_down=None,
    layout="EFH", interleaved=False, activation="silu", gated=True, alpha=1.702, limit=7.0,
    capacity_factor=0.0, drop_policy="position", return_num_dropped=False,
):
    """Plain-PyTorch definition of :func:`fused_experts` (same arguments): a loop over experts,
    rounding where the kernels round (the intermediate activation and each slot's output are
    stored in x's dtype)."""
    _check_fused_args(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, capacity_factor, drop_policy,
    )
    T, K = topk_ids.shape
    w = ExpertWeights(w_gate_up, w_down, w_up, b_gate_up, b_up, b_down, layout, interleaved, gated)
    E = w_gate_up.shape[0]
    check_ids_in_range("topk_ids", topk_ids, E, allow_sentinels=True)
    ids = topk_ids
    num_dropped = torch.zeros((), dtype=torch.int32, device=x.device)
    capacity = capacity_from_factor(capacity_factor, T, K, E)
    if capacity >= 0:
        ids, num_dropped = apply_capacity_ref(topk_ids, topk_weights, E, capacity, drop_policy)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    out_TH = torch.zeros(T, x.shape[1], dtype=acc_dtype, device=x.device)
    for e in range(E):
        token, choice = torch.nonzero(ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        x_e = x[token].to(acc_dtype)
        gate = x_e @ w.gate[e].to(acc_dtype).T
        if w.b_gate is not None:
            gate = gate + w.b_gate[e].to(acc_dtype)
        up = None
        if w.up is not None:
            up = x_e @ w.up[e].to(acc_dtype).T
            if w.b_up is not None:
                up = up + w.b_up[e].to(acc_dtype)
        h = activate_ref(gate, up, activation, alpha, limit).to(x.dtype).to(acc_dtype)
        y = h @ w.down[e].to(acc_dtype).T
        if w.b_down is not None:
            y = y + w.b_down[e].to(acc_dtype)
        y = (y * topk_weights[token, choice].to(acc_dtype)[:, None]).to(x.dtype)
        out_TH = out_TH.index_add(0, token, y.to(acc_dtype))
    out_TH = out_TH.to(x.dtype)
    return (out_TH, num_dropped) if return_num_dropped else out_TH


@torch.library.custom_op("moe_ops::fused_experts", mutates_args=())
def _fused_experts_op(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    layout: str,
    interleaved: bool,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
    capacity_factor: float,
    drop_policy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_experts_ref(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
        return_num_dropped=True,
    )


def choose_block_m(num_slots: int, num_experts: int) -> int:
    """Rows per GEMM block from the expected rows per expert: small blocks waste little padding at
    decode; a block that holds an expert's whole share reads its weights once; large blocks reuse
    each weight tile across more rows at prefill."""
    rows_per_expert = num_slots / num_experts
    for block_m, up_to in ((16, 8), (32, 32), (64, 48)):
        if rows_per_expert <= up_to:
            return block_m
    return 128


def fused_experts_triton(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
):
    """The Triton path (the op's CUDA kernel; tests also run it on CPU under the interpreter)."""
    from moe_ops.capacity_triton import apply_capacity_triton
    from moe_ops.expert_gemm_triton import expert_gemm_triton
    from moe_ops.schedule_triton import block_schedule_triton

    _check_fused_args(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, capacity_factor, drop_policy,
    )
    T, K = topk_ids.shape
    E = w_gate_up.shape[0]
    num_dropped = torch.zeros((), dtype=torch.int32, device=x.device)
    if T == 0:
        return x.new_empty((0, x.shape[1])), num_dropped
    w = ExpertWeights(w_gate_up, w_down, w_up, b_gate_up, b_up, b_down, layout, interleaved, gated)
    ids = topk_ids
    capacity = capacity_from_factor(capacity_factor, T, K, E)
    if capacity >= 0:
        ids, num_dropped = apply_capacity_triton(topk_ids, topk_weights, E, capacity, drop_policy)
    num_slots = T * K
    block_m = choose_block_m(num_slots, E)
    schedule = block_schedule_triton(ids, E, block_m)
    h = expert_gemm_triton(
        x, w.gate, w.up, w.b_gate, w.b_up, None, *schedule[:3],
        num_slots, block_m, K, False, activation, alpha, limit,
    )
    slot_weights = topk_weights.reshape(-1)
    y_SH = expert_gemm_triton(
        h, w.down, None, w.b_down, None, slot_weights, *schedule[:3],
        num_slots, block_m, 0, True, "none", alpha, limit,
    )
    # torch's sum accumulates half-precision inputs in fp32 and sums K in a fixed order.
    return y_SH.view(T, K, -1).sum(1), num_dropped


_fused_experts_op.register_kernel("cuda")(fused_experts_triton)


@_fused_experts_op.register_fake
def _(x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
      layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy):
    _check_fused_args(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, capacity_factor, drop_policy,
    )
    return x.new_empty(x.shape), x.new_empty((), dtype=torch.int32)


_fused_experts_backward_op = register_reference_autograd(
    _fused_experts_op,
    functools.partial(fused_experts_ref, return_num_dropped=True),
    differentiable=("x", "topk_weights", "w_gate_up", "w_down", "w_up", "b_gate_up", "b_up", "b_down"),
)


@_fused_experts_backward_op.register_kernel("cuda")
def fused_experts_backward_triton(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy, grads,
):
    """The backward of ``fused_experts`` on the GPU (tests also run it on CPU under the interpreter):
    what differentiating ``fused_experts_ref`` gives, without its loop over experts or host syncs.

    With g the output gradient, t(s) a slot's token, w_s its routing weight and h_s = act(x W_gu^T):
    y_s = w_s (h_s W_d^T + b_d), so dh_s = w_s g_t W_d, d w_s = h_s . (g_t W_d) + g_t . b_d,
    dW_d = sum_s (w_s g_t)^T h_s, and the pre-activation gradient gives dx and dW_gu. Four GEMMs over
    the block schedule (the pre-activations recomputed in fp32, g_t W_d, dx) and two weight-gradient
    kernels; g is read gathered and scaled inside the kernels, never materialised per slot.
    Gradients pass the forward's roundings unchanged, as in the reference. Returns the gradients of
    x, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down (an empty tensor for an absent
    argument), each laid out like its argument (``empty_like``), as the backward op's fake kernel says."""
    from moe_ops._compat import autograd_inside_custom_op
    from moe_ops.capacity_triton import apply_capacity_triton
    from moe_ops.expert_gemm_triton import expert_gemm_triton
    from moe_ops.expert_weight_grad_triton import expert_weight_grad_triton
    from moe_ops.schedule_triton import block_schedule_triton

    _check_fused_args(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, capacity_factor, drop_policy,
    )
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
    padded_offsets = torch.nn.functional.pad(((counts_E + block_m - 1) // block_m * block_m).cumsum(0), (1, 0))
    padded_offsets = padded_offsets.to(torch.int32)
    slot_weights = topk_weights.reshape(-1)

    def gemm(a, weight, bias=None, gather_top_k=0, scatter=False):
        return expert_gemm_triton(
            a, weight, None, bias, None, None, sorted_slots, block_expert, num_padded,
            S, block_m, gather_top_k, scatter, "none", alpha, limit, out_dtype=torch.float32,
        )

    def weight_grad(g, a, out_ENK, **options):
        expert_weight_grad_triton(g, a, out_ENK, sorted_slots, padded_offsets, S, K, **options)

    slot_P = sorted_slots.long()
    valid_P = slot_P < S
    expert_P = torch.where(valid_P, block_expert.long().repeat_interleave(block_m), E)

    def bias_grad(rows_PN, out_EN):
        # Per-expert sums of the schedule rows; padding rows (all zero) go to a discarded row E.
        sums = torch.zeros(E + 1, rows_PN.shape[1], dtype=torch.float32, device=x.device)
        out_EN.copy_(sums.index_add_(0, expert_P, rows_PN)[:E])

    # Pre-activations (fp32), and the activation as the forward rounds it.
    pre = [gemm(x, w_gu, b_gate_up, gather_top_k=K)]
    if w_u is not None:
        pre.append(gemm(x, w_u, b_up, gather_top_k=K))
    with autograd_inside_custom_op():
        for leaf in pre:
            leaf.requires_grad_()
        if len(pre) == 2:
            gate, up = pre
        else:
            gate, up = split_gate_up(pre[0], interleaved) if gated else (pre[0], None)
        h_PF = activate_ref(gate, up, activation, alpha, limit)
    h_lp = h_PF.detach().to(x.dtype)

    g_wd_PF = gemm(grad_TH, w_d.transpose(1, 2), gather_top_k=K)  # g_t W_d: (P, F)
    token_P = torch.where(valid_P, slot_P // K, 0)
    d_weight_P = (h_lp.float() * g_wd_PF).sum(1)
    if b_down is not None:
        g_PH = grad_TH[token_P].float() * valid_P[:, None]
        d_weight_P += (g_PH * b_down.float()[expert_P.clamp(max=E - 1)]).sum(1)
    d_topk_weights.view(-1).copy_(
        torch.zeros(S + 1, dtype=torch.float32, device=x.device)
        .scatter_(0, torch.where(valid_P, slot_P, S), d_weight_P)[:S]
    )
    weight_P = torch.where(valid_P, slot_weights[slot_P.clamp(max=S - 1)].float(), 0.0)
    with autograd_inside_custom_op():
        d_pre = torch.autograd.grad(h_PF, pre, g_wd_PF * weight_P[:, None])

    weight_grad(grad_TH, h_lp, dw_d, gather_g=True, slot_scale=slot_weights)
    if b_down is not None:
        bias_grad(g_PH * weight_P[:, None], db_down)
    dx_SH = None
    for d_pre_PN, weight, d_weight, d_bias in zip(d_pre, (w_gu, w_u), (dw_gu, dw_u), (db_gate_up, db_up),
                                                  strict=False):
        d_pre_lp = d_pre_PN.to(x.dtype)
        weight_grad(d_pre_lp, x, d_weight, gather_a=True)
        if d_bias.numel():
            bias_grad(d_pre_PN, d_bias)
        part = gemm(d_pre_lp, weight.transpose(1, 2), scatter=True)
        dx_SH = part if dx_SH is None else dx_SH + part
    dx.copy_(dx_SH.view(T, K, -1).sum(1))
    return [dx, d_topk_weights, dw_gate_up, dw_down, dw_up, db_gate_up, db_up, db_down]


def fused_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    w_up: torch.Tensor | None = None,
    b_gate_up: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    layout: str = "EFH",
    interleaved: bool = False,
    activation: str = "silu",
    gated: bool = True,
    alpha: float = 1.702,
    limit: float = 7.0,
    capacity_factor: float = 0.0,
    drop_policy: str = "position",
    return_num_dropped: bool = False,
):
    """The routed experts of a MoE layer: sum_j w[t, j] * MLP_{ids[t, j]}(x[t]).

    Args:
        x:            (T, H) fp32/fp16/bf16
        topk_weights: (T, K) float routing weights (from :func:`moe_ops.route`)
        topk_ids:     (T, K) int32/int64 expert ids; ids >= E are skipped (expert-parallel sentinels)
        w_gate_up:    layout "EFH": (E, 2F, H) gate and up stacked (HF), or w1 (E, F, H) with w_up;
                      layout "EHF": (E, H, 2F) (torchtitan, GPT-OSS), or w1 (E, H, F) with w_up
        w_down:       "EFH": (E, H, F); "EHF": (E, F, H)
        w_up:         optional separate up projection (w3), same shape as w1
        b_gate_up:    optional (E, 2F) bias of w_gate_up ((E, F) with w_up or gated=False)
        b_up:         optional (E, F) bias of w_up
        b_down:       optional (E, H) bias of w_down (scaled by the routing weight, as GPT-OSS does)
        interleaved:  gate and up alternate along the 2F axis (GPT-OSS) instead of two halves
        activation:   "silu" (SwiGLU) | "gelu" | "gelu_tanh" | "relu" | "clamped_swiglu" (GPT-OSS:
                      alpha, limit) | "none"
        gated:        act(gate) * up; False for a plain act(x W1) W2 MLP (w_gate_up is then W1)
        capacity_factor: 0 = dropless; else each expert takes at most ceil(cf * T * K / E) slots and
                      the rest contribute zero, chosen by drop_policy "position" (token order) or
                      "score" (highest routing weight kept)
        return_num_dropped: also return the number of dropped slots (0-dim int32 tensor)

    Returns:
        (T, H) in x's dtype [, num_dropped]
    """
    args = (
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
    )
    if direct_cuda_call_allowed(x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down):
        out, num_dropped = fused_experts_triton(*args)
    else:
        out, num_dropped = torch.ops.moe_ops.fused_experts(*args)
    return (out, num_dropped) if return_num_dropped else out
