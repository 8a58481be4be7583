"""Router losses for training: the Switch/GShard load-balancing loss and the router z-loss.

Shape legend: T tokens, E experts, K experts per token. Both take one layer's router logits (T, E) or a
sequence of them, one per layer, as transformers' ``output_router_logits`` returns them.

Both are plain, device-side torch (no host synchronisation, no graph break under torch.compile) and
differentiable with respect to the logits. Their values are those of the conventions users know:

- ``load_balancing_loss`` is transformers' ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE; scaled
  by ``router_aux_loss_coef`` there, Megatron's ``moe_aux_loss_coeff``):
  ``E * sum_e f_e * P_e`` with ``f_e`` the slots routed to expert e per token (top-k aware: the K
  choices of a token all count, so perfectly balanced routing gives K) and ``P_e`` the mean softmax
  probability of expert e. Over several layers, slot counts and probabilities are summed over the layers
  before normalising, as transformers does. ``f`` carries no gradient; ``P`` does.
- ``load_balancing_loss_from_stats`` is the same loss from the statistics ``route(...,
  return_stats=True)`` returns (on CUDA the routing kernel computes them in its pass over the logits,
  so the loss reads no (T, E) tensor again); no token mask.
- ``router_z_loss`` is ST-MoE's: the mean over tokens of ``logsumexp(logits)**2`` (transformers'
  ``router_z_loss_coef``, Megatron's ``moe_z_loss_coeff`` scale it).

With no tokens (T = 0, or a token mask of zeros) each loss is 0, where the formulas divide 0 by 0 (and
transformers' returns NaN): an all-padding micro-batch adds nothing to the training loss.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from moe_ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_real_weights, check_tensor
from moe_ops.balancing import expert_counts
from moe_ops.routing import RouterStats


def _layers(name: str, value, what: str = "tensor") -> list:
    """``value`` as a list of layers: one ``what`` or a non-empty sequence of them."""
    layers = list(value) if isinstance(value, (list, tuple)) else [value]
    if not layers:
        raise ValueError(f"{name}: expected a {what} or a non-empty sequence of them, one per layer")
    return layers


def _compute_dtype(*layers: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 if any layer's logits are fp64 (layers of mixed dtypes are computed alike)."""
    return functools.reduce(torch.promote_types, (logits.dtype for logits in layers), torch.float32)


