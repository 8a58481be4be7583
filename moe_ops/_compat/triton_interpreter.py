"""Triton's interpreter (``TRITON_INTERPRET=1``), as Triton 3.6 has it."""

from __future__ import annotations

import os

__all__ = ["fix_interpreter_bf16_dot"]


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
