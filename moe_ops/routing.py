"""Router: per-token expert selection (top-k) and routing weights for every common MoE family.

Shape legend: T tokens, E experts, K experts per token (top-k), G = E / n_group experts per group.

One op covers the routers of the model families in use:

=====================  ==========================================================================
Mixtral, Qwen2/3-MoE   scoring="softmax", renormalize=True (Qwen2-MoE/OLMoE: renormalize=False)
GPT-OSS                scoring="softmax", softmax_after_topk=True (softmax over the K chosen logits)
DeepSeek-V3            scoring="sigmoid", correction_bias, n_group=8, topk_group=4, renormalize=True,
                       renorm_eps=1e-20, routed_scaling_factor=2.5
=====================  ==========================================================================

Selection order: every top-k is ``torch.topk``'s on the logits' device, so a rewritten router picks
the experts the user's code picks, ties and NaNs included. Ties are common, not rare: bf16 logits cast
exactly to fp32 keep their ties (on random bf16 logits 6% of tokens tie at the K-th expert for E=128,
K=8). ``torch.topk`` ranks NaN above +inf; among equal values CUDA's keeps the lower index (and ranks
+0.0 above -0.0), while the CPU's order follows its partial sort and is matched only by calling it.
The CPU path calls ``torch.topk``; the CUDA kernel follows CUDA's rule (moe_ops.routing_triton).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from moe_ops._autograd import refuse_unsupported_ad
from moe_ops._checks import FLOAT_DTYPES, check_bool, check_choice, check_int, check_number, check_tensor
from moe_ops._compat.dispatch import autograd_inside_custom_op
from moe_ops._compat.tracing import register_for_export
from moe_ops._dispatch import direct_cuda_call_allowed
from moe_ops.routing_triton import route_triton

SCORINGS = ("softmax", "sigmoid")
# A group's score in group-limited routing (DeepSeek-V3): the sum of its best this-many choices. The route
# kernel takes them one at a time (routing_triton's two _take_best calls); the route rewrite matches this k.
GROUP_SCORE_TOP = 2


def _check_route_args(
    logits, k, scoring, softmax_after_topk, correction_bias, n_group, topk_group
) -> None:
    # Messages name route()'s arguments (router_logits, top_k), which the op's logits and k are.
    check_tensor("router_logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    num_experts = logits.shape[1]
    if not (1 <= k <= num_experts):
        raise ValueError(f"top_k: expected 1 <= top_k <= E={num_experts}, got {k}")
    check_choice("scoring", scoring, SCORINGS)
    if softmax_after_topk and scoring != "softmax":
        raise ValueError(
            f"softmax_after_topk: only valid with scoring='softmax', got scoring={scoring!r}"
        )
    if correction_bias is not None:
        check_tensor(
            "correction_bias", correction_bias, shape=(num_experts,), dtypes=FLOAT_DTYPES,
            device=logits.device,
        )
    if n_group < 1:
        raise ValueError(f"n_group: expected a positive int, got {n_group}")
    if not (1 <= topk_group <= n_group):
        raise ValueError(f"topk_group: expected 1 <= topk_group <= n_group={n_group}, got {topk_group}")
    if n_group > 1:
        # The group score is the sum of each group's best GROUP_SCORE_TOP experts, so a group needs as many.
        if num_experts % n_group != 0 or num_experts // n_group < GROUP_SCORE_TOP:
            raise ValueError(
                f"n_group: expected a divisor of E={num_experts} with E/n_group >= {GROUP_SCORE_TOP}, got {n_group}"
            )
        kept = topk_group * (num_experts // n_group)
        if k > kept:
            raise ValueError(
                f"top_k: expected top_k <= topk_group * E / n_group = {kept} (experts in the kept groups), got {k}"
            )


def _weight_dtype(logits: torch.Tensor) -> torch.dtype:
    # float64 logits keep float64 so that gradcheck can run through the op.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def route_ref(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    softmax_after_topk: bool = False,
    renormalize: bool = False,
    renorm_eps: float = 0.0,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    renorm_min: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch definition of the router (the semantics every kernel is tested against).

    Differentiable w.r.t. ``router_logits`` through the weights; the selection itself is piecewise
    constant and carries no gradient.
    """
    _check_route_args(router_logits, top_k, scoring, softmax_after_topk, correction_bias, n_group, topk_group)
    num_tokens, num_experts = router_logits.shape
    x_TE = router_logits.to(_weight_dtype(router_logits))

    if softmax_after_topk:
        scores_TE = x_TE  # selection on the raw logits; the softmax comes after the top-k
    elif scoring == "softmax":
        scores_TE = torch.softmax(x_TE, dim=-1)
    else:
        scores_TE = torch.sigmoid(x_TE)

    choice_TE = scores_TE.detach()
    if correction_bias is not None:
        # The bias steers the selection only (DeepSeek-V3 load balancing); weights stay unbiased.
        choice_TE = choice_TE + correction_bias.to(choice_TE.dtype)

    # Each selection is torch.topk itself, as the model code writes it: its order among equal values
    # (and NaN) is device-specific and matched only by calling it.
    if n_group > 1:
        group_size = num_experts // n_group
        choice_TNG = choice_TE.reshape(num_tokens, n_group, group_size)
        group_score_TN = torch.topk(choice_TNG, GROUP_SCORE_TOP, dim=-1).values.sum(dim=-1)
        kept_groups_TN = torch.topk(group_score_TN, topk_group, dim=-1).indices
        keep_TN = torch.zeros_like(group_score_TN, dtype=torch.bool).scatter_(1, kept_groups_TN, True)
        keep_TE = keep_TN.repeat_interleave(group_size, dim=1)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))

    ids_TK = torch.topk(choice_TE, top_k, dim=-1).indices
    weights_TK = route_weights_ref(
        router_logits, ids_TK, scoring, softmax_after_topk, renormalize, renorm_eps, routed_scaling_factor, renorm_min
    )
    return weights_TK, ids_TK.to(torch.int32)


