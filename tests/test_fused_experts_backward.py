"""The backward of moe_ops::fused_experts on the GPU path (fused_experts_backward_triton and the
expert weight-gradient kernel) against autograd through fused_experts_ref: layouts, activations,
biases, capacity, sentinel ids, edge shapes; CUDA: real shapes, CUDA-graph capture, autograd."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import TOLERANCE, TRITON_DEVICE, assert_close_rel, eager_and_captured, zipf_ids
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import moe_ops.fused_experts_backward_triton as backward_module
from moe_ops._compat.matmul import grouped_mm
from moe_ops.fused_experts import fused_experts, fused_experts_ref, fused_experts_training_triton
from moe_ops.fused_experts_backward_triton import fused_experts_backward_triton
from moe_ops.layout import PackedSchedule
from moe_ops.schedule import block_schedule_ref
from moe_ops.schedule_triton import block_schedule_triton
from moe_ops.tiles import choose_block_m

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NAMES = ("x", "topk_weights", "w_gate_up", "w_down", "w_up", "b_gate_up", "b_up", "b_down")
# The backward's GEMMs round each product to x's dtype where the reference's fp32 loop rounds only the
# pre-activations and the activation; the small shapes here (few rows per expert, no averaging) measured up to
# 2.4e-2 of max |gradient| in bf16.
BACKWARD_TOLERANCE = {**TOLERANCE, torch.bfloat16: 3e-2}


def make_args(T, K, E, H, Fi, dtype, device, *, layout="EFH", interleaved=False, activation="silu", gated=True,
              separate_up=False, biases=False, capacity_factor=0.0, drop_policy="position", sentinels=False,
              column_major_weights=False):
    """The op's positional arguments for a random layer in the given form."""
    gen = torch.Generator().manual_seed(T * 7 + E)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = randn(T, H).to(dtype)
    weights, ids = torch.topk(randn(T, E).softmax(-1), K)
    if sentinels and T:
        ids[0, 0] = E  # an expert-parallel sentinel: skipped by the op, zero gradient
    if column_major_weights:  # routing weights laid out (K, T): their gradient must be too
        weights = weights.t().contiguous().t()
    f2 = 2 * Fi if gated and not separate_up else Fi
    w_gate_up, w_down = randn(E, f2, H) / H**0.5, randn(E, H, Fi) / Fi**0.5
    w_up = randn(E, Fi, H) / H**0.5 if separate_up else None
    if layout == "EHF":  # stored transposed, as torchtitan and GPT-OSS do
        w_gate_up, w_down = w_gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
        w_up = None if w_up is None else w_up.transpose(1, 2).contiguous()
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    b_gate_up = randn(E, f2) if biases else None
    b_up = randn(E, Fi) if biases and separate_up else None
    b_down = randn(E, H) if biases else None
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (cast(x), on(weights), on(ids.to(torch.int32)), cast(w_gate_up), cast(w_down), cast(w_up),
            on(b_gate_up), on(b_up), on(b_down), layout, interleaved, activation, gated, 1.702, 7.0,
            capacity_factor, drop_policy)


def reference_grads(args, grad_TH):
    """Autograd through the plain-PyTorch reference (what the op's backward must equal)."""
    tensors = list(args[:9])
    wrt = [i for i, t in enumerate(tensors) if t is not None and t.is_floating_point()]
    for i in wrt:
        tensors[i] = tensors[i].detach().requires_grad_(True)
    with torch.enable_grad():
        out = fused_experts_ref(*tensors, *args[9:])
        if not out.requires_grad:  # no slot reached an expert (T = 0): every gradient is zero
            return [None] * 8
        got = torch.autograd.grad(out, [tensors[i] for i in wrt], grad_TH, allow_unused=True)
    by_index = dict(zip(wrt, got, strict=True))
    return [by_index.get(i) for i in (0, 1, 3, 4, 5, 6, 7, 8)]


