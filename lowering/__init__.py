"""torch.compile rewrites: post-grad graph passes that replace plain-PyTorch MoE code by moe_ops ops.

``import moe_ops`` installs the passes (``enable()``); ``disable()`` or the ``rewrites_disabled()``
context manager turn them off. What was rewritten is logged to the ``"moe_ops"`` logger (INFO: one
line per rewrite; DEBUG: one line per rejected candidate, with the reason) and counted in
``torch._dynamo.utils.counters["moe_ops"]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch._inductor.config as inductor_config


@dataclass
class RewriteConfig:
    """Switches of the moe_ops graph passes (``moe_ops.config``).

    Attributes:
        rewrites: run the rewrites when Inductor compiles a graph. Part of the passes' cache key,
                  so graphs compiled with the rewrites on are never reused with them off.
    """

    rewrites: bool = True


config = RewriteConfig()


def enable() -> None:
    """Turn the rewrites on and make sure the moe_ops pass is installed (idempotent).

    The pass goes into ``torch._inductor.config.post_grad_custom_post_pass``. A pass already there
    is kept: the moe_ops pass runs it first, then its own rewrites. A pass set there *after*
    ``enable()`` replaces the moe_ops pass; call ``enable()`` again to chain it.
    """
    from lowering.passes import MoeOpsPostGradPass

    config.rewrites = True
    installed = inductor_config.post_grad_custom_post_pass
    if not isinstance(installed, MoeOpsPostGradPass):
        inductor_config.post_grad_custom_post_pass = MoeOpsPostGradPass(previous=installed)


def disable() -> None:
    """Turn the rewrites off; the installed pass then only runs the pass it chains, if any."""
    config.rewrites = False


@contextlib.contextmanager
def rewrites_disabled() -> Iterator[None]:
    """Compile without the moe_ops rewrites inside the block; the previous setting comes back after."""
    saved = config.rewrites
    config.rewrites = False
    try:
        yield
    finally:
        config.rewrites = saved
