"""moe_ops::route: reference vs independent model-family formulations, Triton vs reference, autograd,
op registration and argument checks."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from conftest import TRITON_DEVICE, assert_close_rel

import moe_ops
import moe_ops.routing as routing
from moe_ops.routing import route, route_ref

# The interpreter evaluates sigmoid(-1e30) = 1 / (1 + exp(1e30)) = 0 through numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# Router configurations of the model families, as keyword arguments of route().
MODES = {
    "mixtral": dict(scoring="softmax", renormalize=True),  # also Qwen2/3-MoE (norm_topk_prob=True)
    "qwen2": dict(scoring="softmax"),  # Qwen2-MoE / OLMoE: no renormalisation
    "gpt_oss": dict(scoring="softmax", softmax_after_topk=True),
    "deepseek_v3": dict(
        scoring="sigmoid", renormalize=True, renorm_eps=1e-20, n_group=8, topk_group=4,
        routed_scaling_factor=2.5,
    ),
    "sigmoid": dict(scoring="sigmoid"),
    # A selection bias without groups: MiniMax-M2 (sigmoid), Laguna/ERNIE-style (softmax).
    "minimax_m2": dict(scoring="sigmoid", renormalize=True),
    "biased_softmax": dict(scoring="softmax", renormalize=True),
    # ERNIE-4.5: softmax, a selection bias, w / clamp(sum, min=moe_norm_min); a large minimum so that
    # the clamp binds for many tokens.
    "ernie": dict(scoring="softmax", renormalize=True, renorm_min=0.5),
}
BIASED_MODES = ("deepseek_v3", "minimax_m2", "biased_softmax", "ernie")
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _ref_args(logits, k, *, scoring="softmax", softmax_after_topk=False, renormalize=False,
              renorm_eps=0.0, correction_bias=None, n_group=1, topk_group=1, routed_scaling_factor=1.0,
              renorm_min=0.0):
    """route()'s keyword arguments in the op's positional order."""
    return (logits, k, scoring, softmax_after_topk, renormalize, renorm_eps, correction_bias, n_group,
            topk_group, routed_scaling_factor) + ((renorm_min,) if renorm_min else ())


def _bias_for(mode: str, num_experts: int, device="cpu") -> torch.Tensor | None:
    if mode not in BIASED_MODES:
        return None
    return (torch.randn(num_experts) * 0.1).to(device)


# ---------------------------------------------------------------------------------------------------
# Independent formulations, written the way the model code writes them (HF transformers), with
# ``torch.topk`` as the models call it: the reference must pick what they pick, ties included.


def _mixtral_like(logits, k, renormalize):
    # MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock / OlmoeSparseMoeBlock
    routing_weights = torch.nn.functional.softmax(logits, dim=1, dtype=torch.float)
    routing_weights, selected = torch.topk(routing_weights, k, dim=-1)
    if renormalize:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights, selected


def _gpt_oss_like(logits, k):
    # GptOssTopKRouter: top-k of the raw logits, softmax over the chosen ones
    top_value, selected = torch.topk(logits, k, dim=-1)
    return torch.nn.functional.softmax(top_value.float(), dim=1), selected


def _deepseek_v3_like(logits, k, bias, n_group, topk_group, scale, eps):
    # DeepseekV3TopkRouter.get_topk_indices / DeepseekV3MoE.route_tokens_to_experts (the -inf mask)
    num_experts = logits.shape[-1]
    scores = logits.float().sigmoid()
    scores_for_choice = scores + bias.float().unsqueeze(0)
    grouped = scores_for_choice.view(-1, n_group, num_experts // n_group)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
    )
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    topk_weights /= topk_weights.sum(dim=-1, keepdim=True) + eps
    return topk_weights * scale, topk_indices


def _minimax_m2_like(logits, k, bias):
    # MiniMaxM2TopKRouter: sigmoid scores, the bias added for the choice only, renormalised
    routing_weights = torch.nn.functional.sigmoid(logits.float())
    _, top_k_index = torch.topk(routing_weights + bias, k, dim=-1, sorted=False)
    top_k_weights = routing_weights.gather(1, top_k_index)
    top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True)
    return top_k_weights, top_k_index


def _ernie_like(logits, k, bias, norm_min):
    # Ernie4_5_MoeTopKRouter (the bias added by its moe_statics module)
    routing_weights = torch.nn.functional.softmax(logits.float(), dim=1, dtype=torch.float)
    _, selected_experts = torch.topk(routing_weights + bias, k, dim=-1)
    routing_weights = torch.gather(routing_weights, dim=-1, index=selected_experts)
    routing_weights = routing_weights / torch.clamp(routing_weights.sum(dim=-1, keepdim=True), min=norm_min)
    return routing_weights, selected_experts


def _by_expert(weights, ids):
    """Each row's (weights, ids) ordered by expert id: torch.topk's order among ties (and with
    sorted=False) is unspecified, the set of experts and their weights are not."""
    order = ids.long().argsort(dim=-1)
    return weights.gather(1, order), ids.long().gather(1, order)


def _cuda_topk_rule(values, k, sorted=True, dim=-1, largest=True):
    """CUDA torch.topk's choice, written out (checked against torch on the GPU by
    test_cuda_topk_rule_is_torchs): the radix order of the float's bits (NaN above +inf, +0.0 above
    -0.0), the lower index first among equal values. Under the interpreter, the route kernel (which
    follows this rule) is compared with route_ref computing through it."""
    assert largest and dim in (-1, values.dim() - 1)
    v = values.detach().double().cpu()
    bits = v.view(torch.int64)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    key = torch.where(torch.isnan(v), torch.iinfo(torch.int64).max, key)
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k].to(values.device)
    return torch.return_types.topk((values.gather(-1, ids), ids))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["mixtral", "qwen2", "gpt_oss", "deepseek_v3", "minimax_m2", "ernie"])
def test_reference_matches_model_formulations(mode, dtype):
    num_tokens, num_experts, k = 64, (256 if mode == "deepseek_v3" else 32), 8
    logits = torch.randn(num_tokens, num_experts).to(dtype)
    bias = _bias_for(mode, num_experts)
    cfg = MODES[mode]
    weights, ids = route(logits, k, correction_bias=bias, **cfg)
    if mode in ("mixtral", "qwen2"):
        want_w, want_ids = _mixtral_like(logits, k, cfg.get("renormalize", False))
    elif mode == "gpt_oss":
        want_w, want_ids = _gpt_oss_like(logits, k)
    elif mode == "minimax_m2":
        want_w, want_ids = _minimax_m2_like(logits, k, bias)
    elif mode == "ernie":
        want_w, want_ids = _ernie_like(logits, k, bias, cfg["renorm_min"])
    else:
        want_w, want_ids = _deepseek_v3_like(logits, k, bias, 8, 4, 2.5, 1e-20)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (num_tokens, k)
    got_w, got_ids = _by_expert(weights, ids)
    want_w, want_ids = _by_expert(want_w, want_ids)
    torch.testing.assert_close(got_ids, want_ids, rtol=0, atol=0)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("levels", [2, 3, 0], ids=["two_values", "three_values", "bf16_randn"])
@pytest.mark.parametrize("num_experts,k", [(8, 2), (60, 4), (64, 8), (128, 8), (256, 8), (16, 15)])
def test_reference_picks_torch_topk_experts_on_ties(num_experts, k, levels):
    """bf16 logits tie often (6% of tokens tie at the K-th expert for E=128, K=8 on randn logits); the
    op must pick the experts torch.topk picks on the same device, for every token."""
    shape = (512, num_experts)
    logits = (_quantised(shape, levels) if levels else torch.randn(shape)).bfloat16()
    _, ids = route(logits, k, renormalize=True)
    _, want = _mixtral_like(logits, k, True)
    torch.testing.assert_close(_by_expert(ids.float(), ids)[1], _by_expert(want.float(), want)[1], rtol=0, atol=0)
    _, ids = route(logits, k, softmax_after_topk=True)
    _, want = _gpt_oss_like(logits, k)
    torch.testing.assert_close(_by_expert(ids.float(), ids)[1], _by_expert(want.float(), want)[1], rtol=0, atol=0)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_reference_nan_and_inf_logits_follow_torch(scoring):
    """NaN and +inf logits: the selection is torch.topk's (NaN ranks above every number), the weights
    carry the NaN; nothing is dropped or made up."""
    logits = torch.randn(4, 8)
    logits[0, 3] = float("nan")
    logits[1, 2] = float("inf")
    logits[2, :] = float("nan")
    logits[3, 5] = float("-inf")
    weights, ids = route(logits, 2, scoring=scoring)
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    want = torch.topk(scores, 2, dim=-1)
    torch.testing.assert_close(_by_expert(weights, ids), _by_expert(want.values, want.indices), equal_nan=True)
    assert ((ids >= 0) & (ids < 8)).all()


def test_reference_group_masking_excludes_groups():
    # Group 0 holds the single best expert but a weak runner-up; groups 1 and 2 have two good ones.
    logits = torch.full((1, 8), -5.0)
    logits[0, 0] = 5.0
    logits[0, 2:6] = torch.tensor([3.0, 2.9, 3.1, 2.8])
    _, ids = route(logits, 2, scoring="sigmoid", n_group=4, topk_group=2)
    assert set(ids[0].tolist()) <= {2, 3, 4, 5}
    assert ids[0].tolist() == [4, 2]


def test_reference_float64_keeps_float64():
    weights, ids = route(torch.randn(4, 8, dtype=torch.float64), 2)
    assert weights.dtype == torch.float64 and ids.dtype == torch.int32


# ---------------------------------------------------------------------------------------------------
# Triton kernel vs reference. Under the interpreter (CPU) keep T small.


def _triton_vs_ref(logits, k, mode_kwargs, bias=None, any_count=False):
    """The kernel against route_ref on the same tensors. On the GPU route_ref's selections are CUDA's
    torch.topk, the rule the kernel follows; under the interpreter (CPU tensors) route_ref computes
    through that rule written out (_cuda_topk_rule) instead of the CPU's torch.topk."""
    from moe_ops.routing_triton import route_triton

    args = _ref_args(logits, k, correction_bias=bias, **mode_kwargs)
    got_w, got_ids = route_triton(*args, any_count=any_count)
    if logits.is_cuda:
        want_w, want_ids = route_ref(*args)
    else:
        with mock.patch.object(torch, "topk", _cuda_topk_rule):
            want_w, want_ids = route_ref(*args)
    assert got_ids.dtype == torch.int32 and got_w.dtype == want_w.dtype
    got_w, got_ids = _by_expert(got_w.cpu(), got_ids.cpu())
    want_w, want_ids = _by_expert(want_w.cpu(), want_ids.cpu())
    assert torch.equal(got_ids, want_ids), "ids differ from the reference"
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6, equal_nan=True)
    return got_w, got_ids


