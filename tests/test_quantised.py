"""moe_ops.quantised: the quantised-weight forms the ops take, their reference and the quantisers."""

from __future__ import annotations

import pytest
import torch

from moe_ops.quantised import (
    INT4_LEVELS,
    check_quantised_weight,
    dequantise,
    pack_int4,
    quantise_groups,
    quantise_per_row,
    sqnr_db,
    unpack_int4,
)


def test_int4_packing_round_trips_with_the_even_value_in_the_low_nibble():
    values = torch.randint(0, INT4_LEVELS, (3, 5, 8), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 4)
    assert torch.equal(packed[0, 0, 0], values[0, 0, 0] | (values[0, 0, 1] << 4))
    assert torch.equal(unpack_int4(packed), values)


def test_dequantise_is_values_minus_zero_times_the_scale_of_each_group():
    """Against a loop over the groups, written out: per-row scales, groups, zero points, packed int4."""
    torch.manual_seed(0)
    E, N, K, G = 2, 3, 32, 2
    values = torch.randint(-128, 128, (E, N, K), dtype=torch.int8)
    scale, zero = torch.rand(E, N, G), torch.randint(-4, 5, (E, N, G)).float()
    want = torch.empty(E, N, K)
    for g in range(G):
        cols = slice(g * K // G, (g + 1) * K // G)
        want[..., cols] = (values[..., cols].float() - zero[..., g, None]) * scale[..., g, None]
    torch.testing.assert_close(dequantise(values, scale, zero), want, rtol=0, atol=0)
    torch.testing.assert_close(dequantise(values, scale[..., 0]), values.float() * scale[..., :1], rtol=0, atol=0)
    nibbles = torch.randint(0, INT4_LEVELS, (E, N, K), dtype=torch.uint8)
    torch.testing.assert_close(dequantise(pack_int4(nibbles), scale, zero), dequantise(nibbles.to(torch.int8), scale,
                                                                                        zero), rtol=0, atol=0)


@pytest.mark.parametrize("bits,group,floor", [(8, 32, 40.0), (8, 128, 40.0), (4, 32, 21.0), (4, 128, 19.5)])
def test_group_quantisers_reproduce_the_weights(bits, group, floor):
    """quantise_groups' values and scales stand for the weights within the scheme's error (SQNR of Gaussian
    weights: int8 ~44-45 dB, int4 ~20-22 dB), the values within their range; int4 packed, with zero points."""
    torch.manual_seed(1)
    w = torch.randn(4, 16, 256) / 16
    values, scale, zero = quantise_groups(w, group, bits=bits)
    assert scale.shape == (4, 16, 256 // group) and scale.dtype == torch.float32
    if bits == 8:
        assert values.dtype == torch.int8 and zero is None and values.abs().max() <= 127
    else:
        assert values.shape == (4, 16, 128) and values.dtype == torch.uint8 and zero.shape == scale.shape
        assert 0 <= zero.min() and zero.max() <= INT4_LEVELS - 1
    assert sqnr_db(w, dequantise(values, scale, zero)) >= floor


def test_int4_clipping_never_reproduces_a_group_worse_than_its_full_range():
    """Heavy tails (Student-t weights): each group's chosen range reproduces it at least as well as the full
    range would."""
    torch.manual_seed(2)
    w = torch.distributions.StudentT(3.0).sample((2, 8, 128)) / 10
    values, scale, zero = quantise_groups(w, 32, bits=4)
    grouped = w.unflatten(-1, (4, 32))
    low, high = grouped.amin(-1).clamp_max(0), grouped.amax(-1).clamp_min(0)
    full_scale = (high - low) / (INT4_LEVELS - 1)
    full_zero = (-low / full_scale).round()
    full = ((grouped / full_scale[..., None] + full_zero[..., None]).round().clamp(0, 15) - full_zero[..., None]) * (
        full_scale[..., None])
    chosen = dequantise(values, scale, zero).unflatten(-1, (4, 32))
    assert ((chosen - grouped).square().sum(-1) <= (full - grouped).square().sum(-1) + 1e-12).all()


def test_per_row_quantiser():
    w = torch.randn(2, 8, 64)
    for dtype, floor in ((torch.int8, 40.0), (torch.float8_e4m3fn, 28.0)):
        values, scale = quantise_per_row(w, dtype)
        assert values.dtype == dtype and scale.shape == (2, 8)
        assert sqnr_db(w, dequantise(values, scale)) >= floor
    with pytest.raises(TypeError, match="dtype: expected torch.int8 or torch.float8_e4m3fn"):
        quantise_per_row(w, torch.uint8)


def test_errors_name_the_argument():
    w = torch.randn(2, 8, 64)
    with pytest.raises(ValueError, match="bits: expected 4 or 8"):
        quantise_groups(w, 32, bits=2)
    with pytest.raises(ValueError, match="group_size: expected a multiple of 16 dividing K=64"):
        quantise_groups(w, 24)
    values, scale, zero = quantise_groups(w, 32, bits=4)
    common = dict(scale_name="s", zero_name="z")
    check_quantised_weight("w", values, scale, zero, (2, 8, 64), values.device, **common)
    with pytest.raises(ValueError, match=r"w: expected shape \(2, 8, 32\) \(two int4 values per byte\)"):
        check_quantised_weight("w", values[..., :16], scale, zero, (2, 8, 64), values.device, **common)
    with pytest.raises(ValueError, match="w: int4 values .* need an even reduction size"):
        check_quantised_weight("w", values, scale, zero, (2, 8, 63), values.device, **common)
    with pytest.raises(TypeError, match="w: expected dtype"):
        check_quantised_weight("w", w, scale, zero, (2, 8, 64), values.device, **common)
    with pytest.raises(ValueError, match="s: w holds quantised values and needs its scales"):
        check_quantised_weight("w", values, None, None, (2, 8, 64), values.device, **common)
    with pytest.raises(TypeError, match="s: expected dtype"):
        check_quantised_weight("w", values, scale.half(), zero, (2, 8, 64), values.device, **common)
    with pytest.raises(ValueError, match="s: expected .* K / G a multiple of 16"):
        check_quantised_weight("w", values, torch.ones(2, 8, 8), None, (2, 8, 64), values.device, **common)
    with pytest.raises(ValueError, match="z: expected shape"):
        check_quantised_weight("w", values, scale, zero[..., :1], (2, 8, 64), values.device, **common)
