"""Autograd for moe_ops ops by differentiating their plain-PyTorch reference.

Each differentiable op ``moe_ops::X`` gets an opaque backward op ``moe_ops::X_backward`` whose
implementation re-runs the reference under autograd and whose fake kernel returns gradients shaped
like the inputs. Keeping the backward opaque matters: the references loop over experts with
data-dependent sizes, which AOTAutograd could not trace with fake tensors, while an opaque op with a
static-shape fake kernel traces fine (opcheck's aot_dispatch tests, torch.compile training).
That implementation is the reference every backward kernel is tested against; a kernel registered
for a device (``fused_experts``' CUDA backward) replaces it there without changing the schema.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as forward_ad

from moe_ops._compat.dispatch import autograd_inside_custom_op, functorch_transform_active, grad_tracking


def _arguments_text(op) -> str:
    """The op's arguments as its schema writes them, defaults left out: in the backward op they come before
    the gradients, and Inductor refuses a schema with an argument without default after one with."""
    schema = str(op._opoverload._schema)
    return re.sub(r"=[^,]+", "", schema[schema.index("(") + 1 : schema.rindex(") ->")])


def refuse_forward_ad(op_name: str, *tensors) -> None:
    """Refuses forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) through a moe_ops op: the
    ops have no forward formula, and torch hands a custom op without one a zero tangent, silently (torch 2.13).
    Free outside a dual level (one Python read; under torch.compile a guard on it). Inside one, a dual input is
    refused, and under torch.compile, which cannot tell dual inputs apart, any call."""
    if forward_ad._current_level < 0:
        return
    if torch.compiler.is_compiling() or any(
            isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"{op_name}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) has no "
                                  f"formula through moe_ops' ops; autograd's reverse mode (backward, "
                                  f"torch.autograd.grad) has")


def refuse_functorch_grad(op_name: str, *tensors) -> None:
    """Refuses torch.func's reverse mode (grad, vjp, jacrev, hessian) over a moe_ops op, naming the op: torch cannot
    run a custom op's autograd formula under it (it raises that an autograd.Function must override setup_context,
    naming nothing the user wrote). Free outside functorch transforms (one call); not checked while dynamo traces
    (``torch.compile(torch.func.grad(f))`` runs transformers' own experts code instead: lowering/hf_experts.py)."""
    if torch.compiler.is_compiling() or not functorch_transform_active():
        return
    if any(isinstance(t, torch.Tensor) and grad_tracking(t) for t in tensors):
        raise NotImplementedError(f"{op_name}: torch.func's reverse mode (grad, vjp, jacrev, hessian) cannot "
                                  f"differentiate a custom op (torch's limit); use autograd (backward, "
                                  f"torch.autograd.grad), or the plain-PyTorch references (moe_ops.route_ref, "
                                  f"moe_ops.fused_experts_ref) inside torch.func transforms")


def refuse_unsupported_ad(op_name: str, *tensors) -> None:
    """What a moe_ops op's public function checks first: forward-mode AD and torch.func's reverse mode, which its
    autograd formula does not serve (refuse_forward_ad, refuse_functorch_grad)."""
    refuse_forward_ad(op_name, *tensors)
    refuse_functorch_grad(op_name, *tensors)


def laid_out_like(value: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """``grad`` with the dtype and strides ``torch.empty_like(value)`` has, as the fake kernel says
    (autograd may return a contiguous gradient for a transposed weight)."""
    like = torch.empty_like(value)
    if grad is None:
        return like.zero_()
    if like.stride() != grad.stride() or like.dtype != grad.dtype:
        return like.copy_(grad)
    return grad


# Tensors that get gradients: int8 / fp8 values of quantised weights are frozen (their dequantised
# values are the reference's input, not theirs).
_DIFFERENTIABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _differentiable(value) -> bool:
    return value is not None and value.dtype in _DIFFERENTIABLE_DTYPES


def save_inputs(ctx, inputs: Sequence, *more_tensors: torch.Tensor) -> None:
    """Keep a forward's arguments for its backward: the tensors (then ``more_tensors``) through
    ``save_for_backward``, whose version check refuses a backward after one of them was changed in place (as
    torch's own ops do: the gradients would be those of the changed values), the other arguments as they are.
    Inference tensors (made under ``torch.inference_mode``: frozen weights, say, when only the router trains),
    which autograd refuses to save, are saved as copies."""
    ctx.input_slots = [None if isinstance(value, torch.Tensor) else (value,) for value in inputs]
    tensors = (*(value for value in inputs if isinstance(value, torch.Tensor)), *more_tensors)
    ctx.save_for_backward(*(tensor.clone() if tensor.is_inference() else tensor for tensor in tensors))


def saved_inputs(ctx) -> tuple[list, tuple]:
    """(the forward's arguments, the ``more_tensors`` saved after them) as ``save_inputs`` kept them."""
    tensors = iter(ctx.saved_tensors)
    inputs = [next(tensors) if slot is None else slot[0] for slot in ctx.input_slots]
    return inputs, tuple(tensors)


def register_reference_autograd(op, reference: Callable, differentiable: Sequence[str]):
    """Make ``op`` differentiable in the arguments named by ``differentiable``; returns the backward op.

    ``reference`` takes the op's arguments by name and returns what the op returns, built from
    differentiable torch operations. Optional tensor arguments that are None get no gradient (an
    empty tensor in the backward op's result), nor do int8 / fp8 ones (zeros). The backward op's own
    implementation differentiates the reference (also ``backward_op.reference``, for a device kernel that
    hands some inputs back to it); a device kernel registered on it (``register_kernel``) must return the
    same list.
    """
    schema = op._opoverload._schema
    names = [a.name for a in schema.arguments]
    wrt = [names.index(n) for n in differentiable]
    qualname = f"{op._namespace}::{op._name}_backward"

    def backward_impl(*args):
        *fwd_args, grads = args
        bound = dict(zip(names, fwd_args, strict=True))
        with autograd_inside_custom_op():
            leaves = {}
            for i in wrt:
                value = fwd_args[i]
                if _differentiable(value):
                    leaves[names[i]] = value.detach().requires_grad_(True)
            outputs = reference(**{**bound, **leaves})
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [
                (out, grad)
                for out, grad in zip(outputs, grads, strict=True)
                if out.requires_grad and grad.numel() == out.numel() and out.numel() > 0
            ]
            got = (
                torch.autograd.grad(
                    [p[0] for p in pairs], list(leaves.values()), [p[1] for p in pairs], allow_unused=True
                )
                if pairs
                else [None] * len(leaves)
            )
        by_name = dict(zip(leaves, got, strict=True))
        result = []
        for i in wrt:
            value = fwd_args[i]
            if value is None:
                result.append(torch.empty(0))
            elif not _differentiable(value):  # quantised (frozen) weights: never asked for a gradient
                result.append(torch.zeros_like(value))
            else:
                result.append(laid_out_like(value, by_name[names[i]]))
        return result

    backward_op = torch.library.custom_op(
        qualname,
        backward_impl,
        mutates_args=(),
        schema=f"({_arguments_text(op)}, Tensor[] grads) -> Tensor[]",
    )

    @backward_op.register_fake
    def _(*args):
        fwd_args = args[:-1]
        return [
            torch.empty(0) if fwd_args[i] is None else torch.empty_like(fwd_args[i]) for i in wrt
        ]

    def setup_context(ctx, inputs, output):
        # A call may leave trailing arguments with defaults out; the backward op takes every one.
        ctx.num_inputs = len(inputs)
        save_inputs(ctx, (*inputs, *(argument.default_value for argument in schema.arguments[len(inputs):])))
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.output_meta = [(o.shape, o.dtype, o.device) for o in outputs]

    def backward(ctx, *grads):
        filled = [
            g if g is not None else (torch.zeros(shape, dtype=dtype, device=device)
                                     if dtype.is_floating_point else torch.empty(0, device=device))
            for g, (shape, dtype, device) in zip(grads, ctx.output_meta, strict=True)
        ]
        fwd_inputs, _ = saved_inputs(ctx)
        input_grads = backward_op(*fwd_inputs, filled)
        result: list = [None] * len(names)
        for i, g in zip(wrt, input_grads, strict=True):
            if fwd_inputs[i] is not None and ctx.needs_input_grad[i]:
                result[i] = g
        return tuple(result[:ctx.num_inputs])

    torch.library.register_autograd(op, backward, setup_context=setup_context)
    backward_op.reference = backward_impl  # for a device kernel that hands some inputs back to it
    return backward_op
