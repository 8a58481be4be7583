"""transformers' experts modules through ``moe_ops.fused_experts``: the "moe_ops", "moe_ops_ep" and "eager" experts
implementations, and transformers' "grouped_mm" and "batched_mm" over torchao weights.

transformers (5.x) keeps the routed experts of a MoE layer in a module decorated with
``use_experts_implementation``. Its ``forward`` looks ``config._experts_implementation`` up in
``ALL_EXPERTS_FUNCTIONS`` and, for ``"eager"``, runs the class's own loop: ``one_hot`` -> ``nonzero`` -> a
Python loop over the experts hit -> ``index_add_``. The loop's trip count depends on the routing, so dynamo
breaks the graph there and no Inductor graph pass ever sees the experts. This module registers entries in
that interface instead of rewriting graphs:

- ``"moe_ops"``: always ``moe_ops.fused_experts``, compiled or not (``experts_implementation="moe_ops"``).
- ``"moe_ops_ep"``: ``moe_ops.fused_experts_ep`` over experts sharded by ``moe_ops.parallelize_experts``
  (which sets it).
- ``"eager"``: ``moe_ops.fused_experts`` while dynamo traces (``torch.compile``, ``torch.export``) with
  ``moe_ops.config.rewrites`` and ``moe_ops.config.transformers_eager_experts`` on; otherwise the class's
  own loop, unchanged. Dynamo guards on both switches, so flipping one recompiles.
- ``"grouped_mm"`` and ``"batched_mm"`` (transformers' own, wrapped): ``moe_ops.fused_experts`` while dynamo
  traces a module whose expert weights are torchao tensors, with ``moe_ops.config.rewrites`` and
  ``moe_ops.config.transformers_quantised_experts`` on; otherwise transformers' implementation, unchanged.

- Classes that transformers gives no experts interface (their forward is their own loop or block:
  ``OWN_LOOP_EXPERTS`` — Step-3.7, LongCat-Flash with its zero-compute experts, DBRX — and ``OWN_BLOCKS`` —
  JetMoE's block, Aria's experts): their ``forward`` is wrapped when their modeling module is imported
  (``register_own_code``) and runs ``moe_ops.fused_experts`` while dynamo traces, on the same two switches as
  ``"eager"``; otherwise their own code, unchanged.

Each calls ``fused_experts`` only for a module whose result it knows to be the same computation as
the class's own loop: the loop's code must be one of the loops below (matched token for token), the
decorator's flags must agree with it, and the activation, dtypes and devices must map onto the op.
Anything else runs the class's own loop, and the reason is logged once per experts class and reason on
the ``"moe_ops"`` logger (INFO). Each trace is counted in ``torch._dynamo.utils.counters["moe_ops"]``
(``"hf_experts"``: traced into ``fused_experts``; ``"hf_experts_fallback"``: traced the class's loop).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import logging
import textwrap
import tokenize
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.activations import (
    GELUActivation,
    GELUTanh,
    NewGELUActivation,
    ReLUSquaredActivation,
    SiLUActivation,
)
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, use_experts_implementation

from moe_ops._checks import QUANTISED_WEIGHT_DTYPES
from moe_ops._compat.dispatch import functorch_transform_active
from moe_ops._compat.dynamo import counters
from moe_ops._compat.modules import hooks_a_call_runs
from moe_ops.activations import CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT, check_clamp_constants
from moe_ops.expert_parallel import PLAN_ATTRIBUTE, fused_experts_ep
from moe_ops.fused_experts import fused_experts
from moe_ops.lowering.torchao_experts import torchao_quantised, torchao_tensor_class
from moe_ops.quantised import check_quantised_weight
from moe_ops.settings import config

log = logging.getLogger("moe_ops")

IMPLEMENTATION_NAME = "moe_ops"
EP_IMPLEMENTATION_NAME = "moe_ops_ep"
# Set by moe_ops.quantise_experts on an experts module whose weights it stored quantised (the scheme, for the
# log): each weight ``name`` is then (E, N, K) values beside ``{name}_scale`` and maybe ``{name}_zero``.
QUANTISED_ATTRIBUTE = "_moe_ops_quantised"


class EagerLoop(NamedTuple):
    """A per-expert loop of transformers that ``fused_experts`` reproduces, and what the module must declare."""

    name: str
    # (has_gate, has_bias, is_transposed, is_concatenated) of ``use_experts_implementation``: the weight
    # layout and biases this loop reads. A class whose flags differ is not the computation mapped here.
    flags: tuple[bool, bool, bool, bool]
    # Where the loop's activation comes from: "act_fn" (act_fn(gate) * up, or act_fn(up) without a gate)
    # or "apply_gate" (the class's _apply_gate, one of KNOWN_APPLY_GATES).
    gate: str
    # The loop multiplies in fp32 whatever the model's dtype: fused_experts, which rounds the activation to its
    # input's dtype, computes the same only for fp32 inputs.
    fp32_only: bool = False


# The loops, keyed by _code_fingerprint of the original (undecorated) ``forward``; read in transformers 5.17.
KNOWN_EAGER_LOOPS = {
    # MixtralExperts and 47 classes with the same code (Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4-MoE, ...):
    # gate_up_proj (E, 2F, H) -> chunk(2) -> act_fn(gate) * up -> down_proj (E, H, F), no biases.
    "40494943dd3db184": EagerLoop("MixtralExperts", (True, False, False, True), "act_fn"),
    # GptOssExperts: gate_up_proj (E, H, 2F) + gate_up_proj_bias -> self._apply_gate -> down_proj (E, F, H)
    # + down_proj_bias, the down bias scaled by the routing weight.
    "a37b05b7e1db2477": EagerLoop("GptOssExperts", (True, True, True, False), "apply_gate"),
    # Glm5NextTextExperts, HYV4Experts, MiniMaxM3VLExperts, DeepseekV4Experts: gate_up_proj (E, 2F, H) ->
    # self._apply_gate -> down_proj (E, H, F), no biases.
    "48f8e6dcf82b13bd": EagerLoop("Glm5NextTextExperts", (True, False, False, True), "apply_gate"),
    # NemotronHExperts: up_proj (E, F, H) -> act_fn -> down_proj (E, H, F), no gate, no biases.
    "d837061af87e18df": EagerLoop("NemotronHExperts", (False, False, False, True), "act_fn"),
    # OpenAIPrivacyFilterExperts: GptOssExperts' loop with gate and up concatenated, every product in fp32.
    "f10db330d674367f": EagerLoop("OpenAIPrivacyFilterExperts", (True, True, True, True), "apply_gate", fp32_only=True),
}


class ApplyGate(NamedTuple):
    """An experts class's ``_apply_gate`` (gate_up -> the activation) that one moe_ops activation computes."""

    name: str
    # "clamped_swiglu" or "clamped_silu"; None: act_fn(gate).clamp(max=limit) * up.clamp(-limit, limit), the clamp
    # after the activation, which is an op activation only where the limit is infinite (no clamp)
    activation: str | None
    interleaved: bool  # gate and up as x[..., ::2], x[..., 1::2] rather than the two halves (chunk)
    limit: str  # the attribute holding the clamp limit (its value None: no clamp)
    alpha: str | None = None  # clamped_swiglu: the attribute holding alpha
    act_fn: bool = False  # SiLU through self.act_fn (which must then be SiLU) rather than F.silu


