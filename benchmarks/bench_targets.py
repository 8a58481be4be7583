"""The speed targets the layer table does not show: decode under CUDA graphs, skewed routing, fp16/fp32.

Same layer, inputs, floor and timer as bench_layer.py (transformers' MixtralSparseMoeBlock at each
shape, weights ~N(0, 0.02), do_bench p50), in three sections:

    decode  T = 1 under torch.compile(mode="reduce-overhead") (CUDA graphs): the compiled block with
            moe_ops against the compiled HF grouped_mm, timed per call of one block and per layer of
            a graph of DECODE_LAYERS blocks in sequence (x = rms_norm(x + block(x)); in a model one
            CUDA graph holds every layer, so its host cost is not paid per layer; the norm keeps the
            chain finite and adds one small kernel per layer). The blocks have their own weights
            where they fit in GPU memory (DeepSeek-V3's repeat one block: 8 experts' weights per token
            are 350 MB, far past the 50 MB L2, so little is reused). Target:
            moe_ops within 2x the floor, per layer.
    skew    T = 512 and 8192, uniform routing against Zipf(s = 1.2) over the experts, through the
            block's own router (inputs solved for router logits log p + Gumbel noise, so each token's
            top-k is a draw without replacement from p). Target: skewed within 15% of uniform.
    dtypes  fp16 and fp32 at T = 32 and 2048: moe_ops (compiled and the eager op) against every peer
            (HF eager loop, HF grouped_mm, compiled HF grouped_mm). Target: within 10% of the best peer.

The floor of a cell counts the experts its routing actually touches (not the uniform expectation)
and the matmul rate of its dtype (fp32: IEEE, as torch.matmul and moe_ops run it by default).

    python benchmarks/bench_targets.py                          # all sections, benchmarks/results/
    python benchmarks/bench_targets.py --out "$OUT" --sections decode,skew --shapes qwen3-30b-a3b
    python benchmarks/bench_targets.py --dry-run                # CPU, tiny shapes, no speed
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from bench_layer import (
    DRY_RUN_SHAPES,
    REL_ERR_TOLERANCE,
    SHAPES,
    MoEShape,
    build_hf_blocks,
    copy_bytes_per_s,
    make_layer,
    matmul_flops_per_s,
    merge_csv,
    random_tokens,
    relative_error,
    slug,
    time_on_gpu,
    time_wall_clock,
)


def fresh_layer(impl: str, blocks, shape: MoEShape, mode: str | None = None):
    """bench_layer's make_layer after a dynamo reset: this script times one implementation at a time, so
    the previous one's graphs (and CUDA graph pools) are dropped before the next compiles."""
    torch._dynamo.reset()
    return make_layer(impl, blocks, shape, mode=mode)


