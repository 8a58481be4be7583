"""The dispatcher and custom-op internals moe_ops reaches into. Checked on torch 2.11.0 (the GPU box) and 2.13.0
(CPU CI); tests/test_compat.py imports every entry, so a torch release that moves one fails there first, by
name."""

from __future__ import annotations

import contextlib

import torch
from torch._library.custom_ops import OPDEFS

__all__ = ["autograd_inside_custom_op", "custom_op_kernel", "fp32_matmul_allows_tf32", "no_tracing_or_modes_active"]


@contextlib.contextmanager
def autograd_inside_custom_op():
    """Record autograd inside a custom op's implementation.

    The dispatcher runs a custom op's kernel below the Autograd key (its TLS exclude set holds the
    autograd functionality), so ``torch.enable_grad()`` alone records nothing there. The backward
    ops of moe_ops differentiate the reference, so they lift that exclusion for their body.
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    included = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(included, excluded.remove(torch._C.DispatchKey.AutogradFunctionality)):
        with torch.enable_grad():
            yield


def fp32_matmul_allows_tf32() -> bool:
    """Whether the user lets fp32 matmuls round their inputs to tf32 (moe_ops follows torch's setting:
    ``torch.backends.cuda.matmul.fp32_precision`` since 2.9, ``allow_tf32`` before; off by default)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def no_tracing_or_modes_active() -> bool:
    """True when nothing intercepts torch calls here: no torch.compile tracing, no torch function or
    dispatch mode (FakeTensorMode, profilers' modes, ...), no functorch transform (vmap, grad)."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._len_torch_function_stack() == 0
        and not functorch_transform_active()
    )


def functorch_transform_active() -> bool:
    """Whether a functorch transform (torch.func.grad, vjp, jacrev, vmap, ...) is running here. Dynamo runs it at
    trace time (traced, the call would be a graph value, never None), where tracing ``torch.compile(torch.func.grad
    (f))`` runs the transform's interpreter."""
    return torch._C._functorch.peek_interpreter_stack() is not None


# What torch.compiler.assume_constant_result marks (torch 2.11 and 2.13), set here because calling it imports dynamo
# and Inductor, which ``import moe_ops`` does not.
functorch_transform_active._dynamo_marked_constant = True


def grad_tracking(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is tracked by a torch.func reverse-mode transform (grad, vjp) running here."""
    return torch._C._functorch.is_gradtrackingtensor(tensor)


def custom_op_kernel(qualname: str, device_type: str):
    """The kernel registered with ``register_kernel(device_type)`` on the custom op ``qualname``, or None."""
    opdef = OPDEFS.get(qualname)
    return None if opdef is None else opdef._backend_fns.get(device_type)