def _quantised(shape, levels=4):
    # Few distinct values, so many experts tie within a row.
    return torch.randint(0, levels, shape).float() * 0.5


# (name, T, E, k, mode, logits maker)
TRITON_CASES = [
    # the four model families at small typical shapes
    ("mixtral", 37, 8, 2, "mixtral", "randn"),
    ("qwen3", 24, 128, 8, "mixtral", "randn"),
    ("qwen2", 20, 60, 4, "qwen2", "randn"),  # non-power-of-two E (Qwen2-MoE has 60 experts)
    ("gpt_oss", 33, 32, 4, "gpt_oss", "randn"),
    ("deepseek_v3", 17, 256, 8, "deepseek_v3", "randn"),  # E=256 with 8 groups (DeepSeek-V3)
    ("minimax_m2", 19, 32, 4, "minimax_m2", "randn"),  # a selection bias without groups
    ("biased_softmax", 19, 48, 6, "biased_softmax", "randn"),
    ("ties_biased", 16, 32, 8, "minimax_m2", "ties"),
    ("ernie_clamped_renorm", 23, 64, 4, "ernie", "randn"),
    ("nonfinite_clamped_renorm", 12, 16, 4, "ernie", "nonfinite"),  # a NaN sum stays NaN
    # edges
    ("single_token", 1, 64, 6, "mixtral", "randn"),  # T=1 (decode)
    ("single_expert", 5, 1, 1, "mixtral", "randn"),  # E=1: one-column tile
    ("k_equals_E_softmax", 9, 16, 16, "mixtral", "randn"),  # k=E: every expert, sorted
    ("k_equals_E_after_topk", 9, 12, 12, "gpt_oss", "randn"),  # k=E, non-pow2 E and K
    ("ties_softmax", 40, 32, 8, "mixtral", "ties"),  # lower index first among equal scores
    ("ties_after_topk", 40, 60, 5, "gpt_oss", "ties"),
    ("ties_groups", 16, 64, 8, "deepseek_v3", "ties"),  # ties between experts and between groups
    ("neg_inf_softmax", 12, 16, 6, "qwen2", "neginf"),  # -inf / -1e30 logits (zero scores, ties)
    ("neg_inf_after_topk", 12, 16, 10, "gpt_oss", "neginf"),  # -inf raw logits still selectable
    ("neg_inf_groups", 12, 64, 8, "deepseek_v3", "neginf"),
    ("nonfinite_softmax", 12, 16, 4, "mixtral", "nonfinite"),  # NaN / +inf logits: NaN ranks highest
    ("nonfinite_sigmoid", 12, 16, 4, "sigmoid", "nonfinite"),
    ("nonfinite_after_topk", 12, 16, 4, "gpt_oss", "nonfinite"),
    ("nonfinite_groups", 12, 64, 8, "deepseek_v3", "nonfinite"),
    ("signed_zeros_after_topk", 12, 16, 6, "gpt_oss", "signed_zeros"),  # +0.0 ranks above -0.0
]


