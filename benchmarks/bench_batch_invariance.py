"""What batch-invariant mode costs, and whether a token's output is the same alone as in its batch.

For Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 shapes (bf16, random tokens and router logits) and
T from 1 to 16384 it times the eager layer from the router logits on (``moe_ops.route`` +
``moe_ops.fused_experts``, CUDA path) with ``moe_ops.config.batch_invariant`` off and on, in
interleaved rounds (each round's order alternates; the cell is the median of the rounds' do_bench
medians), and checks for each setting whether the first 7 tokens run alone give bitwise the rows they
get in the batch of T. The logits are inputs, not computed here: the router's linear layer is a cuBLAS
matmul, whose kernel choice (and rounding) follows the row count, outside what the setting covers.
Writes ``results/batch_invariance_<gpu>.md``.

    python benchmarks/bench_batch_invariance.py [--out DIR]
"""

from __future__ import annotations

import functools
import statistics

import torch
import triton
from bench_layer import SHAPES, run_sweep

import moe_ops

TOKENS = (1, 32, 512, 4096, 16384)
ROUNDS = 5
ALONE = 7  # tokens run on their own against their rows of the full batch


def layer(x, logits, w_gate_up, w_down, top_k):
    weights, ids = moe_ops.route(logits, top_k, renormalize=True)
    return moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down)


def timed(setting: bool, fn) -> float:
    moe_ops.config.batch_invariant = setting
    return triton.testing.do_bench(fn, warmup=25, rep=150)


def same_alone(setting: bool, run, x, logits) -> bool:
    moe_ops.config.batch_invariant = setting
    return torch.equal(run(x[:ALONE], logits[:ALONE]), run(x, logits)[:ALONE])


def sweep_shape(shape) -> list[str]:
    E, K, H, F = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    w_gate_up, w_down = torch.randn(E, 2 * F, H, **bf16) * 0.02, torch.randn(E, H, F, **bf16) * 0.02
    run = functools.partial(layer, w_gate_up=w_gate_up, w_down=w_down, top_k=K)
    lines = [f"## {shape.name} (E={E}, K={K}, H={H}, F={F})", "",
             "| T | default ms | batch-invariant ms | invariant / default"
             f" | first {ALONE} alone == in batch (default, invariant) |",
             "|---|---|---|---|---|"]
    for T in TOKENS:
        x, logits = torch.randn(T, H, **bf16), torch.randn(T, E, **bf16)
        fn = functools.partial(run, x, logits)
        rounds = {False: [], True: []}
        for r in range(ROUNDS):
            for setting in ((False, True) if r % 2 == 0 else (True, False)):
                rounds[setting].append(timed(setting, fn))
        off, on = statistics.median(rounds[False]), statistics.median(rounds[True])
        equal = (same_alone(False, run, x, logits), same_alone(True, run, x, logits)) if T > ALONE else ("-", "-")
        lines.append(f"| {T} | {off:.4f} | {on:.4f} | {on / off:.2f} | {equal[0]}, {equal[1]} |")
        print(shape.name, lines[-1], flush=True)
    moe_ops.config.batch_invariant = False
    return lines + [""]


def main() -> None:
    run_sweep(
        __doc__, "Batch-invariant mode: cost and check (benchmarks/bench_batch_invariance.py)",
        f"bf16, eager route + fused_experts from given logits, do_bench median (ms), median of {ROUNDS}"
        " interleaved rounds",
        [functools.partial(sweep_shape, SHAPES[name]) for name in ("qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3")],
        "batch_invariance",
    )


if __name__ == "__main__":
    main()
