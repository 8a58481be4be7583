"""The benchmark scripts' own logic (CPU): skewed inputs, the decode chain, the judged summaries.

The numbers in benchmarks/results/ are only as good as these pieces: a Zipf input that is not Zipf,
a chain that overflows or a summary that miscounts would publish wrong claims.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRITON_DEVICE

import moe_ops
from moe_ops.quantised import quantise_per_row, sqnr_db

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
    # vLLM's kernel is a peer too, where it was timed.
    lines = bench_layer.summary_lines([*rows, _layer_row(32, "vllm_triton", 1.9)])
    best = [line for line in lines if "best peer" in line]
    assert "in 0 of 2 cells; behind in s T=1, s T=32" in best[0]


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


def test_gpu_samples_time_a_slow_call_at_least_min_samples_times(monkeypatch):
    """do_bench repeats a call for about ``rep`` ms: one sample of a 120 ms training step at rep = 200. The
    samples are then taken again with ``rep`` long enough for MIN_SAMPLES of them."""
    reps = []

    def fake_do_bench(fn, warmup, rep, return_mode, grad_to_none):
        reps.append(rep)
        return [120.0] * max(1, int(rep / 120.0))

    monkeypatch.setattr(bench_layer.triton.testing, "do_bench", fake_do_bench)
    samples = bench_layer.gpu_samples(lambda: None)
    assert len(samples) >= bench_layer.MIN_SAMPLES and reps[0] == 200 and reps[1] >= 120.0 * bench_layer.MIN_SAMPLES
    reps.clear()
    monkeypatch.setattr(bench_layer.triton.testing, "do_bench",
                        lambda fn, warmup, rep, return_mode, grad_to_none: reps.append(rep) or [0.5] * 400)
    assert len(bench_layer.gpu_samples(lambda: None)) == 400 and reps == [200]  # a fast call: one do_bench


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
    --profile records a trace of a pipelined call and how much of gloo's all-to-all time ran beside operators."""
    stdout = _dry_run("bench_expert_parallel.py", "--profile")
    assert "| tiny | 6 |" in stdout and "padded / EP=1" in stdout and "chunks / EP=1" in stdout
    profile = re.search(r"- profile \(tiny\): trace: expert_parallel_profile_cpu.json; pipelined \(2 chunks\) "
                        r"forward \+ backward, T = 6: collectives ([\d.]+) ms, of which ([\d.]+) ms ran beside the "
                        r"main thread's operators", stdout)
    assert profile, stdout
    assert 0.0 < float(profile[1]) and 0.0 <= float(profile[2]) <= float(profile[1])


def test_collective_overlap_counts_only_time_beside_compute():
    """bench_expert_parallel.overlapped_ms: the time collectives and compute run together, each side's
    intervals merged first (overlapping kernels of one side are not counted twice)."""
    import bench_expert_parallel

    collectives = [(0.0, 4.0), (3.0, 6.0), (10.0, 12.0)]  # union: [0, 6], [10, 12]
    compute = [(1.0, 2.0), (1.5, 5.0), (11.0, 20.0)]  # union: [1, 5], [11, 20]
    assert bench_expert_parallel.overlapped_ms(collectives, compute) == pytest.approx(4.0 + 1.0)
    assert bench_expert_parallel.overlapped_ms(collectives, []) == 0.0


def test_memory_replay_finds_the_allocations_alive_at_the_peak():
    import bench_training

    def event(action, addr, size):
        return {"action": action, "addr": addr, "size": size}

    trace = [
        event("alloc", 1, 100), event("alloc", 2, 50),  # 150
        event("free_requested", 1, 100), event("free_completed", 1, 100),  # 50: freed once, not twice
        event("alloc", 3, 120), event("alloc", 1, 30),  # 200, the peak: blocks 2, 3 and the reused address 1
        event("segment_alloc", 9, 1000),  # segments are not allocations
        event("free_requested", 3, 120), event("alloc", 4, 60),  # 140
        event("free_completed", 5, 10),  # a block allocated before the trace began
    ]
    peak, alive = bench_training.allocations_at_peak(trace)
    assert peak == 200
    assert sorted((e["addr"], e["size"]) for e in alive) == [(1, 30), (2, 50), (3, 120)]