# By _code_fingerprint (transformers 5.17):
#   clamped_swiglu: (up.clamp(-limit, limit) + 1) * gate.clamp(max=limit) * sigmoid(alpha * gate.clamp(max=limit))
#   clamped_silu:   silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
KNOWN_APPLY_GATES = {
    "a7f9b5b0d88e31cf": ApplyGate("GptOssExperts._apply_gate", "clamped_swiglu", True, "limit", "alpha"),
    "5fd2dc54dce3646a": ApplyGate("MiniMaxM3VLExperts._apply_gate", "clamped_swiglu", False, "swiglu_limit",
                                  "swiglu_alpha"),
    # Glm5NextTextExperts and HYV4Experts
    "e50d92fc68832328": ApplyGate("Glm5NextTextExperts._apply_gate", "clamped_silu", False, "swiglu_limit"),
    "8ac057487ab6184c": ApplyGate("DeepseekV4Experts._apply_gate", "clamped_silu", False, "limit", act_fn=True),
    "2010d1f4e1592a50": ApplyGate("Step3p7Experts._apply_gate", None, False, "limit"),
    "a8aad4d0d0c8d0ac": ApplyGate("OpenAIPrivacyFilterExperts._apply_gate", "clamped_swiglu", False, "limit", "alpha"),
}

# The branches of transformers' FP8Experts._apply_gate (FP8_EXPERTS_CODE): swiglu_alpha set, GPT-OSS's clamped
# SwiGLU; else limit set, act_fn(gate.clamp(max=limit)) * up.clamp(-limit, limit); else act_fn(gate) * up.
FP8_APPLY_GATES = {
    "swiglu_alpha": ApplyGate("FP8Experts gate (swiglu_alpha)", "clamped_swiglu", False, "swiglu_limit",
                              "swiglu_alpha"),
    "limit": ApplyGate("FP8Experts gate (limit)", "clamped_silu", False, "limit", act_fn=True),
}

# act_fn modules that compute exactly one moe_ops activation (exact types: a subclass may override forward).
# GELUActivation is erf GELU in both of its variants; GELUTanh and NewGELUActivation the tanh formula.
ACTIVATION_OF_TYPE = {
    nn.SiLU: "silu",
    SiLUActivation: "silu",
    GELUActivation: "gelu",
    GELUTanh: "gelu_tanh",
    NewGELUActivation: "gelu_tanh",
    nn.ReLU: "relu",
    ReLUSquaredActivation: "relu2",
}
TORCH_GELU_ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}  # nn.GELU(approximate=...)
# act_fn as a plain function (LFM2-MoE's F.silu), called with its default arguments.
ACTIVATION_OF_FUNCTION = {nn.functional.silu: "silu", nn.functional.gelu: "gelu", nn.functional.relu: "relu"}

_LAYOUT_TOKENS = {
    tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
}


def _code_fingerprint(function) -> str | None:
    """Hash of a function's source tokens, comments and line layout left out (None without source).

    Comparing code rather than class names keeps the check honest across transformers versions: a loop that
    changes, even in a class listed above, no longer matches and runs unchanged.
    """
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    text = " ".join(token.string for token in tokens if token.type not in _LAYOUT_TOKENS)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _DecoratedProbe(nn.Module):
    def forward(self):
        raise NotImplementedError


# The code object of the ``forward`` that ``use_experts_implementation`` installs: it tells transformers'
# dispatching wrapper apart from a class's own forward (both carry the same name and docstring).
_DISPATCHING_FORWARD_CODE = use_experts_implementation(_DecoratedProbe).forward.__code__


def original_experts_forward(experts_class: type):
    """The class's own per-expert loop: what transformers runs for ``experts_implementation="eager"``.

    The nearest ``forward`` in the MRO, unwrapped through every dispatching wrapper (a decorated class
    derived from a decorated class wraps its parent's wrapper). Written so that dynamo traces it.
    """
    for klass in experts_class.__mro__:
        forward = vars(klass).get("forward")
        if forward is not None:
            while getattr(forward, "__code__", None) in (_DISPATCHING_FORWARD_CODE, _REWRITTEN_FORWARD_CODE):
                forward = forward.__wrapped__
            return forward
    raise TypeError(f"experts_class: {experts_class.__name__} has no forward")


# (class, its loop's forward, its _apply_gate) -> its verified loop or why none: a method patched on the class
# after a first verification is verified again.
_LOOP_OF_CLASS: dict[tuple, EagerLoop | str] = {}


@torch.compiler.assume_constant_result
def _verified_gate(experts_class: type, flags: tuple[bool, bool, bool, bool],
                   dtype: torch.dtype) -> tuple[str | None, str | None]:
    """``(gate, None)`` where the class runs a known loop that agrees with its decorator ``flags``
    (has_gate, has_bias, is_transposed, is_concatenated) on inputs of ``dtype``; ``(None, reason)`` otherwise.

    Dynamo runs this at trace time and keeps the result as a constant: it reads source files, which dynamo
    cannot trace. It depends only on its arguments, which dynamo already guards (the class's identity, the
    flag values read in the traced caller, the input's dtype).
    """
    loop = _eager_loop(experts_class)
    if isinstance(loop, str):
        return None, loop
    if flags != loop.flags:
        return None, (
            f"its use_experts_implementation flags (has_gate, has_bias, is_transposed, is_concatenated) = "
            f"{flags} differ from {loop.flags}, those of its eager loop ({loop.name})"
        )
    if loop.fp32_only and dtype != torch.float32:
        return None, (f"its eager loop ({loop.name}) multiplies in fp32 whatever the model's dtype, and fused_experts "
                      f"in the input's ({dtype}): the results would differ by {dtype}'s rounding")
    return loop.gate, None


def _eager_loop(experts_class: type) -> EagerLoop | str:
    """The class's verified eager loop, or why it has none; found once per class and version of its methods."""
    key = (experts_class, original_experts_forward(experts_class), getattr(experts_class, "_apply_gate", None))
    if key not in _LOOP_OF_CLASS:
        _LOOP_OF_CLASS[key] = _find_eager_loop(experts_class)
    return _LOOP_OF_CLASS[key]


