"""Inductor internals the lowerings use: IR nodes, lowering registration and the lowerings table, Triton
templates and autotuning, the graph being lowered (``V``), decompositions, and user-kernel launches. Checked
on torch 2.11.0 (the GPU box) and 2.13.0 (CPU CI); tests/test_compat.py imports every entry, so a torch
release that moves one fails there first, by name."""

from __future__ import annotations

import functools

import sympy
import triton
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_mutation
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.ir import TensorBox
from torch._inductor.lowering import empty_strided, lowerings, register_lowering
from torch._inductor.pattern_matcher import stable_topological_sort
from torch._inductor.select_algorithm import (
    ExternKernelChoice,
    SymbolicGridFn,
    TritonTemplate,
    autotune_select_algorithm,
)
from torch._inductor.virtualized import V

__all__ = [
    "ExternKernelChoice", "SymbolicGridFn", "TensorBox", "TritonTemplate", "V", "autotune_select_algorithm",
    "empty_strided", "inductor_config", "inductor_size_hint", "ir", "lower_user_triton_kernel", "lowerings",
    "online_softmax_target", "register_lowering", "select_decomp_table", "selected_node", "stable_topological_sort",
    "wrap_for_lowering",
]


@functools.cache
def online_softmax_target():
    """``prims.prepare_softmax_online``, or None where this torch lacks it.

    On CUDA (Triton backend, ``config.online_softmax``) Inductor's own post-grad patterns turn the
    amax/sum half of a decomposed softmax into this prim before ``post_grad_custom_post_pass`` runs,
    so a post-grad matcher meets both forms. The prim is registered when ``inductor_prims`` is
    imported.
    """
    try:
        import torch._inductor.inductor_prims  # noqa: F401
    except ImportError:
        return None
    packet = getattr(torch.ops.prims, "prepare_softmax_online", None)
    return None if packet is None else packet.default


def inductor_size_hint(expr) -> int:
    """The value Inductor assumes for a (possibly symbolic) size while compiling: ``optimization_hint``
    since about 2.12, ``size_hint`` before."""
    sizevars = V.graph.sizevars
    hint = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint
    return int(hint(expr))


def selected_node(autotune_result):
    """``autotune_select_algorithm`` returns the chosen node on 2.11 and (node, choice) since 2.12."""
    return autotune_result[0] if isinstance(autotune_result, tuple) else autotune_result


def wrap_for_lowering(node):
    """An extern kernel's output as a lowering returns it: ``IRNode.wrap_for_lowering()`` since about
    2.12, ``TensorBox.create`` on 2.11."""
    if hasattr(node, "wrap_for_lowering"):
        return node.wrap_for_lowering()
    return TensorBox.create(node)


@functools.cache
def _with_num_warps(kernel, num_warps: int):
    # Inductor takes a user kernel's launch options from triton.autotune configs (dynamo wraps
    # ``kernel[grid](..., num_warps=w)`` the same way): one config, nothing to tune.
    return triton.autotune(configs=[triton.Config({}, num_warps=num_warps)], key=[])(kernel)


def lower_user_triton_kernel(kernel, grid, num_warps: int, kwargs: dict) -> None:
    """Add a launch of the ``@triton.jit`` ``kernel`` to the graph being lowered, as Inductor lowers a
    user's kernel call (``triton_kernel_wrapper_mutation``): the tensors (IR) among ``kwargs`` that it
    writes become mutated buffers; ints, floats, bools and sympy expressions are its other arguments."""
    in_graph = {name: v for name, v in kwargs.items() if isinstance(v, (TensorBox, sympy.Expr))}
    constants = {name: v for name, v in kwargs.items() if name not in in_graph}
    lowerings[triton_kernel_wrapper_mutation](
        kernel_idx=kernel_side_table.add_kernel(_with_num_warps(kernel, num_warps)),
        constant_args_idx=kernel_side_table.add_constant_args(constants),
        grid=[tuple(grid) + (1,) * (3 - len(grid))],
        tma_descriptor_metadata={},
        kwargs=in_graph,
    )
