"""The switches of moe_ops (``moe_ops.config``), in a module that imports nothing of the package at import time, so
that the kernels' launchers (batch invariance) and the compiler integration (the rewrites) read them alike."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import warnings
from dataclasses import dataclass


@dataclass
class Config:
    """Switches of moe_ops (``moe_ops.config``). Every one that changes what a compiled graph holds is part
    of the graph passes' cache key, so Inductor's cache never hands a graph compiled with one value to another.
    A switch is read when a function compiles: a function compiled before a change keeps the graphs it was
    compiled with (dynamo's cache of compiled frames does not know the switches), except the code of a
    transformers experts module, which dynamo guards on ``rewrites`` and the two ``transformers_*`` switches
    (below) and recompiles on a change. ``torch.compiler.reset()`` makes every function compile again with the
    switches of the moment (a new ``torch.compile`` of the same module does not: the frames are the same). The
    first change of each switch after something was compiled in the process warns so. ``batch_invariant`` is
    also read by the kernels at each eager launch (below).

    Attributes:
        rewrites: run the rewrites when Inductor compiles a graph.
        transformers_eager_experts: while dynamo traces a transformers experts module with
                  ``experts_implementation="eager"`` (and ``rewrites`` is on), run it as
                  ``moe_ops.fused_experts`` instead of its per-expert loop, which dynamo cannot capture; the
                  same for the MoE code that transformers gives no experts interface and moe_ops wraps
                  (LongCat-Flash, Step-3.7, DBRX, JetMoE, Aria: docs/index.md).
                  Dynamo guards on this switch and on ``rewrites``: changing either recompiles, no
                  ``torch._dynamo.reset()`` needed. ``experts_implementation="moe_ops"`` ignores both.
        transformers_quantised_experts: while dynamo traces a transformers experts module whose expert
                  weights are torchao tensors that ``moe_ops.fused_experts`` reads (int8 / fp8 per row, int8
                  in groups, fp8 with fp8 inputs per row), with ``experts_implementation="grouped_mm"`` or
                  ``"batched_mm"`` (and ``rewrites`` on), run it as ``moe_ops.fused_experts`` over the stored
                  values, as ``"moe_ops"`` does: torchao's own path there dequantises the weights on every
                  call, multiplies fp8 inputs with ``torch._scaled_grouped_mm`` or, for its int8 tensors,
                  cannot be traced. Dynamo guards on it as on ``transformers_eager_experts``.
        stack_expert_weights: rewrite a static loop over experts that hold separate weight tensors
                  (mistral-inference, transformers <= 4.47 Mixtral; captured only with dynamo's
                  ``capture_dynamic_output_shape_ops``) by stacking their weights into (E, F, H)
                  tensors: a copy of all expert weights on every call, so off by default (cost in
                  ``lowering/graph/match_expert_loop.py``).
        inductor_templates: Inductor lowers ``fused_experts`` and ``expert_gemm`` into Triton templates
                  (on CUDA) into which neighbouring pointwise work fuses; off, each op is one opaque
                  extern call.
        training_rewrites: also rewrite training graphs (AOTAutograd's joint graph), so that their
                  backward is the moe_ops ops' formulas (lowering/graph/joint_rewrite.py). On by default:
                  a training step with it leads plain torch.compile and a torchtitan-style block in every
                  cell and every timing round of benchmarks/bench_training.py on the H200
                  (benchmarks/results/training_nvidia-h200.md). Off, training graphs compute what the
                  plain code does. On, a compiled function whose code changes its own
                  gradients (a .detach() or no_grad block feeding gradients, custom autograd Functions,
                  tensor hooks) keeps the plain backward (docs/index.md, Training).
        batch_invariant: the Triton kernels of ``route`` and ``fused_experts`` (CUDA tensors, eager and
                  compiled) use one tile configuration whatever the number of tokens: 64-row GEMM blocks
                  without TMA, the router's tiles for any token count, the K expert outputs of a token
                  summed in a fixed order. A token's output is then bitwise the same whichever other
                  tokens share its batch, as serving stacks with batch-invariant inference need; prefill
                  is slower (benchmarks/results/batch_invariance_*.md). Off by default. Covers the
                  forward (the backward's weight gradients sum over the batch by definition); CPU tensors
                  run the references in torch's CPU matmuls, whose blocking torch chooses, so the
                  guarantee is the Triton path's. Set it before compiling: a graph already compiled in
                  this process keeps the tiles it was compiled with.

    Every setting is a bool; setting a name that is not one of them, or a value that is not a bool,
    raises (a typo would otherwise create a new attribute that nothing reads).
    """

    rewrites: bool = True
    transformers_eager_experts: bool = True
    transformers_quantised_experts: bool = True
    stack_expert_weights: bool = False
    inductor_templates: bool = True
    training_rewrites: bool = True
    batch_invariant: bool = False

    def cache_key(self) -> str:
        """Every switch and its value, for the graph passes' cache key."""
        return ":".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def __setattr__(self, name: str, value) -> None:
        settings = [f.name for f in dataclasses.fields(self)]
        if name not in settings:
            close = difflib.get_close_matches(name, settings, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the settings are {', '.join(settings)}"
            raise AttributeError(f"moe_ops.config has no setting {name!r}: {hint}")
        if not isinstance(value, bool):
            raise TypeError(f"moe_ops.config.{name}: expected True or False, got {value!r}")
        changed = name in self.__dict__ and self.__dict__[name] != value
        object.__setattr__(self, name, value)
        if changed and name not in _warned and _compiled_in_this_process():
            _warned.add(name)
            warnings.warn(f"moe_ops.config.{name} changed after torch.compile compiled code in this process: "
                          f"functions compiled before it keep the graphs they were compiled with (transformers "
                          f"experts modules of the \"eager\" implementation or with torchao weights recompile); "
                          f"torch.compiler.reset() makes them compile again",
                          stacklevel=_caller_outside_moe_ops())

    def __delattr__(self, name: str) -> None:
        # Deleting would silently put the class default back in place of the user's setting.
        raise AttributeError(f"moe_ops.config.{name} cannot be deleted: set it to True or False")


_warned: set[str] = set()  # the switches whose change warned already


def _compiled_in_this_process() -> bool:
    """Whether dynamo compiled a graph since the process started or the last torch.compiler.reset(). Never
    imports dynamo (``import moe_ops`` does not): where it is not loaded, nothing was compiled."""
    if "torch._dynamo" not in sys.modules:
        return False
    from moe_ops._compat.dynamo import compiled_since_reset  # dynamo is loaded: nothing to pay at import

    return compiled_since_reset()


def _caller_outside_moe_ops() -> int:
    """The warning's stacklevel: the user's frame, the first outside this package (enable, disable,
    rewrites_disabled) and contextlib (which enters and leaves rewrites_disabled)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("moe_ops", "contextlib")):
        frame, level = frame.f_back, level + 1
    return level


config = Config()
