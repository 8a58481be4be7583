"""Inductor lowering of ``moe_ops::expert_gemm``: a Triton template whose store fuses the graph's epilogue
and whose A load fuses its prologue.

The template's body is the eager kernel's tile function (``moe_ops.expert_gemm_triton.expert_gemm_tile``:
gather, both GEMMs of a gated MLP from one A tile, bias, activation, routing weight); only the loads of A
and the store differ. Inductor's ``store_output`` writes the tile and appends whatever pointwise work the
graph does with the result (a dtype cast, a residual add, a scale), so those run in registers instead of
as a second kernel over the output. With pointer loads the template runs the tile function's steps
(``tile_coords``, ``tile_accumulators``, ``k_step``, ``tile_output``) around a K loop of its own whose A
tile comes through ``load_input``, where Inductor fuses a pointwise producer of A that only this
template reads (a prologue, e.g. a cast); TMA tiles call the tile function whole (their A is a copy in
schedule order).

Choices: under plain ``torch.compile`` one template config from the same heuristic the eager kernel
uses (``gemm_config``: by token bucket), so nothing is benchmarked at compile time. Under
``max_autotune`` Inductor benchmarks several tile configs and the op's eager kernel (an extern
choice), on a synthetic but valid block schedule: random schedule tensors would index out of bounds.
"""

from __future__ import annotations

import functools
import logging

import sympy
import torch
import triton
from torch.utils._sympy.functions import CeilDiv, Min

import moe_ops.expert_gemm  # noqa: F401  (defines moe_ops::expert_gemm, lowered here)
from moe_ops._checks import KERNEL_DTYPES
from moe_ops._compat.dispatch import fp32_matmul_allows_tf32
from moe_ops._compat.inductor import (
    ExternKernelChoice,
    SymbolicGridFn,
    TritonTemplate,
    V,
    autotune_select_algorithm,
    inductor_config,
    inductor_size_hint,
    ir,
    register_lowering,
    selected_node,
)
from moe_ops.activations import ACTIVATION_CODE, CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT
from moe_ops.expert_gemm_triton import expert_gemm_triton, group_block_k, weight_quantisation
from moe_ops.layout import PackedSchedule, PaddedSchedule
from moe_ops.lowering.inductor.direct_calls import extern_call
from moe_ops.schedule import block_schedule_ref
from moe_ops.settings import config
from moe_ops.tiles import (
    HOPPER_LIMITS,
    device_limits,
    gemm_config,
    packed_blocks_max,
    pipeline_fits,
    tma_applies,
    tma_device,
    weight_pair_stride,
)

log = logging.getLogger("moe_ops")