def check(args, dtype, saved=(), schedule=None):
    grad_TH = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(3)).to(args[0])
    got = fused_experts_backward_triton(*args, [grad_TH, torch.empty(0)], saved=saved, schedule=schedule)
    want = reference_grads(args, grad_TH)
    inputs = [args[i] for i in (0, 1, 3, 4, 5, 6, 7, 8)]
    for name, value, actual, expected in zip(NAMES, inputs, got, want, strict=True):
        if value is None:
            assert actual.numel() == 0, name
            continue
        # Laid out as the fake kernel says (empty_like), in the argument's dtype.
        assert actual.shape == value.shape and actual.dtype == value.dtype, name
        assert actual.stride() == torch.empty_like(value).stride(), name
        assert_close_rel(actual, torch.zeros_like(value) if expected is None else expected, dtype, name,
                         BACKWARD_TOLERANCE)


SHAPES = [
    # (T, K, E, H, F)
    pytest.param(1, 2, 4, 32, 48, id="T=1"),
    pytest.param(9, 2, 4, 32, 48, id="T<block_m"),
    pytest.param(11, 3, 5, 40, 24, id="non-pow2-H-and-F"),
    pytest.param(70, 2, 8, 32, 32, id="block_m=32"),
    pytest.param(3, 8, 64, 32, 16, id="E>>S"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,E,H,Fi", SHAPES)
def test_matches_reference(T, K, E, H, Fi, dtype):
    check(make_args(T, K, E, H, Fi, dtype, TRITON_DEVICE), dtype)


FORMS = {
    "EHF": dict(layout="EHF"),
    "gpt_oss": dict(layout="EHF", interleaved=True, activation="clamped_swiglu", biases=True),
    "clamped_silu": dict(activation="clamped_silu"),
    "w1_w3_biases": dict(separate_up=True, biases=True),
    "ungated_gelu": dict(gated=False, activation="gelu"),
    "ungated_none": dict(gated=False, activation="none"),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "ungated_relu2": dict(gated=False, activation="relu2"),
    "relu_biases": dict(activation="relu", biases=True),
    "capacity_drops": dict(capacity_factor=0.5),
    "capacity_gshard_order": dict(capacity_factor=0.5, drop_policy="gshard"),
    "capacity_score_order": dict(capacity_factor=0.5, drop_policy="score"),
    "sentinel_ids": dict(sentinels=True),
    "column_major_routing_weights": dict(column_major_weights=True),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_forms(form):
    check(make_args(13, 2, 4, 32, 16, torch.float32, TRITON_DEVICE, **FORMS[form]), torch.float32)


@pytest.mark.parametrize("side", ["gate", "up", "up_below"])
@pytest.mark.parametrize("activation", ["clamped_swiglu", "clamped_silu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_preactivations_that_round_onto_the_clamp_limit(side, activation, dtype):
    """Pre-activations past the limit in fp32 by a quarter of an ulp of x's dtype round onto it: the backward
    holds them rounded and so does the reference, so both pass the clamp's gradient there (the reference
    clamped fp32 ones before: gradients of every form here were up to 0.45 apart)."""
    args = list(make_args(6, 2, 4, 32, 16, dtype, TRITON_DEVICE, activation=activation, biases=True))
    args[3] = args[3] * 1e-4  # small products: each pre-activation is its bias to within ~1e-4
    ulp_at_7 = torch.finfo(dtype).eps * 4  # 7 is in [2^2, 2^3): four times the spacing at 1
    past = (7.0 + ulp_at_7 / 4) * (-1 if side == "up_below" else 1)
    features = slice(0, 16) if side == "gate" else slice(16, 32)  # gate and up halves ("EFH", not interleaved)
    args[6][:, features] = past
    check(tuple(args), dtype)


def test_relu_passes_the_gradient_at_a_nan_preactivation():
    """torch's relu backward zeroes the gradient where the value is <= 0, which a NaN is not: the kernel's slope
    there is 1 (it was 0: the weight and bias gradients of a NaN feature came out zero)."""
    args = list(make_args(4, 1, 4, 32, 16, torch.float32, TRITON_DEVICE, activation="relu", gated=False, biases=True))
    args[6][:, 0] = float("nan")  # feature 0's pre-activation is NaN in every row
    grad_TH = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(3)).to(args[0])
    got = fused_experts_backward_triton(*args, [grad_TH, torch.empty(0)])
    want = reference_grads(args, grad_TH)
    for name in ("w_gate_up", "b_gate_up"):  # finite on both sides: the NaN reaches y, not these
        i = NAMES.index(name)
        assert torch.isfinite(want[i]).all() and want[i][:, 0].abs().sum() > 0, name
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("config", [(32, 128, 4), (16, 32, 4), (4, 64, 2)], ids=["m32_f128", "m16_f32", "m4_f64"])
def test_activation_gradient_kernel_configs_agree(config, gated):
    """The activation-gradient kernel with other tiles (a sweep's configs): the elementwise outputs are the
    default's bit for bit (the same operations on each element), and each row's routing-weight gradient (fp32
    sums in another order) is sum_f h g of the activation as rounded, zero for rows of no routed slot."""
    P, F, S = 37, 200, 30  # F: six 32-wide blocks and a tail of 8; rows of slot S are no routed slot's
    generator = torch.Generator().manual_seed(5)
    gate_up = torch.randn(P, 2 * F if gated else F, generator=generator).to(torch.bfloat16).to(TRITON_DEVICE)
    g_PF = torch.randn(P, F, generator=generator).to(torch.bfloat16).to(TRITON_DEVICE)
    slot_weights = torch.rand(S, generator=generator).to(TRITON_DEVICE)
    sorted_slots = torch.randperm(P, generator=generator).clamp(max=S).to(torch.int32).to(TRITON_DEVICE)
    outputs = []
    for chosen in (None, config):
        gate, up = (gate_up[:, :F], gate_up[:, F:]) if gated else (gate_up, None)
        h, d_gate = torch.empty_like(g_PF), torch.empty_like(g_PF)
        d_up = torch.empty_like(g_PF) if gated else None
        d_weight = backward_module.activation_grad_triton(gate, up, g_PF, slot_weights, sorted_slots, h, d_gate,
                                                          d_up, "silu", 1.702, 7.0, config=chosen)
        outputs.append((h, d_gate, d_up, d_weight))
    for name, one, split in zip(("h", "d_gate", "d_up"), outputs[0], outputs[1], strict=False):
        if one is not None:
            assert torch.equal(one, split), name
    routed = sorted_slots.long() < S
    acted = torch.nn.functional.silu(gate_up[:, :F].float())
    h_rounded = (acted * gate_up[:, F:].float() if gated else acted).to(torch.bfloat16).double()
    products = h_rounded * g_PF.double()
    want = torch.where(routed, products.sum(1), 0.0)
    assert (outputs[1][3][~routed] == 0).all()
    # The kernel's activation and torch's may round an element to neighbouring bf16 values: one ulp (2^-8
    # relative) of each term at most.
    assert ((outputs[1][3].double() - want).abs() <= 2**-8 * products.abs().sum(1) + 1e-5).all()
    torch.testing.assert_close(outputs[1][3], outputs[0][3], rtol=1e-5, atol=1e-5)


def test_inference_tensor_inputs_when_only_the_routing_trains():
    """Tokens and expert weights made under torch.inference_mode (frozen experts), only the routing weights
    trained: autograd cannot save inference tensors, so the op saves copies, and the routing weights' gradient
    is the reference's (it was refused: 'Inference tensors cannot be saved for backward')."""
    T, H, Fi, E, K = 6, 8, 4, 4, 2
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(T, H, generator=generator)
        w_gate_up, w_down = torch.randn(E, 2 * Fi, H, generator=generator), torch.randn(E, H, Fi, generator=generator)
    ids = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(T)])
    grads = []
    for op in (fused_experts_ref, fused_experts):
        weights = torch.rand(T, K, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        op(x, weights, ids, w_gate_up, w_down).pow(2).sum().backward()
        grads.append(weights.grad)
    assert_close_rel(grads[1], grads[0], torch.float32, "routing weights' gradient")


def test_zero_tokens():
    check(make_args(0, 2, 4, 32, 16, torch.float32, TRITON_DEVICE), torch.float32)


@pytest.mark.parametrize("form", ["EFH", "EHF", "gpt_oss", "w1_w3_biases", "ungated_gelu", "capacity_drops",
                                  "sentinel_ids", "E>>S", "H=40"])
def test_weight_grads_through_torchs_grouped_gemm(form, monkeypatch):
    """Where torch's grouped GEMM runs natively (bf16 on sm90/sm100) the backward's GEMMs and its weight
    gradients go through it over x's and g's rows copied into schedule order, dx summed per token from
    its rows; forced here on any device (its CPU kernel computes the same), the gradients
    match the reference in every layout, an expert with no rows giving zeros."""
    calls = []

    def counted(*args):
        calls.append(args[2].shape)
        return grouped_mm(*args)

    monkeypatch.setattr(backward_module, "native_grouped_mm", lambda device, dtype: True)
    monkeypatch.setattr(backward_module, "grouped_mm", counted)
    # H = 40: dx's column halves are 16 and 24 columns wide (each starting 16-byte aligned).
    shape = {"E>>S": (3, 8, 64, 32, 16), "H=40": (13, 2, 4, 40, 16)}.get(form, (13, 2, 4, 32, 16))
    options = FORMS.get(form, {})
    check(make_args(*shape[:2], shape[2], shape[3], shape[4], torch.bfloat16, TRITON_DEVICE, **options),
          torch.bfloat16)
    # One per weight gradient and per GEMM over schedule rows without a bias to add (recomputed
    # pre-activations, g W_d), two per dx part (one per half of dx's columns, each of H / 2 columns):
    # gpt_oss keeps its biased pre-activation GEMM on the expert GEMM; w1_w3_biases has three weights and
    # two dx parts (its pre-activation GEMMs are biased). Bias gradients stay fp32 sums of the Triton kernel.
    assert len(calls) == {"w1_w3_biases": 8, "gpt_oss": 5}.get(form, 6)


@pytest.mark.parametrize("width,element_size,want", [
    (32, 2, [(0, 16), (16, 32)]), (40, 2, [(0, 16), (16, 40)]), (8, 2, [(0, 8)]), (24, 4, [(0, 12), (12, 24)]),
    (4, 4, [(0, 4)]),
], ids=["even", "unaligned_middle", "too_narrow", "fp32", "fp32_too_narrow"])
def test_column_halves_start_aligned(width, element_size, want):
    halves = backward_module.column_halves(width, element_size)
    assert [(c.start, c.stop) for c in halves] == want
    assert all(c.start * element_size % 16 == 0 for c in halves)


TRAINING_FORMS = ["EFH", "EHF", "w1_w3", "ungated_gelu", "capacity_drops", "sentinel_ids", "E>>S", "T=1", "k=E",
                  "one_expert"]
# (T, K, E, H, F) of the training-variant forms whose shape is the point; the others use (13, 2, 4, 32, 16).
TRAINING_SHAPES = {"E>>S": (3, 8, 64, 32, 16), "T=1": (1, 2, 4, 32, 16), "k=E": (6, 4, 4, 32, 16),
                   "one_expert": (13, 1, 4, 32, 16)}


@pytest.mark.parametrize("form", TRAINING_FORMS)
def test_training_variant_keeps_preactivations_and_its_backward_reads_them(form, monkeypatch):
    """moe_ops::fused_experts_training's CUDA path where torch's grouped GEMM runs natively (forced here on
    any device): the output is fused_experts' (the reference's), the kept pre-activations are each
    routed slot's x W^T in the packed schedule's order, the kept schedule is the reference's (capacity
    applied), and the backward reading them instead of recomputing gives the reference's gradients."""
    monkeypatch.setattr(backward_module, "native_grouped_mm", lambda device, dtype: True)
    options = {"EHF": dict(layout="EHF"), "w1_w3": dict(separate_up=True), "ungated_gelu": FORMS["ungated_gelu"],
               "capacity_drops": FORMS["capacity_drops"], "sentinel_ids": FORMS["sentinel_ids"]}.get(form, {})
    args = make_args(*TRAINING_SHAPES.get(form, (13, 2, 4, 32, 16)), torch.bfloat16, TRITON_DEVICE, **options)
    if form == "one_expert":  # every token to expert 2: the other experts' groups are empty
        args = (*args[:2], torch.full_like(args[2], 2), *args[3:])
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up = args[:6]
    out, num_dropped, kept, kept_up, sorted_slots, expert_offsets = fused_experts_training_triton(*args)
    want, want_dropped = fused_experts_ref(*args, return_num_dropped=True)
    assert_close_rel(out, want, torch.bfloat16, "out")
    assert int(num_dropped) == int(want_dropped)

    ids = topk_ids
    if args[15] > 0:  # the capacity the forward applied
        from moe_ops.capacity import apply_capacity_ref
        from moe_ops.layout import capacity_from_factor
        capacity = capacity_from_factor(args[15], *topk_ids.shape, w_gate_up.shape[0])
        ids = apply_capacity_ref(topk_ids.cpu(), topk_weights.cpu(), w_gate_up.shape[0], capacity, args[16])[0]
    schedule = block_schedule_ref(ids.cpu(), w_gate_up.shape[0], 1)
    assert torch.equal(sorted_slots.cpu(), schedule.sorted_slots)
    assert torch.equal(expert_offsets.cpu(), schedule.expert_offsets)
    slots = schedule.sorted_slots.long()
    routed = slots < topk_ids.numel()
    slot = slots[routed]
    expert = ids.cpu().reshape(-1).long()[slot]
    rows = x.cpu().float()[slot // topk_ids.shape[1]]
    for got, weight in ((kept, w_gate_up), (kept_up, w_up)):
        if weight is None:
            assert got.numel() == 0
            continue
        w_ENK = weight.cpu().float() if args[9] == "EFH" else weight.cpu().float().transpose(1, 2)
        want_rows = torch.einsum("sk,snk->sn", rows, w_ENK[expert])
        assert got.shape == (topk_ids.numel(), w_ENK.shape[1])
        assert_close_rel(got.cpu()[routed], want_rows, torch.bfloat16, "kept pre-activations")
    check(args, torch.bfloat16, saved=[kept] if kept_up.numel() == 0 else [kept, kept_up],
          schedule=PackedSchedule(sorted_slots, expert_offsets))


def test_training_variant_keeps_nothing_where_it_would_not_pay(monkeypatch):
    """Biased experts (the grouped GEMM adds no bias) and devices without a native grouped GEMM: the
    training variant is fused_experts plus four empty tensors, and its backward recomputes."""
    monkeypatch.setattr(backward_module, "native_grouped_mm", lambda device, dtype: True)
    args = make_args(13, 2, 4, 32, 16, torch.bfloat16, TRITON_DEVICE, **FORMS["gpt_oss"])
    out, _, *kept = fused_experts_training_triton(*args)
    assert [t.numel() for t in kept] == [0, 0, 0, 0]
    assert_close_rel(out, fused_experts_ref(*args), torch.bfloat16, "out")


def test_training_op_autograd_matches_the_reference():
    """Autograd through torch.ops.moe_ops.fused_experts_training (what training graphs call) gives the
    reference's gradients; the kept tensors take no gradient."""
    args = make_args(13, 2, 4, 32, 16, torch.float32, "cpu", separate_up=True)
    leaves = [t.detach().requires_grad_(True) if t is not None and t.is_floating_point() else t for t in args[:9]]
    out = torch.ops.moe_ops.fused_experts_training(*leaves, *args[9:])[0]
    grad_TH = torch.randn_like(out)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, wrt, grad_TH)
    want = [g for g in reference_grads(args, grad_TH) if g is not None]
    for actual, expected in zip(got, want, strict=True):
        assert_close_rel(actual, expected, torch.float32, "gradient", BACKWARD_TOLERANCE)


class PeakNewBytes(TorchDispatchMode):
    """The most bytes of storage that ops run under it had allocated and not yet freed at once (storages
    that an op's inputs already held are not new). Under Triton's interpreter its copies of kernel
    arguments (``aten.set_``) are not counted: a GPU launch makes none."""

    def __init__(self):
        super().__init__()
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = tree_flatten((args, kwargs))[0]
        held = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.set_:
            return out
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.refs:
                if key in held:
                    continue
                self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                self.live += self.sizes[key]
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


@pytest.mark.parametrize("weight_grads", ["triton", "grouped_mm"])
def test_backward_keeps_3f_values_per_schedule_row(weight_grads, monkeypatch):
    """The backward's buffers beyond its results: per schedule row the recomputed pre-activations (2F, later
    their gradients in place) and g W_d (F, later the activation in place) in x's dtype, then either the
    slot-order dx (S x H) and its fp32 sum (T x H) or, for torch's grouped GEMM, x's and g's rows
    copied into schedule order (2 x positions x H); nothing of P x 2F in fp32."""
    if weight_grads == "grouped_mm":
        monkeypatch.setattr(backward_module, "native_grouped_mm", lambda device, dtype: True)
    T, K, E, H, Fi = 64, 2, 4, 64, 224
    args = make_args(T, K, E, H, Fi, torch.bfloat16, TRITON_DEVICE)
    grad_TH = torch.randn(T, H).to(args[0])
    S = T * K
    rows = block_schedule_triton(args[2], E, choose_block_m(S, E))[0].shape[0]
    with PeakNewBytes() as tracker:
        grads = fused_experts_backward_triton(*args, [grad_TH, torch.empty(0)])
        results = sum(g.untyped_storage().nbytes() for g in grads)
    itemsize = args[0].element_size()
    # Per-row and per-slot vectors (slots, validity, routing-weight gradients) are bounded by 64 bytes a row.
    schedule_copies = 2 * rows * H * itemsize if weight_grads == "grouped_mm" else 0
    bound = rows * (3 * Fi * itemsize + 64) + max(S * H * itemsize + T * H * 4, schedule_copies)
    assert tracker.peak - results <= bound, (tracker.peak - results, bound)


def _peak_beyond_results_on_kept(T, K, E, H, Fi, monkeypatch):
    """(peak new bytes beyond the results, schedule positions) of the backward on torch's grouped GEMM
    (forced) reading the pre-activations that the training variant kept (bf16)."""
    monkeypatch.setattr(backward_module, "native_grouped_mm", lambda device, dtype: True)
    args = make_args(T, K, E, H, Fi, torch.bfloat16, TRITON_DEVICE)
    _, _, kept, _, sorted_slots, expert_offsets = fused_experts_training_triton(*args)
    grad_TH = torch.randn(T, H).to(args[0])
    with PeakNewBytes() as tracker:
        grads = fused_experts_backward_triton(*args, [grad_TH, torch.empty(0)], saved=[kept],
                                              schedule=PackedSchedule(sorted_slots, expert_offsets))
        results = sum(g.untyped_storage().nbytes() for g in grads)
    return tracker.peak - results, sorted_slots.shape[0]


def test_backward_on_kept_preactivations_holds_one_row_copy_at_a_time(monkeypatch):
    """With the pre-activations kept (the training variant on torch's grouped GEMM), x's rows in schedule
    order are read only by the gate/up weight gradient: they are copied after g's rows are freed, so beyond
    its results the backward holds at most one (positions x H) copy and g W_d (positions x F) at once, the
    per-row vectors included. (K = 4 makes the two row copies outweigh the gradients; holding both would
    exceed the bound by g's copy.)"""
    H, Fi = 256, 16
    excess, positions = _peak_beyond_results_on_kept(64, 4, 4, H, Fi, monkeypatch)
    assert excess <= positions * (H + Fi) * 2, (excess, positions)


def test_backward_makes_dx_rows_for_half_its_columns_at_a_time(monkeypatch):
    """On torch's grouped GEMM with the pre-activations kept, the backward's peak is its dx step: every
    weight gradient is made by then, and dx's per-row products are made for one half of its columns at a
    time, so beyond its results it holds (positions x H/2) values, the per-row vectors included. (Weights
    far larger than the rows make that step the peak; all of dx's columns at once would exceed the bound by
    another half.)"""
    H = 256
    excess, positions = _peak_beyond_results_on_kept(16, 2, 8, H, 64, monkeypatch)
    assert excess <= positions * (H // 2 * 2 + 64), (excess, positions)


# ---- CUDA only ----


@pytest.mark.cuda
@pytest.mark.parametrize("E,K,H,Fi,T", [(8, 2, 1024, 1792, 512), (128, 8, 2048, 768, 256), (64, 6, 1024, 512, 1)],
                         ids=["mixtral_quarter", "qwen3_30b_a3b", "decode"])
def test_cuda_real_shapes(E, K, H, Fi, T):
    check(make_args(T, K, E, H, Fi, torch.bfloat16, "cuda"), torch.bfloat16)


@pytest.mark.cuda
def test_cuda_autograd_uses_the_kernel_and_captures():
    """Autograd through the op on CUDA runs this backward; it has no host sync, so it captures."""
    args = make_args(64, 2, 8, 256, 128, torch.bfloat16, "cuda", biases=True)
    leaves = [t.detach().requires_grad_(True) if t is not None and t.is_floating_point() else t for t in args[:9]]
    names = ("w_up", "b_gate_up", "b_up", "b_down")
    options = dict(zip(names, leaves[5:9], strict=True))
    grad_TH = torch.randn_like(args[0])

    def step():
        out = fused_experts(*leaves[:5], **options)
        return torch.autograd.grad(out, [leaves[0], leaves[3], leaves[4]], grad_TH)

    eager, captured = eager_and_captured(step)
    for name, a, b in zip(("x", "w_gate_up", "w_down"), captured, eager, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.cuda
@pytest.mark.parametrize("biases", [False, True], ids=["no_bias", "biases"])
def test_cuda_gradients_identical_run_to_run(biases):
    """Deterministic by default: no atomics anywhere in the backward (bias gradients included), so
    every gradient is the same bit for bit on every run, with skewed routing that crowds experts."""
    args = list(make_args(2048, 4, 32, 512, 256, torch.bfloat16, "cuda", biases=biases, layout="EHF"))
    args[2] = zipf_ids(2048, 4, 32, device="cuda")
    grad_TH = torch.randn_like(args[0])
    first = fused_experts_backward_triton(*args, [grad_TH])
    for _ in range(3):
        again = fused_experts_backward_triton(*args, [grad_TH])
        for name, a, b in zip(NAMES, first, again, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.cuda
@pytest.mark.whole_gpu
@pytest.mark.parametrize(
    "T,K,E,H,Fi",
    [(40000, 8, 16, 7168, 256),  # T*K*H = 2.29e9 > 2**31 (DeepSeek-V3's H, 320k slots)
     (350000, 8, 16, 2048, 768)],  # T*K*F = 2.15e9 > 2**31 (Qwen3-30B-A3B's H and F)
    ids=["TKH_past_2^31", "TKF_past_2^31"],
)
def test_cuda_offsets_past_int32(T, K, E, H, Fi):
    """Element offsets past 2**31 in the slot-order tensors, forward and backward. The output gradient is
    zero except on the last tokens (whose slot rows lie past the boundary), so every gradient, the
    weights' included, is the reference's over those tokens alone."""
    torch.manual_seed(0)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_gate_up = (torch.randn(E, 2 * Fi, H, device="cuda") / H**0.5).bfloat16().requires_grad_(True)
    w_down = (torch.randn(E, H, Fi, device="cuda") / Fi**0.5).bfloat16().requires_grad_(True)
    weights = torch.rand(T, K, device="cuda").softmax(-1).requires_grad_(True)
    ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :K].int()
    out = fused_experts(x, weights, ids, w_gate_up, w_down)
    tail = slice(T - 256, T)
    grad_TH = torch.zeros_like(out)
    grad_TH[tail] = torch.randn(256, H, device="cuda", dtype=out.dtype)
    got = torch.autograd.grad(out, (x, weights, w_gate_up, w_down), grad_TH)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got)
    assert (got[0][: T - 256] == 0).all()
    leaves = [t.detach()[tail].clone().requires_grad_(True) for t in (x, weights)]
    leaves += [t.detach().clone().requires_grad_(True) for t in (w_gate_up, w_down)]
    want = fused_experts_ref(leaves[0], leaves[1], ids[tail], leaves[2], leaves[3])
    assert_close_rel(out[tail], want, torch.bfloat16, "output past 2**31")
    want_grads = torch.autograd.grad(want, leaves, grad_TH[tail])
    for name, g, w in zip(("dx", "d_weights", "dw_gate_up", "dw_down"), (got[0][tail], got[1][tail], *got[2:]),
                          want_grads, strict=True):
        assert_close_rel(g, w, torch.bfloat16, f"{name} past 2**31")
