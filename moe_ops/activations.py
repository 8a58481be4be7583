"""The expert MLP's activations, in one table that the reference, the kernels, the backward and the graph
passes all read: each activation's name (the ops' ``activation`` argument), its code (the kernels'
``tl.constexpr ACTIVATION``) and its parameters with their defaults.

Gated (``w_up`` given, or a fused gate/up weight): ``act(gate) * up``; ungated: ``act(gate)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_ops._checks import check_number, shown

# GPT-OSS's clamped SwiGLU constants, the defaults of every ``alpha`` / ``limit`` argument (only
# clamped_swiglu reads both, clamped_silu the limit).
CLAMPED_SWIGLU_ALPHA = 1.702
CLAMPED_SWIGLU_LIMIT = 7.0


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # the kernels' ACTIVATION constexpr
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None  # act(gate); None: a clamped form's own formula
    gated_only: bool = False  # needs an up projection
    parameters: tuple[str, ...] = ()  # the op arguments it reads


TABLE = (
    Activation("none", 0, lambda g: g),
    Activation("silu", 1, F.silu),
    Activation("gelu", 2, F.gelu),
    Activation("gelu_tanh", 3, lambda g: F.gelu(g, approximate="tanh")),
    Activation("relu", 4, F.relu),
    Activation("clamped_swiglu", 5, None, gated_only=True, parameters=("alpha", "limit")),
    Activation("relu2", 6, lambda g: torch.square(F.relu(g))),  # squared ReLU (NemotronH, Primer)
    # SiLU of the gate clamped above, times the up clamped both ways (GLM-5-Next, HY-V4, DeepSeek-V4).
    Activation("clamped_silu", 7, None, gated_only=True, parameters=("limit",)),
)
BY_NAME = {activation.name: activation for activation in TABLE}
ACTIVATIONS = tuple(BY_NAME)  # the names, for argument checks
ACTIVATION_CODE = {activation.name: activation.code for activation in TABLE}


def check_clamp_constants(alpha, limit) -> None:
    """The clamped forms' constants as every op taking them checks them: a NaN or infinite alpha would make every
    output NaN, a negative limit an empty clamp range (an infinite limit clamps nothing, as Step-3.7's layers
    without a limit have it)."""
    check_number("alpha", alpha)
    if isinstance(limit, bool) or not isinstance(limit, (int, float, torch.SymFloat)) or not limit >= 0:
        raise ValueError(f"limit: expected a number >= 0 (inf: no clamp), got {shown(limit)}")


def check_constants_read(activation: str, alpha, limit) -> None:
    """check_clamp_constants, and an ``alpha`` or ``limit`` other than the default given with an activation that
    does not read it refused: it would change nothing, where the caller expects it to."""
    check_clamp_constants(alpha, limit)
    for name, value, default in (("alpha", alpha, CLAMPED_SWIGLU_ALPHA), ("limit", limit, CLAMPED_SWIGLU_LIMIT)):
        if name not in BY_NAME[activation].parameters and value != default:
            readers = [a.name for a in TABLE if name in a.parameters]
            raise ValueError(f"{name}: read only by activation {' or '.join(map(repr, readers))}; "
                             f"activation={activation!r} ignores it, got {name}={shown(value)}")


def activate_ref(gate: torch.Tensor, up: torch.Tensor | None, activation: str, alpha: float, limit: float):
    """The activation of the expert MLP: act(gate) * up when gated, act(gate) otherwise."""
    if activation == "clamped_swiglu":
        # GPT-OSS: gate clamped above, up clamped both ways, and up shifted by one.
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(alpha * gate))
    if activation == "clamped_silu":
        return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
    acted = BY_NAME[activation].gate_fn(gate)
    return acted if up is None else acted * up
