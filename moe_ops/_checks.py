"""Argument checks shared by every op: each error names the argument and what was expected."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# What the expert-GEMM and fused-experts kernels compute in (check_kernel_dtype); float64 experts run on the
# plain-PyTorch references only (CPU tensors). The route kernel takes float64 logits too (moe_ops.routing).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
# What a quantised expert weight holds beside its fp32 scales (moe_ops.quantised): one int8 or fp8 e4m3 value
# per byte, as torchao's weight-only tensors do, or two int4 values per uint8 byte.
ONE_PER_BYTE_WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)
QUANTISED_WEIGHT_DTYPES = (*ONE_PER_BYTE_WEIGHT_DTYPES, torch.uint8)


def _fmt_shape(shape: Sequence) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensor(
    name: str,
    t,
    *,
    shape: Sequence | None = None,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise a ValueError/TypeError naming ``name`` when ``t`` is not as expected.

    ``shape`` entries may be ints or strings; a string matches any size and only labels the
    dimension in the message, e.g. ``("T", 4096)``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(
            isinstance(want, str) or got == want for got, want in zip(t.shape, shape, strict=True)
        )
        if not ok:
            raise ValueError(f"{name}: expected shape {_fmt_shape(shape)}, got {_fmt_shape(t.shape)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {_fmt_shape(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({want}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like the input), got one on {t.device}")


def check_kernel_dtype(name: str, t: torch.Tensor) -> None:
    """Refuse what the Triton kernels would not compute exactly as asked (float64 would run in fp32)."""
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name}: {str(t.dtype).replace('torch.', '')} is computed by the plain-PyTorch reference only "
            f"(CPU tensors); the Triton kernels take float32, float16 or bfloat16"
        )


def check_int(name: str, value, *, minimum: int | None = None) -> None:
    """An int (not a bool, not a float that would be truncated), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_real_weights(name: str, t: torch.Tensor) -> None:
    """Per-token weights or a mask of any real dtype (bool, integer or float: transformers' int64 attention
    mask, a float weighting), not a complex one, whose cast to a real dtype drops the imaginary part."""
    if t.is_complex():
        raise TypeError(f"{name}: expected a real (float, integer or bool) tensor, got {t.dtype}")


def check_bool(name: str, value) -> None:
    """True or False: a 1 / 0 or a string is refused rather than read by its truth ("no" is true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def shown(value):
    """A number as an error message shows it; under torch.compile in words, since dynamo cannot format a
    symbolic one (a float argument under dynamic=True, which it sees as a float)."""
    return "a value outside that range" if torch.compiler.is_compiling() else value


def check_number(name: str, value, *, minimum: float | None = None) -> None:
    """A finite real number (int or float, not a bool), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument is a SymFloat,
    # which math.isfinite cannot trace. A NaN fails the comparison too.
    if not abs(value) < math.inf or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name}: expected a finite number{bound}, got {shown(value)}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")