TEMPLATE_SOURCE = r"""
import triton
import triton.language as tl
from moe_ops.expert_gemm_triton import (
    expert_gemm_tile, input_group_ptrs, k_step, make_descriptors, tile_accumulators, tile_coords, tile_output,
    unrouted_row_blocks, unrouted_rows_tile, untransposed, weight_group_ptrs, weight_tile_ptrs,
)

{%- set names = ["A", "W"] %}
{%- if GATED %}{% set names = names + ["W_UP"] %}{% endif %}
{%- if HAS_BIAS %}{% set names = names + ["BIAS"] %}{% endif %}
{%- if HAS_BIAS_UP %}{% set names = names + ["BIAS_UP"] %}{% endif %}
{%- if HAS_SLOT_WEIGHT %}{% set names = names + ["SLOT_W"] %}{% endif %}
{%- if PACKED %}{% set names = names + ["SORTED_SLOTS", "EXPERT_OFFSETS"] %}
{%- else %}{% set names = names + ["SORTED_SLOTS", "BLOCK_EXPERT", "NUM_PADDED"] %}{% endif %}
{%- set QUANTISED = W_SCALED or W_GROUP_SIZE > 0 %}
{%- if QUANTISED %}{% set names = names + (["W_SCALE", "W_UP_SCALE"] if GATED else ["W_SCALE"]) %}{% endif %}
{%- if W_ZERO_POINT %}{% set names = names + (["W_ZERO", "W_UP_ZERO"] if GATED else ["W_ZERO"]) %}{% endif %}
{%- if A_SCALED or A_GROUPED %}{% set names = names + ["A_SCALE"] %}{% endif %}
{%- if ZERO_UNROUTED %}{% set names = names + ["IDS"] %}{% endif %}
{%- if STORE_TO_OUT %}{% set names = names + ["OUT"] %}{% endif %}

{{def_kernel(*names)}}
    N = {{size("W", 1)}}
    K = {{size("W", 2)}}{{" * 2  # two int4 values per stored byte" if W_INT4 else ""}}
{%- if GATHER %}
    num_slots = {{size("A", 0)}} * GATHER_TOP_K
{%- elif SCATTER %}
    num_slots = {{size("OUT", 0) if STORE_TO_OUT else size(None, 0)}}
{%- elif PACKED %}
    num_slots = {{size("A", 0)}}
{%- else %}
    num_slots = {{size("SLOT_W", 0)}}
{%- endif %}
{%- if PACKED %}
    num_blocks_max = tl.cdiv(num_slots, BLOCK_M) + tl.minimum(num_slots, NUM_EXPERTS)
{%- else %}
    num_blocks_max = {{size("BLOCK_EXPERT", 0)}}
{%- endif %}
{%- set w_up = "W_UP" if GATED else "W" %}
{%- set w_up_strides = [stride("W_UP", 0), stride("W_UP", 1), stride("W_UP", 2)] if GATED else [0, 0, 0] %}
    # Each operand a tensor with its strides, as the tile functions take them.
    w = (W, {{stride("W", 0)}}, {{stride("W", 1)}}, {{stride("W", 2)}})
    w_up = ({{w_up}}, {{w_up_strides | join(", ")}})
{%- set bias_strides = [stride("BIAS", 0), stride("BIAS", 1)] if HAS_BIAS else [0, 0] %}
{%- set bias_up_strides = [stride("BIAS_UP", 0), stride("BIAS_UP", 1)] if HAS_BIAS_UP else [0, 0] %}
    bias = ({{"BIAS" if HAS_BIAS else "W"}}, {{bias_strides | join(", ")}})
    bias_up = ({{"BIAS_UP" if HAS_BIAS_UP else "W"}}, {{bias_up_strides | join(", ")}})
    schedule = {{"(SORTED_SLOTS, EXPERT_OFFSETS)" if PACKED else "(SORTED_SLOTS, BLOCK_EXPERT, NUM_PADDED)"}}
{%- if QUANTISED %}
{%- macro strides3(name) -%}
{{name}}, {{stride(name, 0)}}, {{stride(name, 1)}}, {{stride(name, 2) if W_SCALE_GROUPS else 0}}
{%- endmacro %}
{%- set up_scale = strides3("W_UP_SCALE") if GATED else "W_SCALE, 0, 0, 0" %}
{%- set zero = strides3("W_ZERO") if W_ZERO_POINT else "W_SCALE, 0, 0, 0" %}
{%- set up_zero = strides3("W_UP_ZERO") if W_ZERO_POINT and GATED else "W_SCALE, 0, 0, 0" %}
    # Quantised weights (moe_ops.quantised): scales (and zero points) of w and w_up, as expert_gemm_tile takes them.
    w_scales = ({{strides3("W_SCALE")}}, {{up_scale}}, {{zero}}, {{up_zero}})
{%- else %}
    w_scales = None
{%- endif %}
    sizes = (N, K, num_slots, GATHER_TOP_K, num_blocks_max, NUM_EXPERTS)
{%- if TMA %}
    # A as an operand only here: pointer-load tiles read it through load_input (a fused prologue may
    # compute it, leaving no A argument).
    a_operand = (A, {{stride("A", 0)}}, {{stride("A", 1)}})
    descriptors = make_descriptors(a_operand, w, w_up, {{size("A", 0)}}, N, K, NUM_EXPERTS, GATED, BLOCK_M, BLOCK_N,
                                   BLOCK_K, PAIRED, PAIR_STRIDE)
{%- endif %}
    num_tiles = num_blocks_max * tl.cdiv(N, BLOCK_N)
{%- if ZERO_UNROUTED %}
    num_tiles += unrouted_row_blocks(EXPERT_OFFSETS, NUM_EXPERTS, num_slots, BLOCK_M) * tl.cdiv(N, BLOCK_N)
{%- endif %}
{%- set precision = '"ieee"' if IEEE else '"tf32"' %}
    # One tile per program, or (TMA: a persistent grid of one program per SM) tiles strided by the grid.
    for pid in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
{%- if TMA %}
        y, rows, cols, mask = expert_gemm_tile(
            pid, a_operand, w, w_up, bias, bias_up, {{"SLOT_W" if HAS_SLOT_WEIGHT else "W"}}, schedule, sizes,
            (ALPHA, LIMIT),
            descriptors, GATHER, SCATTER, GATED, HAS_BIAS, HAS_BIAS_UP, HAS_SLOT_WEIGHT, ACTIVATION, {{precision}},
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PACKED, E_PAD, TMA, PAIRED,
        )
{%- else %}
        # The tile function's steps with the template's own K loop: A comes through load_input, where
        # Inductor can fuse a pointwise producer of A (a prologue: a cast, a scale) into the load.
        expert, row0, offs_m, rows_in_range, slot, row_valid, a_row, col0, cols, col_valid, k_end = tile_coords(
            pid, schedule, sizes, GATHER, BLOCK_M, BLOCK_N, GROUP_M, PACKED, E_PAD,
        )
        acc, acc_up = tile_accumulators(BLOCK_M, BLOCK_N, GATED, W_LEFT)
        w_ptrs, u_ptrs = weight_tile_ptrs(w, w_up, expert, cols, BLOCK_K, W_INT4, W_LEFT)
        groups = weight_group_ptrs(w_scales, expert, cols, W_GROUP_SIZE, W_SCALE_ROWS, W_ZERO_POINT)
{%- if A_SCALED or A_GROUPED %}
        # fp8 A: its rows' scales (per group: applied in each K step; per row: after the K loop).
        a_scales = (A_SCALE, {{stride("A_SCALE", 0)}}, {{stride("A_SCALE", 1) if A_GROUPED else 0}})
{%- else %}
        a_scales = None
{%- endif %}
        a_groups = input_group_ptrs(a_scales, a_row, row_valid, A_GROUPED)
        for k0 in range(0, k_end, BLOCK_K):
            idx_am = a_row[:, None]
            idx_ak = k0 + tl.arange(0, BLOCK_K)[None, :]
            a_mask = row_valid[:, None] & (idx_ak < K)
            {{load_input("A", "a", ("idx_am", "idx_ak"), mask="a_mask", indent_width=12,
                         index_shape=("BLOCK_M", "BLOCK_K"))}}
{%- if not EVEN_K %}
            # Past K the weights are 0, but a fused prologue may leave anything in A's masked lanes (a NaN
            # times 0 is NaN): A is zeroed there. Rows are independent, and masked rows are never stored.
            a = tl.where(idx_ak < K, a, 0.0)
{%- endif %}
            acc, acc_up, w_ptrs, u_ptrs = k_step(
                a, acc, acc_up, w_ptrs, u_ptrs, K - k0, col_valid, {{stride("W", 2)}}, {{w_up_strides[2]}}, GATED,
                {{precision}}, BLOCK_K, W_GROUP_SIZE, W_INT4, W_ZERO_POINT, groups, k0, A_GROUPED, a_groups, W_LEFT,
            )
        acc, acc_up = untransposed(acc, acc_up, GATED, W_LEFT)
{%- if A_SCALED %}
        a_row_scale = tl.load(A_SCALE + a_row * {{stride("A_SCALE", 0)}}, mask=row_valid, other=0.0)[:, None]
        acc *= a_row_scale
{%- if GATED %}
        acc_up *= a_row_scale
{%- endif %}
{%- endif %}
        y, rows, cols, mask = tile_output(
            acc, acc_up, expert, slot, row_valid, offs_m, rows_in_range, cols, col_valid, bias, bias_up,
            {{"SLOT_W" if HAS_SLOT_WEIGHT else "W"}}, (ALPHA, LIMIT), SCATTER, GATED, HAS_BIAS, HAS_BIAS_UP,
            HAS_SLOT_WEIGHT, ACTIVATION, W_SCALED, w_scales,
        )
{%- endif %}
{%- if ZERO_UNROUTED %}
        # Programs past the GEMM tiles got a zero tile that stores nothing. They write the rows of slots
        # routed to no expert instead (ids >= E: no block owns them), so every output row is defined.
        q = pid - num_blocks_max * tl.cdiv(N, BLOCK_N)
        if q >= 0:
            rows, cols, mask = unrouted_rows_tile(q, IDS, {{stride("IDS", 0)}}, num_slots, N, NUM_EXPERTS, BLOCK_M,
                                                  BLOCK_N)
{%- endif %}
        idx_m = rows[:, None]
        idx_n = cols[None, :]
{%- if STORE_TO_OUT %}
        # Into a buffer the template pairs of every block size share (only one pair runs per call); no
        # epilogue fuses into this store.
        tl.store(OUT + idx_m * {{stride("OUT", 0)}} + idx_n * {{stride("OUT", 1)}}, y.to(OUT.dtype.element_ty), mask)
{%- else %}
        {{store_output(("idx_m", "idx_n"), "y", "mask", indent_width=8, val_shape=("BLOCK_M", "BLOCK_N"))}}
{%- endif %}
"""