SECTIONS = ("decode", "skew", "dtypes")
ZIPF_S = 1.2
SKEW_TOKENS = (512, 8192)
DECODE_LAYERS = 8
DISTINCT_LAYERS_MAX_BYTES = 30e9  # beyond this the decode chain repeats one block
DTYPE_TOKENS = (32, 2048)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# fp32 DeepSeek-V3 experts are 45 GB; the fp16 cells cover that shape.
DTYPE_SHAPES = {"fp16": ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"), "fp32": ("mixtral-8x7b", "qwen3-30b-a3b")}
PEERS = ("hf_eager", "hf_grouped_mm", "compile_hf_grouped_mm")
OURS = ("moe_ops_compile_hf_grouped_mm", "moe_ops")
TARGETS = {"decode": 2.0, "skew": 1.15, "dtypes": 1.10}

CSV_COLUMNS = (
    "section", "shape", "dtype", "routing", "T", "impl", "ms_p50", "ms_p20", "ms_p80", "floor_ms",
    "rel_err", "experts_touched", "hottest_expert_share", "gpu", "torch", "triton", "timestamp",
)  # fmt: skip
CSV_KEY = ("section", "shape", "dtype", "routing", "T", "impl")


PER_LAYER = f"_per_layer_of_{DECODE_LAYERS}"


class LayerStack(torch.nn.Module):
    """MoE blocks in sequence, each followed by a residual add and an RMSNorm (without the norm, the
    chain's values grow past bf16's range within a few layers)."""

    def __init__(self, blocks: list[torch.nn.Module]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.rms_norm(x + block(x), (x.shape[-1],))
        return x


def zipf_tokens(router_weight: torch.Tensor, num_tokens: int, top_k: int, s: float) -> torch.Tensor:
    """(1, T, H) tokens whose router logits are log p_e + Gumbel noise, p_e ~ 1 / rank^s over a random
    ranking of the experts: top-k of such logits draws k distinct experts from p (the Gumbel top-k
    trick). The tokens are the minimum-norm solution of x @ W.T = logits."""
    E = router_weight.shape[0]
    rank = torch.randperm(E, device=router_weight.device) + 1
    log_p = -s * rank.double().log()
    w = router_weight.double()
    to_x = torch.linalg.solve(w @ w.T, w)  # (E, H): logits @ to_x has logits as its router logits
    gumbel = -torch.empty(num_tokens, E, device=w.device, dtype=torch.float64).exponential_().log()
    x_TH = ((log_p - log_p.logsumexp(0) + gumbel) @ to_x).to(router_weight.dtype)
    # As random_tokens: redraw tokens whose rounded logits tie at the top-k cut.
    for _ in range(100):
        top = F.linear(x_TH, router_weight).float().topk(min(top_k + 1, E), dim=-1).values
        tied = top[:, top_k - 1] == top[:, top_k] if top_k < E else torch.zeros_like(top[:, 0], dtype=torch.bool)
        if not tied.any():
            break
        noise = -torch.empty(int(tied.sum()), E, device=w.device, dtype=torch.float64).exponential_().log()
        x_TH[tied] = ((log_p - log_p.logsumexp(0) + noise) @ to_x).to(router_weight.dtype)
    return x_TH.unsqueeze(0)


def routing_stats(block: torch.nn.Module, x: torch.Tensor, top_k: int) -> tuple[int, float]:
    """(experts touched, share of slots on the busiest expert) of the block's routing of x."""
    logits = F.linear(x.reshape(-1, x.shape[-1]), block.gate.weight).float()
    ids = logits.topk(top_k, dim=-1).indices.reshape(-1)
    counts = torch.bincount(ids, minlength=logits.shape[-1])
    return int((counts > 0).sum()), float(counts.max() / ids.numel())


class Ceilings:
    def __init__(self, device: torch.device, time_fn, dry_run: bool):
        self.device, self.time_fn = device, time_fn
        self.n = 512 if dry_run else 8192
        self.copy = copy_bytes_per_s(2**20 if dry_run else 2**29, device, time_fn)
        self._matmul: dict[torch.dtype, float] = {}

    def matmul(self, dtype: torch.dtype) -> float:
        if dtype not in self._matmul:
            self._matmul[dtype] = matmul_flops_per_s(self.n, self.device, self.time_fn, dtype)
        return self._matmul[dtype]

    def floor_ms(self, shape: MoEShape, T: int, touched: int, dtype: torch.dtype) -> float:
        H, F_, size = shape.hidden, shape.intermediate, dtype.itemsize
        bytes_moved = (touched * 3 * H * F_ + 2 * T * H) * size
        flops = 2 * T * shape.top_k * 3 * H * F_
        return 1e3 * max(bytes_moved / self.copy, flops / self.matmul(dtype))


class Bench:
    def __init__(self, args, device, time_fn, run_info, out_dir):
        self.device, self.time_fn, self.run_info, self.out_dir = device, time_fn, run_info, out_dir
        self.ceilings = Ceilings(device, time_fn, args.dry_run)
        self.rows: list[dict] = []
        self.mismatches: list[str] = []

    def cell(self, section, shape, dtype_name, routing, T, impl, layer, x, expected, blocks, layers=1):
        """Check, time and record one cell; ``layers``: blocks in ``layer``, times are per block. A
        chain of blocks is not held to the tolerance: one bf16 rounding that flips a top-k choice in
        one layer changes every later layer's input (the compiled HF peer differs from eager by 0.4-0.6
        after 8 layers), so only single-block cells check correctness."""
        actual = layer(x)
        if not torch.isfinite(actual).all():
            raise RuntimeError(f"{section} {shape.name} {dtype_name} T={T} {impl}: non-finite output")
        rel_err = relative_error(actual, expected)
        p50, p20, p80 = (t / layers for t in self.time_fn(lambda: layer(x)))
        touched, hottest = routing_stats(blocks["hf_eager"], x, shape.top_k)
        floor = self.ceilings.floor_ms(shape, T, touched, DTYPES[dtype_name])
        tolerance = REL_ERR_TOLERANCE if dtype_name == "bf16" else 5e-3
        flag = ""
        if rel_err > tolerance and layers == 1:
            flag = f"  <-- disagrees with hf_eager (> {tolerance:g})"
            self.mismatches.append(f"{section} {shape.name} {dtype_name} {routing} T={T} {impl}: {rel_err:.2e}")
        print(f"{section:<7} {shape.name:<14} {dtype_name} {routing:<7} T={T:<5} {impl:<30} {p50:9.4f} ms "
              f"floor {floor:.4f}  rel err {rel_err:.1e}{flag}", flush=True)
        self.rows.append({
            "section": section, "shape": shape.name, "dtype": dtype_name, "routing": routing, "T": T,
            "impl": impl, "ms_p50": f"{p50:.4f}", "ms_p20": f"{p20:.4f}", "ms_p80": f"{p80:.4f}",
            "floor_ms": f"{floor:.4f}", "rel_err": f"{rel_err:.2e}", "experts_touched": touched,
            "hottest_expert_share": f"{hottest:.4f}", **self.run_info,
        })  # fmt: skip

    def decode(self, shape: MoEShape) -> None:
        blocks = build_hf_blocks(shape, self.device)
        x = random_tokens(blocks["hf_eager"].gate.weight, 1, shape.top_k)
        expert_bytes = 3 * shape.num_experts * shape.hidden * shape.intermediate * 2
        if DECODE_LAYERS * expert_bytes <= DISTINCT_LAYERS_MAX_BYTES:
            layer_sets = [blocks] + [build_hf_blocks(shape, self.device) for _ in range(DECODE_LAYERS - 1)]
        else:
            layer_sets = [blocks] * DECODE_LAYERS
        stacks = {name: LayerStack([layer[name] for layer in layer_sets]) for name in blocks}
        for impl in ("compile_hf_grouped_mm", "moe_ops_compile_hf_grouped_mm"):
            layer = fresh_layer(impl, blocks, shape, mode="reduce-overhead")
            self.cell("decode", shape, "bf16", "uniform", 1, impl, layer, x, blocks["hf_eager"](x), blocks)
            stack = fresh_layer(impl, stacks, shape, mode="reduce-overhead")
            self.cell("decode", shape, "bf16", "uniform", 1, f"{impl}{PER_LAYER}", stack, x,
                      stacks["hf_eager"](x), blocks, layers=DECODE_LAYERS)
        del blocks, stacks, layer_sets

    def skew(self, shape: MoEShape, tokens) -> None:
        blocks = build_hf_blocks(shape, self.device)
        router = blocks["hf_eager"].gate.weight
        inputs = {
            (T, routing): (random_tokens(router, T, shape.top_k) if routing == "uniform"
                           else zipf_tokens(router, T, shape.top_k, ZIPF_S))
            for T in tokens for routing in ("uniform", "zipf")
        }  # fmt: skip
        expected = {key: blocks["hf_eager"](x) for key, x in inputs.items()}
        for impl in ("compile_hf_grouped_mm", *OURS):
            layer = fresh_layer(impl, blocks, shape)
            for (T, routing), x in inputs.items():
                self.cell("skew", shape, "bf16", routing, T, impl, layer, x, expected[T, routing], blocks)
        del blocks

    def dtypes(self, shape: MoEShape, dtype_name: str, tokens) -> None:
        blocks = build_hf_blocks(shape, self.device, DTYPES[dtype_name])
        inputs = {T: random_tokens(blocks["hf_eager"].gate.weight, T, shape.top_k) for T in tokens}
        expected = {T: blocks["hf_eager"](x) for T, x in inputs.items()}
        for impl in (*PEERS, *OURS):
            layer = fresh_layer(impl, blocks, shape)
            for T, x in inputs.items():
                self.cell("dtypes", shape, dtype_name, "uniform", T, impl, layer, x, expected[T], blocks)
        del blocks

    def write(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        csv_path = self.out_dir / f"targets_{slug(self.run_info['gpu'])}.csv"
        rows = merge_csv(csv_path, self.rows, CSV_COLUMNS, CSV_KEY)
        csv_path.with_suffix(".md").write_text(markdown_report(rows))
        return csv_path


def _ms(rows, **key) -> float | None:
    found = [r for r in rows if all(str(r[k]) == str(v) for k, v in key.items())]
    return float(found[0]["ms_p50"]) if found else None


def markdown_report(rows: list[dict]) -> str:
    def distinct(column):
        return ", ".join(sorted({r[column] for r in rows}))

    lines = ["# MoE layer speed targets (benchmarks/bench_targets.py)", "",
             f"- GPU: {distinct('gpu')}", f"- torch {distinct('torch')}, triton {distinct('triton')}",
             f"- runs: {distinct('timestamp')}",
             "- transformers' MixtralSparseMoeBlock at each shape, weights ~N(0, 0.02), random inputs;"
             " `triton.testing.do_bench` p50 in ms; floor from the experts the cell's routing touches"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    decode = [r for r in rows if r["section"] == "decode"]
    if decode:
        lines += ["", "## Decode (T = 1) under CUDA graphs, bf16: target moe_ops <= 2x floor per layer", "",
                  f"ms per layer: one block per call (host cost included), and per layer of a graph of "
                  f"{DECODE_LAYERS} blocks.", "",
                  "| shape | floor | compile(HF grouped_mm), per call | + moe_ops, per call | "
                  f"compile(HF grouped_mm), {DECODE_LAYERS}-layer graph | + moe_ops, {DECODE_LAYERS}-layer graph | "
                  "moe_ops / floor | met |", "|---|---|---|---|---|---|---|---|"]
        for name in shapes:
            impls = [f"{impl}{suffix}" for suffix in ("", PER_LAYER)
                     for impl in ("compile_hf_grouped_mm", "moe_ops_compile_hf_grouped_mm")]
            ms = {impl: _ms(decode, shape=name, impl=impl) for impl in impls}
            floor = next((float(r["floor_ms"]) for r in decode if r["shape"] == name), None)
            ours = ms[f"moe_ops_compile_hf_grouped_mm{PER_LAYER}"]
            if ours and floor:
                ratio = ours / floor
                cells = " | ".join(f"{v:.4f}" if v else "" for v in ms.values())
                lines.append(f"| {name} | {floor:.4f} | {cells} | {ratio:.2f} | "
                             f"{'yes' if ratio <= TARGETS['decode'] else 'no'} |")
    skew = [r for r in rows if r["section"] == "skew"]
    if skew:
        lines += ["", f"## Skewed routing, bf16: Zipf(s = {ZIPF_S}) over experts against uniform; target "
                  "moe_ops zipf / uniform <= 1.15", "",
                  "| shape | T | impl | uniform ms | zipf ms | zipf / uniform | experts touched (uniform, zipf) | "
                  "busiest expert's share of slots (zipf) | met |", "|---|---|---|---|---|---|---|---|---|"]
        for name in shapes:
            for T in sorted({int(r["T"]) for r in skew if r["shape"] == name}):
                for impl in ("compile_hf_grouped_mm", *OURS):
                    cells = {r["routing"]: r for r in skew if r["shape"] == name and int(r["T"]) == T
                             and r["impl"] == impl}
                    if len(cells) < 2:
                        continue
                    u, z = float(cells["uniform"]["ms_p50"]), float(cells["zipf"]["ms_p50"])
                    met = ("yes" if z / u <= TARGETS["skew"] else "no") if impl in OURS else ""
                    lines.append(
                        f"| {name} | {T} | {impl} | {u:.4f} | {z:.4f} | {z / u:.2f} | "
                        f"{cells['uniform']['experts_touched']}, {cells['zipf']['experts_touched']} | "
                        f"{float(cells['zipf']['hottest_expert_share']):.3f} | {met} |"
                    )
    dtyped = [r for r in rows if r["section"] == "dtypes"]
    if dtyped:
        lines += ["", "## fp16 and fp32: target moe_ops within 10% of the best peer", "",
                  "| shape | dtype | T | HF eager loop | HF grouped_mm | compile(HF grouped_mm) | best peer | "
                  "compile + moe_ops | moe_ops eager op | compile + moe_ops / best peer | met |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in shapes:
            for dtype_name in ("fp16", "fp32"):
                for T in sorted({int(r["T"]) for r in dtyped if r["shape"] == name and r["dtype"] == dtype_name}):
                    ms = {impl: _ms(dtyped, shape=name, dtype=dtype_name, T=T, impl=impl) for impl in (*PEERS, *OURS)}
                    peers = [v for k, v in ms.items() if k in PEERS and v]
                    if not peers or not ms[OURS[0]]:
                        continue
                    best = min(peers)
                    ratio = ms[OURS[0]] / best
                    cells = " | ".join(f"{ms[i]:.4f}" if ms[i] else "" for i in PEERS)
                    eager_op = f"{ms['moe_ops']:.4f}" if ms["moe_ops"] else ""
                    lines.append(f"| {name} | {dtype_name} | {T} | {cells} | {best:.4f} | {ms[OURS[0]]:.4f} | "
                                 f"{eager_op} | {ratio:.2f} | {'yes' if ratio <= TARGETS['dtypes'] else 'no'} |")
    judged = [line for line in lines if line.startswith("| ") and line.endswith(("| yes |", "| no |"))]
    if judged:
        met = sum(line.endswith("| yes |") for line in judged)
        lines += ["", "## Summary", "", f"{met} of {len(judged)} judged rows meet their targets."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--shapes", help="comma-separated subset of the shapes")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, wall-clock timer")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := [s for s in sections if s not in SECTIONS]:
        raise SystemExit(f"--sections: unknown {unknown}; known: {SECTIONS}")
    known = DRY_RUN_SHAPES if args.dry_run else SHAPES
    names = args.shapes.split(",") if args.shapes else list(known)
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"--shapes: unknown {unknown}; known: {list(known)}")
    if args.dry_run:
        device, time_fn, gpu = torch.device("cpu"), time_wall_clock, "cpu-dry-run"
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_targets_"))
        skew_tokens, dtype_tokens = (48, 96), (5, 48)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_targets.py needs a CUDA GPU (or --dry-run)")
        device, time_fn, gpu = torch.device("cuda"), time_on_gpu, torch.cuda.get_device_name()
        out_dir = args.out or Path(__file__).parent / "results"
        skew_tokens, dtype_tokens = SKEW_TOKENS, DTYPE_TOKENS
    run_info = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    print(f"{gpu}: torch {run_info['torch']}, triton {run_info['triton']}")
    torch.manual_seed(0)
    with torch.inference_mode():
        bench = Bench(args, device, time_fn, run_info, out_dir)
        for name in names:
            shape = known[name]
            if "decode" in sections:
                bench.decode(shape)
            if "skew" in sections:
                bench.skew(shape, skew_tokens)
            if "dtypes" in sections:
                for dtype_name, dtype_shapes in DTYPE_SHAPES.items():
                    if args.dry_run or name in dtype_shapes:
                        bench.dtypes(shape, dtype_name, dtype_tokens)
            csv_path = bench.write()  # after every shape, so a crash keeps the rest
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(csv_path.with_suffix(".md").read_text())
    if bench.mismatches:
        print(f"WARNING: {len(bench.mismatches)} cells disagree with hf_eager:\n  " + "\n  ".join(bench.mismatches))
    print(f"results: {csv_path} and {csv_path.with_suffix('.md')}; median of floor/measured over cells: "
          f"{statistics.median(float(r['floor_ms']) / float(r['ms_p50']) for r in bench.rows):.3f}")


if __name__ == "__main__":
    main()
