"""Inductor lowerings (lowering/inductor/fused_experts_lowering.py, expert_gemm_lowering.py, direct_calls.py).

CPU: Inductor's C++ backend keeps each op one extern call (and the compiled result equals eager); with
``cpu_backend="triton"`` Inductor generates the Triton templates on CPU without running them, and the
generated source shows which neighbouring work fused into which kernel. CUDA (the H100): the
templates' results against eager across the op's variants, dynamic token counts, max-autotune, CUDA
graphs, and the number of kernels one MoE layer launches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch._inductor.config as inductor_config
from compile_harness import fresh_compile_state  # noqa: F401  (fixture)
from conftest import assert_close_rel
from torch._dynamo.utils import counters
from torch._inductor.graph import GraphLowering
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck
from triton.runtime.jit import JITFunction

import moe_ops
from moe_ops.quantised import quantise_weight, sqnr_db
from moe_ops.routing_triton import _route_kernel
from moe_ops.tiles import HOPPER_LIMITS

pytestmark = pytest.mark.usefixtures("fresh_compile_state")

T, H, F_, E = 24, 64, 32, 4


class _Stop(Exception):
    pass


def generated_code(fn, *args, dynamic=None) -> str:
    """The wrapper and kernel source Inductor generates for ``fn(*args)`` on CPU, with Triton as the CPU
    backend: code generation only (stock Triton has no CPU driver, so nothing is compiled or run)."""
    sources: list[str] = []

    def keep_source(graph: GraphLowering):
        wrapper, kernels = graph.codegen()
        sources.append(wrapper.value)
        if kernels:
            sources.append(kernels.value)
        raise _Stop

    torch._dynamo.reset()
    with (
        mock.patch("torch.utils._triton.triton_hash_with_backend", lambda: "FAKEHASH"),
        mock.patch.object(GraphLowering, "compile_to_module", keep_source),
        inductor_config.patch(cpu_backend="triton", fx_graph_cache=False),
        contextlib.suppress(Exception),
    ):
        torch.compile(fn, dynamic=dynamic)(*args)
    assert sources, "Inductor generated no code"
    return "\n".join(sources)


def weights(dtype=torch.bfloat16, num_experts=E, hidden=H, inter=F_, device="cpu"):
    g = torch.Generator().manual_seed(0)
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5).to(device, dtype)
    w_down = (torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5).to(device, dtype)
    return w_gate_up, w_down


def moe_layer(k, w_gate_up, w_down, unrouted_expert=None):
    """route + fused_experts + a residual add: what a decoder layer does after the router."""

    def layer(x, logits, residual):
        topk_weights, topk_ids = moe_ops.route(logits, k, renormalize=True)
        if unrouted_expert is not None:
            # Slots of one expert go nowhere (ids >= E: expert-parallel sentinels).
            topk_ids = torch.where(topk_ids == unrouted_expert, w_gate_up.shape[0], topk_ids)
        return moe_ops.fused_experts(x, topk_weights, topk_ids, w_gate_up, w_down) + residual

    return layer


def layer_inputs(tokens=T, dtype=torch.bfloat16, num_experts=E, hidden=H, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    logits = torch.randn(tokens, num_experts, generator=g).to(device)
    residual = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    return x, logits, residual


def kernel_sources(code: str) -> dict[str, str]:
    """Inductor's generated Triton kernels by name: the source between ``def <name>(`` and the kernel's
    end. The route's and the schedule's kernels, which the graph launches as they are
    (lowering/inductor/kernel_calls.py), are left out."""
    kernels = {}
    for chunk in code.split("async_compile.triton(")[1:]:
        name = chunk.split("'", 2)[1]
        if name.startswith("triton_"):
            kernels[name] = chunk.split("''', device_str=")[0]
    return kernels


# Under Triton's interpreter (CPU test runs) route and schedule stay extern calls; with compiled kernels
# (the GPU box) the graph launches their kernels.
KERNELS_IN_GRAPH = isinstance(_route_kernel, JITFunction)


# ---- CPU: the C++ backend keeps the ops extern --------------------------------------------------------


def test_cpu_backend_calls_the_op_and_matches_eager():
    w_gate_up, w_down = weights()
    layer = moe_layer(2, w_gate_up, w_down)
    args = layer_inputs()
    out, (code, *_) = run_and_get_code(torch.compile(layer), *args)
    assert "torch.ops.moe_ops.fused_experts.default(" in code
    assert "triton_tem_" not in code
    assert torch.equal(out, layer(*args))


# ---- CPU: the generated templates -------------------------------------------------------------------


def test_templates_replace_the_extern_call():
    w_gate_up, w_down = weights()
    code = generated_code(moe_layer(2, w_gate_up, w_down), *layer_inputs())
    kernels = kernel_sources(code)
    templates = [name for name in kernels if name.startswith("triton_tem_")]
    # gate_up (gather rows of x, gated SiLU) and down (routing weight, scatter to slot order)
    assert len(templates) == 2, templates
    gate_up, down = (kernels[name] for name in templates)
    for source in (gate_up, down):  # pointer loads: the tile's steps around the template's own K loop
        FileCheck().check("tile_coords(").check("for k0 in range(").check("tl.load(A +").check("k_step(").check(
            "tile_output(").run(source)
    FileCheck().check("GATHER : tl.constexpr = True").check("GATED : tl.constexpr = True").check(
        "ACTIVATION : tl.constexpr = 1"
    ).run(gate_up)
    # The routing-weight multiply runs in the down template's registers, before its only store.
    FileCheck().check("SCATTER : tl.constexpr = True").check("HAS_SLOT_WEIGHT : tl.constexpr = True").check(
        "ZERO_UNROUTED : tl.constexpr = True"
    ).run(down)
    calls = code.split("def call(")[1]
    assert "moe_ops.fused_experts.default(" not in calls
    # The schedule: an extern op under the interpreter, else its kernel in the graph.
    if KERNELS_IN_GRAPH:
        assert re.search(r"_schedule_scatter_kernel_\d+\.run\(", calls) and "block_schedule" not in calls
    else:
        assert "torch.ops.moe_ops.block_schedule.default(" in calls


def test_combine_over_k_and_residual_add_are_one_kernel():
    """K = 2: a token's two slots come from two programs, so the combine is its own kernel; the residual
    add after the layer fuses into it (one read of each slot row, one write of the output)."""
    w_gate_up, w_down = weights()
    code = generated_code(moe_layer(2, w_gate_up, w_down), *layer_inputs())
    kernels = kernel_sources(code)
    others = [name for name in kernels if not name.startswith("triton_tem_")]
    assert len(others) == 1, others
    (combine,) = others
    assert "add" in combine
    # Reads slot rows 2t and 2t + 1 of the down template's output, sums them in fp32, adds the residual.
    FileCheck().check("tl.load").check("128*x1").check("tl.load").check("64 + x0 + 128*x1").check(
        "tl.load"
    ).check(" + ").check("tl.store").run(kernels[combine])


def test_k1_epilogue_fuses_into_the_down_template():
    """K = 1: the combine is pointwise, so the combine, the residual add and a cast to fp32 all run in
    the down template's epilogue (store_output), and its (T, H) output is the layer's."""
    w_gate_up, w_down = weights()
    inner = moe_layer(1, w_gate_up, w_down)

    def layer(x, logits, residual):
        return inner(x, logits, residual).float()

    code = generated_code(layer, *layer_inputs())
    kernels = kernel_sources(code)
    assert len(kernels) == 2, list(kernels)
    down = next(name for name in kernels if "add" in name)
    assert down.startswith("triton_tem_fused_"), down
    FileCheck().check("tile_output(").check("tl.load(in_ptr").check(" + ").check(
        "tl.store(out_ptr"
    ).run(kernels[down])


def _experts_of_cast_input(w_gate_up, w_down):
    """fp32 experts fed a bf16 activation through a cast that only they read (the router reads logits)."""

    def layer(x, logits):
        topk_weights, topk_ids = moe_ops.route(logits, 2, renormalize=True)
        return moe_ops.fused_experts(x.float(), topk_weights, topk_ids, w_gate_up, w_down)

    return layer


def test_cast_feeding_the_experts_fuses_into_the_gate_up_template():
    """Prologue fusion: a cast that only the experts read runs in the gate_up template's A load
    (load_input), not as a kernel of its own that writes an fp32 copy of x."""
    w_gate_up, w_down = weights(dtype=torch.float32)
    x, logits, _ = layer_inputs()
    kernels = kernel_sources(generated_code(_experts_of_cast_input(w_gate_up, w_down), x, logits))
    templates = [name for name in kernels if name.startswith("triton_tem_")]
    assert len(templates) == 2 and len(kernels) == 3, list(kernels)  # gate_up, down, combine
    gate_up = kernels[templates[0]]
    assert "_to_copy" in templates[0], templates
    # x (bf16) loaded and converted inside the K loop, where the template would load A.
    FileCheck().check("for k0 in range(").check("tl.load(in_ptr").check(".to(tl.float32)").check("a = ").check(
        "k_step(").run(gate_up)
    assert "tl.load(A +" not in gate_up


def test_prologue_stays_out_when_the_router_reads_it_too():
    """Where prologue fusion does not pay, and does not happen: in a MoE layer the router reads the same
    activation as the experts, so a pointwise op before the layer (here a scale) is computed once into
    a buffer that both read; fused into the gate_up template it would still be written for the router,
    and recomputed by every N tile of every row block."""
    w_gate_up, w_down = weights(dtype=torch.float32)
    x, _, _ = layer_inputs(dtype=torch.float32)
    router = torch.randn(E, H, generator=torch.Generator().manual_seed(3)) * H**-0.5

    def layer(x):
        x_in = x * 0.5
        topk_weights, topk_ids = moe_ops.route(x_in @ router.T, 2, renormalize=True)
        return moe_ops.fused_experts(x_in, topk_weights, topk_ids, w_gate_up, w_down)

    kernels = kernel_sources(generated_code(layer, x))
    gate_up = kernels[next(name for name in kernels if name.startswith("triton_tem_"))]
    assert "tl.load(A +" in gate_up
    scale = [name for name in kernels if name.startswith("triton_poi_") and "mul" in name]
    assert len(scale) == 1, list(kernels)


def test_shared_expert_output_fuses_into_the_combine():
    """Qwen2-MoE / DeepSeek-V3: the shared expert's gated output is added to the routed output; the
    sigmoid gate, the multiply and both adds run in the combine kernel."""
    w_gate_up, w_down = weights()
    routed = moe_layer(2, w_gate_up, w_down)
    g = torch.Generator().manual_seed(2)
    w_shared = (torch.randn(H, H, generator=g) * H**-0.5).bfloat16()
    w_shared_gate = (torch.randn(1, H, generator=g) * H**-0.5).bfloat16()

    def layer(x, logits, residual):
        shared = torch.sigmoid(x @ w_shared_gate.T) * (x @ w_shared.T)
        return routed(x, logits, residual) + shared

    code = generated_code(layer, *layer_inputs())
    kernels = kernel_sources(code)
    # (the shared expert's two matmuls stay extern GEMMs; its sigmoid gate then joins the combine)
    combine = [name for name in kernels if all(op in name for op in ("add", "fused_experts", "mul", "sigmoid"))]
    assert len(combine) == 1, list(kernels)
    # The (T, 1) sigmoid gate is a kernel of its own; the combine reads it, multiplies and adds.
    FileCheck().check("128*x1").check("64 + x0 + 128*x1").check(" * ").check(" + ").check("tl.store").run(
        kernels[combine[0]]
    )


def test_dynamic_token_count_holds_a_template_pair_per_block_size():
    """One graph for every T: a gate_up/down template pair per block size over one packed schedule, each
    pair's grid zero outside its range of T, and the combine reading the pair that ran."""
    from moe_ops.tiles import block_m_ranges

    w_gate_up, w_down = weights()
    args = layer_inputs()
    for t in args:
        torch._dynamo.mark_dynamic(t, 0)
    code = generated_code(moe_layer(2, w_gate_up, w_down), *args)
    calls = code.split("def call(")[1]
    assert "moe_ops.fused_experts.default(" not in calls
    # Packed: block_m = 1, no padding (in the graph, the scatter kernel's last size argument is block_m).
    if KERNELS_IN_GRAPH:
        assert re.search(r"_schedule_scatter_kernel_\d+\.run\(.*\(31 \+ 2\*s\d+\) // 32, 1, ", calls), calls
    else:
        assert calls.count("torch.ops.moe_ops.block_schedule.default(") == 1
        assert "block_schedule.default(buf2, 4, 1)" in calls
    kernels = kernel_sources(code)
    templates = [name for name in kernels if name.startswith("triton_tem_")]
    # TMA tiles need N a multiple of the tile's columns, which these weights are not (F = 32): the two
    # 128-row ranges are one pair.
    *ranges, (block_m, fewer, _, _) = block_m_ranges(E)
    ranges[-1] = (block_m, ranges[-1][1], None, False)
    assert len(templates) == 2 * len(ranges) == 6, templates
    for (block_m, fewer, most, _), pair in zip(ranges, zip(templates[::2], templates[1::2], strict=True),
                                               strict=True):
        for name in pair:
            FileCheck().check(f"BLOCK_M : tl.constexpr = {block_m}").check("PACKED : tl.constexpr = True").run(
                kernels[name]
            )
            assert "TMA : tl.constexpr = False" in kernels[name]
            # The launch's grid is a multiple of [fewer < S <= most], S = 2 * T (sympy drops S > 0).
            launch = calls.split(f"{name}.run(")[1].split("\n")[0]
            if fewer > 0:
                assert f"max(0, min(1, (-{fewer}) + 2*s" in launch, launch
            if most is not None:
                assert f"max(0, min(1, {most + 1} + ((-2)*s" in launch, launch
    # Every down template writes one shared buffer (a mutated input, not an output of its own), which
    # the combine (with the residual add) reads: one buffer, whichever pair ran.
    def launch_args(name):
        return set(calls.split(f"{name}.run(")[1].split(")")[0].split(", "))

    combine = [name for name in kernels if not name.startswith("triton_tem_")]
    assert len(combine) == 1, combine
    shared = set.intersection(launch_args(combine[0]), *(launch_args(name) for name in templates[1::2]))
    assert len(shared) == 1 and shared.pop().startswith("buf"), calls
    for name in templates[1::2]:
        FileCheck().check("STORE_TO_OUT : tl.constexpr = True").check("tl.store(OUT + idx_m").run(kernels[name])


