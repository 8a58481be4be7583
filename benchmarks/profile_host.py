"""Where the eager moe_ops layer spends its time on the host, on the GPU box (issue 3's open question).

For each cell: the layer (router linear + moe_ops.route + moe_ops.fused_experts) timed by do_bench,
the same layer replayed from a CUDA graph (GPU time alone, no host), the host's submission time per
call (wall clock over back-to-back calls, too few to fill the launch queue), the same two through
torch.ops (the dispatcher path that the public functions skip for plain CUDA tensors without
autograd), and a cProfile of the public calls (the functions that cost the most host time).
Writes host_profile_<gpu>.md.

With --compiled, transformers' block under torch.compile with the moe_ops rewrites and without, and
the eager op, at the cells of --cells, each compiled block seeing its token counts in bench_layer.py's
order: do_bench, host submission time, one call's latency, GPU kernel time and launches per call
(torch.profiler), whether a call synchronises, the kernels by time, and every compile's generated
code: compiled_profile_<gpu>.md and compiled_profile_<gpu>_code.py.txt.

    python benchmarks/profile_host.py --out benchmarks/results [--compiled [--cells "shape:T,T;shape:T"]]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import triton

import moe_ops

CELLS = (("qwen3-30b-a3b", 128, 8, 2048, 768, 1), ("mixtral-8x7b", 8, 2, 4096, 14336, 1),
         ("deepseek-v3", 256, 8, 7168, 2048, 1), ("qwen3-30b-a3b", 128, 8, 2048, 768, 512))
CALLS = 50  # back-to-back calls per host timing: ~300 launches, under the launch queue's depth


def layer_fn(E, K, H, F_, T, device):
    gen = torch.Generator(device=device).manual_seed(0)
    w_gate_up = torch.randn(E, 2 * F_, H, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    w_down = torch.randn(E, H, F_, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    router = torch.randn(E, H, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen)

    def layer():
        weights, ids = moe_ops.route(F.linear(x, router), K, renormalize=True)
        return moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down)

    def layer_through_dispatcher():
        weights, ids = torch.ops.moe_ops.route(F.linear(x, router), K, "softmax", False, True, 0.0, None, 1, 1, 1.0)
        return torch.ops.moe_ops.fused_experts(
            x, weights, ids, w_gate_up, w_down, None, None, None, None, "EFH", False, "silu", True, 1.702, 7.0,
            0.0, "position")

    return layer, layer_through_dispatcher


def host_us_per_call(fn) -> float:
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        best = min(best, (time.perf_counter() - start) / CALLS * 1e6)
        torch.cuda.synchronize()
    return best


def graph_ms(fn) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200)


def profile_text(fn, top: int) -> str:
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(CALLS):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def gpu_kernels_per_call(fn, calls: int = 20) -> tuple[float, float, list[tuple[str, float, float]]]:
    """(GPU busy us per call, launches per call, [(kernel, us per call, launches per call)] by time):
    torch.profiler's CUDA kernel records over ``calls`` back-to-back calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            per_kernel.setdefault(event.name, []).append(event.time_range.elapsed_us())
    table = sorted(((name, sum(us) / calls, len(us) / calls) for name, us in per_kernel.items()),
                   key=lambda row: -row[1])
    return sum(row[1] for row in table), sum(row[2] for row in table), table


