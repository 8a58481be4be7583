"""The whole routed-expert MLP of a MoE layer as one op: the target of the graph passes.

Shape legend: T tokens, H hidden, F expert intermediate size, E experts, K top-k, S = T*K slots.

    out[t] = sum_j  w[t, j] * down_e( act(gate_e(x[t]), up_e(x[t])) ),  over the j with 0 <= e = ids[t, j] < E

On CUDA: [capacity] -> packed block schedule -> gate_up GEMM with the activation fused (rows gathered
from x, no permuted copy) -> down GEMM with the routing weight fused, scattered to (T, K, H) ->
sum over K in a fixed order (deterministic, fp32 accumulation).
"""

from __future__ import annotations

import functools

import torch

from moe_ops._autograd import refuse_unsupported_ad, register_reference_autograd, save_inputs, saved_inputs
from moe_ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    QUANTISED_WEIGHT_DTYPES,
    check_bool,
    check_choice,
    check_kernel_dtype,
    check_number,
    check_tensor,
)
from moe_ops._compat.matmul import grouped_mm
from moe_ops._dispatch import direct_cuda_call_allowed
from moe_ops.activations import (
    ACTIVATIONS,
    BY_NAME,
    CLAMPED_SWIGLU_ALPHA,
    CLAMPED_SWIGLU_LIMIT,
    activate_ref,
    check_clamp_constants,
    check_constants_read,
)
from moe_ops.capacity import POLICIES as CAPACITY_POLICIES
from moe_ops.capacity import apply_capacity_ref
from moe_ops.capacity_triton import apply_capacity_triton
from moe_ops.expert_gemm_triton import expert_gemm_triton
from moe_ops.fused_experts_backward_triton import (
    activation_triton,
    fused_experts_backward_triton,
    saves_preactivations,
    slot_positions,
    token_sums_triton,
)
from moe_ops.layout import PackedSchedule, capacity_from_factor, split_gate_up
from moe_ops.quantised import (
    check_quantised_weight,
    dequantise,
    quantise_fp8_groups,
    quantise_per_row,
    stored_columns,
)
from moe_ops.schedule_triton import block_schedule_triton, rows_in_schedule_order
from moe_ops.settings import config
from moe_ops.tiles import choose_block_m, tma_applies, tma_device, tma_pays

LAYOUTS = ("EFH", "EHF")
# The op's last arguments, each None for weights that are not quantised (moe_ops.quantised).
QUANTISATION_ARGS = ("w_gate_up_scale", "w_up_scale", "w_down_scale", "w_gate_up_zero", "w_up_zero", "w_down_zero")
# How the GEMMs' inputs (x, then the activation h) are quantised: not at all, or to fp8 e4m3 on the fly,
# with a scale per row (w8a8 with fp8 weights scaled per row, as torchao's
# Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) computes) or per row and group of the
# weights' groups along K (fp8 weights with block scales: DeepSeek-V3's recipe, 1 x 128 inputs against
# 128 x 128 weights).
INPUT_QUANTISATIONS = ("none", "fp8_rowwise", "fp8_groupwise")
NOT_QUANTISED = (*(None,) * len(QUANTISATION_ARGS), "none")  # the quantisation arguments, then input_quantisation


