"""moe_ops._dispatch: when the public functions may call an op's CUDA kernel without the dispatcher."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_ops
from moe_ops._dispatch import direct_cuda_call_allowed


def test_cpu_tensors_go_through_the_op():
    assert not direct_cuda_call_allowed(torch.ones(2))


def test_meta_and_absent_tensors():
    assert not direct_cuda_call_allowed(torch.ones(2, device="meta"), None)


@pytest.mark.cuda
def test_plain_cuda_tensors_without_grad_call_the_kernel():
    x = torch.ones(2, device="cuda")
    assert direct_cuda_call_allowed(x, None)
    assert not direct_cuda_call_allowed(x.requires_grad_())
    with torch.no_grad():
        assert direct_cuda_call_allowed(x)
    with FakeTensorMode():
        assert not direct_cuda_call_allowed(torch.ones(2, device="cuda"))
    seen_in_vmap = []
    torch.func.vmap(lambda t: seen_in_vmap.append(direct_cuda_call_allowed(t)) or t)(torch.ones(3, 2, device="cuda"))
    assert seen_in_vmap == [False]


@pytest.mark.cuda
def test_direct_call_equals_the_op_and_grad_still_flows():
    torch.manual_seed(0)
    T, E, K, H, F = 33, 8, 2, 64, 96
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(T, E, device="cuda")
    w_gate_up = torch.randn(E, 2 * F, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w_down = torch.randn(E, H, F, device="cuda", dtype=torch.bfloat16) / F**0.5
    weights, ids = moe_ops.route(logits, K, renormalize=True)
    op_weights, op_ids = torch.ops.moe_ops.route(logits, K, "softmax", False, True, 0.0, None, 1, 1, 1.0)
    assert torch.equal(ids, op_ids) and torch.equal(weights, op_weights)
    out = moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down)
    op_out, _ = torch.ops.moe_ops.fused_experts(
        x, weights, ids, w_gate_up, w_down, None, None, None, None, "EFH", False, "silu", True, 1.702, 7.0, 0.0,
        "position",
    )
    assert torch.equal(out, op_out)
    logits.requires_grad_()
    weights, _ = moe_ops.route(logits, K, renormalize=True)
    weights.sum().backward()
    assert logits.grad is not None