@SymbolicGridFn
def expert_gemm_grid(num_blocks_max, n, unrouted_rows, active, meta, *, cdiv, min):
    """One program per (block, N tile) the schedule can hold (the busy ones are read on the device),
    then one per (BLOCK_M rows, N tile) of ``unrouted_rows`` slot rows to zero where unrouted (idle
    unless some slot is routed to no expert: ``unrouted_row_blocks``); with
    TMA at most one per SM, each walking tiles (persistent); no program at all where ``active`` (0 or
    1, an expression in the token count) is 0."""
    tiles = (num_blocks_max + cdiv(unrouted_rows, meta["BLOCK_M"])) * cdiv(n, meta["BLOCK_N"])
    return ((min(tiles, meta["NUM_SMS"]) if meta["TMA"] else tiles) * active, 1, 1)


expert_gemm_template = TritonTemplate(name="moe_ops_expert_gemm", grid=expert_gemm_grid, source=TEMPLATE_SOURCE)


def _extern_expert_gemm(*tensors, present, packed, num_slots, block_m, gather_top_k, scatter, activation, alpha,
                        limit):
    """The op's own kernel as an autotuning choice: Inductor passes only the tensors that exist."""
    remaining = list(tensors)
    a, w = remaining.pop(0), remaining.pop(0)
    optional = [remaining.pop(0) if given else None for given in present]
    if packed:
        sorted_slots, expert_offsets = remaining
        w_up, bias, bias_up, slot_weights = optional
        return expert_gemm_triton(
            a, w, PackedSchedule(sorted_slots, expert_offsets), num_slots, block_m, w_up=w_up, bias=bias,
            bias_up=bias_up, slot_weights=slot_weights, gather_top_k=gather_top_k, scatter=scatter,
            activation=activation, alpha=alpha, limit=limit,
        )
    sorted_slots, block_expert, num_padded = remaining
    return torch.ops.moe_ops.expert_gemm(
        a, w, *optional, sorted_slots, block_expert, num_padded,
        num_slots, block_m, gather_top_k, scatter, activation, alpha, limit,
    )


