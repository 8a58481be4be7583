"""Everything that differs between the torch versions moe_ops supports (2.11 on GPU, 2.13 on CPU),
or that reaches into torch internals, lives here."""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import os
import sys

import torch


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


def custom_passes_in(hook_value) -> tuple:
    """The passes held by an Inductor custom-pass hook (``config.post_grad_custom_post_pass`` etc.).

    Since about 2.12 a hook may hold a list or tuple of passes, not just one pass or None; on 2.11 it
    holds at most one. Reading it through here handles both.
    """
    if hook_value is None:
        return ()
    if isinstance(hook_value, (list, tuple)):
        return tuple(hook_value)
    return (hook_value,)


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


def no_tracing_or_modes_active() -> bool:
    """True when nothing intercepts torch calls here: no torch.compile tracing, no torch function or
    dispatch mode (FakeTensorMode, profilers' modes, ...), no functorch transform (vmap, grad)."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._len_torch_function_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def inductor_size_hint(expr) -> int:
    """The value Inductor assumes for a (possibly symbolic) size while compiling: ``optimization_hint``
    since about 2.12, ``size_hint`` before."""
    from torch._inductor.virtualized import V

    sizevars = V.graph.sizevars
    hint = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint
    return int(hint(expr))


def selected_node(autotune_result):
    """``autotune_select_algorithm`` returns the chosen node on 2.11 and (node, choice) since 2.12."""
    return autotune_result[0] if isinstance(autotune_result, tuple) else autotune_result


def custom_op_kernel(qualname: str, device_type: str):
    """The kernel registered with ``register_kernel(device_type)`` on the custom op ``qualname``, or None."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(qualname)
    return None if opdef is None else opdef._backend_fns.get(device_type)


def wrap_for_lowering(node):
    """An extern kernel's output as a lowering returns it: ``IRNode.wrap_for_lowering()`` since about
    2.12, ``TensorBox.create`` on 2.11."""
    if hasattr(node, "wrap_for_lowering"):
        return node.wrap_for_lowering()
    from torch._inductor.ir import TensorBox

    return TensorBox.create(node)


@functools.cache
def _with_num_warps(kernel, num_warps: int):
    # Inductor takes a user kernel's launch options from triton.autotune configs (dynamo wraps
    # ``kernel[grid](..., num_warps=w)`` the same way): one config, nothing to tune.
    import triton

    return triton.autotune(configs=[triton.Config({}, num_warps=num_warps)], key=[])(kernel)


def lower_user_triton_kernel(kernel, grid, num_warps: int, kwargs: dict) -> None:
    """Add a launch of the ``@triton.jit`` ``kernel`` to the graph being lowered, as Inductor lowers a
    user's kernel call (``triton_kernel_wrapper_mutation``): the tensors (IR) among ``kwargs`` that it
    writes become mutated buffers; ints, floats, bools and sympy expressions are its other arguments."""
    import sympy
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_mutation
    from torch._inductor.ir import TensorBox
    from torch._inductor.lowering import lowerings

    in_graph = {name: v for name, v in kwargs.items() if isinstance(v, (TensorBox, sympy.Expr))}
    constants = {name: v for name, v in kwargs.items() if name not in in_graph}
    lowerings[triton_kernel_wrapper_mutation](
        kernel_idx=kernel_side_table.add_kernel(_with_num_warps(kernel, num_warps)),
        constant_args_idx=kernel_side_table.add_constant_args(constants),
        grid=[tuple(grid) + (1,) * (3 - len(grid))],
        tma_descriptor_metadata={},
        kwargs=in_graph,
    )


def fix_interpreter_bf16_dot() -> None:
    """Under ``TRITON_INTERPRET=1``, make Triton's interpreter multiply bf16 dot operands as numbers.

    Triton 3.6's interpreter (checked on 3.6.0) hands bf16 operands to numpy as their raw uint16
    storage, so a bf16 ``tl.dot`` returns products of bit patterns (errors ~1e10). Upcasting them to
    fp32 first is what the tensor cores compute. Applied once, by the kernel modules that run bf16
    dots, and only in interpreter mode; fp16/fp32 dots and compiled kernels are untouched.
    tests/test_expert_gemm.py's bf16 interpreter cases fail if a Triton release changes this path.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "_moe_ops_bf16_upcast", False):
        return

    def upcast(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, *args):
        return original(self, upcast(a), upcast(b), d, *args)

    create_dot._moe_ops_bf16_upcast = True
    interpreter.InterpreterBuilder.create_dot = create_dot


class _CallAfterExec(importlib.abc.Loader):
    """A module's own loader, followed by callbacks once the module has run; every other attribute
    (get_source, get_filename, resources) is the original loader's."""

    def __init__(self, loader, callbacks):
        self._loader, self._callbacks = loader, callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for callback in self._callbacks:
            callback()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module with callbacks it asks the finders after it for the spec and
    wraps that spec's loader, so the callbacks run right after the module's first import."""

    def __init__(self):
        self.callbacks: dict[str, list] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.callbacks:
            return None
        callbacks = self.callbacks.pop(fullname)
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _CallAfterExec(spec.loader, callbacks)
                return spec
        return None


_after_import = _AfterImportFinder()


def when_imported(module_name: str, callback) -> None:
    """Run ``callback()`` once ``module_name`` is imported: now if it already is, else right after its
    import. Keeps ``import moe_ops`` from importing Inductor (and so dynamo) or transformers itself, which
    together cost seconds; they are set up when the user's program imports them (torch.compile does)."""
    if module_name in sys.modules:
        callback()
        return
    if _after_import not in sys.meta_path:
        sys.meta_path.insert(0, _after_import)
    callbacks = _after_import.callbacks.setdefault(module_name, [])
    if callback not in callbacks:
        callbacks.append(callback)