def _make_logits(kind, num_tokens, num_experts):
    if kind == "randn":
        return torch.randn(num_tokens, num_experts) * 2
    if kind == "ties":
        return _quantised((num_tokens, num_experts))
    if kind == "nonfinite":
        logits = _quantised((num_tokens, num_experts))
        logits[0::3, 1] = float("nan")
        logits[1::3, 2] = float("inf")
        logits[2::3, 0::2] = float("nan")
        return logits
    if kind == "signed_zeros":
        logits = torch.zeros(num_tokens, num_experts)
        logits[:, ::2] = -0.0
        logits[::2, 5] = 1.0
        return logits
    logits = torch.randn(num_tokens, num_experts)
    logits[:, 1::3] = float("-inf")
    logits[:, 2::5] = -1e30
    logits[:, 0] = torch.randn(num_tokens).abs()  # at least one finite logit per row
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "name,num_tokens,num_experts,k,mode,kind", TRITON_CASES, ids=[c[0] for c in TRITON_CASES]
)
def test_triton_matches_reference(name, num_tokens, num_experts, k, mode, kind, dtype):
    cfg = dict(MODES[mode])
    if mode == "deepseek_v3" and num_experts != 256:
        cfg.update(n_group=4, topk_group=2)
    logits = _make_logits(kind, num_tokens, num_experts).to(dtype).to(TRITON_DEVICE)
    bias = _bias_for(mode, num_experts, TRITON_DEVICE)
    if bias is not None and kind == "ties":
        # A zero bias keeps the ties exact: with a generic one, sums like sigmoid(a) + b1 vs
        # sigmoid(c) + b2 tie in real arithmetic and split by rounding, differently per backend.
        bias = torch.zeros_like(bias)
    _triton_vs_ref(logits, k, cfg, bias)


