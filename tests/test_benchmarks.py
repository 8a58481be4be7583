"""The benchmark scripts' own logic (CPU): skewed inputs, the decode chain, the judged summaries.

The numbers in benchmarks/results/ are only as good as these pieces: a Zipf input that is not Zipf,
a chain that overflows or a summary that miscounts would publish wrong claims.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_energy  # noqa: E402
import bench_layer  # noqa: E402
import bench_targets  # noqa: E402
import compare_layer_runs  # noqa: E402


def test_zipf_tokens_route_with_zipf_frequencies():
    """With K = 1 the Gumbel top-1 of log p picks expert e with probability p_e exactly."""
    torch.manual_seed(0)
    num_experts, hidden, tokens = 16, 64, 20000
    router = torch.randn(num_experts, hidden) * 0.02
    x = bench_targets.zipf_tokens(router, tokens, 1, bench_targets.ZIPF_S)
    assert x.shape == (1, tokens, hidden) and x.dtype == router.dtype
    ids = torch.nn.functional.linear(x[0], router).argmax(-1)
    share = torch.bincount(ids, minlength=num_experts).double().sort(descending=True).values / tokens
    want = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** bench_targets.ZIPF_S
    torch.testing.assert_close(share, want / want.sum(), atol=0.01, rtol=0)


def test_zipf_tokens_have_no_top_k_ties():
    torch.manual_seed(1)
    router = (torch.randn(8, 32) * 0.02).to(torch.bfloat16)
    x = bench_targets.zipf_tokens(router, 4096, 2, bench_targets.ZIPF_S)
    top = torch.nn.functional.linear(x[0], router).float().topk(3, dim=-1).values
    assert not (top[:, 1] == top[:, 2]).any()


def test_decode_chain_stays_finite():
    """Without its RMSNorm the chain overflowed bf16 within a few Mixtral-sized layers."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = bench_layer.MoEShape("chain", 8, 2, 64, 128)
    blocks = [bench_layer.build_hf_blocks(shape, torch.device("cpu"))["hf_grouped_mm"] for _ in range(4)]
    for block in blocks:  # large weights make the unnormalised chain blow up at once
        for param in block.parameters():
            param.mul_(50)
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16) * 10
    with torch.inference_mode():
        out = bench_targets.LayerStack(blocks)(x)
        unnormalised = x
        for block in blocks:
            unnormalised = unnormalised + block(unnormalised)
    assert torch.isfinite(out).all()
    assert not torch.isfinite(unnormalised).all()


def _layer_row(T: int, impl: str, ms: float) -> dict:
    return {"shape": "s", "T": str(T), "impl": impl, "ms_p50": str(ms), "floor_over_measured": "0.5"}


def test_layer_summary_counts_cells_against_the_best_peer():
    rows = [
        _layer_row(1, "hf_grouped_mm", 1.0), _layer_row(1, "compile_hf_grouped_mm", 2.0),
        _layer_row(1, "moe_ops_compile_hf_grouped_mm", 1.5),  # ahead of compile, behind eager
        _layer_row(32, "hf_grouped_mm", 3.0), _layer_row(32, "compile_hf_grouped_mm", 2.0),
        _layer_row(32, "moe_ops_compile_hf_grouped_mm", 2.0),  # level with the best peer
    ]
    lines = bench_layer.summary_lines(rows)
    assert "torch.compile(HF grouped_mm) + moe_ops at or ahead of torch.compile(HF grouped_mm) in 2 of 2 cells" in lines
    best = [line for line in lines if "best peer" in line]
    assert len(best) == 1 and "in 1 of 2 cells; behind in s T=1" in best[0]


def _target_row(section, impl, ms, floor, T=1, dtype="bf16", routing="uniform"):
    return {"section": section, "shape": "s", "dtype": dtype, "routing": routing, "T": str(T), "impl": impl,
            "ms_p50": str(ms), "floor_ms": str(floor), "experts_touched": "8", "hottest_expert_share": "0.3",
            "gpu": "g", "torch": "t", "triton": "tr", "timestamp": "now"}