def _find_eager_loop(experts_class: type) -> EagerLoop | str:
    forward = original_experts_forward(experts_class)
    loop = KNOWN_EAGER_LOOPS.get(_code_fingerprint(forward))
    if loop is None:
        return (
            f"its eager loop {forward.__qualname__} is not one moe_ops has verified "
            f"({', '.join(known.name for known in KNOWN_EAGER_LOOPS.values())}.forward of transformers 5.17)"
        )
    if loop.gate == "apply_gate":
        apply_gate = getattr(experts_class, "_apply_gate", None)
        fingerprint = _code_fingerprint(apply_gate)
        known = KNOWN_APPLY_GATES.get(fingerprint)
        if known is None or known.interleaved == loop.flags[3]:
            return (f"its _apply_gate {getattr(apply_gate, '__qualname__', apply_gate)} is not one moe_ops has "
                    f"verified with this loop ({', '.join(g.name for g in KNOWN_APPLY_GATES.values())})")
        return loop._replace(gate=fingerprint)
    return loop


_REPORTED: set[tuple[type, str]] = set()


@torch.compiler.assume_constant_result
def _report(experts_class: type, message: str, fused: bool, compiling: bool) -> None:
    """Log ``message`` once per experts class and message; count traces. Dynamo runs it at trace time."""
    if compiling:
        counters["moe_ops"]["hf_experts" if fused else "hf_experts_fallback"] += 1
    if (experts_class, message) not in _REPORTED:
        _REPORTED.add((experts_class, message))
        log.info("%s: %s", experts_class.__name__, message)


def _activation_of(act_fn) -> str | None:
    act_type = type(act_fn)
    if act_type is nn.GELU:
        return TORCH_GELU_ACTIVATIONS.get(act_fn.approximate)
    if not isinstance(act_fn, nn.Module):
        return next((name for function, name in ACTIVATION_OF_FUNCTION.items() if act_fn is function), None)
    return ACTIVATION_OF_TYPE.get(act_type)


def _gate_activation(experts: nn.Module, apply_gate: ApplyGate | None) -> tuple[str, float, float] | str:
    """(activation, alpha, limit) of fused_experts that compute ``experts``' gate: the one ``apply_gate``
    describes, else its act_fn; or the reason there are none."""
    if apply_gate is None:
        activation = _activation_of(experts.act_fn)
        if activation is None:
            return f"act_fn {type(experts.act_fn).__name__} has no moe_ops activation"
        return activation, CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT  # only the clamped activations read them
    limit = getattr(experts, apply_gate.limit)
    if apply_gate.activation is None:
        if limit is not None and limit != float("inf"):
            return (f"its {apply_gate.name} clamps act_fn(gate) after the activation ({apply_gate.limit}={limit}), "
                    "which no moe_ops activation computes")
        return _gate_activation(experts, None)  # clamped by infinity: act_fn(gate) * up, NaN and inf kept
    alpha = CLAMPED_SWIGLU_ALPHA if apply_gate.alpha is None else float(getattr(experts, apply_gate.alpha))
    activation = apply_gate.activation
    if apply_gate.act_fn and _activation_of(experts.act_fn) != "silu":
        return f"its {apply_gate.name} applies act_fn {type(experts.act_fn).__name__}, not SiLU"
    if limit is None:  # clamp(max=None) clamps nothing
        if activation != "clamped_silu":
            return f"its {apply_gate.limit} is None: {activation} without a limit is no moe_ops activation"
        activation, limit = "silu", CLAMPED_SWIGLU_LIMIT
    try:  # constants the op refuses (a negative or NaN limit: torch's clamp then returns its bound) keep the loop
        check_clamp_constants(alpha, float(limit))
    except ValueError as error:
        return f"its {apply_gate.name} constants are none that fused_experts takes ({error})"
    return activation, alpha, float(limit)


def stored_quantised(experts: nn.Module, attribute: str) -> dict[str, torch.Tensor] | None:
    """The (E, N, K) values, scales and zero points (``w``, ``scale``, ``zero``) of a weight that
    moe_ops.quantise_experts stored, or None for a module it did not quantise."""
    if getattr(experts, QUANTISED_ATTRIBUTE, None) is None:
        return None
    return dict(w=getattr(experts, attribute), scale=getattr(experts, f"{attribute}_scale"),
                zero=getattr(experts, f"{attribute}_zero", None))


def fused_experts_arguments(experts: nn.Module, hidden_states: torch.Tensor, flags: tuple | None = None) -> dict | str:
    """Keyword arguments of ``moe_ops.fused_experts`` that compute what ``experts``' own loop computes on
    ``hidden_states``, or the reason there are none; ``flags`` (has_gate, has_bias, is_transposed,
    is_concatenated) for a class without transformers' decorator, which would declare them."""
    if flags is None:
        flags = (experts.has_gate, experts.has_bias, experts.is_transposed, experts.is_concatenated)
    has_gate, has_bias, is_transposed, is_concatenated = flags
    gate, reason = _verified_gate(type(experts), flags, hidden_states.dtype)
    if reason is not None:
        return reason
    if "_apply_gate" in vars(experts):
        return ("its _apply_gate is set on the module itself, which the loop calls, not the class's that moe_ops "
                "verified")
    # The loop calls its submodules (act_fn): hooks on them run there and would not in a fused_experts call.
    hooks = _skipped_hooks({name: module for name, module in experts.named_modules() if name})
    if hooks is not None:
        return hooks
    gate_activation = _gate_activation(experts, KNOWN_APPLY_GATES.get(gate))
    if isinstance(gate_activation, str):
        return gate_activation
    activation, alpha, limit = gate_activation
    first_name = "gate_up_proj" if has_gate else "up_proj"
    tensors = {"w_gate_up": first_name, "w_down": "down_proj"}
    if has_bias:
        tensors.update(b_gate_up=f"{first_name}_bias", b_down="down_proj_bias")
    if hidden_states.dim() != 2:
        return f"hidden_states has {hidden_states.dim()} dims, fused_experts takes (tokens, hidden)"
    stored_weights = {argument: stored_quantised(experts, attribute) for argument, attribute in tensors.items()
                      if argument in ("w_gate_up", "w_down")}
    reason = _weights_reason(hidden_states, {attribute: getattr(experts, attribute) for attribute in tensors.values()},
                             own_dtype={tensors[argument] for argument, stored in stored_weights.items() if stored})
    if reason is not None:
        return reason
    arguments = {}
    for argument, attribute in tensors.items():
        tensor = getattr(experts, attribute)
        stored = stored_weights.get(argument)
        arguments[argument] = tensor
        if stored is not None and (tensor.dtype not in QUANTISED_WEIGHT_DTYPES or any(
                t is not None and t.dtype != torch.float32 for t in (stored["scale"], stored["zero"]))):
            return (f"{attribute} ({tensor.dtype}, scales {stored['scale'].dtype}) no longer holds what "
                    "moe_ops.quantise_experts stored: a cast after it (model.to(dtype)) converts fp8 values and fp32 "
                    "scales; cast the model first, then quantise")
        if stored is not None:  # quantise_experts' values (E, N, K), scales and zero points
            arguments[f"{argument}_scale"] = stored["scale"]
            if stored["zero"] is not None:
                arguments[f"{argument}_zero"] = stored["zero"]
    quantised = {name: torchao_quantised(arguments[name]) for name in ("w_gate_up", "w_down")}
    for name, attribute in tensors.items():
        if torchao_tensor_class(type(arguments[name])) is not None and quantised.get(name) is None:
            return (f"{attribute} is a torchao {type(arguments[name]).__name__} that is no int8 / fp8 quantisation "
                    "per row or in groups of a multiple of 16, with inputs as they are or fp8 per row (another "
                    "layout, or other activation scales)")
    if any(quantised.values()):
        # torchao's tensors: the stored values and their scales, read as they are.
        if not all(quantised.values()):
            return "some of its expert weights are quantised by torchao and some are not"
        if is_transposed:
            return "its quantised weights are stored (E, K, N): their scales scale input features"
        input_quantisations = {input_quantisation for *_, input_quantisation in quantised.values()}
        if len(input_quantisations) > 1:
            return "torchao quantises the inputs of some of its expert weights and not of others"
        for name, (values, scales, zeros, _) in quantised.items():
            arguments[name], arguments[f"{name}_scale"] = values, scales
            if zeros is not None:
                arguments[f"{name}_zero"] = zeros
        if input_quantisations != {"none"}:
            arguments["input_quantisation"] = input_quantisations.pop()
    arguments.update(
        layout="EHF" if is_transposed and getattr(experts, QUANTISED_ATTRIBUTE, None) is None else "EFH",
        interleaved=not is_concatenated,
        activation=activation,
        gated=has_gate,
        alpha=alpha,
        limit=limit,
    )
    return arguments


