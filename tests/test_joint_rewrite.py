"""Training graphs (lowering/graph/joint_rewrite.py): the rewrites run on AOTAutograd's joint graph, so the
forward calls the moe_ops ops and the backward is their autograd formulas; gradients equal eager's.

Each form's own test module checks its models in training (``test_training_*``); this one checks the
mechanism: the graphs it leaves, where it steps aside, the switch, dynamic token counts,
and (CUDA) a real-sized block on the GPU.
"""

from __future__ import annotations

import functools
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from compile_harness import (  # noqa: F401
    calls_experts_backward,
    check_training,
    fresh_compile_state,
    training_rewrites,
    training_step,
)
from conftest import TRITON_DEVICE, assert_close_rel
from expecttest import assert_expected_inline
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import moe_ops
from moe_ops._compat.matmul import native_grouped_mm
from moe_ops.lowering.graph import joint_rewrite

pytestmark = pytest.mark.usefixtures("fresh_compile_state", "training_rewrites")

H, F_, E, K = 64, 32, 8, 2


class GroupedMoE(nn.Module):
    """torchtitan-style routed experts (router, stable argsort, ``_grouped_mm`` on w1/w3/w2, scatter_add)."""

    def __init__(self, activation=lambda gate, up: F.silu(gate) * up, detach_weights: bool = False):
        super().__init__()
        self.detach_weights = detach_weights
        self.gate = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, F_, H) / H**0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, F_) / F_**0.5)
        self.w3 = nn.Parameter(torch.randn(E, F_, H) / H**0.5)
        self.activation = activation
        self.to(torch.bfloat16)

    def experts(self, x_TH):
        scores_TE = F.softmax(self.gate(x_TH).float(), dim=-1)
        weights_TK, ids_TK = torch.topk(scores_TE, K, dim=-1)
        if self.detach_weights:
            weights_TK = weights_TK.detach()
        order_S = torch.argsort(ids_TK.view(-1), stable=True)
        counts_E = torch.histc(ids_TK.view(-1).float(), bins=E, min=0, max=E - 1)
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        token_S = order_S // K
        x_SH = x_TH[token_S]
        gate = torch._grouped_mm(x_SH, self.w1.transpose(-2, -1), offs=offsets_E)
        up = torch._grouped_mm(x_SH, self.w3.transpose(-2, -1), offs=offsets_E)
        y_SH = torch._grouped_mm(self.activation(gate, up), self.w2.transpose(-2, -1), offs=offsets_E)
        y_SH = (y_SH.float() * weights_TK.view(-1)[order_S].reshape(-1, 1)).to(x_TH.dtype)
        index = token_S.reshape(-1, 1).expand(-1, H)
        return torch.zeros_like(x_TH).scatter_add(0, index, y_SH)

    def forward(self, x_TH):
        return self.experts(x_TH)


class CheckpointedMoE(GroupedMoE):
    def forward(self, x_TH):
        return torch.utils.checkpoint.checkpoint(self.experts, x_TH, use_reentrant=False)


def tokens(num_tokens=10, seed=1):
    torch.manual_seed(seed)
    return torch.randn(num_tokens, H, dtype=torch.bfloat16)


def joint_rewrites() -> int:
    return counters["moe_ops"]["joint_rewrite"]