extern_expert_gemm = ExternKernelChoice(_extern_expert_gemm, name="moe_ops_expert_gemm_eager", has_out_variant=False)


def templates_allowed(device: torch.device) -> bool:
    """Templates need Triton's backend for this device: CUDA, or CPU where Inductor was told to emit
    Triton (the tests' code-generation-only mode; stock Triton cannot run it on CPU)."""
    if not config.inductor_templates:
        return False
    return device.type == "cuda" or (device.type == "cpu" and inductor_config.cpu_backend == "triton")


def tma_allowed(device: torch.device) -> bool:
    """TMA tiles for this device: a Hopper-or-newer GPU, or CPU code generation (as for an H100)."""

    return device.type == "cpu" or tma_device(device)


def weight_views(*weights) -> list:
    """(shape, strides, None) of each IR weight view present, as tma_applies takes them."""
    return [(w.get_size(), w.get_stride(), None) for w in weights if w is not None]


def ir_pair_stride(w, w_up) -> int | None:
    """weight_pair_stride for two views of one buffer (the halves of a fused gate_up weight), from their
    offsets; None for anything else (a view Inductor may move or copy is not a fixed distance apart)."""

    if not (isinstance(w, ir.ReinterpretView) and isinstance(w_up, ir.ReinterpretView)):
        return None
    step = w_up.get_layout().offset - w.get_layout().offset
    if w.data.get_name() != w_up.data.get_name() or not isinstance(step, (int, sympy.Integer)):
        return None
    itemsize = w.get_dtype().itemsize
    return weight_pair_stride((w.get_size(), w.get_stride()), (w_up.get_size(), w_up.get_stride()),
                              int(step) * itemsize, itemsize)


