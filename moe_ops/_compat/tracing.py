"""Calls whose traceable form differs between the torch versions moe_ops supports: torch 2.11's dynamo breaks
the graph at ``torch.sym_min`` of two ints and cannot trace the message function of ``torch._check_value``;
torch 2.13's traces both. Light: imports only torch."""

from __future__ import annotations

import torch

__all__ = ["check_value", "sym_min"]

# torch 2.13 is the first release checked to trace a message function (tests/test_expert_parallel.py compiles
# one on the CPU; the GPU box's 2.11 refuses it).
_MESSAGE_FUNCTIONS_TRACE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 13)


def sym_min(a, b):
    """``min(a, b)`` for ints or SymInts, without a guard on which is smaller."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)


def check_value(condition, message: str) -> None:
    """``torch._check_value``: eager, a ValueError with ``message``; compiled, an assertion in the graph (a
    condition of data fails at run time as a RuntimeError naming the condition; one known while tracing fails
    there, with ``message`` on torch 2.13, torch's own on 2.11)."""
    if _MESSAGE_FUNCTIONS_TRACE or not torch.compiler.is_compiling():
        torch._check_value(condition, lambda: message)
    else:
        torch._check_value(condition)
