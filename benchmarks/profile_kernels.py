"""Why an expert GEMM runs at the speed it does: compiler report, tile-config sweep, Nsight Compute cell.

    python benchmarks/profile_kernels.py --out DIR report       # registers, spills, shared memory,
                                                                # wgmma in the PTX, per kernel and cell
    python benchmarks/profile_kernels.py --out DIR sweep        # heuristic config vs a grid of others
    ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight ... \\
        python benchmarks/profile_kernels.py ncu qwen3-30b-a3b:1  # the cell's GEMMs once, under NVTX
    ncu ... python benchmarks/profile_kernels.py ncu-decode-graph qwen3-30b-a3b  # one CUDA-graph replay

Cells are the layer benchmark's shapes (bench_kernels.SHAPES) at a token count, bf16, uniform random
routing, weights ~N(0, 0.02). The tool behind benchmarks/NOTES.md, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

import torch
import triton
from bench_kernels import SHAPES

import moe_ops
from moe_ops.expert_gemm_triton import _expert_gemm_kernel, expert_gemm_triton
from moe_ops.layout import PaddedSchedule
from moe_ops.schedule_triton import block_schedule_triton
from moe_ops.tiles import GEMM_GROUP_M, choose_block_m, device_limits, gemm_config, pipeline_fits

REPORT_CELLS = ("qwen3-30b-a3b:1", "mixtral-8x7b:1", "deepseek-v3:1", "qwen3-30b-a3b:512",
                "mixtral-8x7b:8192", "qwen3-30b-a3b:8192")
SWEEP_CELLS = ("qwen3-30b-a3b:1", "mixtral-8x7b:1", "deepseek-v3:1", "qwen3-30b-a3b:32",
               "mixtral-8x7b:8192", "qwen3-30b-a3b:8192")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Cell:
    """One (shape, T[, dtype]) ("qwen3-30b-a3b:1", "mixtral-8x7b:2048:fp32"): inputs, schedule and the
    two GEMM calls of the fused op."""

    def __init__(self, spec: str):
        self.name, tokens, *dtype_name = spec.split(":")
        self.T = int(tokens)
        self.dtype = DTYPES[dtype_name[0] if dtype_name else "bf16"]
        E, K, H, F = SHAPES[self.name]
        self.E, self.K, self.H, self.F = E, K, H, F
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.w_gate_up = torch.randn(E, 2 * F, H, dtype=self.dtype, device="cuda", generator=gen) * 0.02
        self.w_down = torch.randn(E, H, F, dtype=self.dtype, device="cuda", generator=gen) * 0.02
        self.x = torch.randn(self.T, H, dtype=self.dtype, device="cuda", generator=gen)
        logits = torch.randn(self.T, E, device="cuda", generator=gen)
        self.weights, self.ids = moe_ops.route(logits, K, renormalize=True)
        self.S = self.T * K
        self.block_m = choose_block_m(self.S, E)
        self.schedule = block_schedule_triton(self.ids, E, self.block_m)
        self.h = self.gate_up()
        self.touched = int((self.schedule.expert_counts > 0).sum())

    def gate_up(self, config=None):
        F = self.F
        return expert_gemm_triton(
            self.x, self.w_gate_up[:, :F], PaddedSchedule(*self.schedule[:3]), self.S, self.block_m,
            w_up=self.w_gate_up[:, F:], gather_top_k=self.K, activation="silu", config=config,
        )

    def down(self, config=None):
        return expert_gemm_triton(
            self.h, self.w_down, PaddedSchedule(*self.schedule[:3]), self.S, self.block_m,
            slot_weights=self.weights.reshape(-1), scatter=True, config=config,
        )

    def heuristic(self, which: str) -> dict:
        return gemm_config(self.block_m, which == "gate_up", self.dtype.itemsize, device_limits(0)[1],
                           ieee_fp32=self.dtype == torch.float32)

    def weight_bytes(self, which: str) -> int:
        return self.touched * (2 if which == "gate_up" else 1) * self.F * self.H * self.dtype.itemsize

    def flops(self, which: str) -> int:
        return 2 * self.S * (2 if which == "gate_up" else 1) * self.F * self.H


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def compiled_kernel(launch):
    """The CompiledKernel that ``launch()`` runs (cleared from Triton's in-memory cache first)."""
    kernel_cache = _expert_gemm_kernel.device_caches[torch.cuda.current_device()][0]
    kernel_cache.clear()
    launch()
    (kernel,) = kernel_cache.values()
    return kernel


def config_label(cfg: dict) -> str:
    return f"{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"


def each_gemm(cells: list[str]):
    """(spec, cell, "gate_up" | "down", launch) for both GEMMs of each cell, one cell in memory at a time."""
    for spec in cells:
        cell = Cell(spec)
        for which in ("gate_up", "down"):
            yield spec, cell, which, getattr(cell, which)
        del cell
        torch.cuda.empty_cache()


def report(cells: list[str]) -> list[str]:
    lines = ["| cell | GEMM | block_m | config | regs | spills | shared KB | wgmma in PTX | ms | GB/s | TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec, cell, which, launch in each_gemm(cells):
        kernel = compiled_kernel(launch)
        ms = bench(launch)
        lines.append(
            f"| {spec} | {which} | {cell.block_m} | {config_label(cell.heuristic(which))} | {kernel.n_regs} | "
            f"{kernel.n_spills} | {kernel.metadata.shared / 1024:.0f} | {kernel.asm['ptx'].count('wgmma.mma_async')} | "
            f"{ms:.4f} | {cell.weight_bytes(which) / ms / 1e6:.0f} | {cell.flops(which) / ms / 1e9:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def sweep_configs(block_m: int, gated: bool, itemsize: int):
    if itemsize == 4:
        # fp32 without tf32: tl.dot runs on FMA units, where tile shape and registers decide.
        tiles = itertools.product((32, 64, 128), (16, 32), ((4, 2), (8, 2), (8, 3)))
    elif block_m <= 32:
        tiles = itertools.product((16, 32, 64), (128, 256), ((2, 4), (4, 3), (4, 5)))
    else:
        tiles = itertools.product((64, 128) if gated else (128, 256), (64, 128), ((8, 3), (8, 4), (4, 4)))
    for block_n, block_k, (warps, stages) in tiles:
        if pipeline_fits(block_m, block_n, block_k, stages, gated, itemsize, device_limits(0)[1]):
            yield dict(BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GEMM_GROUP_M, num_warps=warps, num_stages=stages)


def sweep(cells: list[str]) -> list[str]:
    lines = ["| cell | GEMM | heuristic | ms | best config | ms | GB/s at best | TFLOP/s at best |",
             "|---|---|---|---|---|---|---|---|"]
    for spec, cell, which, launch in each_gemm(cells):
        times = {}
        for cfg in sweep_configs(cell.block_m, which == "gate_up", cell.dtype.itemsize):
            times[tuple(cfg.items())] = bench(lambda cfg=cfg, launch=launch: launch(cfg))
        best_cfg, best_ms = min(times.items(), key=lambda kv: kv[1])
        lines.append(
            f"| {spec} | {which} | {config_label(cell.heuristic(which))} | {bench(launch):.4f} | "
            f"{config_label(dict(best_cfg))} | {best_ms:.4f} | {cell.weight_bytes(which) / best_ms / 1e6:.0f} | "
            f"{cell.flops(which) / best_ms / 1e9:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def ncu_decode_graph(name: str) -> None:
    """One replay of transformers' block at T = 1, compiled with moe_ops under CUDA graphs, under NVTX:
    ncu lists the graph's kernels with their durations (their sum against the replay's time = gaps)."""
    from bench_layer import SHAPES as LAYER_SHAPES
    from bench_layer import build_hf_blocks, make_layer, random_tokens

    shape = LAYER_SHAPES[name]
    with torch.inference_mode():
        blocks = build_hf_blocks(shape, torch.device("cuda"))
        layer = make_layer("moe_ops_compile_hf_grouped_mm", blocks, shape, mode="reduce-overhead")
        x = random_tokens(blocks["hf_eager"].gate.weight, 1, shape.top_k)
        for _ in range(3):
            layer(x)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profile")
        layer(x)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()


def ncu_cell(spec: str) -> None:
    cell = Cell(spec)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    cell.gate_up()
    cell.down()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("report", "sweep", "ncu", "ncu-decode-graph"))
    parser.add_argument("cells", nargs="*", help="shape:T (defaults per mode)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.what in ("ncu", "ncu-decode-graph"):
        for spec in args.cells:
            (ncu_cell if args.what == "ncu" else ncu_decode_graph)(spec)
        return
    gpu = torch.cuda.get_device_name()
    header = [f"# moe_ops expert GEMMs, {args.what}: {gpu}, torch {torch.__version__}, triton {triton.__version__}",
              "", "bf16, uniform random routing, do_bench median in ms; GB/s = bytes of touched expert weights"
              " over time.", ""]
    if args.what == "report":
        lines = report(args.cells or list(REPORT_CELLS))
    else:
        lines = sweep(args.cells or list(SWEEP_CELLS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    (out / f"gemm_{args.what}_{slug}.md").write_text("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
