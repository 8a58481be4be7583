"""Inductor's custom-pass hooks: what moe_ops installs its passes into. Light on purpose: moe_ops.lowering.passes
imports it while ``torch._inductor.config`` is itself being imported. Checked on torch 2.11.0 (the GPU box)
and 2.13.0 (CPU CI); tests/test_compat.py imports every entry, so a torch release that moves one fails there
first, by name."""

from __future__ import annotations

import contextvars
import sys

from torch._inductor.custom_graph_pass import CustomGraphPass

__all__ = ["CustomGraphPass", "custom_passes_in", "loaded_inductor_config", "set_hook_for_every_thread"]


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


def loaded_inductor_config():
    """``torch._inductor.config`` once it has run: taken from ``sys.modules``, as the post-import hook that
    installs the passes runs before the import system binds the module to its package."""
    return sys.modules["torch._inductor.config"]


def set_hook_for_every_thread(inductor_config, hook: str, value) -> None:
    """Set an Inductor custom-pass hook for the compiles of every thread (a server's worker pool, say).

    torch 2.11 keeps one value per process. torch 2.13 keeps a value set as the setting thread's own (each config
    entry a ContextVar); a thread that set nothing reads the entry's default, deep-copied first when of a mutable
    type. So the value becomes the entry's default as well: a value that must stay one object (a pass that
    chains another) defines ``__deepcopy__`` returning itself.
    """
    setattr(inductor_config, hook, value)
    entry = getattr(inductor_config, "_config", {}).get(hook)
    if isinstance(getattr(entry, "user_override", None), contextvars.ContextVar):
        entry.default = value
