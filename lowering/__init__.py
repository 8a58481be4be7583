"""torch.compile rewrites: post-grad graph passes that replace plain-PyTorch MoE code by moe_ops ops.

``import moe_ops`` installs the passes (``enable()``); ``disable()`` or the ``rewrites_disabled()``
context manager turn them off. What was rewritten is logged to the ``"moe_ops"`` logger (INFO: one
line per rewrite; DEBUG: one line per rejected candidate, with the reason) and counted in
``torch._dynamo.utils.counters["moe_ops"]``.

transformers' experts modules are not reached by a graph pass (dynamo breaks the graph in their per-expert
loop); where transformers is installed, ``enable()`` also registers the "moe_ops" and "eager" experts
implementations of ``moe_ops.lowering.hf_experts``, which call ``moe_ops.fused_experts`` instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator

import torch._inductor.config as inductor_config

import moe_ops.lowering.fused_experts_lowering  # noqa: F401  (registers the Inductor lowerings)
from moe_ops.lowering.passes import PASSES
from moe_ops.lowering.settings import config

log = logging.getLogger("moe_ops")




def enable() -> None:
    """Turn the rewrites on and make sure the moe_ops pass is installed (idempotent).

    The passes go into ``torch._inductor.config.post_grad_custom_post_pass`` (inference graphs) and
    ``joint_custom_post_pass`` (training graphs). A pass already in either hook is kept: the moe_ops
    pass runs it first, then its own rewrites. A pass set there *after* ``enable()`` replaces the
    moe_ops pass; call ``enable()`` again to chain it.

    Where transformers is installed, it is imported here, and the "moe_ops" and "eager" experts
    implementations are registered in its ``ALL_EXPERTS_FUNCTIONS`` (see ``lowering.hf_experts``).
    """
    config.rewrites = True
    for moe_ops_pass in PASSES:
        installed = getattr(inductor_config, moe_ops_pass.hook)
        if not isinstance(installed, moe_ops_pass):
            setattr(inductor_config, moe_ops_pass.hook, moe_ops_pass(previous=installed))
    _register_transformers_experts()


def _register_transformers_experts() -> None:
    # At import, not on first use: a model built after ``import moe_ops`` must find "moe_ops" among the
    # experts implementations that transformers validates its config against.
    if importlib.util.find_spec("transformers") is None:
        return
    try:
        from moe_ops.lowering.hf_experts import register_experts_implementations
    except ImportError as error:  # a transformers without use_experts_implementation (< 5), or a broken install
        log.debug("transformers experts implementations not registered: %s", error)
        return
    register_experts_implementations()


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