def route_weights_ref(
    logits: torch.Tensor,
    ids_TK: torch.Tensor,
    scoring: str,
    softmax_after_topk: bool,
    renormalize: bool,
    renorm_eps: float,
    routed_scaling_factor: float,
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """The routing weights of the chosen ``ids_TK`` (T, K): route's weights once the selection is made.

    route's backward differentiates this at the ids its forward returned, never re-selecting: the
    order among tied ids is unspecified, so a second top-k could pair a weight's gradient with
    another expert.
    """
    x_TE = logits.to(_weight_dtype(logits))
    ids_TK = ids_TK.long()
    if softmax_after_topk:
        return _renormalized(torch.softmax(x_TE.gather(1, ids_TK), dim=-1), renormalize, renorm_eps,
                             routed_scaling_factor, renorm_min)
    scores_TE = torch.softmax(x_TE, dim=-1) if scoring == "softmax" else torch.sigmoid(x_TE)
    return _renormalized(scores_TE.gather(1, ids_TK), renormalize, renorm_eps, routed_scaling_factor, renorm_min)


def _renormalized(weights_TK, renormalize, renorm_eps, routed_scaling_factor, renorm_min):
    if renormalize:
        denominator_T1 = weights_TK.sum(dim=-1, keepdim=True) + renorm_eps
        if renorm_min > 0:  # ERNIE-4.5: w / clamp(sum, min=moe_norm_min); clamp keeps a NaN sum NaN
            denominator_T1 = torch.clamp(denominator_T1, min=renorm_min)
        weights_TK = weights_TK / denominator_T1
    return weights_TK * routed_scaling_factor


@torch.library.custom_op("moe_ops::route", mutates_args=())
def _route_op(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    return route_ref(
        logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group,
        topk_group, routed_scaling_factor, renorm_min,
    )


@_route_op.register_kernel("cuda")
def _route_cuda(logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group,
                topk_group, routed_scaling_factor, renorm_min=0.0):
    _check_route_args(logits, k, scoring, softmax_after_topk, correction_bias, n_group, topk_group)
    return route_triton(
        logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group,
        topk_group, routed_scaling_factor, renorm_min,
    )


@_route_op.register_fake
def _(logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group,
      topk_group, routed_scaling_factor, renorm_min=0.0):
    _check_route_args(logits, k, scoring, softmax_after_topk, correction_bias, n_group, topk_group)
    num_tokens = logits.shape[0]
    return (
        logits.new_empty((num_tokens, k), dtype=_weight_dtype(logits)),
        logits.new_empty((num_tokens, k), dtype=torch.int32),
    )


@torch.library.custom_op("moe_ops::route_backward", mutates_args=())
def _route_backward_op(
    logits: torch.Tensor,
    ids: torch.Tensor,
    grad_weights: torch.Tensor,
    scoring: str,
    softmax_after_topk: bool,
    renormalize: bool,
    renorm_eps: float,
    routed_scaling_factor: float,
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """Gradient of route's weights w.r.t. the logits, at the ids route's forward chose."""
    with autograd_inside_custom_op():
        leaf = logits.detach().requires_grad_(True)
        weights_TK = route_weights_ref(
            leaf, ids, scoring, softmax_after_topk, renormalize, renorm_eps, routed_scaling_factor, renorm_min
        )
        (grad_logits,) = torch.autograd.grad(weights_TK, leaf, grad_weights)
    return grad_logits


@_route_backward_op.register_fake
def _(logits, ids, grad_weights, scoring, softmax_after_topk, renormalize, renorm_eps,
      routed_scaling_factor, renorm_min=0.0):
    return torch.empty_like(logits)


def _route_setup_context(ctx, inputs, output):
    logits, _, scoring, softmax_after_topk, renormalize, renorm_eps = inputs[:6]
    routed_scaling_factor, renorm_min = inputs[9], (inputs[10] if len(inputs) > 10 else 0.0)
    ctx.save_for_backward(logits, output[1])
    # renorm_min passed only where set, so graphs of routers without it read as before.
    ctx.weight_args = (scoring, softmax_after_topk, renormalize, renorm_eps, routed_scaling_factor) + (
        (renorm_min,) if renorm_min else ())
    ctx.num_inputs = len(inputs)


def _route_backward(ctx, grad_weights, _grad_ids):
    logits, ids = ctx.saved_tensors
    if grad_weights is None:
        return (None,) * ctx.num_inputs
    grad_logits = torch.ops.moe_ops.route_backward(logits, ids, grad_weights, *ctx.weight_args)
    return (grad_logits,) + (None,) * (ctx.num_inputs - 1)


torch.library.register_autograd(_route_op, _route_backward, setup_context=_route_setup_context)


@functools.partial(register_for_export, name="moe_ops.RouterStats")
class RouterStats(NamedTuple):
    """One routing call's statistics for the load-balancing loss and for logging (``route(...,
    return_stats=True)``), on the logits' device. Sums, not means, so that micro-batches and layers add."""

    tokens_per_expert: torch.Tensor  # (E,) fp32: slots routed to each expert (whole numbers); no gradient
    router_prob_sum: torch.Tensor  # (E,) fp32 (fp64 logits: fp64): sum over tokens of softmax(logits);
    #                                differentiable w.r.t. the logits
    num_tokens: int  # T


def route_stats_ref(logits: torch.Tensor, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_per_expert, router_prob_sum) of RouterStats, in plain PyTorch: the softmax over all E
    experts whatever the router's scoring (the P of the Switch/GShard loss, as transformers'
    ``load_balancing_loss_func`` takes it)."""
    num_experts = logits.shape[1]
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    ones_S = torch.ones(ids_TK.numel(), dtype=torch.float32, device=logits.device)  # whatever the default dtype
    counts_E = counts_E.index_add(0, ids_TK.reshape(-1).long(), ones_S)
    prob_sum_E = torch.softmax(logits.to(_weight_dtype(logits)), dim=-1).sum(dim=0)
    return counts_E, prob_sum_E


@torch.library.custom_op("moe_ops::route_with_stats", mutates_args=())
def _route_with_stats_op(
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
    renorm_min: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_ops::route, plus the two (E,) statistics of RouterStats."""
    weights_TK, ids_TK = route_ref(
        logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group,
        topk_group, routed_scaling_factor, renorm_min,
    )
    return (weights_TK, ids_TK, *route_stats_ref(logits, ids_TK))


@_route_with_stats_op.register_kernel("cuda")
def _(logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group, topk_group,
      routed_scaling_factor, renorm_min):
    _check_route_args(logits, k, scoring, softmax_after_topk, correction_bias, n_group, topk_group)
    return route_triton(
        logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group,
        topk_group, routed_scaling_factor, renorm_min, with_stats=True,
    )


@_route_with_stats_op.register_fake
def _(logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group, topk_group,
      routed_scaling_factor, renorm_min):
    _check_route_args(logits, k, scoring, softmax_after_topk, correction_bias, n_group, topk_group)
    num_tokens, num_experts = logits.shape
    weight_dtype = _weight_dtype(logits)
    return (
        logits.new_empty((num_tokens, k), dtype=weight_dtype),
        logits.new_empty((num_tokens, k), dtype=torch.int32),
        logits.new_empty((num_experts,), dtype=torch.float32),
        logits.new_empty((num_experts,), dtype=weight_dtype),
    )


def _route_with_stats_backward(ctx, grad_weights, _grad_ids, _grad_counts, grad_prob_sum):
    logits, ids = ctx.saved_tensors
    grad_logits = None
    if grad_weights is not None:
        grad_logits = torch.ops.moe_ops.route_backward(logits, ids, grad_weights, *ctx.weight_args)
    if grad_prob_sum is not None:
        # d/dlogits of sum_t softmax(logits_t) . g: p * (g - <p, g>) per token.
        probs_TE = torch.softmax(logits.to(_weight_dtype(logits)), dim=-1)
        grad_E = grad_prob_sum.to(probs_TE.dtype)
        term = (probs_TE * (grad_E - (probs_TE * grad_E).sum(dim=-1, keepdim=True))).to(logits.dtype)
        grad_logits = term if grad_logits is None else grad_logits + term
    return (grad_logits,) + (None,) * (ctx.num_inputs - 1)


def _route_with_stats_setup_context(ctx, inputs, output):
    _route_setup_context(ctx, inputs, output)
    ctx.mark_non_differentiable(output[2])  # the slot counts, piecewise constant


torch.library.register_autograd(
    _route_with_stats_op, _route_with_stats_backward, setup_context=_route_with_stats_setup_context
)


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    softmax_after_topk: bool = False,
    renormalize: bool = False,
    renorm_eps: float = 0.0,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    renorm_min: float = 0.0,
    return_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, RouterStats]:
    """Choose ``top_k`` experts per token and their routing weights.

    Args:
        router_logits:         (T, E) float32/float16/bfloat16/float64  gate output; any strides
        top_k:                 K, 1 <= K <= E
        scoring:               "softmax" | "sigmoid"  scores = softmax/sigmoid(logits), in fp32
        softmax_after_topk:    select on the raw logits, weights = softmax over the K selected
                               logits (Mixtral original, GPT-OSS); scoring="softmax" only
        renormalize:           weights / max(weights.sum(-1) + renorm_eps, renorm_min)
        renorm_eps:            added to the denominator of the renormalisation (DeepSeek-V3: 1e-20)
        correction_bias:       (E,) float, on the logits' device, or None  added to the scores for
                               the selection only (DeepSeek-V3 e_score_correction_bias); no gradient
        n_group:               expert groups; > 1 enables group-limited selection (E % n_group == 0,
                               E / n_group >= 2): a group scores the sum of its top-2 choices
        topk_group:            groups kept per token (1 <= topk_group <= n_group); experts of the
                               other groups are never chosen, so K <= topk_group * E / n_group
        routed_scaling_factor: final multiplier of the weights (DeepSeek-V3: 2.5)
        renorm_min:            lower bound of the renormalisation's denominator, 0 = none (ERNIE-4.5:
                               moe_norm_min, its ``w / clamp(w.sum(-1), min=...)``); a NaN sum stays NaN
        return_stats:          also return the call's RouterStats (slots per expert, sums of the
                               softmax probabilities), computed by the same kernel pass on CUDA, for
                               :func:`moe_ops.load_balancing_loss_from_stats` and load logging

    Returns:
        (topk_weights, topk_ids[, stats]):
        topk_weights: (T, K) float32 (float64 for float64 logits), in descending choice order;
                      differentiable w.r.t. router_logits
        topk_ids:     (T, K) int32 expert ids, descending by choice (scores + bias); the experts
                      torch.topk picks on the logits' device, ties and NaN included (NaN ranks
                      highest); the order among tied ids is unspecified, as torch.topk's
    """
    check_int("top_k", top_k, minimum=1)
    check_number("renorm_eps", renorm_eps, minimum=0.0)
    check_int("n_group", n_group, minimum=1)
    check_int("topk_group", topk_group, minimum=1)
    check_number("routed_scaling_factor", routed_scaling_factor)
    check_number("renorm_min", renorm_min, minimum=0.0)
    for name, flag in (("softmax_after_topk", softmax_after_topk), ("renormalize", renormalize),
                       ("return_stats", return_stats)):
        check_bool(name, flag)
    if not renormalize and (renorm_eps or renorm_min):
        name, value = ("renorm_eps", renorm_eps) if renorm_eps else ("renorm_min", renorm_min)
        raise ValueError(f"{name}: shapes the renormalisation, which renormalize=False skips; got {name}={value}")
    refuse_unsupported_ad("route", router_logits, correction_bias)
    args = (
        router_logits, top_k, scoring, softmax_after_topk, renormalize,
        float(renorm_eps), correction_bias, n_group, topk_group, float(routed_scaling_factor),
    ) + ((float(renorm_min),) if renorm_min else ())
    if return_stats:
        weights_TK, ids_TK, counts_E, prob_sum_E = torch.ops.moe_ops.route_with_stats(
            *args[:10], float(renorm_min)
        )
        return weights_TK, ids_TK, RouterStats(counts_E, prob_sum_E, router_logits.shape[0])
    if direct_cuda_call_allowed(router_logits, correction_bias):
        return _route_cuda(*args)
    return torch.ops.moe_ops.route(*args)


def router_jitter(router_input: torch.Tensor, eps: float) -> torch.Tensor:
    """Multiplicative jitter of the router's input for training (Megablocks' ``moe_jitter_eps``,
    Switch Transformers): ``router_input * u`` with u ~ U[1 - eps, 1 + eps) drawn per element in fp32 (fp64 for
    fp64 inputs), the product rounded once to the input's dtype, from torch's generator (so
    ``torch.manual_seed`` repeats it; under torch.compile, Inductor's RNG). An eps below the dtype's resolution
    (fp16 and eps = 1e-4, say) mostly rounds back to the input.

    It applies to what the gate's linear layer reads, not to the logits :func:`route` takes, so it is a
    function of its own: ``logits = gate(moe_ops.router_jitter(x, 0.01) if self.training else x)``.
    The experts still read the un-jittered ``x``. ``eps = 0`` returns ``router_input`` itself.

    Args:
        router_input: floating tensor of any shape
        eps:          0 <= eps < 1
    """
    check_tensor("router_input", router_input, dtypes=FLOAT_DTYPES)
    check_number("eps", eps, minimum=0.0)
    if eps >= 1:
        raise ValueError(f"eps: expected 0 <= eps < 1 (a factor in [1 - eps, 1 + eps)), got {eps}")
    if eps == 0:
        return router_input
    # u drawn and the product taken in fp32 (at least), then rounded once: u drawn in bf16 has only the
    # levels bf16 holds near 1 (0.988, 0.992, 0.996, 1 for eps = 0.01), none above 1 (biased low).
    compute_dtype = torch.promote_types(router_input.dtype, torch.float32)
    u = torch.empty_like(router_input, dtype=compute_dtype).uniform_(1.0 - eps, 1.0 + eps)
    return (router_input.to(compute_dtype) * u).to(router_input.dtype)
