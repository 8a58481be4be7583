"""Calling an op's CUDA kernel without the dispatcher, when that provably changes nothing.

A ``torch.library.custom_op`` call passes through Python layers (autograd wrapper, redispatch, the
backend wrapper's aliasing checks) that cost more host time than the kernels take on the GPU at
decode sizes (benchmarks/results/host_profile_*.md). For plain CUDA tensors that need no autograd,
outside torch.compile and any mode, the dispatcher would reach exactly the op's CUDA kernel: the
public functions call that kernel themselves. Everything else (compile, fake/meta tensors, subclasses,
autograd, vmap, CPU) goes through the op.
"""

from __future__ import annotations

import torch

from moe_ops._compat.dispatch import custom_op_kernel, no_tracing_or_modes_active


def direct_cuda_call_allowed(*tensors: torch.Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    if not all(type(t) is torch.Tensor and t.is_cuda for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return no_tracing_or_modes_active()


def launch_jit(kernel, grid, num_warps: int, *args, **constexprs) -> None:
    """A kernel launch of the eager launchers, which share their launch code with the compiled graph's
    (lowering/inductor/kernel_calls.py passes its own ``launch``)."""
    kernel[grid](*args, num_warps=num_warps, **constexprs)


def __getattr__(name: str):
    """``moe_ops._dispatch.<op>_cuda``: the CUDA kernel of ``moe_ops::<op>``, which Inductor-compiled
    graphs call directly (lowering/inductor/direct_calls.py)."""
    if name.endswith("_cuda"):
        kernel = custom_op_kernel(f"moe_ops::{name[:-len('_cuda')]}", "cuda")
        if kernel is not None:
            return kernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
