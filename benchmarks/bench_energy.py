"""Energy per call of the expert GEMMs and of the compiled layers, at prefill sizes where the GPU holds
its power limit.

At Mixtral's prefill sizes the H100 runs its GEMMs at its 700 W cap and lowers its clock to stay there,
so a kernel's time follows the energy it spends per call, and timings of one implementation after
another follow the card's recent load (benchmarks/NOTES.md, v10). NVML's total-energy counter gives
the energy directly: each variant runs back to back for ``--seconds``, the counter read before and
after, its time from CUDA events around the same calls; ``--rounds`` rounds with the variants in
alternating order; medians over rounds.

Variants, on one transformers MixtralSparseMoeBlock's weights (bench_layer.build_hf_blocks), x's rows in
the packed schedule's order as the TMA tiles read them:
    moe_ops gate_up            the fused op's gate_up GEMM with SiLU (TMA tiles; gate and up as one weight's
                               halves: one descriptor, a 256-wide dot)
    moe_ops gate_up, 2 descr.  the same work with a descriptor each (the halves swapped: up before gate)
    CUTLASS gate_up            torch._grouped_mm over the same rows (what compiled transformers runs)
    SiLU x up pass             the pass transformers then needs, as torch.compile fuses it
    moe_ops down               the down GEMM (routing weight, scatter to slots)
    CUTLASS down               torch._grouped_mm
    layer compile(HF) / layer compile + moe_ops
                               the whole compiled block, as bench_layer times it

    python benchmarks/bench_energy.py                            # writes benchmarks/results/energy_<gpu>.md
    python benchmarks/bench_energy.py --out "$OUT" --tokens 8192 --seconds 1
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_layer import SHAPES, build_hf_blocks, make_layer, random_tokens, slug, sweep_header

import moe_ops


class EnergyCounter:
    """NVML's total energy since the driver loaded (millijoules) and the SM clock, through ctypes (no
    Python NVML package on the GPU box)."""

    def __init__(self, device_index: int = 0):
        try:
            self.nvml = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError as error:
            raise RuntimeError("bench_energy needs an NVIDIA GPU with NVML (libnvidia-ml.so.1)") from error
        self._check(self.nvml.nvmlInit_v2(), "nvmlInit_v2")
        self.handle = ctypes.c_void_p()
        self._check(self.nvml.nvmlDeviceGetHandleByIndex_v2(device_index, ctypes.byref(self.handle)), "handle")

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"NVML {what} failed with status {status}")

    def millijoules(self) -> int:
        value = ctypes.c_ulonglong()
        self._check(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(value)), "energy")
        return value.value

    def sm_clock_mhz(self) -> int:
        value = ctypes.c_uint()
        self._check(self.nvml.nvmlDeviceGetClockInfo(self.handle, 1, ctypes.byref(value)), "clock")  # 1: SM
        return value.value


def measure(fn: Callable[[], object], counter: EnergyCounter, seconds: float) -> dict:
    """Calls of ``fn`` back to back for ``seconds``: ms and mJ per call, mean W, median SM clock."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, clocks = 0, []
    energy_before, began = counter.millijoules(), time.perf_counter()
    start.record()
    while time.perf_counter() - began < seconds:
        for _ in range(10):
            fn()
        calls += 10
        torch.cuda.synchronize()
        clocks.append(counter.sm_clock_mhz())
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / calls
    mj = (counter.millijoules() - energy_before) / calls
    return dict(ms=ms, mj=mj, watts=mj / ms, mhz=statistics.median(clocks))


def in_rounds(variants: dict[str, Callable], counter: EnergyCounter, rounds: int, seconds: float) -> dict:
    samples = {name: [] for name in variants}
    for round_index in range(rounds):
        order = list(variants.items())
        if round_index % 2:
            order.reverse()
        for name, fn in order:
            samples[name].append(measure(fn, counter, seconds))
    return samples


