"""Auxiliary-loss-free load balancing (DeepSeek-V3, torchtitan's ``expert_bias``): a per-expert fp32 bias
added to the scores for the selection only (``moe_ops.route``'s ``correction_bias``), nudged after each
optimizer step towards the experts that got fewer tokens.

Shape legend: T tokens, K experts per token, E experts.

Usage, with the counts accumulated on the device over the micro-batches of a step::

    counts = torch.zeros(E, device="cuda")
    ...                                      # each micro-batch, each layer:
    counts += moe_ops.expert_counts(topk_ids, E)
    ...
    moe_ops.update_expert_bias(bias, counts, coeff=1e-3)   # before optimizer.step(); zeroes counts

As the optimizer's pre-hook, a function that returns None (a pre-hook's return value replaces the step's
arguments; update_expert_bias returns the applied delta)::

    def update_bias(optimizer, args, kwargs):
        moe_ops.update_expert_bias(bias, counts, 1e-3)

    optimizer.register_step_pre_hook(update_bias)
"""

from __future__ import annotations

import torch

from moe_ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_number, check_real_weights, check_tensor


def expert_counts(
    topk_ids: torch.Tensor, num_experts: int, token_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """(E,) slots routed to each expert, on the ids' device with no host sync; ids outside [0, E) (dropped
    slots) are not counted. fp32 (fp64 for an fp64 ``token_weight``), exact for whole counts below 2**24 and
    so summed in any order alike (deterministic). ``token_weight`` (T,) float, integer or bool: each token's
    slots count that much (a padding mask, as transformers' int64 attention mask)."""
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_int("num_experts", num_experts, minimum=1)
    ids_TK = topk_ids.long()
    valid_TK = (ids_TK >= 0) & (ids_TK < num_experts)
    dtype = torch.float32
    if token_weight is not None:
        check_tensor("token_weight", token_weight, shape=(topk_ids.shape[0],), device=topk_ids.device)
        check_real_weights("token_weight", token_weight)
        # Counts in fp32 whatever the weight's dtype: bf16 counts 5000 slots as 4992, fp16 70000 as inf.
        dtype = torch.promote_types(token_weight.dtype, torch.float32)
    slot_weight_TK = valid_TK.to(dtype) if token_weight is None else torch.where(
        valid_TK, token_weight.to(dtype)[:, None], 0)
    counts_E = torch.zeros(num_experts, dtype=dtype, device=topk_ids.device)
    return counts_E.scatter_add(0, torch.where(valid_TK, ids_TK, 0).reshape(-1), slot_weight_TK.reshape(-1))


@torch.no_grad()
def update_expert_bias(expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor, coeff: float) -> torch.Tensor:
    """In place: ``expert_bias += d - mean(d)`` with ``d = coeff * sign(mean(counts) - counts)`` (the
    DeepSeek-V3 / torchtitan rule: under-loaded experts up, over-loaded down, the bias kept zero-centred),
    then ``tokens_per_expert`` zeroed for the next step. No host sync. Returns the applied delta.

    Args:
        expert_bias:       (E,) float32 (a buffer; it gets no gradient)
        tokens_per_expert: (E,) float counts accumulated since the last update (``expert_counts``)
        coeff:             the update speed (torchtitan's ``load_balance_coeff``; DeepSeek-V3: 1e-3)
    """
    check_tensor("expert_bias", expert_bias, ndim=1, dtypes=(torch.float32,))
    check_tensor("tokens_per_expert", tokens_per_expert, shape=tuple(expert_bias.shape), dtypes=FLOAT_DTYPES,
                 device=expert_bias.device)
    check_number("coeff", coeff, minimum=0.0)
    counts_E = tokens_per_expert.to(torch.float32)
    delta_E = coeff * torch.sign(counts_E.mean() - counts_E)
    delta_E = delta_E - delta_E.mean()
    expert_bias.add_(delta_E)
    tokens_per_expert.zero_()
    return delta_E
