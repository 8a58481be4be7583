"""The passes that Inductor runs: each chains any pass installed before it in its hook, then the rewrites.

Inductor keys its FX graph cache on ``uuid()`` of every custom pass, so the uuid covers the source
of this package and of moe_ops (a code change invalidates cached graphs), the on/off switch and the
chained pass.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

import moe_ops._compat as _compat  # its folder: the op layer, hashed with the passes
from moe_ops._compat import custom_passes_in
from moe_ops.lowering.experts_rewrite import rewrite_experts
from moe_ops.lowering.joint_rewrite import is_joint_graph, rewrite_joint_graph
from moe_ops.lowering.match_expert_loop import find_expert_loop_blocks
from moe_ops.lowering.match_grouped_mm import find_grouped_mm_blocks
from moe_ops.lowering.match_torchtitan import find_torchtitan_blocks
from moe_ops.lowering.match_weight_gather import find_weight_gather_blocks
from moe_ops.lowering.route_rewrite import rewrite_routing_prologues
from moe_ops.lowering.settings import config

log = logging.getLogger("moe_ops")

# The routed-experts forms recognised (each yields candidate blocks of the post-grad graph).
EXPERT_FORMS = (find_grouped_mm_blocks, find_torchtitan_blocks, find_weight_gather_blocks, find_expert_loop_blocks)
# Each rewrite takes the post-grad graph and returns how many subgraphs it replaced. Routing first:
# an experts block then reads the route op's ids, whose int64 cast it skips.
REWRITES = (rewrite_routing_prologues, functools.partial(rewrite_experts, forms=EXPERT_FORMS))


@functools.cache
def _source_hash() -> str:
    """Hash of the rewrites and of the ops they emit (whose schemas and fake kernels they rely on)."""
    hasher = hashlib.sha256()
    for folder in (Path(__file__).parent, Path(_compat.__file__).parent):
        for path in sorted(folder.glob("*.py")):
            hasher.update(f"{folder.name}/{path.name}".encode())
            hasher.update(path.read_bytes())
    return hasher.hexdigest()


class _ChainedPass(CustomGraphPass):
    """An Inductor custom-pass hook of moe_ops: ``previous`` (what the hook held before), then the
    moe_ops rewrites when ``moe_ops.config.rewrites`` is on."""

    hook = ""  # the torch._inductor.config field this pass is installed in

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, graph: torch.fx.Graph) -> None:
        # The Inductor lowerings of the moe_ops ops, registered at the first graph Inductor compiles
        # (before it lowers that graph): importing Inductor's lowering module while torch._inductor.config,
        # whose import installs this pass, is still being imported would be too early.
        import moe_ops.lowering.fused_experts_lowering  # noqa: F401

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
            f"moe_ops.{self.hook}:{_source_hash()}:rewrites={config.rewrites}"
            f":stack_expert_weights={config.stack_expert_weights}"
            f":inductor_templates={config.inductor_templates}:training_rewrites={config.training_rewrites}"
            f":chained=[{','.join(chained_uuids)}]"
        )


class MoeOpsPostGradPass(_ChainedPass):
    """``post_grad_custom_post_pass``: inference graphs and the forward and backward graphs of training."""

    hook = "post_grad_custom_post_pass"

    def rewrite(self, graph: torch.fx.Graph) -> None:
        if sum(rewrite(graph) for rewrite in REWRITES):
            graph.eliminate_dead_code()


class MoeOpsJointPass(_ChainedPass):
    """``joint_custom_post_pass``: training graphs before partitioning, so that their backward comes
    from the moe_ops ops' autograd formulas (lowering/joint_rewrite.py). It runs after Inductor's own
    joint-graph patterns, which leave the forward as the post-grad matchers expect it (for example
    ``where(mask, 0.0, x)`` with the scalar folded in)."""

    hook = "joint_custom_post_pass"

    def rewrite(self, graph: torch.fx.Graph) -> None:
        if not is_joint_graph(graph):
            return
        if config.training_rewrites:
            rewrite_joint_graph(graph, REWRITES)
        else:
            log.debug("training graph not rewritten: moe_ops.config.training_rewrites is off")


# Where each pass is installed.
PASSES = (MoeOpsPostGradPass, MoeOpsJointPass)