def test_targets_report_judges_each_section():
    per_layer = bench_targets.PER_LAYER
    rows = [
        _target_row("decode", "compile_hf_grouped_mm", 0.3, 0.1),
        _target_row("decode", "moe_ops_compile_hf_grouped_mm", 0.3, 0.1),
        _target_row("decode", f"compile_hf_grouped_mm{per_layer}", 0.25, 0.1),
        _target_row("decode", f"moe_ops_compile_hf_grouped_mm{per_layer}", 0.21, 0.1),  # 2.1x: not met
        _target_row("skew", "moe_ops_compile_hf_grouped_mm", 1.0, 0.5, T=512),
        _target_row("skew", "moe_ops_compile_hf_grouped_mm", 1.1, 0.5, T=512, routing="zipf"),  # 1.10: met
        *(_target_row("dtypes", impl, ms, 0.5, T=32, dtype="fp16") for impl, ms in
          (("hf_eager", 3.0), ("hf_grouped_mm", 1.0), ("compile_hf_grouped_mm", 1.2),
           ("moe_ops_compile_hf_grouped_mm", 1.05), ("moe_ops", 1.3))),  # 1.05 of the best peer: met
    ]
    report = bench_targets.markdown_report(rows)
    assert "| s | 0.1000 | 0.3000 | 0.3000 | 0.2500 | 0.2100 | 2.10 | no |" in report
    assert "| s | 512 | moe_ops_compile_hf_grouped_mm | 1.0000 | 1.1000 | 1.10 | 8, 8 | 0.300 | yes |" in report
    assert "| 1.0000 | 1.0500 | 1.3000 | 1.05 | yes |" in report
    assert "2 of 3 judged rows meet their targets." in report


def test_compiled_layers_of_one_block_keep_their_own_graphs():
    """bench_layer times compile(HF) and compile(HF) + moe_ops of one block side by side: each compiled
    layer must compile its own graph, where dynamo's cache on the shared forward would serve the first."""
    torch._dynamo.reset()
    block = torch.nn.Linear(4, 4)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 4)
    shared = bench_layer.own_code_object(block)
    torch.compile(shared, backend=backend)(x)
    torch.compile(shared, backend=backend)(x)
    assert len(graphs) == 1, "control: one code object, one cache entry serves both compiles"
    torch.compile(bench_layer.own_code_object(block), backend=backend)(x)
    torch.compile(bench_layer.own_code_object(block), backend=backend)(x)
    assert len(graphs) == 3
    torch._dynamo.reset()


def test_energy_report_takes_medians_over_rounds():
    runs = [dict(ms=ms, mj=mj, watts=mj / ms, mhz=mhz) for ms, mj, mhz in ((2.0, 1400, 1300), (3.0, 2100, 1200),
                                                                           (2.5, 1700, 1500))]
    rows = bench_energy.report_rows({"v": runs})
    assert rows[2] == "| v | 2.500 | 1700 | 700 | 1300 | 1400 2100 1700 |"


def test_energy_counter_says_what_it_needs(monkeypatch):
    def no_library(name):
        raise OSError(name)

    monkeypatch.setattr(bench_energy.ctypes, "CDLL", no_library)
    with pytest.raises(RuntimeError, match="NVIDIA GPU with NVML"):
        bench_energy.EnergyCounter()


def test_layer_summary_counts_cells_clear_of_the_rounds_spread():
    def row(T, impl, rounds):
        return dict(_layer_row(T, impl, sorted(rounds)[1]), ms_rounds=" ".join(map(str, rounds)))

    rows = [
        row(1, "compile_hf_grouped_mm", [2.0, 2.1, 2.2]), row(1, "moe_ops_compile_hf_grouped_mm", [1.0, 1.2, 1.1]),
        # ahead at the median, but one round of moe_ops is slower than one round of the peer: a tie
        row(8192, "compile_hf_grouped_mm", [9.5, 9.6, 9.8]),
        row(8192, "moe_ops_compile_hf_grouped_mm", [9.4, 9.5, 9.7]),
    ]
    assert bench_layer.clear_of_rounds_lines(rows) == [
        "torch.compile(HF grouped_mm) + moe_ops ahead of torch.compile(HF grouped_mm) in every timing round in "
        "1 of 2 cells; not in s T=8192"
    ]
    assert bench_layer.clear_of_rounds_lines([dict(r, ms_rounds="") for r in rows]) == []  # older runs' rows


