"""Dynamo's counters (what moe_ops counts its rewrites in), the fake mode of a traced graph's values, and whether
anything was compiled since the last reset. Checked on torch 2.11.0 (the GPU box) and 2.13.0 (CPU CI);
tests/test_compat.py imports every entry, so a torch release that moves one fails there first, by name."""

from __future__ import annotations

from torch._dynamo import convert_frame
from torch._dynamo.utils import counters
from torch._guards import detect_fake_mode

__all__ = ["compiled_since_reset", "counters", "detect_fake_mode"]


def compiled_since_reset() -> bool:
    """Whether dynamo compiled a graph since the process started or torch.compiler.reset(), which zeroes its
    count of converted frames (convert_frame.FRAME_COUNTER; the count of graphs survives a reset)."""
    return convert_frame.FRAME_COUNTER > 0 and counters["stats"]["unique_graphs"] > 0