@pytest.mark.parametrize("name", ["mixtral", "qwen3", "deepseek_v3", "single_token", "single_expert"])
def test_triton_any_count_tiles(name):
    """The tiles of a compiled graph for every T (lowering/inductor/kernel_calls.py): rows per program not sized
    to the token count."""
    _, num_tokens, num_experts, k, mode, kind = TRITON_CASES[[c[0] for c in TRITON_CASES].index(name)]
    cfg = dict(MODES[mode])
    logits = _make_logits(kind, num_tokens, num_experts).to(TRITON_DEVICE)
    _triton_vs_ref(logits, k, cfg, _bias_for(mode, num_experts, TRITON_DEVICE), any_count=True)


def test_triton_empty_launches_nothing(monkeypatch):
    # T=0: empty outputs, no kernel launch.
    import moe_ops.routing_triton as rt

    class _NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("kernel launched for T=0")

    monkeypatch.setattr(rt, "_route_kernel", _NoLaunch())
    empty = torch.empty(0, 16, device=TRITON_DEVICE)
    weights, ids = rt.route_triton(*_ref_args(empty, 4, **MODES["mixtral"]))
    assert weights.shape == ids.shape == (0, 4)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32


def test_triton_non_contiguous_logits():
    # Column-major (a transposed gate output) and a strided column slice: read through the strides.
    logits_t = torch.randn(48, 20).to(TRITON_DEVICE).t()
    _triton_vs_ref(logits_t, 4, MODES["mixtral"])
    wide = torch.randn(20, 128).to(TRITON_DEVICE)
    strided_bias = (torch.randn(64, 3) * 0.1).to(TRITON_DEVICE)[:, 1]  # stride 3
    _triton_vs_ref(wide[:, ::2], 8, MODES["deepseek_v3"], strided_bias)


def test_triton_float16_and_float64_logits():
    _triton_vs_ref(torch.randn(10, 32).half().to(TRITON_DEVICE), 4, MODES["mixtral"])
    w, _ = _triton_vs_ref(torch.randn(10, 32, dtype=torch.float64).to(TRITON_DEVICE), 4, MODES["qwen2"])
    assert w.dtype == torch.float64


def test_triton_large_num_experts():
    # E=512 (past DeepSeek's 256): one row per few-row tile, groups of 64.
    cfg = dict(MODES["deepseek_v3"])
    bias = _bias_for("deepseek_v3", 512, TRITON_DEVICE)
    _triton_vs_ref(torch.randn(5, 512).to(TRITON_DEVICE), 8, cfg, bias)


# ---------------------------------------------------------------------------------------------------
# Registration, autograd, argument checks.


