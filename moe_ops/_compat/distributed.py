"""torch.distributed's functional collectives: the collectives that torch.compile traces into one graph
(Inductor lowers them and may overlap them with compute) and that carry autograd. Private in torch
(``torch.distributed._functional_collectives``); checked on torch 2.11.0 (the GPU box) and 2.13.0 (CPU
CI); tests/test_compat.py imports every entry, so a torch release that moves one fails there first."""

from __future__ import annotations

from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

__all__ = ["all_to_all_single", "all_to_all_single_autograd"]
