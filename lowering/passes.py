"""The passes that Inductor runs: each chains any pass installed before it in its hook, then the rewrites.

Inductor keys its FX graph cache on ``uuid()`` of every custom pass, so the uuid covers the source
of this package and of moe_ops (a code change invalidates cached graphs), every ``moe_ops.config`` switch
and the chained pass.

This module is imported while ``torch._inductor.config`` is (moe_ops.lowering.install), so it imports
nothing heavy itself: the rewrites (which import dynamo) and the Inductor lowerings load at the first
graph a pass sees, inside ``__call__`` and ``rewrite``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

import moe_ops.layout as _op_layer  # its folder: the op layer, hashed with the passes
from moe_ops._compat.inductor_hooks import CustomGraphPass, custom_passes_in
from moe_ops.settings import config

log = logging.getLogger("moe_ops")



@functools.cache
def _source_hash() -> str:
    """Hash of the rewrites and of the ops they emit (whose schemas and fake kernels they rely on)."""
    hasher = hashlib.sha256()
    for folder in (Path(__file__).parent, Path(_op_layer.__file__).parent):
        for path in sorted(folder.rglob("*.py")):
            hasher.update(f"{folder.name}/{path.relative_to(folder)}".encode())
            hasher.update(path.read_bytes())
    return hasher.hexdigest()


class _ChainedPass(CustomGraphPass):
    """An Inductor custom-pass hook of moe_ops: ``previous`` (what the hook held before), then the
    moe_ops rewrites when ``moe_ops.config.rewrites`` is on."""

    hook = ""  # the torch._inductor.config field this pass is installed in

    def __init__(self, previous=None):
        self.previous = previous

    def __deepcopy__(self, memo):
        # torch 2.13 gives a thread that set no hook a deep copy of the hook's default, which the installation
        # sets to this pass (set_hook_for_every_thread): every thread runs this one pass and what it chains.
        return self

    def __call__(self, graph: torch.fx.Graph) -> None:
        # The Inductor lowerings of the moe_ops ops, registered at the first graph Inductor compiles
        # (before it lowers that graph): importing Inductor's lowering module while torch._inductor.config,
        # whose import installs this pass, is still being imported would be too early.
        import moe_ops.lowering.inductor.fused_experts_lowering  # noqa: F401

        for chained in custom_passes_in(self.previous):
            chained(graph)
        if config.rewrites:
            self.rewrite(graph)

    def rewrite(self, graph: torch.fx.Graph) -> None:
        raise NotImplementedError

    def uuid(self) -> str | None:
        chained_uuids = []
        for chained in custom_passes_in(self.previous):
            chained_uuid = chained.uuid() if isinstance(chained, CustomGraphPass) else None
            if chained_uuid is None:
                # As for a bare function in the hook: Inductor cannot key the cache, so it bypasses it.
                return None
            chained_uuids.append(repr(chained_uuid))
        return (
            f"moe_ops.{self.hook}:{_source_hash()}:{config.cache_key()}:chained=[{','.join(chained_uuids)}]"
        )


class MoeOpsPostGradPass(_ChainedPass):
    """``post_grad_custom_post_pass``: inference graphs and the forward and backward graphs of training."""

    hook = "post_grad_custom_post_pass"

    def rewrite(self, graph: torch.fx.Graph) -> None:
        from moe_ops.lowering.graph.pipeline import POST_GRAD_REWRITES

        # Inductor's own passes leave dead nodes behind (a folded x * 0 keeps its x): a dead reader is no reader.
        graph.eliminate_dead_code()
        for rewrite in POST_GRAD_REWRITES:
            if rewrite(graph):
                # What a rewrite replaced goes before the next rewrite reads the graph: a rewritten block's old
                # nodes would still read what the next one matches (the dequantised weights, say) otherwise.
                graph.eliminate_dead_code()


class MoeOpsJointPass(_ChainedPass):
    """``joint_custom_post_pass``: training graphs before partitioning, so that the rewritten blocks' backward
    comes from the moe_ops ops' autograd formulas (lowering/graph/joint_rewrite.py). It runs after Inductor's own
    joint-graph patterns, which leave the forward as the post-grad matchers expect it (for example
    ``where(mask, 0.0, x)`` with the scalar folded in)."""

    hook = "joint_custom_post_pass"

    def rewrite(self, graph: torch.fx.Graph) -> None:
        from moe_ops.lowering.graph.joint_rewrite import is_joint_graph, rewrite_joint_graph
        from moe_ops.lowering.graph.pipeline import REWRITES

        if not is_joint_graph(graph):
            return
        if config.training_rewrites:
            rewrite_joint_graph(graph, REWRITES)
        else:
            log.debug("training graph not rewritten: moe_ops.config.training_rewrites is off")


class MoeOpsPreGradPass(_ChainedPass):
    """``pre_grad_custom_pass``: the graph dynamo made, before AOTAutograd traces it. Nothing is rewritten here: with
    training_rewrites on, what in the user's code alters gradients (detach, no_grad, custom autograd Functions,
    hooks) is noted for MoeOpsJointPass, which does not put the ops' backward where that code made the plain one
    different (lowering/graph/joint_rewrite.py)."""

    hook = "pre_grad_custom_pass"

    def rewrite(self, graph: torch.fx.Graph) -> None:
        if config.training_rewrites:
            from moe_ops.lowering.graph.joint_rewrite import note_gradient_alterations

            note_gradient_alterations(graph)


# Where each pass is installed.
PASSES = (MoeOpsPreGradPass, MoeOpsPostGradPass, MoeOpsJointPass)