OPCHECK_CASES = {
    "mixtral": (8, 2, dict(MODES["mixtral"])),
    "qwen2": (60, 4, dict(MODES["qwen2"])),
    "gpt_oss": (32, 4, dict(MODES["gpt_oss"])),
    "deepseek_v3": (64, 6, dict(MODES["deepseek_v3"])),
    "ernie": (16, 3, dict(MODES["ernie"])),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mode", list(OPCHECK_CASES))
def test_opcheck(mode, device):
    num_experts, k, cfg = OPCHECK_CASES[mode]
    logits = torch.randn(6, num_experts, device=device, requires_grad=True)
    bias = _bias_for(mode, num_experts, device)
    torch.library.opcheck(torch.ops.moe_ops.route.default, _ref_args(logits, k, correction_bias=bias, **cfg))


def _spread_logits(num_tokens, num_experts, step=0.37):
    # A random permutation of well-spaced values per row: no near-ties, so a finite-difference step
    # never changes the selection.
    perm = torch.stack([torch.randperm(num_experts) for _ in range(num_tokens)])
    return (perm.double() - num_experts / 2) * step


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mode", list(OPCHECK_CASES))
def test_backward_pairs_each_weight_with_the_forward_ids(mode, device):
    """bf16-like logits tie often; the order among tied ids is unspecified, so the gradient of the
    j-th weight must go to the logit of the j-th id the forward returned (a backward that re-selected
    could swap two tied experts' gradients)."""
    num_experts, k, cfg = OPCHECK_CASES[mode]
    torch.manual_seed(0)
    logits = (torch.randint(0, 3, (256, num_experts), device=device).float() * 0.5).requires_grad_(True)
    bias = None if mode not in BIASED_MODES else torch.zeros(num_experts, device=device)
    weights, ids = route(logits, k, correction_bias=bias, **cfg)
    grad_TK = torch.randn_like(weights)
    (got,) = torch.autograd.grad(weights, logits, grad_TK)
    leaf = logits.detach().requires_grad_(True)
    weight_args = (cfg.get("scoring", "softmax"), cfg.get("softmax_after_topk", False),
                   cfg.get("renormalize", False), cfg.get("renorm_eps", 0.0), cfg.get("routed_scaling_factor", 1.0),
                   cfg.get("renorm_min", 0.0))
    (want,) = torch.autograd.grad(routing.route_weights_ref(leaf, ids, *weight_args), leaf, grad_TK)
    torch.testing.assert_close(got, want)


def test_backward_op_uses_the_ids_it_is_given():
    logits = torch.randn(5, 8, dtype=torch.float64)
    ids = torch.topk(logits, 3).indices.flip(-1).to(torch.int32)  # not the order a top-k returns
    grad_TK = torch.randn(5, 3, dtype=torch.float64)
    got = torch.ops.moe_ops.route_backward(logits, ids, grad_TK, "softmax", False, True, 0.0, 2.0)
    leaf = logits.clone().requires_grad_(True)
    probs = torch.softmax(leaf, dim=-1).gather(1, ids.long())
    (want,) = torch.autograd.grad(2.0 * probs / probs.sum(-1, keepdim=True), leaf, grad_TK)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "mode,num_experts,k",
    [("mixtral", 8, 2), ("qwen2", 8, 3), ("gpt_oss", 16, 4), ("deepseek_v3", 16, 4), ("ernie", 8, 3)],
)
def test_gradcheck(mode, num_experts, k):
    cfg = dict(MODES[mode])
    bias = None
    if mode == "deepseek_v3":
        cfg.update(n_group=4, topk_group=2)
        bias = torch.arange(num_experts, dtype=torch.float64).flip(0) * 1e-3  # small, tie-free
    if mode == "ernie":
        cfg.update(renorm_min=0.9)  # above these rows' top-3 sums (~0.71): the clamp binds
    logits = _spread_logits(5, num_experts).requires_grad_(True)
    torch.autograd.gradcheck(lambda x: route(x, k, correction_bias=bias, **cfg)[0], (logits,))


def test_forward_mode_ad_is_refused():
    """torch.func.jvp through route: no forward formula (torch gave a zero tangent, silently)."""
    logits = _spread_logits(5, 8)
    with pytest.raises(NotImplementedError, match="route: forward-mode AD"):
        torch.func.jvp(lambda x: route(x, 2)[0], (logits,), (torch.ones_like(logits),))


