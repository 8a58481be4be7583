"""torch.compile integration of moe_ops (installed as ``moe_ops.lowering``): graph passes that rewrite plain
PyTorch MoE code into moe_ops ops, and Inductor lowerings of those ops. docs/architecture.md lists the
modules by role.

``import moe_ops`` turns the passes on (``install.enable()``); ``disable()`` or ``rewrites_disabled()``
turn them off. What was rewritten is logged to the ``"moe_ops"`` logger (INFO: one line per rewrite, and
why a router's experts were not rewritten; DEBUG: every rejected candidate) and counted in
``torch._dynamo.utils.counters["moe_ops"]``. This package's ``__init__`` imports nothing, so that
``import moe_ops`` stays light (see install.py).
"""
