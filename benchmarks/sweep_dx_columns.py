"""dx of fused_experts' backward where torch's grouped GEMM runs natively: per-row products made for all of
dx's columns at once against one half of them at a time (what the backward does: ``column_halves``).

For each cell (bf16, uniform routing, random data, T = 8192) it times the dx step of the backward both ways,
in interleaved rounds: the (P, 2F) pre-activation gradients times each expert's gate/up weight (torch's
grouped GEMM) into per-row dx, then each token's K rows summed (``token_sums_triton``). It reports the
median over rounds of each way's ``do_bench`` median, and the memory each way allocates beyond its inputs
and dx (the per-row products: the backward's peak). Writes ``results/dx_columns_<gpu>.md``.

    python benchmarks/sweep_dx_columns.py [--out DIR]
"""

from __future__ import annotations

import functools
import statistics

import torch
import triton
from bench_layer import run_sweep

from moe_ops._compat.matmul import grouped_mm
from moe_ops.fused_experts_backward_triton import column_halves, slot_positions, token_sums_triton
from moe_ops.schedule_triton import block_schedule_triton

CELLS = (("qwen3-30b-a3b", 128, 8, 2048, 768), ("deepseek-v3", 256, 8, 7168, 2048),
         ("mixtral-8x7b", 8, 2, 4096, 14336))
TOKENS = 8192
ROUNDS = 10


def sweep_cell(name, E, K, H, F) -> list[str]:
    T, S = TOKENS, TOKENS * K
    ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :K].to(torch.int32)
    sorted_slots, _, _, _, expert_offsets = block_schedule_triton(ids, E, 1)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    d_pre = torch.randn(sorted_slots.shape[0], 2 * F, **bf16)
    w_gu = torch.randn(E, 2 * F, H, **bf16) / H**0.5
    positions_S = slot_positions(sorted_slots, S)
    dx = torch.empty(T, H, **bf16)

    def dx_step(slices):
        for cols in slices:
            token_sums_triton(grouped_mm(d_pre, w_gu[:, :, cols], expert_offsets[1:]), positions_S, dx[:, cols], K)

    ways = {"all columns": [slice(0, H)], "column halves": column_halves(H, 2)}
    results, extra = {way: [] for way in ways}, {}
    for way, slices in ways.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        dx_step(slices)
        torch.cuda.synchronize()
        extra[way] = (torch.cuda.max_memory_allocated() - before) / 2**20
    want = dx.clone()
    for _ in range(ROUNDS):
        for way, slices in ways.items():
            results[way].append(triton.testing.do_bench(functools.partial(dx_step, slices)))
    dx_step(ways["column halves"])
    flops = 2 * S * 2 * F * H
    lines = [f"## {name} T={T} (E={E}, K={K}, H={H}, F={F})", "",
             "| dx step | ms (median of rounds) | min round | max round | TFLOP/s | MiB beyond inputs and dx |",
             "|---|---|---|---|---|---|"]
    for way, times in results.items():
        ms = statistics.median(times)
        lines.append(f"| {way} | {ms:.3f} | {min(times):.3f} | {max(times):.3f} | {flops / ms / 1e9:.0f} | "
                     f"{extra[way]:.1f} |")
        print(lines[-1])
    ratio = statistics.median(results["column halves"]) / statistics.median(results["all columns"])
    lines += ["", f"halves against all columns: {ratio:.3f}x the time; dx the same both ways: {torch.equal(dx, want)}",
              ""]
    print(lines[-2])
    return lines


def main() -> None:
    run_sweep(__doc__, "fused_experts backward: dx over all columns or column halves (benchmarks/sweep_dx_columns.py)",
              f"bf16, uniform routing, random data; {ROUNDS} interleaved rounds of `triton.testing.do_bench` medians",
              [functools.partial(sweep_cell, *cell) for cell in CELLS], "dx_columns")


if __name__ == "__main__":
    main()
