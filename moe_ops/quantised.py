"""Quantised expert weights as the ops take them: stored values, fp32 scales, optional zero points.

An (E, N, K) weight (N output features, K reduction features; layout "EFH" for fused_experts) is stored as

    values  int8 or fp8 e4m3 (E, N, K), or uint8 (E, N, K / 2): two unsigned 4-bit values per byte along K,
            the even k in the low nibble (int4)
    scale   fp32 (E, N): one per expert and output feature (torchao's per-row weight-only tensors), or
            (E, R, G): one per block of N / R consecutive output features and K / G consecutive reduction
            features (R = N: groups along each row, int8 / int4 group-wise; R = N / 128, G = K / 128: the
            128 x 128 blocks of DeepSeek-V3's fp8 checkpoints). K / G is a multiple of 16 where G > 1
    zero    fp32, the scale's shape, optional: the stored value that stands for 0 (asymmetric schemes)

and stands for ``(values - zero) * scale``, the scale and zero point of the value's group (``dequantise``,
the reference every kernel is tested against). The kernels read the stored values: per-row scales multiply
each accumulated output column once (zero points come off the values before the dot); any other form keeps
each K step inside one group and scales the step's product (decode blocks over 16-bit inputs) or dequantises
the step's weight tile in registers. No dequantised copy is made either way.
"""

from __future__ import annotations

import re

import torch

from moe_ops._checks import FLOAT_DTYPES, QUANTISED_WEIGHT_DTYPES, check_int, check_tensor

