"""The graph rewrites in the order the passes run them."""

from __future__ import annotations

import functools

from moe_ops.lowering.graph.experts_rewrite import rewrite_experts
from moe_ops.lowering.graph.match_dense_experts import find_dense_input_scaled_blocks
from moe_ops.lowering.graph.match_expert_loop import find_expert_loop_blocks
from moe_ops.lowering.graph.match_grouped_mm import find_grouped_mm_blocks
from moe_ops.lowering.graph.match_torchtitan import find_torchtitan_blocks
from moe_ops.lowering.graph.match_weight_gather import find_weight_gather_blocks
from moe_ops.lowering.graph.quantised_weights import rewrite_quantised_weights
from moe_ops.lowering.graph.route_rewrite import rewrite_routing_prologues

# The routed-experts forms recognised (each yields candidate blocks of the post-grad graph).
EXPERT_FORMS = (find_grouped_mm_blocks, find_torchtitan_blocks, find_weight_gather_blocks, find_expert_loop_blocks,
                find_dense_input_scaled_blocks)
# Each rewrite takes the post-grad graph and returns how many subgraphs it replaced. Routing first:
# an experts block then reads the route op's ids, whose int64 cast it skips.
REWRITES = (rewrite_routing_prologues, functools.partial(rewrite_experts, forms=EXPERT_FORMS))
# The post-grad pass's: then quantised expert weights handed over as stored. Not the joint graph's: its
# fused_experts become the training variant (lowering/graph/joint_rewrite.py), which takes no quantised weights.
POST_GRAD_REWRITES = (*REWRITES, rewrite_quantised_weights)
