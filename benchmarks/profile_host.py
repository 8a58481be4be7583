"""Where the eager moe_ops layer spends its time on the host, on the GPU box (issue 3's open question).

For each cell: the layer (router linear + moe_ops.route + moe_ops.fused_experts) timed by do_bench,
the same layer replayed from a CUDA graph (GPU time alone, no host), the host's submission time per
call (wall clock over back-to-back calls, too few to fill the launch queue), the same two through
torch.ops (the dispatcher path that the public functions skip for plain CUDA tensors without
autograd), and a cProfile of the public calls (the functions that cost the most host time).
Writes host_profile_<gpu>.md.

With --compiled, the same for transformers' block under torch.compile, with the moe_ops rewrites and
without (its T = 1 graph is static, the later token counts share one dynamic-T graph, as in
bench_layer.py), and a cProfile of the compiled call with moe_ops: host_profile_compiled_<gpu>.md.

    python benchmarks/profile_host.py --out benchmarks/results [--compiled]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import time
from pathlib import Path

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


def compiled_report(gpu: str, top: int) -> list[str]:
    from bench_layer import SHAPES, build_hf_blocks, make_layer, random_tokens

    shape = SHAPES["qwen3-30b-a3b"]
    blocks = build_hf_blocks(shape, torch.device("cuda"))
    lines = [f"# Host profile of transformers' block under torch.compile: {gpu}, torch {torch.__version__}, "
             f"triton {triton.__version__}", "", f"{shape.name}; T = 1 static graph, later T one dynamic-T graph.",
             "", "| impl | T | do_bench ms | host us/call |", "|---|---|---|---|"]
    profiles = []
    for impl in ("compile_hf_grouped_mm", "moe_ops_compile_hf_grouped_mm"):
        layer = make_layer(impl, blocks, shape)
        for T in (1, 32, 512):
            call = functools.partial(layer, random_tokens(blocks["hf_eager"].gate.weight, T, shape.top_k))
            call()
            lines.append(f"| {impl} | {T} | {triton.testing.do_bench(call, warmup=25, rep=200):.4f} | "
                         f"{host_us_per_call(call):.1f} |")
            print(lines[-1], flush=True)
            if T == 32:
                profiles += ["", f"## cProfile, {impl} T={T}, {CALLS} calls", "```", profile_text(call, top), "```"]
    return lines + profiles


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compiled", action="store_true", help="profile transformers' block under torch.compile")
    args = parser.parse_args()
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    if args.compiled:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"host_profile_compiled_{gpu.lower().replace(' ', '-')}.md"
        with torch.inference_mode():
            path.write_text("\n".join(compiled_report(gpu, args.top)) + "\n")
        print("wrote", path)
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
