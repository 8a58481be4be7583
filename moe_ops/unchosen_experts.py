"""The gradient the experts a token did not choose give in code that runs every token through every expert.

Shape legend: T tokens, K experts per token, E experts, H hidden, F the experts' intermediate size.

Llama 4's MoE block computes every expert on every token, on the row ``x[t] * score[t, e]`` with a score of
exactly 0 for the experts the token did not choose; ``fused_experts`` computes only the chosen ones. Those
unchosen rows add ±0 to the output and to every gradient, but not where a value is infinite or NaN
(``0 * inf`` is NaN): a token t whose row ``x[t]`` holds one makes every unchosen expert's weight gradients NaN,
and an inf or NaN in its output gradient ``g[t]`` makes each unchosen expert's whole gate/up gradient NaN and its
down gradient's entries of that output column. The op ``moe_ops::unchosen_expert_gradients`` gives a training
graph those NaN: its value is (T, H) zeros, added to the block's output, and its backward returns, for each
weight, NaN where the plain code's unchosen rows make it NaN and 0 elsewhere (never anything else: the sum of
a finite gradient and those zeros is that gradient). Only a backward of its own can do it: any gradient that
autograd derives through the ops' linear backward multiplies a chosen token's inf by a coefficient 0, and
makes a NaN where the plain code has inf. Expert weights are assumed finite, as the rewrite assumes
(lowering/graph/match_dense_experts.py).
"""

from __future__ import annotations

import torch

from moe_ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor


def _check_args(x_TH, topk_ids_TK, w_gate_up_EHF2, w_down_EFH) -> None:
    check_tensor("x", x_TH, ndim=2, dtypes=FLOAT_DTYPES)
    tokens, hidden = x_TH.shape
    check_tensor("topk_ids", topk_ids_TK, shape=(tokens, "K"), dtypes=INDEX_DTYPES, device=x_TH.device)
    check_tensor("w_gate_up", w_gate_up_EHF2, shape=("E", hidden, "2F"), dtypes=FLOAT_DTYPES, device=x_TH.device)
    check_tensor("w_down", w_down_EFH, shape=(w_gate_up_EHF2.shape[0], "F", hidden), dtypes=FLOAT_DTYPES,
                 device=x_TH.device)


@torch.library.custom_op("moe_ops::unchosen_expert_gradients", mutates_args=())
def _unchosen_expert_gradients_op(x: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
                                  w_down: torch.Tensor) -> torch.Tensor:
    _check_args(x, topk_ids, w_gate_up, w_down)
    return torch.zeros_like(x)


@_unchosen_expert_gradients_op.register_fake
def _(x, topk_ids, w_gate_up, w_down):
    _check_args(x, topk_ids, w_gate_up, w_down)
    return torch.empty_like(x)


def unchosen_weight_gradients(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int,
                              grad_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate/up (E, 1, 1), down (E, 1, H)) float32, NaN where the tokens that did not choose an expert make its
    weight gradient NaN in the plain code (module docstring), 0 elsewhere; broadcast over each weight."""
    experts_E = torch.arange(num_experts, device=topk_ids_TK.device)
    unchosen_TE = ~(topk_ids_TK[:, :, None] == experts_E).any(1)
    # Counts of such tokens per (expert, output column), as a GEMM of 0/1 values: in bf16 (half the bytes of fp32),
    # whose rounding keeps a positive count positive.
    bad_TH = ~grad_TH.isfinite() | ~x_TH.isfinite().all(1, keepdim=True)
    bad_EH = unchosen_TE.T.to(torch.bfloat16) @ bad_TH.to(torch.bfloat16) > 0
    down_E1H = torch.where(bad_EH, float("nan"), 0.0)[:, None, :]
    gate_up_E11 = torch.where(bad_EH.any(1), float("nan"), 0.0)[:, None, None]
    return gate_up_E11, down_E1H


def _setup_context(ctx, inputs, output):
    x, topk_ids, w_gate_up, w_down = inputs
    ctx.save_for_backward(x, topk_ids)
    ctx.weights = (w_gate_up.shape, w_gate_up.dtype), (w_down.shape, w_down.dtype)


def _backward(ctx, grad_TH):
    x, topk_ids = ctx.saved_tensors
    (gate_up_shape, gate_up_dtype), (down_shape, down_dtype) = ctx.weights
    # x's gradient from the unchosen rows is the rewrite's sum(x[t] * 0) term's; the ids have none.
    if not any(ctx.needs_input_grad[2:]):
        return None, None, None, None
    gate_up_E11, down_E1H = unchosen_weight_gradients(x, topk_ids, gate_up_shape[0], grad_TH)
    return (None, None,
            gate_up_E11.to(gate_up_dtype).expand(gate_up_shape) if ctx.needs_input_grad[2] else None,
            down_E1H.to(down_dtype).expand(down_shape) if ctx.needs_input_grad[3] else None)


torch.library.register_autograd("moe_ops::unchosen_expert_gradients", _backward, setup_context=_setup_context)
