"""One training step (forward + backward) of one MoE layer: moe_ops against plain torch.compile and a
torchtitan-style block, at the shapes of the training issue.

transformers' own ``MixtralSparseMoeBlock`` (experts_implementation="grouped_mm") at a model's shape,
bf16, weights ~N(0, 0.02), random tokens that require grad (as the output of a previous layer would),
random output gradients. One step = forward, then backward into the input and every parameter
(router, gate_up_proj, down_proj); parameter gradients are reset to None between steps, untimed.

    compile_hf_grouped_mm          torch.compile of transformers' block, moe_ops rewrites off
    compile_torchtitan             torch.compile of a torchtitan-style block on the same weights (router,
                                   stable argsort, three ``torch._grouped_mm`` with SiLU in torch,
                                   scatter_add), moe_ops rewrites off
    moe_ops_compile_hf_grouped_mm  torch.compile of transformers' block with moe_ops and
                                   moe_ops.config.training_rewrites on (lowering/graph/joint_rewrite.py)

Each implementation compiles once per shape for a dynamic token count (mark_dynamic), as a training run
with varying sequence lengths would. Gradients of every implementation are checked against the eager
block's before timing. Timing: ROUNDS interleaved rounds (each implementation once per round,
``triton.testing.do_bench`` over at least bench_layer.MIN_SAMPLES steps); the reported ms is the median of
the rounds' medians, and "won every round" says whether moe_ops was faster than both peers in each round.
TFLOP/s counts 18 T K H F (three GEMMs forward, six backward; router excluded), as the public anchors do.
Peak GiB: torch.cuda's peak allocated memory during one step (weights, their gradients and the step's
activations).

    python benchmarks/bench_training.py                    # writes benchmarks/results/training_<gpu>.*
    python benchmarks/bench_training.py --shapes qwen3-30b-a3b --tokens 32768
    python benchmarks/bench_training.py --dry-run          # CPU, tiny shapes: checks everything but speed
    python benchmarks/bench_training.py --profile qwen3-30b-a3b:8192   # kernel table of one cell
    python benchmarks/bench_training.py --memory qwen3-30b-a3b:8192    # what is alive at one cell's peak
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import re
import statistics
import tempfile
import types
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
from torch._dynamo.utils import counters

import moe_ops

IMPLS = ("compile_hf_grouped_mm", "compile_torchtitan", "moe_ops_compile_hf_grouped_mm")
IMPL_LABELS = {
    "compile_hf_grouped_mm": "torch.compile(HF grouped_mm)",
    "compile_torchtitan": "torch.compile(torchtitan-style)",
    "moe_ops_compile_hf_grouped_mm": "torch.compile(HF grouped_mm) + moe_ops",
}
OURS, PEERS = IMPLS[2], IMPLS[:2]
TOKENS = {"mixtral-8x7b": (8192, 32768), "qwen3-30b-a3b": (8192, 32768), "deepseek-v3": (8192,)}
DRY_RUN_TOKENS = (5, 48)
ROUNDS = 3
CSV_COLUMNS = ("shape", "E", "K", "H", "F", "T", "impl", "ms", "tflops", "peak_gib", "round_ms",
               "max_grad_rel_err", "gpu", "torch", "triton", "transformers", "timestamp")
CSV_KEY = ("shape", "T", "impl")


class TorchtitanStyle(torch.nn.Module):
    """torchtitan's routed experts as plain torch on transformers' block's weights (views, no copies):
    softmax router and top-k, tokens grouped by a stable argsort, ``torch._grouped_mm`` for w1, w3 and
    w2 over int32 offsets, SiLU in torch, the routing weight applied in fp32, scatter_add back."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block  # shares the parameters, so gradients land on the same tensors

    def forward(self, x):
        gate, experts = self.block.gate, self.block.experts
        x_TH = x.reshape(-1, x.shape[-1])
        num_experts, top_k = experts.gate_up_proj.shape[0], self.block.top_k
        ffn = experts.gate_up_proj.shape[1] // 2
        scores_TE = torch.softmax(torch.nn.functional.linear(x_TH, gate.weight).float(), dim=-1)
        weights_TK, ids_TK = torch.topk(scores_TE, top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        order_S = torch.argsort(ids_TK.view(-1), stable=True)
        counts_E = torch.histc(ids_TK.view(-1).float(), bins=num_experts, min=0, max=num_experts - 1)
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        token_S = order_S // top_k
        x_SH = x_TH[token_S]
        w_gate_up = experts.gate_up_proj  # (E, 2F, H)
        h_gate = torch._grouped_mm(x_SH, w_gate_up[:, :ffn].transpose(-2, -1), offs=offsets_E)
        h_up = torch._grouped_mm(x_SH, w_gate_up[:, ffn:].transpose(-2, -1), offs=offsets_E)
        y_SH = torch._grouped_mm(torch.nn.functional.silu(h_gate) * h_up, experts.down_proj.transpose(-2, -1),
                                 offs=offsets_E)
        y_SH = (y_SH.float() * weights_TK.view(-1)[order_S, None]).to(x.dtype)
        out_TH = torch.zeros_like(x_TH).scatter_add(0, token_S[:, None].expand(-1, x_TH.shape[1]), y_SH)
        return out_TH.view_as(x)


def _call(module, x):
    return module(x)


def make_step(impl: str, block: torch.nn.Module):
    """A function of (x, grad_out) that runs one training step of ``impl`` on ``block``."""
    # Dynamo keeps compiled code per code object, with guards that do not see moe_ops' settings: two
    # torch.compile(block) would share one compiled forward (the first one compiled). Each implementation
    # compiles its own copy of a calling function instead, which inlines the block.
    call = types.FunctionType(_call.__code__.replace(), _call.__globals__, f"call_{impl}")
    compiled = functools.partial(torch.compile(call), TorchtitanStyle(block) if impl == "compile_torchtitan" else block)

    def step(x, grad_out):
        moe_ops.config.training_rewrites = impl == OURS
        try:
            if impl == OURS:
                out = compiled(x)
            else:
                with moe_ops.rewrites_disabled():
                    out = compiled(x)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad_out)
        finally:
            moe_ops.config.training_rewrites = False

    return step


