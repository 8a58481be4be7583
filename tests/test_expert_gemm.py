"""moe_ops::expert_gemm: the Triton kernel against the reference, opcheck, gradcheck, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TRITON_DEVICE, assert_close_rel, eager_and_captured, zipf_ids

from moe_ops.expert_gemm import expert_gemm, expert_gemm_ref
from moe_ops.expert_gemm_triton import weight_quantisation
from moe_ops.layout import PackedSchedule, PaddedSchedule
from moe_ops.quantised import dequantise, quantise_blocks, quantise_groups, quantise_per_row, sqnr_db
from moe_ops.schedule import block_schedule, block_schedule_ref

DTYPES = [torch.bfloat16, torch.float16, torch.float32]



def _problem(T, K, E, N, D, dtype, device, *, gated, bias, slot_weights, ids=None, block_m=16, layout="NK"):
    """Random inputs of one expert_gemm call; weights are views as the fused op passes them."""
    x = torch.randn(T, D, dtype=dtype, device=device)
    if layout == "NK":
        w_all = torch.randn(E, 2 * N, D, dtype=dtype, device=device) / D**0.5
    else:  # transposed storage (E, D, 2N), as torchtitan and GPT-OSS keep it
        w_all = (torch.randn(E, D, 2 * N, dtype=dtype, device=device) / D**0.5).transpose(1, 2)
    b_all = torch.randn(E, 2 * N, dtype=torch.float32, device=device)
    if ids is None:
        ids = torch.rand(T, E).argsort(-1)[:, :K].to(device)
    schedule = block_schedule_ref(ids.to(device), E, block_m)
    return dict(
        a=x,
        w=w_all[:, 0::2] if gated else w_all[:, :N],
        w_up=w_all[:, 1::2] if gated else None,
        bias=b_all[:, :N] if bias else None,
        bias_up=b_all[:, N:] if (bias and gated) else None,
        slot_weights=torch.rand(T * K, device=device) if slot_weights else None,
        sorted_slots=schedule.sorted_slots,
        block_expert=schedule.block_expert,
        num_padded=schedule.num_padded,
        num_slots=T * K,
        block_m=block_m,
    )


def _run_both(args, **mode):
    from moe_ops.expert_gemm_triton import expert_gemm_triton

    full = dict(args, gather_top_k=mode.get("gather_top_k", 0), scatter=mode.get("scatter", False),
                activation=mode.get("activation", "none"), alpha=1.702, limit=7.0)
    kernel_args = {name: value for name, value in full.items() if name not in PaddedSchedule._fields}
    schedule = PaddedSchedule(*(full[name] for name in PaddedSchedule._fields))
    return expert_gemm_triton(schedule=schedule, **kernel_args), expert_gemm_ref(**full)


SHAPES = [
    # (T, K, E, N, D, block_m)
    pytest.param(1, 2, 4, 24, 40, 16, id="T=1"),
    pytest.param(7, 2, 4, 24, 40, 16, id="T<block_m"),
    pytest.param(13, 3, 5, 20, 36, 16, id="non-pow2-N-and-D"),
    pytest.param(6, 4, 4, 16, 32, 16, id="k=E"),
    pytest.param(40, 2, 8, 24, 40, 32, id="block_m=32"),
    # Prefill tiles (fp32: the FMA-unit configs of gemm_config).
    pytest.param(150, 2, 4, 24, 40, 128, id="block_m=128"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,N,D,block_m", SHAPES)
def test_gate_up_gathered_matches_reference(T, K, E, N, D, block_m, dtype):
    # First GEMM of the MLP: rows gathered from tokens, interleaved gate/up views, SwiGLU, bias.
    args = _problem(T, K, E, N, D, dtype, TRITON_DEVICE, gated=True, bias=True, slot_weights=False,
                    block_m=block_m)
    got, want = _run_both(args, gather_top_k=K, activation="silu")
    assert_close_rel(got, want, dtype, "gate_up")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,N,D,block_m", SHAPES)
def test_down_scattered_matches_reference(T, K, E, N, D, block_m, dtype):
    # Second GEMM: schedule-order input, routing weight in the epilogue, scattered to slot order.
    args = _problem(T, K, E, N, D, dtype, TRITON_DEVICE, gated=False, bias=True, slot_weights=True,
                    block_m=block_m, layout="KN")
    args["a"] = torch.randn(args["sorted_slots"].shape[0], D, dtype=dtype, device=TRITON_DEVICE)
    got, want = _run_both(args, scatter=True)
    assert_close_rel(got, want, dtype, "down")


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu", "relu2", "clamped_swiglu", "clamped_silu",
                                        "none"])
def test_activations(activation):
    args = _problem(9, 2, 4, 24, 40, torch.float32, TRITON_DEVICE, gated=True, bias=True, slot_weights=True)
    args["a"] = args["a"] * 4  # reach the clamps at +-7 of clamped_swiglu and clamped_silu
    got, want = _run_both(args, gather_top_k=2, activation=activation)
    assert_close_rel(got, want, torch.float32, activation)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu", "relu2"])
def test_ungated_activations(activation):
    args = _problem(9, 2, 4, 24, 40, torch.float16, TRITON_DEVICE, gated=False, bias=False, slot_weights=False)
    got, want = _run_both(args, gather_top_k=2, activation=activation)
    assert_close_rel(got, want, torch.float16, activation)


_PTX_OF_ACTIVATION = """
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from moe_ops.activations import ACTIVATION_CODE
from moe_ops.expert_gemm_triton import gate_activation, up_factor

@triton.jit
def activate(x_ptr, out_ptr, slope_ptr, alpha, limit, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acted, slope = gate_activation(x, ACTIVATION, alpha, limit)
    factor, up_slope = up_factor(x, ACTIVATION, limit)
    tl.store(out_ptr + offs, acted * factor)
    tl.store(slope_ptr + offs, slope * up_slope)

source = triton.compiler.ASTSource(
    fn=activate, constexprs={"ACTIVATION": ACTIVATION_CODE[sys.argv[1]], "BLOCK": 128},
    signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "slope_ptr": "*fp32", "alpha": "fp32", "limit": "fp32",
               "ACTIVATION": "constexpr", "BLOCK": "constexpr"})
