"""Calls whose traceable form differs between the torch versions moe_ops supports (torch 2.11's dynamo breaks
the graph at ``torch.sym_min`` of two ints and cannot trace the message function of ``torch._check_value``;
torch 2.13's traces both), or between tracing and saving (torch.export saves a graph of symbolic sizes built
from its own list of operators: ``math.ceil`` is not among them, and a NamedTuple output needs a registered
name). Light: imports only torch."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

__all__ = ["check_value", "register_for_export", "sym_ceil", "sym_min"]

# torch 2.13 is the first release checked to trace a message function (tests/test_expert_parallel.py compiles
# one on the CPU; the GPU box's 2.11 refuses it).
_MESSAGE_FUNCTIONS_TRACE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 13)


def sym_min(a, b):
    """``min(a, b)`` for ints or SymInts, without a guard on which is smaller."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)


def sym_ceil(x):
    """``math.ceil`` of a float or SymFloat >= 0, as an int or SymInt, in operators torch.export saves (a graph
    holding ``math.ceil`` or ``math.floor`` of a symbolic size traces but cannot be saved): the truncation, one
    more where it cut something off."""
    whole = torch.sym_int(x)
    return torch.sym_ite(x > whole, whole + 1, whole)


def register_for_export(named_tuple: type, name: str) -> type:
    """Register a public NamedTuple under ``name`` in torch's pytree registry, so that torch.export can save (and
    AOTInductor package) a program returning one; torch refuses a NamedTuple it has no name for."""
    pytree._register_namedtuple(named_tuple, serialized_type_name=name)
    return named_tuple


def check_value(condition, message: str) -> None:
    """``torch._check_value``: eager, a ValueError with ``message``; compiled, an assertion in the graph (a
    condition of data fails at run time as a RuntimeError naming the condition; one known while tracing fails
    there, with ``message`` on torch 2.13, torch's own on 2.11)."""
    if _MESSAGE_FUNCTIONS_TRACE or not torch.compiler.is_compiling():
        torch._check_value(condition, lambda: message)
    else:
        torch._check_value(condition)
