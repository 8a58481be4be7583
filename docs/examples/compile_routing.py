"""torch.compile rewrites a Mixtral-style router, written in plain PyTorch, into one moe_ops.route call.

Nothing in the model refers to moe_ops: importing it installs the Inductor pass. The compiled router
returns what eager returns, and the "moe_ops" logger and counter show the rewrite.
"""

import logging

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moe_ops  # noqa: F401  (installs the rewrite)

T, E, K = 32, 8, 2  # tokens, experts, experts per token


def mixtral_router(router_logits: torch.Tensor):
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, K, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights.to(router_logits.dtype), selected_experts


# A graph loaded from Inductor's on-disk FX graph cache was rewritten when it was first compiled and
# skips the passes, so it logs and counts nothing: compile afresh so that every run shows the rewrite.
torch._inductor.config.fx_graph_cache = False
logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
logging.getLogger("moe_ops").setLevel(logging.INFO)

torch.manual_seed(0)
# Distinct logits in every row: both choose the experts torch.topk chooses, but the order of tied experts
# among a token's K slots is unspecified (as torch.topk's is), and the comparison below is by position.
router_logits = (torch.rand(T, E).argsort(dim=-1) - E / 2).to(torch.bfloat16) * 0.5
weights, ids = torch.compile(mixtral_router)(router_logits)  # logs "rewrote routing prologue ..."
eager_weights, eager_ids = mixtral_router(router_logits)

assert counters["moe_ops"]["route_rewrite"] == 1, "the rewrite did not fire"
assert ids.dtype == torch.int64 and torch.equal(ids, eager_ids)
assert weights.dtype == torch.bfloat16 and torch.allclose(weights.float(), eager_weights.float(), atol=1e-2)
print(f"compiled router == eager router on {T} tokens; moe_ops.route replaced the prologue")