# The smallest group the kernels take: a K step (one tl.dot's reduction, 16 at least) reads one group.
MIN_GROUP_SIZE = 16
INT4_LEVELS = 16
INT4_RANGE_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def sqnr_db(signal: torch.Tensor, noisy: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``noisy`` against ``signal``, in dB (how the tests and benchmarks
    judge a quantised result against the unquantised one)."""
    signal, noisy = signal.float(), noisy.float()
    return (20 * torch.log10(signal.norm() / (signal - noisy).norm())).item()


def stored_columns(dtype: torch.dtype, k: int) -> int:
    """How many stored columns hold ``k`` reduction features of a ``dtype`` weight (two per byte for int4)."""
    return k // 2 if dtype == torch.uint8 else k


def check_quantised_weight(name: str, w: torch.Tensor, scale, zero, shape_ENK: tuple, device, *, scale_name: str,
                           zero_name: str) -> None:
    """A ValueError/TypeError naming the first argument of a quantised weight (module docstring) that is not
    as expected; ``shape_ENK`` the (E, N, K) it stands for."""
    E, N, K = shape_ENK
    check_tensor(name, w, ndim=3, dtypes=QUANTISED_WEIGHT_DTYPES, device=device)
    if w.dtype == torch.uint8 and K % 2:
        raise ValueError(f"{name}: int4 values (uint8, two per byte) need an even reduction size, got K={K}")
    want = (E, N, stored_columns(w.dtype, K))
    if tuple(w.shape) != want:
        packed = " (two int4 values per byte)" if w.dtype == torch.uint8 else ""
        raise ValueError(f"{name}: expected shape {want}{packed}, got {tuple(w.shape)}")
    if scale is None:
        raise ValueError(f"{scale_name}: {name} holds quantised values and needs its scales")
    check_tensor(scale_name, scale, dtypes=(torch.float32,), device=device)
    if scale.dim() == 2:
        check_tensor(scale_name, scale, shape=(E, N))
    else:
        check_tensor(scale_name, scale, shape=(E, "R", "G"))
        row_blocks, groups = scale.shape[1:]
        if (row_blocks < 1 or N % row_blocks or groups < 1 or K % groups
                or (groups > 1 and (K // groups) % MIN_GROUP_SIZE)):
            raise ValueError(
                f"{scale_name}: expected (E, N) per-row scales or (E, R, G) block scales with N={N} a multiple of R, "
                f"K={K} a multiple of G and K / G a multiple of {MIN_GROUP_SIZE}, got {tuple(scale.shape)}"
            )
    if zero is not None:
        check_tensor(zero_name, zero, shape=tuple(scale.shape), dtypes=(torch.float32,), device=device)


def unpack_int4(w: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K / 2) packed int4 values as (..., K) uint8 values in [0, 16), the even k from the low
    nibble."""
    return torch.stack((w & 0xF, w >> 4), dim=-1).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) values in [0, 16) (any integer dtype, K even) packed two per byte: uint8 (..., K / 2)."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _per_value(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A scale or zero point per row (..., N) or per block (..., R, G) expanded to every value (..., N, K)."""
    if t.dim() == values.dim() - 1:
        t = t[..., None]
    rows, columns = values.shape[-2:]
    return t.repeat_interleave(rows // t.shape[-2], -2).repeat_interleave(columns // t.shape[-1], -1)


def dequantise(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """What quantised values stand for, in fp32 (a weight's (E, N, K), or any rows (..., N, K) with a scale
    per row (..., N) or per block (..., R, G)): ``(values - zero) * scale`` of each value's block."""
    values = (unpack_int4(w) if w.dtype == torch.uint8 else w).float()
    if zero is not None:
        values = values - _per_value(zero, values)
    return values * _per_value(scale, values)


def _symmetric(x: torch.Tensor, dims, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` as (values of ``dtype``, fp32 scales over ``dims``, kept as size-1 dims): each group's largest
    magnitude at the dtype's largest level (int8: 127 a side, rounded; fp8 e4m3: 448)."""
    top = 127.0 if dtype == torch.int8 else torch.finfo(dtype).max
    scale = x.abs().amax(dims, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / top
    values = x / scale
    values = values.round().clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else values.to(dtype)
    return values, scale


def quantise_per_row(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (E, N, K) as (values of ``dtype``, (E, N) fp32 scales), one symmetric scale per expert and output
    row, as torchao's per-row weight-only tensors hold them (any (..., K) rows alike: fp8 inputs); int8 (127
    levels a side) or fp8 e4m3 (its
    largest value, 448, at the row's largest magnitude)."""
    if dtype not in (torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"dtype: expected torch.int8 or torch.float8_e4m3fn, got {dtype}")
    values, scale = _symmetric(w.float(), -1, dtype)
    return values, scale.squeeze(-1)


def quantise_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (E, N, K) as fp8 e4m3 values with one fp32 scale per ``block`` x ``block`` tile ((E, N / block,
    K / block)), as DeepSeek-V3's checkpoints and transformers' FP8 experts store them: each tile's largest
    magnitude at fp8's largest value, 448."""
    check_tensor("w", w, ndim=3, dtypes=FLOAT_DTYPES)
    check_int("block", block)
    E, N, K = w.shape
    if block < MIN_GROUP_SIZE or N % block or K % block:
        raise ValueError(f"block: expected at least {MIN_GROUP_SIZE}, dividing N={N} and K={K}, got {block}")
    values, scale = _symmetric(w.float().reshape(E, N // block, block, K // block, block), (2, 4),
                               torch.float8_e4m3fn)
    return values.reshape(E, N, K), scale[:, :, 0, :, 0]


def quantise_fp8_groups(a: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``a`` (..., K) as fp8 e4m3 values with one fp32 scale per group of ``group_size`` consecutive
    values ((..., K / group_size)): each group's largest magnitude at 448. How fp8 inputs in groups are made
    (the per-token groups of DeepSeek-V3's w8a8 recipe)."""
    values, scale = _symmetric(a.float().unflatten(-1, (-1, group_size)), -1, torch.float8_e4m3fn)
    return values.flatten(-2), scale.squeeze(-1)


def quantise_groups(w: torch.Tensor, group_size: int, *, bits: int = 8) -> tuple[torch.Tensor, ...]:
    """``w`` (E, N, K) quantised in groups of ``group_size`` reduction features: (values, (E, N, G) fp32
    scales, zero points or None). ``bits=8``: symmetric int8 (torchao's ``Int8WeightOnlyConfig`` with
    ``PerGroup``), no zero points. ``bits=4``: asymmetric, each group's range (its outliers clipped where that
    reproduces the group better) onto [0, 15] with a zero point, the values packed two per byte (uint8 (E, N,
    K / 2)), as GPTQ/AWQ-style int4 weights hold them."""
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits}")
    check_tensor("w", w, ndim=3, dtypes=FLOAT_DTYPES)
    check_int("group_size", group_size)
    E, N, K = w.shape
    if group_size < MIN_GROUP_SIZE or group_size % MIN_GROUP_SIZE or K % group_size:
        raise ValueError(f"group_size: expected a multiple of {MIN_GROUP_SIZE} dividing K={K}, got {group_size}")
    grouped = w.float().unflatten(-1, (K // group_size, group_size))
    tiny = torch.finfo(torch.float32).tiny
    if bits == 8:
        values, scale = _symmetric(grouped, -1, torch.int8)
        return values.flatten(-2), scale.squeeze(-1), None
    low, high = grouped.amin(-1).clamp_max(0.0), grouped.amax(-1).clamp_min(0.0)
    best_error = None
    # 16 levels are coarse: clipping a group's outliers can cost less than the resolution the full range
    # loses. Each group keeps the range, of the full one shrunk by these factors, that reproduces it best.
    for shrink in INT4_RANGE_SHRINK:
        scale_try = ((high - low) * shrink / (INT4_LEVELS - 1)).clamp_min(tiny)
        zero_try = (-low * shrink / scale_try).round().clamp(0, INT4_LEVELS - 1)
        values_try = (grouped / scale_try[..., None] + zero_try[..., None]).round().clamp(0, INT4_LEVELS - 1)
        error = ((values_try - zero_try[..., None]) * scale_try[..., None] - grouped).square().sum(-1)
        if best_error is None:
            best_error, scale, zero, values = error, scale_try, zero_try, values_try
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        scale, zero = torch.where(better, scale_try, scale), torch.where(better, zero_try, zero)
        values = torch.where(better[..., None], values_try, values)
    return pack_int4(values.flatten(-2)), scale, zero


# A weight form by name: the stored dtype, then "_g<n>" (groups of n reduction features) or "_b<n>" (n x n tiles);
# no suffix: a scale per output row.
_SCHEME = re.compile(r"(int8|int4|fp8)(?:_([gb])(\d+))?")


def quantise_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``w`` (E, N, K) in the weight form ``scheme`` names, as (values, scales, zero points or None):
    ``"int8"`` / ``"fp8"`` a scale per output row (quantise_per_row); ``"int8_g<n>"`` / ``"int4_g<n>"`` groups of n
    reduction features, int4 with zero points (quantise_groups); ``"fp8_b<n>"`` n x n tiles (quantise_blocks)."""
    match = _SCHEME.fullmatch(scheme) if isinstance(scheme, str) else None
    forms = {None: ("int8", "fp8"), "g": ("int8", "int4"), "b": ("fp8",)}  # the suffixes each dtype takes
    if match is None or match[1] not in forms[match[2]]:
        raise ValueError(f"scheme: expected 'int8', 'fp8', 'int8_g<n>', 'int4_g<n>' or 'fp8_b<n>', got {scheme!r}")
    dtype, form, size = match[1], match[2], int(match[3] or 0)
    if form == "g":
        return quantise_groups(w, size, bits=4 if dtype == "int4" else 8)
    if form == "b":
        return (*quantise_blocks(w.contiguous(), size), None)
    return (*quantise_per_row(w, torch.int8 if dtype == "int8" else torch.float8_e4m3fn), None)
