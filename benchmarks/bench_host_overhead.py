"""Host-side cost of one moe_ops call, without any kernel: the op called on meta tensors.

    python benchmarks/bench_host_overhead.py [--out DIR]

On meta tensors a custom op runs its dispatch, autograd wrapper, argument checks and fake kernel,
and no device work, so the time is what every eager call pays on the host before its own launches
(benchmarks/NOTES.md uses it to split the eager op's time at small T). Runs anywhere, no GPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import moe_ops
from moe_ops.fused_experts import check_fused_args

E, K, H, F, T = 8, 2, 4096, 14336, 1  # Mixtral-8x7B at one token


def median_us(fn, repeats: int = 2000, rounds: int = 7) -> float:
    fn()
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        per_round.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(per_round)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, w_gate_up, w_down = torch.empty(T, H, **meta), torch.empty(E, 2 * F, H, **meta), torch.empty(E, H, F, **meta)
    logits = torch.empty(T, E, device="meta")
    weights, ids = torch.empty(T, K, device="meta"), torch.empty(T, K, device="meta", dtype=torch.int32)
    fused_args = (x, weights, ids, w_gate_up, w_down, None, None, None, None, "EFH", False, "silu", True,
                  1.702, 7.0, 0.0, "position")
    rows = {
        "moe_ops.route (dispatch + checks + fake)": median_us(lambda: moe_ops.route(logits, K, renormalize=True)),
        "moe_ops.fused_experts (dispatch + checks + fake)": median_us(
            lambda: moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down)),
        "fused_experts argument checks alone": median_us(
            lambda: check_fused_args(*fused_args[:13], fused_args[15], fused_args[16])),
    }
    cpu = platform.processor() or platform.machine()
    lines = [f"# moe_ops host overhead, {cpu}, Python {platform.python_version()}, torch {torch.__version__}",
             "", "Median of 7 rounds of 2000 calls on meta tensors (no kernel runs).", "",
             "| call | us per call |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in rows.items()]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