def report_rows(samples: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: medians over rounds of each measure, and every round's mJ."""
    rows = ["| variant | ms / call | mJ / call | W | SM MHz | mJ per round |", "|---|---|---|---|---|---|"]
    for name, runs in samples.items():
        median = {key: statistics.median(run[key] for run in runs) for key in ("ms", "mj", "watts", "mhz")}
        per_round = " ".join(f"{run['mj']:.0f}" for run in runs)
        rows.append(f"| {name} | {median['ms']:.3f} | {median['mj']:.0f} | {median['watts']:.0f} | "
                    f"{median['mhz']:.0f} | {per_round} |")
    return rows


def gemm_variants(block: torch.nn.Module, x_TH: torch.Tensor, top_k: int) -> dict[str, Callable]:
    from moe_ops.expert_gemm_triton import expert_gemm_triton
    from moe_ops.layout import PackedSchedule
    from moe_ops.schedule_triton import block_schedule_triton, rows_in_schedule_order
    from moe_ops.tiles import TMA_BLOCK_M

    w_gate_up, w_down = block.experts.gate_up_proj, block.experts.down_proj  # (E, 2F, H), (E, H, F)
    num_experts, two_f, _ = w_gate_up.shape
    inter = two_f // 2
    num_slots = x_TH.shape[0] * top_k
    topk_weights, topk_ids = moe_ops.route(F.linear(x_TH, block.gate.weight), top_k, renormalize=True)
    sorted_slots, _, _, _, expert_offsets = block_schedule_triton(topk_ids, num_experts, 1)
    a_SH = rows_in_schedule_order(x_TH, sorted_slots, top_k)

    schedule = PackedSchedule(sorted_slots, expert_offsets)

    def gate_up(gate, up):
        return lambda: expert_gemm_triton(a_SH, gate, schedule, num_slots, TMA_BLOCK_M, w_up=up, activation="silu",
                                          tma=True)

    h_SF = gate_up(w_gate_up[:, :inter], w_gate_up[:, inter:])()
    group_ends = expert_offsets[1:].to(torch.int32)
    w_gate_up_t, w_down_t = w_gate_up.transpose(-2, -1), w_down.transpose(-2, -1)
    gate_up_SF2 = torch._grouped_mm(a_SH, w_gate_up_t, offs=group_ends)
    silu_pass = torch.compile(lambda g: F.silu(g[:, :inter]) * g[:, inter:])
    return {
        "moe_ops gate_up": gate_up(w_gate_up[:, :inter], w_gate_up[:, inter:]),
        "moe_ops gate_up, 2 descr.": gate_up(w_gate_up[:, inter:], w_gate_up[:, :inter]),
        "CUTLASS gate_up": lambda: torch._grouped_mm(a_SH, w_gate_up_t, offs=group_ends),
        "SiLU x up pass": lambda: silu_pass(gate_up_SF2),
        "moe_ops down": lambda: expert_gemm_triton(
            h_SF, w_down, schedule, num_slots, TMA_BLOCK_M, slot_weights=topk_weights.reshape(-1), scatter=True,
            slot_ids=topk_ids.reshape(-1), tma=True),
        "CUTLASS down": lambda: torch._grouped_mm(h_SF, w_down_t, offs=group_ends),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--shape", default="mixtral-8x7b", choices=list(SHAPES))
    parser.add_argument("--tokens", default="2048,8192", help="comma-separated token counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="run time of each variant per round")
    args = parser.parse_args()

    counter = EnergyCounter(torch.cuda.current_device())
    torch.manual_seed(0)
    shape, device = SHAPES[args.shape], torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    lines = sweep_header(
        f"Energy per call: {shape.name} (benchmarks/bench_energy.py)", gpu,
        f"each variant back to back for {args.seconds} s per round, {args.rounds} rounds in alternating order;"
        " NVML total energy before and after, CUDA events around the same calls; medians over rounds")[:-1]
    with torch.inference_mode():
        blocks = build_hf_blocks(shape, device)
        layers = {"layer compile(HF)": make_layer("compile_hf_grouped_mm", blocks, shape),
                  "layer compile + moe_ops": make_layer("moe_ops_compile_hf_grouped_mm", blocks, shape)}
        for num_tokens in map(int, args.tokens.split(",")):
            x = random_tokens(blocks["hf_eager"].gate.weight, num_tokens, shape.top_k)
            variants = gemm_variants(blocks["hf_eager"], x[0], shape.top_k)
            variants.update({name: (lambda layer=layer, x=x: layer(x)) for name, layer in layers.items()})
            samples = in_rounds(variants, counter, args.rounds, args.seconds)
            lines += ["", f"## T = {num_tokens}", "", *report_rows(samples)]
            print("\n".join(lines[-len(samples) - 2:]), flush=True)
            del variants
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"energy_{slug(gpu)}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
