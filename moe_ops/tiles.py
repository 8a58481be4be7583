"""Tile and block-size heuristics, asked alike by the eager launchers (moe_ops/*_triton.py) and the
Inductor templates (moe_ops/lowering/inductor/): how many rows a GEMM block holds, from how many rows per
expert the TMA tiles pay and where they apply, each GEMM's tile config, and the device limits they fit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moe_ops.settings import config

# Rows of the prefill GEMM block (choose_block_m's largest), which is the TMA tile's too, and the rows per
# expert from which TMA tiles pay for copying x's rows into schedule order first (benchmarks/NOTES.md, v8).
PREFILL_BLOCK_M = 128
TMA_BLOCK_M = PREFILL_BLOCK_M
TMA_MIN_ROWS_PER_EXPERT = 256
# What a TMA descriptor needs of its base address and of every stride but the last: multiples of 16 bytes.
TMA_ALIGN_BYTES = 16
# Programs of consecutive row blocks that walk the same columns of one weight tile (L2 reuse; the tile sweeps
# hold it here).
GEMM_GROUP_M = 8
# The one GEMM block size of moe_ops.config.batch_invariant: gemm_config reads no batch size, so one
# block size for every batch is one tile config (reductions in one order).
BATCH_INVARIANT_BLOCK_M = 64


def tma_pays(num_slots, num_experts: int) -> bool:
    """Whether TMA tiles are worth their gather pass at this many slots (TMA_MIN_ROWS_PER_EXPERT); never
    in batch-invariant mode (their 128-row blocks would be one more tile config)."""
    return not config.batch_invariant and num_slots >= TMA_MIN_ROWS_PER_EXPERT * num_experts


def choose_block_m(num_slots: int, num_experts: int) -> int:
    """Rows per GEMM block from the expected rows per expert: small blocks waste little padding at
    decode; a block that holds an expert's whole share reads its weights once; large blocks reuse
    each weight tile across more rows at prefill. Batch-invariant mode: BATCH_INVARIANT_BLOCK_M."""
    if config.batch_invariant:
        return BATCH_INVARIANT_BLOCK_M
    rows_per_expert = num_slots / num_experts
    # Routing spreads each expert's share around the mean: while the mean is up to 24 rows a 32-row block
    # holds nearly every expert's rows; at a mean of 32 about half of the experts need two, and 64-row blocks
    # took 7% less time in both Qwen3-30B-A3B GEMMs, as long in Mixtral-8x7B's (benchmarks/NOTES.md v25).
    for block_m, up_to in ((16, 8), (32, 24), (64, 48)):
        if rows_per_expert <= up_to:
            return block_m
    return PREFILL_BLOCK_M


def block_m_ranges(num_experts: int) -> list[tuple[int, int, int | None, bool]]:
    """For a graph compiled for every T: (block_m, fewest slots - 1, most slots or None, TMA) per
    template pair it holds. Three block sizes where choose_block_m has four, as each is one more pair
    of templates (benchmarks/results/block_m_sweep_*.md measures what the fourth would give). The
    128-row blocks are two pairs: TMA tiles from TMA_MIN_ROWS_PER_EXPERT rows per expert up, as the op
    chooses. Batch-invariant mode: one pair, BATCH_INVARIANT_BLOCK_M rows for every T."""
    if config.batch_invariant:
        return [(BATCH_INVARIANT_BLOCK_M, 0, None, False)]
    bounds = [(16, 8 * num_experts, False), (32, 48 * num_experts, False),
              (PREFILL_BLOCK_M, TMA_MIN_ROWS_PER_EXPERT * num_experts - 1, False), (TMA_BLOCK_M, None, True)]
    return [(block_m, 0 if i == 0 else bounds[i - 1][1], most, tma) for i, (block_m, most, tma) in enumerate(bounds)]


# (multiprocessors, shared memory per program) of an H100 (and H200): the limits of Triton code generated
# without a GPU (Inductor's CPU-side code generation in tests, the sm90 compile checks).
HOPPER_LIMITS = (132, 232448)


@functools.cache
def device_limits(device_index: int) -> tuple[int, int]:
    """(multiprocessors, shared memory bytes one program may use)."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 101376)


def pipeline_fits(block_m: int, block_n: int, block_k: int, stages: int, gated: bool, itemsize: int,
                  smem_bytes: int, tma: bool = False) -> bool:
    """Whether the pipeline's stages fit in shared memory with room left for the epilogue's layout change
    (less room with TMA loads, whose pipeline is drained before the epilogue)."""
    weight_tiles = 2 if gated else 1
    return stages * (block_m + weight_tiles * block_n) * block_k * itemsize <= (0.9 if tma else 0.8) * smem_bytes


def tma_device(device: torch.device) -> bool:
    """A Hopper-or-newer GPU, with Triton's device-side tensor descriptors."""
    return device.type == "cuda" and _tma_capable(device.index or 0)


@functools.cache
def _tma_capable(device_index: int) -> bool:
    return hasattr(tl, "make_tensor_descriptor") and torch.cuda.get_device_capability(device_index)[0] >= 9


