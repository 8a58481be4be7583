"""Configs of the training backward's activation-gradient kernel, timed against the memory's speed.

The kernel (moe_ops.fused_experts_backward_triton.activation_grad_triton) reads each schedule row's gate and
up pre-activations and g W_d, and writes the activation times the routing weight, the two pre-activation
gradients and a row sum: 6 P F values of 2 bytes for a gated bf16 layer, in place as the backward runs it.
Each config (BLOCK_M, BLOCK_F, warps; a program walks BLOCK_M rows across F, BLOCK_F columns at a
time) is timed with ``triton.testing.do_bench`` in ROUNDS interleaved rounds (configs in rotating
order), beside the forward's activation kernel (3 P F values) and a device copy of the same bytes as the
backward kernel (the ceiling), at the training benchmark's largest cells (P = T K schedule rows). Each config's
outputs are checked against the default's first. Results: benchmarks/results/activation_grad_sweep_<gpu>.md
(GPU, torch, triton versions).

    python benchmarks/sweep_activation_grad.py [--cells mixtral-8x7b:32768,qwen3-30b-a3b:32768] [--out DIR]
    python benchmarks/sweep_activation_grad.py --dry-run    # CPU interpreter, tiny shape (the script's logic)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from bench_layer import DRY_RUN_SHAPES, SHAPES, slug, sweep_header
from sweep_expert_tiles import time_briefly, time_once

from moe_ops.fused_experts_backward_triton import ACTIVATION_GRAD_CONFIG, activation_grad_triton, activation_triton

ROUNDS = 3
CELLS = "mixtral-8x7b:32768,qwen3-30b-a3b:32768,deepseek-v3:8192"
# (BLOCK_M, BLOCK_F, warps); the first is the kernel's default.
CONFIGS = (ACTIVATION_GRAD_CONFIG, (4, 128, 4), (16, 128, 4), (32, 128, 4), (8, 64, 4), (8, 256, 4), (8, 128, 2),
           (16, 128, 8), (16, 256, 8))
DRY_RUN_CONFIGS = (ACTIVATION_GRAD_CONFIG, (16, 32, 4), (4, 64, 2))


def label(config) -> str:
    block_m, block_f, warps = config
    return f"m{block_m} f{block_f} w{warps}"


def run_cell(name: str, num_rows: int, F: int, configs, device, time_fn, rounds: int) -> list[str]:
    bf16 = dict(device=device, dtype=torch.bfloat16)
    num_slots = num_rows  # a packed schedule: every row a routed slot
    slot_weights = torch.rand(num_slots, device=device)
    sorted_slots = torch.randperm(num_slots, device=device).to(torch.int32)
    gate_up, g_PF = torch.randn(num_rows, 2 * F, **bf16), torch.randn(num_rows, F, **bf16)

    def call(config, gate_up=gate_up, g_PF=g_PF):  # in place, as the backward runs it
        gate, up = gate_up[:, :F], gate_up[:, F:]
        return activation_grad_triton(gate, up, g_PF, slot_weights, sorted_slots, g_PF, gate, up, "silu", 1.702,
                                      7.0, config=config)

    # Every config's outputs against the default's, on fresh copies (the timed calls overwrite their inputs).
    results = []
    for config in configs:
        gu, g = gate_up.clone(), g_PF.clone()
        d_weight = call(config, gu, g)
        results.append((gu, g, d_weight))
        if len(results) > 1:
            (gu, g, d_weight), (want_gu, want_g, want_d_weight) = results
            # The elementwise outputs are the same operations whatever the config; the row sums are fp32 sums
            # of F products in another order.
            assert torch.equal(gu, want_gu) and torch.equal(g, want_g), label(config)
            torch.testing.assert_close(d_weight, want_d_weight, rtol=1e-4, atol=1e-5 * want_d_weight.abs().max().item(),
                                       msg=lambda m, c=config: f"{label(c)}: {m}")
            results.pop()
    results.clear()

    backward_bytes, forward_bytes = 6 * num_rows * F * 2, 3 * num_rows * F * 2
    copy_source = torch.empty(backward_bytes // 2, dtype=torch.uint8, device=device)
    copy_target = torch.empty_like(copy_source)
    timed = {label(c): (lambda c=c: call(c)) for c in configs}
    timed["forward activation kernel (3 P F values)"] = lambda: activation_triton(
        gate_up[:, :F], gate_up[:, F:], sorted_slots, num_slots, "silu", 1.702, 7.0)
    timed["device copy of 6 P F values (read + write)"] = lambda: copy_target.copy_(copy_source)
    moved = {kernel: forward_bytes if kernel.startswith("forward") else backward_bytes for kernel in timed}
    samples = {kernel: [] for kernel in timed}
    kernels = list(timed)
    for round_index in range(rounds):
        for kernel in kernels[round_index % len(kernels):] + kernels[:round_index % len(kernels)]:
            samples[kernel].append(time_fn(timed[kernel]))
    lines = [f"## {name}: P = {num_rows} schedule rows, F = {F}", "",
             "| kernel / config | ms | TB/s | rounds (ms) |", "|---|---|---|---|"]
    for kernel in kernels:
        ms = statistics.median(samples[kernel])
        lines.append(f"| {kernel} | {ms:.4f} | {moved[kernel] / ms / 1e9:.2f} | "
                     f"{' / '.join(f'{t:.4f}' for t in samples[kernel])} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=CELLS, help="comma-separated shape:T")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU (interpreter), a tiny shape")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; dry run: none)")
    args = parser.parse_args()
    if args.dry_run:
        shape = DRY_RUN_SHAPES["tiny-mixtral"]
        cells, configs = [(shape, 20)], DRY_RUN_CONFIGS
        device, gpu, time_fn, rounds = torch.device("cpu"), "cpu-dry-run", time_once, 1
    else:
        cells = []
        for cell in args.cells.split(","):
            name, _, tokens = cell.partition(":")
            if name not in SHAPES or not tokens.isdigit():
                raise SystemExit(f"--cells: expected shape:T with a shape of {list(SHAPES)}, got {cell!r}")
            cells.append((SHAPES[name], int(tokens)))
        configs, device = CONFIGS, torch.device("cuda")
        gpu, time_fn, rounds = torch.cuda.get_device_name(), time_briefly, ROUNDS
    torch.manual_seed(0)
    lines = sweep_header("Activation-gradient kernel configs (benchmarks/sweep_activation_grad.py)", gpu,
                         f"bf16, SiLU, gated; ms = median of {rounds} interleaved rounds of do_bench medians; TB/s = "
                         "bytes read and written per second")
    for shape, tokens in cells:
        cell = run_cell(f"{shape.name} T={tokens}", tokens * shape.top_k, shape.intermediate, configs, device,
                        time_fn, rounds)
        lines += cell
        print("\n".join(cell), flush=True)
        if not args.dry_run:  # after every cell, so that a run cut short keeps the cells it finished
            out_dir = args.out or Path(__file__).parent / "results"
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"activation_grad_sweep_{slug(gpu)}.md").write_text("\n".join(lines) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
