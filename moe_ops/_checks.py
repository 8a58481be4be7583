"""Argument checks shared by every op: each error names the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


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


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_ids_in_range(name: str, ids: torch.Tensor, num_experts: int, allow_sentinels: bool) -> None:
    """Data-dependent check, run by the references only (it would synchronise the GPU).

    With ``allow_sentinels`` ids >= num_experts are expert-parallel sentinels and are allowed;
    negative ids never are.
    """
    if ids.numel() == 0:
        return
    lo = int(ids.min())
    hi = int(ids.max())
    if lo < 0 or (not allow_sentinels and hi >= num_experts):
        raise ValueError(
            f"{name}: expert ids must lie in [0, {num_experts})"
            + (" (ids >= num_experts are skipped as sentinels)" if allow_sentinels else "")
            + f", got values in [{lo}, {hi}]"
        )
