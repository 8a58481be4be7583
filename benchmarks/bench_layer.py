"""One Mixture-of-Experts layer on one GPU: transformers' implementations against moe_ops, and a floor.

Every layer is transformers' own ``MixtralSparseMoeBlock`` at a model's shape (router linear, softmax,
top-k, renormalise, gated SiLU experts), bf16, weights ~N(0, 0.02), random inputs. Implementations:

    hf_eager               experts_implementation="eager": a Python loop over the experts hit
    hf_grouped_mm          experts_implementation="grouped_mm": sort slots by expert, F.grouped_mm
    compile_hf_eager       torch.compile of hf_eager
    compile_hf_grouped_mm  torch.compile of hf_grouped_mm
    moe_ops                router linear + moe_ops.route + moe_ops.fused_experts, on the block's own weights
    moe_ops_compile_hf_grouped_mm
                           torch.compile of hf_grouped_mm with the moe_ops rewrites on (the peers above
                           compile with them off): the Inductor templates with their neighbours fused
    moe_ops_extern_compile_hf_grouped_mm
                           the same with moe_ops.config.inductor_templates off: the rewritten op is one
                           opaque extern call (the unfused variant)
    vllm_triton            vLLM's Triton fused-MoE kernel with its tuned config for the GPU, standalone, on the
                           block's own weights: timed where --vllm-source names vLLM's fused_moe.py (a file
                           outside this repository; benchmarks/peer_vllm.py says what runs around the kernel),
                           behind moe_ops' router (router linear + moe_ops.route, as the moe_ops row)

Floor of a cell = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both ceilings measured once per
run on the same GPU. Bytes = the expert weights touched (expected distinct experts under uniform
routing) plus the activations read and written; FLOPs = the three expert GEMMs of every slot.

    python benchmarks/bench_layer.py                      # all 18 cells, writes benchmarks/results/
    python benchmarks/bench_layer.py --impls all          # also compile_hf_eager (slow to compile)
    python benchmarks/bench_layer.py --out "$OUT" --shapes deepseek-v3 --tokens 1,128 --skip-hf-eager
    python benchmarks/bench_layer.py --dry-run            # CPU, tiny shapes: checks everything but speed
    python benchmarks/bench_layer.py --vllm-source ~/vllm/vllm/model_executor/layers/fused_moe/fused_moe.py
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import gc
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import moe_ops

DTYPE = torch.bfloat16
INIT_STD = 0.02
# Beyond this max|error| / max|hf_eager| an implementation is reported as disagreeing (bf16 tolerance,
# as in tests/conftest.py).
REL_ERR_TOLERANCE = 2e-2

# transformers' version checks are lru_cache-wrapped; dynamo says once per function that it traces
# through the cache, which is harmless here and would bury the tables.
warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
# Each implementation compiles its own code object and switches moe_ops.config around its own calls: the
# warning that functions compiled before a change keep their graphs is what the table relies on.
warnings.filterwarnings("ignore", message="moe_ops.config")


@dataclasses.dataclass(frozen=True)
class MoEShape:
    name: str
    num_experts: int  # E
    top_k: int  # K
    hidden: int  # H
    intermediate: int  # F, per expert


SHAPES = {
    s.name: s
    for s in (
        MoEShape("mixtral-8x7b", 8, 2, 4096, 14336),
        MoEShape("qwen3-30b-a3b", 128, 8, 2048, 768),
        MoEShape("deepseek-v3", 256, 8, 7168, 2048),
    )
}
TOKENS = (1, 32, 128, 512, 2048, 8192)

# --dry-run: small enough for the CPU, still covering T = 1 (static graph), a recompile to dynamic T,
# and a second shape (fresh modules after a dynamo reset).
DRY_RUN_SHAPES = {
    s.name: s for s in (MoEShape("tiny-mixtral", 8, 2, 64, 128), MoEShape("tiny-deepseek", 32, 4, 96, 32))
}
DRY_RUN_TOKENS = (1, 5, 48)

IMPLS = (
    "hf_eager", "hf_grouped_mm", "compile_hf_eager", "compile_hf_grouped_mm", "moe_ops",
    "moe_ops_compile_hf_grouped_mm", "moe_ops_extern_compile_hf_grouped_mm", "vllm_triton",
)
HF_EAGER_IMPLS = ("hf_eager", "compile_hf_eager")
# torch.compile of the eager loop graph-breaks at every expert (data-dependent nonzero) and compiles
# for minutes at DeepSeek-V3's 256 experts; it is timed only when asked for.
# vLLM's kernel needs a vLLM source file (--vllm-source), which adds it.
DEFAULT_IMPLS = tuple(impl for impl in IMPLS if impl not in ("compile_hf_eager", "vllm_triton"))
IMPL_LABELS = {
    "hf_eager": "HF eager loop",
    "hf_grouped_mm": "HF grouped_mm",
    "compile_hf_eager": "torch.compile(HF eager loop)",
    "compile_hf_grouped_mm": "torch.compile(HF grouped_mm)",
    "moe_ops": "moe_ops (eager op)",
    "moe_ops_compile_hf_grouped_mm": "torch.compile(HF grouped_mm) + moe_ops",
    "moe_ops_extern_compile_hf_grouped_mm": "torch.compile(HF grouped_mm) + moe_ops, templates off",
    "vllm_triton": "vLLM fused_moe (Triton)",
}

CSV_COLUMNS = (
    "shape", "E", "K", "H", "F", "T", "impl", "ms_p50", "ms_p20", "ms_p80", "ms_rounds", "floor_ms",
    "floor_over_measured", "gpu", "torch", "triton", "transformers", "timestamp",
)  # fmt: skip
CSV_KEY = ("shape", "T", "impl")
INTERLEAVED_SINCE = "2026-11-24T06:00:00Z"  # runs from here on time each T in interleaved rounds


@dataclasses.dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # bytes read + written by a large device copy
    matmul_flops_per_s: float  # 8192^3 bf16 matmul (512^3 in --dry-run)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    shape: MoEShape
    impl: str
    num_tokens: int


@dataclasses.dataclass(frozen=True)
class ExperimentResult:
    config: ExperimentConfig
    ms_p50: float
    ms_p20: float
    ms_p80: float
    rel_err: float  # max |out - hf_eager out| / max |hf_eager out|, same input
    round_medians: tuple[float, ...] = ()  # each timing round's median, in round order


@dataclasses.dataclass(frozen=True)
class RunInfo:
    gpu: str
    torch: str
    triton: str
    transformers: str
    timestamp: str


# ---- Timing ----------------------------------------------------------------------------------------


def _percentiles(times_ms: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80), interpolated linearly, as do_bench's own quantiles."""
    q = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    p20, p50, p80 = torch.tensor(times_ms, dtype=torch.float64).quantile(q).tolist()
    return p50, p20, p80