_IN_GRAPH_CODE = """
import sys
sys.path.insert(0, {tests!r})
import torch, test_lowering as t
w_gate_up, w_down = t.weights()
args = t.layer_inputs(tokens={tokens})
for a in args if {dynamic} else ():
    torch._dynamo.mark_dynamic(a, 0)
print(t.generated_code(t.moe_layer(2, w_gate_up, w_down), *args, dynamic={compile_dynamic}))
"""


@pytest.mark.parametrize("dynamic", [False, True], ids=["static_T", "dynamic_T"])
def test_route_and_schedule_kernels_in_the_graph(dynamic):
    """With compiled Triton kernels (a subprocess without the interpreter, which these tests run under),
    the route and the schedule are launches of their own kernels in the graph (lowering/inductor/kernel_calls.py),
    not extern calls: one route launch and, for a static T = 24 (48 slots, one chunk), one schedule
    launch; a dynamic T launches the three-kernel schedule with tiles for any T, grids in T."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    script = _IN_GRAPH_CODE.format(tests=os.path.dirname(__file__), tokens=T, dynamic=dynamic, compile_dynamic=None)
    result = subprocess.run([sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = result.stdout.split("def call(")[1].split("\nrunner = ")[0]
    launches = re.findall(r"(_\w+_kernel)_\d+\.run\(", calls)
    schedule = ["_chunk_histogram_kernel", "_chunk_scan_kernel"] if dynamic else []
    assert launches == ["_route_kernel", *schedule, "_schedule_scatter_kernel"], launches
    assert "moe_ops.route.default(" not in calls and "block_schedule.default(" not in calls
    assert "moe_ops._dispatch" not in calls
    # The route's outputs feed the templates: ids into the schedule and the down template, weights into down.
    assert calls.count("triton_tem_") >= 2
    route_args = calls.split("_route_kernel_")[1].split("\n")[0]
    # The token count follows the kernel's six pointers (logits, bias, weights, ids, two statistics tables).
    num_tokens = route_args.split(", ")[6]
    if dynamic:
        assert "s" in num_tokens, route_args  # an argument of the launch
        # Rows per program fixed for any T, min(32, 4096 // 4 experts) = 32: the grid is cdiv(T, 32).
        assert "(31 + s" in route_args, route_args
    else:
        assert num_tokens == str(T), route_args


@pytest.mark.parametrize("dynamic", [False, True], ids=["static_T", "dynamic_T"])
def test_prefill_tiles_load_through_tma(dynamic):
    """From TMA_MIN_ROWS_PER_EXPERT rows per expert up (a static T that large, or the last pair of a
    dynamic T), the gate_up and down templates load through tensor descriptors on a persistent grid
    (one program per SM of an H100 when generated on CPU), the gate_up one reading x's rows copied
    into schedule order by one gather kernel; a dynamic T's other pairs keep pointer loads."""
    from moe_ops.tiles import TMA_MIN_ROWS_PER_EXPERT

    hidden, inter = 256, 128  # multiples of the TMA tiles' columns (down 256, gate and up 128 each)
    tokens = TMA_MIN_ROWS_PER_EXPERT * E // 2
    w_gate_up, w_down = weights(hidden=hidden, inter=inter)
    args = layer_inputs(tokens=tokens, hidden=hidden)
    if dynamic:
        for t in args:
            torch._dynamo.mark_dynamic(t, 0)
    code = generated_code(moe_layer(2, w_gate_up, w_down), *args)
    calls = code.split("def call(")[1]
    kernels = kernel_sources(code)
    templates = [name for name in kernels if name.startswith("triton_tem_")]
    tma = [name for name in templates if "TMA : tl.constexpr = True" in kernels[name]]
    assert len(templates) == (8 if dynamic else 2) and tma == templates[-2:], templates
    for name in tma:
        FileCheck().check("make_descriptors(").check("for pid in range(tl.program_id(0), num_tiles").check(
            "expert_gemm_tile(").run(kernels[name])
        if dynamic:  # a static T's grid is a number (here fewer tiles than SMs)
            assert f"min({HOPPER_LIMITS[0]}, " in calls.split(f"{name}.run(")[1].split("\n")[0]
    # The gather: one kernel writes the rows the TMA gate_up template reads: the op's own (a row tile,
    # vector loads) with compiled kernels, an Inductor pointwise kernel under the interpreter.
    gate_up_inputs = calls.split(f"{tma[0]}.run(")[1].split(",")
    writer = calls.split(f", {gate_up_inputs[0]},")[0].rsplit("\n", 1)[-1]
    expected = "_rows_in_schedule_order_kernel_" if KERNELS_IN_GRAPH else "triton_poi_"
    assert expected in writer and "x" not in gate_up_inputs[0], writer
    if dynamic and KERNELS_IN_GRAPH:  # the gather runs only where its TMA pair does (S > its fewer)
        launch = calls.split("_rows_in_schedule_order_kernel_")[-1].split("\n")[0]
        assert "max(0, min(1, (-" in launch, launch


