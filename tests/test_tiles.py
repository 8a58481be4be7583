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
    pipeline_fits,
    tma_pays,
)

SLOT_COUNTS = [1, 7, 64, 1000, 65536, 1 << 20]


def test_default_tiles_follow_the_batch():
    """Without batch invariance the block size grows with the rows per expert and TMA tiles start at
    TMA_MIN_ROWS_PER_EXPERT (what batch-invariant mode has to switch off)."""
    assert [choose_block_m(n, 64) for n in (8, 1024, 1536, 2048, 3072, 65536)] == [16, 32, 32, 64, 64, 128]
    assert not tma_pays(TMA_MIN_ROWS_PER_EXPERT * 64 - 1, 64) and tma_pays(TMA_MIN_ROWS_PER_EXPERT * 64, 64)
    assert len(block_m_ranges(64)) == 4


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("itemsize,ieee", [(2, False), (4, False), (4, True)])
def test_batch_invariant_mode_has_one_tile_config(monkeypatch, gated, itemsize, ieee):
    monkeypatch.setattr(moe_ops.config, "batch_invariant", True)
    assert {choose_block_m(n, E) for n in SLOT_COUNTS for E in (8, 64, 256)} == {BATCH_INVARIANT_BLOCK_M}
    assert not any(tma_pays(n, 8) for n in SLOT_COUNTS)
    assert block_m_ranges(64) == [(BATCH_INVARIANT_BLOCK_M, 0, None, False)]
    # gemm_config reads the block size, the inputs and the device, never the batch: one block size, one config.


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("smem_bytes", [232448, 101376])
def test_decode_tiles_stay_64_wide_and_fit(block_m, gated, smem_bytes):
    """Decode-sized blocks keep 64-wide N tiles whatever the batch (narrower ones were slower in every
    decode cell swept); on Hopper's shared memory 128-deep K steps in 4 stages; where it is short, fewer stages or
    shallower steps, so that the pipeline fits."""
    config = gemm_config(block_m, gated, 2, smem_bytes)
    block_k, stages = config["BLOCK_K"], config["num_stages"]
    assert config["BLOCK_N"] == 64 and pipeline_fits(block_m, 64, block_k, stages, gated, 2, smem_bytes)
    if smem_bytes == 232448:
        assert (block_k, stages) == (128, 4)
    else:
        assert (block_k, stages) < (128, 4)