def test_backward_matches_reference_autograd():
    logits = torch.randn(7, 16, requires_grad=True)
    grad_out = torch.randn(7, 4)
    w, _ = route(logits, 4, renormalize=True, routed_scaling_factor=1.5)
    (g,) = torch.autograd.grad(w, logits, grad_out)
    x = logits.detach().requires_grad_(True)
    w_ref, _ = route_ref(*_ref_args(x, 4, renormalize=True, routed_scaling_factor=1.5))
    (g_ref,) = torch.autograd.grad(w_ref, x, grad_out)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: route(torch.randn(4, 8), 9), ValueError, r"top_k: expected 1 <= top_k <= E=8, got 9"),
        (lambda: route(torch.randn(4, 8), 0), ValueError, r"top_k: expected an int >= 1, got 0"),
        (lambda: route(torch.randn(4, 8), 2.7), TypeError, r"top_k: expected an int, got 2.7"),
        (lambda: route(torch.randn(4, 8), True), TypeError, r"top_k: expected an int, got True"),
        (lambda: route(torch.randn(4, 8), 2, renorm_eps=-1), ValueError, r"renorm_eps: expected a finite number >= 0"),
        (lambda: route(torch.randn(4, 8), 2, renorm_eps=float("nan")), ValueError, r"renorm_eps: expected a finite"),
        (lambda: route(torch.randn(4, 8), 2, routed_scaling_factor=float("inf")), ValueError,
         r"routed_scaling_factor: expected a finite number"),
        (lambda: route(torch.randn(4, 8), 2, n_group=2.0), TypeError, r"n_group: expected an int"),
        (lambda: route(torch.randn(8), 2), ValueError, r"router_logits: expected a 2-D tensor"),
        (lambda: route(torch.randint(0, 3, (4, 8)), 2), TypeError, r"router_logits: expected dtype"),
        (lambda: route(torch.randn(4, 8), 2, scoring="relu"), ValueError, r"scoring: expected one of"),
        (lambda: route(torch.randn(4, 8), 2, scoring="sigmoid", softmax_after_topk=True),
         ValueError, r"softmax_after_topk: only valid with scoring='softmax'"),
        (lambda: route(torch.randn(4, 8), 2, correction_bias=torch.zeros(7)),
         ValueError, r"correction_bias: expected shape \(8\)"),
        (lambda: route(torch.randn(4, 8), 2, correction_bias=torch.zeros(8, dtype=torch.int64)),
         TypeError, r"correction_bias: expected dtype"),
        (lambda: route(torch.randn(4, 12), 2, n_group=5, topk_group=2),
         ValueError, r"n_group: expected a divisor"),
        (lambda: route(torch.randn(4, 8), 2, n_group=8, topk_group=2),
         ValueError, r"n_group: .*E/n_group >= 2"),
        (lambda: route(torch.randn(4, 8), 2, n_group=2, topk_group=3), ValueError, r"topk_group: expected"),
        (lambda: route(torch.randn(4, 16), 5, n_group=4, topk_group=1),
         ValueError, r"top_k: expected top_k <= topk_group"),
        (lambda: route(torch.randn(4, 8), 2, renorm_min=0.5), ValueError,
         r"renorm_min: shapes the renormalisation, which renormalize=False skips"),
        (lambda: route(torch.randn(4, 8), 2, renorm_eps=1e-20), ValueError,
         r"renorm_eps: shapes the renormalisation, which renormalize=False skips"),
        (lambda: route(torch.randn(4, 8), 2, renormalize=1), TypeError, r"renormalize: expected True or False, got 1"),
        (lambda: route(torch.randn(4, 8), 2, return_stats="no"), TypeError,
         r"return_stats: expected True or False, got 'no'"),
    ],
    ids=["k_gt_E", "k_zero", "k_float", "k_bool", "renorm_eps_negative", "renorm_eps_nan", "scale_inf",
         "n_group_float", "logits_1d", "logits_int", "scoring", "after_topk_sigmoid", "bias_shape",
         "bias_dtype", "group_not_divisor", "group_of_one", "topk_group_gt_n_group", "k_gt_kept",
         "renorm_min_without_renormalize", "renorm_eps_without_renormalize", "renormalize_int", "return_stats_str"],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w, ids = route(torch.empty(5, 64, dtype=torch.bfloat16), 6, **MODES["deepseek_v3"],
                       correction_bias=torch.empty(64))
    assert w.shape == ids.shape == (5, 6) and w.dtype == torch.float32 and ids.dtype == torch.int32


# ---------------------------------------------------------------------------------------------------
# GPU only.


def _tied_values(kind, shape, device):
    if kind == "signed_zeros":
        values = torch.zeros(shape, device=device)
        values[:, ::2] = -0.0
        values[:, 1::4] = 1.0
        return values
    values = _quantised(shape, levels=3).to(device)
    if kind == "nan":
        values[0::2, 3] = float("nan")
        values[1::4, :] = float("nan")
    return values


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["ties", "nan", "signed_zeros"])
@pytest.mark.parametrize("num_experts", [8, 60, 64, 128, 256])
def test_cuda_topk_rule_is_torchs(num_experts, kind):
    """The rule the kernel follows (_cuda_topk_rule) picks the experts CUDA's torch.topk picks."""
    for k in sorted({1, 2, 4, 8, num_experts // 2, num_experts - 1}):
        values = _tied_values(kind, (2048, num_experts), "cuda")
        for sorted_ in (True, False):
            top = torch.topk(values, k, dim=-1, sorted=sorted_)
            assert torch.equal(top.indices.sort(-1).values, _cuda_topk_rule(values, k).indices.sort(-1).values)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["ties", "nan", "bf16_randn"])
@pytest.mark.parametrize("num_experts,k", [(8, 2), (60, 4), (128, 8), (256, 8), (64, 32)])
def test_cuda_picks_torch_topk_experts(num_experts, k, kind, dtype):
    """The kernel picks, for every token, the experts the model code picks with torch.topk on the GPU."""
    shape = (4096, num_experts)
    logits = (torch.randn(shape, device="cuda") if kind == "bf16_randn" else _tied_values(kind, shape, "cuda"))
    logits = logits.to(dtype)
    for (weights, ids), (want_w, want_ids) in [
        (route(logits, k, renormalize=True), _mixtral_like(logits, k, True)),
        (route(logits, k, softmax_after_topk=True), _gpt_oss_like(logits, k)),
    ]:
        got_w, got_ids = _by_expert(weights, ids)
        want_w, want_ids = _by_expert(want_w, want_ids)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6, equal_nan=True)
    if num_experts % 8 == 0 and num_experts >= 16 and k <= num_experts // 2:
        bias = torch.zeros(num_experts, device="cuda")  # ties stay exact
        weights, ids = route(logits, k, **MODES["deepseek_v3"] | dict(correction_bias=bias))
        want_w, want_ids = _deepseek_v3_like(logits, k, bias, 8, 4, 2.5, 1e-20)
        assert torch.equal(_by_expert(weights, ids)[1], _by_expert(want_w, want_ids)[1])