def _tma_layer(w_gate_up, w_down, w_up):
    def layer(x, logits):
        topk_weights, topk_ids = moe_ops.route(logits, 2, renormalize=True)
        return moe_ops.fused_experts(x, topk_weights, topk_ids, w_gate_up, w_down, w_up=w_up)

    return layer


def _tma_weights(gate_up, dtype=torch.bfloat16, device="cpu", hidden=256, inter=128):
    """Weights for TMA tiles (N multiples of the tiles' columns): gate and up as the halves of one
    weight, or separate parameters (w_up)."""
    w_gate_up, w_down = weights(dtype, hidden=hidden, inter=inter, device=device)
    if gate_up == "fused":
        return w_gate_up, w_down, None
    return w_gate_up[:, :inter].clone(), w_down, w_gate_up[:, inter:].clone()


@pytest.mark.parametrize("gate_up", ["fused", "separate_w_up"])
def test_tma_gate_up_reads_a_fused_weight_through_one_descriptor(gate_up):
    """Gate and up as the two halves of one weight: the TMA gate_up template reads them through one
    (2, rows, K) descriptor (PAIRED, up PAIR_STRIDE = F x H elements after gate), one 256-wide dot per K
    step; separate parameters, which Inductor may place anywhere, keep a descriptor each."""
    from moe_ops.tiles import TMA_MIN_ROWS_PER_EXPERT

    hidden, inter = 256, 128
    w_gate_up, w_down, w_up = _tma_weights(gate_up)
    x, logits, _ = layer_inputs(tokens=TMA_MIN_ROWS_PER_EXPERT * E // 2, hidden=hidden)
    kernels = kernel_sources(generated_code(_tma_layer(w_gate_up, w_down, w_up), x, logits))
    gate_up_tma = [k for name, k in kernels.items() if name.startswith("triton_tem_")
                   and "TMA : tl.constexpr = True" in k and "GATED : tl.constexpr = True" in k]
    assert len(gate_up_tma) == 1, list(kernels)
    if gate_up == "fused":
        FileCheck().check("PAIRED : tl.constexpr = True").check(f"PAIR_STRIDE : tl.constexpr = {inter * hidden}").check(
            "make_descriptors(").check("PAIRED, PAIR_STRIDE").run(gate_up_tma[0])
    else:
        assert "PAIRED : tl.constexpr = False" in gate_up_tma[0]


def test_templates_off_keeps_one_extern_call():
    w_gate_up, w_down = weights()
    moe_ops.config.inductor_templates = False
    try:
        code = generated_code(moe_layer(2, w_gate_up, w_down), *layer_inputs())
    finally:
        moe_ops.config.inductor_templates = True
    assert "torch.ops.moe_ops.fused_experts.default(" in code
    assert "triton_tem_" not in code


def test_capacity_mode_keeps_one_extern_call(caplog):
    w_gate_up, w_down = weights()

    def layer(x, logits, residual):
        topk_weights, topk_ids = moe_ops.route(logits, 2, renormalize=True)
        return moe_ops.fused_experts(x, topk_weights, topk_ids, w_gate_up, w_down, capacity_factor=1.0)

    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        code = generated_code(layer, *layer_inputs())
    assert "torch.ops.moe_ops.fused_experts.default(" in code
    assert "triton_tem_" not in code
    assert "capacity mode" in caplog.text


@pytest.mark.parametrize("dynamic", [False, True], ids=["static_T", "dynamic_T"])
def test_gpt_oss_variant_reads_interleaved_views_with_biases(dynamic):
    """Layout EHF (E, H, 2F), interleaved gate/up columns, biases, clamped SwiGLU: views, never copies;
    for a dynamic T, in every block size's gate_up template."""
    g = torch.Generator().manual_seed(3)
    w_gate_up = torch.randn(E, H, 2 * F_, generator=g).bfloat16()
    w_down = torch.randn(E, F_, H, generator=g).bfloat16()
    b_gate_up = torch.randn(E, 2 * F_, generator=g).bfloat16()
    b_down = torch.randn(E, H, generator=g).bfloat16()

    def layer(x, logits, residual):
        topk_weights, topk_ids = moe_ops.route(logits, 2, softmax_after_topk=True)
        return moe_ops.fused_experts(
            x, topk_weights, topk_ids, w_gate_up, w_down, b_gate_up=b_gate_up, b_down=b_down, layout="EHF",
            interleaved=True, activation="clamped_swiglu",
        )

    args = layer_inputs()
    if dynamic:
        for t in args:
            torch._dynamo.mark_dynamic(t, 0)
    code = generated_code(layer, *args)
    kernels = kernel_sources(code)
    gate_ups = [src for name, src in kernels.items() if "GATHER : tl.constexpr = True" in src]
    pairs = 3 if dynamic else 1
    assert len(gate_ups) == pairs
    # gate = columns 0, 2, 4, ... and up = columns 1, 3, 5, ... of one (E, H, 2F) tensor: strides
    # (2FH, 2, 2F) and an offset of one element, read in place.
    for gate_up in gate_ups:
        for line in ("HAS_BIAS : tl.constexpr = True", "HAS_BIAS_UP : tl.constexpr = True",
                     "ACTIVATION : tl.constexpr = 5", "W_UP = arg_W_UP + 1", "BIAS_UP = arg_BIAS_UP + 1",
                     f"w = (W, {2 * F_ * H}, 2, {2 * F_})", f"w_up = (W_UP, {2 * F_ * H}, 2, {2 * F_})"):
            assert line in gate_up, line
    # No kernel other than the templates and the combine: nothing copies the weights.
    assert len(kernels) == 2 * pairs + 1, list(kernels)


def _quantised_layer(quantised, w_gate_up, w_down):
    """moe_layer's route + fused_experts with the expert weights in the form ``quantised`` names
    (moe_ops.quantised.quantise_weight: "int8" / "fp8" per output row, "int4_g32" asymmetric int4 in groups of
    32, "fp8_b32" fp8 with a scale per 32 x 32 tile); "_w8a8" after an fp8 form: fp8 inputs too (per row, or
    per group for the tiles)."""
    options = {}
    if quantised.endswith("_w8a8"):
        quantised = quantised.removesuffix("_w8a8")
        options["input_quantisation"] = "fp8_rowwise" if quantised == "fp8" else "fp8_groupwise"
    for name, w in dict(w_gate_up=w_gate_up, w_down=w_down).items():
        options[name], options[f"{name}_scale"], zero = quantise_weight(w, quantised)
        if zero is not None:
            options[f"{name}_zero"] = zero

    def layer(x, logits, residual):
        topk_weights, topk_ids = moe_ops.route(logits, 2, renormalize=True)
        return moe_ops.fused_experts(x, topk_weights, topk_ids, **options) + residual

    return layer


@pytest.mark.parametrize("dynamic", [False, True], ids=["static_T", "dynamic_T"])
def test_quantised_weights_reach_the_templates(dynamic):
    """int8 weights with per-row scales: both templates of every block size read the stored values (views,
    no dequantising kernel) and their scales, the gate's and the up's halves of the fused gate_up scales
    (strides (2F, 1), up F elements on; no zero points); no TMA tiles."""
    w_gate_up, w_down = weights()
    args = layer_inputs()
    if dynamic:
        for t in args:
            torch._dynamo.mark_dynamic(t, 0)
    code = generated_code(_quantised_layer("int8", w_gate_up, w_down), *args)
    kernels = kernel_sources(code)
    templates = {name: src for name, src in kernels.items() if name.startswith("triton_tem_")}
    pairs = 3 if dynamic else 1
    assert len(templates) == 2 * pairs, list(kernels)
    for source in templates.values():
        assert "W_SCALED : tl.constexpr = True" in source and "TMA : tl.constexpr = False" in source
        FileCheck().check("k_step(").check("tile_output(").check("W_SCALED, w_scales").run(source)
    gate_ups = [src for src in templates.values() if "GATHER : tl.constexpr = True" in src]
    assert len(gate_ups) == pairs
    no_zero_points = "W_SCALE, 0, 0, 0, W_SCALE, 0, 0, 0"  # placeholders, never read
    for gate_up in gate_ups:
        for line in (f"w_scales = (W_SCALE, {2 * F_}, 1, 0, W_UP_SCALE, {2 * F_}, 1, 0, {no_zero_points})",
                     f"W_UP_SCALE = arg_W_UP_SCALE + {F_}", f"W_UP = arg_W_UP + {F_ * H}"):
            assert line in gate_up, line
    # Besides the templates, only the combine over k: nothing dequantises or copies the weights.
    assert len(kernels) == 2 * pairs + 1, list(kernels)
    assert "moe_ops.fused_experts.default(" not in code.split("def call(")[1]


def test_group_quantised_int4_weights_reach_the_templates():
    """int4 weights in groups of 32 with zero points: the templates read the packed bytes (K twice their
    columns), dequantise each tile in registers with its group's scales and zero points (no per-row scaling
    of the accumulator), the gate's and up's halves of the fused gate_up's (2F, G) scales split as its rows;
    nothing else touches the weights."""
    w_gate_up, w_down = weights()
    code = generated_code(_quantised_layer("int4_g32", w_gate_up, w_down), *layer_inputs())
    kernels = kernel_sources(code)
    templates = {name: src for name, src in kernels.items() if name.startswith("triton_tem_")}
    assert len(templates) == 2, list(kernels)
    groups = H // 32
    for source in templates.values():
        for line in ("W_SCALED : tl.constexpr = False", "W_INT4 : tl.constexpr = True",
                     "W_ZERO_POINT : tl.constexpr = True", "TMA : tl.constexpr = False", "* 2  # two int4 values"):
            assert line in source, line
        FileCheck().check("weight_group_ptrs(w_scales").check("k_step(").check("W_ZERO_POINT, groups, k0").run(source)
    (gate_up,) = [src for src in templates.values() if "GATHER : tl.constexpr = True" in src]
    assert "W_GROUP_SIZE : tl.constexpr = 32" in gate_up
    scale_strides = f"{2 * F_ * groups}, {groups}, 1"
    assert (f"w_scales = (W_SCALE, {scale_strides}, W_UP_SCALE, {scale_strides}, W_ZERO, {scale_strides}, "
            f"W_UP_ZERO, {scale_strides})") in gate_up
    assert len(kernels) == 3, list(kernels)


@pytest.mark.parametrize("scheme", ["fp8_w8a8", "fp8_b32_w8a8"])
def test_fp8_inputs_reach_the_templates(scheme):
    """w8a8: the graph quantises x's rows (and, between the templates, the activation's rows) to fp8 per row
    or per group; both templates read fp8 A with its scales (A_SCALED: after the K loop; A_GROUPED: in each
    K step), storing in x's dtype; no extern call of the op."""
    w_gate_up, w_down = weights()
    code = generated_code(_quantised_layer(scheme, w_gate_up, w_down), *layer_inputs())
    templates = [src for name, src in kernel_sources(code).items() if name.startswith("triton_tem_")]
    assert len(templates) == 2
    flag = "A_SCALED" if scheme == "fp8_w8a8" else "A_GROUPED"
    for source in templates:
        assert f"{flag} : tl.constexpr = True" in source, source
        FileCheck().check("input_group_ptrs(a_scales").check("k_step(").check("A_GROUPED, a_groups").run(source)
    assert "moe_ops.fused_experts.default(" not in code.split("def call(")[1]


def test_block_scaled_fp8_weights_reach_the_templates():
    """fp8 weights with a scale per 32 x 32 tile: the templates read a row of scales per 32 output features
    (W_SCALE_ROWS) and a group per 32 inputs, the fused gate_up's block scales split between gate and up."""
    w_gate_up, w_down = weights()
    code = generated_code(_quantised_layer("fp8_b32", w_gate_up, w_down), *layer_inputs())
    templates = [src for name, src in kernel_sources(code).items() if name.startswith("triton_tem_")]
    assert len(templates) == 2
    for source in templates:
        for line in ("W_SCALE_ROWS : tl.constexpr = 32", "W_GROUP_SIZE : tl.constexpr = 32",
                     "W_SCALED : tl.constexpr = False", "W_INT4 : tl.constexpr = False"):
            assert line in source, line
    (gate_up,) = [src for src in templates if "GATHER : tl.constexpr = True" in src]
    blocks = 2 * F_ // 32 * (H // 32)  # the gate_up scale's (row blocks, groups) per expert
    assert f"w_scales = (W_SCALE, {blocks}, {H // 32}, 1, W_UP_SCALE, {blocks}, {H // 32}, 1," in gate_up


_COMPILE_FOR_HOPPER = """
import ast, importlib.util, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

folder = sys.argv[1]
failed = 0
for i, (label, name, source) in enumerate(json.load(open(folder + "/sources.json"))):
    signature = ast.literal_eval(re.search(r"'signature': (\\{[^}]*\\})", source).group(1))
    warps = int(re.search(r"num_warps=(\\d+)", source).group(1))
    # The kernel as a plain @triton.jit function of a file of its own (Inductor's launcher decorator left out).
    path = f"{folder}/kernel_{i}.py"
    with open(path, "w") as file:
        file.write(source[:source.index("@triton_heuristics.template(")] + source[source.index("@triton.jit"):])
    spec = importlib.util.spec_from_file_location(f"kernel_{i}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        triton.compile(ASTSource(fn=getattr(module, name), signature=signature, constexprs={}),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3))
        print("compiled", label, name)
    except Exception as error:
        failed += 1
        print("FAILED", label, name, type(error).__name__, str(error)[:2000], file=sys.stderr)
sys.exit(failed)
"""


def test_templates_compile_for_hopper(tmp_path):
    """The templates Inductor generates compiled for sm90 (Triton's frontend and its bundled ptxas, no GPU
    needed), as the GPU compiles them: bf16 layers with a static and a dynamic T (every block size's pair,
    the TMA one included) and int8 / fp8 / int4 quantised weights."""
    import json

    hidden, inter = 256, 128  # multiples of the TMA tiles' columns
    w_gate_up, w_down = weights(hidden=hidden, inter=inter)
    layers = {"bf16": moe_layer(2, w_gate_up, w_down), "int8": _quantised_layer("int8", w_gate_up, w_down),
              "fp8": _quantised_layer("fp8", w_gate_up, w_down),
              "int4": _quantised_layer("int4_g32", w_gate_up, w_down),
              "fp8 blocks": _quantised_layer("fp8_b32", w_gate_up, w_down),
              "fp8 w8a8": _quantised_layer("fp8_w8a8", w_gate_up, w_down),
              "fp8 blocks w8a8": _quantised_layer("fp8_b32_w8a8", w_gate_up, w_down)}
    sources = []
    for label, layer in layers.items():
        for dynamic in ([False, True] if label == "bf16" else [False]):
            args = layer_inputs(tokens=600, hidden=hidden)
            if dynamic:
                for t in args:
                    torch._dynamo.mark_dynamic(t, 0)
            for name, source in kernel_sources(generated_code(layer, *args)).items():
                if name.startswith("triton_tem_"):
                    sources.append((f"{label}{' dynamic T' if dynamic else ''}", name, source.split("'''", 1)[1]))
    assert any("TMA : tl.constexpr = True" in source for _, _, source in sources)
    (tmp_path / "sources.json").write_text(json.dumps(sources))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, "-P", "-c", _COMPILE_FOR_HOPPER, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == len(sources), result.stdout


def test_expert_gemm_op_template_with_fused_epilogue():
    """The grouped GEMM op on its own (schedule order, rows gathered from x): a cast and a scale after
    it run in the template's store."""
    w_gate_up, _ = weights()
    ids = torch.randint(0, E, (T, 2), generator=torch.Generator().manual_seed(4))

    def gemm(x, ids):
        schedule = moe_ops.block_schedule(ids, E, 16)
        h = moe_ops.expert_gemm(x, w_gate_up[:, :F_], schedule, num_slots=T * 2, block_m=16,
                                w_up=w_gate_up[:, F_:], gather_top_k=2, activation="silu")
        return h.float() * 2.0

    code = generated_code(gemm, layer_inputs()[0], ids)
    kernels = kernel_sources(code)
    assert len(kernels) == 1, list(kernels)
    (name,) = kernels
    assert name.startswith("triton_tem_fused_"), name
    FileCheck().check("tile_output(").check("2.0").check("tl.store").run(kernels[name])


def test_expert_gemm_scatter_stays_extern(caplog):
    """Scatter output: rows of slots no block owns must be zero, which only the op's own kernel (it
    zero-fills) guarantees without knowing the ids."""
    _, w_down = weights()
    ids = torch.randint(0, E, (T, 2), generator=torch.Generator().manual_seed(5))

    def gemm(h, ids, w):
        schedule = moe_ops.block_schedule(ids, E, 16)
        return moe_ops.expert_gemm(h, w_down, schedule, num_slots=T * 2, block_m=16, slot_weights=w, scatter=True)

    s_max = schedule_rows(T * 2, E, 16)
    with caplog.at_level(logging.DEBUG, logger="moe_ops"):
        code = generated_code(gemm, torch.randn(s_max, F_).bfloat16(), ids, torch.rand(T * 2))
    assert "moe_ops.expert_gemm.default(" in code
    assert "unscheduled slots" in caplog.text


def schedule_rows(num_slots, num_experts, block_m):
    from moe_ops.layout import schedule_sizes

    return schedule_sizes(num_slots, num_experts, block_m)[0]


# ---- CUDA (run on the H100) --------------------------------------------------------------------------


def _compiled_vs_eager(layer, args, dtype, fp8_inputs=False, **compile_kwargs):
    """The compiled layer's generated code, after checking its result against the eager layer's. With
    ``fp8_inputs`` (the activation quantised to fp8 between the GEMMs) an element whose bf16 activation
    rounds differently in the two (other tile shapes, other sum orders) may land a step of fp8 (1/8)
    away: close in the worst element, and tens of dB closer than fp8's own error on the whole."""
    torch._dynamo.reset()
    expected = layer(*args)
    actual, codes = run_and_get_code(torch.compile(layer, **compile_kwargs), *args)
    if fp8_inputs:
        assert ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item() <= 6e-2
        assert sqnr_db(expected, actual) >= 30.0
    else:
        assert_close_rel(actual, expected, dtype)
    return "\n".join(codes)


@pytest.mark.cuda
def test_cuda_fused_cast_prologue_matches_eager():
    """The cast fused into the gate_up template's A load (test_cast_feeding_...) computes what the eager
    layer computes, with K not a multiple of the tile's depth (the masked tail of A)."""
    hidden = 72
    w_gate_up, w_down = weights(dtype=torch.float32, hidden=hidden, device="cuda")
    x, logits, _ = layer_inputs(hidden=hidden, device="cuda")
    code = _compiled_vs_eager(_experts_of_cast_input(w_gate_up, w_down), (x, logits), torch.float32)
    assert re.search(r"def triton_tem_fused__to_copy\w*\(", code), "the cast did not fuse into a template"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("unrouted", [False, True])
def test_cuda_templates_match_eager(dtype, k, unrouted):
    num_experts = 16
    w_gate_up, w_down = weights(dtype, num_experts, 256, 128, "cuda")
    layer = moe_layer(k, w_gate_up, w_down, unrouted_expert=0 if unrouted else None)
    for tokens in (1, 7, 300):
        code = _compiled_vs_eager(layer, layer_inputs(tokens, dtype, num_experts, 256, "cuda"), dtype)
        assert "triton_tem_" in code
        assert "torch.ops.moe_ops.fused_experts.default(" not in code


@pytest.mark.cuda
@pytest.mark.parametrize("dynamic", [False, True], ids=["static_T", "dynamic_T"])
@pytest.mark.parametrize("variant", ["gpt_oss", "ungated_gelu", "separate_w_up", "clamped_silu"])
def test_cuda_template_variants_match_eager(variant, dynamic):
    g = torch.Generator().manual_seed(6)
    n_e, hid, inter, dtype = 8, 128, 64, torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)

    if variant == "gpt_oss":
        kw = dict(b_gate_up=rnd(n_e, 2 * inter), b_down=rnd(n_e, hid), layout="EHF", interleaved=True,
                  activation="clamped_swiglu")
        w_gate_up, w_down = rnd(n_e, hid, 2 * inter, scale=hid**-0.5), rnd(n_e, inter, hid, scale=inter**-0.5)
    elif variant == "ungated_gelu":
        kw = dict(gated=False, activation="gelu", b_gate_up=rnd(n_e, inter))
        w_gate_up, w_down = rnd(n_e, inter, hid, scale=hid**-0.5), rnd(n_e, hid, inter, scale=inter**-0.5)
    elif variant == "clamped_silu":  # GLM-5-Next's limit; inputs scaled up so that both clamps bind
        kw = dict(activation="clamped_silu", limit=1.5)
        w_gate_up, w_down = rnd(n_e, 2 * inter, hid, scale=4 * hid**-0.5), rnd(n_e, hid, inter, scale=inter**-0.5)
    else:
        kw = dict(w_up=rnd(n_e, inter, hid, scale=hid**-0.5))
        w_gate_up, w_down = rnd(n_e, inter, hid, scale=hid**-0.5), rnd(n_e, hid, inter, scale=inter**-0.5)

    def layer(x, logits):
        topk_weights, topk_ids = moe_ops.route(logits, 2, renormalize=True)
        return moe_ops.fused_experts(x, topk_weights, topk_ids, w_gate_up, w_down, **kw)

    x, logits, _ = layer_inputs(50, dtype, n_e, hid, "cuda")
    if dynamic:  # the template pairs of every block size; T = 50 runs the 32-row pair (E = 8, K = 2)
        for t in (x, logits):
            torch._dynamo.mark_dynamic(t, 0)
    code = _compiled_vs_eager(layer, (x, logits), dtype)
    assert len(set(re.findall(r"def (triton_tem_\w+)\(", code))) == (6 if dynamic else 2)


