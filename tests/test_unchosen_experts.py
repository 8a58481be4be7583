"""moe_ops::unchosen_expert_gradients: zeros whose backward is the NaN that the experts a token did not choose
give the expert weights' gradients in code that runs every token through every expert (Llama 4's block)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import eager_and_captured

import moe_ops.unchosen_experts  # noqa: F401  (defines the op)

T, K, E, H, F = 9, 2, 5, 10, 6  # tokens, experts per token, experts, hidden, expert intermediate
op = torch.ops.moe_ops.unchosen_expert_gradients.default


def unchosen_rows_output(x_TH, ids_TK, w_gate_up_EHF2, w_down_EFH):
    """The plain code's part that the op stands for: each expert on the rows 0 * x[t] of the tokens that did not
    choose it (SwiGLU on the halves of its gate/up GEMM), added into those tokens' rows; the chosen tokens' rows
    are left out (not multiplied by 0: 0 * inf would be a NaN of the reference's own)."""
    out_TH = torch.zeros_like(x_TH)
    for e in range(E):
        tokens = (ids_TK != e).all(1).nonzero().flatten()
        gate, up = (x_TH[tokens] * 0 @ w_gate_up_EHF2[e]).chunk(2, dim=-1)
        out_TH = out_TH.index_add(0, tokens, torch.nn.functional.silu(gate) * up @ w_down_EFH[e])
    return out_TH


def inputs(dtype=torch.float32):
    torch.manual_seed(0)
    x_TH = torch.randn(T, H, dtype=dtype)
    ids_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w_gate_up = torch.randn(E, H, 2 * F, dtype=dtype, requires_grad=True)
    w_down = torch.randn(E, F, H, dtype=dtype, requires_grad=True)
    return x_TH, ids_TK, w_gate_up, w_down


def weight_gradients(fn, x_TH, ids_TK, w_gate_up, w_down, grad_TH):
    w_gate_up.grad = w_down.grad = None
    fn(x_TH, ids_TK, w_gate_up, w_down).backward(grad_TH)
    return w_gate_up.grad, w_down.grad


@pytest.mark.parametrize("where", ["finite", "nan_token", "inf_element", "inf_gradient", "nan_gradients",
                                   "inf_token_and_gradient"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradients_are_the_unchosen_rows_nan(where, dtype):
    """The op's value is zeros; each weight's gradient is NaN exactly where the plain code's unchosen rows make
    it NaN (a token's non-finite row: all of each unchosen expert's; a non-finite output gradient: each
    unchosen expert's gate/up gradient, and its down gradient's column), and 0 elsewhere, as theirs is."""
    x_TH, ids_TK, w_gate_up, w_down = inputs(dtype)
    grad_TH = torch.randn(T, H, dtype=dtype)
    if where in ("nan_token", "inf_token_and_gradient"):
        x_TH[2] = float("nan") if where == "nan_token" else float("inf")
    if where == "inf_element":
        x_TH[4, 3] = float("-inf")
    if where in ("inf_gradient", "inf_token_and_gradient"):
        grad_TH[6, 5] = float("inf")
    if where == "nan_gradients":
        grad_TH[1, 0] = grad_TH[7, 9] = float("nan")
    assert torch.equal(op(x_TH, ids_TK, w_gate_up, w_down), torch.zeros(T, H, dtype=dtype))
    got = weight_gradients(op, x_TH, ids_TK, w_gate_up, w_down, grad_TH)
    want = weight_gradients(unchosen_rows_output, x_TH, ids_TK, w_gate_up, w_down, grad_TH)
    for name, g, w in zip(("w_gate_up", "w_down"), got, want, strict=True):
        assert torch.equal(g.isnan(), w.isnan()), name
        assert (w.isnan().any() or where == "finite") and not w.isinf().any(), name  # the case tests something
        assert torch.equal(g.nan_to_num(), torch.zeros_like(g)), name
        assert g.dtype == dtype and g.shape == w.shape


def test_weights_without_gradients_and_the_compiled_op():
    """No weight gradient where none is asked for; under torch.compile (fullgraph) the same NaN as eagerly."""
    x_TH, ids_TK, w_gate_up, w_down = inputs()
    x_TH[3, 1] = float("nan")
    w_down.requires_grad_(False)
    w_gate_up.grad = None
    op(x_TH, ids_TK, w_gate_up, w_down).sum().backward()
    assert w_gate_up.grad.isnan().any() and w_down.grad is None
    eager = w_gate_up.grad.isnan()
    w_gate_up.grad = None
    torch.compile(op, fullgraph=True)(x_TH, ids_TK, w_gate_up, w_down).sum().backward()
    assert torch.equal(w_gate_up.grad.isnan(), eager)


def test_opcheck():
    x_TH, ids_TK, w_gate_up, w_down = inputs()
    torch.library.opcheck(op, (x_TH, ids_TK, w_gate_up, w_down))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(x_TH=a["x_TH"][None]), "x: expected a 2-D tensor"),
    (lambda a: a.update(ids_TK=a["ids_TK"][:4]), "topk_ids: expected shape (9, K)"),
    (lambda a: a.update(ids_TK=a["ids_TK"].float()), "topk_ids: expected dtype"),
    (lambda a: a.update(w_gate_up=a["w_gate_up"].transpose(1, 2)), "w_gate_up: expected shape (E, 10, 2F)"),
    (lambda a: a.update(w_down=a["w_down"][:3]), "w_down: expected shape (5, F, 10)"),
], ids=["x", "topk_ids_rows", "topk_ids_dtype", "w_gate_up", "w_down"])
def test_errors_name_the_argument(change, message):
    x_TH, ids_TK, w_gate_up, w_down = inputs()
    arguments = dict(x_TH=x_TH, ids_TK=ids_TK, w_gate_up=w_gate_up.detach(), w_down=w_down.detach())
    change(arguments)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        op(*arguments.values())


@pytest.mark.cuda
def test_cuda_backward_captures():
    """The backward makes no host copy or sync (its NaN are no host tensor): a CUDA graph captures it."""
    x_TH, ids_TK, w_gate_up, w_down = (t.detach().cuda().requires_grad_(t.requires_grad) for t in inputs())
    x_TH[2, 3] = float("nan")
    grad_TH = torch.randn(T, H, device="cuda")

    def step():
        return torch.autograd.grad(op(x_TH, ids_TK, w_gate_up, w_down), [w_gate_up, w_down], grad_TH)

    eager, captured = eager_and_captured(step)
    for got, want in zip(captured, eager, strict=True):
        assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
