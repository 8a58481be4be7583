"""Expert parallelism measured: one MoE layer's forward + backward with its experts sharded over the GPUs
of one host (moe_ops.fused_experts_ep, NCCL), against each GPU running all the experts itself on the same
tokens (moe_ops.fused_experts, EP = 1), and the all-to-all alone at the layer's size. The on-paper
counterpart is benchmarks/model_expert_parallel.py.

Each rank holds T random bf16 tokens, routes them with moe_ops.route over random logits, and times
(``triton.testing.do_bench`` medians, every rank timing the same calls; rank 0 reports):
    ep1             fused_experts over all E experts (what one GPU does without expert parallelism)
    ep_padded       fused_experts_ep, padded dispatch (dropless capacity)
    ep_pipelined    the same in PIPELINE_CHUNKS chunks (each chunk's exchange in flight during another's experts)
    ep_exact        fused_experts_ep, exact dispatch (one host sync per call)
    all_to_all      one all-to-all of T K rows of H bf16 values (the exact dispatch's size)
and derives per-GPU throughput of each EP variant against ep1, and the all-to-all's bus rate.
Writes ``results/expert_parallel_<gpu>.md``. ``--profile``: rank 0 also records one pipelined forward +
backward (the first shape and token count) with torch.profiler: a Chrome trace
(``expert_parallel_profile_<gpu>.json``), and how much of the collectives' time ran while compute ran: on GPUs
NCCL's kernels beside other kernels; in the dry run gloo's all-to-alls (on gloo's threads) beside the PyTorch
operators of the main thread.

    python benchmarks/bench_expert_parallel.py                  # every GPU of the host, NCCL
    python benchmarks/bench_expert_parallel.py --ranks 2 --tokens 8192
    python benchmarks/bench_expert_parallel.py --profile        # + a trace of a pipelined call, and its overlap
    python benchmarks/bench_expert_parallel.py --dry-run        # CPU, 2 gloo ranks, tiny shapes, no speed
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_layer import slug

import moe_ops

SHAPES = {  # E, K, H, F
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
DRY_RUN_SHAPES = {"tiny": (8, 2, 32, 16)}
TOKENS = (4096, 16384)
PIPELINE_CHUNKS = 2
DRY_RUN_TOKENS = (6,)


def _time(fn, cuda: bool) -> float:
    """Median ms of ``fn`` (forward + backward): do_bench on a GPU, wall clock on the CPU (dry run)."""
    if cuda:
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=100)
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _cell(rank, num_ranks, shape, tokens, device) -> dict:
    num_experts, top_k, hidden, inter = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)  # the same weights on every rank
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, device=device, generator=generator) * 0.02).to(dtype)
    w_down = (torch.randn(num_experts, hidden, inter, device=device, generator=generator) * 0.02).to(dtype)
    local = slice(rank * num_experts // num_ranks, (rank + 1) * num_experts // num_ranks)
    shards = [w[local].clone().requires_grad_(True) for w in (w_gate_up, w_down)]
    full = [w.clone().requires_grad_(True) for w in (w_gate_up, w_down)]
    torch.manual_seed(1 + rank)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    weights, ids = moe_ops.route(torch.randn(tokens, num_experts, device=device), top_k, renormalize=True)
    grad = torch.randn(tokens, hidden, device=device, dtype=dtype)

    def step(fn, params):
        def run():
            out = fn(x, weights, ids, *params)
            torch.autograd.backward(out, grad)
            x.grad = None
            for p in params:
                p.grad = None
        return run

    rows = torch.randn(tokens * top_k, hidden, device=device, dtype=dtype)
    splits = [tokens * top_k // num_ranks] * num_ranks
    rows = rows[: sum(splits)]
    cuda = device.type == "cuda"
    times = {
        "ep1": _time(step(moe_ops.fused_experts, full), cuda),
        "ep_padded": _time(step(lambda *a: moe_ops.fused_experts_ep(*a, dispatch="padded"), shards), cuda),
        "ep_pipelined": _time(step(lambda *a: moe_ops.fused_experts_ep(*a, dispatch="padded",
                                                                     pipeline_chunks=PIPELINE_CHUNKS), shards), cuda),
        "ep_exact": _time(step(lambda *a: moe_ops.fused_experts_ep(*a, dispatch="exact"), shards), cuda),
        "all_to_all": _time(lambda: dist.all_to_all_single(torch.empty_like(rows), rows, splits, splits), cuda),
    }
    moved = rows.numel() * rows.element_size() * (1 - 1 / num_ranks)
    times["all_to_all_GBps"] = moved / (times["all_to_all"] * 1e-3) / 1e9
    return times


def overlapped_ms(collectives: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Time (the intervals' unit) during which some collective interval and some compute interval both run:
    the length of the union of collectives intersected with the union of compute."""
    def union(intervals):
        merged = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return merged

    busy, total = union(compute), 0.0
    for start, end in union(collectives):
        total += sum(max(0.0, min(end, b_end) - max(start, b_start)) for b_start, b_end in busy)
    return total


