"""torch.distributed's functional collectives: the collectives that torch.compile traces into one graph
(Inductor lowers them and may overlap them with compute) and that carry autograd. Private in torch
(``torch.distributed._functional_collectives``); checked on torch 2.11.0 (the GPU box) and 2.13.0 (CPU
CI); tests/test_compat.py imports every entry, so a torch release that moves one fails there first."""

from __future__ import annotations

from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

__all__ = ["all_to_all_single", "all_to_all_single_autograd", "INDUCTOR_OVERLAP_PASSES", "inductor_overlap_config"]

# Inductor's scheduling passes that move collectives and their waits around compute (functions of
# torch._inductor.comms, named in its config): torch 2.13's default list is empty, so they are named here.
INDUCTOR_OVERLAP_PASSES = ("sink_waits", "raise_comms", "reorder_compute_for_overlap")


def inductor_overlap_config() -> dict:
    """The torch._inductor.config settings under which a compiled graph overlaps collectives with compute
    (for ``torch._inductor.config.patch(**...)``)."""
    return dict(reorder_for_compute_comm_overlap=True,
                reorder_for_compute_comm_overlap_passes=list(INDUCTOR_OVERLAP_PASSES))