# transformers' fine-grained FP8 experts (integrations/finegrained_fp8.py, FP8Experts), by _code_fingerprint of
# the methods whose computation fp8_experts_arguments maps (transformers 5.17): the loop over experts, the gate
# (chunk(2); clamped SwiGLU-OAI with swiglu_alpha, clamped act_fn with limit, else act_fn(gate) * up), and the
# per-expert linear (fp8_linear: inputs quantised to fp8 per token and group of block_size[1] on the fly,
# weights in block_size tiles scaled by their scale_inv).
FP8_EXPERTS_CODE = {"forward": "e9d4f828a1564b77", "_apply_gate": "7404fb8647e7d7bf", "linear": "53eab8ab7845d556"}
_FP8_CLASS_REASON: dict[type, str | None] = {}


@torch.compiler.assume_constant_result
def _verified_fp8_experts_class(experts_class: type) -> str | None:
    """None where ``experts_class`` runs transformers 5.17's FP8Experts code (FP8_EXPERTS_CODE), else why not.
    Dynamo runs it at trace time: a class's code is a constant."""
    if experts_class not in _FP8_CLASS_REASON:
        reason = None
        for name, fingerprint in FP8_EXPERTS_CODE.items():
            method = original_experts_forward(experts_class) if name == "forward" else getattr(experts_class, name)
            if _code_fingerprint(method) != fingerprint:
                reason = f"its {name} is not the FP8Experts.{name} of transformers 5.17 that moe_ops maps"
                break
        _FP8_CLASS_REASON[experts_class] = reason
    return _FP8_CLASS_REASON[experts_class]


def fp8_experts_arguments(experts: nn.Module, hidden_states: torch.Tensor) -> dict | str:
    """Keyword arguments of ``moe_ops.fused_experts`` that compute what transformers' fine-grained FP8 experts
    module ``experts`` computes on ``hidden_states`` (fp8 weights in blocks, fp8 inputs in groups: the op's
    "fp8_groupwise"), or the reason there are none."""
    reason = _verified_fp8_experts_class(type(experts))
    if reason is not None:
        return reason
    if experts.activation_scheme != "dynamic":
        return (f"activation_scheme={experts.activation_scheme!r}: fixed activation scales are no moe_ops input "
                "quantisation")
    if experts.block_size is None:
        return "its weights have one scale each (no block_size): moe_ops takes fp8 weights in blocks or per row"
    if hidden_states.dim() != 2:
        return f"hidden_states has {hidden_states.dim()} dims, fused_experts takes (tokens, hidden)"
    first_name, apply_gate = "up_proj", None
    if experts.has_gate:
        first_name = "gate_up_proj"
        if experts.swiglu_alpha is not None:
            apply_gate = FP8_APPLY_GATES["swiglu_alpha"]
        elif experts.limit is not None:
            apply_gate = FP8_APPLY_GATES["limit"]
    gate_activation = _gate_activation(experts, apply_gate)
    if isinstance(gate_activation, str):
        return gate_activation
    activation, alpha, limit = gate_activation
    arguments = dict(layout="EFH", interleaved=False, activation=activation, gated=experts.has_gate, alpha=alpha,
                     limit=limit, input_quantisation="fp8_groupwise")
    block_rows, block_columns = experts.block_size
    for argument, name in (("w_gate_up", first_name), ("w_down", "down_proj")):
        weight, scale = getattr(experts, name), getattr(experts, f"{name}_scale_inv")
        if weight.device != hidden_states.device:
            return f"{name} is on {weight.device} but hidden_states on {hidden_states.device}"
        try:
            check_quantised_weight(name, weight, scale, None, tuple(weight.shape), weight.device,
                                   scale_name=f"{name}_scale_inv", zero_name="-")
        except (TypeError, ValueError) as refusal:
            return str(refusal)
        if weight.dtype != torch.float8_e4m3fn or scale.dim() != 3 or (
                weight.shape[1] != block_rows * scale.shape[1] or weight.shape[2] != block_columns * scale.shape[2]):
            return (f"{name} ({weight.dtype}, scales {tuple(scale.shape)}) is no fp8 weight in whole "
                    f"{block_rows} x {block_columns} blocks")
        arguments[argument], arguments[f"{argument}_scale"] = weight, scale
    return arguments