print(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
"""


@pytest.mark.parametrize("activation", ["relu", "relu2", "clamped_swiglu", "clamped_silu"])
def test_activation_clamps_keep_a_nan_on_the_gpu(activation, tmp_path):
    """The activations' min / max compile to PTX's NaN-propagating forms (``max.NaN.f32``), as torch's clamp and
    relu keep a NaN: plain ``max.f32`` returns the other operand, turning a NaN row's outputs finite. Compiled
    for sm90 by Triton's own compiler (no GPU needed), in a process without the interpreter, which keeps NaN
    either way."""
    script = tmp_path / "ptx_of_activation.py"  # Triton reads a jit function's source from its file
    script.write_text(_PTX_OF_ACTIVATION)
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    ptx = subprocess.run([sys.executable, str(script), activation], env=env, check=True, capture_output=True,
                         text=True, timeout=300).stdout
    extrema = [line.split()[0] for line in ptx.splitlines() if line.strip().startswith(("max.", "min."))]
    assert extrema and all(".NaN" in op for op in extrema), extrema


QUANTISED = [pytest.param(torch.int8, id="int8"), pytest.param(torch.float8_e4m3fn, id="fp8")]


@pytest.mark.parametrize("quantised", QUANTISED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_quantised_weights_match_the_reference(quantised, dtype, gated):
    """int8 / fp8 weights with a scale per output feature: the kernel reads the low-precision values and
    scales the accumulated columns; it gives the reference's result, which is the GEMM of the dequantised
    weights; and the quantised GEMM stays within the scheme's error of the unquantised one (SQNR)."""
    T, K, E, N, D = 13, 2, 4, 24, 40
    args = _problem(T, K, E, N, D, dtype, TRITON_DEVICE, gated=gated, bias=True, slot_weights=True)
    exact = dict(args)
    args["w"], args["w_scale"] = quantise_per_row(exact["w"], quantised)
    if gated:
        args["w_up"], args["w_up_scale"] = quantise_per_row(exact["w_up"], quantised)
    activation = "silu" if gated else "relu"
    got, want = _run_both(args, gather_top_k=K, activation=activation)
    assert_close_rel(got, want, dtype, "quantised")
    dequantised = dict(exact, a=args["a"].float(), w=args["w"].float() * args["w_scale"][..., None],
                       w_up=args["w_up"].float() * args["w_up_scale"][..., None] if gated else None)
    _, want_dequantised = _run_both(dequantised, gather_top_k=K, activation=activation)
    assert_close_rel(want, want_dequantised.to(dtype), dtype, "reference of the dequantised weights")
    _, unquantised = _run_both(exact, gather_top_k=K, activation=activation)
    floor = 28.0 if quantised == torch.float8_e4m3fn else 35.0  # per-row fp8 ~31 dB, int8 ~42 dB
    assert sqnr_db(unquantised, got) >= floor


GROUPED = [
    # (bits, group size, D): int8 and int4 in groups (K / G scales per row), int4 with one group per row
    pytest.param(8, 32, 64, id="int8-g32"),
    pytest.param(4, 32, 64, id="int4-g32"),
    pytest.param(4, 16, 48, id="int4-g16"),
    pytest.param(4, 48, 48, id="int4-one-group"),
]


@pytest.mark.parametrize("bits,group,D", GROUPED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("block_m", [16, 64], ids=["decode", "prefill"])
def test_group_quantised_weights_match_the_reference(bits, group, D, dtype, gated, block_m):
    """Scales per group of reduction features (int8 symmetric; int4 asymmetric with zero points, packed two
    per byte): the kernel gives the reference's result, the GEMM of the dequantised weights, whether it scales
    each step's product (decode blocks: fewer rows than the step's depth) or dequantises each weight tile in
    registers (prefill blocks, fp32); the quantised GEMM stays within the scheme's error (SQNR)."""
    T, K, E, N = 13, 2, 4, 24
    args = _problem(T, K, E, N, D, dtype, TRITON_DEVICE, gated=gated, bias=True, slot_weights=True,
                    block_m=block_m)
    exact = dict(args)
    args["w"], args["w_scale"], args["w_zero"] = quantise_groups(exact["w"], group, bits=bits)
    if gated:
        args["w_up"], args["w_up_scale"], args["w_up_zero"] = quantise_groups(exact["w_up"], group, bits=bits)
    activation = "silu" if gated else "relu"
    got, want = _run_both(args, gather_top_k=K, activation=activation)
    assert_close_rel(got, want, dtype, "group-quantised")
    dequantised = dict(exact, a=args["a"].float(), w=dequantise(args["w"], args["w_scale"], args["w_zero"]),
                       w_up=dequantise(args["w_up"], args["w_up_scale"], args["w_up_zero"]) if gated else None)
    _, want_dequantised = _run_both(dequantised, gather_top_k=K, activation=activation)
    assert_close_rel(want, want_dequantised.to(dtype), dtype, "reference of the dequantised weights")
    _, unquantised = _run_both(exact, gather_top_k=K, activation=activation)
    floor = 18.0 if bits == 4 else 35.0  # int4 ~21-23 dB here, int8 ~45 dB
    assert sqnr_db(unquantised, got) >= floor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_zero_points_that_are_no_whole_numbers(dtype):
    """Decode blocks take an int4 zero point off the values in A's dtype, its whole part exactly, then its
    fraction: zero points with fractions (no quantise_groups output has them, a user's may) give the
    reference's result too."""
    T, K, E, N, D = 9, 2, 4, 24, 64
    args = _problem(T, K, E, N, D, dtype, TRITON_DEVICE, gated=True, bias=False, slot_weights=True)
    exact = dict(args)
    for name in ("w", "w_up"):
        values, scale, zero = quantise_groups(exact[name], 32, bits=4)
        fraction = torch.rand(zero.shape, generator=torch.Generator().manual_seed(3)).to(zero.device)
        args[name], args[f"{name}_scale"], args[f"{name}_zero"] = values, scale, zero + fraction - 0.5
    got, want = _run_both(args, gather_top_k=K, activation="silu")
    assert_close_rel(got, want, dtype, "zero points with fractions")


@pytest.mark.skipif(TRITON_DEVICE == "cuda", reason="counts the interpreter's calls of the kernel's functions")
@pytest.mark.parametrize("bits,block_m,path", [(4, 16, "scaled_group_product"), (4, 64, "weight_tile"),
                                               (8, 16, "scaled_group_product"), (8, 64, "weight_tile")])
def test_decode_blocks_scale_the_product(monkeypatch, bits, block_m, path):
    """Which path the grouped tests above take: decode blocks (fewer rows than the K step) scale each step's
    product, prefill blocks dequantise each weight tile (the "decode" / "prefill" ids say so by block size
    alone)."""
    from moe_ops import expert_gemm_triton

    calls = []
    for name in ("scaled_group_product", "weight_tile"):
        function = getattr(expert_gemm_triton, name)
        monkeypatch.setattr(expert_gemm_triton, name,
                            lambda *args, _name=name, _function=function: calls.append(_name) or _function(*args))
    args = _problem(9, 2, 4, 24, 64, torch.bfloat16, TRITON_DEVICE, gated=True, bias=False, slot_weights=True,
                    block_m=block_m)
    for name in ("w", "w_up"):
        args[name], args[f"{name}_scale"], args[f"{name}_zero"] = quantise_groups(args[name], 32, bits=bits)
    got, want = _run_both(args, gather_top_k=2, activation="silu")
    assert calls and set(calls) == {path}
    assert_close_rel(got, want, torch.bfloat16, path)


@pytest.mark.parametrize("block_m", [16, 64], ids=["decode", "prefill"])
def test_int4_without_zero_points(block_m):
    """int4 values with scales alone (each nibble stands for itself times its group's scale): the kernel gives
    the reference's result at decode and prefill blocks."""
    T, K, E, N, D = 9, 2, 4, 24, 64
    args = _problem(T, K, E, N, D, torch.bfloat16, TRITON_DEVICE, gated=True, bias=False, slot_weights=True,
                    block_m=block_m)
    for name in ("w", "w_up"):
        args[name], args[f"{name}_scale"], _ = quantise_groups(args[name], 32, bits=4)
    got, want = _run_both(args, gather_top_k=K, activation="silu")
    assert_close_rel(got, want, torch.bfloat16, "int4 without zero points")


def test_group_quantised_weights_keep_the_infinities_of_the_input():
    """An infinite input feature: the decode tile's result is infinite (or NaN) exactly where the reference's
    is, with int4 zero points whole or not."""
    T, K, E, N, D = 6, 2, 4, 16, 64
    args = _problem(T, K, E, N, D, torch.bfloat16, TRITON_DEVICE, gated=False, bias=False, slot_weights=False)
    args["a"][2, 5] = float("inf")
    values, scale, zero = quantise_groups(args["w"], 32, bits=4)
    for zero_points in (zero, zero + 0.25):
        got, want = _run_both(dict(args, w=values, w_scale=scale, w_zero=zero_points), gather_top_k=K)
        assert not torch.isfinite(want).all()
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
        finite = torch.isfinite(want)
        assert_close_rel(got[finite], want[finite], torch.bfloat16, "finite entries")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_scaled_fp8_weights_match_the_reference(dtype):
    """fp8 weights with a scale per 16 x 16 tile (DeepSeek-V3's 128 x 128 form, smaller): the kernel finds
    each column's row of scales and each K step's group, and gives the reference's result."""
    T, K, E, N, D = 13, 2, 4, 32, 64
    args = _problem(T, K, E, N, D, dtype, TRITON_DEVICE, gated=True, bias=True, slot_weights=True)
    exact = dict(args)
    args["w"], args["w_scale"] = quantise_blocks(exact["w"].contiguous(), 16)
    args["w_up"], args["w_up_scale"] = quantise_blocks(exact["w_up"].contiguous(), 16)
    assert args["w_scale"].shape == (E, N // 16, D // 16)
    got, want = _run_both(args, gather_top_k=K, activation="silu")
    assert_close_rel(got, want, dtype, "block-scaled")
    _, unquantised = _run_both(exact, gather_top_k=K, activation="silu")
    assert sqnr_db(unquantised, got) >= 25.0  # fp8 in 16 x 16 tiles ~31 dB


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("block_m", [16, 64], ids=["decode", "prefill"])
def test_zero_points_of_per_row_scales(dtype, gated, block_m):
    """int8 values with a scale and a zero point per row (torchao's asymmetric int8): the zero points come off
    the values before the dot, the scales multiply the accumulated columns; whole zero points of int8's range
    and zero points with fractions give the reference's result."""
    T, K, E, N, D = 13, 2, 4, 24, 40
    args = _problem(T, K, E, N, D, dtype, TRITON_DEVICE, gated=gated, bias=True, slot_weights=True,
                    block_m=block_m)
    generator = torch.Generator().manual_seed(5)
    for name in ("w", "w_up") if gated else ("w",):
        values, scale = quantise_per_row(args[name], torch.int8)
        zero = torch.randint(-128, 128, scale.shape, generator=generator).float()
        args.update({name: values, f"{name}_scale": scale / 4, f"{name}_zero": zero.to(TRITON_DEVICE)})
    # The per-row form (scales after the accumulation), not the group one.
    assert weight_quantisation(torch.int8, (E, N), True, N, D) == dict(
        W_SCALED=True, W_GROUP_SIZE=0, W_INT4=False, W_ZERO_POINT=True, W_SCALE_ROWS=1, W_LEFT=False)
    activation = "silu" if gated else "relu"
    got, want = _run_both(args, gather_top_k=K, activation=activation)
    assert_close_rel(got, want, dtype, "whole zero points")
    fractions = {f"{name}_zero": args[f"{name}_zero"] + 0.375 for name in (("w", "w_up") if gated else ("w",))}
    got, want = _run_both(dict(args, **fractions), gather_top_k=K, activation=activation)
    assert_close_rel(got, want, dtype, "zero points with fractions")


def test_zero_points_of_per_row_scales_and_a_scattered_output():
    """int8 values with a zero point per row in the down projection's form: schedule-order rows, scattered to
    slots."""
    T, K, E, N, D = 11, 2, 4, 20, 40
    args = _problem(T, K, E, N, D, torch.bfloat16, TRITON_DEVICE, gated=False, bias=True, slot_weights=True,
                    layout="KN")
    args["a"] = torch.randn(args["sorted_slots"].shape[0], D, dtype=torch.bfloat16, device=TRITON_DEVICE)
    values, scale = quantise_per_row(args["w"], torch.int8)
    zero = torch.randint(-3, 4, scale.shape, device=TRITON_DEVICE).float()
    args.update(w=values, w_scale=scale, w_zero=zero)
    got, want = _run_both(args, scatter=True)
    assert_close_rel(got, want, torch.bfloat16, "per-row zero points")
    shifted = (values.float() - zero[..., None]) * scale[..., None]
    _, want_dequantised = _run_both(dict(args, a=args["a"].float(), w=shifted, w_scale=None, w_zero=None),
                                    scatter=True)
    assert_close_rel(want, want_dequantised.to(torch.bfloat16), torch.bfloat16, "dequantised")


def test_a_backward_after_an_input_changed_in_place_is_refused():
    """The weights changed in place between forward and backward: refused (the gradients would be those of the
    changed values)."""
    T, K, E, N, D = 9, 2, 4, 16, 24
    args = _problem(T, K, E, N, D, torch.float32, "cpu", gated=False, bias=False, slot_weights=False)
    schedule = block_schedule_ref(torch.rand(T, E).argsort(-1)[:, :K], E, 16)
    w = args["w"].clone().requires_grad_(True)
    out = expert_gemm(args["a"], w, schedule, num_slots=T * K, block_m=16, gather_top_k=K)
    with torch.no_grad():
        w.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_quantised_weights_are_frozen_and_give_the_input_its_gradient():
    """A quantised weight is a constant of the graph (it gets no gradient, and asking for none is no error);
    the input's gradient is the one of the dequantised weights."""
    T, K, E, N, D = 9, 2, 4, 16, 24
    args = _problem(T, K, E, N, D, torch.float32, "cpu", gated=True, bias=False, slot_weights=False)
    w, w_scale = quantise_per_row(args["w"], torch.int8)
    w_up, w_up_scale = quantise_per_row(args["w_up"], torch.int8)
    schedule = block_schedule_ref(torch.rand(T, E).argsort(-1)[:, :K], E, 16)
    x = args["a"].clone().requires_grad_(True)
    common = dict(num_slots=T * K, block_m=16, gather_top_k=K, activation="silu")
    expert_gemm(x, w, schedule, w_up=w_up, w_scale=w_scale, w_up_scale=w_up_scale, **common).sum().backward()
    x_ref = args["a"].clone().requires_grad_(True)
    expert_gemm(x_ref, w.float() * w_scale[..., None], schedule, w_up=w_up.float() * w_up_scale[..., None],
                **common).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_quantised_weight_errors_name_the_argument():
    T, K, E, N, D = 5, 2, 4, 16, 32
    args = _problem(T, K, E, N, D, torch.bfloat16, "cpu", gated=True, bias=False, slot_weights=False)
    w, w_scale = quantise_per_row(args["w"], torch.int8)
    w_up, w_up_scale = quantise_per_row(args["w_up"], torch.int8)
    base = dict(args, w=w, w_up=w_up, w_scale=w_scale, w_up_scale=w_up_scale, gather_top_k=K, scatter=False,
                activation="silu", alpha=1.702, limit=7.0)
    expert_gemm_ref(**base)
    with pytest.raises(TypeError, match="w: expected dtype"):
        expert_gemm_ref(**dict(base, w_scale=None, w_up_scale=None))
    with pytest.raises(TypeError, match="w: expected dtype"):
        expert_gemm_ref(**dict(base, w=w.to(torch.int16)))
    with pytest.raises(ValueError, match="w_scale: expected shape"):
        expert_gemm_ref(**dict(base, w_scale=w_scale[:, :-1]))
    with pytest.raises(TypeError, match="w_scale: expected dtype"):
        expert_gemm_ref(**dict(base, w_scale=w_scale.half()))
    with pytest.raises(ValueError, match="w_up_scale: expected exactly when"):
        expert_gemm_ref(**dict(base, w_up_scale=None))
    q4, s4, z4 = quantise_groups(args["w"], 16, bits=4)
    q4_up, s4_up, z4_up = quantise_groups(args["w_up"], 16, bits=4)
    int4 = dict(base, w=q4, w_scale=s4, w_zero=z4, w_up=q4_up, w_up_scale=s4_up, w_up_zero=z4_up)
    expert_gemm_ref(**int4)
    with pytest.raises(ValueError, match=r"w: expected shape \(4, 16, 16\) \(two int4 values per byte\)"):
        expert_gemm_ref(**dict(int4, w=torch.cat([q4, q4], -1), w_up=torch.cat([q4_up, q4_up], -1)))
    with pytest.raises(ValueError, match="w_scale: expected .* K / G a multiple of 16"):
        expert_gemm_ref(**dict(int4, w_scale=s4[..., :1].expand(-1, -1, 3), w_zero=z4[..., :1].expand(-1, -1, 3)))
    with pytest.raises(ValueError, match="w_zero: expected shape"):
        expert_gemm_ref(**dict(int4, w_zero=z4[..., 0]))
    with pytest.raises(ValueError, match="w_up_zero: expected exactly when"):
        expert_gemm_ref(**dict(int4, w_up_zero=None))
    with pytest.raises(ValueError, match="w_zero: zero points given without w_scale"):
        expert_gemm_ref(**dict(args, w_zero=z4, gather_top_k=K, scatter=False, activation="silu", alpha=1.702,
                               limit=7.0))
    with pytest.raises(TypeError, match="w_up: expected dtype"):
        expert_gemm_ref(**dict(base, w_up=args["w_up"]))


def test_routing_edge_cases():
    T, K, E = 12, 2, 6
    ids = torch.rand(T, E).argsort(-1)[:, :K]
    ids[ids == 3] = 4  # an expert with no tokens
    ids[0, 0] = E  # expert-parallel sentinel: skipped
    ids[1, 1] = E + 5
    args = _problem(T, K, E, 16, 32, torch.float32, TRITON_DEVICE, gated=True, bias=False,
                    slot_weights=True, ids=ids)
    got, want = _run_both(args, gather_top_k=K, activation="silu", scatter=True)
    assert_close_rel(got, want, torch.float32, "edge")
    assert (got[0] == 0).all() and (got[3] == 0).all(), "sentinel slots must contribute zero"


def test_all_tokens_on_one_expert_with_zipf_and_empty():
    T, K, E = 30, 1, 5
    ids_all_one = torch.full((T, K), 2)
    args = _problem(T, K, E, 16, 32, torch.float32, TRITON_DEVICE, gated=True, bias=True,
                    slot_weights=False, ids=ids_all_one)
    got, want = _run_both(args, gather_top_k=K, activation="silu")
    assert_close_rel(got, want, torch.float32, "one expert")
    ids_zipf = zipf_ids(T, 2, E)
    args = _problem(T, 2, E, 16, 32, torch.float32, TRITON_DEVICE, gated=True, bias=False,
                    slot_weights=True, ids=ids_zipf)
    got, want = _run_both(args, gather_top_k=2, activation="silu", scatter=True)
    assert_close_rel(got, want, torch.float32, "zipf")


@pytest.mark.parametrize("weight_halves", ["gate_first", "up_first"])
def test_tma_tiles_match_pointer_tiles(weight_halves):
    """The TMA path (descriptors, persistent grid: one program walks every tile here, as the interpreter
    counts one SM) computes what the pointer loads compute, for the packed schedule the fused op uses:
    gate_up from x copied into schedule order, down scattered to slots with an unrouted slot's row
    written as zeros. Gate and up as halves of one weight, gate first: one (2, rows, K) descriptor
    (PAIRED); up first: a descriptor each. fp16: the interpreter's descriptors do not take bf16."""
    from moe_ops.expert_gemm_triton import expert_gemm_triton
    from moe_ops.schedule_triton import block_schedule_triton
    from moe_ops.tiles import TMA_BLOCK_M, weight_pair_stride

    T, K, E, H, F = 150, 2, 3, 256, 128  # N multiples of the TMA tiles' columns (128 gated, 256 down)
    x = torch.randn(T, H, device=TRITON_DEVICE).half()
    w_gate_up = (torch.randn(E, 2 * F, H, device=TRITON_DEVICE) / H**0.5).half()
    w_down = (torch.randn(E, H, F, device=TRITON_DEVICE) / F**0.5).half()
    gate, up = w_gate_up[:, :F], w_gate_up[:, F:]
    if weight_halves == "up_first":
        gate, up = up, gate
    pair = weight_pair_stride((gate.shape, gate.stride()), (up.shape, up.stride()), up.data_ptr() - gate.data_ptr(),
                              2)
    assert pair == (F * H if weight_halves == "gate_first" else None)
    ids = torch.rand(T, E).argsort(-1)[:, :K].to(TRITON_DEVICE, torch.int32)
    ids[3, 1] = E  # routed to no expert
    slot_weights = torch.rand(T * K, device=TRITON_DEVICE)
    sorted_slots, _, _, _, offsets = block_schedule_triton(ids, E, 1)
    x_sorted = x.index_select(0, (sorted_slots // K).clamp_max(T - 1))
    routed = sorted_slots < T * K
    outputs = []
    for tma in (False, True):
        schedule = PackedSchedule(sorted_slots, offsets)
        h = expert_gemm_triton(x_sorted, gate, schedule, T * K, TMA_BLOCK_M, w_up=up, activation="silu", tma=tma)
        y = expert_gemm_triton(h, w_down, schedule, T * K, TMA_BLOCK_M, slot_weights=slot_weights, scatter=True,
                               slot_ids=ids.reshape(-1), tma=tma)
        outputs.append((h[routed], y))
    (h_ptr, y_ptr), (h_tma, y_tma) = outputs
    assert h_ptr.abs().sum() > 0 and y_ptr.abs().sum() > 0
    # Not bitwise: a paired 256-wide dot and two 128-wide dots round alike only where the dot's blocking
    # is the same, which depends on the host's BLAS under the interpreter and on the pipeline on a GPU.
    assert_close_rel(h_tma, h_ptr, torch.float16, "gate_up TMA vs pointer tiles")
    assert_close_rel(y_tma, y_ptr, torch.float16, "down TMA vs pointer tiles")
    assert (y_tma[3 * K + 1] == 0).all()


def test_weight_pair_stride_only_for_one_layout_a_valid_step_apart():
    from moe_ops.tiles import weight_pair_stride

    layout = ((8, 128, 256), (65536, 256, 1))
    assert weight_pair_stride(layout, layout, 128 * 256 * 2, 2) == 128 * 256
    assert weight_pair_stride(layout, ((8, 128, 256), (32768, 256, 1)), 128 * 256 * 2, 2) is None  # strides
    assert weight_pair_stride(layout, ((8, 64, 256), (65536, 256, 1)), 128 * 256 * 2, 2) is None  # shape
    assert weight_pair_stride(layout, layout, -128 * 256 * 2, 2) is None  # up before gate
    assert weight_pair_stride(layout, layout, 0, 2) is None
    assert weight_pair_stride(layout, layout, 24, 2) is None  # not a 16-byte multiple
    assert weight_pair_stride(layout, layout, 1 << 40, 2) is None  # past a descriptor's stride limit
    interleaved = ((8, 128, 256), (65536, 512, 1))  # gate rows 0, 2, 4, ...; up rows 1, 3, 5, ...
    assert weight_pair_stride(interleaved, interleaved, 256 * 2, 2) is None


def test_zero_tokens_launches_nothing():
    args = _problem(0, 2, 4, 16, 32, torch.float32, TRITON_DEVICE, gated=True, bias=False, slot_weights=False)
    got, want = _run_both(args, gather_top_k=2, activation="silu")
    assert got.shape == want.shape and (got == 0).all()
    got, want = _run_both(dict(args, a=torch.randn(args["sorted_slots"].shape[0], 32, device=TRITON_DEVICE),
                               w=args["w"][:, :, :32]), scatter=True)
    assert got.shape == (0, 16) == want.shape


def test_padding_rows_and_unused_blocks_are_zero():
    args = _problem(5, 2, 4, 16, 32, torch.float32, TRITON_DEVICE, gated=True, bias=True, slot_weights=False)
    got, _ = _run_both(args, gather_top_k=2, activation="silu")
    padding = args["sorted_slots"] >= args["num_slots"]
    assert padding.any()
    assert (got[padding] == 0).all()


def test_public_wrapper_and_opcheck():
    T, K, E, N, D = 6, 2, 4, 8, 16
    args = _problem(T, K, E, N, D, torch.float32, "cpu", gated=True, bias=True, slot_weights=True)
    schedule = block_schedule_ref(torch.rand(T, E).argsort(-1)[:, :K], E, 16)
    args.update(sorted_slots=schedule.sorted_slots, block_expert=schedule.block_expert,
                num_padded=schedule.num_padded)
    out = expert_gemm(args["a"], args["w"], schedule, num_slots=T * K, block_m=16, w_up=args["w_up"], bias=args["bias"],
                      bias_up=args["bias_up"], slot_weights=args["slot_weights"], gather_top_k=K,
                      scatter=True, activation="silu")
    assert out.shape == (T * K, N)
    op_args = (args["a"], args["w"], args["w_up"], args["bias"], args["bias_up"], args["slot_weights"],
               schedule.sorted_slots, schedule.block_expert, schedule.num_padded, T * K, 16, K, True,
               "silu", 1.702, 7.0)
    torch.library.opcheck(torch.ops.moe_ops.expert_gemm.default, op_args)
    op_args_sorted = (args["a"], args["w"], None, None, None, None, *op_args[6:12], False, "gelu", 1.702, 7.0)
    torch.library.opcheck(torch.ops.moe_ops.expert_gemm.default, op_args_sorted)


def test_gradcheck_float64():
    T, K, E, N, D = 5, 2, 3, 4, 6
    args = _problem(T, K, E, N, D, torch.float64, "cpu", gated=True, bias=True, slot_weights=True)
    leaves = {n: args[n].detach().clone().requires_grad_(True)
              for n in ("a", "w", "w_up", "bias", "bias_up", "slot_weights")}
    leaves["bias"] = leaves["bias"].double().detach().requires_grad_(True)
    leaves["bias_up"] = leaves["bias_up"].double().detach().requires_grad_(True)
    leaves["slot_weights"] = leaves["slot_weights"].double().detach().requires_grad_(True)
    rest = (args["sorted_slots"], args["block_expert"], args["num_padded"], T * K, 16, K, True, "silu", 1.702, 7.0)

    def f(a, w, w_up, bias, bias_up, slot_weights):
        return torch.ops.moe_ops.expert_gemm(a, w, w_up, bias, bias_up, slot_weights, *rest)

    assert torch.autograd.gradcheck(f, tuple(leaves.values()))


BACKWARD_MODES = [
    pytest.param(dict(gated=True, activation="silu", gather=True, scatter=False, bias=False, weights=False),
                 id="gate_up_silu_gathered"),
    pytest.param(dict(gated=True, activation="clamped_swiglu", gather=True, scatter=False, bias=True, weights=False),
                 id="gpt_oss_biases"),
    pytest.param(dict(gated=False, activation="gelu", gather=True, scatter=False, bias=True, weights=True),
                 id="ungated_gelu_weighted"),
    pytest.param(dict(gated=False, activation="none", gather=False, scatter=True, bias=False, weights=True),
                 id="down_scattered_weighted"),
    pytest.param(dict(gated=True, activation="relu2", gather=False, scatter=False, bias=True, weights=True),
                 id="schedule_order_rows"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_backward_kernels_match_the_reference_backward(mode, dtype):
    """The CUDA backward of expert_gemm (its kernels, run here on TRITON_DEVICE) against the backward op's own
    implementation (the reference differentiated), with an expert that gets no slot, padding rows and unused
    blocks in the schedule: every gradient, laid out like its argument."""
    from moe_ops.expert_gemm import expert_gemm_backward_triton

    T, K, E, N, D, block_m = 11, 2, 5, 24, 40, 16
    ids = torch.rand(T, E - 1).argsort(-1)[:, :K]  # expert E - 1 gets no slot
    args = _problem(T, K, E, N, D, dtype, TRITON_DEVICE, gated=mode["gated"], bias=mode["bias"],
                    slot_weights=mode["weights"], ids=ids, block_m=block_m)
    if not mode["gather"]:  # rows in schedule order, one per position (padding rows hold values too)
        args["a"] = torch.randn(args["sorted_slots"].shape[0], D, dtype=dtype, device=TRITON_DEVICE)
    gather_top_k = K if mode["gather"] else 0
    rest = (args["sorted_slots"], args["block_expert"], args["num_padded"], T * K, block_m, gather_top_k,
            mode["scatter"], mode["activation"], 1.702, 7.0)
    tensors = [args[n] for n in ("a", "w", "w_up", "bias", "bias_up", "slot_weights")]
    rows = T * K if mode["scatter"] else args["sorted_slots"].shape[0]
    grad = torch.randn(rows, N, dtype=dtype, device=TRITON_DEVICE)
    got = expert_gemm_backward_triton(*tensors, *rest, grad)
    assert len({id(g) for g in got}) == len(got)  # a custom op's outputs may not alias one another
    cpu = [None if t is None else t.cpu() for t in (*tensors, *rest[:3])]
    want = torch.ops.moe_ops.expert_gemm_backward.default(*cpu[:6], *cpu[6:], *rest[3:], None, None, None, None,
                                                          [grad.cpu()])
    for name, g, w, t in zip(("a", "w", "w_up", "bias", "bias_up", "slot_weights"), got, want, tensors, strict=True):
        if t is None:
            assert g.numel() == 0 and w.numel() == 0, name
            continue
        like = torch.empty_like(t)  # the backward op's fake kernel's layout
        assert g.shape == t.shape and g.stride() == like.stride() and g.dtype == t.dtype, name
        assert_close_rel(g, w, dtype, f"{mode} {name}")


def test_errors_name_the_argument():
    args = _problem(4, 2, 4, 8, 16, torch.float32, "cpu", gated=True, bias=False, slot_weights=False)
    base = dict(args, gather_top_k=2, scatter=False, activation="silu", alpha=1.0, limit=7.0)
    with pytest.raises(ValueError, match=r"w: expected shape \(E, N, 16\)"):
        expert_gemm_ref(**dict(base, w=args["w"][:, :, :8]))
    with pytest.raises(TypeError, match=r"w_up: expected dtype in \(float32\)"):
        expert_gemm_ref(**dict(base, w_up=args["w_up"].half()))
    with pytest.raises(ValueError, match="a: expected"):
        expert_gemm_ref(**dict(base, a=args["a"][:3]))
    with pytest.raises(ValueError, match="activation: expected one of"):
        expert_gemm_ref(**dict(base, activation="swish"))
    with pytest.raises(ValueError, match="clamped_swiglu"):
        expert_gemm_ref(**dict(base, w_up=None, activation="clamped_swiglu"))
    with pytest.raises(TypeError, match="sorted_slots: expected dtype in \\(int32\\)"):
        expert_gemm_ref(**dict(base, sorted_slots=args["sorted_slots"].long()))
    # A NaN or infinite alpha made every output NaN, a negative limit every output 0.
    for bad, message in ((dict(alpha=math.nan), "alpha: expected a finite number, got nan"),
                         (dict(alpha=math.inf), "alpha: expected a finite number, got inf"),
                         (dict(limit=-1.0), r"limit: expected a number >= 0 \(inf: no clamp\), got -1.0"),
                         (dict(limit=math.nan), r"limit: expected a number >= 0 \(inf: no clamp\), got nan")):
        with pytest.raises(ValueError, match=message):
            expert_gemm_ref(**dict(base, activation="clamped_swiglu", **bad))


def test_public_call_checks_the_schedule_and_scalars():
    """What only the public call can see: the schedule object, its expert count against w's, and ints
    that the op's schema would truncate or take from a bool."""
    ids = torch.rand(8, 4).argsort(-1)[:, :2]
    schedule = block_schedule(ids, 4, 16)
    a, w = torch.randn(8, 16), torch.randn(4, 8, 16)
    call = dict(num_slots=16, block_m=16, gather_top_k=2)
    assert expert_gemm(a, w, schedule, **call).shape == (schedule.sorted_slots.shape[0], 8)
    with pytest.raises(TypeError, match=r"schedule: expected a moe_ops.BlockSchedule .* got tuple"):
        expert_gemm(a, w, tuple(schedule), **call)
    with pytest.raises(ValueError, match=r"w: expected \(E=4, N, K\), the experts the schedule was built for"):
        expert_gemm(a, w[:3], schedule, **call)
    with pytest.raises(TypeError, match=r"block_m: expected an int, got 16.0"):
        expert_gemm(a, w, schedule, **dict(call, block_m=16.0))
    with pytest.raises(TypeError, match=r"gather_top_k: expected an int, got True"):
        expert_gemm(a, w, schedule, **dict(call, gather_top_k=True))
    with pytest.raises(TypeError, match=r"scatter: expected True or False, got 1"):
        expert_gemm(a, w, schedule, **dict(call, scatter=1))
    with pytest.raises(ValueError, match=r"limit: expected a number >= 0 \(inf: no clamp\), got -1.0"):
        expert_gemm(a, w, schedule, **call, activation="clamped_silu", w_up=w, limit=-1.0)
    with pytest.raises(NotImplementedError, match="expert_gemm: forward-mode AD"):
        torch.func.jvp(lambda a_: expert_gemm(a_, w, schedule, **call), (a,), (torch.ones_like(a),))
    # A slot count that is not T * gather_top_k is named as such (the rows of a were blamed, at the shape asked).
    with pytest.raises(ValueError, match=r"num_slots: expected T \* gather_top_k slots \(a multiple of "
                                         r"gather_top_k=2\), got 15"):
        expert_gemm_ref(**dict(_problem(4, 2, 4, 8, 16, torch.float32, "cpu", gated=False, bias=False,
                                        slot_weights=False), num_slots=15, gather_top_k=2, scatter=False,
                               activation="relu", alpha=1.0, limit=7.0))
    # Another schedule's block size or slot count would read other blocks, or mark other rows as padding.
    with pytest.raises(ValueError, match=r"block_m: the schedule has \d+ blocks over \d+ rows \(built with "
                                         r"block_m=16\), got 8"):
        expert_gemm(a, w, schedule, **dict(call, block_m=8))
    with pytest.raises(ValueError, match=r"num_slots: the schedule's 80 rows \(E=4, block_m=16\) were not built "
                                         r"for 40 slots"):
        expert_gemm(a, w, schedule, **dict(call, num_slots=40))


def test_kernel_refuses_float64():
    """float64 would run in fp32 in the kernel: the op's CUDA kernel refuses it (the reference takes it)."""
    from moe_ops._dispatch import expert_gemm_cuda

    args = _problem(4, 2, 4, 8, 16, torch.float64, TRITON_DEVICE, gated=False, bias=False, slot_weights=False)
    with pytest.raises(TypeError, match=r"a: float64 is computed by the plain-PyTorch reference only"):
        expert_gemm_cuda(**dict(args, gather_top_k=2, scatter=False, activation="relu", alpha=1.0, limit=7.0))


# ---- CUDA only: real shapes, poisoned memory, int32 boundary ----

REAL_SHAPES = [
    # (name, E, K, H, F, T)
    ("mixtral", 8, 2, 4096, 14336, 512),
    ("qwen3-30b-a3b", 128, 8, 2048, 768, 2048),
    ("deepseek-v3", 256, 8, 7168, 2048, 256),
]


@pytest.mark.cuda
@pytest.mark.parametrize("name,E,K,H,F,T", REAL_SHAPES)
def test_cuda_real_shapes(name, E, K, H, F, T):
    from moe_ops.tiles import choose_block_m

    dtype = torch.bfloat16
    block_m = choose_block_m(T * K, E)
    # Poison the caching allocator so any output row the kernel fails to write shows up as NaN.
    torch.full((1 << 28,), float("nan"), device="cuda")
    args = _problem(T, K, E, F, H, dtype, "cuda", gated=True, bias=False, slot_weights=False, block_m=block_m)
    got, want = _run_both(args, gather_top_k=K, activation="silu")
    assert_close_rel(got, want, dtype, f"{name} gate_up")
    args_down = _problem(T, K, E, H, F, dtype, "cuda", gated=False, bias=False, slot_weights=True,
                         block_m=block_m)
    args_down["a"] = torch.randn(args_down["sorted_slots"].shape[0], F, dtype=dtype, device="cuda")
    got, want = _run_both(args_down, scatter=True)
    assert_close_rel(got, want, dtype, f"{name} down")


@pytest.mark.cuda
def test_cuda_backward_is_its_kernels_and_captures():
    """On the GPU, expert_gemm's backward runs its kernels (no host sync: a CUDA graph captures it) and gives the
    reference's gradients; quantised (frozen) weights hand the backward to the reference, which gives the input
    its gradient."""
    T, K, E, N, D = 64, 2, 8, 48, 64
    args = _problem(T, K, E, N, D, torch.bfloat16, "cuda", gated=True, bias=True, slot_weights=True)
    names = ("a", "w", "w_up", "bias", "bias_up", "slot_weights")
    rest = (args["sorted_slots"], args["block_expert"], args["num_padded"], T * K, 16, K, False, "silu", 1.702, 7.0)
    leaves = [args[n].detach().requires_grad_(True) for n in names]
    grad = torch.randn(args["sorted_slots"].shape[0], N, dtype=torch.bfloat16, device="cuda")

    def step():
        return torch.autograd.grad(torch.ops.moe_ops.expert_gemm(*leaves, *rest), leaves, grad)

    want = torch.ops.moe_ops.expert_gemm_backward.default(
        *[t.cpu() for t in leaves], *[t.cpu() for t in rest[:3]], *rest[3:], None, None, None, None, [grad.cpu()])
    eager, captured = eager_and_captured(step)
    for name, g, w in zip(names, eager, want, strict=True):
        assert_close_rel(g, w, torch.bfloat16, name)
    for name, a, b in zip(names, captured, eager, strict=True):
        assert torch.equal(a, b), name  # the same kernels on the same inputs
    values, scale = quantise_per_row(args["w"].float(), torch.int8)
    schedule = block_schedule_ref(torch.rand(T, E).argsort(-1)[:, :K].cuda(), E, 16)
    common = dict(num_slots=T * K, block_m=16, gather_top_k=K)
    x, x_ref = (args["a"].float().detach().requires_grad_(True) for _ in range(2))
    out_grad = torch.randn(schedule.sorted_slots.shape[0], N, device="cuda")
    expert_gemm(x, values, schedule, w_scale=scale, **common).backward(out_grad)
    expert_gemm(x_ref, values.float() * scale[..., None], schedule, **common).backward(out_grad)
    assert_close_rel(x.grad, x_ref.grad, torch.float32, "quantised weights: the input's gradient")


@pytest.mark.cuda
@pytest.mark.whole_gpu
def test_cuda_int32_boundary():
    # T*K*N > 2^31 elements in the scattered output and the schedule-order intermediate: every
    # row offset must be computed in int64.
    T, K, E, D, N = 65536, 8, 16, 512, 4608
    assert T * K * N > 2**31
    dtype = torch.bfloat16
    ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :K]
    args = _problem(T, K, E, N, D, dtype, "cuda", gated=False, bias=False, slot_weights=True, ids=ids,
                    block_m=128)
    args["a"] = torch.randn(args["sorted_slots"].shape[0], D, dtype=dtype, device="cuda")
    got, want = _run_both(args, scatter=True)
    last = slice(T * K - 4096, T * K)  # the rows past 2^31 elements
    assert_close_rel(got[last], want[last], dtype, "scatter tail")
    assert_close_rel(got, want, dtype, "scatter")
    del got, want
    gathered = dict(args, a=torch.randn(T, D, dtype=dtype, device="cuda"), slot_weights=None)
    got, want = _run_both(gathered, gather_top_k=K, activation="relu")
    assert_close_rel(got, want, dtype, "schedule-order")


@pytest.mark.cuda
def test_cuda_deterministic():
    args = _problem(512, 8, 64, 256, 512, torch.bfloat16, "cuda", gated=True, bias=True, slot_weights=True,
                    block_m=64)
    first, _ = _run_both(args, gather_top_k=8, activation="silu", scatter=True)
    for _ in range(3):
        again, _ = _run_both(args, gather_top_k=8, activation="silu", scatter=True)
        assert torch.equal(first, again)


def test_interpreter_bf16_is_right_without_test_setup():
    """A user's own process with TRITON_INTERPRET=1 (nothing from conftest): bf16 kernels still match
    the reference, because importing the kernels fixes the interpreter's bf16 dot and arithmetic."""
    import os
    import subprocess
    import sys

    import numpy

    if tuple(int(part) for part in numpy.__version__.split(".")[:2]) >= (2, 3):
        pytest.skip(f"Triton 3.6's interpreter needs numpy < 2.3 (the test extra's pin), not {numpy.__version__}")
    script = """
import torch
from moe_ops.expert_gemm import expert_gemm_ref
from moe_ops.expert_gemm_triton import expert_gemm_triton
from moe_ops.layout import PaddedSchedule
from moe_ops.schedule import block_schedule_ref
torch.manual_seed(0)
a, w = torch.randn(8, 32).bfloat16(), (torch.randn(4, 16, 32) / 32**0.5).bfloat16()
s = block_schedule_ref(torch.rand(8, 4).argsort(-1)[:, :2], 4, 16)
args = (a, w, None, None, None, None, s.sorted_slots, s.block_expert, s.num_padded, 16, 16, 2, True, "none", 1.0, 7.0)
got = expert_gemm_triton(a, w, PaddedSchedule(*s[:3]), 16, 16, gather_top_k=2, scatter=True).float()
want = expert_gemm_ref(*args).float()
print(((got - want).abs().max() / want.abs().max()).item())
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 2e-2