MIN_SAMPLES = 10


def gpu_samples(fn: Callable[[], object], grad_to_none=None) -> list[float]:
    """One do_bench run's times in ms (L2 flushed between calls), at least MIN_SAMPLES of them: do_bench
    repeats a call for about ``rep`` ms, which is one call of a 100 ms training step, so a slow call is run
    again with ``rep`` stretched to MIN_SAMPLES of its first run's median. ``grad_to_none``: tensors whose
    .grad do_bench resets between calls, untimed (training steps)."""
    def run(rep_ms: float) -> list[float]:
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="all", grad_to_none=grad_to_none)

    samples = run(200)
    if len(samples) < MIN_SAMPLES:
        samples = run(1.1 * MIN_SAMPLES * statistics.median(samples))
    return samples


def time_on_gpu(fn: Callable[[], object], grad_to_none=None) -> tuple[float, float, float]:
    """(p50, p20, p80) in ms of one do_bench run; its p50 is do_bench's "median"."""
    return _percentiles(gpu_samples(fn, grad_to_none))


def wall_clock_samples(fn: Callable[[], object]) -> list[float]:
    """--dry-run stand-in for do_bench (which needs a GPU driver): CPU wall clock, ms."""
    fn()
    times_ms = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - start) * 1e3)
    return times_ms


def time_wall_clock(fn: Callable[[], object]) -> tuple[float, float, float]:
    return _percentiles(wall_clock_samples(fn))


def copy_bytes_per_s(numel: int, device: torch.device, time_fn) -> float:
    src = torch.randn(numel, device=device, dtype=DTYPE)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (time_fn(lambda: dst.copy_(src))[0] * 1e-3)


def matmul_flops_per_s(n: int, device: torch.device, time_fn, dtype: torch.dtype = DTYPE) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (time_fn(lambda: torch.mm(a, b, out=c))[0] * 1e-3)


