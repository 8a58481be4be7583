"""Where the time of one moe_ops layer goes: each kernel of the fused-experts op, timed alone.

    python benchmarks/bench_kernels.py [--out DIR] [--shapes mixtral-8x7b,...] [--tokens 1,32,...]

Prints, per shape and token count, the median time of routing, the block schedule, the gate_up
GEMM, the down GEMM, the K-sum and the whole op (do_bench), with each GEMM's achieved bandwidth
(bytes of touched weights / time) and rate, and writes the table to DIR/kernels_<gpu>.md.
This is the tool behind benchmarks/NOTES.md, not a test.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import triton

import moe_ops
from moe_ops.expert_gemm_triton import expert_gemm_triton
from moe_ops.layout import PaddedSchedule
from moe_ops.schedule_triton import block_schedule_triton
from moe_ops.tiles import choose_block_m

SHAPES = {  # name: (E, K, H, F)
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v3": (256, 8, 7168, 2048),
}
TOKENS = (1, 32, 128, 512, 2048, 8192)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def time_cell(name: str, T: int, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> str:
    """One table row: every kernel of the fused op at T tokens, on the given expert weights."""
    E, K, H, F = SHAPES[name]
    x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(T, E, device="cuda")
    weights, ids = moe_ops.route(logits, K, renormalize=True)
    block_m = choose_block_m(T * K, E)
    schedule = block_schedule_triton(ids, E, block_m)

    def gate_up():
        return expert_gemm_triton(x, w_gate_up[:, :F], PaddedSchedule(*schedule[:3]), T * K, block_m,
                                  w_up=w_gate_up[:, F:], gather_top_k=K, activation="silu")

    h = gate_up()

    def down():
        return expert_gemm_triton(h, w_down, PaddedSchedule(*schedule[:3]), T * K, block_m,
                                  slot_weights=weights.reshape(-1), scatter=True)

    y = down()
    t = {
        "route": bench(lambda: moe_ops.route(logits, K, renormalize=True)),
        "schedule": bench(lambda: block_schedule_triton(ids, E, block_m)),
        "gate_up": bench(gate_up),
        "down": bench(down),
        "sum": bench(lambda: y.view(T, K, H).sum(1)),
        "fused": bench(lambda: moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down)),
    }
    touched = int((schedule.expert_counts > 0).sum())
    gate_up_bytes = touched * 2 * F * H * 2
    down_bytes = touched * F * H * 2
    flops = 2 * T * K * 3 * H * F
    return (
        f"| {name} | {T} | {block_m} | {t['route']:.4f} | {t['schedule']:.4f} | {t['gate_up']:.4f} | "
        f"{t['down']:.4f} | {t['sum']:.4f} | {t['fused']:.4f} | {gate_up_bytes / t['gate_up'] / 1e6:.0f} | "
        f"{down_bytes / t['down'] / 1e6:.0f} | {flops / t['fused'] / 1e9:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    lines = [f"# moe_ops kernels on {gpu}, torch {torch.__version__}, triton {triton.__version__}", "",
             "| shape | T | block_m | route | schedule | gate_up | down | sum | fused op | gate_up GB/s | "
             "down GB/s | op TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.shapes.split(","):
        E, K, H, F = SHAPES[name]
        w_gate_up = torch.randn(E, 2 * F, H, dtype=torch.bfloat16, device="cuda") * 0.02
        w_down = torch.randn(E, H, F, dtype=torch.bfloat16, device="cuda") * 0.02
        for T in map(int, args.tokens.split(",")):
            lines.append(time_cell(name, T, w_gate_up, w_down))
            print(lines[-1], flush=True)
        del w_gate_up, w_down  # DeepSeek-V3's experts alone are 22.5 GB
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    (out / f"kernels_{slug}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
