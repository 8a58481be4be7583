"""moe_ops.tiles: the tile heuristics, and batch-invariant mode's one configuration."""

from __future__ import annotations

import pytest

import moe_ops
from moe_ops.tiles import (
    BATCH_INVARIANT_BLOCK_M,
    TMA_MIN_ROWS_PER_EXPERT,
    block_m_ranges,
    choose_block_m,
    gemm_config,
    tma_pays,
)

SLOT_COUNTS = [1, 7, 64, 1000, 65536, 1 << 20]


def test_default_tiles_follow_the_batch():
    """Without batch invariance the block size grows with the rows per expert and TMA tiles start at
    TMA_MIN_ROWS_PER_EXPERT (what batch-invariant mode has to switch off)."""
    assert [choose_block_m(n, 64) for n in (8, 1024, 3072, 65536)] == [16, 32, 64, 128]
    assert not tma_pays(TMA_MIN_ROWS_PER_EXPERT * 64 - 1, 64) and tma_pays(TMA_MIN_ROWS_PER_EXPERT * 64, 64)
    assert len(block_m_ranges(64)) == 4


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("itemsize,ieee", [(2, False), (4, False), (4, True)])
def test_batch_invariant_mode_has_one_tile_config(monkeypatch, gated, itemsize, ieee):
    monkeypatch.setattr(moe_ops.config, "batch_invariant", True)
    assert {choose_block_m(n, E) for n in SLOT_COUNTS for E in (8, 64, 256)} == {BATCH_INVARIANT_BLOCK_M}
    assert not any(tma_pays(n, 8) for n in SLOT_COUNTS)
    assert block_m_ranges(64) == [(BATCH_INVARIANT_BLOCK_M, 0, None, False)]
    # The config may depend on the device (SMs, shared memory) but not on how many blocks are busy.
    configs = {
        tuple(sorted(gemm_config(BATCH_INVARIANT_BLOCK_M, 1536, gated, itemsize, busy, 132, 232448, ieee).items()))
        for busy in (1, 8, 100, 10**6)
    }
    assert len(configs) == 1
