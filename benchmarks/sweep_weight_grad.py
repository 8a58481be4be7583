"""Tile configs of fused_experts' weight-gradient kernel, and the fused op's forward and backward, timed.

For each cell (Qwen3-30B-A3B T = 8192, Mixtral-8x7B T = 2048; bf16, uniform routing, random data) it
times ``weight_grad_triton`` for dW_gate_up (rows of x gathered) and dW_down (g gathered) at each
config, torch's grouped GEMM (``weight_grad_grouped_mm``, what the backward uses for bf16 on sm90) over
the same rows copied into schedule order, the copy itself, then the op's forward and its backward (the
CUDA kernel of ``moe_ops::fused_experts_backward``). Writes ``results/weight_grad_sweep_<gpu>.md``.

    python benchmarks/sweep_weight_grad.py [--out DIR]
"""

from __future__ import annotations

import functools

import torch
import triton
from bench_layer import run_sweep

import moe_ops
from moe_ops.fused_experts_backward_triton import (
    fused_experts_backward_triton,
    weight_grad_grouped_mm,
    weight_grad_triton,
)
from moe_ops.schedule_triton import block_schedule_triton, rows_in_schedule_order
from moe_ops.tiles import choose_block_m

CELLS = (("qwen3-30b-a3b", 128, 8, 2048, 768, 8192), ("mixtral-8x7b", 8, 2, 4096, 14336, 2048))
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); None: the kernel's default.
CONFIGS = (None, (128, 128, 128, 8, 3), (64, 128, 128, 8, 4), (64, 128, 256, 8, 3), (32, 128, 128, 4, 4),
           (64, 256, 128, 8, 3), (128, 128, 64, 8, 3), (64, 64, 128, 4, 4))


def sweep_cell(name, E, K, H, F, T) -> list[str]:
    S = T * K
    ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :K].to(torch.int32)
    block_m = choose_block_m(S, E)
    sorted_slots, _, _, _, expert_offsets = block_schedule_triton(ids, E, 1)  # packed, as the backward's
    P = sorted_slots.shape[0]
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, g = torch.randn(T, H, **bf16), torch.randn(T, H, **bf16)
    d_pre, h = torch.randn(P, 2 * F, **bf16), torch.randn(P, F, **bf16)
    dw_gate_up, dw_down = torch.empty(E, 2 * F, H, **bf16), torch.empty(E, H, F, **bf16)
    flops_gate_up, flops_down = 2 * S * 2 * F * H, 2 * S * H * F
    lines = [f"## {name} T={T} (E={E}, K={K}, H={H}, F={F}; block_m={block_m}, {P} schedule rows)", "",
             "| config (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) | dW_gate_up ms | TFLOP/s | dW_down ms | TFLOP/s |",
             "|---|---|---|---|---|"]
    for config in CONFIGS:
        t_gu = triton.testing.do_bench(lambda config=config: weight_grad_triton(
            d_pre, x, dw_gate_up, sorted_slots, expert_offsets, S, K, gather_a=True, config=config))
        t_d = triton.testing.do_bench(lambda config=config: weight_grad_triton(
            g, h, dw_down, sorted_slots, expert_offsets, S, K, gather_g=True, config=config))
        label = "default" if config is None else str(config)
        lines.append(f"| {label} | {t_gu:.3f} | {flops_gate_up / t_gu / 1e9:.0f} | {t_d:.3f} | "
                     f"{flops_down / t_d / 1e9:.0f} |")
        print(lines[-1])
    x_rows, g_rows = rows_in_schedule_order(x, sorted_slots, K), rows_in_schedule_order(g, sorted_slots, K)
    t_gu = triton.testing.do_bench(lambda: weight_grad_grouped_mm(d_pre, x_rows, dw_gate_up, expert_offsets))
    t_d = triton.testing.do_bench(lambda: weight_grad_grouped_mm(g_rows, h, dw_down, expert_offsets))
    t_copy = triton.testing.do_bench(lambda: rows_in_schedule_order(x, sorted_slots, K))
    lines.append(f"| torch grouped GEMM over rows in schedule order (each copy {t_copy:.3f} ms more) | {t_gu:.3f} | "
                 f"{flops_gate_up / t_gu / 1e9:.0f} | {t_d:.3f} | {flops_down / t_d / 1e9:.0f} |")
    print(lines[-1])
    w_gate_up = torch.randn(E, 2 * F, H, **bf16) / H**0.5
    w_down = torch.randn(E, H, F, **bf16) / F**0.5
    weights = torch.rand(T, K, device="cuda").softmax(-1)
    args = (x, weights, ids, w_gate_up, w_down, None, None, None, None, "EFH", False, "silu", True, 1.702, 7.0,
            0.0, "position")
    t_fwd = triton.testing.do_bench(lambda: moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down))
    t_bwd = triton.testing.do_bench(lambda: fused_experts_backward_triton(*args, [g, torch.empty(0)]))
    lines += ["", f"fused_experts forward {t_fwd:.3f} ms, its backward {t_bwd:.3f} ms (do_bench medians)", ""]
    print(lines[-2])
    return lines


def main() -> None:
    run_sweep(
        __doc__, "fused_experts weight-gradient kernel: tile sweep (benchmarks/sweep_weight_grad.py)",
        "bf16, uniform routing, random data; `triton.testing.do_bench` medians",
        [functools.partial(sweep_cell, *cell) for cell in CELLS], "weight_grad_sweep",
    )

if __name__ == "__main__":
    main()
