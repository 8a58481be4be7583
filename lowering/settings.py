"""The switches of the moe_ops graph passes and lowerings (``moe_ops.config``), in a module of their own so
that every pass can read them without importing the package that installs the passes."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass


@dataclass
class RewriteConfig:
    """Switches of the moe_ops graph passes (``moe_ops.config``).

    Attributes:
        rewrites: run the rewrites when Inductor compiles a graph. Part of the passes' cache key,
                  so graphs compiled with the rewrites on are never reused with them off.
        transformers_eager_experts: while dynamo traces a transformers experts module with
                  ``experts_implementation="eager"`` (and ``rewrites`` is on), run it as
                  ``moe_ops.fused_experts`` instead of its per-expert loop, which dynamo cannot capture.
                  Dynamo guards on this switch and on ``rewrites``: changing either recompiles, no
                  ``torch._dynamo.reset()`` needed. ``experts_implementation="moe_ops"`` ignores both.
        stack_expert_weights: rewrite a static loop over experts that hold separate weight tensors
                  (mistral-inference, transformers <= 4.47 Mixtral; captured only with dynamo's
                  ``capture_dynamic_output_shape_ops``) by stacking their weights into (E, F, H)
                  tensors: a copy of all expert weights on every call, so off by default (cost in
                  ``lowering/graph/match_expert_loop.py``). Part of the passes' cache key.
        inductor_templates: Inductor lowers ``fused_experts`` and ``expert_gemm`` into Triton templates
                  (on CUDA) into which neighbouring pointwise work fuses; off, each op is one opaque
                  extern call. Part of the passes' cache key.
        training_rewrites: also rewrite training graphs (AOTAutograd's joint graph), so that their
                  backward is the moe_ops ops' formulas (lowering/graph/joint_rewrite.py). Off by default:
                  a training step is slower with it than plain torch.compile today (benchmarks/results/
                  training_*.md); training graphs then compute what the plain code does. Part of the
                  passes' cache key.

    Every setting is a bool; setting a name that is not one of them, or a value that is not a bool,
    raises (a typo would otherwise create a new attribute that nothing reads).
    """

    rewrites: bool = True
    transformers_eager_experts: bool = True
    stack_expert_weights: bool = False
    inductor_templates: bool = True
    training_rewrites: bool = False

    def __setattr__(self, name: str, value) -> None:
        settings = [f.name for f in dataclasses.fields(self)]
        if name not in settings:
            close = difflib.get_close_matches(name, settings, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the settings are {', '.join(settings)}"
            raise AttributeError(f"moe_ops.config has no setting {name!r}: {hint}")
        if not isinstance(value, bool):
            raise TypeError(f"moe_ops.config.{name}: expected True or False, got {value!r}")
        object.__setattr__(self, name, value)


config = RewriteConfig()
