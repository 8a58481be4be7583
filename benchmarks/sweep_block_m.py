"""fused_experts at each GEMM block size, across token counts: which block sizes a graph for every T needs.

For Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 shapes (bf16, random data, routing from random
logits through ``moe_ops.route``) and T from 2 to 8192 it times the op's CUDA path (packed schedule)
with the block size forced to 16, 32, 64 and 128 rows, next to the size ``choose_block_m`` picks and
the one a dynamic-T graph runs (``block_m_ranges``). Writes ``results/block_m_sweep_<gpu>.md``.

    python benchmarks/sweep_block_m.py [--out DIR]
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
from bench_layer import SHAPES, run_sweep

import moe_ops
import moe_ops.fused_experts  # noqa: F401  (the module, for its choose_block_m)

fused_module = sys.modules["moe_ops.fused_experts"]
BLOCK_SIZES = (16, 32, 64, 128)
TOKENS = (2, 8, 32, 128, 512, 2048, 8192)


def dynamic_block_m(num_slots: int, num_experts: int) -> int:
    for block_m, fewer, most, _ in fused_module.block_m_ranges(num_experts):
        if fewer < num_slots and (most is None or num_slots <= most):
            return block_m
    raise AssertionError("block_m_ranges covers every slot count")


def sweep_shape(shape) -> list[str]:
    E, K, H, F = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    w_gate_up, w_down = torch.randn(E, 2 * F, H, **bf16) * 0.02, torch.randn(E, H, F, **bf16) * 0.02
    lines = [f"## {shape.name} (E={E}, K={K}, H={H}, F={F})", "",
             "| T | " + " | ".join(f"block_m {b} ms" for b in BLOCK_SIZES)
             + " | best | op's choice | dynamic graph's |",
             "|---" * (len(BLOCK_SIZES) + 4) + "|"]
    choose = fused_module.choose_block_m
    try:
        for T in TOKENS:
            x = torch.randn(T, H, **bf16)
            topk_weights, topk_ids = moe_ops.route(torch.randn(T, E, device="cuda"), K, renormalize=True)
            args = (x, topk_weights, topk_ids, w_gate_up, w_down)
            times = []
            for block_m in BLOCK_SIZES:
                fused_module.choose_block_m = lambda num_slots, num_experts, block_m=block_m: block_m
                run = lambda args=args: moe_ops.fused_experts(*args)  # noqa: E731
                times.append(triton.testing.do_bench(run, warmup=25, rep=150))
            fused_module.choose_block_m = choose
            best = BLOCK_SIZES[min(range(len(times)), key=times.__getitem__)]
            lines.append(f"| {T} | " + " | ".join(f"{t:.4f}" for t in times)
                         + f" | {best} | {choose(T * K, E)} | {dynamic_block_m(T * K, E)} |")
            print(shape.name, lines[-1], flush=True)
    finally:
        fused_module.choose_block_m = choose
    return lines + [""]


def main() -> None:
    run_sweep(
        __doc__, "fused_experts by GEMM block size (benchmarks/sweep_block_m.py)",
        "bf16, routing from random logits, random data; the op's CUDA path called eagerly (host time included: "
        "small T is bound by it); `triton.testing.do_bench` medians",
        [functools.partial(sweep_shape, shape) for shape in SHAPES.values()], "block_m_sweep",
    )

if __name__ == "__main__":
    main()