def test_forward_and_backward_graphs(caplog):
    with caplog.at_level(logging.INFO, logger="moe_ops"):
        forward_graph, backward_graph = check_training(GroupedMoE(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 1
    # The forward and backward graphs' routers feed the training calls: no "not rewritten" line for them.
    assert "not rewritten" not in caplog.text, caplog.text
    assert_expected_inline(forward_graph, """\
aten.permute.default([1, 0])
aten.mm.default()
moe_ops.route.default(2, 'softmax', False, False, 0.0, None, 1, 1, 1.0)
getitem(0)
getitem(1)
moe_ops.fused_experts_training.default(None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, 'position')
getitem(0)
aten.empty.memory_format([0])""")
    assert_expected_inline(backward_graph, """\
moe_ops.fused_experts_backward.default(None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, 'position', None, None, None, None, None, None, 'none', [%, %])
getitem(0)
getitem(1)
getitem(2)
getitem(3)
getitem(4)
moe_ops.route_backward.default('softmax', False, False, 0.0, 1.0)
aten.permute.default([1, 0])
aten.mm.default()
aten.permute.default([1, 0])
aten.permute.default([1, 0])
aten.addmm.default()""")  # noqa: E501


class MoEBesideFrozenQuantisedExperts(GroupedMoE):
    """The rewritten block, plus frozen int8 experts the user calls fused_experts on directly (a training
    step with quantised experts beside trained ones)."""

    def __init__(self):
        super().__init__()
        from moe_ops.quantised import quantise_per_row

        for name, shape in (("q_gate_up", (E, 2 * F_, H)), ("q_down", (E, H, F_))):
            values, scale = quantise_per_row(torch.randn(shape) / shape[2] ** 0.5, torch.int8)
            self.register_buffer(name, values)
            self.register_buffer(f"{name}_scale", scale)

    def forward(self, x_TH):
        weights, ids = moe_ops.route(self.gate(x_TH), K, renormalize=True)
        frozen = moe_ops.fused_experts(x_TH, weights, ids, self.q_gate_up, self.q_down,
                                       w_gate_up_scale=self.q_gate_up_scale, w_down_scale=self.q_down_scale)
        return self.experts(x_TH) + frozen


def test_a_quantised_fused_experts_call_keeps_its_weights():
    """Only the calls without quantisation become the training variant (which takes none): the user's call
    over int8 weights stays fused_experts with its scales, and the step's outputs and gradients are eager's."""
    forward_graph, _ = check_training(MoEBesideFrozenQuantisedExperts(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 1
    calls = [line for line in forward_graph.splitlines() if line.startswith("moe_ops.fused_experts")]
    assert len(calls) == 2 and sum(line.startswith("moe_ops.fused_experts_training.default(") for line in calls) == 1
    assert any(line.startswith("moe_ops.fused_experts.default(") for line in calls), calls


_KEEPING_ON_CPU = {"on": False, "registered": False}


@pytest.fixture
def preactivations_kept(monkeypatch):
    """The device where the training variant keeps the pre-activations: a GPU whose grouped GEMM is native
    (others skip), or the CPU with the keeping path (its GPU kernels on torch's grouped GEMM, forced)
    as the CPU kernels of its two ops under Triton's interpreter, for the test's duration (the ops' CPU
    kernels otherwise stay the reference's: the forward keeps nothing, so its backward op is not reached)."""
    if TRITON_DEVICE == "cuda":
        if not native_grouped_mm(torch.device("cuda"), torch.bfloat16):
            pytest.skip("the training variant keeps nothing where torch's grouped GEMM is not native")
        return "cuda"
    fused_experts_module = sys.modules["moe_ops.fused_experts"]
    if not _KEEPING_ON_CPU["registered"]:
        def forward_kernel(*args):
            if _KEEPING_ON_CPU["on"]:
                return fused_experts_module.fused_experts_training_triton(*args)
            out, num_dropped = fused_experts_module.fused_experts_ref(*args, return_num_dropped=True)
            return out, num_dropped, *fused_experts_module._nothing_kept(args[0], args[2])

        torch.library.register_kernel("moe_ops::fused_experts_training", "cpu", forward_kernel)
        torch.library.register_kernel("moe_ops::fused_experts_training_backward", "cpu",
                                      fused_experts_module.fused_experts_training_backward_triton)
        _KEEPING_ON_CPU["registered"] = True
    monkeypatch.setattr(sys.modules["moe_ops.fused_experts_backward_triton"], "native_grouped_mm",
                        lambda device, dtype: True)
    monkeypatch.setitem(_KEEPING_ON_CPU, "on", True)
    return "cpu"


def test_the_backward_writes_over_the_kept_preactivations(preactivations_kept):
    """Where the training variant keeps the pre-activations, the compiled backward hands them to its
    backward op to write their gradients over (graph inputs of the backward, no copy: AOTAutograd
    donates them), the gradients are eager's, and a second backward of the retained graph is refused
    (it would read overwritten values), compiled and through the op's own autograd alike."""
    device = preactivations_kept
    model, x = GroupedMoE().to(device), tokens().to(device)
    _, backward_graph = check_training(model, x, dtype=torch.bfloat16)
    assert joint_rewrites() == 1 and "moe_ops.fused_experts_training_backward.default" in backward_graph

    moe_ops_pass, kept_args = inductor_config.post_grad_custom_post_pass, []

    class KeptArgs(CustomGraphPass):  # what the backward op's kept arguments are, after the moe_ops pass
        def __call__(self, graph):
            moe_ops_pass(graph)
            for node in graph.find_nodes(op="call_function",
                                         target=torch.ops.moe_ops.fused_experts_training_backward.default):
                kept_args.append([(kept.op, tuple(kept.meta["val"].shape)) for kept in node.args[17:19]])

        def uuid(self):
            return None

    torch._dynamo.reset()
    with inductor_config.patch(post_grad_custom_post_pass=KeptArgs()):
        out = torch.compile(model, fullgraph=True)(x.detach().requires_grad_(True))
        out.float().sum().backward(retain_graph=True)
    assert kept_args == [[("placeholder", (20, F_)), ("placeholder", (20, F_))]]
    # AOTAutograd refuses it (donated buffers), or autograd does (the saved tensors' versions changed).
    with pytest.raises(RuntimeError, match="donated buffers|modified by an inplace operation"):
        out.float().sum().backward()

    args = [x, torch.full((10, K), 0.5, dtype=torch.bfloat16, device=device),
            torch.arange(20, device=device).view(10, K) % E,
            model.w1.detach(), model.w2.detach(), model.w3.detach().requires_grad_(True)]
    out = torch.ops.moe_ops.fused_experts_training(*args, None, None, None, "EFH", False, "silu", True, 1.702, 7.0,
                                                   0.0, "position")[0]
    assert out.requires_grad
    out.float().sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.float().sum().backward()


def test_gradients_are_the_same_run_to_run(preactivations_kept):
    """Deterministic gradients by default: two compiled training steps on the same tokens give bitwise the
    same gradients (no atomics in the backward; each weight gradient one grouped GEMM per expert, dx and
    the routing weights' gradients gathered per token in a fixed order). On the GPU with many rows per
    expert, where an atomic accumulation would reorder its sums from run to run."""
    device = preactivations_kept
    model = GroupedMoE().to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = tokens(4096 if device == "cuda" else 48).to(device)
    _, first = training_step(model, compiled, x)
    _, second = training_step(model, compiled, x)
    assert joint_rewrites() == 1
    assert first.keys() == second.keys() and len(first) == 5  # gate, w1, w2, w3 and the tokens
    for name, grad in first.items():
        assert torch.equal(grad, second[name]), name


def test_gradients_accumulate_over_micro_batches_into_fp32_master_gradients(preactivations_kept):
    """bf16 parameters with fp32 master gradients: two micro-batches, each backward's bf16 gradients
    accumulated both in ``.grad`` (autograd adding the second backward's into the first's) and into fp32
    copies (as an optimizer keeping fp32 master weights does); the compiled, rewritten steps give eager's
    sums, with no recompile for the second micro-batch."""
    device = preactivations_kept

    def accumulate(fn, model):
        model.zero_grad(set_to_none=True)
        master = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters()}
        for micro_batch in range(2):
            fn(tokens(40, seed=micro_batch).to(device)).float().square().sum().backward()
            for name, p in model.named_parameters():
                master[name] += p.grad.float()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, master

    model = GroupedMoE().to(device)
    compiled = torch.compile(model, fullgraph=True)
    compiled(tokens(40, seed=0).to(device))  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        got_grads, got_master = accumulate(compiled, model)
    want_grads, want_master = accumulate(model, model)
    assert joint_rewrites() == 1
    # Both sides are bf16 computations whose .grad is rounded after each of the two backward passes: they can differ
    # by more than either differs from exact (2.09e-2 in one element on torch 2.11's CPU matmuls), so their
    # difference is held to 1.5 times bf16's tolerance.
    summed = {torch.bfloat16: 3e-2}
    for name in want_grads:
        assert_close_rel(got_grads[name], want_grads[name], torch.bfloat16, f".grad of {name}", summed)
        assert_close_rel(got_master[name], want_master[name], torch.bfloat16, f"fp32 master gradient of {name}", summed)


class CountingMoE(GroupedMoE):
    """torchtitan's MoE keeps the step's tokens per expert in a buffer (for its expert-bias update): the
    forward writes an input, which the training rewrite keeps."""

    def __init__(self, in_place_add=False):
        super().__init__()
        self.register_buffer("tokens_per_expert", torch.zeros(E))
        self.in_place_add = in_place_add

    def forward(self, x_TH):
        with torch.no_grad():
            _, ids_TK = torch.topk(self.gate(x_TH).float(), K, dim=-1)
            counts_E = torch.histc(ids_TK.view(-1).float(), bins=E, min=0, max=E - 1)
            if self.in_place_add:
                self.tokens_per_expert += counts_E
            else:
                self.tokens_per_expert.add_(counts_E)
        return self.experts(x_TH)


@pytest.mark.parametrize("in_place_add", [False, True], ids=["add_", "+="])
def test_buffer_writes_are_kept(in_place_add):
    """``buffer.add_(c)`` and ``buffer += c`` alike (the second leaves an alias of the buffer's copy_ in the new
    trace, which was taken for a lost runtime assert: the block was left unrewritten)."""
    module = CountingMoE(in_place_add)
    x = torch.randn(12, H, dtype=torch.bfloat16)
    forward_graph, _ = check_training(module, x, dtype=torch.bfloat16)
    assert counters["moe_ops"]["joint_rewrite"] == 1 and counters["moe_ops"]["experts_rewrite_torchtitan"] == 1
    assert "moe_ops.fused_experts_training.default" in forward_graph
    # check_training ran the compiled step once and eager once: each added T * K slots.
    assert module.tokens_per_expert.sum().item() == 2 * 12 * K


def test_one_graph_for_every_token_count():
    model = GroupedMoE()
    compiled = torch.compile(model, fullgraph=True)
    for num_tokens in (10, 12):  # automatic dynamic shapes: the second size compiles for any T
        training_step(model, compiled, tokens(num_tokens))
    with torch.compiler.set_stance("fail_on_recompile"):
        for num_tokens in (3, 17, 40):
            x = tokens(num_tokens, seed=num_tokens)
            result, grads = training_step(model, compiled, x)
            expected, expected_grads = training_step(model, model, x)
            assert_close_rel(result, expected, torch.bfloat16, f"output, T={num_tokens}")
            for name, grad in expected_grads.items():
                assert_close_rel(grads[name], grad, torch.bfloat16, f"gradient of {name}, T={num_tokens}")
    assert joint_rewrites() == 2


def test_autograd_grad_as_well_as_backward():
    """torch.autograd.grad (no .grad fields written) takes the same rewritten backward."""
    model = GroupedMoE()
    x = tokens().requires_grad_(True)
    inputs = [x, *model.parameters()]
    got = torch.autograd.grad(torch.compile(model, fullgraph=True)(x).float().square().sum(), inputs)
    want = torch.autograd.grad(model(x).float().square().sum(), inputs)
    assert joint_rewrites() == 1 and all(p.grad is None for p in inputs)
    for name, actual, expected in zip(["x", *dict(model.named_parameters())], got, want, strict=True):
        assert_close_rel(actual, expected, torch.bfloat16, f"gradient of {name}")


def saved_activation_bytes(module, x) -> int:
    """Bytes of the tensors a compiled training step keeps for its backward, parameters left out."""
    parameters = {p.data_ptr() for p in module.parameters()}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        torch.compile(module, fullgraph=True)(x)
    return sum(saved)


def test_saved_activations_are_the_block_inputs():
    """The rewritten training graph keeps, per token, the input row (H * 2 bytes in bf16), the router
    logits (E * 2), the ids (K * 4, int32) and the routing weights (K * 4: this router's are fp32): no
    permuted copy of x, no expert intermediates. The plain code's graph keeps its (T K, F)
    intermediates and the permuted rows."""
    num_tokens = 64
    x = tokens(num_tokens).requires_grad_(True)
    ours = saved_activation_bytes(GroupedMoE(), x)
    assert joint_rewrites() == 1
    assert ours == num_tokens * (H * 2 + E * 2 + K * 4 + K * 4)
    torch._dynamo.reset()
    with moe_ops.rewrites_disabled():
        plain = saved_activation_bytes(GroupedMoE(), x)
    assert plain > 4 * ours, (plain, ours)


def test_inference_graphs_are_left_to_the_post_grad_pass():
    with torch.no_grad():
        torch.compile(GroupedMoE(), fullgraph=True)(tokens())
    assert counters["moe_ops"]["experts_rewrite"] == 1 and joint_rewrites() == 0


# ---- Where it steps aside -------------------------------------------------------------------------


def test_near_miss_keeps_its_own_backward():
    model = GroupedMoE(activation=lambda gate, up: F.silu(gate) + up)  # not a gated activation the op has
    forward_graph, backward_graph = check_training(model, tokens(), dtype=torch.bfloat16)
    # The router is still rewritten (its backward is route's); the experts keep theirs.
    assert counters["moe_ops"]["experts_rewrite"] == 0 and counters["moe_ops"]["route_rewrite"] == 1
    assert joint_rewrites() == 1
    assert "_grouped_mm" in forward_graph and "_grouped_mm" in backward_graph and "fused_experts" not in backward_graph
    assert "moe_ops.route_backward.default" in backward_graph


class _HalfGradient(torch.autograd.Function):
    """A custom backward (Megatron's aux-loss scaler is one): its forward's ops alone would pass the gradient as is."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


class _CastHalfGradient(torch.autograd.Function):
    """A forward as torchtitan's bias scaling writes it (a cast to the tensor's own dtype), a backward that is not
    the gradient as it is."""

    @staticmethod
    def forward(ctx, y):
        return y.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


class _PassGradient(_CastHalfGradient):
    """The same forward, the gradient passed on as it is: what autograd does without the Function."""

    @staticmethod
    def backward(ctx, grad):
        return grad


@torch.compiler.allow_in_graph
def _stop_gradient(x):
    """dynamo records one call to it: the detach inside is not in its graph."""
    return x.detach()


class AlteredGradients(GroupedMoE):
    """The block with one construct of the user's code that makes its backward differ from its ops' autograd
    formulas; the joint graph (AOTAutograd's) keeps no sign of any but a missing or odd backward node."""

    def __init__(self, form):
        super().__init__(detach_weights=form == "detached routing weights")
        self.form = form

    def forward(self, x_TH):
        if self.form == "detached input":
            return self.experts(x_TH.detach()) + x_TH
        if self.form == ".data input":
            return self.experts(x_TH.data) + x_TH
        if self.form == "no_grad logits added":
            with torch.no_grad():
                logits_TE = self.gate(x_TH)
            return self.experts(x_TH) + logits_TE.sum()
        if self.form == "custom autograd.Function":
            return _HalfGradient.apply(self.experts(x_TH))
        if self.form == "cast Function scaling its gradient":
            return _CastHalfGradient.apply(self.experts(x_TH))
        if self.form == "cast Function passing its gradient":
            return _PassGradient.apply(self.experts(x_TH))
        if self.form == "copy of the detached input":
            copied_TH = torch.zeros_like(x_TH)
            copied_TH.copy_(x_TH.detach())
            return self.experts(copied_TH) + x_TH
        if self.form == "copy under no_grad":
            copied_TH = torch.zeros_like(x_TH)
            with torch.no_grad():
                copied_TH.copy_(x_TH)
            return self.experts(copied_TH) + x_TH
        if self.form == "aten.detach overload":
            return self.experts(torch.ops.aten.detach.default(x_TH)) + x_TH
        if self.form == "detach_ of a clone":
            copied_TH = x_TH.clone()
            copied_TH.detach_()
            return self.experts(copied_TH) + x_TH
        if self.form == "new_tensor":
            return self.experts(x_TH.new_tensor(x_TH)) + x_TH
        if self.form == "inference_mode inside no_grad":
            with torch.no_grad():
                with torch.inference_mode():
                    pass
                logits_TE = self.gate(x_TH)  # still without grad: inference_mode's exit restores no_grad
            return self.experts(x_TH) + logits_TE.sum()
        if self.form == "allow_in_graph detach":
            return self.experts(x_TH) + _stop_gradient(x_TH) * 0.5
        if self.form == "detached cast round trip":
            return self.experts(x_TH.float().detach().to(torch.bfloat16)) + x_TH
        if self.form == "cast under no_grad":
            with torch.no_grad():
                x32_TH = x_TH.float()
            return self.experts(x32_TH.to(torch.bfloat16)) + x_TH
        if self.form == "detach behind a complex cast":
            return self.experts(x_TH.detach().to(torch.complex64).real.to(torch.bfloat16)) + x_TH
        if self.form == "complex cast under no_grad":
            with torch.no_grad():
                xc_TH = x_TH.to(torch.complex64)
            return self.experts(xc_TH.real.to(torch.bfloat16)) + x_TH
        if self.form == "detached write read through another view":
            buffer_2TH = torch.zeros((2, *x_TH.shape), dtype=x_TH.dtype)
            buffer_2TH[0].copy_(x_TH.detach())
            return self.experts(buffer_2TH[0]) + x_TH
        if self.form == "asarray without grad":
            return self.experts(x_TH) + torch.asarray(x_TH * 2, requires_grad=False)
        if self.form == "hard gumbel_softmax":
            # Scaled so that the noise cannot change the hard choice: its straight-through gradient is the soft one.
            choice_TE = F.gumbel_softmax(self.gate(x_TH).float() * 1000, tau=1000.0, hard=True)
            return self.experts(x_TH) + (choice_TE @ self.gate.weight.float()).to(x_TH.dtype)
        if self.form == "item assignment of a detached value":
            copied_TH = torch.zeros_like(x_TH)
            copied_TH[:] = x_TH.detach()
            return self.experts(copied_TH) + x_TH
        if self.form == "item assignment under no_grad":
            copied_TH = torch.zeros_like(x_TH)
            with torch.no_grad():
                copied_TH[:] = x_TH
            return self.experts(copied_TH) + x_TH
        if self.form == "out= of a detached value":
            copied_TH = torch.empty_like(x_TH)
            torch.mul(x_TH.detach(), 1.0, out=copied_TH)
            return self.experts(copied_TH) + x_TH
        if self.form == "tensor hook":
            y_TH = self.experts(x_TH)
            y_TH.register_hook(lambda grad: grad * 0.5)
            return y_TH
        return self.experts(x_TH)


ALTERATIONS = ("detached routing weights", "detached input", ".data input", "no_grad logits added",
               "custom autograd.Function", "cast Function scaling its gradient",
               "tensor hook", "copy of the detached input", "copy under no_grad",
               "aten.detach overload", "detach_ of a clone", "new_tensor", "inference_mode inside no_grad",
               "allow_in_graph detach", "detached cast round trip", "cast under no_grad",
               "detach behind a complex cast", "complex cast under no_grad", "detached write read through another view",
               "asarray without grad", "hard gumbel_softmax", "item assignment of a detached value",
               "item assignment under no_grad", "out= of a detached value")


@pytest.mark.parametrize("form", ALTERATIONS)
def test_code_that_alters_gradients_keeps_the_plain_backward(form, caplog):
    """A backward re-derived from the rewritten forward would take gradients the user's code does not (through a
    detached value, one computed without grad) or lose what it does to them (a custom Function's backward, a hook):
    the joint graph is kept as it is, and the gradients are eager's (each form gave other gradients when the
    rewrite ran on it)."""
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        check_training(AlteredGradients(form), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 0
    assert "the code alters gradients" in caplog.text, caplog.text


def test_function_passing_its_gradient_on_keeps_the_rewrite():
    """A custom autograd.Function whose forward is a cast to the value's own dtype and whose backward returns the
    gradient as it is (torchtitan's ScaleBiasForward at one tensor-parallel rank) changes no gradient: the rewrite
    runs, and the gradients are eager's."""
    forward_graph, backward_graph = check_training(AlteredGradients("cast Function passing its gradient"), tokens(),
                                                   dtype=torch.bfloat16)
    assert joint_rewrites() == 1 and calls_experts_backward(backward_graph)


class BoundaryOps(GroupedMoE):
    """An op before the block whose Inductor decomposition, differentiated, is not its own formula at the inputs
    given (the re-trace would differentiate the decomposition; AOTAutograd differentiated the op)."""

    def __init__(self, form):
        super().__init__()
        self.form = form

        self.shared_gate, self.shared_up, self.shared_down = (
            nn.Linear(H, F_, bias=False, dtype=torch.bfloat16), nn.Linear(H, F_, bias=False, dtype=torch.bfloat16),
            nn.Linear(F_, H, bias=False, dtype=torch.bfloat16))

    def forward(self, x_TH):
        x_f32 = x_TH.float()
        if self.form == "relu6 at 0":
            return self.experts(F.relu6(x_TH))
        if self.form == "fmax tie":
            return self.experts(torch.fmax(x_TH, torch.ones_like(x_TH)))
        if self.form == "std of a constant row":
            return self.experts((x_f32 / (x_f32.std(-1, keepdim=True) + 1)).to(x_TH.dtype))
        if self.form == "hardswish at 3":
            return self.experts(F.hardswish(x_f32 * 3).to(x_TH.dtype))
        if self.form == "elu of 100":
            return self.experts(F.elu(x_f32).to(x_TH.dtype))
        if self.form == "softplus of 100":
            return self.experts(F.softplus(x_f32).to(x_TH.dtype))
        if self.form == "renorm of a zero row":
            return self.experts(torch.renorm(x_f32, 2, 0, 5.0).to(x_TH.dtype))
        if self.form == "dist of equal tokens":
            return self.experts(x_TH) + torch.dist(x_f32[0], x_f32[1]).to(x_TH.dtype)
        if self.form == "max-pool of tied tokens":
            return F.adaptive_max_pool1d(self.experts(x_TH).float().T.unsqueeze(0), 1)
        if self.form == "norm of a zero row":
            return self.experts((x_f32 / (torch.linalg.vector_norm(x_f32, dim=-1, keepdim=True) + 1)).to(x_TH.dtype))
        if self.form == "mse_loss after the block":
            return F.mse_loss(self.experts(x_TH).float(), x_f32, reduction="none")
        if self.form == "mish far below 0":
            return self.experts(F.mish(x_f32 * 100).to(x_TH.dtype))
        if self.form == "sinc at 0":
            return self.experts(torch.sinc(x_f32).to(x_TH.dtype)) + x_TH
        # "silu far below 0": a shared SwiGLU expert beside the block (Qwen2-MoE, DeepSeek), one token's
        # pre-activations below -88.7, where exp(-x) of silu's decomposition x / (1 + exp(-x)) overflows
        shared_TH = self.shared_down(F.silu(self.shared_gate(x_TH)) * self.shared_up(x_TH))
        return self.experts(x_TH) + shared_TH


def boundary_tokens(form):
    """Tokens with the values where the form's op and its decomposition differentiate otherwise."""
    x_TH = tokens()
    if form in ("std of a constant row", "fmax tie"):
        x_TH[2] = 1.0
    elif form in ("elu of 100", "softplus of 100"):
        x_TH[0, 0] = 100.0  # exp(100) overflows fp32 in the branch the decomposition's where() drops
    elif form in ("renorm of a zero row", "norm of a zero row"):
        x_TH[2] = 0.0
    elif form in ("dist of equal tokens", "max-pool of tied tokens"):
        x_TH[1], x_TH[5] = x_TH[0], x_TH[4]
    elif form == "silu far below 0":
        x_TH[0] *= 300
    elif form == "mish far below 0":
        pass  # the form scales the tokens by 100: many inputs far below 0
    else:  # relu6 at 0, sinc at 0: zeros; hardswish at 3: ones, times 3
        x_TH[:, :5] = 0.0 if form in ("relu6 at 0", "sinc at 0") else 1.0
    return x_TH


@pytest.mark.parametrize("form", ["relu6 at 0", "std of a constant row", "fmax tie", "elu of 100", "softplus of 100",
                                  "renorm of a zero row", "dist of equal tokens", "max-pool of tied tokens",
                                  "silu far below 0", "mish far below 0", "sinc at 0", "hardswish at 3",
                                  "norm of a zero row", "mse_loss after the block"])
def test_ops_beside_the_block_keep_their_own_backward(form):
    """Ops beside the block at the points where their Inductor decomposition, differentiated, is not their own
    formula (relu6'(0); NaN for std of a constant row, elu or softplus of 100, renorm or a vector norm of a zero row,
    dist of equal tokens, silu and mish far below 0, sinc at 0; fmax's and a max-pool's ties), and a loss after the
    block: the rewrite runs, and only the block's backward is the moe_ops ops', so these keep the one AOTAutograd
    derived (eager's)."""
    check_training(BoundaryOps(form), boundary_tokens(form), dtype=torch.bfloat16)
    assert joint_rewrites() == 1


class _ToyJointPass(CustomGraphPass):
    """A joint pass that runs the splice with a toy rewrite in place of moe_ops' (the splice alone: no moe_ops op)."""

    def __init__(self, rewrite):
        self.rewrite = rewrite

    def __call__(self, graph):
        if joint_rewrite.is_joint_graph(graph):
            joint_rewrite.rewrite_joint_graph(graph, [self.rewrite])

    def uuid(self):
        return f"toy-{self.rewrite.__name__}"


def _sin_as_shifted_cos(graph) -> int:
    """Replaces each sin(v) by cos(v - pi / 2) (the add reading it too, when it also adds v: a pass-through of v)."""
    replaced = 0
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.sin.default):
        source = node.args[0]
        add = next((u for u in node.users if u.target is torch.ops.aten.add.Tensor and source in u.args), None)
        with graph.inserting_before((add or node).next):
            value = graph.call_function(torch.ops.aten.cos.default,
                                        (graph.call_function(torch.ops.aten.sub.Tensor, (source, math.pi / 2)),))
            if add is not None:
                value = graph.call_function(torch.ops.aten.add.Tensor, (value, source))
        (add or node).replace_all_uses_with(value)
        replaced += 1
    return replaced


class SinBeside(nn.Module):
    def __init__(self, adds_its_input: bool):
        super().__init__()
        self.adds_its_input = adds_its_input
        self.scale = nn.Parameter(torch.randn(H))

    def forward(self, x_TH):
        v_TH = x_TH * self.scale
        y_TH = torch.sin(v_TH) + v_TH if self.adds_its_input else torch.sin(v_TH)
        return y_TH * 3 + x_TH.cos()


def test_the_splice_replaces_only_the_rewritten_nodes_backward():
    """The replaced nodes' backward is the new nodes' (sin's cos(v) became -sin(v - pi / 2)), the rest stays."""
    with inductor_config.patch(joint_custom_post_pass=_ToyJointPass(_sin_as_shifted_cos)):
        _, backward_graph = check_training(SinBeside(adds_its_input=False), tokens().float(), dtype=torch.float32)
    assert joint_rewrites() == 1
    assert "aten.sin.default" in backward_graph, backward_graph


def test_a_gradient_passed_through_the_replaced_nodes_is_refused(caplog):
    """sin(v) + v replaced: the plain backward hands v the add's gradient with no node of the replaced nodes' own, so
    splicing would count it twice; the joint graph is kept."""
    with caplog.at_level(logging.DEBUG, logger="moe_ops"), inductor_config.patch(
            joint_custom_post_pass=_ToyJointPass(_sin_as_shifted_cos)):
        check_training(SinBeside(adds_its_input=True), tokens().float(), dtype=torch.float32)
    assert joint_rewrites() == 0
    assert "a gradient may pass through the replaced nodes" in caplog.text, caplog.text


def test_a_detach_inside_the_block_is_refused_by_the_splice_too(monkeypatch, caplog):
    """Without the pre-grad look's refusal, a block whose routing weights are detached is still refused: the new
    nodes would take a gradient of the router's logits, which the replaced backward did not make."""
    monkeypatch.setattr(joint_rewrite, "gradient_alterations", lambda graph: [])
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        check_training(GroupedMoE(detach_weights=True), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 0
    assert "take gradients of other inputs than the replaced nodes did" in caplog.text, caplog.text


class DetachedStatistics(GroupedMoE):
    """Detached values that reach no gradient (router statistics kept in buffers, one returned): the rewrite runs."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean_logit", torch.zeros((), dtype=torch.bfloat16))
        self.register_buffer("count_variance", torch.zeros(()))

    def forward(self, x_TH):
        self.mean_logit.copy_(self.gate(x_TH).detach().mean())
        # A variance of the token counts (load-balance statistics): from integer ids, no gradient reaches it.
        _, ids_TK = torch.topk(self.gate(x_TH), K, dim=-1)
        self.count_variance.copy_(torch.histc(ids_TK.float(), bins=E, min=0, max=E - 1).var())
        return self.experts(x_TH), self.gate(x_TH).detach().float().mean(0)


class CastRoundTrip(GroupedMoE):
    """The block's input cast to fp32 and back first: the two casts' backward casts cancel, and Inductor's joint
    patterns fold them away, so no backward node carries their seq_nr."""

    def forward(self, x_TH):
        return self.experts(x_TH.float().to(torch.bfloat16)) + x_TH


def test_a_cast_round_trip_before_the_block_keeps_the_rewrite():
    check_training(CastRoundTrip(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 1 and counters["moe_ops"]["experts_rewrite_torchtitan"] == 1


class CrossEntropyLoss(GroupedMoE):
    """The block, then a language model's loss: cross_entropy (nll_loss's decomposition, differentiated) of logits
    from the block's output, a padding target ignored."""

    def forward(self, x_TH):
        logits_TV = self.experts(x_TH).float()[:, :E]
        targets_T = torch.arange(x_TH.shape[0]) % E
        return F.cross_entropy(logits_TV, targets_T, ignore_index=3)


def test_a_cross_entropy_loss_after_the_block_keeps_the_rewrite():
    check_training(CrossEntropyLoss(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 1


def test_detached_values_that_reach_no_gradient_keep_the_rewrite():
    module = DetachedStatistics()
    check_training(module, tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 1 and counters["moe_ops"]["experts_rewrite_torchtitan"] == 1


def test_a_joint_graph_without_the_pre_grad_look_is_kept(caplog):
    """Without the look at dynamo's graph (another pass put in Inductor's pre-grad hook after moe_ops), nothing says
    the code alters no gradient: the joint graph stays."""
    with inductor_config.patch(pre_grad_custom_pass=None), caplog.at_level(logging.DEBUG, logger="moe_ops"):
        check_training(GroupedMoE(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 0 and "no look at the dynamo graph preceded it" in caplog.text


class TwoBlocks(nn.Module):
    """Two blocks in sequence, each with a residual: the second block's input is an add whose backward has no node
    of its own, of the first block's output (a getitem of a multi-output op after Inductor's joint patterns)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = GroupedMoE(), GroupedMoE()

    def forward(self, x_TH):
        return self.second(self.first(x_TH) + x_TH) + x_TH


def test_blocks_in_sequence_with_residuals():
    check_training(TwoBlocks(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 1 and counters["moe_ops"]["experts_rewrite"] == 2


def test_activation_checkpointing():
    """A checkpointed block is rewritten and stays checkpointed: the moe_ops ops inherit the region's
    recompute tags, so the backward computes the router again (instead of keeping its results) and the
    experts' backward reads only the block's inputs."""
    forward_graph, backward_graph = check_training(CheckpointedMoE(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 1
    assert "moe_ops.fused_experts_training.default" in forward_graph
    assert "moe_ops.route.default" in backward_graph and calls_experts_backward(backward_graph)


class TwoCheckpointedLayers(torch.nn.Module):
    """Two MoE layers, each checkpointed in a region of its own (transformers' gradient_checkpointing_enable on a
    two-layer model), a residual between them, which ``between`` maps to the second layer's input (the identity:
    the residual sum is both the first region's reader and the second region's input)."""

    def __init__(self, between=torch.tanh):
        super().__init__()
        self.first, self.second = GroupedMoE(), GroupedMoE()
        self.between = between

    def forward(self, x_TH):
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        y_TH = x_TH + checkpoint(self.first.experts, x_TH)
        return y_TH + checkpoint(self.second.experts, self.between(y_TH))


def _routing_margin(gate: nn.Linear, x_TH: torch.Tensor) -> torch.Tensor:
    """(T,): how far each token's K-th expert score lies above the next one."""
    scores_TE = F.softmax(gate(x_TH).float(), dim=-1).sort(dim=-1, descending=True).values
    return scores_TE[:, K - 1] - scores_TE[:, K]


@pytest.mark.parametrize("between", [torch.tanh, torch.nn.Identity()], ids=["tanh", "residual sum as it is"])
def test_layers_checkpointed_each_in_its_region(between):
    """Each layer's rewritten block takes its own region's tags (the rewrite replaces both layers at once): both
    are rewritten, and the backward recomputes both routers."""
    model = TwoCheckpointedLayers(between)
    # The tokens routed with the widest margins in both layers: the first layer's output rounds differently
    # compiled and eager (both within bf16), which at a near-tie of the second router picks another expert.
    candidates_TH = tokens(num_tokens=64)
    with torch.no_grad():
        second_in_TH = between(candidates_TH + model.first.experts(candidates_TH))
        margin_T = torch.minimum(_routing_margin(model.first.gate, candidates_TH),
                                 _routing_margin(model.second.gate, second_in_TH))
    x_TH = candidates_TH[margin_T.topk(10).indices]
    forward_graph, backward_graph = check_training(model, x_TH, dtype=torch.bfloat16)
    assert joint_rewrites() == 1
    assert forward_graph.count("moe_ops.fused_experts_training.default") == 2
    assert backward_graph.count("moe_ops.route.default") == 2 and calls_experts_backward(backward_graph)


def _save_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    saved = (torch.ops.aten.mm.default, torch.ops.aten._grouped_mm.default)
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


class SelectivelyCheckpointedMoE(GroupedMoE):
    """Selective activation checkpointing: matmul results saved, everything else recomputed."""

    def forward(self, x_TH):
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
        return torch.utils.checkpoint.checkpoint(self.experts, x_TH, use_reentrant=False, context_fn=context_fn)


def test_selective_checkpointing_that_splits_a_block_is_left_alone(caplog):
    """The saved matmuls are inside the block the rewrite would replace: no one policy fits the fused op,
    so the graph keeps the plain code and its policy (and says why at DEBUG)."""
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        check_training(SelectivelyCheckpointedMoE(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 0
    assert "straddles an activation-checkpointing boundary" in caplog.text


def test_a_joint_graph_that_cannot_be_retraced_is_kept(monkeypatch, caplog):
    """When the new joint graph cannot be traced, the old one stays, and the forward rewrites that ran
    on its copy are not counted."""

    def refuse(*args):
        raise joint_rewrite.NotRewritable("refused by the test")

    monkeypatch.setattr(joint_rewrite, "_trace_region", refuse)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        forward_graph, backward_graph = check_training(GroupedMoE(), tokens(), dtype=torch.bfloat16)
    assert "refused by the test" in caplog.text
    # (The post-grad pass may still rewrite the router in the forward graph: same values, and its
    # backward keeps reading them; the experts block it leaves alone, its intermediates being saved.)
    assert joint_rewrites() == 0 and not counters["moe_ops"]["experts_rewrite"]
    assert "_grouped_mm" in forward_graph and "moe_ops" not in backward_graph


def test_training_rewrites_off(caplog):
    """With ``moe_ops.config.training_rewrites`` off a training graph keeps the plain code's backward."""
    moe_ops.config.training_rewrites = False  # the fixture restores it
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        forward_graph, backward_graph = check_training(GroupedMoE(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 0 and "_grouped_mm" in forward_graph and "moe_ops" not in backward_graph
    # Said at INFO, where the router is (the ids the forward saves for the backward are no graph break).
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "not rewritten" in r.getMessage()]
    assert len(info) == 1 and "test_joint_rewrite.py" in info[0], info
    assert info[0].endswith("moe_ops.config.training_rewrites is off") and "graph break" not in caplog.text


def test_switched_off():
    with moe_ops.rewrites_disabled():
        forward_graph, _ = check_training(GroupedMoE(), tokens(), dtype=torch.bfloat16)
    assert joint_rewrites() == 0 and "moe_ops" not in forward_graph


# ---- On the GPU --------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_mixtral_block_training():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=1024, intermediate_size=512, num_local_experts=8,
                                        num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(config)
    for param in block.parameters():
        nn.init.normal_(param, std=0.02)
    block = block.to("cuda", torch.bfloat16).train()
    x = torch.randn(4, 128, 1024, device="cuda", dtype=torch.bfloat16)
    forward_graph, backward_graph = check_training(block, x, dtype=torch.bfloat16)
    assert joint_rewrites() == 1
    assert "moe_ops.fused_experts_training.default" in forward_graph and "_grouped_mm" not in forward_graph
    # On the H200 (sm90, bf16) the forward keeps the pre-activations and its own backward op reads them.
    keeps = native_grouped_mm(x.device, x.dtype)
    backward_op = "fused_experts_training_backward" if keeps else "fused_experts_backward"
    assert f"moe_ops.{backward_op}.default" in backward_graph


@pytest.mark.cuda
def test_cuda_graph_captures_a_training_step():
    """mode="reduce-overhead": the rewritten forward and backward run as CUDA graphs (no host sync in the
    moe_ops ops to stop the capture), step after step, with eager's gradients."""
    model = GroupedMoE().cuda()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for step in range(3):
        x = tokens(64, seed=step).cuda()
        torch.compiler.cudagraph_mark_step_begin()
        result, grads = training_step(model, compiled, x)
        expected, expected_grads = training_step(model, model, x)
        assert_close_rel(result, expected, torch.bfloat16, f"output, step {step}")
        for name, grad in expected_grads.items():
            assert_close_rel(grads[name], grad, torch.bfloat16, f"gradient of {name}, step {step}")
    assert joint_rewrites() == 1
    assert counters["inductor"]["cudagraph_skips"] == 0