def quantise_inputs(a: torch.Tensor, input_quantisation: str, w_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A GEMM input's rows (..., K) as ``input_quantisation`` makes them for a weight with scales ``w_scale``:
    (fp8 e4m3 values, fp32 scales per row (...) or per row and group of the weight's (..., G))."""
    if input_quantisation == "fp8_rowwise":
        return quantise_per_row(a, torch.float8_e4m3fn)
    return quantise_fp8_groups(a, a.shape[-1] // w_scale.shape[-1])


class ExpertWeights:
    """The expert tensors as (E, N, K) views (N output features, K reduction), never copies; the scales and
    zero points of quantised weights as views beside them (``s_gate``, ``s_up``, ``s_down``, ``z_gate``,
    ``z_up``, ``z_down``; None where absent)."""

    def __init__(self, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down, layout, interleaved, gated,
                 w_gate_up_scale=None, w_up_scale=None, w_down_scale=None, w_gate_up_zero=None, w_up_zero=None,
                 w_down_zero=None):
        if layout == "EHF":
            w_gate_up = w_gate_up.transpose(1, 2)
            w_up = None if w_up is None else w_up.transpose(1, 2)
            w_down = w_down.transpose(1, 2)
        self.gate, self.up, self.b_gate, self.b_up = w_gate_up, w_up, b_gate_up, b_up
        self.s_gate, self.s_up, self.z_gate, self.z_up = w_gate_up_scale, w_up_scale, w_gate_up_zero, w_up_zero
        if gated and w_up is None:
            self.gate, self.up = split_gate_up(w_gate_up, interleaved)
            if b_gate_up is not None:
                self.b_gate, self.b_up = split_gate_up(b_gate_up, interleaved)
            if w_gate_up_scale is not None:
                self.s_gate, self.s_up = split_gate_up(w_gate_up_scale, interleaved)
            if w_gate_up_zero is not None:
                self.z_gate, self.z_up = split_gate_up(w_gate_up_zero, interleaved)
        self.down, self.b_down, self.s_down, self.z_down = w_down, b_down, w_down_scale, w_down_zero


def _check_scales(w_up, layout, quantisation: dict) -> bool:
    """Whether the expert weights are quantised (the scales of every projection given; ``quantisation`` the
    QUANTISATION_ARGS by name); a ValueError where only some are, or zero points come without scales."""
    given = {name: value is not None for name, value in quantisation.items()}
    for kind in ("scale", "zero"):
        if w_up is None and given[f"w_up_{kind}"]:
            raise ValueError(f"w_up_{kind}: given without w_up (a fused w_gate_up takes its in w_gate_up_{kind})")
    for projection in ("w_gate_up", "w_up", "w_down"):
        if given[f"{projection}_zero"] and not given[f"{projection}_scale"]:
            raise ValueError(f"{projection}_zero: zero points given without {projection}_scale")
    for kind in ("scale", "zero"):
        wanted = [f"w_gate_up_{kind}", f"w_down_{kind}"] + ([f"w_up_{kind}"] if w_up is not None else [])
        present = [given[name] for name in wanted]
        if any(present) and not all(present):
            raise ValueError(f"{wanted[present.index(False)]}: quantised expert weights need the {kind}s of every "
                             f"projection or of none")
    if not given["w_gate_up_scale"]:
        return False
    if layout != "EFH":
        raise ValueError(
            f"w_gate_up_scale: quantised weights are stored by output feature, the rows of layout 'EFH' weights; "
            f"with layout={layout!r} a stored row is a reduction row"
        )
    return True


def check_fused_args(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, capacity_factor, drop_policy,
    w_gate_up_scale=None, w_up_scale=None, w_down_scale=None, w_gate_up_zero=None, w_up_zero=None,
    w_down_zero=None, input_quantisation="none",
) -> None:
    """fused_experts' arguments (alpha and limit excepted) as every path takes them: a ValueError naming
    the first argument that is not, with the shape, dtype or value expected. The graph passes ask it too,
    so that a rewrite never emits a call the op would refuse."""
    quantisation = dict(zip(QUANTISATION_ARGS, (w_gate_up_scale, w_up_scale, w_down_scale, w_gate_up_zero,
                                                w_up_zero, w_down_zero), strict=True))
    quantised = _check_scales(w_up, layout, quantisation)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    T, H = x.shape
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: expected shape ({T}, K) like x's {T} tokens, got {tuple(topk_ids.shape)}")
    check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtypes=FLOAT_DTYPES, device=x.device)
    check_choice("layout", layout, LAYOUTS)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("drop_policy", drop_policy, CAPACITY_POLICIES)
    if BY_NAME[activation].gated_only and not gated:
        raise ValueError(f"activation: {activation!r} needs gated=True")
    if interleaved and (w_up is not None or not gated):
        raise ValueError("interleaved: only for a gated w_gate_up holding both gate and up (w_up=None)")
    for name, weight in (("w_gate_up", w_gate_up), ("w_up", w_up), ("w_down", w_down)):
        if not quantised and isinstance(weight, torch.Tensor) and weight.dtype in QUANTISED_WEIGHT_DTYPES:
            raise ValueError(f"{name}_scale: {weight.dtype} weights are quantised values, which need their scales "
                             "(moe_ops.quantised)")
    check_tensor("w_gate_up", w_gate_up, ndim=3, dtypes=None if quantised else (x.dtype,), device=x.device)
    E = w_gate_up.shape[0]
    fused_gate_up = gated and w_up is None
    f_axis = 1 if layout == "EFH" else 2
    F2 = w_gate_up.shape[f_axis]
    F = F2 // 2 if fused_gate_up else F2
    want = (E, F2, stored_columns(w_gate_up.dtype, H)) if layout == "EFH" else (E, H, F2)
    if quantised:
        check_quantised_weight("w_gate_up", w_gate_up, w_gate_up_scale, w_gate_up_zero, (E, F2, H), x.device,
                               scale_name="w_gate_up_scale", zero_name="w_gate_up_zero")
    if quantised and fused_gate_up and w_gate_up_scale.dim() == 3 and w_gate_up_scale.shape[1] != F2 and (
            interleaved or w_gate_up_scale.shape[1] % 2):
        raise ValueError(
            f"w_gate_up_scale: scales of blocks of {F2 // w_gate_up_scale.shape[1]} rows cannot be split between gate "
            f"and up ({'interleaved rows' if interleaved else 'an odd number of row blocks'}), got "
            f"{tuple(w_gate_up_scale.shape)}")
    if w_gate_up.shape != want or (fused_gate_up and F2 % 2):
        f_name = "2F" if fused_gate_up else "F"
        dims = ("E", f_name, f"H={H}") if layout == "EFH" else ("E", f"H={H}", f_name)
        raise ValueError(
            f"w_gate_up: expected shape ({', '.join(dims)}) for layout={layout!r}"
            + (" with an even 2F" if fused_gate_up else "")
            + f" (H is x's hidden size), got {tuple(w_gate_up.shape)}"
        )
    if w_up is not None:
        if not gated:
            raise ValueError("w_up: given with gated=False")
        check_tensor("w_up", w_up, shape=tuple(w_gate_up.shape), dtypes=(w_gate_up.dtype,), device=x.device)
        if quantised:
            check_quantised_weight("w_up", w_up, w_up_scale, w_up_zero, (E, F, H), x.device, scale_name="w_up_scale",
                                   zero_name="w_up_zero")
            if w_up_scale.shape != w_gate_up_scale.shape:  # one GEMM reads both
                raise ValueError(f"w_up_scale: expected w_gate_up_scale's shape {tuple(w_gate_up_scale.shape)}, got "
                                 f"{tuple(w_up_scale.shape)}")
    if quantised:
        check_quantised_weight("w_down", w_down, w_down_scale, w_down_zero, (E, H, F), x.device,
                               scale_name="w_down_scale", zero_name="w_down_zero")
    else:
        check_tensor("w_down", w_down, shape=(E, H, F) if layout == "EFH" else (E, F, H), dtypes=(x.dtype,),
                     device=x.device)
    if b_gate_up is not None:
        check_tensor("b_gate_up", b_gate_up, shape=(E, F2), dtypes=FLOAT_DTYPES, device=x.device)
    if b_up is not None:
        if w_up is None:
            raise ValueError("b_up: given without w_up (a fused w_gate_up takes its bias in b_gate_up)")
        check_tensor("b_up", b_up, shape=(E, F), dtypes=FLOAT_DTYPES, device=x.device)
    if b_down is not None:
        check_tensor("b_down", b_down, shape=(E, H), dtypes=FLOAT_DTYPES, device=x.device)
    check_choice("input_quantisation", input_quantisation, INPUT_QUANTISATIONS)
    if input_quantisation != "none":
        scale_dims, scales = (2, "per-row scales ((E, N) w_*_scale)") if input_quantisation == "fp8_rowwise" else (
            3, "block scales ((E, R, G) w_*_scale)")
        if not (quantised and w_gate_up.dtype == w_down.dtype == torch.float8_e4m3fn and w_gate_up_zero is None
                and w_gate_up_scale.dim() == w_down_scale.dim() == scale_dims):
            raise ValueError(f"input_quantisation: {input_quantisation!r} (fp8 inputs) needs fp8 e4m3 weights with "
                             f"{scales} and no zero points")
    K = topk_ids.shape[1]
    if not 1 <= K <= E:
        raise ValueError(f"topk_ids: expected 1 <= K <= E={E} choices per token, got K={K}")
    check_number("capacity_factor", capacity_factor, minimum=0.0)  # 0 = dropless


def fused_experts_ref(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up=None, b_gate_up=None, b_up=None, b_down=None,
    layout="EFH", interleaved=False, activation="silu", gated=True, alpha=CLAMPED_SWIGLU_ALPHA,
    limit=CLAMPED_SWIGLU_LIMIT,
    capacity_factor=0.0, drop_policy="position", return_num_dropped=False,
    w_gate_up_scale=None, w_up_scale=None, w_down_scale=None, w_gate_up_zero=None, w_up_zero=None, w_down_zero=None,
    input_quantisation="none",
):
    """Plain-PyTorch definition of :func:`fused_experts` (same arguments): a loop over experts,
    rounding where the kernels round (the intermediate activation and each slot's output are
    stored in x's dtype). The pre-activations are rounded to x's dtype too, as the user's code holds its
    GEMM outputs and the backward kernels hold them (recomputed or saved): the activation's derivative is then
    taken at the same points on every path, which matters where it jumps (a clamp's limit: 7.01 is past
    GPT-OSS's 7 in fp32, within it as bf16's 7.0). The forward kernels apply the activation to the fp32
    accumulators, a difference of rounding in the values only. Quantised weights are their dequantised values,
    in fp32; quantised inputs (``input_quantisation``) the dequantised values of x's rows and of each slot's
    activation."""
    check_clamp_constants(alpha, limit)
    check_fused_args(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, capacity_factor, drop_policy,
        w_gate_up_scale, w_up_scale, w_down_scale, w_gate_up_zero, w_up_zero, w_down_zero, input_quantisation,
    )
    quantised_inputs = input_quantisation != "none"
    T, K = topk_ids.shape
    if w_gate_up_scale is not None:
        w_gate_up = dequantise(w_gate_up, w_gate_up_scale, w_gate_up_zero)
        w_up = None if w_up is None else dequantise(w_up, w_up_scale, w_up_zero)
        w_down = dequantise(w_down, w_down_scale, w_down_zero)
    w = ExpertWeights(w_gate_up, w_down, w_up, b_gate_up, b_up, b_down, layout, interleaved, gated)
    E = w_gate_up.shape[0]
    ids = topk_ids
    num_dropped = torch.zeros((), dtype=torch.int32, device=x.device)
    capacity = capacity_from_factor(capacity_factor, T, K, E)
    if capacity >= 0:
        ids, num_dropped = apply_capacity_ref(topk_ids, topk_weights, E, capacity, drop_policy)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    out_TH = torch.zeros(T, x.shape[1], dtype=acc_dtype, device=x.device)
    for e in range(E):
        token, choice = torch.nonzero(ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        x_e = x[token].to(acc_dtype)
        if quantised_inputs:
            x_e = dequantise(*quantise_inputs(x[token], input_quantisation, w_gate_up_scale))
        gate = x_e @ w.gate[e].to(acc_dtype).T
        if w.b_gate is not None:
            gate = gate + w.b_gate[e].to(acc_dtype)
        up = None
        if w.up is not None:
            up = x_e @ w.up[e].to(acc_dtype).T
            if w.b_up is not None:
                up = up + w.b_up[e].to(acc_dtype)
        gate, up = (None if t is None else t.to(x.dtype).to(acc_dtype) for t in (gate, up))
        h = activate_ref(gate, up, activation, alpha, limit).to(x.dtype).to(acc_dtype)
        if quantised_inputs:
            h = dequantise(*quantise_inputs(h.to(x.dtype), input_quantisation, w_down_scale))
        y = h @ w.down[e].to(acc_dtype).T
        if w.b_down is not None:
            y = y + w.b_down[e].to(acc_dtype)
        y = (y * topk_weights[token, choice].to(acc_dtype)[:, None]).to(x.dtype)
        out_TH = out_TH.index_add(0, token, y.to(acc_dtype))
    out_TH = out_TH.to(x.dtype)
    return (out_TH, num_dropped) if return_num_dropped else out_TH


@torch.library.custom_op("moe_ops::fused_experts", mutates_args=())
def _fused_experts_op(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    layout: str,
    interleaved: bool,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
    capacity_factor: float,
    drop_policy: str,
    w_gate_up_scale: torch.Tensor | None = None,
    w_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    w_gate_up_zero: torch.Tensor | None = None,
    w_up_zero: torch.Tensor | None = None,
    w_down_zero: torch.Tensor | None = None,
    input_quantisation: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_experts_ref(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
        True, w_gate_up_scale, w_up_scale, w_down_scale, w_gate_up_zero, w_up_zero, w_down_zero, input_quantisation,
    )


def fused_experts_triton(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
    w_gate_up_scale=None, w_up_scale=None, w_down_scale=None, w_gate_up_zero=None, w_up_zero=None, w_down_zero=None,
    input_quantisation="none",
):
    """The Triton path (the op's CUDA kernel; tests also run it on CPU under the interpreter). Quantised
    weights go to both GEMMs as they are stored, with their scales and zero points (pointer loads: no TMA
    tiles); quantised inputs (fp8 rows) are made before each GEMM, their scales applied to its rows."""

    check_fused_args(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, capacity_factor, drop_policy,
        w_gate_up_scale, w_up_scale, w_down_scale, w_gate_up_zero, w_up_zero, w_down_zero, input_quantisation,
    )
    quantised_inputs = input_quantisation != "none"
    check_kernel_dtype("x", x)
    T, K = topk_ids.shape
    E = w_gate_up.shape[0]
    num_dropped = torch.zeros((), dtype=torch.int32, device=x.device)
    if T == 0:
        return x.new_empty((0, x.shape[1])), num_dropped
    w = ExpertWeights(w_gate_up, w_down, w_up, b_gate_up, b_up, b_down, layout, interleaved, gated,
                      w_gate_up_scale, w_up_scale, w_down_scale, w_gate_up_zero, w_up_zero, w_down_zero)
    ids = topk_ids
    capacity = capacity_from_factor(capacity_factor, T, K, E)
    if capacity >= 0:
        ids, num_dropped = apply_capacity_triton(topk_ids, topk_weights, E, capacity, drop_policy)
    num_slots = T * K
    block_m = choose_block_m(num_slots, E)
    # Packed (no padding): the same schedule the compiled graphs use, where several block sizes share it.
    sorted_slots, _, _, _, expert_offsets = block_schedule_triton(ids, E, 1)
    a, gather_top_k = x, K
    weight_views = [(t.shape, t.stride(), t.data_ptr()) for t in (w.gate, w.up) if t is not None]
    a_scale = None
    if quantised_inputs:
        a, a_scale = quantise_inputs(x, input_quantisation, w_gate_up_scale)
    tma = (w.s_gate is None and tma_pays(num_slots, E) and tma_device(x.device)
           and tma_applies(x.dtype, block_m, w.gate.shape[1], w.up is not None, weight_views))
    if tma:
        # TMA loads whole row blocks, not a gather: x's rows copied into schedule order first (one
        # pass over S x H, ~1% of the GEMMs' time at the sizes that get here).
        a, gather_top_k = rows_in_schedule_order(x, sorted_slots, K), 0
    # Both GEMMs read the packed schedule (sorted_slots + expert_offsets; no block_expert / num_padded).
    schedule = PackedSchedule(sorted_slots, expert_offsets)
    h = expert_gemm_triton(
        a, w.gate, schedule, num_slots, block_m, w_up=w.up, bias=w.b_gate, bias_up=w.b_up,
        gather_top_k=gather_top_k, activation=activation, alpha=alpha, limit=limit, tma=tma,
        w_scale=w.s_gate, w_up_scale=w.s_up, w_zero=w.z_gate, w_up_zero=w.z_up, a_scale=a_scale, out_dtype=x.dtype,
    )
    h_scale = None
    if quantised_inputs:
        h, h_scale = quantise_inputs(h, input_quantisation, w_down_scale)
    y_SH = expert_gemm_triton(
        h, w.down, schedule, num_slots, block_m, bias=w.b_down, slot_weights=topk_weights.reshape(-1),
        scatter=True, slot_ids=ids.reshape(-1), tma=tma, w_scale=w.s_down, w_zero=w.z_down, a_scale=h_scale,
        out_dtype=x.dtype,
    )
    y_TKH = y_SH.view(T, K, -1)
    if config.batch_invariant:
        # As the compiled graph does: K adds in fp32, in slot order, whatever T (torch's reduction
        # chooses its thread layout, and with it the order of the sum, from the tensor's sizes).
        out_TH = y_TKH[:, 0].float()
        for k in range(1, K):
            out_TH += y_TKH[:, k]
        return out_TH.to(x.dtype), num_dropped
    # torch's sum accumulates half-precision inputs in fp32.
    return y_TKH.sum(1), num_dropped


_fused_experts_op.register_kernel("cuda")(fused_experts_triton)


@_fused_experts_op.register_fake
def _(x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
      layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
      w_gate_up_scale=None, w_up_scale=None, w_down_scale=None, w_gate_up_zero=None, w_up_zero=None,
      w_down_zero=None, input_quantisation="none"):
    check_fused_args(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, capacity_factor, drop_policy,
        w_gate_up_scale, w_up_scale, w_down_scale, w_gate_up_zero, w_up_zero, w_down_zero, input_quantisation,
    )
    return x.new_empty(x.shape), x.new_empty((), dtype=torch.int32)


_fused_experts_backward_op = register_reference_autograd(
    _fused_experts_op,
    functools.partial(fused_experts_ref, return_num_dropped=True),
    differentiable=("x", "topk_weights", "w_gate_up", "w_down", "w_up", "b_gate_up", "b_up", "b_down"),
)


@_fused_experts_backward_op.register_kernel("cuda")
def _(*args):
    *forward_args, grads = args
    check_fused_args(*forward_args[:13], *forward_args[15:])  # all but alpha, limit and the gradients
    if any(scale is not None for scale in forward_args[17:23]):
        raise NotImplementedError(
            "fused_experts: gradients through quantised expert weights (w_gate_up_scale given) have no CUDA "
            "kernel; quantised experts serve inference"
        )
    return fused_experts_backward_triton(*forward_args[:17], grads)


# ---- the training variant: the same op, keeping the pre-activations for its backward ----


def _kept_shapes(x, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down, layout):
    """The shapes of what fused_experts_training keeps for its backward: the pre-activations, (S, N) of
    w_gate_up and, with w_up, of w_up, rows in the packed schedule's order; and that schedule, its sorted
    slots (S,) and expert offsets (E + 1,). (0,) each where it keeps none (the backward then recomputes
    them)."""
    if not saves_preactivations(x, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down):
        return (0,), (0,), (0,), (0,)
    num_slots = topk_ids.numel()
    features = (lambda w: w.shape[1]) if layout == "EFH" else (lambda w: w.shape[2])
    kept_up = (num_slots, features(w_up)) if w_up is not None else (0,)
    return (num_slots, features(w_gate_up)), kept_up, (num_slots,), (w_gate_up.shape[0] + 1,)


def _nothing_kept(x, topk_ids) -> tuple[torch.Tensor, ...]:
    """fused_experts_training's last four outputs where it keeps nothing: empty, each its own tensor (a
    custom op's outputs may not alias one another)."""
    return x.new_empty(0), x.new_empty(0), topk_ids.new_empty(0, dtype=torch.int32), topk_ids.new_empty(
        0, dtype=torch.int32)


@torch.library.custom_op("moe_ops::fused_experts_training", mutates_args=())
def _fused_experts_training_op(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    layout: str,
    interleaved: bool,
    activation: str,
    gated: bool,
    alpha: float,
    limit: float,
    capacity_factor: float,
    drop_policy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_ops::fused_experts for training graphs (lowering/graph/joint_rewrite.py puts it there): the same
    (out, num_dropped), plus what it keeps for its backward where its CUDA path runs on torch's grouped
    GEMM (``saves_preactivations``): the pre-activations and the packed schedule (sorted slots, expert
    offsets; int32), so that the backward neither recomputes them nor routes again through capacity.
    Elsewhere, as here (the reference), it keeps none."""
    out, num_dropped = fused_experts_ref(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
        return_num_dropped=True,
    )
    return out, num_dropped, *_nothing_kept(x, topk_ids)


@_fused_experts_training_op.register_kernel("cuda")
def fused_experts_training_triton(
    x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
    layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
):
    """The training variant's CUDA path (tests also run it on CPU under the interpreter). Where it keeps
    the pre-activations: x's rows copied into schedule order, the gate/up projection as torch's grouped
    GEMM (kept, in x's dtype), the activation, the down projection as torch's grouped GEMM, then each
    token's K rows times their routing weights summed in fp32 (in k order). Elsewhere fused_experts_triton."""
    args = (x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
            layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy)
    if not saves_preactivations(x, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down):
        return (*fused_experts_triton(*args), *_nothing_kept(x, topk_ids))
    check_fused_args(*args[:13], capacity_factor, drop_policy)
    check_kernel_dtype("x", x)
    T, K = topk_ids.shape
    E = w_gate_up.shape[0]
    num_slots = T * K
    kept_shape, kept_up_shape, _, _ = _kept_shapes(x, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
                                                   layout)
    num_dropped = torch.zeros((), dtype=torch.int32, device=x.device)
    if num_slots == 0:
        empty = block_schedule_triton(topk_ids, E, 1)
        return (x.new_zeros(x.shape), num_dropped, x.new_empty(kept_shape), x.new_empty(kept_up_shape),
                empty.sorted_slots, empty.expert_offsets)
    w = ExpertWeights(w_gate_up, w_down, w_up, None, None, None, layout, interleaved, gated=False)
    ids = topk_ids
    capacity = capacity_from_factor(capacity_factor, T, K, E)
    if capacity >= 0:
        ids, num_dropped = apply_capacity_triton(topk_ids, topk_weights, E, capacity, drop_policy)
    sorted_slots, _, _, _, expert_offsets = block_schedule_triton(ids, E, 1)
    x_rows = rows_in_schedule_order(x, sorted_slots, K)
    # Rows past the routed ones are left unwritten by the grouped GEMMs; no reader looks at them.
    kept = grouped_mm(x_rows, w.gate.transpose(1, 2), expert_offsets[1:])
    kept_up = grouped_mm(x_rows, w.up.transpose(1, 2), expert_offsets[1:]) if w_up is not None else None
    del x_rows
    if kept_up is not None:
        gate, up = kept, kept_up
    else:
        gate, up = split_gate_up(kept, interleaved) if gated else (kept, None)
    h = activation_triton(gate, up, sorted_slots, num_slots, activation, alpha, limit)
    y_rows = grouped_mm(h, w.down.transpose(1, 2), expert_offsets[1:])
    del h
    out = token_sums_triton(y_rows, slot_positions(sorted_slots, num_slots), torch.empty_like(x), K,
                            slot_weights=topk_weights.reshape(-1))
    return out, num_dropped, kept, x.new_empty(0) if kept_up is None else kept_up, sorted_slots, expert_offsets


@_fused_experts_training_op.register_fake
def _(x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
      layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy):
    check_fused_args(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, capacity_factor, drop_policy,
    )
    kept_shape, kept_up_shape, slots_shape, offsets_shape = _kept_shapes(
        x, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down, layout)
    return (x.new_empty(x.shape), x.new_empty((), dtype=torch.int32), x.new_empty(kept_shape),
            x.new_empty(kept_up_shape), topk_ids.new_empty(slots_shape, dtype=torch.int32),
            topk_ids.new_empty(offsets_shape, dtype=torch.int32))


@torch.library.custom_op("moe_ops::fused_experts_training_backward", mutates_args=("kept", "kept_up"))
def _fused_experts_training_backward_op(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, w_up: torch.Tensor | None, b_gate_up: torch.Tensor | None, b_up: torch.Tensor | None,
    b_down: torch.Tensor | None, layout: str, interleaved: bool, activation: str, gated: bool, alpha: float,
    limit: float, capacity_factor: float, drop_policy: str, kept: torch.Tensor, kept_up: torch.Tensor,
    sorted_slots: torch.Tensor, expert_offsets: torch.Tensor, grads: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """The training variant's backward where it kept the pre-activations, which it overwrites with their
    gradients (declared as mutated: in a compiled step the kept tensors are buffers of the backward that
    AOTAutograd donates, so Inductor lets the op write over them instead of copying them first, and a
    second backward of a retained graph is refused rather than fed overwritten values). Off CUDA (never
    reached: it keeps none there) the reference's gradients. The gradients come as a tuple (as the
    backward op's list): Inductor writes into a mutated argument only for ops returning plain tensors."""
    return tuple(torch.ops.moe_ops.fused_experts_backward(
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy, *NOT_QUANTISED, grads,
    ))


@_fused_experts_training_backward_op.register_kernel("cuda")
def fused_experts_training_backward_triton(*args):
    """The training variant's backward on the GPU (tests also run it on CPU under the interpreter)."""
    *forward_args, kept, kept_up, sorted_slots, expert_offsets, grads = args
    check_fused_args(*forward_args[:13], *forward_args[15:17])
    saved = [kept] if kept_up.dim() < 2 else [kept, kept_up]
    return tuple(fused_experts_backward_triton(*forward_args, grads, saved=saved,
                                               schedule=PackedSchedule(sorted_slots, expert_offsets)))


@_fused_experts_training_backward_op.register_fake
def _(*args):
    forward_args = args[:17]
    return tuple(torch.empty(0) if forward_args[i] is None else torch.empty_like(forward_args[i])
                 for i in (0, 1, 3, 4, 5, 6, 7, 8))


def _training_setup_context(ctx, inputs, output):
    # The kept pre-activations saved as tensors too (version-checked): the backward overwrites them, so a
    # second backward is refused.
    save_inputs(ctx, inputs, *output[2:])
    ctx.output_meta = [(o.shape, o.dtype, o.device) for o in output[:2]]


def _training_backward(ctx, grad_out, grad_num_dropped, *_grads_of_kept):
    (shape, dtype, device), _ = ctx.output_meta
    grad_out = torch.zeros(shape, dtype=dtype, device=device) if grad_out is None else grad_out
    grads = [grad_out, grad_out.new_empty(0)]  # num_dropped takes no gradient
    forward_args, (kept, kept_up, sorted_slots, expert_offsets) = saved_inputs(ctx)
    if kept.dim() == 2:
        input_grads = torch.ops.moe_ops.fused_experts_training_backward(
            *forward_args, kept, kept_up, sorted_slots, expert_offsets, grads)
    else:
        # The training variant takes no quantised weights.
        input_grads = torch.ops.moe_ops.fused_experts_backward(*forward_args, *NOT_QUANTISED, grads)
    result: list = [None] * len(forward_args)
    for i, grad in zip((0, 1, 3, 4, 5, 6, 7, 8), input_grads, strict=True):
        if forward_args[i] is not None and ctx.needs_input_grad[i]:
            result[i] = grad
    return tuple(result)


_fused_experts_training_op.register_autograd(_training_backward, setup_context=_training_setup_context)


def fused_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    w_up: torch.Tensor | None = None,
    b_gate_up: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    layout: str = "EFH",
    interleaved: bool = False,
    activation: str = "silu",
    gated: bool = True,
    alpha: float = CLAMPED_SWIGLU_ALPHA,
    limit: float = CLAMPED_SWIGLU_LIMIT,
    capacity_factor: float = 0.0,
    drop_policy: str = "position",
    return_num_dropped: bool = False,
    w_gate_up_scale: torch.Tensor | None = None,
    w_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    w_gate_up_zero: torch.Tensor | None = None,
    w_up_zero: torch.Tensor | None = None,
    w_down_zero: torch.Tensor | None = None,
    input_quantisation: str = "none",
):
    """The routed experts of a MoE layer: sum_j w[t, j] * MLP_{ids[t, j]}(x[t]).

    Args:
        x:            (T, H) fp32/fp16/bf16
        topk_weights: (T, K) float routing weights (from :func:`moe_ops.route`)
        topk_ids:     (T, K) int32/int64 expert ids; ids outside [0, E) are routed to no expert
                      (dropped slots, expert-parallel sentinels): they add nothing
        w_gate_up:    layout "EFH": (E, 2F, H) gate and up stacked (HF), or w1 (E, F, H) with w_up;
                      layout "EHF": (E, H, 2F) (torchtitan, GPT-OSS), or w1 (E, H, F) with w_up
        w_down:       "EFH": (E, H, F); "EHF": (E, F, H)
        w_up:         optional separate up projection (w3), same shape as w1
        b_gate_up:    optional (E, 2F) bias of w_gate_up ((E, F) with w_up or gated=False)
        b_up:         optional (E, F) bias of w_up
        b_down:       optional (E, H) bias of w_down (scaled by the routing weight, as GPT-OSS does)
        interleaved:  gate and up alternate along the 2F axis (GPT-OSS) instead of two halves
        activation:   "silu" (SwiGLU) | "gelu" | "gelu_tanh" | "relu" | "relu2" (squared ReLU) |
                      "clamped_swiglu" (GPT-OSS: alpha, limit) | "clamped_silu" (GLM-5-Next: limit) |
                      "none"; an alpha or limit other than the default given to an activation that does
                      not read it is refused
        gated:        act(gate) * up; False for a plain act(x W1) W2 MLP (w_gate_up is then W1)
        capacity_factor: 0 = dropless; else each expert takes at most ceil(cf * T * K / E) slots and
                      the rest contribute zero, chosen by drop_policy "position" (slot order),
                      "gshard" (first choices before second choices) or "score" (highest routing
                      weight kept); see :func:`moe_ops.apply_capacity`
        return_num_dropped: also return the number of dropped slots (0-dim int32 tensor)
        w_gate_up_scale, w_up_scale, w_down_scale: quantised expert weights (layout "EFH";
                      moe_ops.quantised): the weights hold int8 or fp8 e4m3 values, or int4 packed two per
                      byte (uint8, the last axis halved), and these their fp32 scales, one per expert and
                      output feature ((E, 2F) or (E, F) with w_up, (E, F), (E, H): torchao's per-row
                      weight-only tensors) or per block of output features and reduction features ((E, R,
                      G): groups along each row where R is the row count, DeepSeek-V3's 128 x 128 fp8 tiles).
                      The kernels read the stored values (no dequantised copy); the weights get no gradient
        w_gate_up_zero, w_up_zero, w_down_zero: optional zero points (fp32, the scales' shapes): the
                      weights stand for (values - zero) * scale
        input_quantisation: "none"; "fp8_rowwise" (w8a8, with fp8 weights scaled per row): x's rows and
                      each slot's activation quantised to fp8 e4m3 on the fly, one scale per row (amax /
                      448), and the GEMMs run on fp8 values; "fp8_groupwise" (with fp8 weights in blocks):
                      the same with a scale per row and group of the weights' groups of inputs

    Returns:
        (T, H) in x's dtype [, num_dropped]
    """
    # Before the op, whose schema would turn capacity_factor=True into 1.0 (and a flag into a number), and would
    # refuse a choice that is not a string (drop_policy=None) in its own words, with no list of the choices.
    check_number("capacity_factor", capacity_factor, minimum=0.0)
    for name, choice, choices in (("layout", layout, LAYOUTS), ("activation", activation, ACTIVATIONS),
                                  ("drop_policy", drop_policy, CAPACITY_POLICIES),
                                  ("input_quantisation", input_quantisation, INPUT_QUANTISATIONS)):
        check_choice(name, choice, choices)
    check_constants_read(activation, alpha, limit)
    for name, flag in (("interleaved", interleaved), ("gated", gated), ("return_num_dropped", return_num_dropped)):
        check_bool(name, flag)
    args = (
        x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
        layout, interleaved, activation, gated, alpha, limit, capacity_factor, drop_policy,
        w_gate_up_scale, w_up_scale, w_down_scale, w_gate_up_zero, w_up_zero, w_down_zero, input_quantisation,
    )
    refuse_unsupported_ad("fused_experts", *args)
    if direct_cuda_call_allowed(x, topk_weights, topk_ids, w_gate_up, w_down, w_up, b_gate_up, b_up, b_down,
                                w_gate_up_scale, w_up_scale, w_down_scale, w_gate_up_zero, w_up_zero, w_down_zero):
        out, num_dropped = fused_experts_triton(*args)
    else:
        out, num_dropped = torch.ops.moe_ops.fused_experts(*args)
    return (out, num_dropped) if return_num_dropped else out
