"""Tile sweep of the expert GEMMs at decode, per weight form: where int4 / int8 weight tiles lose bandwidth.

For each shape and decode token count, each weight form (bf16; int8 with a scale per row; int4 in groups of
128 with zero points: moe_ops.quantised.quantise_weight) and each of the fused op's two GEMMs (gate/up with
SiLU(gate) * up; down, scaled by the routing weights and scattered to the slots), moe_ops' expert GEMM kernel
runs with the heuristic's tile config (moe_ops.tiles.gemm_config) and with each config of a grid (BLOCK_N,
BLOCK_K, warps, stages; a K step of a group-wise form stays inside one group, so deeper steps than the group
collapse onto it), timed with ``triton.testing.do_bench`` in ROUNDS interleaved rounds. Each config's output
is checked against the heuristic's first. Reported per (shape, T, form, GEMM): the heuristic's ms, the best
config's ms and the weight bytes per second of the experts the batch touches (each read once), with every
config's time in a second table. Results: benchmarks/results/quantised_decode_sweep_<gpu>.md (GPU, torch,
triton versions).

    python benchmarks/sweep_quantised_decode.py [--shapes mixtral-8x7b] [--tokens 1,16] [--out DIR]
    python benchmarks/sweep_quantised_decode.py --dry-run    # CPU interpreter, tiny shape (the script's logic)
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
from bench_layer import DRY_RUN_SHAPES, SHAPES, MoEShape, slug, time_on_gpu

import moe_ops
from moe_ops.expert_gemm_triton import expert_gemm_triton
from moe_ops.layout import PackedSchedule
from moe_ops.quantised import quantise_weight
from moe_ops.schedule_triton import block_schedule_triton
from moe_ops.tiles import choose_block_m

ROUNDS = 3
TOKENS = (1, 16)
GROUP = 128
DRY_RUN_GROUP = 16
# form -> (quantise_weight scheme or None for bf16, stored bytes per weight)
FORMS = {"bf16": (None, 2.0), "int8": ("int8", 1.0), "int4_g{group}": ("int4_g{group}", 0.5)}
GRID = dict(BLOCK_N=(16, 32, 64), BLOCK_K=(128, 256), num_warps=(4,), num_stages=(4, 8))
DRY_RUN_GRID = dict(BLOCK_N=(32,), BLOCK_K=(32,), num_warps=(4,), num_stages=(2,))


def grid_configs(grid: dict) -> list[dict]:
    return [dict(zip(grid, values, strict=True), GROUP_M=8) for values in itertools.product(*grid.values())]


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


def time_once(fn) -> tuple[float]:
    """--dry-run stand-in for do_bench: one call's CPU wall clock (the interpreter takes seconds a call), ms."""
    start = time.perf_counter()
    fn()
    return ((time.perf_counter() - start) * 1e3,)


def run_cell(shape: MoEShape, t: int, forms: dict, configs: list[dict], device, time_fn,
             rounds: int) -> tuple[list, list]:
    E, K, H, F = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    x = torch.randn(t, H, device=device, dtype=torch.bfloat16)
    ids = torch.rand(t, E, device=device).argsort(-1)[:, :K]
    routing = torch.rand(t, K, device=device).softmax(-1).to(torch.bfloat16)
    S = t * K
    block_m = choose_block_m(S, E)
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

            def call(config, a=a, arguments=arguments):
                return expert_gemm_triton(a, schedule=schedule, num_slots=S, block_m=block_m, config=config,
                                          out_dtype=torch.bfloat16, **arguments)

            with torch.no_grad():
                want = call(None).float()
                runs = {"heuristic": None, **{config_name(c): c for c in configs}}
                usable = {}
                for name, config in runs.items():
                    try:
                        got = call(config).float()
                    except triton.runtime.errors.OutOfResources as error:  # a grid config past the GPU's limits
                        every.append(f"| {shape.name} | {t} | {form} | {gemm} | {name} | - | {type(error).__name__} |")
                        continue
                    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
                    usable[name] = config
                times = {name: [] for name in usable}
                for _ in range(rounds):
                    for name, config in usable.items():
                        times[name].append(time_fn(lambda config=config: call(config))[0])
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


def config_name(config: dict) -> str:
    return f"n{config['BLOCK_N']} k{config['BLOCK_K']} w{config['num_warps']} s{config['num_stages']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mixtral-8x7b", help=f"of {','.join(SHAPES)}")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated T")
    parser.add_argument("--forms", help=f"comma-separated weight forms (default all: {','.join(FORMS)}, the group "
                        "named as in the results, e.g. int4_g128)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU (interpreter), a tiny shape")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; dry run: none)")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.dry_run:
        device, shapes, group, grid = torch.device("cpu"), [DRY_RUN_SHAPES["tiny-mixtral"]], DRY_RUN_GROUP, DRY_RUN_GRID
        gpu, time_fn, rounds = "cpu-dry-run", time_once, 1
    else:
        unknown = [name for name in args.shapes.split(",") if name not in SHAPES]
        if unknown:
            raise SystemExit(f"--shapes: expected names of {list(SHAPES)}, got {unknown}")
        device, shapes, group, grid = torch.device("cuda"), [SHAPES[n] for n in args.shapes.split(",")], GROUP, GRID
        gpu, time_fn, rounds = torch.cuda.get_device_name(), time_on_gpu, ROUNDS
    configs = grid_configs(grid)
    wanted = set(args.forms.split(",")) if args.forms else None
    known = {form.format(group=group) for form in FORMS}
    if wanted is not None and wanted - known:
        raise SystemExit(f"--forms: {sorted(wanted - known)} not among {sorted(known)}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    summary = ["# Expert GEMM tiles at decode per weight form (benchmarks/sweep_quantised_decode.py)", "",
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
            cell_summary, cell_every = run_cell(shape, t, forms, configs, device, time_fn, rounds)
            summary += cell_summary
            every += cell_every
    report = "\n".join(summary + every) + "\n"
    print(report)
    if not args.dry_run:
        out_dir = args.out or Path(__file__).parent / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"quantised_decode_sweep_{slug(gpu)}.md").write_text(report)


if __name__ == "__main__":
    main()