def synchronizing(fn) -> str:
    """'' if one call makes no host-device synchronisation, else the error torch's sync debug mode raised."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return ""


def latency_us(fn) -> float:
    """Median wall clock of one call to its GPU work's end (host and GPU in series, as at decode)."""
    times = []
    for _ in range(100):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[len(times) // 2]


# moe_ops_extern_...: templates off, so route and schedule are calls of the ops (lowering/inductor/kernel_calls.py).
COMPILED_IMPLS = ("compile_hf_grouped_mm", "moe_ops_compile_hf_grouped_mm", "moe_ops_extern_compile_hf_grouped_mm",
                  "moe_ops")


def compiled_report(gpu: str, top: int, cells: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    """Report lines, and the generated code of every compile (one text)."""
    from bench_layer import SHAPES, build_hf_blocks, make_layer, random_tokens
    from torch._inductor.graph import GraphLowering

    lines = [f"# transformers' block under torch.compile, with and without moe_ops: {gpu}, torch {torch.__version__}, "
             f"triton {triton.__version__}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", "",
             "Each compiled block sees the token counts in bench_layer.py's order (its first T a static graph, "
             "later ones one dynamic-T graph). do_bench: p50 with L2 flushed; host: submission time per call, "
             f"best of 5 x {CALLS} back-to-back calls; latency: one call to its GPU work's end, median of 100; "
             "GPU: kernel time per call (torch.profiler, 20 calls); sync: what a call synchronises, if anything.",
             "", "| shape | impl | T | do_bench ms | host us | latency us | GPU us | launches | sync |",
             "|---|---|---|---|---|---|---|---|---|"]
    details, codes = [], []
    for shape_name, tokens in cells.items():
        shape = SHAPES[shape_name]
        blocks = build_hf_blocks(shape, torch.device("cuda"))
        for impl in COMPILED_IMPLS:
            layer = make_layer(impl, blocks, shape)
            for T in tokens:
                x = random_tokens(blocks["hf_eager"].gate.weight, T, shape.top_k)
                call = functools.partial(layer, x)
                # Not run_and_get_code: it resets dynamo, and the dynamic-T graph is what later T reuse.
                code = []
                with mock.patch.object(GraphLowering, "save_output_code", code.append):
                    call()
                codes += [f"# ==== {shape_name} {impl} compiled at T = {T}\n{c}" for c in code]
                busy, launches, kernels = gpu_kernels_per_call(call)
                sync = synchronizing(call)
                lines.append(
                    f"| {shape_name} | {impl} | {T} | {triton.testing.do_bench(call, warmup=25, rep=200):.4f} | "
                    f"{host_us_per_call(call):.1f} | {latency_us(call):.1f} | {busy:.1f} | {launches:g} | "
                    f"{sync or 'none'} |")
                print(lines[-1], flush=True)
                details += ["", f"### {shape_name} {impl} T={T}: GPU us per call by kernel", "",
                            "| kernel | us | launches |", "|---|---|---|"]
                details += [f"| `{name[:100]}` | {us:.1f} | {n:g} |" for name, us, n in kernels[:top]]
                if T == tokens[0] and impl != "moe_ops":
                    details += ["", f"cProfile, {CALLS} calls:", "```", profile_text(call, top), "```"]
            del layer
            torch._dynamo.reset()
    return lines + details, codes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compiled", action="store_true", help="profile transformers' block under torch.compile")
    parser.add_argument("--cells", default="qwen3-30b-a3b:1,32,128;mixtral-8x7b:1,32,128,512,2048,8192",
                        help="--compiled: shape:T,T,...;shape:... (each shape's T in bench_layer.py's order)")
    args = parser.parse_args()
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    if args.compiled:
        cells = {name: [int(t) for t in tokens.split(",")]
                 for name, tokens in (cell.split(":") for cell in args.cells.split(";"))}
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"compiled_profile_{gpu.lower().replace(' ', '-')}"
        with torch.inference_mode():
            report, codes = compiled_report(gpu, args.top, cells)
        (args.out / f"{stem}.md").write_text("\n".join(report) + "\n")
        (args.out / f"{stem}_code.py.txt").write_text("\n".join(codes))
        print("wrote", args.out / f"{stem}.md")
        return
    lines = [f"# Host profile of the eager moe_ops layer: {gpu}, torch {torch.__version__}, "
             f"triton {triton.__version__}", "",
             "| shape | T | do_bench ms | CUDA-graph replay ms | host us/call | through torch.ops: do_bench ms "
             "| host us/call |", "|---|---|---|---|---|---|---|"]
    profiles = []
    for name, E, K, H, F_, T in CELLS:
        fn, fn_ops = layer_fn(E, K, H, F_, T, device)
        fn()
        fn_ops()
        row = (triton.testing.do_bench(fn, warmup=25, rep=200), graph_ms(fn), host_us_per_call(fn),
               triton.testing.do_bench(fn_ops, warmup=25, rep=200), host_us_per_call(fn_ops))
        lines.append(f"| {name} | {T} | {row[0]:.4f} | {row[1]:.4f} | {row[2]:.1f} | {row[3]:.4f} | {row[4]:.1f} |")
        print(lines[-1], flush=True)
        profiles += ["", f"## cProfile, {name} T={T}, {CALLS} calls", "```", profile_text(fn, args.top), "```"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host_profile_{gpu.lower().replace(' ', '-')}.md"
    path.write_text("\n".join(lines + profiles) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
