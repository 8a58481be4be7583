"""Triton's interpreter (``TRITON_INTERPRET=1``), as Triton 3.6 has it."""

from __future__ import annotations

import os

__all__ = ["fix_interpreter_bf16"]


def fix_interpreter_bf16() -> None:
    """Under ``TRITON_INTERPRET=1``, make Triton's interpreter compute with bf16 values as numbers.

    Triton 3.6's interpreter (checked on 3.6.0) stores bf16 values as their raw uint16 bits and hands those
    to numpy, so a bf16 ``tl.dot`` returns products of bit patterns (errors ~1e10) and bf16 arithmetic (``a -
    b`` of two bf16 tensors, which the GPU runs two values an instruction) adds bit patterns. Here dot
    operands are upcast to fp32 (what the tensor cores compute), and add, subtract, multiply, divide, min and
    max run in fp32 and round to the nearest bf16 (a GPU's one rounding of an exact result). Casts to bf16
    (``.to(tl.bfloat16)``, a store of fp32 values into a bf16 tensor) round to the nearest too, ties to even, as
    the GPU's do: the interpreter truncates them (toward zero, ~half an ulp low on average). Comparisons, fmod and
    operations with a Python scalar operand still see bit patterns (the kernels subtract tensors, not scalars,
    from bf16 values for that reason). Applied once, by
    the kernel modules that compute in bf16, and only in interpreter mode; other dtypes and compiled kernels
    are untouched. tests/test_expert_gemm.py's bf16 interpreter cases fail if a Triton release changes this.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_moe_ops_bf16", False):
        return
    original_dot, original_binary_op, original_cast = builder.create_dot, builder.binary_op, builder.cast_impl
    arithmetic = (np.add, np.subtract, np.multiply, np.divide, np.minimum, np.maximum)

    def upcast(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def to_bf16_bits(values_fp32):
        bits = np.ascontiguousarray(values_fp32, dtype=np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # to nearest, ties to even
        return np.where(np.isnan(values_fp32), np.uint16(0x7FC0), rounded)

    def create_dot(self, a, b, d, *args):
        return original_dot(self, upcast(a), upcast(b), d, *args)

    def binary_op(self, lhs, rhs, op):
        if op in arithmetic and lhs.dtype.scalar == tl.bfloat16 and rhs.dtype.scalar == tl.bfloat16:
            result = original_binary_op(self, upcast(lhs), upcast(rhs), op)
            return interpreter.TensorHandle(to_bf16_bits(result.data), tl.bfloat16)
        return original_binary_op(self, lhs, rhs, op)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float16, tl.float32):  # exact in fp32
            return interpreter.TensorHandle(to_bf16_bits(src.data.astype(np.float32)), tl.bfloat16)
        return original_cast(self, src, dst_type)

    create_dot._moe_ops_bf16 = True
    builder.create_dot, builder.binary_op, builder.cast_impl = create_dot, binary_op, cast_impl