def measure_ceilings(device: torch.device, time_fn, *, dry_run: bool) -> Ceilings:
    if dry_run:
        return Ceilings(copy_bytes_per_s(2**20, device, time_fn), matmul_flops_per_s(512, device, time_fn))
    # 1 GiB of bf16, far past L2.
    return Ceilings(copy_bytes_per_s(2**29, device, time_fn), matmul_flops_per_s(8192, device, time_fn))


def floor_ms(shape: MoEShape, num_tokens: int, ceilings: Ceilings) -> float:
    E, K, H, F_ = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    # A token picks K distinct experts, so an expert is missed by one token with probability 1 - K/E
    # (exactly K experts at T = 1, unlike the with-replacement 1 - (1 - 1/E)^(T*K)).
    experts_touched = E * (1 - (1 - K / E) ** num_tokens)
    bytes_moved = (experts_touched * 3 * H * F_ + num_tokens * H * 2) * DTYPE.itemsize
    flops = 2 * num_tokens * K * 3 * H * F_
    return 1e3 * max(bytes_moved / ceilings.copy_bytes_per_s, flops / ceilings.matmul_flops_per_s)


# ---- The layer, four ways --------------------------------------------------------------------------


def build_hf_blocks(shape: MoEShape, device: torch.device, dtype: torch.dtype = DTYPE) -> dict[str, torch.nn.Module]:
    """HF blocks for experts_implementation "eager" and "grouped_mm", sharing one set of weights."""
    # Imported here so that --help works without the [bench] extra.
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    blocks = {}
    for impl, experts_implementation in (("hf_eager", "eager"), ("hf_grouped_mm", "grouped_mm")):
        # The experts module reads config._experts_implementation at every call: one config per block.
        config = MixtralConfig(
            num_local_experts=shape.num_experts,
            num_experts_per_tok=shape.top_k,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            experts_implementation=experts_implementation,
        )
        # Built on the meta device: DeepSeek-V3's experts are 22.5 GB in bf16, too big to build in fp32.
        with torch.device("meta"):
            blocks[impl] = MixtralSparseMoeBlock(config).to(dtype).eval().requires_grad_(False)

    weights = blocks["hf_eager"].to_empty(device=device)
    for param in weights.parameters():
        param.normal_(0.0, INIT_STD)
    blocks["hf_grouped_mm"].load_state_dict(weights.state_dict(), assign=True)
    return blocks


