"""Quantised expert weights: moe_ops.fused_experts over int8 / fp8 / int4 weights against bf16 and torchao.

For each shape and token count, the routed experts of one layer (random tokens routed to K random experts,
bf16 activations) timed with ``triton.testing.do_bench`` in ROUNDS interleaved rounds, each implementation
on the same inputs:

    moe_ops_bf16        moe_ops.fused_experts, bf16 weights
    moe_ops_int8        moe_ops.fused_experts, int8 weights, an fp32 scale per expert and output row
    moe_ops_fp8         the same with fp8 e4m3 weights
    moe_ops_int8_zp     int8 weights, an fp32 scale and zero point per expert and output row (asymmetric, as
                        torchao's Int8WeightOnlyConfig with MappingType.ASYMMETRIC stores them)
    moe_ops_int8_g128   int8 weights, a scale per group of 128 input features
    moe_ops_int4_g128   int4 weights packed two per byte, a scale and a zero point per group of 128
    moe_ops_fp8_w8a8    fp8 weights per row, the GEMMs' inputs quantised to fp8 per row on the fly
    moe_ops_fp8_b128_w8a8  fp8 weights in 128 x 128 tiles, inputs in fp8 per row and group of 128 (DeepSeek-V3)
    torchao_fp8_eager   transformers' grouped_mm experts module with torchao's Float8WeightOnlyConfig weights,
                        uncompiled (torchao's own weight-only path: it dequantises the weights every call)
    torchao_fp8_w8a8_eager  the same with Float8DynamicActivationFloat8WeightConfig(PerRow) weights (fp8 inputs,
                        torch's _scaled_grouped_mm; GPU only)
    vllm_bf16           vLLM's Triton fused-MoE kernel with its tuned config for the GPU (where --vllm-source names
                        vLLM's fused_moe.py, a file outside this repository; benchmarks/peer_vllm.py)
    vllm_fp8_w8a8       the same kernel with fp8 weights per row and fp8 inputs per token (vLLM's per-channel w8a8:
                        the scheme of moe_ops_fp8_w8a8)

Reported: the median ms, the speed-up over moe_ops_bf16, the weight bytes each call reads per ms (GB/s;
the experts a batch touches, once each) and the error of each quantised result against bf16 (SQNR, dB).
Targets of the quantised-experts issue: >= 1.8x bf16 at decode (T <= 16) for fp8 / int8, int4 >= 3.2x, no
more than 10% slower at large T. Results: benchmarks/results/quantised_<gpu>.md (GPU, torch, triton, torchao
versions).

    python benchmarks/bench_quantised.py                 # H100 / H200: Mixtral-8x7B and Qwen3-30B-A3B
    python benchmarks/bench_quantised.py --dry-run       # CPU, tiny shape, wall clock (the script's logic)
    python benchmarks/bench_quantised.py --vllm-source ~/vllm/vllm/model_executor/layers/fused_moe/fused_moe.py
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
from pathlib import Path

import torch
import triton
from bench_layer import DRY_RUN_SHAPES, SHAPES, MoEShape, slug, time_on_gpu, time_wall_clock

import moe_ops
from moe_ops.quantised import quantise_weight, sqnr_db

ROUNDS = 3
TOKENS = (1, 2, 4, 8, 16, 2048, 8192)
DRY_RUN_TOKENS = (1, 5)
GROUP = 128
DRY_RUN_GROUP = 16  # the dry run's tiny shape has fewer inputs than a group of 128
# Each scheme (names given the group size): the weights' form (moe_ops.quantised.quantise_weight), the bytes a
# stored weight takes (scales aside), and fused_experts' other options.
QUANTISED = {
    "int8": ("int8", 1.0, {}),
    "fp8": ("fp8", 1.0, {}),
    "int8_zp": ("int8_zp", 1.0, {}),
    "int8_g{group}": ("int8_g{group}", 1.0, {}),
    "int4_g{group}": ("int4_g{group}", 0.5, {}),
    "fp8_w8a8": ("fp8", 1.0, {"input_quantisation": "fp8_rowwise"}),
    "fp8_b{group}_w8a8": ("fp8_b{group}", 1.0, {"input_quantisation": "fp8_groupwise"}),
}
GPU_SHAPES = ("mixtral-8x7b", "qwen3-30b-a3b")
INT8_LEVELS = 255


def quantise_per_row_asymmetric(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` (E, N, K) as int8 values with an fp32 scale and zero point per row: each row's [min, max] onto
    [-128, 127], its zero point the value that stands for 0 (whole numbers, as torchao's asymmetric int8)."""
    low = w.float().amin(-1).clamp_max(0)
    high = w.float().amax(-1).clamp_min(0)
    scale = ((high - low) / INT8_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
    zero = (-128 - low / scale).round().clamp(-128, 127)
    values = (w.float() / scale[..., None] + zero[..., None]).round().clamp(-128, 127).to(torch.int8)
    return values, scale, zero


def quantised_weight(weight: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """moe_ops.quantised.quantise_weight's forms, and "int8_zp" (quantise_per_row_asymmetric)."""
    return quantise_per_row_asymmetric(weight) if form == "int8_zp" else quantise_weight(weight, form)


def torchao_experts(shape: MoEShape, w_gate_up: torch.Tensor, w_down: torch.Tensor, dynamic: bool = False):
    """transformers' grouped_mm experts module holding these weights, quantised by torchao (fp8 weight-only, or
    ``dynamic``: fp8 inputs too), or None where torchao or transformers is missing."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return None
    config = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
                            num_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
                            experts_implementation="grouped_mm")
    with torch.device("meta"):  # the router stays unallocated: only the experts run
        block = Qwen3MoeSparseMoeBlock(config)
    block.experts.gate_up_proj = torch.nn.Parameter(w_gate_up.clone(), requires_grad=False)
    block.experts.down_proj = torch.nn.Parameter(w_down.clone(), requires_grad=False)
    # The helper's names are the experts' within a block ("experts.gate_up_proj").
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if dynamic else Float8WeightOnlyConfig()
    quantize_(block, moe_ops.experts_quantization_config(config), filter_fn=None)
    if type(block.experts.gate_up_proj).__name__ != "Float8Tensor":
        raise RuntimeError("torchao left the experts unquantised")
    return block.experts


def vllm_experts(source: Path | None, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> dict:
    """vLLM's kernel over these weights, bf16 and fp8 w8a8 (benchmarks/peer_vllm.py), where ``source`` is given."""
    if source is None:
        return {}
    import peer_vllm

    kernel, configs = peer_vllm.load_kernel(source), Path(source).parent / "configs"
    experts = {f"vllm_{name}": peer_vllm.VllmFusedMoE(kernel, w_gate_up, w_down, fp8=fp8, configs=configs,
                                                      device_name=torch.cuda.get_device_name())
               for name, fp8 in (("bf16", False), ("fp8_w8a8", True))}
    for name, peer in experts.items():
        print(f"{name}: {peer.config_source}")
    return experts


VLLM_IMPLEMENTATIONS = ("vllm_bf16", "vllm_fp8_w8a8")
GPU_ONLY_IMPLEMENTATIONS = ("torchao_fp8_w8a8_eager", *VLLM_IMPLEMENTATIONS)


def implementation_names(group: int) -> list[str]:
    """Every implementation this benchmark can time (the docstring's), with the group size in the names."""
    return ["moe_ops_bf16", *(f"moe_ops_{scheme.format(group=group)}" for scheme in QUANTISED), "torchao_fp8_eager",
            *GPU_ONLY_IMPLEMENTATIONS]


def run_shape(shape: MoEShape, tokens, device, time_fn, group: int = GROUP,
              vllm_source: Path | None = None, impls: set[str] | None = None) -> list[str]:
    E, K, H, F = shape.num_experts, shape.top_k, shape.hidden, shape.intermediate
    torch.manual_seed(0)
    w_gate_up = (torch.randn(E, 2 * F, H, device=device) / H**0.5).to(torch.bfloat16)
    w_down = (torch.randn(E, H, F, device=device) / F**0.5).to(torch.bfloat16)
    weights = {"moe_ops_bf16": {"w_gate_up": w_gate_up, "w_down": w_down}}
    itemsizes = {"moe_ops_bf16": 2.0}
    wanted = (lambda name: True) if impls is None else impls.__contains__  # what to build: the rest costs seconds
    for scheme, (form, itemsize, options) in QUANTISED.items():
        name = f"moe_ops_{scheme.format(group=group)}"
        if not wanted(name):
            continue
        arguments = dict(options)
        for weight_name, weight in (("w_gate_up", w_gate_up), ("w_down", w_down)):
            values, scale, zero = quantised_weight(weight, form.format(group=group))
            arguments.update({weight_name: values, f"{weight_name}_scale": scale})
            if zero is not None:
                arguments[f"{weight_name}_zero"] = zero
        weights[name], itemsizes[name] = arguments, itemsize
    torchao = {"torchao_fp8_eager": torchao_experts(shape, w_gate_up, w_down) if wanted("torchao_fp8_eager") else None}
    if device.type == "cuda" and wanted("torchao_fp8_w8a8_eager"):  # torchao quantises inputs to fp8 only where an
        # fp8 GPU can multiply them
        torchao["torchao_fp8_w8a8_eager"] = torchao_experts(shape, w_gate_up, w_down, dynamic=True)
    vllm = {}
    if any(map(wanted, VLLM_IMPLEMENTATIONS)):
        vllm = {name: experts for name, experts in vllm_experts(vllm_source, w_gate_up, w_down).items() if wanted(name)}
    lines = []
    for t in tokens:
        x = torch.randn(t, H, device=device, dtype=torch.bfloat16)
        ids = torch.rand(t, E, device=device).argsort(-1)[:, :K]
        routing = torch.rand(t, K, device=device).softmax(-1).to(torch.bfloat16)
        calls = {name: functools.partial(moe_ops.fused_experts, x, routing, ids, **w) for name, w in weights.items()}
        for name, experts in torchao.items():
            if experts is not None:
                calls[name] = functools.partial(experts, x, ids, routing)
        for name, experts in vllm.items():
            calls[name] = functools.partial(experts, x, routing, ids)
        with torch.no_grad():
            want = calls["moe_ops_bf16"]()
            errors = {name: sqnr_db(want, call()) for name, call in calls.items() if name != "moe_ops_bf16"}
            rounds = {name: [] for name in calls}
            for _ in range(ROUNDS):
                for name, call in calls.items():
                    rounds[name].append(time_fn(call)[0])
        touched = min(E, t * K)  # experts a batch reads (every expert once at most)
        bf16_ms = statistics.median(rounds["moe_ops_bf16"])
        first = len(lines)
        for name, measured in rounds.items():
            ms = statistics.median(measured)
            itemsize = itemsizes.get(name, 2.0 if name == "vllm_bf16" else 1.0)  # the peers' fp8: one byte
            gb_per_s = touched * 3 * F * H * itemsize / (ms * 1e-3) / 1e9
            error = f"{errors[name]:.1f}" if name in errors else "-"
            lines.append(f"| {shape.name} | {t} | {name} | {ms:.4f} | {bf16_ms / ms:.2f}x | {gb_per_s:.0f} | {error} | "
                         + ", ".join(f"{m:.4f}" for m in measured) + " |")
        print("\n".join(lines[first:]), flush=True)  # each T as it ends: a run cut short keeps what it measured
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(GPU_SHAPES), help=f"of {','.join(SHAPES)}")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, a tiny shape, wall-clock timer")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; dry run: none)")
    parser.add_argument("--impls", help="only these implementations (comma-separated names; moe_ops_bf16 always runs)")
    parser.add_argument("--tokens", help=f"comma-separated T (default {','.join(map(str, TOKENS))})")
    parser.add_argument("--vllm-source", type=Path, help="vLLM's fused_moe.py (its configs/ folder beside it): adds "
                        "vLLM's Triton kernel, bf16 and fp8 w8a8 (GPU only)")
    args = parser.parse_args()
    if args.dry_run:
        device, shapes, tokens = torch.device("cpu"), [DRY_RUN_SHAPES["tiny-mixtral"]], DRY_RUN_TOKENS
        gpu, time_fn = "cpu-dry-run", time_wall_clock
        if args.vllm_source:
            raise SystemExit("--vllm-source: vLLM's kernel is timed on the GPU only, not in --dry-run")
    else:
        unknown = [name for name in args.shapes.split(",") if name not in SHAPES]
        if unknown:
            raise SystemExit(f"--shapes: expected names of {list(SHAPES)}, got {unknown}")
        device, shapes, tokens = torch.device("cuda"), [SHAPES[n] for n in args.shapes.split(",")], TOKENS
        gpu, time_fn = torch.cuda.get_device_name(), time_on_gpu
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    impls = set(args.impls.split(",")) if args.impls else None
    known = implementation_names(DRY_RUN_GROUP if args.dry_run else GROUP)
    if impls is not None and impls - set(known):
        raise SystemExit(f"--impls: {sorted(impls - set(known))} not among {known}")
    # Asked for and impossible here: an error, not a table without their rows.
    if impls is not None and args.dry_run and impls & set(GPU_ONLY_IMPLEMENTATIONS):
        raise SystemExit(f"--impls: {sorted(impls & set(GPU_ONLY_IMPLEMENTATIONS))} run on the GPU only")
    if impls is not None and not args.vllm_source and impls & set(VLLM_IMPLEMENTATIONS):
        raise SystemExit(f"--impls: {sorted(impls & set(VLLM_IMPLEMENTATIONS))} need --vllm-source")
    try:
        import torchao
        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = "absent"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = ["# Quantised expert weights (benchmarks/bench_quantised.py)", "",
             f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, torchao {torchao_version}, {stamp}; "
             f"bf16 activations, random routing; ms = median of {ROUNDS} interleaved rounds of do_bench medians; "
             "GB/s = weight bytes of the experts a batch touches per second; SQNR against moe_ops_bf16", "",
             "| shape | T | implementation | ms | vs bf16 | weight GB/s | SQNR dB | rounds (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        shape_lines = run_shape(shape, tokens, device, time_fn, DRY_RUN_GROUP if args.dry_run else GROUP,
                                args.vllm_source, impls)
        lines += shape_lines
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.dry_run:
        out_dir = args.out or Path(__file__).parent / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"quantised_{slug(gpu)}.md").write_text(report)


if __name__ == "__main__":
    main()
