"""moe_ops.expert_counts and moe_ops.update_expert_bias: against a reference sequence written out over
several steps; zero-centred bias; counts reset; dropped ids uncounted; no graph break."""

from __future__ import annotations

import pytest
import torch

import moe_ops

E, K = 8, 2


def test_counts_skip_dropped_ids_and_compile_without_breaks():
    ids = torch.tensor([[0, 1], [1, E], [-1, 7], [7, 7]], dtype=torch.int32)
    assert moe_ops.expert_counts(ids, E).tolist() == [1, 2, 0, 0, 0, 0, 0, 3]
    torch._dynamo.reset()
    compiled = torch.compile(moe_ops.expert_counts, fullgraph=True)
    assert torch.equal(compiled(ids, E), moe_ops.expert_counts(ids, E))


def test_bias_update_follows_the_rule_over_steps():
    """Over five steps of skewed routing (micro-batches accumulated), the bias moves as the rule says,
    written out with Python numbers; it stays zero-centred and the counts are zeroed each step."""
    torch.manual_seed(0)
    bias, counts, coeff = torch.zeros(E), torch.zeros(E), 1e-2
    want = [0.0] * E
    for _ in range(5):
        for _ in range(3):  # micro-batches
            probs = torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1])
            ids = torch.multinomial(probs.expand(64, -1), K)
            counts += moe_ops.expert_counts(ids, E)
        step_counts = counts.tolist()
        mean = sum(step_counts) / E
        delta = [coeff * ((mean > c) - (mean < c)) for c in step_counts]
        want = [w + d - sum(delta) / E for w, d in zip(want, delta, strict=True)]
        moe_ops.update_expert_bias(bias, counts, coeff)
        torch.testing.assert_close(bias, torch.tensor(want), rtol=0, atol=1e-7)
        assert (counts == 0).all() and abs(float(bias.sum())) < 1e-6
    assert bias[0] < 0 < bias[-1]  # the crowded expert pushed down, a quiet one up


def test_bias_update_as_an_optimizer_pre_hook():
    """The docs' pre-hook (a function returning None) runs before each step: the bias moves, the counts are
    zeroed, and the step updates the parameters (a hook returning update_expert_bias's delta made it raise)."""
    E = 4
    bias, counts = torch.zeros(E), torch.tensor([5.0, 1.0, 1.0, 1.0])
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def update_bias(optimizer, args, kwargs):
        moe_ops.update_expert_bias(bias, counts, 1e-3)

    optimizer.register_step_pre_hook(update_bias)
    weight.sum().backward()
    optimizer.step()
    assert bias[0] < 0 < bias[1] and not counts.any()
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.9))


def test_route_with_the_bias_spreads_the_load():
    """The bias steers the selection only: route's weights stay the unbiased scores'; with a bias learned
    from skewed logits the per-expert spread of the selection shrinks."""
    torch.manual_seed(1)
    logits = torch.randn(4096, E) + torch.linspace(1.0, 0.0, E)  # expert 0 favoured
    bias, counts = torch.zeros(E), torch.zeros(E)
    before = moe_ops.expert_counts(moe_ops.route(logits, K, scoring="sigmoid")[1], E)
    for _ in range(50):
        counts += moe_ops.expert_counts(moe_ops.route(logits, K, scoring="sigmoid", correction_bias=bias)[1], E)
        moe_ops.update_expert_bias(bias, counts, 1e-2)
    weights, ids = moe_ops.route(logits, K, scoring="sigmoid", correction_bias=bias)
    after = moe_ops.expert_counts(ids, E)
    assert after.std() < 0.5 * before.std()
    torch.testing.assert_close(weights, torch.sigmoid(logits).gather(1, ids.long()))


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"expert_bias: expected dtype in \(float32\)"):
        moe_ops.update_expert_bias(torch.zeros(E, dtype=torch.float64), torch.zeros(E), 1e-3)
    with pytest.raises(ValueError, match=r"tokens_per_expert: expected shape \(8\)"):
        moe_ops.update_expert_bias(torch.zeros(E), torch.zeros(E - 1), 1e-3)
    with pytest.raises(ValueError, match=r"coeff: expected a finite number >= 0"):
        moe_ops.update_expert_bias(torch.zeros(E), torch.zeros(E), -1.0)
    with pytest.raises(ValueError, match=r"num_experts: expected an int >= 1, got 0"):
        moe_ops.expert_counts(torch.zeros(2, 2, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match=r"token_weight: expected shape \(2\), got \(2, 2\)"):
        moe_ops.expert_counts(torch.zeros(2, 2, dtype=torch.int32), E, token_weight=torch.ones(2, 2))
    with pytest.raises(TypeError, match=r"token_weight: expected a real \(float, integer or bool\) tensor"):
        moe_ops.expert_counts(torch.zeros(2, 2, dtype=torch.int32), E, token_weight=torch.ones(2, dtype=torch.cfloat))


def test_counts_with_token_weights_are_fp32_whatever_the_weight():
    """A bool padding mask counts its tokens; bf16 / fp16 weights count in fp32 (in bf16, 5000 slots were 4992;
    in fp16, 70000 were inf)."""
    ids = torch.tensor([[0, 1], [1, 3], [2, 3]], dtype=torch.int32)
    counts = moe_ops.expert_counts(ids, 4, token_weight=torch.tensor([True, False, True]))
    assert counts.dtype == torch.float32 and counts.tolist() == [1.0, 1.0, 1.0, 1.0]
    many = torch.zeros(35000, 2, dtype=torch.int32)
    for dtype in (torch.bfloat16, torch.float16):
        counts = moe_ops.expert_counts(many, 4, token_weight=torch.ones(35000, dtype=dtype))
        assert counts.dtype == torch.float32 and counts.tolist() == [70000.0, 0.0, 0.0, 0.0]
    assert moe_ops.expert_counts(ids, 4, token_weight=torch.ones(3, dtype=torch.float64)).dtype == torch.float64
    # transformers' attention mask is int64
    counts = moe_ops.expert_counts(ids, 4, token_weight=torch.tensor([1, 0, 1]))
    assert counts.dtype == torch.float32 and counts.tolist() == [1.0, 1.0, 1.0, 1.0]
