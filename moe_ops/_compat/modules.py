"""nn.Module's hook registries: private attributes of a module and of ``torch.nn.modules.module`` (for the hooks
that ``register_module_forward_hook`` and its kin add to every module), the same in the torch versions moe_ops
supports."""

from __future__ import annotations

import torch.nn.modules.module as _module_registry
from torch import nn

__all__ = ["hooks_a_call_runs"]

# (what a message calls the hooks, a module's own registry, the registry for every module)
_HOOK_REGISTRIES = (("forward", "_forward_hooks", "_global_forward_hooks"),
                    ("forward pre", "_forward_pre_hooks", "_global_forward_pre_hooks"),
                    ("backward", "_backward_hooks", "_global_backward_hooks"),
                    ("backward pre", "_backward_pre_hooks", "_global_backward_pre_hooks"))


def hooks_a_call_runs(module: nn.Module) -> str | None:
    """The first kind of hook that calling ``module`` runs, as "forward hooks" or "global forward hooks" (one
    registered for every module), or None where a call runs none."""
    for kind, own, everywhere in _HOOK_REGISTRIES:
        if getattr(module, own):
            return f"{kind} hooks"
        if getattr(_module_registry, everywhere):
            return f"global {kind} hooks"
    return None