@pytest.mark.cuda
@pytest.mark.parametrize("dynamic", [False, True], ids=["static_T", "dynamic_T"])
@pytest.mark.parametrize("quantised", ["int8", "fp8", "int4_g32", "fp8_b32", "fp8_w8a8", "fp8_b32_w8a8"])
def test_cuda_quantised_templates_match_eager(quantised, dynamic):
    """The templates over quantised weights compute what the op's own kernels compute, T past the TMA
    threshold included (the templates keep pointer loads for quantised weights)."""
    w_gate_up, w_down = weights(hidden=256, inter=128, device="cuda")
    args = layer_inputs(600, hidden=256, device="cuda")
    if dynamic:
        for t in args:
            torch._dynamo.mark_dynamic(t, 0)
    code = _compiled_vs_eager(_quantised_layer(quantised, w_gate_up, w_down), args, torch.bfloat16,
                              fp8_inputs=quantised.endswith("w8a8"))
    assert {"int4_g32": "W_INT4 : tl.constexpr = True", "fp8_b32": "W_SCALE_ROWS : tl.constexpr = 32",
            "fp8_w8a8": "A_SCALED : tl.constexpr = True", "fp8_b32_w8a8": "A_GROUPED : tl.constexpr = True"}.get(
        quantised, "W_SCALED : tl.constexpr = True") in code


