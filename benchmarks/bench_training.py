"""One training step (forward + backward) of one MoE layer: transformers' block with and without moe_ops.

transformers' own ``MixtralSparseMoeBlock`` (experts_implementation="grouped_mm") at a model's shape,
bf16, weights ~N(0, 0.02), random tokens that require grad (as the output of a previous layer would),
random output gradients. One step = forward, then backward into the input and every parameter
(router, gate_up_proj, down_proj); parameter gradients are reset to None between steps, untimed.

    hf_grouped_mm                  eager
    compile_hf_grouped_mm          torch.compile, moe_ops rewrites off (plain torch.compile)
    moe_ops_compile_hf_grouped_mm  torch.compile with moe_ops and moe_ops.config.training_rewrites on:
                                   the joint graph rewritten, the backward is fused_experts' backward
                                   kernel (lowering/graph/joint_rewrite.py)

Each compiled implementation compiles once per shape for a dynamic token count (mark_dynamic), as a
training run with varying sequence lengths would. Gradients of every implementation are checked
against the eager block's before timing.

    python benchmarks/bench_training.py                    # writes benchmarks/results/training_<gpu>.*
    python benchmarks/bench_training.py --dry-run          # CPU, tiny shapes: checks everything but speed
    python benchmarks/bench_training.py --profile qwen3-30b-a3b:8192   # kernel table of one cell
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import tempfile
from pathlib import Path

import torch
import triton
from bench_layer import (
    DRY_RUN_SHAPES,
    REL_ERR_TOLERANCE,
    SHAPES,
    MoEShape,
    build_hf_blocks,
    merge_csv,
    random_tokens,
    relative_error,
    run_lines,
    slug,
    time_on_gpu,
    time_wall_clock,
)

import moe_ops

IMPLS = ("hf_grouped_mm", "compile_hf_grouped_mm", "moe_ops_compile_hf_grouped_mm")
IMPL_LABELS = {
    "hf_grouped_mm": "HF grouped_mm (eager)",
    "compile_hf_grouped_mm": "torch.compile(HF grouped_mm)",
    "moe_ops_compile_hf_grouped_mm": "torch.compile(HF grouped_mm) + moe_ops",
}
# DeepSeek-V3's experts (22.5 GB in bf16) with their gradients and the eager block's training
# intermediates ran out of the H100's 80 GB at T = 512: not timed.
TOKENS = {"mixtral-8x7b": (512, 2048, 8192), "qwen3-30b-a3b": (512, 2048, 8192)}
DRY_RUN_TOKENS = (5, 48)
CSV_COLUMNS = ("shape", "E", "K", "H", "F", "T", "impl", "ms_p50", "ms_p20", "ms_p80", "max_grad_rel_err",
               "gpu", "torch", "triton", "transformers", "timestamp")
CSV_KEY = ("shape", "T", "impl")


def make_step(impl: str, block: torch.nn.Module):
    """A function of (x, grad_out) that runs one training step of ``impl`` on ``block``."""
    if impl == "hf_grouped_mm":
        layer = block
    else:
        torch._dynamo.reset()
        compiled = torch.compile(block)
        if impl == "moe_ops_compile_hf_grouped_mm":
            layer = compiled
        else:
            def layer(x):
                with moe_ops.rewrites_disabled():
                    return compiled(x)

    def step(x, grad_out):
        moe_ops.config.training_rewrites = impl == "moe_ops_compile_hf_grouped_mm"
        try:
            out = layer(x)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad_out)
        finally:
            moe_ops.config.training_rewrites = False

    return step


def gradients(block: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [x.grad, *(p.grad for p in block.parameters())]


def reset_grads(block: torch.nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    block.zero_grad(set_to_none=True)


def run_shape(shape: MoEShape, tokens, device, time_fn, run_info: dict, out_dir: Path, mismatches: list) -> None:
    block = build_hf_blocks(shape, device)["hf_grouped_mm"].train().requires_grad_(True)
    cases = {}
    for t in tokens:
        with torch.no_grad():
            x = random_tokens(block.gate.weight, t, shape.top_k)
        x.requires_grad_(True)
        grad_out = torch.randn_like(x)
        reset_grads(block, x)
        make_step("hf_grouped_mm", block)(x, grad_out)
        cases[t] = (x, grad_out, [g.clone() for g in gradients(block, x)])

    rows = []
    for impl in IMPLS:
        step = make_step(impl, block)
        for t, (x, grad_out, expected) in cases.items():
            if impl != "hf_grouped_mm":
                torch._dynamo.mark_dynamic(x, 1)
            reset_grads(block, x)
            step(x, grad_out)  # compiles on the first T
            err = max(relative_error(g, e) for g, e in zip(gradients(block, x), expected, strict=True))
            if not err <= REL_ERR_TOLERANCE:
                mismatches.append(f"{shape.name} T={t} {impl}: gradient error {err:.2e}")
            ms = time_fn(functools.partial(step, x, grad_out), grad_to_none=[x, *block.parameters()])
            print(f"{shape.name:<14} T={t:<5} {impl:<30} {ms[0]:9.3f} ms  max gradient rel err {err:.1e}")
            rows.append({
                "shape": shape.name, "E": shape.num_experts, "K": shape.top_k, "H": shape.hidden,
                "F": shape.intermediate, "T": t, "impl": impl, "ms_p50": f"{ms[0]:.4f}", "ms_p20": f"{ms[1]:.4f}",
                "ms_p80": f"{ms[2]:.4f}", "max_grad_rel_err": f"{err:.2e}", **run_info,
            })
    all_rows = merge_csv(out_dir / f"training_{slug(run_info['gpu'])}.csv", rows, CSV_COLUMNS, CSV_KEY)
    (out_dir / f"training_{slug(run_info['gpu'])}.md").write_text(markdown_report(all_rows))


def profile_cell(shape: MoEShape, num_tokens: int, device, out_path: Path) -> None:
    """Where one training step's time goes: torch.profiler's kernel table for each implementation."""
    from torch.profiler import ProfilerActivity, profile

    block = build_hf_blocks(shape, device)["hf_grouped_mm"].train().requires_grad_(True)
    with torch.no_grad():
        x = random_tokens(block.gate.weight, num_tokens, shape.top_k)
    x.requires_grad_(True)
    grad_out = torch.randn_like(x)
    sections = []
    for impl in IMPLS:
        step = make_step(impl, block)
        for _ in range(3):
            reset_grads(block, x)
            step(x, grad_out)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                reset_grads(block, x)
                step(x, grad_out)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
        sections.append(f"=== {impl}, {shape.name} T={num_tokens}, 5 steps\n{table}")
    out_path.write_text("\n\n".join(sections) + "\n")
    print(out_path.read_text())


def markdown_report(rows: list[dict]) -> str:
    lines = [
        "# MoE layer training step (benchmarks/bench_training.py)",
        "",
        *run_lines(rows),
        "- bf16, transformers' MixtralSparseMoeBlock (grouped_mm experts), forward + backward into the input"
        " and every parameter, dynamic T; `triton.testing.do_bench` p50 in ms; speed-up = torch.compile"
        " without moe_ops / with it",
        "",
        "| shape | T | " + " | ".join(IMPL_LABELS[i] for i in IMPLS) + " | speed-up | max gradient rel err |",
        "|---" * (len(IMPLS) + 4) + "|",
    ]
    cells = dict.fromkeys((r["shape"], int(r["T"])) for r in rows)
    by_cell = {(r["shape"], int(r["T"]), r["impl"]): r for r in rows}
    for shape, t in cells:
        times = [by_cell.get((shape, t, impl)) for impl in IMPLS]
        text = [f"{float(r['ms_p50']):.3f}" if r else "" for r in times]
        ours, peer = by_cell.get((shape, t, IMPLS[2])), by_cell.get((shape, t, IMPLS[1]))
        speedup = f"{float(peer['ms_p50']) / float(ours['ms_p50']):.2f}x" if ours and peer else ""
        err = ours["max_grad_rel_err"] if ours else ""
        lines.append(f"| {shape} | {t} | " + " | ".join(text) + f" | {speedup} | {err} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--shapes", help=f"comma-separated subset of {','.join(TOKENS)}")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, wall-clock timer")
    parser.add_argument("--profile", metavar="SHAPE:T", help="only print (and write) a kernel profile of one cell")
    args = parser.parse_args()
    if args.profile:
        name, num_tokens = args.profile.split(":")
        out_dir = args.out or Path(__file__).parent / "results"
        gpu = slug(torch.cuda.get_device_name())
        profile_cell(SHAPES[name], int(num_tokens), torch.device("cuda"), out_dir / f"training_profile_{gpu}.txt")
        return
    known = DRY_RUN_SHAPES if args.dry_run else SHAPES
    timed = known if args.dry_run else TOKENS
    names = args.shapes.split(",") if args.shapes else list(timed)
    if any(name not in timed for name in names):
        raise SystemExit(f"--shapes: known {list(timed)}")
    if args.dry_run:
        device, gpu = torch.device("cpu"), "cpu-dry-run"

        def time_fn(fn, grad_to_none):
            return time_wall_clock(fn)

        out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_training_"))
    else:
        device, gpu = torch.device("cuda"), torch.cuda.get_device_name()

        def time_fn(fn, grad_to_none):
            return time_on_gpu(fn, grad_to_none=grad_to_none)

        out_dir = args.out or Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    import transformers

    run_info = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                    transformers=transformers.__version__,
                    timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    print(f"{gpu}: torch {run_info['torch']}, triton {run_info['triton']}, transformers {run_info['transformers']}")
    torch.manual_seed(0)
    mismatches = []
    for name in names:
        tokens = DRY_RUN_TOKENS if args.dry_run else TOKENS[name]
        run_shape(known[name], tokens, device, time_fn, run_info, out_dir, mismatches)
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print((out_dir / f"training_{slug(gpu)}.md").read_text())
    if mismatches:
        print("WARNING: gradients disagree with eager:\n  " + "\n  ".join(mismatches))


if __name__ == "__main__":
    main()