def test_training_timing_dry_run():
    """bench_training_timing.py's CPU dry run (compiled at one token count, timed at another) reports each
    implementation's three timings."""
    stdout = _dry_run("bench_training_timing.py")
    assert "T = 48, compiled at T = 5" in stdout
    for impl in ("compile_hf_grouped_mm", "compile_torchtitan", "moe_ops_compile_hf_grouped_mm"):
        row = next(line for line in stdout.splitlines() if line.startswith(f"| {impl} |"))
        assert all(float(cell) > 0 for cell in row.split("|")[2:5]), row


def test_quantised_dry_run():
    """bench_quantised.py's CPU dry run times bf16, int8 / fp8 per row (int8 also with zero points), int8 / int4
    in groups (of 16 at its tiny shape), fp8 w8a8 (weights per row or in tiles) moe_ops and torchao's fp8 experts
    at each token count, each quantised result within its scheme's error of bf16."""
    stdout = _dry_run("bench_quantised.py")
    for t in ("1", "5"):
        rows = {line.split("|")[3].strip(): line.split("|") for line in stdout.splitlines()
                if line.startswith(f"| tiny-mixtral | {t} |")}
        assert set(rows) == {"moe_ops_bf16", "moe_ops_int8", "moe_ops_fp8", "moe_ops_int8_zp", "moe_ops_int8_g16",
                             "moe_ops_int4_g16", "moe_ops_fp8_w8a8", "moe_ops_fp8_b16_w8a8", "torchao_fp8_eager"}, rows
        assert all(float(row[4]) > 0 for row in rows.values())
        floors = dict(moe_ops_int8=25.0, moe_ops_fp8=25.0, moe_ops_int8_zp=25.0, torchao_fp8_eager=25.0,
                      moe_ops_int8_g16=25.0, moe_ops_int4_g16=15.0, moe_ops_fp8_w8a8=20.0, moe_ops_fp8_b16_w8a8=20.0)
        assert all(float(rows[name][7]) >= floor for name, floor in floors.items())


def test_expert_tiles_sweep_dry_run():
    """sweep_expert_tiles.py's CPU dry run (interpreter) times the heuristic's tile and the grid's for each weight
    form and GEMM, each config's output checked against the heuristic's, and names the best; --block-m adds that
    block size's heuristic tile and grid."""
    stdout = _dry_run("sweep_expert_tiles.py", "--tokens", "1", "--block-m", "32")
    summary = {(row[3].strip(), row[4].strip()): row for row in map(lambda line: line.split("|"), stdout.splitlines())
               if len(row) == 11 and row[1].strip() == "tiny-mixtral"}
    assert set(summary) == {(form, gemm) for form in ("bf16", "int8", "int4_g16") for gemm in ("gate_up", "down")}
    assert all(float(row[5]) > 0 and row[9].strip() in ("heuristic", "m16 n32 k32 w4 s2", "m32 heuristic",
                                                         "m32 n32 k32 w4 s2") for row in summary.values())
    every_config = stdout.split("## Every config")[1]
    for config in ("heuristic", "m16 n32 k32 w4 s2", "m32 heuristic", "m32 n32 k32 w4 s2"):
        assert every_config.count(f"| {config} |") == 6, config


def test_activation_grad_sweep_dry_run():
    """sweep_activation_grad.py's CPU dry run (interpreter) checks each config's outputs against the default's and
    times every config beside the forward kernel and the copy ceiling."""
    stdout = _dry_run("sweep_activation_grad.py")
    rows = [line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("| m") or " kernel (" in line
            or "device copy" in line]
    assert rows == ["m8 f128 w4", "m16 f32 w4", "m4 f64 w2",
                    "forward activation kernel (3 P F values)", "device copy of 6 P F values (read + write)"]