def _quantisation(arguments: dict) -> str | None:
    """How the expert weights are quantised, for the log ("int8 per row", "float8_e4m3fn in groups of 32",
    "float8_e4m3fn in 128 x 128 blocks"), or None."""
    if "w_down_scale" not in arguments:
        return None
    stored = str(arguments["w_down"].dtype).replace("torch.", "")
    scale, rows, columns = arguments["w_gate_up_scale"], *arguments["w_gate_up"].shape[1:]
    if arguments["w_down"].dtype == torch.uint8:  # two int4 values a byte
        stored, columns = "int4", 2 * columns
    if scale.dim() == 2:
        scheme = f"{stored} per row"
    elif scale.shape[1] == rows:
        scheme = f"{stored} in groups of {columns // scale.shape[2]}"
    else:
        scheme = f"{stored} in {rows // scale.shape[1]} x {columns // scale.shape[2]} blocks"
    inputs = arguments.get("input_quantisation")
    return scheme if inputs is None else f"{scheme}, inputs {inputs}"


def moe_ops_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``experts_implementation="moe_ops"``: the experts module ``self`` as one ``moe_ops.fused_experts``
    call, or its own loop where that would not be the same computation (the reason is logged)."""
    return _fused_or_own_loop(self, fused_experts_arguments(self, hidden_states), hidden_states, top_k_index,
                              top_k_weights)


def moe_ops_fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``experts_implementation="moe_ops"`` for transformers' fine-grained FP8 experts: as
    :func:`moe_ops_experts_forward`, with :func:`fp8_experts_arguments`."""
    return _fused_or_own_loop(self, fp8_experts_arguments(self, hidden_states), hidden_states, top_k_index,
                              top_k_weights)


def _fused_description(arguments: dict) -> str:
    """The log line of a module that runs as fused_experts with ``arguments``."""
    return (f"runs as moe_ops.fused_experts(layout={arguments['layout']!r}, interleaved={arguments['interleaved']}, "
            f"activation={arguments['activation']!r}, gated={arguments['gated']}, biases={'b_down' in arguments}, "
            f"quantised={_quantisation(arguments)})")


def _report_fallback(self, runs: str, reason: str) -> None:
    """Log that the module ``self`` runs ``runs`` instead of fused_experts, and why; raise where its expert weights
    are moe_ops-quantised, which only fused_experts reads."""
    if getattr(self, QUANTISED_ATTRIBUTE, None) is not None:
        raise RuntimeError(_quantised_refusal(self, f"fused_experts cannot take this call: {reason}"))
    _report(type(self), f"runs {runs}, not moe_ops.fused_experts: {reason}", False, torch.compiler.is_compiling())


def _fused_or_own_loop(self, arguments, hidden_states, top_k_index, top_k_weights, fallback=None):
    """``fused_experts`` with ``arguments``, or (``arguments`` a reason) ``fallback`` (default: the class's own
    loop); logged."""
    if isinstance(arguments, str):
        if fallback is None:
            fallback, runs = original_experts_forward(type(self)), "its own loop"
        else:
            runs = f"transformers' {fallback.__name__}"
        _report_fallback(self, runs, arguments)
        try:
            return fallback(self, hidden_states, top_k_index, top_k_weights)
        except NotImplementedError as error:
            # torchao tensors implement few ops: the loop's matmul over them can fail inside torchao, whose
            # message would not say why fused_experts did not run instead.
            if not _holds_torchao_weights(self):
                raise
            raise RuntimeError(f"{type(self).__name__}: fused_experts cannot take this call ({arguments}), and "
                               f"{runs} cannot multiply its torchao weights ({error!r})") from error
    _report(type(self), _fused_description(arguments), True, torch.compiler.is_compiling())
    return fused_experts(hidden_states, top_k_weights, top_k_index, **arguments)


class Fused(NamedTuple):
    """What a wrapped forward runs instead of its class's code while dynamo traces."""

    description: str  # the log line: "runs as moe_ops.fused_experts(...)..."
    run: Callable[[], torch.Tensor]  # the computation, fused_experts in it


def _rewritten_forward(original, plan, runs: str):
    """``original`` (a transformers class's forward), except while dynamo traces with ``config.rewrites`` and
    ``config.transformers_eager_experts`` on: then ``plan(self, *args)``'s Fused computation, or, where ``plan``
    gives a reason (a str), ``original`` (``runs``, for the log), the reason logged. ``plan`` takes the
    forward's arguments as ``original`` does (by name too)."""

    def forward(self, *args, **kwargs):
        if not _rewriting_transformers_code():
            return original(self, *args, **kwargs)
        planned = plan(self, *args, **kwargs)
        if isinstance(planned, str):
            _report_fallback(self, runs, planned)
            return original(self, *args, **kwargs)
        _report(type(self), planned.description, True, True)
        return planned.run()

    forward.__wrapped__ = original
    return forward


# The code of every forward _rewritten_forward makes: original_experts_forward unwraps it.
_REWRITTEN_FORWARD_CODE = _rewritten_forward(None, None, "").__code__


def _rewriting_transformers_code() -> bool:
    """Whether dynamo is tracing with ``config.rewrites`` and ``config.transformers_eager_experts`` on: when the
    "eager" implementation and the wrapped forwards run fused_experts instead of transformers' own code. Not
    under a functorch transform (``torch.compile(torch.func.grad(f))``): torch.func's reverse mode cannot
    differentiate custom ops, so transformers' own code runs there."""
    return (torch.compiler.is_compiling() and config.rewrites and config.transformers_eager_experts
            and not functorch_transform_active())


def _skipped_hooks(modules: dict[str, nn.Module]) -> str | None:
    """Why submodules that a fused_experts call would not run (by name) must run (None: they need not): hooks on
    them, which transformers uses to record outputs such as router logits, or hooks registered for every module."""
    for name, module in modules.items():
        hooks = hooks_a_call_runs(module)
        if hooks is not None:
            return (f"its {name} has {hooks} (transformers records outputs such as router logits with them), "
                    "which a fused_experts call would skip")
    return None


def _refuse_quantised(self, implementation: str) -> None:
    """Raise where the module's expert weights are moe_ops-quantised: ``implementation`` (transformers' own code)
    would multiply their packed values as if they were the weights."""
    if getattr(self, QUANTISED_ATTRIBUTE, None) is not None:
        raise RuntimeError(_quantised_refusal(self, f"the model's config asks for {implementation!r}"))


def _quantised_refusal(self, why: str) -> str:
    return (f"{type(self).__name__}: its expert weights are moe_ops-quantised ({getattr(self, QUANTISED_ATTRIBUTE)}), "
            f"which only the 'moe_ops' experts implementation (moe_ops.fused_experts) reads; {why}")


def eager_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``experts_implementation="eager"``: the class's own loop, except while dynamo traces with the
    rewrites on, where it becomes :func:`moe_ops_experts_forward` (the loop cannot be captured)."""
    if _rewriting_transformers_code():
        return moe_ops_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    _refuse_quantised(self, "eager")
    return original_experts_forward(type(self))(self, hidden_states, top_k_index, top_k_weights)


def eager_fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``experts_implementation="eager"`` for transformers' fine-grained FP8 experts: as
    :func:`eager_experts_forward`, with :func:`moe_ops_fp8_experts_forward`."""
    if _rewriting_transformers_code():
        return moe_ops_fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return original_experts_forward(type(self))(self, hidden_states, top_k_index, top_k_weights)


