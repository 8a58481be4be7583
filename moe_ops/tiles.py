"""Tile and block-size heuristics, asked alike by the eager launchers (moe_ops/*_triton.py) and the
Inductor templates (moe_ops/lowering/): how many rows a GEMM block holds, and from how many rows per
expert the TMA tiles pay.
"""

from __future__ import annotations

# Rows of a TMA tile, and the rows per expert from which TMA tiles pay for copying x's rows into
# schedule order first (benchmarks/NOTES.md, v8).
TMA_BLOCK_M = 128
TMA_MIN_ROWS_PER_EXPERT = 256


def tma_pays(num_slots, num_experts: int) -> bool:
    """Whether TMA tiles are worth their gather pass at this many slots (TMA_MIN_ROWS_PER_EXPERT)."""
    return num_slots >= TMA_MIN_ROWS_PER_EXPERT * num_experts


def choose_block_m(num_slots: int, num_experts: int) -> int:
    """Rows per GEMM block from the expected rows per expert: small blocks waste little padding at
    decode; a block that holds an expert's whole share reads its weights once; large blocks reuse
    each weight tile across more rows at prefill."""
    rows_per_expert = num_slots / num_experts
    for block_m, up_to in ((16, 8), (32, 32), (64, 48)):
        if rows_per_expert <= up_to:
            return block_m
    return 128


def block_m_ranges(num_experts: int) -> list[tuple[int, int, int | None, bool]]:
    """For a graph compiled for every T: (block_m, fewest slots - 1, most slots or None, TMA) per
    template pair it holds. Three block sizes where choose_block_m has four, as each is one more pair
    of templates (benchmarks/results/block_m_sweep_*.md measures what the fourth would give). The
    128-row blocks are two pairs: TMA tiles from TMA_MIN_ROWS_PER_EXPERT rows per expert up, as the op
    chooses."""
    bounds = [(16, 8 * num_experts, False), (32, 48 * num_experts, False),
              (128, TMA_MIN_ROWS_PER_EXPERT * num_experts - 1, False), (128, None, True)]
    return [(block_m, 0 if i == 0 else bounds[i - 1][1], most, tma) for i, (block_m, most, tma) in enumerate(bounds)]
