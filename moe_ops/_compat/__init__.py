"""What differs between the torch versions moe_ops supports, and every reach into torch (and Triton)
internals, one module per area:

- ``dispatch``: the dispatcher and custom-op internals (dispatch-key guards, registered kernels, modes);
- ``inductor_hooks``: Inductor's custom-pass hooks (light: imported while Inductor's config is);
- ``inductor``: Inductor IR, lowerings, templates and autotuning, the graph being lowered;
- ``dynamo``: dynamo's counters and the fake mode of a traced graph;
- ``tracing``: calls whose traceable form differs between versions (``torch.sym_min``, ``torch._check_value``);
- ``imports``: running set-up code when a module gets imported;
- ``triton_interpreter``: Triton's interpreter;
- ``modules``: nn.Module's hook registries (a module's own and those for every module);
- ``matmul``: torch's grouped GEMM (``torch._grouped_mm``) and where it runs natively;
- ``distributed``: the functional collectives (traced into one graph, with autograd) and the Inductor passes
  that overlap them with compute.

This package's ``__init__`` imports nothing, so each area costs only what it imports itself.
"""