# transformers' own experts implementations that compute what a verified eager loop computes (read in
# transformers 5.17: sort the slots by expert, the two projections as grouped / batched GEMMs, the class's
# _apply_gate between them, routing weights on the down projection's rows, biases included), by
# _code_fingerprint. While dynamo traces one over torchao weights, fused_experts runs instead
# (config.transformers_quantised_experts).
TRANSFORMERS_IMPLEMENTATIONS = {"grouped_mm": "4a8561cdc47109b9", "batched_mm": "705ae8edc4dfa7e1"}
_ORIGINAL_IMPLEMENTATIONS: dict[str, object] = {}
# transformers' default _apply_gate (act_fn(gate) * up of the two halves), which those implementations apply
# where the eager loop of MixtralExperts applies act_fn itself.
_DEFAULT_APPLY_GATE_CODE = "3efac83283c6d5af"
_IMPLEMENTATION_REASON: dict[type, str | None] = {}


@torch.compiler.assume_constant_result
def _implementation_reason(experts_class: type) -> str | None:
    """None where transformers' grouped / batched implementations compute the class's verified eager loop
    (the gate they apply is the one the loop applies), else why not. Dynamo runs it at trace time."""
    if experts_class not in _IMPLEMENTATION_REASON:
        loop, reason = _eager_loop(experts_class), None
        if isinstance(loop, EagerLoop) and loop.gate == "act_fn" and loop.flags[0] and (
                _code_fingerprint(getattr(experts_class, "_apply_gate", None)) != _DEFAULT_APPLY_GATE_CODE):
            reason = (f"its _apply_gate, which transformers' grouped and batched implementations apply, is not the "
                      f"act_fn(gate) * up its eager loop ({loop.name}) computes")
        _IMPLEMENTATION_REASON[experts_class] = reason
    return _IMPLEMENTATION_REASON[experts_class]


def _holds_torchao_weights(experts: nn.Module) -> bool:
    first = getattr(experts, "gate_up_proj" if experts.has_gate else "up_proj", None)
    return first is not None and torchao_tensor_class(type(first)) is not None


def _over_torchao_weights(name: str):
    """transformers' ``name`` experts implementation, except while dynamo traces a module whose expert weights
    are torchao tensors (config.transformers_quantised_experts): then moe_ops.fused_experts over their stored
    values, where it computes the same, else transformers' implementation (the reason logged)."""
    original = _ORIGINAL_IMPLEMENTATIONS[name]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        # The weights first: dynamo guards a compiled graph on each setting read here, and a model without torchao
        # weights must not recompile when the rewrites or this switch change (its graph does not depend on them).
        if not (torch.compiler.is_compiling() and _holds_torchao_weights(self) and config.rewrites
                and config.transformers_quantised_experts):
            _refuse_quantised(self, name)
            return original(self, hidden_states, top_k_index, top_k_weights)
        reason = _implementation_reason(type(self))
        arguments = fused_experts_arguments(self, hidden_states) if reason is None else reason
        return _fused_or_own_loop(self, arguments, hidden_states, top_k_index, top_k_weights, fallback=original)

    forward.__name__ = f"{name}_over_torchao_weights"
    return forward


