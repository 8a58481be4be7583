"""Tile sweep of the expert GEMMs per weight form and batch size: where the heuristic's tiles lose time.

For each shape, token count T, weight form (bf16; int8 with a scale per row; int4 in groups of 128 with zero
points: moe_ops.quantised.quantise_weight) and each of the fused op's two GEMMs (gate/up with SiLU(gate) * up;
down, scaled by the routing weights and scattered to the slots), moe_ops' expert GEMM kernel runs with the
heuristic's tile config (moe_ops.tiles.gemm_config) at the op's block size (choose_block_m) and at each size of
``--block-m``, and with each config of the grid that block size's class sweeps (decode-sized blocks: BLOCK_N
32-128 with K steps of 128 and 256; larger ones: BLOCK_N 64-256 with K steps of 64 and 128; each with 4 and 8
warps, 3 and 4 stages; a K step of a group-wise form stays inside one group, so deeper steps
than the group collapse onto it), timed with ``triton.testing.do_bench`` in ROUNDS interleaved rounds. Each
config's output is checked against the heuristic's first. Reported per (shape, T, form, GEMM): the heuristic's
ms, the best config's ms and the weight bytes per second of the experts the batch touches (each read once), with
every config's time in a second table. Results: benchmarks/results/expert_tiles_sweep_<gpu>.md (GPU, torch,
triton versions); the session-30 decode run, under this script's former name sweep_quantised_decode.py, is
results/quantised_decode_sweep_nvidia-h200.md.

    python benchmarks/sweep_expert_tiles.py [--shapes mixtral-8x7b] [--tokens 1,16] [--block-m 64] [--out DIR]
    python benchmarks/sweep_expert_tiles.py --dry-run    # CPU interpreter, tiny shape (the script's logic)
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
import time
from pathlib import Path

import torch
import triton
from bench_layer import DRY_RUN_SHAPES, SHAPES, MoEShape, slug

import moe_ops
from moe_ops.expert_gemm_triton import expert_gemm_triton
from moe_ops.layout import PackedSchedule
from moe_ops.quantised import quantise_weight
from moe_ops.schedule_triton import block_schedule_triton
from moe_ops.tiles import GEMM_GROUP_M, choose_block_m

ROUNDS = 3
TOKENS = (1, 16)
GROUP = 128
DRY_RUN_GROUP = 16
# form -> (quantise_weight scheme or None for bf16, stored bytes per weight)
FORMS = {"bf16": (None, 2.0), "int8": ("int8", 1.0), "int4_g{group}": ("int4_g{group}", 0.5)}
# The grids per block-size class: decode-sized blocks (<= 32 rows) are bound by weight bandwidth (narrow N,
# deep K); larger ones are tried at prefill tile shapes.
DECODE_GRID = dict(BLOCK_N=(32, 64, 128), BLOCK_K=(128, 256), num_warps=(4, 8), num_stages=(3, 4))
LARGE_GRID = dict(BLOCK_N=(64, 128, 256), BLOCK_K=(64, 128), num_warps=(4, 8), num_stages=(3, 4))
DRY_RUN_GRID = dict(BLOCK_N=(32,), BLOCK_K=(32,), num_warps=(4,), num_stages=(2,))


def grid_configs(grid: dict) -> list[dict]:
    return [dict(zip(grid, values, strict=True), GROUP_M=GEMM_GROUP_M) for values in itertools.product(*grid.values())]


def block_grid(block_m: int, dry_run: bool) -> dict:
    return DRY_RUN_GRID if dry_run else DECODE_GRID if block_m <= 32 else LARGE_GRID


def form_weights(w_gate_up: torch.Tensor, w_down: torch.Tensor, scheme: str | None) -> dict:
    """The two GEMMs' weights in one form: gate and up as halves of the stored (E, 2F, ...) values, scales and
    zero points (moe_ops.quantised's layout: gate rows first)."""
    if scheme is None:
        F = w_gate_up.shape[1] // 2
        return dict(gate=dict(w=w_gate_up[:, :F], w_up=w_gate_up[:, F:]), down=dict(w=w_down))
    values, scale, zero = quantise_weight(w_gate_up, scheme)
    F = values.shape[1] // 2
    gate = dict(w=values[:, :F], w_up=values[:, F:], w_scale=scale[:, :F], w_up_scale=scale[:, F:])
    if zero is not None:
        gate.update(w_zero=zero[:, :F], w_up_zero=zero[:, F:])
    values, scale, zero = quantise_weight(w_down, scheme)
    down = dict(w=values, w_scale=scale)
    if zero is not None:
        down["w_zero"] = zero
    return dict(gate=gate, down=down)


def time_once(fn) -> float:
    """--dry-run stand-in for do_bench: one call's CPU wall clock (the interpreter takes seconds a call), ms."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run_cell(shape: MoEShape, t: int, forms: dict, block_sizes: list[int], dry_run: bool, device, time_fn,
             rounds: int) -> tuple[list, list]:
    E, K, H, F = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    x = torch.randn(t, H, device=device, dtype=torch.bfloat16)
    ids = torch.rand(t, E, device=device).argsort(-1)[:, :K]
    routing = torch.rand(t, K, device=device).softmax(-1).to(torch.bfloat16)
    S = t * K
    heuristic_block_m = choose_block_m(S, E)
    sorted_slots, _, _, _, offsets = block_schedule_triton(ids, E, 1)
    schedule = PackedSchedule(sorted_slots, offsets)
    touched = min(E, S)
    h = torch.randn(S, F, device=device, dtype=torch.bfloat16)  # the down GEMM's input, in slot order
    summary, every = [], []
    for form, (weights, itemsize) in forms.items():
        gemms = {
            "gate_up": (x, dict(gather_top_k=K, activation="silu", **weights["gate"]), 2 * F * H),
            "down": (h, dict(slot_weights=routing.reshape(-1), scatter=True, slot_ids=ids.reshape(-1),
                             **weights["down"]), H * F),
        }
        for gemm, (a, arguments, weight_numel) in gemms.items():

            def call(block_m, config, a=a, arguments=arguments):
                return expert_gemm_triton(a, schedule=schedule, num_slots=S, block_m=block_m, config=config,
                                          out_dtype=torch.bfloat16, **arguments)

            with torch.no_grad():
                want = call(heuristic_block_m, None).float()
                runs = {"heuristic": (heuristic_block_m, None)}
                for block_m in dict.fromkeys([heuristic_block_m, *block_sizes]):
                    if block_m != heuristic_block_m:
                        runs[f"m{block_m} heuristic"] = (block_m, None)
                    runs.update({config_name(block_m, c): (block_m, c)
                                 for c in grid_configs(block_grid(block_m, dry_run))})
                usable = {}
                for name, (block_m, config) in runs.items():
                    try:
                        got = call(block_m, config).float()
                    except triton.runtime.errors.OutOfResources as error:  # a grid config past the GPU's limits
                        every.append(f"| {shape.name} | {t} | {form} | {gemm} | {name} | - | {type(error).__name__} |")
                        continue
                    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
                    usable[name] = (block_m, config)
                times = {name: [] for name in usable}
                for _ in range(rounds):
                    for name, (block_m, config) in usable.items():
                        times[name].append(time_fn(lambda block_m=block_m, config=config: call(block_m, config)))
            ms = {name: statistics.median(measured) for name, measured in times.items()}
            best = min(ms, key=ms.get)
            weight_bytes = touched * weight_numel * itemsize
            summary.append(f"| {shape.name} | {t} | {form} | {gemm} | {ms['heuristic']:.4f} | "
                           f"{weight_bytes / (ms['heuristic'] * 1e-3) / 1e9:.0f} | {ms[best]:.4f} | "
                           f"{weight_bytes / (ms[best] * 1e-3) / 1e9:.0f} | {best} |")
            every += [f"| {shape.name} | {t} | {form} | {gemm} | {name} | {ms[name]:.4f} | "
                      + ", ".join(f"{m:.4f}" for m in times[name]) + " |" for name in sorted(ms, key=ms.get)]
            print(summary[-1], flush=True)
    return summary, every


def config_name(block_m: int, config: dict) -> str:
    return f"m{block_m} n{config['BLOCK_N']} k{config['BLOCK_K']} w{config['num_warps']} s{config['num_stages']}"


def time_briefly(fn) -> float:
    """do_bench's median, ms, over a shorter window than the layer benchmark's (rounds repeat it)."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mixtral-8x7b", help=f"of {','.join(SHAPES)}")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated T")
    parser.add_argument("--block-m", default="", help="comma-separated block sizes tried beside the op's own")
    parser.add_argument("--forms", help=f"comma-separated weight forms (default all: {','.join(FORMS)}, the group "
                        "named as in the results, e.g. int4_g128)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU (interpreter), a tiny shape")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; dry run: none)")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    block_sizes = [int(b) for b in args.block_m.split(",") if b]
    if args.dry_run:
        device, shapes, group = torch.device("cpu"), [DRY_RUN_SHAPES["tiny-mixtral"]], DRY_RUN_GROUP
        gpu, time_fn, rounds = "cpu-dry-run", time_once, 1
    else:
        unknown = [name for name in args.shapes.split(",") if name not in SHAPES]
        if unknown:
            raise SystemExit(f"--shapes: expected names of {list(SHAPES)}, got {unknown}")
        device, shapes, group = torch.device("cuda"), [SHAPES[n] for n in args.shapes.split(",")], GROUP
        gpu, time_fn, rounds = torch.cuda.get_device_name(), time_briefly, ROUNDS
    wanted = set(args.forms.split(",")) if args.forms else None
    known = {form.format(group=group) for form in FORMS}
    if wanted is not None and wanted - known:
        raise SystemExit(f"--forms: {sorted(wanted - known)} not among {sorted(known)}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    summary = ["# Expert GEMM tiles per weight form and batch size (benchmarks/sweep_expert_tiles.py)", "",
               f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, moe_ops {moe_ops.__file__}, {stamp}; "
               f"bf16 activations, random routing; ms = median of {rounds} interleaved rounds of do_bench medians; "
               "GB/s = stored weight bytes of the experts the batch touches per second", "",
               "| shape | T | form | GEMM | heuristic ms | GB/s | best ms | GB/s | best config |",
               "|---|---|---|---|---|---|---|---|---|"]
    every = ["", "## Every config", "", "| shape | T | form | GEMM | config | ms | rounds (ms) |",
             "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        torch.manual_seed(0)
        E, H, F = shape.num_experts, shape.hidden, shape.intermediate
        w_gate_up = (torch.randn(E, 2 * F, H, device=device) / H**0.5).to(torch.bfloat16)
        w_down = (torch.randn(E, H, F, device=device) / F**0.5).to(torch.bfloat16)
        forms = {form.format(group=group): (form_weights(w_gate_up, w_down, scheme and scheme.format(group=group)),
                                            itemsize) for form, (scheme, itemsize) in FORMS.items()
                 if wanted is None or form.format(group=group) in wanted}
        for t in tokens:
            cell_summary, cell_every = run_cell(shape, t, forms, block_sizes, args.dry_run, device, time_fn, rounds)
            summary += cell_summary
            every += cell_every
            if not args.dry_run:  # after every cell, so that a run cut short keeps the cells it finished
                out_dir = args.out or Path(__file__).parent / "results"
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / f"expert_tiles_sweep_{slug(gpu)}.md").write_text("\n".join(summary + every) + "\n")
    print("\n".join(summary + every))


if __name__ == "__main__":
    main()
