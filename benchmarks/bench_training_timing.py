"""How one training step's measured time depends on the way the process got there.

bench_training.py compiles each implementation once per shape for a dynamic token count, at the first
count of the shape (T = 8192), runs the eager block at each count for its reference gradients, and
then times the count with ``triton.testing.do_bench``. This script times the same steps of one cell
(transformers' block at a model's shape, bf16; the three implementations of bench_training.py) in a
fresh process with each of those circumstances switched on or off, so that a difference between the
benchmark and a profile can be traced to one of them:

    --compile-tokens N   compile at N tokens first (default: at the timed count), then time the count
    --eager-first        run the eager block's step at the timed count before timing (as the benchmark does)
    --empty-cache        empty the CUDA caching allocator right before timing

Each implementation is timed in ROUNDS interleaved rounds, three ways per round: do_bench's median (L2
flushed, gradients set to None between calls, as the benchmark); ten back-to-back steps between two
CUDA events (gradients reset, no flush); and the host time to enqueue those ten steps. Results are
printed and appended to benchmarks/results/training_timing_<gpu>.md with the options, versions and
time.

    python benchmarks/bench_training_timing.py --shape qwen3-30b-a3b --tokens 32768 --compile-tokens 8192
    python benchmarks/bench_training_timing.py --dry-run     # CPU, tiny shape, wall-clock timer
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
import transformers
import triton
from bench_layer import DRY_RUN_SHAPES, SHAPES, build_hf_blocks, random_tokens, slug, time_on_gpu, time_wall_clock
from bench_training import IMPLS, eager_step, make_step, reset_grads

ROUNDS = 3
BACK_TO_BACK_STEPS = 10


def back_to_back(step, block, x, grad_out, synchronize) -> tuple[float, float]:
    """(ms per step between two CUDA events around BACK_TO_BACK_STEPS steps, host ms per step to enqueue
    them). On the CPU both are the wall clock."""
    synchronize()
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    began = time.perf_counter()
    for _ in range(BACK_TO_BACK_STEPS):
        reset_grads(block, x)
        step(x, grad_out)
    host_ms = (time.perf_counter() - began) * 1e3 / BACK_TO_BACK_STEPS
    if x.device.type != "cuda":
        return host_ms, host_ms
    end.record()
    synchronize()
    return start.elapsed_time(end) / BACK_TO_BACK_STEPS, host_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-30b-a3b", help=f"one of {','.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=32768, help="the timed token count")
    parser.add_argument("--compile-tokens", type=int, help="compile at this token count first (default: --tokens)")
    parser.add_argument("--eager-first", action="store_true", help="run the eager step at --tokens before timing")
    parser.add_argument("--empty-cache", action="store_true", help="empty the CUDA allocator cache before timing")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, a tiny shape, wall-clock timer")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; dry run: none)")
    args = parser.parse_args()
    if args.dry_run:
        device, shape, tokens, compile_tokens = torch.device("cpu"), DRY_RUN_SHAPES["tiny-mixtral"], 48, 5
        gpu, synchronize = "cpu-dry-run", lambda: None

        def time_fn(fn, grad_to_none):
            return time_wall_clock(fn)
    else:
        if args.shape not in SHAPES:
            raise SystemExit(f"--shape: expected one of {list(SHAPES)}, got {args.shape!r}")
        device, shape, tokens = torch.device("cuda"), SHAPES[args.shape], args.tokens
        compile_tokens = args.compile_tokens or tokens
        gpu, synchronize = torch.cuda.get_device_name(), torch.cuda.synchronize

        def time_fn(fn, grad_to_none):
            return time_on_gpu(fn, grad_to_none=grad_to_none)

    torch.manual_seed(0)
    block = build_hf_blocks(shape, device)["hf_grouped_mm"].train().requires_grad_(True)
    steps = {impl: make_step(impl, block) for impl in IMPLS}

    def inputs(num_tokens):
        with torch.no_grad():
            x = random_tokens(block.gate.weight, num_tokens, shape.top_k)
        x.requires_grad_(True)
        torch._dynamo.mark_dynamic(x, 1)
        return x, torch.randn_like(x)

    x, grad_out = inputs(compile_tokens)
    for step in steps.values():  # compiles, for every token count
        reset_grads(block, x)
        step(x, grad_out)
    if compile_tokens != tokens:
        x, grad_out = inputs(tokens)
        for step in steps.values():
            reset_grads(block, x)
            step(x, grad_out)
    if args.eager_first:
        reset_grads(block, x)
        eager_step(block, x, grad_out)
    if args.empty_cache and device.type == "cuda":
        synchronize()
        torch.cuda.empty_cache()
    params = [x, *block.parameters()]
    rounds = {impl: [] for impl in IMPLS}
    for _ in range(ROUNDS):
        for impl, step in steps.items():
            bench_ms = time_fn(lambda step=step: step(x, grad_out), params)[0]
            rounds[impl].append((bench_ms, *back_to_back(step, block, x, grad_out, synchronize)))

    options = (f"T = {tokens}, compiled at T = {compile_tokens}, eager step first: "
               f"{'yes' if args.eager_first else 'no'}, allocator cache emptied: {'yes' if args.empty_cache else 'no'}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"## {shape.name}, {options}", "",
             f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
             f"{stamp}; medians of {ROUNDS} interleaved rounds, ms per step", "",
             "| implementation | do_bench p50 | back-to-back | host enqueue | rounds (do_bench, back-to-back, host) |",
             "|---|---|---|---|---|"]
    for impl, measured in rounds.items():
        medians = [statistics.median(m[i] for m in measured) for i in range(3)]
        detail = "; ".join(", ".join(f"{v:.2f}" for v in m) for m in measured)
        lines.append(f"| {impl} | " + " | ".join(f"{m:.3f}" for m in medians) + f" | {detail} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.dry_run:
        out_dir = args.out or Path(__file__).parent / "results"
        path = out_dir / f"training_timing_{slug(gpu)}.md"
        title = "# Training-step timing by circumstance (benchmarks/bench_training_timing.py)\n\n"
        header = "" if path.exists() else title
        with path.open("a") as results:
            results.write(header + report + "\n")


if __name__ == "__main__":
    main()