@pytest.mark.cuda
@pytest.mark.parametrize(
    "name,num_experts,k,mode",
    [("mixtral", 8, 2, "mixtral"), ("qwen3", 128, 8, "mixtral"), ("deepseek_v3", 256, 8, "deepseek_v3"),
     ("gpt_oss", 32, 4, "gpt_oss")],
)
@pytest.mark.parametrize("num_tokens", [1, 5, 4096])  # decode tiles run on fewer warps
def test_cuda_real_shapes(name, num_experts, k, mode, num_tokens):
    logits = torch.randn(num_tokens, num_experts, device="cuda").to(torch.bfloat16)
    bias = _bias_for(mode, num_experts, "cuda")
    args = _ref_args(logits, k, correction_bias=bias, **MODES[mode])
    weights, ids = _by_expert(*torch.ops.moe_ops.route(*args))  # the Triton kernel
    want_w, want_ids = _by_expert(*route_ref(*args))  # torch on the same CUDA tensors
    assert torch.equal(ids, want_ids)
    assert_close_rel(weights, want_w, torch.float32, name)
    torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_autograd_through_kernel():
    logits = torch.randn(64, 32, device="cuda", requires_grad=True)
    w, _ = route(logits, 4, renormalize=True)
    w.square().sum().backward()
    x = logits.detach().requires_grad_(True)
    w_ref, _ = route_ref(*_ref_args(x, 4, renormalize=True))
    w_ref.square().sum().backward()
    torch.testing.assert_close(logits.grad, x.grad)


# ---------------------------------------------------------------------------------------------------
# Router statistics (route(..., return_stats=True)).


