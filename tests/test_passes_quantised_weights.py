"""lowering/graph/quantised_weights.py: fused_experts calls whose expert weights are dequantisations of int8 /
fp8 values with a scale per output row read the stored values and scales instead; anything else is left
as it is."""

from __future__ import annotations

import pytest
import torch
from compile_harness import compile_and_record, fresh_compile_state  # noqa: F401  (fixture)
from torch._dynamo.utils import counters

import moe_ops
from moe_ops.quantised import quantise_per_row

T, H, F, E, K = 10, 32, 24, 4, 2


def _weights(dtype):
    torch.manual_seed(0)
    gate_up, gate_up_scale = quantise_per_row(torch.randn(E, 2 * F, H) / H**0.5, dtype)
    down, down_scale = quantise_per_row(torch.randn(E, H, F) / F**0.5, dtype)
    return gate_up, gate_up_scale[..., None], down, down_scale[..., None]


def _routed(x_dtype):
    x = torch.randn(T, H).to(x_dtype)
    ids = torch.rand(T, E).argsort(-1)[:, :K]
    return x, torch.rand(T, K).softmax(-1), ids


def _dequantise(values, scale, dtype):
    return (values.to(torch.float32) * scale).to(dtype)


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("quantised", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("layout", ["EFH", "EHF"])
def test_dequantised_weights_are_read_as_stored(quantised, layout):
    """Both weights dequantised per row (as stored, or transposed as torchao's grouped GEMM reads them):
    the op gets the values and the squeezed scales, layout EFH, and the result is the dequantised one's."""
    gate_up, gate_up_scale, down, down_scale = _weights(quantised)
    x, weights, ids = _routed(torch.bfloat16)

    def block(x, weights, ids):
        w_gate_up = _dequantise(gate_up, gate_up_scale, x.dtype)
        w_down = _dequantise(down, down_scale, x.dtype)
        if layout == "EHF":
            w_gate_up = _dequantise(gate_up.transpose(1, 2), gate_up_scale.transpose(1, 2), x.dtype)
            w_down = _dequantise(down.transpose(1, 2), down_scale.transpose(1, 2), x.dtype)
        return moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down, layout=layout)

    got, graph = compile_and_record(block, x, weights, ids)
    assert counters["moe_ops"]["quantised_weights_rewrite"] == 1
    assert "moe_ops.fused_experts.default(None, None, None, None, 'EFH'" in graph
    assert "aten.mul" not in graph  # no dequantisation left
    torch.testing.assert_close(got, block(x, weights, ids), rtol=2e-2, atol=2e-2)


@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("near_miss", ["one_weight_plain", "dequantised_weight_also_returned", "scale_per_column",
                                       "bf16_values"])
def test_near_misses_keep_the_dequantised_weights(near_miss):
    """A block with one plain weight, a dequantised weight that something else reads, a scale per input
    column rather than per output row, or values that are no int8 / fp8: the call is left as it is."""
    gate_up, gate_up_scale, down, down_scale = _weights(torch.int8)
    x, weights, ids = _routed(torch.bfloat16)
    plain_down = torch.randn(E, H, F).to(torch.bfloat16)
    column_scale = torch.rand(E, 1, F) / 64
    # Half-integers in bf16, made outside the compiled block: no int8 read in the graph. (int8 values cast to bf16
    # inside it would be int8 values still, which torch 2.11 folds into one cast from int8.)
    bf16_down = (down.float() + 0.5).to(torch.bfloat16)

    def block(x, weights, ids):
        w_gate_up = _dequantise(gate_up, gate_up_scale, x.dtype)
        w_down = _dequantise(down, down_scale, x.dtype)
        if near_miss == "one_weight_plain":
            w_down = plain_down
        elif near_miss == "scale_per_column":
            w_down = _dequantise(down, column_scale, x.dtype)
        elif near_miss == "bf16_values":
            w_down = _dequantise(bf16_down, down_scale, x.dtype)
        out = moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down)
        return (out, w_gate_up) if near_miss == "dequantised_weight_also_returned" else out

    got, graph = compile_and_record(block, x, weights, ids)
    assert counters["moe_ops"]["quantised_weights_rewrite"] == 0
    assert "moe_ops.fused_experts.default(None, None, None, None, 'EFH', False, 'silu', True, 1.702, 7.0, 0.0, " \
           "'position')" in graph
    # Inductor's code for the dequantisation and the host's matmul kernels round differently from eager's:
    # agreement within bf16's error, as above.
    torch.testing.assert_close(got, block(x, weights, ids), rtol=2e-2, atol=2e-2)