def _device_limits(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        return device_limits(device.index or 0)
    return HOPPER_LIMITS


@functools.lru_cache(maxsize=64)
def _synthetic_schedule(num_slots: int, num_experts: int, block_m: int, packed: bool, device: str):
    """A valid schedule of uniformly routed slots (slot s -> expert s % E), for benchmarking choices:
    (sorted_slots, block_expert, num_padded), or (sorted_slots, expert_offsets) packed."""
    ids = (torch.arange(num_slots) % num_experts).reshape(-1, 1)
    schedule = block_schedule_ref(ids, num_experts, 1 if packed else block_m)
    return tuple(t.to(device) for t in ((schedule[0], schedule[4]) if packed else schedule[:3]))


def _autotune_configs(base: dict) -> list[dict]:
    """The heuristic config first, then tiles around it (all keep the schedule's BLOCK_M)."""
    configs = [base]
    for block_n, block_k, warps, stages in ((64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3),
                                            (32, 128, 4, 5), (64, 128, 4, 4)):
        candidate = dict(base, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
        if candidate not in configs:
            configs.append(candidate)
    return configs


def tuned_expert_gemm(
    a, w, schedule: PaddedSchedule | PackedSchedule, num_slots, block_m: int, *, w_up=None, bias=None,
    bias_up=None, slot_weights=None, gather_top_k: int = 0, scatter: bool = False, activation: str = "none",
    alpha: float = CLAMPED_SWIGLU_ALPHA, limit: float = CLAMPED_SWIGLU_LIMIT, slot_ids=None, active=1,
    out=None, tma: bool = False, w_scale=None, w_up_scale=None, w_zero=None, w_up_zero=None,
    a_scale=None, out_dtype=None,
):
    """The template node for one expert GEMM (Inductor IR in, IR out; the arguments of the eager
    launcher, expert_gemm_triton, with the schedule's tensors as IR). Callers check that the
    template applies (``template_applies``). ``slot_ids`` (S,), for a scatter output only: the expert
    of each slot, so that rows of slots routed to no expert (ids >= E) are written as zeros.
    ``active`` (0/1, an expression in the token count): launch no program where 0; the choice is then
    not benchmarked.
    ``out``: a buffer of the output's shape that the kernel writes (a mutated input) instead of a new
    one; the node returned then stands for nothing but that write. ``tma``: TMA tiles on a persistent
    grid where the inputs allow them (``tma_applies``; A in schedule order, made contiguous here).
    ``w_scale`` / ``w_up_scale`` (and zero points ``w_zero`` / ``w_up_zero``): quantised weights
    (moe_ops.quantised; pointer loads: no TMA tiles). ``a_scale``: A holds fp8 values with these scales per row
    (rows,) or per row and group of the weights' groups (rows, G); ``out_dtype`` then the output's dtype."""

    packed = isinstance(schedule, PackedSchedule)
    optional = (w_up, bias, bias_up, slot_weights)
    present = tuple(t is not None for t in optional)
    tensors = [a, w, *[t for t in optional if t is not None], *schedule]
    # realize_input, not select_algorithm.realize_inputs: that one copies a view without a unit stride,
    # and GPT-OSS's interleaved gate/up columns are such a view (the tile function takes any strides).
    scaled = w_scale is not None
    extra = [t for t in (w_scale, w_up_scale, w_zero, w_up_zero, a_scale, slot_ids, out) if t is not None]
    input_nodes = [ir.ExternKernel.realize_input(t) for t in (*tensors, *extra)]
    device = a.get_device()
    if tma:
        # TMA loads A's rows as blocks: they must be contiguous.
        input_nodes[0] = ir.ExternKernel.require_contiguous(input_nodes[0])
    rows = num_slots if scatter else schedule.sorted_slots.get_size()[0]
    n = w.get_size()[1]
    # Writing into ``out``, the node's own output is a placeholder that is never allocated.
    size, stride = ([rows, n], [n, 1]) if out is None else ([1], [1])
    layout = ir.FixedLayout(device, out_dtype or a.get_dtype(), size, stride)

    num_experts = int(w.get_size()[0])
    if packed:
        blocks_max = packed_blocks_max(num_slots, num_experts, block_m, cdiv=CeilDiv, minimum=Min)
    else:
        blocks_max = schedule.block_expert.get_size()[0]
    num_sms, smem_bytes = _device_limits(device)
    gated = w_up is not None
    ieee = a.get_dtype() == torch.float32 and not fp32_matmul_allows_tf32()
    tma = (tma and not scaled and packed and gather_top_k == 0 and tma_allowed(device)
           and tma_applies(a.get_dtype(), block_m, n, gated, weight_views(w, w_up)))
    pair_stride = ir_pair_stride(input_nodes[1], input_nodes[2]) if tma and gated else None
    k = int(a.get_size()[1])
    quantised = weight_quantisation(w.get_dtype(), None if w_scale is None else w_scale.get_size(),
                                    w_zero is not None, int(n), k)
    base = gemm_config(block_m, gated, a.get_dtype().itemsize, smem_bytes, ieee, tma,
                       quantised["W_LEFT"], a_scale is not None and len(a_scale.get_size()) == 2)
    flags = dict(
        GATHER=gather_top_k > 0, SCATTER=bool(scatter), GATED=gated, HAS_BIAS=bias is not None,
        HAS_BIAS_UP=bias_up is not None, HAS_SLOT_WEIGHT=slot_weights is not None,
        ACTIVATION=ACTIVATION_CODE[activation], GATHER_TOP_K=max(gather_top_k, 1),
        ALPHA=float(alpha), LIMIT=float(limit),
        IEEE=ieee, BLOCK_M=block_m, TMA=tma, NUM_SMS=num_sms, PAIRED=pair_stride is not None,
        PAIR_STRIDE=pair_stride or 0,
        ZERO_UNROUTED=slot_ids is not None, NUM_EXPERTS=num_experts,
        PACKED=packed, E_PAD=triton.next_power_of_2(num_experts) if packed else 1, STORE_TO_OUT=out is not None,
        W_SCALE_GROUPS=scaled and len(w_scale.get_size()) == 3, **quantised,
        A_SCALED=a_scale is not None and len(a_scale.get_size()) == 1,
        A_GROUPED=a_scale is not None and len(a_scale.get_size()) == 2,
    )
    unrouted_rows = num_slots if slot_ids is not None else 0
    always_active = active == 1
    # Batch-invariant mode: the one tile config, whatever T the tuning would have been run at.
    autotune = ((inductor_config.max_autotune or inductor_config.max_autotune_gemm) and always_active
                and not config.batch_invariant)
    choices = []
    for cfg in _autotune_configs(base) if autotune else [base]:
        if tma and (int(n) % cfg["BLOCK_N"] or not pipeline_fits(
                block_m, cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"], gated, a.get_dtype().itemsize,
                smem_bytes, tma=True)):
            continue
        block_k = group_block_k(cfg["BLOCK_K"], quantised["W_GROUP_SIZE"], k)
        cfg = dict(cfg, BLOCK_K=block_k, EVEN_K=k % block_k == 0)
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        expert_gemm_template.maybe_append_choice(
            choices, input_nodes=input_nodes, layout=layout, num_warps=num_warps, num_stages=num_stages,
            call_sizes=[blocks_max, n, unrouted_rows, active],
            mutated_inputs=None if out is None else [input_nodes[-1]], **flags, **cfg,
        )
    input_gen_fns = {}
    if autotune:
        schedule_at = len(tensors) - len(schedule)
        synthetic = functools.partial(
            _synthetic_schedule, inductor_size_hint(num_slots), num_experts, block_m, packed, str(device)
        )
        for i in range(len(schedule)):
            input_gen_fns[schedule_at + i] = lambda node, i=i: synthetic()[i]
        if (device.type == "cuda" and isinstance(num_slots, int) and not V.graph.cpp_wrapper and slot_ids is None
                and not scaled):
            choices.append(extern_expert_gemm.bind(
                input_nodes, layout, present=present, packed=packed, num_slots=num_slots, block_m=block_m,
                gather_top_k=gather_top_k, scatter=scatter, activation=activation, alpha=alpha, limit=limit,
            ))
    if not choices:
        raise RuntimeError("moe_ops: the expert GEMM template produced no choice")
    return selected_node(autotune_select_algorithm(
        "moe_ops_expert_gemm", choices, input_nodes, layout, input_gen_fns=input_gen_fns,
    ))


def template_applies(a, gather_top_k, scatter, slot_weights) -> str | None:
    """None if the template computes exactly what the op computes here, else why not."""
    if not templates_allowed(a.get_device()):
        return "no Triton templates for this device (or moe_ops.config.inductor_templates is off)"
    if a.get_dtype() not in KERNEL_DTYPES:
        return f"{a.get_dtype()}: the op's own kernel refuses it with the reason"
    if scatter:
        # The op's scatter output holds zeros in rows of slots no block owns (ids outside [0, E)); the
        # template writes scheduled rows only. fused_experts' lowering masks those rows itself.
        return "scatter output: rows of unscheduled slots would be left unwritten"
    if gather_top_k == 0 and slot_weights is None:
        return "the slot count is not known from any input's shape"
    return None


@register_lowering(torch.ops.moe_ops.expert_gemm.default, type_promotion_kind=None)
def lower_expert_gemm(
    a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
    num_slots, block_m, gather_top_k, scatter, activation, alpha, limit, w_scale=None, w_up_scale=None, w_zero=None,
    w_up_zero=None,
):
    args = (a, w, w_up, bias, bias_up, slot_weights, sorted_slots, block_expert, num_padded,
            num_slots, block_m, gather_top_k, scatter, activation, alpha, limit, w_scale, w_up_scale, w_zero, w_up_zero)
    why_not = template_applies(a, gather_top_k, scatter, slot_weights)
    if why_not is not None:
        log.debug("moe_ops.expert_gemm stays an extern call: %s", why_not)
        return extern_call(torch.ops.moe_ops.expert_gemm.default, *args)
    return tuned_expert_gemm(
        a, w, PaddedSchedule(sorted_slots, block_expert, num_padded), num_slots, block_m, w_up=w_up, bias=bias,
        bias_up=bias_up, slot_weights=slot_weights, gather_top_k=gather_top_k, scatter=scatter,
        activation=activation, alpha=alpha, limit=limit, w_scale=w_scale, w_up_scale=w_up_scale, w_zero=w_zero,
        w_up_zero=w_up_zero,
    )

