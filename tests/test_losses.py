"""moe_ops.load_balancing_loss and moe_ops.router_z_loss: against transformers' load_balancing_loss_func
and an independent float64 formula, value and gradient; balanced vs skewed routing; no graph break."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel

import moe_ops

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

E, K = 16, 4


def _layer(tokens=96, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, E, generator=g) * 2).to(dtype).requires_grad_(True)
    ids = torch.topk(torch.softmax(logits.detach().float(), -1), K, dim=-1).indices
    return logits, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_balancing_loss_is_transformers(num_layers, masked, dtype):
    layers = [_layer(dtype=dtype, seed=s) for s in range(num_layers)]
    logits, ids = [lg for lg, _ in layers], [i for _, i in layers]
    mask = (torch.arange(96) % 5 != 0) if masked else None
    got = moe_ops.load_balancing_loss(logits, ids, token_mask=mask)
    # moe_ops takes the softmax in fp32 whatever the logits' dtype; transformers in the logits' dtype, so
    # it runs on fp32 copies here: the same math, and the gradients differ by their final bf16 rounding.
    logits32 = [lg.detach().float().requires_grad_(True) for lg in logits]
    want = load_balancing_loss_func(tuple(logits32), E, K, None if mask is None else mask.reshape(1, -1).long())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got, logits)
    want_grads = torch.autograd.grad(want, logits32)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close_rel(g, w, dtype, "gradient of the logits")


def test_balancing_loss_formula_in_float64():
    """E * sum_e (slots_e / T) * mean_t softmax_te, written out independently; dropped slots uncounted."""
    logits, ids = _layer(tokens=40)
    ids = ids.clone()
    ids[3, 1], ids[7, 0] = E, -1
    got = moe_ops.load_balancing_loss(logits, ids)
    probs = torch.softmax(logits.detach().double(), -1)
    slots = torch.tensor([float(((ids == e)).sum()) for e in range(E)], dtype=torch.float64)
    want = E * (slots / 40 * probs.mean(0)).sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)


def test_balanced_routing_scores_k_and_skew_scores_more():
    tokens = E * 8
    uniform_logits = torch.zeros(tokens, E)
    balanced_ids = (torch.arange(tokens)[:, None] + torch.arange(K)[None, :]) % E  # every expert K*8 slots
    torch.testing.assert_close(moe_ops.load_balancing_loss(uniform_logits, balanced_ids), torch.tensor(float(K)))
    skewed_logits = torch.zeros(tokens, E)
    skewed_logits[:, :K] = 4.0
    skewed_ids = torch.arange(K).expand(tokens, K)  # every token to the same K experts
    assert moe_ops.load_balancing_loss(skewed_logits, skewed_ids) > 3 * K


def test_z_loss_formula_and_gradient():
    logits = torch.randn(3, 12, 8, dtype=torch.float64).unbind(0)
    got = moe_ops.router_z_loss(list(logits))
    want = torch.cat([torch.log(torch.exp(lg).sum(-1)) for lg in logits]).square().mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)
    leaf = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(moe_ops.router_z_loss, (leaf,))
    logits, ids = _layer(tokens=12)
    leaf = logits.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: moe_ops.load_balancing_loss(x, ids), (leaf,))


@pytest.mark.parametrize("num_layers", [1, 3])
def test_balancing_loss_from_stats_is_the_loss_of_logits_and_ids(num_layers):
    """load_balancing_loss_from_stats(route's stats) == load_balancing_loss(logits, route's ids), value and
    gradient, over one or several layers."""
    layers = [_layer(seed=s)[0] for s in range(num_layers)]
    routed = [moe_ops.route(logits, K, return_stats=True) for logits in layers]
    got = moe_ops.load_balancing_loss_from_stats([stats for _, _, stats in routed])
    want = moe_ops.load_balancing_loss(layers, [ids for _, ids, _ in routed])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for g, w in zip(torch.autograd.grad(got, layers), torch.autograd.grad(want, layers), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match=r"stats: expected RouterStats"):
        moe_ops.load_balancing_loss_from_stats([(1, 2, 3)])


def test_compiles_without_graph_breaks():
    logits, ids = _layer()

    def losses(lg, i):
        return moe_ops.load_balancing_loss(lg, i) + 1e-3 * moe_ops.router_z_loss(lg)

    torch._dynamo.reset()
    compiled = torch.compile(losses, fullgraph=True)
    torch.testing.assert_close(compiled(logits, ids), losses(logits, ids), rtol=1e-5, atol=1e-6)


def test_errors_name_the_argument():
    logits, ids = _layer()
    with pytest.raises(ValueError, match=r"topk_ids: expected one tensor per layer of router_logits \(2\), got 1"):
        moe_ops.load_balancing_loss([logits, logits], [ids])
    with pytest.raises(ValueError, match=r"topk_ids: expected \(96, K\)"):
        moe_ops.load_balancing_loss(logits, ids[:5])
    with pytest.raises(TypeError, match=r"topk_ids: expected dtype"):
        moe_ops.load_balancing_loss(logits, ids.float())
    with pytest.raises(ValueError, match=r"token_mask: expected shape \(96\)"):
        moe_ops.load_balancing_loss(logits, ids, token_mask=torch.ones(95))
    with pytest.raises(TypeError, match=r"token_mask: expected a real \(float, integer or bool\) tensor, got "
                                        r"torch.complex64"):
        moe_ops.load_balancing_loss(logits, ids, token_mask=torch.ones(96, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"router_logits: expected a 2-D tensor"):
        moe_ops.router_z_loss(logits[0])
    # transformers' router_logits is None without output_router_logits
    with pytest.raises(TypeError, match=r"router_logits: expected a torch.Tensor, got NoneType"):
        moe_ops.router_z_loss(None)
    with pytest.raises(TypeError, match=r"router_logits: expected a torch.Tensor, got NoneType"):
        moe_ops.load_balancing_loss([logits, None], [ids, ids])
    stats = moe_ops.route(logits.detach(), 2, return_stats=True)[2]
    with pytest.raises(ValueError, match=r"stats: expected a RouterStats or a non-empty sequence of them"):
        moe_ops.load_balancing_loss_from_stats([])
    with pytest.raises(ValueError, match=r"stats.tokens_per_expert: expected shape \(16\), got \(1\)"):
        moe_ops.load_balancing_loss_from_stats([stats, stats._replace(tokens_per_expert=torch.ones(1))])


def test_layers_of_mixed_dtypes_compute_in_the_widest():
    """fp32 and fp64 layers in either order: both losses in fp64, the fp64 layer not rounded to fp32."""
    logits, ids = _layer()
    wide = logits.detach().double() * (1 + 1e-12)  # a difference fp32 cannot hold
    for pair in ([logits.detach(), wide], [wide, logits.detach()]):
        expected = moe_ops.load_balancing_loss([p.double() for p in pair], [ids, ids])
        got = moe_ops.load_balancing_loss(pair, [ids, ids])
        assert got.dtype == torch.float64 and torch.equal(got, expected)
        z = moe_ops.router_z_loss(pair)
        assert z.dtype == torch.float64 and torch.equal(z, moe_ops.router_z_loss([p.double() for p in pair]))


def test_no_tokens_make_no_loss():
    """T = 0, or a mask of zeros: each loss is 0 (the formulas' 0 / 0 would make the training loss NaN), and its
    gradient is 0."""
    logits, ids = _layer()
    empty = logits.detach()[:0].clone().requires_grad_(True)
    assert moe_ops.load_balancing_loss(empty, ids[:0]).item() == 0.0
    assert moe_ops.router_z_loss(empty).item() == 0.0
    masked = logits.detach().clone().requires_grad_(True)
    loss = moe_ops.load_balancing_loss(masked, ids, token_mask=torch.zeros(logits.shape[0], dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(masked.grad, torch.zeros_like(logits))
    stats = moe_ops.route(empty.detach(), 2, return_stats=True)[2]
    assert moe_ops.load_balancing_loss_from_stats(stats).item() == 0.0