@pytest.mark.cuda
@pytest.mark.parametrize("gate_up", ["fused", "separate_w_up"])
def test_cuda_tma_templates_match_eager(gate_up):
    """TMA templates (prefill: 256+ rows per expert) against the eager layer, with one descriptor for a
    fused gate_up weight's halves and with a descriptor each for separate gate and up weights."""
    from moe_ops.tiles import TMA_MIN_ROWS_PER_EXPERT

    w_gate_up, w_down, w_up = _tma_weights(gate_up, device="cuda")
    args = layer_inputs(TMA_MIN_ROWS_PER_EXPERT * E // 2 + 37, torch.bfloat16, E, 256, "cuda")[:2]
    code = _compiled_vs_eager(_tma_layer(w_gate_up, w_down, w_up), args, torch.bfloat16)
    assert code.count("TMA : tl.constexpr = True") == 2
    assert ("PAIRED : tl.constexpr = True" in code) == (gate_up == "fused")


@pytest.mark.cuda
def test_cuda_one_layer_launches_five_kernels():
    """One MoE layer (route, fused experts, residual add) compiles to 5 launches, all Inductor's: the
    route kernel, the schedule kernel (one chunk), the gate_up template, the down template, and the
    combine over K with the residual add. No extern call, no dispatcher."""
    w_gate_up, w_down = weights(torch.bfloat16, 16, 256, 128, "cuda")
    code = _compiled_vs_eager(moe_layer(4, w_gate_up, w_down), layer_inputs(64, torch.bfloat16, 16, 256, "cuda"),
                              torch.bfloat16)
    body = code.split("def call(")[1]
    assert body.count(".run(") == 5, body
    assert re.findall(r"(_\w+_kernel)_\d+\.run\(", body) == ["_route_kernel", "_schedule_scatter_kernel"]
    assert "moe_ops._dispatch" not in body and "torch.ops.moe_ops" not in body


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_dynamic_tokens_one_graph(mode):
    """One graph for every T, through the templates: T at both ends of each block size's range
    (E = 16, K = 2: 16 rows up to T = 64, 32 rows up to T = 384, 128 rows up to T = 2047, 128-row TMA
    tiles beyond), also replayed from CUDA graphs. Launches: the route, the schedule's three kernels
    (histogram, scan, scatter), the 4 template pairs (only the pair of T's range starts programs), the
    copy of x into schedule order for the TMA pair, and the combine with the residual add."""
    w_gate_up, w_down = weights(torch.bfloat16, 16, 256, 128, "cuda")
    layer = moe_layer(2, w_gate_up, w_down)
    compiled = torch.compile(layer, mode=mode)
    args = layer_inputs(40, torch.bfloat16, 16, 256, "cuda")
    for t in args:
        torch._dynamo.mark_dynamic(t, 0)
    actual, codes = run_and_get_code(compiled, *args)
    assert_close_rel(actual, layer(*args), torch.bfloat16)
    code = "\n".join(codes)  # under CUDA graphs the launches sit in a partition function, not in call()
    assert code.count(".run(") == 14, code
    calls = [line for line in code.splitlines() if "moe_ops" in line and not line.lstrip().startswith("#")]
    assert not [line for line in calls if "moe_ops._dispatch" in line or "torch.ops.moe_ops" in line], calls
    assert "moe_ops.fused_experts.default(" not in code
    with torch.compiler.set_stance("fail_on_recompile"):
        for tokens in (3, 64, 65, 129, 384, 385, 1000, 2047, 2048, 3000, 3):
            args = layer_inputs(tokens, torch.bfloat16, 16, 256, "cuda")
            assert_close_rel(compiled(*args).clone(), layer(*args), torch.bfloat16, f"T={tokens}")
    assert counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dynamic", [False, True], ids=["static_T", "dynamic_T"])
def test_cuda_max_autotune_benchmarks_valid_schedules(dynamic):
    """Tile configs benchmarked on a synthetic valid schedule. A dynamic T keeps the heuristic configs
    (benchmarking a template whose grid is an expression in T failed inside torch 2.11's benchmark
    launcher: "launcher() got multiple values for argument 'stream'") and is right at every T."""
    w_gate_up, w_down = weights(torch.bfloat16, 16, 256, 128, "cuda")
    layer = moe_layer(2, w_gate_up, w_down)
    args = layer_inputs(512, torch.bfloat16, 16, 256, "cuda")
    if dynamic:
        for t in args:
            torch._dynamo.mark_dynamic(t, 0)
    with inductor_config.patch(max_autotune=True):
        code = _compiled_vs_eager(layer, args, torch.bfloat16)
        if dynamic:
            compiled = torch.compile(layer)  # the same graph, from dynamo's cache, at other T
            with torch.compiler.set_stance("fail_on_recompile"):
                for tokens in (40, 300, 2000):
                    args = layer_inputs(tokens, torch.bfloat16, 16, 256, "cuda")
                    assert_close_rel(compiled(*args), layer(*args), torch.bfloat16, f"T={tokens}")
    assert "triton_tem_" in code or "moe_ops_expert_gemm_eager" in code


@pytest.mark.cuda
def test_cuda_graphs_replay_the_templates():
    w_gate_up, w_down = weights(torch.bfloat16, 16, 256, 128, "cuda")
    layer = moe_layer(2, w_gate_up, w_down)
    compiled = torch.compile(layer, mode="reduce-overhead")
    for seed in range(3):
        torch.manual_seed(seed)
        args = layer_inputs(32, torch.bfloat16, 16, 256, "cuda")
        args = tuple(a + torch.randn_like(a) for a in args)
        assert_close_rel(compiled(*args).clone(), layer(*args), torch.bfloat16)
    assert counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.cuda
def test_cuda_transformers_mixtral_block_uses_the_templates():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(hidden_size=256, intermediate_size=512, num_local_experts=8,
                                        num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    block.experts.config._experts_implementation = "grouped_mm"  # what a model built from the config gets
    for param in block.parameters():  # the experts' weights are created with torch.empty
        param.normal_(0.0, 0.02)
    x = torch.randn(2, 33, 256, device="cuda", dtype=torch.bfloat16)

    def output(result):
        return result[0] if isinstance(result, tuple) else result

    expected = output(block(x))
    actual, codes = run_and_get_code(torch.compile(block), x)
    code = "\n".join(codes)
    assert_close_rel(output(actual), expected, torch.bfloat16)
    assert counters["moe_ops"]["experts_rewrite_hf_grouped_mm"] == 1
    assert code.count("triton_tem_") >= 2 and ("tile_output(" in code or "expert_gemm_tile(" in code)


def test_everything_dynamic_keeps_the_ops_extern_calls():
    """torch.compile(dynamic=True) makes E, k and the weights' shapes symbols too: the kernels' tiles
    need them, so route and fused_experts stay the ops' own calls (on CUDA, their kernels) instead of
    lowerings that cannot size them (the route lowering raised on a symbolic E). Compiled kernels, as
    in the test above."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    script = _IN_GRAPH_CODE.format(tests=os.path.dirname(__file__), tokens=T, dynamic=False, compile_dynamic=True)
    result = subprocess.run([sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = result.stdout.split("def call(")[1].split("\nrunner = ")[0]
    assert "torch.ops.moe_ops.route.default(" in calls and "_route_kernel" not in calls
    assert "torch.ops.moe_ops.fused_experts.default(" in calls