def load_balancing_loss(
    router_logits: torch.Tensor | Sequence[torch.Tensor],
    topk_ids: torch.Tensor | Sequence[torch.Tensor],
    *,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The load-balancing loss of one or several MoE layers (see the module docstring): a scalar computed
    in fp32 (fp64 if any layer's logits are fp64), where transformers takes the softmax in the logits' dtype.

    Args:
        router_logits: (T, E) float, or a sequence of them (one per layer)
        topk_ids:      (T, K) int32/int64 experts each token was sent to, or a sequence matching
                       ``router_logits``; ids outside [0, E) (dropped slots) are not counted
        token_mask:    optional (T,) bool/float: tokens with mask 0 (padding) count nowhere, as
                       transformers' ``attention_mask`` (flattened) does
    """
    logits_layers, ids_layers = _layers("router_logits", router_logits), _layers("topk_ids", topk_ids)
    if len(logits_layers) != len(ids_layers):
        raise ValueError(
            f"topk_ids: expected one tensor per layer of router_logits ({len(logits_layers)}), got {len(ids_layers)}"
        )
    check_tensor("router_logits", logits_layers[0], ndim=2, dtypes=FLOAT_DTYPES)
    num_tokens, num_experts = logits_layers[0].shape
    device = logits_layers[0].device
    for logits in logits_layers:
        check_tensor("router_logits", logits, shape=(num_tokens, num_experts), dtypes=FLOAT_DTYPES, device=device)
    dtype = _compute_dtype(*logits_layers)
    slots_E = torch.zeros(num_experts, dtype=dtype, device=device)
    prob_sum_E = torch.zeros(num_experts, dtype=dtype, device=device)
    rows = None
    for logits, ids in zip(logits_layers, ids_layers, strict=True):
        check_tensor("topk_ids", ids, ndim=2, dtypes=INDEX_DTYPES, device=device)
        if ids.shape[0] != num_tokens:
            raise ValueError(f"topk_ids: expected ({num_tokens}, K) like the logits' tokens, got {tuple(ids.shape)}")
        weight_T = torch.ones(num_tokens, dtype=dtype, device=device)
        if token_mask is not None:
            check_tensor("token_mask", token_mask, shape=(num_tokens,), device=device)
            check_real_weights("token_mask", token_mask)
            weight_T = token_mask.to(dtype)
        probs_TE = torch.softmax(logits.to(dtype), dim=-1)
        slots_E = slots_E + expert_counts(ids, num_experts, token_weight=weight_T)
        prob_sum_E = prob_sum_E + (probs_TE * weight_T[:, None]).sum(dim=0)
        rows = weight_T.sum() if rows is None else rows + weight_T.sum()
    # No tokens (T = 0, or every one masked): the sums are 0 and so is the loss, not 0 / 0 (one all-padding
    # micro-batch would make the training loss NaN).
    rows = rows.clamp_min(torch.finfo(dtype).tiny)
    return num_experts * torch.sum((slots_E / rows) * (prob_sum_E / rows))


def load_balancing_loss_from_stats(stats: RouterStats | Sequence[RouterStats]) -> torch.Tensor:
    """The load-balancing loss of one or several MoE layers (or micro-batches) from their RouterStats:
    ``E * sum_e (slots_e / N) * (prob_sum_e / N)`` with the sums and N (tokens) added over the stats
    given, which is :func:`load_balancing_loss` of the same logits and ids without a token mask.
    Differentiable w.r.t. the logits through ``router_prob_sum``."""
    layers = [stats] if isinstance(stats, RouterStats) else _layers("stats", stats, "RouterStats")  # one is a tuple
    for layer in layers:
        if not isinstance(layer, RouterStats):
            raise TypeError(f"stats: expected RouterStats (from route(..., return_stats=True)), got {type(layer)}")
        check_tensor("stats.tokens_per_expert", layer.tokens_per_expert, shape=tuple(layers[0].tokens_per_expert.shape),
                     dtypes=(torch.float32,), device=layers[0].tokens_per_expert.device)
        check_tensor("stats.router_prob_sum", layer.router_prob_sum, shape=tuple(layers[0].tokens_per_expert.shape),
                     dtypes=FLOAT_DTYPES, device=layers[0].tokens_per_expert.device)
    num_experts = layers[0].tokens_per_expert.shape[0]
    slots_E = sum(layer.tokens_per_expert for layer in layers)
    prob_sum_E = sum(layer.router_prob_sum for layer in layers)
    rows = max(sum(layer.num_tokens for layer in layers), 1)  # no tokens: the sums are 0, and so the loss
    return num_experts * torch.sum((slots_E.to(prob_sum_E.dtype) / rows) * (prob_sum_E / rows))


def router_z_loss(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over the tokens (of every layer given) of ``logsumexp(logits)**2``,
    a scalar computed in fp32 (fp64 if any layer's logits are fp64)."""
    layers = _layers("router_logits", router_logits)
    check_tensor("router_logits", layers[0], ndim=2, dtypes=FLOAT_DTYPES)
    for logits in layers:
        check_tensor("router_logits", logits, ndim=2, dtypes=FLOAT_DTYPES, device=layers[0].device)
    dtype = _compute_dtype(*layers)
    lse_T = torch.cat([torch.logsumexp(logits.to(dtype), dim=-1) for logits in layers])
    return lse_T.square().sum() / max(lse_T.numel(), 1)  # no tokens: 0, not the NaN of an empty mean