def moe_ops_ep_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``experts_implementation="moe_ops_ep"`` (set by :func:`parallelize_experts`): the experts module,
    its weights sharded over ranks, as one ``moe_ops.fused_experts_ep`` call. No fallback to the class's
    own loop: it would need every expert's weights."""
    plan = getattr(self, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise RuntimeError(f"{type(self).__name__}: experts_implementation='moe_ops_ep' is set by "
                           "moe_ops.parallelize_experts, which shards the weights it needs")
    arguments = fused_experts_arguments(self, hidden_states)
    if isinstance(arguments, str):
        raise RuntimeError(f"{type(self).__name__} cannot run sharded through moe_ops.fused_experts_ep: {arguments}")
    if "w_down_scale" in arguments:
        raise RuntimeError(f"{type(self).__name__}: quantised expert weights do not run sharded (fused_experts_ep "
                           "takes weights of the activations' dtype)")
    local = {name: value.to_local() if isinstance(value, DTensor) else value for name, value in arguments.items()}
    return fused_experts_ep(hidden_states, top_k_weights, top_k_index, group=plan.group, dispatch=plan.dispatch,
                            capacity_factor=plan.capacity_factor, pipeline_chunks=plan.pipeline_chunks, **local)


def configs_with_implementation(modules: Iterable[nn.Module], name: str) -> list:
    """For each of ``modules`` (transformers experts modules), a copy of its config whose experts implementation is
    ``name`` (modules that share a config get one copy), to be given to them (``module.config = copy``) once
    nothing else can fail. transformers' experts modules read the implementation from a config that the whole model
    shares, and often other models too (a reference or teacher built from the same config object): with the copies,
    the model's config, what it saves and ``set_experts_implementation`` stay as they were, and no other module
    changes."""
    copies: dict[int, object] = {}
    configs = []
    for module in modules:
        own = copies.get(id(module.config))
        if own is None:
            own = copies[id(module.config)] = copy.deepcopy(module.config)
            own._experts_implementation = name
        configs.append(own)
    return configs


def register_experts_implementations() -> None:
    """Register "moe_ops", "moe_ops_ep" and "eager" in transformers' ``ALL_EXPERTS_FUNCTIONS`` (idempotent).

    ``ExpertsInterface.get_interface`` returns a registered "eager" before the class's own forward, which is
    how "eager" reaches :func:`eager_experts_forward`; a local override on an interface instance still wins.
    """
    ExpertsInterface.register(IMPLEMENTATION_NAME, moe_ops_experts_forward)
    ExpertsInterface.register(EP_IMPLEMENTATION_NAME, moe_ops_ep_experts_forward)
    ExpertsInterface.register("eager", eager_experts_forward)
    for name, fingerprint in TRANSFORMERS_IMPLEMENTATIONS.items():
        if name in _ORIGINAL_IMPLEMENTATIONS or name not in ALL_EXPERTS_FUNCTIONS:
            continue
        original = ALL_EXPERTS_FUNCTIONS[name]
        if _code_fingerprint(original) != fingerprint:  # another transformers' code: left as it is
            log.debug("transformers' %s experts implementation is not the one moe_ops read; left alone", name)
            continue
        _ORIGINAL_IMPLEMENTATIONS[name] = original
        ExpertsInterface.register(name, _over_torchao_weights(name))


class OwnCode(NamedTuple):
    """An experts class of transformers 5.17 without an experts interface whose loop is its own code, mapped onto
    fused_experts here."""

    fingerprint: str  # _code_fingerprint of its forward: the code read
    # (module, its input rows (T, H)) -> fused_experts' keyword arguments, or the reason there are none
    arguments: Callable[[nn.Module, torch.Tensor], dict | str]
    zero_experts: bool = False  # ids from num_routed_experts on are nn.Identity experts: the token times its weight


def _zero_experts_arguments(experts: nn.Module, rows: torch.Tensor) -> dict | str:
    """LongCat-Flash's routed experts (its zero-compute experts' ids, from ``num_routed_experts`` on, are routed to
    no expert here; the wrapper adds them)."""
    if experts.gate_up_proj is None:
        return "it has no routed experts, only zero-compute ones"
    hooks = _skipped_hooks({"identity_expert": experts.identity_expert})
    if hooks is not None:
        return hooks
    activation = _activation_of(experts.act_fn)
    if activation is None:
        return f"act_fn {type(experts.act_fn).__name__} has no moe_ops activation"
    reason = _weights_reason(rows, {name: getattr(experts, name) for name in ("gate_up_proj", "down_proj")})
    if reason is not None:
        return reason
    # gate_up_proj holds a row per expert, zero-compute ones included, which the loop never reads.
    return dict(w_gate_up=experts.gate_up_proj[:experts.num_routed_experts], w_down=experts.down_proj, layout="EFH",
                interleaved=False, activation=activation, gated=True)


def _dbrx_arguments(experts: nn.Module, rows: torch.Tensor) -> dict | str:
    """DBRX's experts: w1 (gate) and v1 (up) flat (E x F, H), w2 flat (E x F, H) multiplied from the left (the
    down projection's transpose)."""
    activation = _activation_of(experts.mlp.activation_fn)
    if activation is None:
        return f"its activation_fn {type(experts.mlp.activation_fn).__name__} has no moe_ops activation"
    hooks = _skipped_hooks({"mlp": experts.mlp})
    if hooks is not None:
        return hooks
    reason = _weights_reason(rows, {f"mlp.{name}": getattr(experts.mlp, name) for name in ("w1", "v1", "w2")})
    if reason is not None:
        return reason
    shape = (experts.num_experts, experts.ffn_hidden_size, experts.hidden_size)
    return dict(w_gate_up=experts.mlp.w1.view(shape), w_up=experts.mlp.v1.view(shape),
                w_down=experts.mlp.w2.view(shape).transpose(1, 2), layout="EFH", interleaved=False,
                activation=activation, gated=True)


# Experts classes of transformers 5.17 without use_experts_implementation (their forward is their loop), whose
# forward moe_ops wraps when their modeling module is imported (register_own_code; lowering/install.py
# names the modules): the flags the decorator would declare for a loop of KNOWN_EAGER_LOOPS (its _apply_gate one
# of KNOWN_APPLY_GATES, verified where it runs), or the loop's own code.
OWN_LOOP_EXPERTS = {
    # GLM-5-Next's loop, an _apply_gate that clamps act_fn(gate) after the activation
    "Step3p7Experts": (True, False, False, True),
    # Mixtral's experts [0, n_routed) (gate_up_proj rows -> chunk(2) -> act_fn(gate) * up -> down_proj, no biases,
    # the routing weight on the output) and nn.Identity experts [n_routed, n_routed + zero_expert_num), every
    # contribution rounded to the input's dtype and added with index_add_
    "LongcatFlashExperts": OwnCode("3c5ecc785976ed7f", _zero_experts_arguments, zero_experts=True),
    # one gated MLP per expert (DbrxExpertGLU: act(x w1^T) * (x v1^T), times w2) over slices of flat weights, the
    # routing weight on the output, index_add_ in the input's dtype
    "DbrxExperts": OwnCode("bf29037ac0b03d91", _dbrx_arguments),
}
# DbrxExpertGLU.forward, which DbrxExperts' loop calls: gate, up, act(gate) * up, down.
DBRX_GLU_CODE = "f348bc181ec8ec2d"
_WRAPPED: set[type] = set()  # the classes whose forward is wrapped


def _own_loop_plan(handling):
    """The fused computation of an OWN_LOOP_EXPERTS class (``handling``: its decorator flags, decided as for a
    decorated class, or its OwnCode), zero-compute experts added as each token times their summed weights; or the
    reason there is none."""

    def plan(self, hidden_states, top_k_index, top_k_weights):
        if not isinstance(handling, OwnCode):  # decorator flags
            arguments = fused_experts_arguments(self, hidden_states, handling)
            if isinstance(arguments, str):
                return arguments
            return Fused(_fused_description(arguments),
                         lambda: fused_experts(hidden_states, top_k_weights, top_k_index, **arguments))
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        arguments = handling.arguments(self, rows)
        if isinstance(arguments, str):
            return arguments

        def run():
            out = fused_experts(rows, top_k_weights, top_k_index, **arguments)
            if handling.zero_experts and self.zero_expert_num > 0:
                # Only tokens that picked a zero expert add their row, as the loop does (x * 0 is no zero for inf x).
                zero = top_k_index >= self.num_routed_experts
                weights = torch.where(zero, top_k_weights, 0).sum(-1, keepdim=True)
                out = out + torch.where(zero.any(-1, keepdim=True), rows * weights, 0).to(rows.dtype)
            return out.view(hidden_states.shape)

        zero = " plus the token times the weights of the zero-compute experts it picks" if handling.zero_experts else ""
        return Fused(f"runs as moe_ops.fused_experts(activation={arguments['activation']!r}){zero}", run)

    return plan


def register_own_loop_experts(module) -> None:
    """Wrap the forward of each OWN_LOOP_EXPERTS class that ``module`` (a transformers modeling module) defines
    (idempotent). A loop with decorator flags is verified where it runs, as a decorated class's is (the reason
    logged when it is not the one read); one of its own code here: another code is left alone."""
    for name, handling in OWN_LOOP_EXPERTS.items():
        experts_class = getattr(module, name, None)
        if experts_class is None or experts_class in _WRAPPED:
            continue
        if isinstance(handling, OwnCode):
            code = [_code_fingerprint(experts_class.forward) == handling.fingerprint]
            if name == "DbrxExperts":
                code.append(_code_fingerprint(_defined(module, "DbrxExpertGLU.forward")) == DBRX_GLU_CODE)
            if not all(code):
                log.debug("%s is not the code moe_ops read (transformers 5.17); left alone", name)
                continue
        _WRAPPED.add(experts_class)
        experts_class.forward = _rewritten_forward(experts_class.forward, _own_loop_plan(handling), "its own loop")


# JetMoE's MoE block (transformers 5.17), by _code_fingerprint of each method its computation runs through: the
# router (logits in fp32, top-k of the logits, softmax over the k, cast to the input's dtype; the expert counts
# read to the host with .tolist()), the experts (one (E, N, K) weight per projection, the tokens split by those
# counts), and the block (gate_up -> chunk(2) -> act(gate) * up -> down, the routing weight on the output,
# index_add_, then a learned bias over the hidden size). The host read breaks any graph there; while dynamo traces,
# the block's forward becomes the same routing written without it and one fused_experts call.
JETMOE_CODE = {"JetMoeMoE.forward": "439a92d991f462bd", "JetMoeTopKGating.forward": "782f34a33f04bdaa",
               "JetMoeParallelExperts.forward": "ab34cb14d48801c5"}
# Aria's experts (transformers 5.17), likewise: the routing (top-k of the logits, softmax over the k), the tokens
# sorted by expert with counts read to the host (tokens_per_expert.cpu()), one matmul per expert over input-first
# weights (fc1 (E, H, 2F), fc2 (E, F, H)), silu(first half) * second half, the k outputs weighted and summed.
ARIA_CODE = {"AriaExperts.forward": "dbe4511f64cdda9a", "AriaExperts.route_tokens_to_experts": "e09a6b9a317c1c29",
             "AriaGroupedExpertsGemm.forward": "ca09b4c1e5d69ab5", "sequential_experts_gemm": "fb5afd476c67e1c8"}


def _jetmoe_reason(block: nn.Module, layer_input: torch.Tensor) -> str | None:
    """Why a JetMoE block is not one fused_experts call on ``layer_input`` (None: it is)."""
    if _activation_of(block.activation) is None:
        return f"its activation {type(block.activation).__name__} has no moe_ops activation"
    hooks = _skipped_hooks({name: getattr(block, name) for name in ("router", "input_linear", "output_linear")})
    if hooks is not None:
        return hooks
    if layer_input.dim() != 3:
        return f"its input has {layer_input.dim()} dims, not (batch, sequence, hidden)"
    return _weights_reason(layer_input, {f"{name}.weight": getattr(block, name).weight
                                         for name in ("input_linear", "output_linear")})


def _weights_reason(rows: torch.Tensor, weights: dict[str, torch.Tensor],
                    own_dtype: set[str] = frozenset()) -> str | None:
    """Why weights (by name) and their input ``rows`` are not what fused_experts computes with as the module does
    (None: they are): autocast on, or another device, or another dtype (but for ``own_dtype``: weights that
    moe_ops.quantise_experts stored)."""
    if torch.is_autocast_enabled(rows.device.type):
        return "autocast is on: the module multiplies in the autocast dtype, fused_experts in the weights' dtype"
    for name, weight in weights.items():
        if (name not in own_dtype and weight.dtype != rows.dtype) or weight.device != rows.device:
            return f"{name} is {weight.dtype} on {weight.device} but its input is {rows.dtype} on {rows.device}"
    return None


def _jetmoe_plan(self, layer_input):
    """JetMoE's block: its routing without the host read, one fused_experts call, then its bias."""
    reason = _jetmoe_reason(self, layer_input)
    if reason is not None:
        return reason
    activation = _activation_of(self.activation)

    def run():
        batch, length, hidden = layer_input.shape
        rows = layer_input.reshape(-1, hidden)
        logits = self.router.layer(rows).float()
        top_k_logits, top_k_indices = logits.topk(self.router.top_k, dim=1)
        top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(rows)
        out = fused_experts(rows, top_k_gates, top_k_indices, self.input_linear.weight, self.output_linear.weight,
                            layout="EFH", interleaved=False, activation=activation, gated=True)
        return out.view(batch, length, hidden) + self.bias

    return Fused(f"runs as moe_ops.fused_experts(activation={activation!r}) after its router, then its bias", run)


def _aria_plan(self, hidden_states, router_logits):
    """Aria's experts: its routing, then one fused_experts call over its input-first weights (no host read)."""
    if hidden_states.dim() != 2:
        return f"hidden_states has {hidden_states.dim()} dims, fused_experts takes (tokens, hidden)"
    reason = (_skipped_hooks({"fc1": self.fc1, "fc2": self.fc2})
              or _weights_reason(hidden_states, {"fc1.weight": self.fc1.weight, "fc2.weight": self.fc2.weight}))
    if reason is not None:
        return reason

    def run():
        top_k_index, top_k_weights = self.route_tokens_to_experts(router_logits)
        return fused_experts(hidden_states, top_k_weights, top_k_index, self.fc1.weight, self.fc2.weight,
                             layout="EHF", interleaved=False, activation="silu", gated=True)

    return Fused("runs as moe_ops.fused_experts(activation='silu') after its routing", run)


# Classes whose forward moe_ops replaces while dynamo traces (their code read: each function it runs, by
# _code_fingerprint), and the plan of what it runs instead.
OWN_BLOCKS = {"JetMoeMoE": (JETMOE_CODE, _jetmoe_plan), "AriaExperts": (ARIA_CODE, _aria_plan)}


def _defined(module, qualified_name: str):
    """``module``'s function or method named ``qualified_name`` ("Class.method"), None if it has none."""
    found = module
    for part in qualified_name.split("."):
        found = getattr(found, part, None)
    return found


def register_own_code(module) -> None:
    """Wrap the forward of each OWN_LOOP_EXPERTS and OWN_BLOCKS class that ``module`` (a transformers modeling
    module) defines (idempotent; a block whose code is not the one read is left alone, the reason logged at
    DEBUG)."""
    register_own_loop_experts(module)
    for name, (code, plan) in OWN_BLOCKS.items():
        block_class = getattr(module, name, None)
        if block_class is None or block_class in _WRAPPED:
            continue
        changed = [part for part, fingerprint in code.items()
                   if _code_fingerprint(_defined(module, part)) != fingerprint]
        if changed:
            log.debug("%s is not the code moe_ops read (transformers 5.17): %s; left alone", name, ", ".join(changed))
            continue
        _WRAPPED.add(block_class)
        block_class.forward = _rewritten_forward(block_class.forward, plan, "its own code")


def register_fp8_experts_implementations() -> None:
    """Register "moe_ops" and "eager" in the interface of transformers' fine-grained FP8 experts (its own
    ``FP8ExpertsInterface``, apart from ``ALL_EXPERTS_FUNCTIONS``), as register_experts_implementations does."""
    from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface

    FP8ExpertsInterface.register(IMPLEMENTATION_NAME, moe_ops_fp8_experts_forward)
    FP8ExpertsInterface.register("eager", eager_fp8_experts_forward)


# Importing this module registers the implementations: lowering/install.py imports it when transformers is
# imported, whichever of the two came first.
register_experts_implementations()