def test_quantised_benchmark_times_only_the_implementations_asked_for():
    """--impls times those (and bf16, what the others are against) at the --tokens given; a name it does not
    know is refused, naming the known ones."""
    stdout = _dry_run("bench_quantised.py", "--impls", "moe_ops_int4_g16,moe_ops_fp8_w8a8", "--tokens", "3")
    rows = {line.split("|")[2].strip() + line.split("|")[3].strip() for line in stdout.splitlines()
            if line.startswith("| tiny-mixtral |")}
    assert rows == {"3moe_ops_bf16", "3moe_ops_int4_g16", "3moe_ops_fp8_w8a8"}, rows
    with pytest.raises(AssertionError, match="--impls: \\['int3'\\] not among"):
        _dry_run("bench_quantised.py", "--impls", "int3")


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


# A stand-in for vLLM's fused_moe_kernel, written here with its argument names: a plain blocked GEMM over the
# block schedule (no tiling tricks), so the driver around it (peer_vllm.VllmFusedMoE) is checked without vLLM.
STAND_IN_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def helper_scale(acc, scale_ptr, offsets, mask):
    return acc * tl.load(scale_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def fused_moe_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_weights_ptr, sorted_token_ids_ptr,
                     expert_ids_ptr, num_tokens_post_padded_ptr, N, K, EM, num_valid_tokens, stride_am, stride_ak,
                     stride_be, stride_bk, stride_bn, stride_cm, stride_cn, stride_asm, stride_ask, stride_bse,
                     stride_bsk, stride_bsn, group_n: tl.constexpr, group_k: tl.constexpr,
                     BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                     GROUP_SIZE_M: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, top_k: tl.constexpr,
                     compute_type: tl.constexpr, use_fp8_w8a8: tl.constexpr, use_int8_w8a8: tl.constexpr,
                     use_int8_w8a16: tl.constexpr, per_channel_quant: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid // tl.cdiv(N, BLOCK_SIZE_N)
    pid_n = pid % tl.cdiv(N, BLOCK_SIZE_N)
    if pid_m * BLOCK_SIZE_M >= tl.load(num_tokens_post_padded_ptr):
        return
    slot = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M))
    valid = slot < num_valid_tokens
    expert = tl.load(expert_ids_ptr + pid_m)
    cols = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), tl.float32)
    for k0 in range(0, K, BLOCK_SIZE_K):
        ks = k0 + tl.arange(0, BLOCK_SIZE_K)
        a = tl.load(a_ptr + (slot // top_k)[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=valid[:, None] & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + expert * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
    if use_fp8_w8a8:
        acc = helper_scale(acc, a_scale_ptr, (slot // top_k)[:, None] * stride_asm, valid[:, None])
        acc = helper_scale(acc, b_scale_ptr + expert * stride_bse, cols[None, :] * stride_bsn, cols[None, :] < N)
    if MUL_ROUTED_WEIGHT:
        acc = helper_scale(acc, topk_weights_ptr, slot[:, None], valid[:, None])
    tl.store(c_ptr + slot[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(compute_type),
             mask=valid[:, None] & (cols[None, :] < N))
'''


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8_w8a8"])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_vllm_peer_driver_computes_the_layer(tmp_path, fp8, num_tokens):
    """peer_vllm.VllmFusedMoE around a kernel with vLLM's argument names (a stand-in): the schedule it builds,
    the strides and scales it passes, SiLU-and-mul of the two halves and the sum over K give fused_experts_ref's
    layer (fp8: within fp8's error, and close to moe_ops' layer of the same fp8 weights and inputs). T = 7 > E
    takes the large default config."""
    import peer_vllm

    (tmp_path / "fused_moe.py").write_text(STAND_IN_KERNEL)
    kernel = peer_vllm.load_kernel(tmp_path / "fused_moe.py")
    num_experts, top_k, hidden, intermediate = 4, 2, 32, 48
    w_gate_up = (torch.randn(num_experts, 2 * intermediate, hidden) / hidden**0.5).to(TRITON_DEVICE, torch.bfloat16)
    w_down = (torch.randn(num_experts, hidden, intermediate) / intermediate**0.5).to(TRITON_DEVICE, torch.bfloat16)
    x = torch.randn(num_tokens, hidden, dtype=torch.bfloat16).to(TRITON_DEVICE)
    ids = torch.rand(num_tokens, num_experts).argsort(-1)[:, :top_k].to(TRITON_DEVICE, torch.int32)
    weights = torch.rand(num_tokens, top_k).softmax(-1).to(TRITON_DEVICE)
    layer = peer_vllm.VllmFusedMoE(kernel, w_gate_up, w_down, fp8=fp8)
    assert layer.config_source == "vLLM's default config (no tuned file)"
    out = layer(x, weights, ids)
    exact = moe_ops.fused_experts_ref(x.double(), weights.double(), ids, w_gate_up.double(), w_down.double())
    out, exact = out.cpu(), exact.cpu()
    if not fp8:
        error = (out.double() - exact).abs().max() / exact.abs().max()
        assert error < 2e-2, error
        return
    # moe_ops' layer of the same fp8 values and scales of weights and inputs (per row). vLLM rounds each GEMM's
    # output to bf16 before the next step (moe_ops keeps the activation in fp32): where that moves an element of
    # the second GEMM's input across an fp8 rounding boundary, the two differ by a step of fp8. The peer stays
    # within fp8's error of the exact layer, and closer to moe_ops' fp8 layer than either is to the exact one.
    quantised = {}
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        quantised[name], quantised[f"{name}_scale"] = quantise_per_row(w, torch.float8_e4m3fn)
    moe_ops_fp8 = moe_ops.fused_experts(x, weights, ids, **quantised, input_quantisation="fp8_rowwise").cpu()
    fp8_error_db = sqnr_db(exact, moe_ops_fp8)
    assert sqnr_db(exact, out) >= 20.0
    assert sqnr_db(moe_ops_fp8, out) >= fp8_error_db + 3.0, (sqnr_db(moe_ops_fp8, out), fp8_error_db)


def test_vllm_peer_refuses_sources_it_cannot_launch(tmp_path):
    import peer_vllm

    (tmp_path / "none.py").write_text("import triton\n\n@triton.jit\ndef other(x_ptr):\n    pass\n")
    with pytest.raises(peer_vllm.VllmKernelError, match="defines no @triton.jit fused_moe_kernel"):
        peer_vllm.load_kernel(tmp_path / "none.py")
    constexpr = "per_channel_quant: tl.constexpr"
    newer = STAND_IN_KERNEL.replace(constexpr, f"{constexpr}, HAS_BIAS: tl.constexpr")
    (tmp_path / "newer.py").write_text(newer)
    with pytest.raises(peer_vllm.VllmKernelError, match=r"also takes \['HAS_BIAS'\]"):
        peer_vllm.load_kernel(tmp_path / "newer.py")
    with pytest.raises(peer_vllm.VllmKernelError, match="is no file"):
        peer_vllm.load_kernel(tmp_path / "missing.py")


def test_vllm_peer_picks_the_tuned_row_of_the_nearest_batch(tmp_path):
    """As vLLM picks it: the tuned file of (E, N = F, the GPU, dtype) and its row nearest T."""
    import peer_vllm

    path = peer_vllm.config_file(tmp_path, 8, 48, "NVIDIA H200", fp8=True)
    assert path.name == "E=8,N=48,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"
    tuned = {1: {"BLOCK_SIZE_M": 16}, 64: {"BLOCK_SIZE_M": 32}, 256: {"BLOCK_SIZE_M": 64}}
    assert peer_vllm.kernel_config(tuned, 1, 8) == {"BLOCK_SIZE_M": 16}
    assert peer_vllm.kernel_config(tuned, 100, 8) == {"BLOCK_SIZE_M": 32}
    assert peer_vllm.kernel_config(tuned, 200, 8) == {"BLOCK_SIZE_M": 64}
    assert peer_vllm.kernel_config(None, 8, 8) == peer_vllm.DEFAULT_CONFIG["small"]
    assert peer_vllm.kernel_config(None, 9, 8) == peer_vllm.DEFAULT_CONFIG["large"]
