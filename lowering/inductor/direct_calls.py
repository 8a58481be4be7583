"""Extern calls of moe_ops ops from compiled graphs, without the dispatcher on CUDA.

An op Inductor does not generate code for becomes an extern call, ``torch.ops.moe_ops.<op>(...)`` in the
compiled graph's Python wrapper. On torch 2.11 that call passes the custom-op layers (autograd wrapper,
redispatch, the backend wrapper's checks) before reaching the op's CUDA kernel: ~0.15 ms of host time
per call, more than the kernels take at decode sizes. The wrapper of a compiled inference graph holds
plain CUDA tensors and runs no autograd, so for CUDA inputs it calls the op's CUDA kernel itself (the
function the dispatcher would end in). C++ wrappers (AOTInductor) keep the dispatcher call.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

import moe_ops.capacity  # noqa: F401  (defines moe_ops::apply_capacity, lowered here)
from moe_ops._compat.inductor import V, ir, register_lowering, wrap_for_lowering


class _DirectCudaCall(ir.FallbackKernel):
    def codegen(self, wrapper) -> None:
        if not V.graph.cpp_wrapper:
            wrapper.add_import_once("import moe_ops._dispatch")
            self.python_kernel_name = f"moe_ops._dispatch.{self.op_overload._opname}_cuda"
        super().codegen(wrapper)


def extern_call(op_overload, *args):
    """The op as one extern call (what Inductor does for any op it has no lowering for)."""
    tensors = [a for a in pytree.tree_leaves(args) if isinstance(a, ir.IRNode)]
    on_cuda = bool(tensors) and all(t.get_device() is not None and t.get_device().type == "cuda" for t in tensors)
    kernel = _DirectCudaCall if on_cuda else ir.FallbackKernel
    return pytree.tree_map(
        lambda x: wrap_for_lowering(x) if isinstance(x, ir.IRNode) else x, kernel.create(op_overload, *args)
    )


def _register_extern_lowering(op_overload) -> None:
    register_lowering(op_overload, type_promotion_kind=None)(lambda *args: extern_call(op_overload, *args))


# route and block_schedule: lowering/inductor/kernel_calls.py (their kernels in the graph, else these extern calls).
_register_extern_lowering(torch.ops.moe_ops.apply_capacity.default)