def _profile(rank, num_ranks, shape, tokens, device, out_folder) -> str | None:
    """One pipelined forward + backward under torch.profiler (rank 0 keeps the trace): the summary line."""
    num_experts, top_k, hidden, inter = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    local = num_experts // num_ranks
    shards = [(torch.randn(local, *dims, device=device) * 0.02).to(dtype).requires_grad_(True)
              for dims in ((2 * inter, hidden), (hidden, inter))]
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    weights, ids = moe_ops.route(torch.randn(tokens, num_experts, device=device), top_k, renormalize=True)

    def step():
        out = moe_ops.fused_experts_ep(x, weights, ids, *shards, dispatch="padded", pipeline_chunks=PIPELINE_CHUNKS)
        out.float().sum().backward()

    step()  # compiled kernels and communicators ready before the trace
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if rank != 0:
        return None
    gpu = slug(torch.cuda.get_device_name()) if device.type == "cuda" else "cpu"
    trace = Path(out_folder) / f"expert_parallel_profile_{gpu}.json"
    prof.export_chrome_trace(str(trace))
    collectives, compute = _collective_and_compute(prof.events(), device)
    collective_ms = sum(b - a for a, b in collectives)
    hidden_ms = overlapped_ms(collectives, compute)
    beside = "compute kernels" if device.type == "cuda" else "the main thread's operators"
    return (f"trace: {trace.name}; pipelined ({PIPELINE_CHUNKS} chunks) forward + backward, T = {tokens}: "
            f"collectives {collective_ms:.3f} ms, of which {hidden_ms:.3f} ms ran beside {beside}")


def _collective_and_compute(events, device) -> tuple[list, list]:
    """(collective, compute) intervals in ms of a profile: on GPUs NCCL's kernels and every other kernel; on the
    CPU (gloo) the all-to-alls gloo runs on its own threads and the PyTorch operators (aten::) of the others."""
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        collectives = [e for e in kernels if "nccl" in e.name.lower()]
        compute = [e for e in kernels if "nccl" not in e.name.lower()]
    else:
        collectives = [e for e in events if e.name.startswith("gloo:")]
        gloo_threads = {e.thread for e in collectives}
        compute = [e for e in events if e.name.startswith("aten::") and e.thread not in gloo_threads]
    return [[(e.time_range.start / 1e3, e.time_range.end / 1e3) for e in side] for side in (collectives, compute)]


def _worker(rank, num_ranks, init_file, args, out_file):
    cuda = not args.dry_run
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=num_ranks)
    try:
        rows = []
        shapes = DRY_RUN_SHAPES if args.dry_run else SHAPES
        for name, shape in shapes.items():
            for tokens in args.tokens or (DRY_RUN_TOKENS if args.dry_run else TOKENS):
                cell = _cell(rank, num_ranks, shape, tokens, device)
                rows.append((name, shape, tokens, cell))
        report = _report(rows, num_ranks, args.dry_run)
        if args.profile:
            name, shape = next(iter(shapes.items()))
            tokens = (args.tokens or (DRY_RUN_TOKENS if args.dry_run else TOKENS))[0]
            summary = _profile(rank, num_ranks, shape, tokens, device, Path(out_file).parent)
            report += f"\n- profile ({name}): {summary}\n" if summary else ""
        if rank == 0:
            Path(out_file).write_text(report)
    finally:
        dist.destroy_process_group()
        # gloo's worker threads drop a finished collective's tensors after its wait() returns; one that needs
        # the GIL while Python finalizes aborts the process (torch 2.13, ~1 dry run in 10): let them finish.
        time.sleep(0.1)


def _report(rows, num_ranks, dry_run) -> str:
    gpu = "CPU (dry run, wall clock: no speed)" if dry_run else torch.cuda.get_device_name()
    lines = [f"# Expert parallelism on {num_ranks} ranks (benchmarks/bench_expert_parallel.py)", "",
             f"- device: {gpu}; torch {torch.__version__}",
             f"- run: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}",
             "- forward + backward of one layer, ms = median (do_bench on GPUs); throughput per GPU vs EP = 1 at the"
             " same T per rank", "",
             f"| shape | T per rank | EP=1 ms | padded ms | padded, {PIPELINE_CHUNKS} chunks ms | exact ms | "
             "padded / EP=1 | chunks / EP=1 | exact / EP=1 | all-to-all ms | all-to-all GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, _, tokens, t in rows:
        lines.append(f"| {name} | {tokens} | {t['ep1']:.3f} | {t['ep_padded']:.3f} | {t['ep_pipelined']:.3f} | "
                     f"{t['ep_exact']:.3f} | {t['ep1'] / t['ep_padded']:.2f} | {t['ep1'] / t['ep_pipelined']:.2f} | "
                     f"{t['ep1'] / t['ep_exact']:.2f} | {t['all_to_all']:.3f} | {t['all_to_all_GBps']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--ranks", type=int, default=None, help="processes (default: every GPU; 2 in a dry run)")
    parser.add_argument("--tokens", type=lambda s: tuple(int(t) for t in s.split(",")), default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also a torch.profiler trace of a pipelined call")
    args = parser.parse_args()
    num_ranks = args.ranks or (2 if args.dry_run else torch.cuda.device_count())
    if num_ranks < 2:
        raise SystemExit(f"bench_expert_parallel: needs at least 2 ranks, got {num_ranks}")
    with tempfile.TemporaryDirectory() as folder:
        out_file = os.path.join(folder, "report.md")
        mp.spawn(_worker, args=(num_ranks, os.path.join(folder, "init"), args, out_file), nprocs=num_ranks)
        text = Path(out_file).read_text()
        traces = sorted(Path(folder).glob("expert_parallel_profile_*.json"))
        if not args.dry_run:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"expert_parallel_{slug(torch.cuda.get_device_name())}_x{num_ranks}.md").write_text(text)
            for trace in traces:
                (args.out / trace.name).write_bytes(trace.read_bytes())
    print(text)


if __name__ == "__main__":
    main()