def tma_applies(dtype: torch.dtype, block_m: int, n, gated: bool, weights) -> bool:
    """Whether a packed-schedule GEMM with A in schedule order can load through TMA (on a device where
    ``tma_device``): 16-bit inputs, prefill-sized tiles, and weight views (E, N, K) whose rows are
    K-contiguous, 16-byte aligned and a whole number of rows apart between experts (``weights``:
    (shape, strides, data_ptr or None) of each, from tensors or Inductor IR), N a multiple of the
    tile's columns (a tile must not reach into the next expert's rows). Callers pass A with contiguous
    rows."""
    if block_m != TMA_BLOCK_M or dtype not in (torch.bfloat16, torch.float16) or int(n) % prefill_block_n(gated):
        return False
    itemsize = dtype.itemsize
    for shape, strides, data_ptr in weights:
        (_, _, k), (stride_e, stride_n, stride_k) = map(int, shape), map(int, strides)
        if (stride_k != 1 or stride_n < k or stride_e % stride_n or (stride_n * itemsize) % TMA_ALIGN_BYTES
                or (k * itemsize) % TMA_ALIGN_BYTES or (data_ptr is not None and data_ptr % TMA_ALIGN_BYTES)):
            return False
    return True


@functools.lru_cache(maxsize=1024)
def prefill_block_n(gated: bool) -> int:
    return 128 if gated else 256


def gemm_config(
    block_m: int, gated: bool, itemsize: int, smem_bytes: int, ieee_fp32: bool = False, tma: bool = False,
    weights_left: bool = False, scaled_dots: bool = False,
) -> dict:
    """Tile config by token bucket (block_m): a heuristic, not autotuned, so that eager calls never
    pay a tuning sweep (benchmarks/NOTES.md records what each choice measured). ``ieee_fp32``: fp32
    inputs without tf32, whose dots run on the FMA units. ``weights_left``: weights converted in registers
    as the dots' left operand (expert_gemm_triton's W_LEFT), which holds them in registers beside the
    accumulators. ``scaled_dots``: each K step's product scaled before it is accumulated (A_GROUPED), one more
    tile of fp32 in registers."""
    if ieee_fp32 and block_m >= 64:
        # The tensor-core tiles below spill on FMA dots (255 registers, 124 spilled in the down
        # GEMM); these were the fastest of a sweep at Mixtral / Qwen3 shapes, T = 2048 (v5).
        block_n, block_k, warps, stages = (128, 16, 8, 3) if gated else (128, 32, 4, 2)
    elif block_m <= 32:
        # Decode-sized blocks are weight-bandwidth bound: deep K steps keep many loads in flight. N tiles
        # stay 64 wide even where that leaves SMs idle: narrower ones, for more programs, were slower at
        # every decode cell swept on the H200 (benchmarks/NOTES.md, v23).
        block_n, block_k, warps, stages = 64, 128, 4, 4
    elif block_m == 64:
        block_n, block_k, warps, stages = (64 if gated else 128), 64, 4, 4
    else:
        # Prefill is compute bound: the 128 x 256 tile, 8 warps, 3 stages that Hopper's Triton GEMMs
        # run best with; gated, the 256 columns are 128 of gate and 128 of up.
        block_n, block_k, warps, stages = prefill_block_n(gated), 64, 8, 3
        if itemsize == 1:
            block_k *= 2  # fp8 inputs: a K step of the same bytes, as deep as fp8 dots' reduction steps run
        if weights_left:
            # Half the weight tile in registers, one stage deeper: ptxas spills the full tile (sm90, 255
            # registers, 8 to 224 bytes spilled for int4 weights).
            block_n, block_k, stages = (block_n, block_k // 2, 4) if gated else (block_n // 2, block_k, 4)
        if scaled_dots:
            block_n //= 2  # ptxas spills ~1.2 KB of the full tile's (sm90, fp8 weights in 128 x 128 blocks)
    if tma:
        # The same tile one stage deeper: with TMA loads the epilogue needs no room beside the pipeline
        # (Mixtral T = 8192 gate_up: 6.20 -> 5.76 ms with a persistent grid; benchmarks/NOTES.md, v8).
        stages += 1
    # fp32 inputs (twice the bytes) and smaller GPUs give up stages first, then depth in K.
    while not pipeline_fits(block_m, block_n, block_k, stages, gated, itemsize, smem_bytes, tma):
        if stages > 2:
            stages -= 1
        else:
            block_k //= 2
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GEMM_GROUP_M, num_warps=warps, num_stages=stages)


def packed_blocks_max(num_slots, num_experts: int, block_m: int, cdiv=triton.cdiv, minimum=min):
    """Blocks a packed schedule can need: every expert with a slot may end in a partial block. The
    lowering passes sympy's ``cdiv``/``minimum`` for a symbolic slot count (its template's kernel
    computes the same with tl.cdiv/tl.minimum)."""
    return cdiv(num_slots, block_m) + minimum(num_experts, num_slots)


def weight_pair_stride(gate_layout, up_layout, step_bytes: int, itemsize: int) -> int | None:
    """Elements from the gate weight to the up weight when a TMA tile can read both as one (2, rows, K)
    array (PAIRED): the same (shape, strides) layouts, up after gate by a 16-byte multiple (the two
    halves of a fused gate_up weight; two tensors too, if so placed), else None. A descriptor's strides
    are 16-byte multiples below 2**40 bytes; the pair's stride must also exceed a row's (the order of
    strides run on the H100: gate and up rows interleaved, one row apart, keep a descriptor each)."""
    (gate_shape, gate_strides), (up_shape, up_strides) = gate_layout, up_layout
    if [*map(int, gate_shape), *map(int, gate_strides)] != [*map(int, up_shape), *map(int, up_strides)]:
        return None
    if not 0 < step_bytes < 1 << 40 or step_bytes % TMA_ALIGN_BYTES or step_bytes <= int(gate_strides[1]) * itemsize:
        return None
    return step_bytes // itemsize
