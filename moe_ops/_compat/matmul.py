"""torch's grouped GEMM (``torch._grouped_mm``, private in torch 2.11 and 2.13), which moe_ops calls for
weight gradients where it has a native kernel. tests/test_compat.py imports every entry."""

from __future__ import annotations

import functools

import torch

__all__ = ["grouped_mm", "native_grouped_mm"]


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` with ``offsets`` (G,) int32, each group's end. For 2-D ``a`` (M, P) and ``b``
    (P, N): the (G, M, N) products of the column/row groups along P. For 2-D ``a`` (M, K) and 3-D ``b``
    (G, K, N): (M, N), each row group of ``a`` times its ``b[g]``; rows past the last end are not written."""
    return torch._grouped_mm(a, b, offs=offsets)


def native_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs its CUTLASS kernel here: bf16 on sm90 or sm100 (torch 2.11-2.13).
    Elsewhere it falls back to a loop over the groups that copies the offsets to the host (a sync)."""
    return device.type == "cuda" and dtype == torch.bfloat16 and _grouped_mm_arch(device.index or 0)


@functools.cache
def _grouped_mm_arch(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] in (9, 10)