def _dry_run(script_name: str, *options: str) -> str:
    """The stdout of a benchmark script's ``--dry-run`` (CPU, tiny shapes), which must exit 0."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / script_name
    # -P, as gpu_session.sh runs it: the benchmarks folder comes from PYTHONPATH, not the script's folder;
    # the rest of PYTHONPATH stays (the GPU host installs moe_ops there).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(script.parent),
                                                                   os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-P", str(script), "--dry-run", *options], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_expert_parallel_benchmark_dry_run():
    """bench_expert_parallel.py's CPU dry run (2 gloo ranks, tiny shapes) reports every variant, and with
    --profile records a trace of a pipelined call."""
    stdout = _dry_run("bench_expert_parallel.py", "--profile")
    assert "| tiny | 6 |" in stdout and "padded / EP=1" in stdout and "chunks / EP=1" in stdout
    assert "- profile (tiny): trace: expert_parallel_profile_cpu.json" in stdout


def test_collective_overlap_counts_only_time_beside_compute():
    """bench_expert_parallel.overlapped_ms: the time collectives and compute run together, each side's
    intervals merged first (overlapping kernels of one side are not counted twice)."""
    import bench_expert_parallel

    collectives = [(0.0, 4.0), (3.0, 6.0), (10.0, 12.0)]  # union: [0, 6], [10, 12]
    compute = [(1.0, 2.0), (1.5, 5.0), (11.0, 20.0)]  # union: [1, 5], [11, 20]
    assert bench_expert_parallel.overlapped_ms(collectives, compute) == pytest.approx(4.0 + 1.0)
    assert bench_expert_parallel.overlapped_ms(collectives, []) == 0.0


def test_training_timing_dry_run():
    """bench_training_timing.py's CPU dry run (compiled at one token count, timed at another) reports each
    implementation's three timings."""
    stdout = _dry_run("bench_training_timing.py")
    assert "T = 48, compiled at T = 5" in stdout
    for impl in ("compile_hf_grouped_mm", "compile_torchtitan", "moe_ops_compile_hf_grouped_mm"):
        row = next(line for line in stdout.splitlines() if line.startswith(f"| {impl} |"))
        assert all(float(cell) > 0 for cell in row.split("|")[2:5]), row


def test_quantised_dry_run():
    """bench_quantised.py's CPU dry run times bf16, int8 / fp8 per row, int8 / int4 in groups (of 16 at its
    tiny shape), fp8 w8a8 (weights per row or in tiles) moe_ops and torchao's fp8 experts at each token count,
    each quantised result within its scheme's error of bf16."""
    stdout = _dry_run("bench_quantised.py")
    for t in ("1", "5"):
        rows = {line.split("|")[3].strip(): line.split("|") for line in stdout.splitlines()
                if line.startswith(f"| tiny-mixtral | {t} |")}
        assert set(rows) == {"moe_ops_bf16", "moe_ops_int8", "moe_ops_fp8", "moe_ops_int8_g16", "moe_ops_int4_g16",
                             "moe_ops_fp8_w8a8", "moe_ops_fp8_b16_w8a8", "torchao_fp8_eager"}, rows
        assert all(float(row[4]) > 0 for row in rows.values())
        floors = dict(moe_ops_int8=25.0, moe_ops_fp8=25.0, torchao_fp8_eager=25.0, moe_ops_int8_g16=25.0,
                      moe_ops_int4_g16=15.0, moe_ops_fp8_w8a8=20.0, moe_ops_fp8_b16_w8a8=20.0)
        assert all(float(rows[name][7]) >= floor for name, floor in floors.items())


def test_tree_comparison_calls_slower_only_beyond_the_runs_spread():
    """compare_layer_runs: a cell is slower only when the candidate's median exceeds the baseline's by more
    than either tree's own run-to-run spread; cells missing from a run are left out."""
    a = ("mixtral", 1, "moe_ops")
    b = ("mixtral", 8192, "moe_ops")
    c = ("qwen3", 128, "moe_ops")
    baseline = [{a: 1.00, b: 10.0, c: 2.0}, {a: 1.10, b: 10.1, c: 2.0}]
    candidate = [{a: 1.08, b: 11.0, c: 1.5}, {a: 1.02, b: 11.2}]
    rows = {(r["shape"], r["T"], r["impl"]): r for r in compare_layer_runs.compare(baseline, candidate)}
    assert set(rows) == {a, b}
    assert rows[a]["verdict"] == "within noise" and rows[a]["noise"] == pytest.approx(1.1)
    assert rows[b]["verdict"] == "slower" and rows[b]["ratio"] == pytest.approx(11.1 / 10.05)
    text = compare_layer_runs.report(list(rows.values()), "old", "new", [])
    assert "1 of 2 cells slower than old beyond the noise band." in text
