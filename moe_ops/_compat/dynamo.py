"""Dynamo's counters (what moe_ops counts its rewrites in) and the fake mode of a traced graph's values. Checked
on torch 2.11.0 (the GPU box) and 2.13.0 (CPU CI); tests/test_compat.py imports every entry, so a torch
release that moves one fails there first, by name."""

from __future__ import annotations

from torch._dynamo.utils import counters
from torch._guards import detect_fake_mode

__all__ = ["counters", "detect_fake_mode"]
