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
import dataclasses
import difflib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch._inductor.config as inductor_config

log = logging.getLogger("moe_ops")


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
                  ``lowering/match_expert_loop.py``). Part of the passes' cache key.
        inductor_templates: Inductor lowers ``fused_experts`` and ``expert_gemm`` into Triton templates
                  (on CUDA) into which neighbouring pointwise work fuses; off, each op is one opaque
                  extern call. Part of the passes' cache key.
        training_rewrites: also rewrite training graphs (AOTAutograd's joint graph), so that their
                  backward is the moe_ops ops' formulas (lowering/joint_rewrite.py). Off by default:
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


def enable() -> None:
    """Turn the rewrites on and make sure the moe_ops pass is installed (idempotent).

    The passes go into ``torch._inductor.config.post_grad_custom_post_pass`` (inference graphs) and
    ``joint_custom_post_pass`` (training graphs). A pass already in either hook is kept: the moe_ops
    pass runs it first, then its own rewrites. A pass set there *after* ``enable()`` replaces the
    moe_ops pass; call ``enable()`` again to chain it.

    Where transformers is installed, it is imported here, and the "moe_ops" and "eager" experts
    implementations are registered in its ``ALL_EXPERTS_FUNCTIONS`` (see ``lowering.hf_experts``).
    """
    import moe_ops.lowering.fused_experts_lowering  # noqa: F401  (registers the Inductor lowerings)
    from moe_ops.lowering.passes import PASSES

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