def test_stats_reference_is_an_independent_loop():
    """route_stats_ref against slots counted one by one and softmax written out in float64."""
    logits = torch.randn(9, 6)
    ids = torch.tensor([[0, 5], [5, 0], [1, 2], [2, 1], [3, 3], [4, 0], [0, 1], [5, 4], [2, 2]], dtype=torch.int32)
    counts, prob_sum = routing.route_stats_ref(logits, ids)
    want_counts = torch.tensor([float(sum(int(i) == e for i in ids.reshape(-1))) for e in range(6)])
    exps = logits.double().exp()
    want_prob_sum = (exps / exps.sum(-1, keepdim=True)).sum(0)
    assert torch.equal(counts, want_counts) and counts.dtype == torch.float32
    torch.testing.assert_close(prob_sum.double(), want_prob_sum, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("any_count", [False, True], ids=["fitted_tiles", "any_count_tiles"])
@pytest.mark.parametrize(
    "mode,num_tokens,num_experts,k",
    [("mixtral", 37, 8, 2), ("gpt_oss", 20, 32, 4), ("deepseek_v3", 33, 64, 6), ("qwen2", 1, 60, 4),
     ("qwen2", 0, 16, 2)],
)
def test_triton_stats_match_reference(mode, num_tokens, num_experts, k, any_count):
    """The kernel's statistics (per-program partial sums) against route_stats_ref of its own ids: counts
    exactly, probability sums to fp32 rounding; softmax over all E whatever the scoring."""
    from moe_ops.routing_triton import route_triton

    cfg = dict(MODES[mode])
    if mode == "deepseek_v3":
        cfg.update(n_group=8, topk_group=4)
    logits = torch.randn(num_tokens, num_experts).to(TRITON_DEVICE)
    args = _ref_args(logits, k, correction_bias=_bias_for(mode, num_experts, TRITON_DEVICE), **cfg)
    weights, ids, counts, prob_sum = route_triton(*args, any_count=any_count, with_stats=True)
    plain_weights, plain_ids = route_triton(*args, any_count=any_count)
    assert torch.equal(weights, plain_weights) and torch.equal(ids, plain_ids)
    want_counts, want_prob_sum = routing.route_stats_ref(logits, ids)
    assert counts.shape == prob_sum.shape == (num_experts,) and counts.dtype == prob_sum.dtype == torch.float32
    assert torch.equal(counts.cpu(), want_counts.cpu()) and int(counts.sum()) == num_tokens * k
    torch.testing.assert_close(prob_sum.cpu(), want_prob_sum.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mode", ["mixtral", "deepseek_v3", "ernie"])
def test_route_with_stats_opcheck(mode, device):
    num_experts, k, cfg = OPCHECK_CASES[mode]
    logits = torch.randn(6, num_experts, device=device, requires_grad=True)
    args = _ref_args(logits, k, correction_bias=_bias_for(mode, num_experts, device), **cfg)
    args = args[:10] + (args[10] if len(args) > 10 else 0.0,)
    torch.library.opcheck(torch.ops.moe_ops.route_with_stats.default, args)


def test_stats_gradcheck_and_route_unchanged():
    """The probability sums' gradient (float64 gradcheck, together with the weights'), and the weights
    and ids are route()'s."""
    logits = _spread_logits(5, 8).requires_grad_(True)
    cfg = dict(renormalize=True, routed_scaling_factor=1.5)

    def outputs(x):
        weights, _, stats = route(x, 3, return_stats=True, **cfg)
        return weights, stats.router_prob_sum

    torch.autograd.gradcheck(outputs, (logits,))
    weights, ids, stats = route(logits, 3, return_stats=True, **cfg)
    plain_weights, plain_ids = route(logits, 3, **cfg)
    assert torch.equal(weights, plain_weights) and torch.equal(ids, plain_ids)
    assert not stats.tokens_per_expert.requires_grad and stats.num_tokens == 5


def test_stats_compile_without_graph_breaks():
    logits = torch.randn(24, 16, requires_grad=True)

    def balancing(x):
        _, _, stats = route(x, 4, return_stats=True, renormalize=True)
        return moe_ops.load_balancing_loss_from_stats(stats), stats.tokens_per_expert

    torch._dynamo.reset()
    got_loss, got_counts = torch.compile(balancing, fullgraph=True)(logits)
    want_loss, want_counts = balancing(logits)
    torch.testing.assert_close(got_loss, want_loss)
    assert torch.equal(got_counts, want_counts)


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.bfloat16], ids=str)
def test_stats_under_another_default_dtype(default_dtype):
    """torch.set_default_dtype(float64 / bfloat16) with fp32 logits: tokens_per_expert stays fp32 (the counts'
    index_add took a default-dtype source and raised)."""
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    _, ids, want = route(logits, 2, return_stats=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        _, got_ids, got = route(logits, 2, return_stats=True)
    finally:
        torch.set_default_dtype(previous)
    assert got.tokens_per_expert.dtype == torch.float32 and torch.equal(got.tokens_per_expert, want.tokens_per_expert)
    assert torch.equal(got_ids, ids) and int(got.tokens_per_expert.sum()) == 12


def test_module_docstrings():
    assert "Args:" in route.__doc__ and "Returns:" in route.__doc__
    assert routing.route_ref.__doc__


# ---- Router jitter ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_router_jitter_scales_each_element_within_eps(dtype):
    x = (torch.rand(512, 64) + 0.5).to(dtype).requires_grad_(True)
    torch.manual_seed(1)
    out = routing.router_jitter(x, 0.1)
    factor = out.detach().float() / x.detach().float()
    slack = 1e-2 if dtype == torch.bfloat16 else 1e-6  # the product's rounding
    assert factor.min() >= 0.9 - slack and factor.max() <= 1.1 + slack
    assert abs(factor.mean().item() - 1.0) < 5e-3 and factor.std().item() > 0.05  # ~0.1/sqrt(3)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    torch.testing.assert_close(grad.float(), factor, rtol=2e-2, atol=0)  # d(x u)/dx = u
    torch.manual_seed(1)
    torch.testing.assert_close(routing.router_jitter(x, 0.1), out)  # torch's generator: seeded, repeated


def test_router_jitter_is_unbiased_in_bf16():
    """u is drawn in fp32 and the product rounded once: in bf16 the factor's mean is 1 (drawn in bf16, u
    took only 0.988, 0.992, 0.996 and 1 at eps = 0.01, and the mean factor was 0.994)."""
    x = torch.randn(512, 64).to(torch.bfloat16)
    factor = routing.router_jitter(x, 0.01).double() / x.double()
    assert abs(factor.mean().item() - 1.0) < 1e-3
    assert (factor > 1.0).float().mean() > 0.3  # factors above 1 as often as below


def test_router_jitter_off_and_bad_input():
    x = torch.randn(4, 8)
    assert routing.router_jitter(x, 0.0) is x
    with pytest.raises(ValueError, match=r"eps: expected 0 <= eps < 1"):
        routing.router_jitter(x, 1.0)
    with pytest.raises(ValueError, match=r"eps: expected a finite number >= 0.0, got -0.1"):
        routing.router_jitter(x, -0.1)
    with pytest.raises(TypeError, match=r"router_input: expected dtype in"):
        routing.router_jitter(torch.ones(3, dtype=torch.int64), 0.1)


def test_router_jitter_compiles():
    x = torch.rand(64, 32) + 1.0
    out = torch.compile(lambda t: routing.router_jitter(t, 0.05), fullgraph=True, backend="inductor")(x)
    factor = out / x
    assert factor.min() >= 0.95 - 1e-6 and factor.max() <= 1.05 + 1e-6 and factor.std() > 0.01


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic_true", "automatic"])
def test_compiles_with_dynamic_shapes(dynamic):
    """route (and its statistics) inside torch.compile(dynamic=True, fullgraph=True): its float arguments
    are SymFloats there, which the argument checks must take (math.isfinite cannot)."""
    logits = torch.randn(9, 8)

    def routed(x):
        weights, ids, stats = route(x, 2, renormalize=True, renorm_eps=1e-20, routed_scaling_factor=2.5,
                                    return_stats=True)
        return weights, ids, stats.router_prob_sum

    torch._dynamo.reset()
    got = torch.compile(routed, dynamic=dynamic, fullgraph=True)(logits)
    for g, w in zip(got, routed(logits), strict=True):
        torch.testing.assert_close(g, w)
