"""A model that learns: transformers' own small MoE language model (Qwen3-MoE), trained with
``torch.compile`` with moe_ops (its training rewrites on, and the default path with them off), follows
the eager run step for step, its loss falls,
and its load-balancing loss (transformers' ``router_aux_loss_coef``, computed by the model's own code
from the rewritten router's logits) evens out the tokens per expert.

Synthetic data made here: each sequence counts from a random start in a random stride modulo the
vocabulary, so the next token is predictable and the loss can fall far below log(vocab).
bf16 weights: transformers' fp32 experts (``grouped_mm_fallback``) have a backward Inductor cannot compile.
"""

from __future__ import annotations

import pytest
import torch
from compile_harness import fresh_compile_state, training_rewrites  # noqa: F401  (fixtures)
from torch._dynamo.utils import counters

import moe_ops

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("fresh_compile_state")

VOCAB, E, K = 64, 8, 2


def tiny_qwen3_moe(aux_coef: float, device: str, **sizes) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=sizes.get("hidden", 32), intermediate_size=64,
        moe_intermediate_size=sizes.get("ffn", 32), num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
        router_aux_loss_coef=aux_coef, output_router_logits=True, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            # A router that starts skewed (experts 0 and 1 take most tokens), as collapsed routers do:
            # the balancing loss has something to undo.
            layer.mlp.gate.weight[:2] *= 5
    return model.to(device, torch.bfloat16).train()


def counting_sequences(steps: int, batch: int, length: int, device: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (steps, batch, 1), generator=g)
    stride = torch.randint(1, 4, (steps, batch, 1), generator=g)
    return ((start + stride * torch.arange(length)) % VOCAB).to(device)


def train(aux_coef: float, compiled: bool, steps: int, device: str = "cpu", batch: int = 8, length: int = 16,
          **sizes) -> tuple[list[float], torch.Tensor]:
    """Losses of each step, and the slots each expert got over the run (layers, E), counted on the device
    from the router logits the model returns (no host sync)."""
    model = tiny_qwen3_moe(aux_coef, device, **sizes)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, load_LE = [], torch.zeros(2, E, device=device)
    for input_ids in counting_sequences(steps, batch, length, device):
        out = forward(input_ids=input_ids, labels=input_ids)
        out.loss.backward()  # transformers adds router_aux_loss_coef * aux_loss to the loss
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.detach())
        load_LE += torch.stack([moe_ops.expert_counts(torch.topk(logits.detach(), K).indices, E)
                                for logits in out.router_logits])
    return [loss.item() for loss in losses], load_LE.cpu()


def spread(load_LE: torch.Tensor) -> float:
    """Max over layers of the coefficient of variation of the slots per expert (0 = perfectly even)."""
    return (load_LE.std(dim=1) / load_LE.mean(dim=1)).max().item()


@pytest.fixture(params=["training_rewrites", "plain_backward"])
def training_path(request, monkeypatch):
    """The rewritten training graph (moe_ops.config.training_rewrites on, the default), and the path with it
    off, on which a training graph computes what the user's code does."""
    monkeypatch.setattr(moe_ops.config, "training_rewrites", request.param == "training_rewrites")
    return request.param


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_compiled_training_follows_eager_and_learns(device, training_path):
    steps = 120
    # On the GPU a larger model and batch: the Triton kernels' tiles are filled.
    sizes = dict(hidden=256, ffn=128, batch=32) if device == "cuda" else {}
    eager, _ = train(0.02, compiled=False, steps=steps, device=device, **sizes)
    compiled, _ = train(0.02, compiled=True, steps=steps, device=device, **sizes)
    if training_path == "training_rewrites":
        assert counters["moe_ops"]["experts_rewrite_hf_grouped_mm"] >= 1 and counters["moe_ops"]["route_rewrite"] >= 1
        assert counters["moe_ops"]["joint_rewrite"] >= 1  # the training graph runs moe_ops' forward and backward
    else:
        assert counters["moe_ops"]["joint_rewrite"] == 0
    eager, compiled = torch.tensor(eager), torch.tensor(compiled)
    # The first step runs the same weights on the same tokens: the losses agree to bf16's rounding.
    assert abs(eager[0] - compiled[0]) < 2e-2 * eager[0], (eager[0], compiled[0])
    # Then bf16 rounding differs between the compiled and the eager step, and AdamW's first updates
    # (~lr * sign(gradient)) turn a different sign of a tiny gradient into a different step: the curves
    # are compared as averages over windows of 10 steps, which stay within 6% of the starting loss of
    # each other (the CPU run: within 3%).
    eager_10, compiled_10 = eager.view(-1, 10).mean(1), compiled.view(-1, 10).mean(1)
    assert ((eager_10 - compiled_10).abs() < 0.06 * eager_10[0]).all(), (eager_10, compiled_10)
    # Both learn: the loss falls from ~log(64) = 4.2 to a fraction of it.
    assert compiled_10[-1] < 0.4 * compiled_10[0] and eager_10[-1] < 0.4 * eager_10[0], (eager_10, compiled_10)


@pytest.mark.usefixtures("training_rewrites")
def test_load_balancing_loss_evens_the_load():
    _, unbalanced = train(0.0, compiled=True, steps=120)
    _, balanced = train(0.1, compiled=True, steps=120)
    assert counters["moe_ops"]["experts_rewrite_hf_grouped_mm"] >= 2
    print(f"spread of tokens per expert: {spread(unbalanced):.3f} without the loss, {spread(balanced):.3f} with it")
    assert spread(balanced) < 0.6 * spread(unbalanced), (balanced, unbalanced)