def eager_step(block: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    out = block(x)
    (out[0] if isinstance(out, tuple) else out).backward(grad_out)


def gradients(block: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [x.grad, *(p.grad for p in block.parameters())]


def reset_grads(block: torch.nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    block.zero_grad(set_to_none=True)


def peak_gib(step, block, x, grad_out) -> float:
    """Peak memory allocated during one step, GiB (0 on the CPU)."""
    if x.device.type != "cuda":
        return 0.0
    reset_grads(block, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(x, grad_out)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def run_shape(shape: MoEShape, tokens, device, time_fn, run_info: dict, out_dir: Path, mismatches: list) -> None:
    block = build_hf_blocks(shape, device)["hf_grouped_mm"].train().requires_grad_(True)
    steps = {impl: make_step(impl, block) for impl in IMPLS}
    rows = []
    for t in tokens:
        with torch.no_grad():
            x = random_tokens(block.gate.weight, t, shape.top_k)
        x.requires_grad_(True)
        grad_out = torch.randn_like(x)
        reset_grads(block, x)
        eager_step(block, x, grad_out)
        expected = [g.clone() for g in gradients(block, x)]
        torch._dynamo.mark_dynamic(x, 1)
        errors, peaks = {}, {}
        for impl, step in steps.items():
            reset_grads(block, x)
            rewritten_before = counters["moe_ops"]["joint_rewrite"]
            step(x, grad_out)  # compiles on the first T
            if impl == OURS and t == tokens[0] and counters["moe_ops"]["joint_rewrite"] == rewritten_before:
                mismatches.append(f"{shape.name} T={t} {impl}: the training graph was not rewritten")
            errors[impl] = max(relative_error(g, e) for g, e in zip(gradients(block, x), expected, strict=True))
            if not errors[impl] <= REL_ERR_TOLERANCE:
                mismatches.append(f"{shape.name} T={t} {impl}: gradient error {errors[impl]:.2e}")
            peaks[impl] = peak_gib(step, block, x, grad_out)
        del expected
        rounds = {impl: [] for impl in IMPLS}
        for _ in range(ROUNDS):
            for impl, step in steps.items():
                ms = time_fn(functools.partial(step, x, grad_out), grad_to_none=[x, *block.parameters()])
                rounds[impl].append(ms[0])
        flops = 18 * t * shape.top_k * shape.hidden * shape.intermediate
        for impl in IMPLS:
            ms = statistics.median(rounds[impl])
            print(f"{shape.name:<14} T={t:<6} {impl:<30} {ms:9.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s "
                  f"{peaks[impl]:6.1f} GiB  max gradient rel err {errors[impl]:.1e}")
            rows.append({
                "shape": shape.name, "E": shape.num_experts, "K": shape.top_k, "H": shape.hidden,
                "F": shape.intermediate, "T": t, "impl": impl, "ms": f"{ms:.4f}",
                "tflops": f"{flops / ms / 1e9:.1f}", "peak_gib": f"{peaks[impl]:.2f}",
                "round_ms": " ".join(f"{r:.4f}" for r in rounds[impl]),
                "max_grad_rel_err": f"{errors[impl]:.2e}", **run_info,
            })
        del x, grad_out
    all_rows = merge_csv(out_dir / f"training_{slug(run_info['gpu'])}.csv", rows, CSV_COLUMNS, CSV_KEY)
    (out_dir / f"training_{slug(run_info['gpu'])}.md").write_text(markdown_report(all_rows))


def warm_steps(shape: MoEShape, num_tokens: int, device, warmup: int = 3):
    """For each implementation in turn: (impl, block, x, grad_out, its step), the step compiled for every
    token count (as the benchmark's steps are) and run ``warmup`` times on one cell's inputs."""
    block = build_hf_blocks(shape, device)["hf_grouped_mm"].train().requires_grad_(True)
    with torch.no_grad():
        x = random_tokens(block.gate.weight, num_tokens, shape.top_k)
    x.requires_grad_(True)
    grad_out = torch.randn_like(x)
    torch._dynamo.mark_dynamic(x, 1)
    for impl in IMPLS:
        step = make_step(impl, block)
        for _ in range(warmup):
            reset_grads(block, x)
            step(x, grad_out)
        yield impl, block, x, grad_out, step


def profile_cell(shape: MoEShape, num_tokens: int, device, out_path: Path) -> None:
    """Where one training step's time goes: torch.profiler's kernel table for each implementation."""
    from torch.profiler import ProfilerActivity, profile

    sections = []
    for impl, block, x, grad_out, step in warm_steps(shape, num_tokens, device):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                reset_grads(block, x)
                step(x, grad_out)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
        sections.append(f"=== {impl}, {shape.name} T={num_tokens}, 5 steps\n{table}\n{idle_report(prof, 5)}")
    out_path.write_text("\n\n".join(sections) + "\n")
    print(out_path.read_text())


def allocations_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """(the highest sum of live bytes, the allocations alive then) over a torch.cuda memory-history trace
    (its "alloc", "free_requested" and "free_completed" events, each with "addr" and "size"): counted from
    the trace's start, so allocations made before it (weights, inputs) are not in either. A block leaves
    at its first free event (the caching allocator's allocated bytes drop when the tensor is freed)."""
    live, level, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        action, addr = event["action"], event["addr"]
        if action == "alloc":
            live[addr] = event
            level += event["size"]
            if level > peak:
                peak, at_peak = level, dict(live)
        elif action in ("free_requested", "free_completed") and addr in live:
            level -= live.pop(addr)["size"]
    return peak, list(at_peak.values())


def memory_cell(shape: MoEShape, num_tokens: int, device, out_path: Path, rows: int = 16) -> None:
    """What makes one training step's peak: for each implementation, the memory allocated before the step
    (weights, inputs), the step's peak above it, and the step's allocations alive at that peak, largest
    first, each with the source lines that allocated it (Inductor's generated code or moe_ops), replayed
    from torch.cuda's memory history of one step."""
    import linecache

    interesting = re.compile(r"torchinductor|moe_ops|bench_training|transformers/")

    def origin(event) -> str:
        frames = [f for f in event.get("frames", []) if interesting.search(f["filename"])][:2]
        return " <- ".join(f"{Path(f['filename']).name}:{f['line']} "
                           f"{linecache.getline(f['filename'], f['line']).strip()[:110]}" for f in frames)

    sections = []
    for impl, block, x, grad_out, step in warm_steps(shape, num_tokens, device):
        reset_grads(block, x)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(context="all", stacks="python", clear_history=True)
        step(x, grad_out)
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, at_peak = allocations_at_peak(trace)
        lines = [f"=== {impl}, {shape.name} T={num_tokens}: before the step {before / 2**30:.3f} GiB, peak "
                 f"{(before + peak) / 2**30:.3f} GiB (+{peak / 2**20:.1f} MiB), {len(at_peak)} step allocations "
                 "alive at the peak:"]
        for event in sorted(at_peak, key=lambda e: -e["size"])[:rows]:
            lines.append(f"  {event['size'] / 2**20:9.2f} MiB  {origin(event)}")
        sections.append("\n".join(lines))
    out_path.write_text("\n\n".join(sections) + "\n")
    print(out_path.read_text())


def idle_report(prof, num_steps: int, gap_floor_us: float = 2.0, rows: int = 12) -> str:
    """Where the GPU waited for the host during the profiled steps: busy and idle time per step (idle = gaps
    between kernels, copies and fills of at least ``gap_floor_us``), and the idle time by the host code that
    launched the kernel the GPU waited for (its outermost and innermost host operations)."""
    import json

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                    key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    host_ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and e.get("ph") == "X"]
    if not device:
        return "idle: no device events in the trace"

    def enclosing(launch) -> str:
        around = sorted((op for op in host_ops if op["tid"] == launch["tid"]
                         and op["ts"] <= launch["ts"] <= op["ts"] + op["dur"]), key=lambda op: op["ts"])
        if not around:
            return "(no host op)"
        outer = next((op for op in around if op["name"].startswith("moe_ops::")), around[0])
        return outer["name"] if outer is around[-1] else f"{outer['name']} > {around[-1]['name']}"

    idle_by_cause: dict[str, float] = {}
    busy_until, idle, busy = device[0]["ts"] + device[0]["dur"], 0.0, device[0]["dur"]
    for event in device[1:]:
        gap = event["ts"] - busy_until
        if gap >= gap_floor_us:
            idle += gap
            launch = launches.get(event.get("args", {}).get("correlation"))
            cause = f"{enclosing(launch) if launch else '(launch not traced)'} -> {event['name'][:60]}"
            idle_by_cause[cause] = idle_by_cause.get(cause, 0.0) + gap
        busy += max(0.0, event["ts"] + event["dur"] - max(busy_until, event["ts"]))
        busy_until = max(busy_until, event["ts"] + event["dur"])
    lines = [f"per step: GPU busy {busy / num_steps / 1e3:.3f} ms, idle between kernels "
             f"{idle / num_steps / 1e3:.3f} ms (gaps of >= {gap_floor_us:g} us); idle per step by the host code "
             "launching the awaited kernel:"]
    for cause, us in sorted(idle_by_cause.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f"  {us / num_steps:9.1f} us  {cause}")
    return "\n".join(lines)


def markdown_report(rows: list[dict]) -> str:
    lines = [
        "# MoE layer training step (benchmarks/bench_training.py)",
        "",
        *run_lines(rows),
        "- bf16, forward + backward into the input and every parameter, dynamic T; ms = median of "
        f"{ROUNDS} interleaved rounds of `triton.testing.do_bench` medians; TFLOP/s counts 18 T K H F; "
        "peak GiB = torch.cuda peak allocated during one step; \"won every round\" = moe_ops faster than "
        "both peers in each round",
        "",
        "| shape | T | " + " | ".join(f"{IMPL_LABELS[i]} ms / TFLOP/s / GiB" for i in IMPLS)
        + " | moe_ops vs faster peer | won every round | max gradient rel err |",
        "|---" * (len(IMPLS) + 5) + "|",
    ]
    cells = dict.fromkeys((r["shape"], int(r["T"])) for r in rows)
    by_cell = {(r["shape"], int(r["T"]), r["impl"]): r for r in rows}
    for shape, t in cells:
        found = {impl: by_cell.get((shape, t, impl)) for impl in IMPLS}
        text = [f"{float(r['ms']):.2f} / {r['tflops']} / {r['peak_gib']}" if r else "" for r in found.values()]
        ours, peers = found[OURS], [found[p] for p in PEERS if found[p]]
        speedup = won = ""
        if ours and peers:
            speedup = f"{min(float(p['ms']) for p in peers) / float(ours['ms']):.2f}x"
            our_rounds = [float(v) for v in ours["round_ms"].split()]
            peer_rounds = [[float(v) for v in p["round_ms"].split()] for p in peers]
            won = "yes" if all(o < min(p[i] for p in peer_rounds) for i, o in enumerate(our_rounds)) else "no"
        err = ours["max_grad_rel_err"] if ours else ""
        lines.append(f"| {shape} | {t} | " + " | ".join(text) + f" | {speedup} | {won} | {err} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--shapes", help=f"comma-separated subset of {','.join(TOKENS)}")
    parser.add_argument("--tokens", help="comma-separated token counts (default: each shape's in TOKENS)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, wall-clock timer")
    parser.add_argument("--profile", metavar="SHAPE:T", help="only print (and write) a kernel profile of one cell")
    parser.add_argument("--memory", metavar="SHAPE:T", help="only print (and write) what is alive at one cell's "
                        "peak memory")
    args = parser.parse_args()
    if args.memory:
        name, num_tokens = args.memory.split(":")
        out_dir = args.out or Path(__file__).parent / "results"
        gpu = slug(torch.cuda.get_device_name())
        memory_cell(SHAPES[name], int(num_tokens), torch.device("cuda"),
                    out_dir / f"training_memory_{gpu}_{name}_{num_tokens}.txt")
        return
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
    # Every graph compiles here, so that the check that moe_ops rewrote its training graph sees the pass
    # run (a graph from Inductor's or AOTAutograd's on-disk cache was rewritten when first compiled).
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    mismatches = []
    for name in names:
        tokens = DRY_RUN_TOKENS if args.dry_run else TOKENS[name]
        if args.tokens:
            tokens = tuple(int(t) for t in args.tokens.split(","))
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