def moe_ops_layer(block: torch.nn.Module, top_k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The HF block's work through moe_ops: router linear + route + fused experts, same weight tensors."""
    router_weight = block.gate.weight  # (E, H)
    w_gate_up = block.experts.gate_up_proj  # (E, 2F, H), gate rows then up rows
    w_down = block.experts.down_proj  # (E, H, F)

    def layer(x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        x_TH = x.view(-1, hidden)
        topk_weights, topk_ids = moe_ops.route(F.linear(x_TH, router_weight), top_k, renormalize=True)
        out_TH = moe_ops.fused_experts(x_TH, topk_weights, topk_ids, w_gate_up, w_down)
        return out_TH.view(batch, seq, hidden)

    return layer


def vllm_layer(block: torch.nn.Module, top_k: int, source: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The HF block's work through vLLM's kernel (benchmarks/peer_vllm.py) behind moe_ops' router, same weights."""
    import peer_vllm

    experts = peer_vllm.VllmFusedMoE(
        peer_vllm.load_kernel(source), block.experts.gate_up_proj, block.experts.down_proj,
        configs=Path(source).parent / "configs", device_name=torch.cuda.get_device_name(),
    )
    print(f"vllm_triton: {experts.config_source}")
    router_weight = block.gate.weight

    def layer(x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        x_TH = x.view(-1, hidden)
        topk_weights, topk_ids = moe_ops.route(F.linear(x_TH, router_weight), top_k, renormalize=True)
        return experts(x_TH, topk_weights, topk_ids).view(batch, seq, hidden)

    return layer


def random_tokens(router_weight: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """(1, T, H) random tokens whose router logits never tie at the top-k boundary.

    A tie there is broken differently by different top-k implementations (moe_ops: lower expert
    index; torch.topk on the CPU: not promised), which picks another expert and shows up as a large
    error that says nothing about the experts. bf16 logits tie often enough to hit most cells.
    """
    x_TH = torch.randn(num_tokens, router_weight.shape[1], device=router_weight.device, dtype=router_weight.dtype)
    while top_k < router_weight.shape[0]:
        top_values = F.linear(x_TH, router_weight).float().topk(top_k + 1, dim=-1).values
        tied = top_values[:, top_k - 1] == top_values[:, top_k]
        if not tied.any():
            break
        x_TH[tied] = torch.randn_like(x_TH[tied])
    return x_TH.unsqueeze(0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor, chunk_elements: int = 1 << 28) -> float:
    """max |actual - expected| / max |expected|, in fp32 over chunks of the flattened tensors (a whole
    fp32 copy of DeepSeek-V3's expert gradients would not fit beside the benchmark's tensors)."""
    actual, expected = actual.reshape(-1), expected.reshape(-1)
    error = scale = torch.zeros((), device=expected.device)
    for start in range(0, expected.numel(), chunk_elements):
        a, e = actual[start:start + chunk_elements].float(), expected[start:start + chunk_elements].float()
        error, scale = torch.maximum(error, (a - e).abs().max()), torch.maximum(scale, e.abs().max())
    return (error / scale.clamp_min(1e-6)).item()


# ---- Experiments -----------------------------------------------------------------------------------


def own_code_object(block: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``block(x)`` as a function with a code object of its own. Dynamo keeps compiled graphs on the code
    object it compiles: two blocks run MixtralSparseMoeBlock.forward, and one block is compiled both with
    and without the moe_ops rewrites, so each compiled layer gets its own entry point and cache (without
    it, the eager-loop block's entries, which graph-break before the experts, would serve the grouped_mm
    block, and a dynamo reset between implementations would keep them from being timed side by side)."""
    namespace = {}
    exec("def forward(x):\n    return block(x)\n", {"block": block}, namespace)  # noqa: S102
    return namespace["forward"]


def make_layer(impl: str, blocks: dict[str, torch.nn.Module], shape: MoEShape, mode: str | None = None,
               vllm_source: Path | None = None) -> Callable:
    """``mode`` is torch.compile's (bench_targets.py times decode with "reduce-overhead"); ``vllm_source``
    vLLM's fused_moe.py, for vllm_triton."""
    if impl == "moe_ops":
        return moe_ops_layer(blocks["hf_eager"], shape.top_k)
    if impl == "vllm_triton":
        return vllm_layer(blocks["hf_eager"], shape.top_k, vllm_source)
    if "compile_" in impl:
        compiled = torch.compile(own_code_object(blocks[impl.split("compile_", 1)[1]]), mode=mode)
        if impl == "moe_ops_compile_hf_grouped_mm":
            return compiled
        if impl == "moe_ops_extern_compile_hf_grouped_mm":
            def extern_op(x: torch.Tensor) -> torch.Tensor:
                moe_ops.config.inductor_templates = False
                try:
                    return compiled(x)
                finally:
                    moe_ops.config.inductor_templates = True

            return extern_op
        # The peers: importing moe_ops turned its rewrites on, and compiles (one per new T) read the
        # switch, so every call of a peer runs with the rewrites off.
        def without_rewrites(x: torch.Tensor) -> torch.Tensor:
            with moe_ops.rewrites_disabled():
                return compiled(x)

        return without_rewrites
    return blocks[impl]


def checked_error(config: ExperimentConfig, layer: Callable, x: torch.Tensor, expected: torch.Tensor) -> float:
    """The layer's first call at this T (a compiled layer compiles here), checked against the reference."""
    actual = layer(x)
    if not torch.isfinite(actual).all():  # also synchronises, so an asynchronous CUDA error stops here
        raise RuntimeError(
            f"{config.shape.name} T={config.num_tokens}: {config.impl} returned non-finite values"
        )
    return relative_error(actual, expected)


def run_shape(
    shape: MoEShape,
    tokens: list[int],
    impls: list[str],
    device: torch.device,
    samples_fn,
    rounds: int,
    ceilings: Ceilings,
    run_info: RunInfo,
    out_dir: Path,
    mismatches: list[str],
    vllm_source: Path | None = None,
) -> None:
    """Every implementation first sees the token counts in order, as a model's first calls would (a
    compiled one: a static graph at the first T, then one dynamic-T graph), and is checked; then each T
    is timed in ``rounds`` rounds, implementations in alternating order, and a cell's percentiles are
    over all its rounds' samples. Interleaving spreads the GPU's state (a prefill cell runs at the
    power cap, where clocks drift with temperature) over all implementations alike."""
    blocks = build_hf_blocks(shape, device)
    inputs = {t: random_tokens(blocks["hf_eager"].gate.weight, t, shape.top_k) for t in tokens}
    # hf_eager gives the reference output, even when --skip-hf-eager leaves it untimed.
    expected = {t: blocks["hf_eager"](x) for t, x in inputs.items()}

    layers, rel_errs = {}, {}
    for impl in impls:
        layers[impl] = make_layer(impl, blocks, shape, vllm_source=vllm_source)
        for T in tokens:
            rel_errs[impl, T] = checked_error(ExperimentConfig(shape, impl, T), layers[impl], inputs[T], expected[T])

    rows = []
    for T in tokens:
        rounds_of = {impl: [] for impl in impls}
        for round_index in range(rounds):
            for impl in impls if round_index % 2 == 0 else impls[::-1]:
                rounds_of[impl].append(samples_fn(functools.partial(layers[impl], inputs[T])))
        for impl in impls:
            pooled = [t for samples in rounds_of[impl] for t in samples]
            result = ExperimentResult(ExperimentConfig(shape, impl, T), *_percentiles(pooled), rel_errs[impl, T],
                                      tuple(statistics.median(samples) for samples in rounds_of[impl]))
            rows.append(_reported(result, shape, ceilings, run_info, mismatches))
    print_shape_table(shape, rows)
    write_results(out_dir, run_info.gpu, rows, ceilings)


def _reported(result: ExperimentResult, shape: MoEShape, ceilings: Ceilings, run_info: RunInfo,
              mismatches: list[str]) -> dict:
    """Print a cell's line (flagging a disagreement with hf_eager) and return its CSV row."""
    config, T = result.config, result.config.num_tokens
    floor = floor_ms(shape, T, ceilings)
    flag = ""
    if result.rel_err > REL_ERR_TOLERANCE:
        flag = f"  <-- disagrees with hf_eager (> {REL_ERR_TOLERANCE:g})"
        mismatches.append(f"{shape.name} T={T} {config.impl}: {result.rel_err:.2e}")
    print(
        f"{shape.name:<14} T={T:<5} {config.impl:<30} {result.ms_p50:9.3f} ms"
        f"  floor/measured {floor / result.ms_p50:5.3f}  rel err vs hf_eager {result.rel_err:.1e}{flag}"
    )
    return result_row(result, floor, run_info)


# ---- Results ---------------------------------------------------------------------------------------


def result_row(result: ExperimentResult, floor: float, run_info: RunInfo) -> dict:
    shape = result.config.shape
    return {
        "shape": shape.name, "E": shape.num_experts, "K": shape.top_k, "H": shape.hidden,
        "F": shape.intermediate, "T": result.config.num_tokens, "impl": result.config.impl,
        "ms_p50": f"{result.ms_p50:.4f}", "ms_p20": f"{result.ms_p20:.4f}", "ms_p80": f"{result.ms_p80:.4f}",
        "ms_rounds": " ".join(f"{ms:.4f}" for ms in result.round_medians),
        "floor_ms": f"{floor:.4f}", "floor_over_measured": f"{floor / result.ms_p50:.4f}",
        **dataclasses.asdict(run_info),
    }  # fmt: skip


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(out_dir: Path, gpu: str, rows: list[dict], ceilings: Ceilings) -> None:
    """Merge rows into layer_<gpu>.csv (a row replaces the one with the same shape, T and impl) and
    rewrite layer_<gpu>.md from the whole file. Called after every shape, so a crash keeps the rest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    all_rows = merge_csv(out_dir / f"layer_{slug(gpu)}.csv", rows, CSV_COLUMNS, CSV_KEY, _sort_key)
    (out_dir / f"layer_{slug(gpu)}.md").write_text(markdown_report(all_rows, ceilings))


def merge_csv(csv_path: Path, rows: list[dict], columns, key, sort_key=None) -> list[dict]:
    """Rewrite csv_path with its rows and ``rows``, a new row replacing the old one with the same
    ``key`` columns; returns the merged rows (as strings, as read back)."""
    def row_key(row):
        return tuple(str(row[c]) for c in key)

    merged = {}
    if csv_path.exists():
        with csv_path.open(newline="") as f:
            merged = {row_key(row): row for row in csv.DictReader(f)}
    merged.update({row_key(row): {c: str(row[c]) for c in columns} for row in rows})
    all_rows = sorted(merged.values(), key=sort_key) if sort_key else list(merged.values())
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(all_rows)
    return all_rows


def _sort_key(row: dict):
    shape_order = list(SHAPES) + list(DRY_RUN_SHAPES)
    shape_rank = shape_order.index(row["shape"]) if row["shape"] in shape_order else len(shape_order)
    return shape_rank, row["shape"], int(row["T"]), IMPLS.index(row["impl"])


def _table(shape_rows: list[dict], column: str, floor_row: bool) -> list[str]:
    """impl x T markdown table of one column, three decimals."""
    tokens = sorted({int(r["T"]) for r in shape_rows})
    by_cell = {(r["impl"], int(r["T"])): r for r in shape_rows}
    lines = ["| impl | " + " | ".join(f"T={t}" for t in tokens) + " |", "|---" * (len(tokens) + 1) + "|"]
    for impl in IMPLS:
        if any((impl, t) in by_cell for t in tokens):
            cells = [f"{float(by_cell[impl, t][column]):.3f}" if (impl, t) in by_cell else "" for t in tokens]
            lines.append(f"| {IMPL_LABELS[impl]} | " + " | ".join(cells) + " |")
    if floor_row:
        floors = {int(r["T"]): float(r["floor_ms"]) for r in shape_rows}
        lines.append("| floor | " + " | ".join(f"{floors[t]:.3f}" for t in tokens) + " |")
    return lines


def summary_lines(rows: list[dict]) -> list[str]:
    p50 = {(r["shape"], r["T"], r["impl"]): float(r["ms_p50"]) for r in rows}
    lines = []
    for impl in ("moe_ops", "moe_ops_compile_hf_grouped_mm", "moe_ops_extern_compile_hf_grouped_mm"):
        cells = sorted({(s, t) for s, t, i in p50 if i == impl and (s, t, "compile_hf_grouped_mm") in p50})
        if cells:
            ahead = sum(p50[s, t, impl] <= p50[s, t, "compile_hf_grouped_mm"] for s, t in cells)
            lines.append(
                f"{IMPL_LABELS[impl]} at or ahead of torch.compile(HF grouped_mm) in {ahead} of {len(cells)} cells"
            )
    lines += clear_of_rounds_lines(rows)
    peers = ("hf_eager", "compile_hf_eager", "hf_grouped_mm", "compile_hf_grouped_mm", "vllm_triton")
    impl = "moe_ops_compile_hf_grouped_mm"
    cells = sorted({(s, t) for s, t, i in p50 if i == impl}, key=lambda cell: (cell[0], int(cell[1])))
    best_peer = {cell: min((p50[(*cell, peer)] for peer in peers if (*cell, peer) in p50), default=None)
                 for cell in cells}
    behind = [f"{s} T={t}" for (s, t), best in best_peer.items() if best is not None and p50[s, t, impl] > best]
    if cells:
        lines.append(f"{IMPL_LABELS[impl]} at or ahead of the best peer (any of {', '.join(peers)} timed) in "
                     f"{len(cells) - len(behind)} of {len(cells)} cells" + (f"; behind in {', '.join(behind)}"
                                                                            if behind else ""))
    for impl in IMPLS:
        ratios = [float(r["floor_over_measured"]) for r in rows if r["impl"] == impl]
        if ratios:
            geomean = statistics.geometric_mean(ratios)
            lines.append(
                f"geometric mean of floor/measured, {IMPL_LABELS[impl]}: {geomean:.3f} ({len(ratios)} cells)"
            )
    return lines


def clear_of_rounds_lines(rows: list[dict]) -> list[str]:
    """Cells where every timing round of compile + moe_ops beat every round of compile(HF grouped_mm):
    a cell ahead at p50 but not clear of the rounds' spread is a tie on that machine (a prefill cell at
    the power cap drifts between rounds). Rows from runs before per-round medians were kept are left out."""
    rounds = {(r["shape"], r["T"], r["impl"]): [float(ms) for ms in r["ms_rounds"].split()]
              for r in rows if r.get("ms_rounds")}
    ours, peer = "moe_ops_compile_hf_grouped_mm", "compile_hf_grouped_mm"
    cells = sorted({(s, t) for s, t, i in rounds if i == ours and (s, t, peer) in rounds},
                   key=lambda cell: (cell[0], int(cell[1])))
    if not cells:
        return []
    unclear = [f"{s} T={t}" for s, t in cells if max(rounds[s, t, ours]) >= min(rounds[s, t, peer])]
    not_in = f"; not in {', '.join(unclear)}" if unclear else ""
    return [f"{IMPL_LABELS[ours]} ahead of torch.compile(HF grouped_mm) in every timing round in "
            f"{len(cells) - len(unclear)} of {len(cells)} cells{not_in}"]


def run_lines(rows: list[dict]) -> list[str]:
    """The report lines naming the GPU, the versions and the runs that the rows come from."""
    def distinct(column: str) -> str:
        return ", ".join(sorted({r[column] for r in rows if column in r}))

    return [
        f"- GPU: {distinct('gpu')}",
        f"- torch {distinct('torch')}, triton {distinct('triton')}, transformers {distinct('transformers')}",
        f"- runs: {distinct('timestamp')}",
    ]


def sweep_header(title: str, gpu: str, setup: str) -> list[str]:
    """A sweep report's first lines: its title, the GPU, the versions, the run's time and what was timed."""
    return [f"# {title}", "", f"- GPU: {gpu}", f"- torch {torch.__version__}, triton {triton.__version__}",
            f"- run: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}",
            f"- {setup}", ""]


def run_sweep(description: str, title: str, setup: str, sections: list[Callable[[], list[str]]], stem: str) -> None:
    """main() of a sweep script: parse --out, seed, write the report ``<stem>_<gpu>.md``: a header naming
    the GPU, the versions and the run, then each section's lines (GPU memory freed between sections). The
    report is written again after every section, so a run cut off by the device's time limit keeps the
    sections it finished."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    out_dir = parser.parse_args().out
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    lines = sweep_header(title, gpu, setup)
    out_dir.mkdir(parents=True, exist_ok=True)
    for section in sections:
        lines += section()
        (out_dir / f"{stem}_{slug(gpu)}.md").write_text("\n".join(lines) + "\n")
        torch.cuda.empty_cache()


def markdown_report(rows: list[dict], ceilings: Ceilings) -> str:
    lines = [
        "# MoE layer benchmark (benchmarks/bench_layer.py)",
        "",
        *run_lines(rows),
        f"- ceilings measured by the latest run: device copy {ceilings.copy_bytes_per_s / 1e12:.3f} TB/s"
        f" (read + write), bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.1f} TFLOP/s",
        "- bf16, transformers' MixtralSparseMoeBlock at each shape, weights ~N(0, 0.02), random inputs;"
        " `triton.testing.do_bench` p50 in ms of all a cell's samples: each T timed in rounds, the"
        " implementations in alternating order (each round's median in the CSV's ms_rounds)"
        + (" (rows of runs before 2026-11-24T06:00Z: one do_bench per cell, implementations one after another)"
           if any(r["timestamp"] < INTERLEAVED_SINCE for r in rows) else ""),
    ]
    for name in dict.fromkeys(r["shape"] for r in rows):
        shape_rows = [r for r in rows if r["shape"] == name]
        first = shape_rows[0]
        lines += ["", f"## {name} (E={first['E']}, K={first['K']}, H={first['H']}, F={first['F']})", ""]
        lines += ["ms (p50):", "", *_table(shape_rows, "ms_p50", floor_row=True), ""]
        lines += ["floor / measured:", "", *_table(shape_rows, "floor_over_measured", floor_row=False)]
    lines += ["", "## Summary", "", *(f"- {line}" for line in summary_lines(rows))]
    return "\n".join(lines) + "\n"


def print_shape_table(shape: MoEShape, rows: list[dict]) -> None:
    print(f"\n{shape.name}: ms (p50), with floor/measured in brackets")
    tokens = sorted({int(r["T"]) for r in rows})
    by_cell = {(r["impl"], int(r["T"])): r for r in rows}
    print(f"{'impl':<40}" + "".join(f"{f'T={t}':>18}" for t in tokens))
    for impl in IMPLS:
        if any((impl, t) in by_cell for t in tokens):
            cells = [by_cell.get((impl, t)) for t in tokens]
            print(
                f"{IMPL_LABELS[impl]:<40}"
                + "".join(
                    f"{float(c['ms_p50']):>9.3f} ({float(c['floor_over_measured']):.2f})"
                    if c
                    else f"{'':>18}"
                    for c in cells
                )
            )
    floors = {int(r["T"]): float(r["floor_ms"]) for r in rows}
    print((f"{'floor':<40}" + "".join(f"{floors[t]:>9.3f}{'':>9}" for t in tokens)).rstrip() + "\n")


# ---- Main ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default benchmarks/results; a temporary folder with --dry-run)",
    )
    parser.add_argument("--shapes", help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument(
        "--tokens", help=f"comma-separated token counts (default {','.join(map(str, TOKENS))})"
    )
    parser.add_argument(
        "--impls",
        help=f"comma-separated subset of {','.join(IMPLS)}, or 'all' (default: all but compile_hf_eager)",
    )
    parser.add_argument(
        "--skip-hf-eager",
        action="store_true",
        help="do not time the HF eager loop, compiled or not (slow at DeepSeek-V3 shapes); "
        "it still gives the reference output",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timing rounds per token count, implementations in alternating order (default 3)",
    )
    parser.add_argument(
        "--vllm-source",
        type=Path,
        help="vLLM's vllm/model_executor/layers/fused_moe/fused_moe.py (its configs/ folder beside it): adds "
        "vllm_triton, vLLM's Triton kernel, to the implementations timed (GPU only)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"on the CPU: shapes {','.join(DRY_RUN_SHAPES)}, tokens {','.join(map(str, DRY_RUN_TOKENS))}, "
        "wall-clock timer; checks everything except the speed",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    known_shapes = DRY_RUN_SHAPES if args.dry_run else SHAPES
    shape_names = args.shapes.split(",") if args.shapes else list(known_shapes)
    unknown = [name for name in shape_names if name not in known_shapes]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; known: {list(known_shapes)}")
    default_tokens = DRY_RUN_TOKENS if args.dry_run else TOKENS
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(default_tokens)
    chosen = IMPLS if args.impls == "all" else args.impls.split(",") if args.impls else DEFAULT_IMPLS
    unknown = [impl for impl in chosen if impl not in IMPLS]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; known: {list(IMPLS)}")
    if args.vllm_source:
        chosen = (*chosen, "vllm_triton")
        if args.dry_run:
            raise SystemExit("--vllm-source: vLLM's kernel is timed on the GPU only, not in --dry-run")
    elif "vllm_triton" in chosen:
        raise SystemExit("--impls vllm_triton needs --vllm-source (vLLM's fused_moe.py)")
    impls = [impl for impl in IMPLS if impl in chosen and not (args.skip_hf_eager and impl in HF_EAGER_IMPLS)]

    if args.dry_run:
        device, time_fn, samples_fn, gpu = torch.device("cpu"), time_wall_clock, wall_clock_samples, "cpu-dry-run"
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_layer_"))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_layer.py needs a CUDA GPU (or --dry-run)")
        device, time_fn, samples_fn, gpu = torch.device("cuda"), time_on_gpu, gpu_samples, torch.cuda.get_device_name()
        out_dir = args.out or Path(__file__).parent / "results"

    import transformers

    run_info = RunInfo(
        gpu=gpu,
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    torch.manual_seed(0)
    print(f"{gpu}: torch {run_info.torch}, triton {run_info.triton}, transformers {run_info.transformers}")

    with torch.inference_mode():
        ceilings = measure_ceilings(device, time_fn, dry_run=args.dry_run)
        print(
            f"ceilings: device copy {ceilings.copy_bytes_per_s / 1e12:.3f} TB/s (read + write), "
            f"bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.1f} TFLOP/s\n"
        )
        mismatches = []
        for name in shape_names:
            run_shape(
                known_shapes[name], tokens, impls, device, samples_fn, args.rounds, ceilings, run_info, out_dir,
                mismatches, args.vllm_source,
            )
            # Compiled graphs and dynamo's caches hold the previous shape's modules; drop them so the
            # next shape gets the GPU memory and fresh recompile budgets.
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    csv_path = out_dir / f"layer_{slug(gpu)}.csv"
    with csv_path.open(newline="") as f:
        all_rows = list(csv.DictReader(f))
    print("\n".join(summary_lines(all_rows)))
    if mismatches:
        print(f"WARNING: {len(mismatches)} cells disagree with hf_eager:\n  " + "\n  ".join(mismatches))
    print(f"results: {csv_path} and {csv_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
