#!/usr/bin/env bash
# What the H100 runs, in as few device calls as possible: bash benchmarks/gpu_session.sh STAGE...
#   suite     TEST_FILES (default: every test file; SUITE_PART instead picks a third of them that fits one
#             10-minute call: kernels, cpu_heavy or rest) in one pytest run spread over PYTEST_WORKERS (default
#             12) pytest-xdist workers, each test's result on its own line (-v), each failure's traceback in
#             failures.txt as it happens; the tests marked whole_gpu after them, one at a time
#   memcheck  compute-sanitizer memcheck over tests/memcheck_edges.py
#   kernels   benchmarks/bench_kernels.py (per-kernel times; run alone, after the tests)
#   layer     benchmarks/bench_layer.py (the table against transformers; LAYER_ARGS passes filters)
#   trees     the layer benchmark of this tree against an older one (BASELINE_TREE: a folder holding its
#             packages, e.g. `git archive <commit> moe_ops lowering | tar -x -C DIR`), TREE_RUNS runs
#             each (default 2), alternating, then benchmarks/compare_layer_runs.py (TREE_LABELS "old new")
#   profile   benchmarks/profile_host.py (host vs GPU time of the eager layer, with a cProfile)
#   training  benchmarks/bench_training.py (one training step, with and without moe_ops; TRAINING_ARGS)
#   timing    benchmarks/bench_training_timing.py in one fresh process per circumstance (compiled at the
#             timed T or at 8192 first, eager step first, both; TIMING_CASES other option sets, ";" between
#             them; TIMING_ARGS for all)
#   targets   benchmarks/bench_targets.py (decode under CUDA graphs, skewed routing, fp16/fp32; TARGET_ARGS)
#   blockm    benchmarks/sweep_block_m.py (the fused op at each GEMM block size, T = 2-8192)
#   dxcolumns benchmarks/sweep_dx_columns.py (the training backward's dx over all columns or column halves)
#   hostc     benchmarks/profile_host.py --compiled (host time of the compiled block, with a cProfile)
#   ep        benchmarks/bench_expert_parallel.py (every GPU of the host, NCCL; a multi-GPU machine; EP_ARGS,
#             e.g. --profile for a trace of a pipelined call and its overlap)
#   quantised benchmarks/bench_quantised.py (int8 / fp8 / int4 expert weights and fp8 inputs vs bf16 and
#             torchao; QUANTISED_ARGS)
#   energy    benchmarks/bench_energy.py (energy per call of the expert GEMMs and layers; ENERGY_ARGS)
#   gemm      benchmarks/profile_kernels.py: compiler report and tile sweep of the expert GEMMs, and
#             Nsight Compute sections of the GEMMs of NCU_CELLS (one file, ncu.txt)
# VLLM_SOURCE (vLLM's fused_moe.py, its configs/ folder beside it; carried, never in the repository) adds vLLM's
# Triton kernel to the layer and quantised stages' peers.
# Logs and result files go to $OUT (the device tool brings them back). STAGE_TIMEOUT caps each stage.
set -uo pipefail
OUT=${OUT:-/tmp/moe_ops_out}
mkdir -p "$OUT"
# moe_ops.lowering is the repository's lowering/ folder (pyproject's package-dir), so the package runs
# installed from this tree, not from the tree itself; MOE_OPS_WHEEL names a wheel to install instead
# (built from the same tree with `pip wheel --no-deps -w .whl .`, where the GPU box cannot build).
# `python3 -P` keeps the tree's moe_ops/ folder (which lacks lowering) off the path.
SITE=/tmp/moe_ops_site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$SITE" "${MOE_OPS_WHEEL:-.}" \
  || { echo "gpu_session: could not install moe_ops from ${MOE_OPS_WHEEL:-this tree}" >&2; exit 1; }
# Wheels the GPU box lacks (expecttest for the tests, torchao for the quantised experts) travel in .whl/
# (the device tool's carry).
for wheel in .whl/expecttest-*.whl .whl/torchao-*.whl; do
  [ -e "$wheel" ] && python3 -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$wheel"
done
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD/benchmarks:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
LIMIT=${STAGE_TIMEOUT:-300}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
status=0
for stage in "$@"; do
  echo "=== $stage"
  case "$stage" in
    suite)
      # The kernel and compile-heavy files, the files whose tests are mostly CPU work (compiling every transformers
      # family, spawned ranks, the docs' scripts), and every other file: each a call's worth on the H100.
      kernels="test_expert_gemm.py test_fused_experts.py test_fused_experts_backward.py test_lowering.py test_export.py
               test_tiles.py test_hopper_compile.py"
      cpu_heavy="test_training.py test_hf_families.py test_docs.py test_benchmarks.py test_expert_parallel.py
                 test_package.py"
      case "${SUITE_PART:-}" in
        kernels|cpu_heavy) TEST_FILES=$(for f in ${!SUITE_PART}; do printf "tests/%s " "$f"; done) ;;
        rest) TEST_FILES=$(for f in tests/test_*.py; do
                [[ " $(echo $kernels $cpu_heavy) " == *" $(basename "$f") "* ]] || printf "%s " "$f"; done) ;;
        "") ;;
        *) echo "gpu_session: SUITE_PART is kernels, cpu_heavy or rest, not $SUITE_PART" >&2; exit 2 ;;
      esac
      # One process per worker: Triton's and Inductor's compiles use the cores; -v names each test as it ends,
      # so a call cut off by its limit still says which tests passed and failed. Tests marked whole_gpu run
      # after the others, one at a time (beside the workers they run out of memory).
      export MOE_OPS_FAILURE_LOG="$OUT/failures.txt"  # each failure's traceback as it happens (conftest.py)
      timeout "$LIMIT" python3 -P -m pytest -v -rfE -p no:cacheprovider -n "${PYTEST_WORKERS:-12}" ${PYTEST_ARGS:-} \
        -m "not whole_gpu" ${TEST_FILES:-tests} > "$OUT/tests.log" 2>&1 || status=1
      timeout "$LIMIT" python3 -P -m pytest -v -rfE -p no:cacheprovider -n 0 ${PYTEST_ARGS:-} -m whole_gpu \
        ${TEST_FILES:-tests} >> "$OUT/tests.log" 2>&1 || [ $? -eq 5 ] || status=1
      grep -E "(FAILED|ERROR) tests/" "$OUT/tests.log" | sort -u | head -40
      echo "passed $(grep -c " PASSED " "$OUT/tests.log"), failed $(grep -c " FAILED " "$OUT/tests.log"), skipped" \
        "$(grep -c " SKIPPED " "$OUT/tests.log")"; tail -3 "$OUT/tests.log" ;;
    memcheck)
      timeout "$LIMIT" compute-sanitizer --tool memcheck --error-exitcode 1 python3 -P tests/memcheck_edges.py \
        > "$OUT/memcheck.log" 2>&1 || status=1
      tail -12 "$OUT/memcheck.log" ;;
    kernels) timeout "$LIMIT" python3 -P benchmarks/bench_kernels.py --out "$OUT" ${KERNEL_ARGS:-} || status=1 ;;
    profile) timeout "$LIMIT" python3 -P benchmarks/profile_host.py --out "$OUT" || status=1 ;;
    gemm)
      timeout "$LIMIT" python3 -P benchmarks/profile_kernels.py --out "$OUT" report || status=1
      timeout "$LIMIT" python3 -P benchmarks/profile_kernels.py --out "$OUT" sweep || status=1
      for cell in ${NCU_CELLS:-qwen3-30b-a3b:1 mixtral-8x7b:8192 qwen3-30b-a3b:8192}; do
        echo "=== $cell"
        timeout "$LIMIT" ncu --clock-control none --nvtx --nvtx-include "profile/" \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
          --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis \
          python3 -P benchmarks/profile_kernels.py ncu "$cell" || status=1
      done > "$OUT/ncu.txt" 2>&1 ;;
    targets) timeout "$LIMIT" python3 -P benchmarks/bench_targets.py --out "$OUT" ${TARGET_ARGS:-} 2>&1 \
               | tee "$OUT/targets.log" | tail -60 || status=1 ;;
    training) timeout "$LIMIT" python3 -P benchmarks/bench_training.py --out "$OUT" ${TRAINING_ARGS:-} 2>&1 \
                | tee "$OUT/training.log" | tail -40 || status=1 ;;
    timing)
      # TIMING_CASES (";"-separated option sets) replaces the default four.
      IFS=";" read -ra cases <<< "${TIMING_CASES:-;--compile-tokens 8192;--eager-first;--compile-tokens 8192 --eager-first}"
      for circumstance in "${cases[@]}"; do
        timeout "$LIMIT" python3 -P benchmarks/bench_training_timing.py --out "$OUT" ${TIMING_ARGS:-} $circumstance 2>&1 \
          | tail -9 || status=1
      done ;;
    ep) timeout "$LIMIT" python3 -P benchmarks/bench_expert_parallel.py --out "$OUT" ${EP_ARGS:-} 2>&1 \
          | tee "$OUT/ep.log" | tail -20 || status=1 ;;
    quantised) timeout "$LIMIT" python3 -P benchmarks/bench_quantised.py --out "$OUT" ${QUANTISED_ARGS:-} \
                 ${VLLM_SOURCE:+--vllm-source "$VLLM_SOURCE"} 2>&1 \
                 | tee "$OUT/quantised.log" | tail -40 || status=1 ;;
    energy) timeout "$LIMIT" python3 -P benchmarks/bench_energy.py --out "$OUT" ${ENERGY_ARGS:-} 2>&1 \
              | tee "$OUT/energy.log" | tail -40 || status=1 ;;
    dxcolumns) timeout "$LIMIT" python3 -P benchmarks/sweep_dx_columns.py --out "$OUT" || status=1 ;;
    blockm) timeout "$LIMIT" python3 -P benchmarks/sweep_block_m.py --out "$OUT" || status=1 ;;
    hostc) timeout "$LIMIT" python3 -P benchmarks/profile_host.py --out "$OUT" --compiled || status=1 ;;
    layer) timeout "$LIMIT" python3 -P benchmarks/bench_layer.py --out "$OUT" ${LAYER_ARGS:-} \
             ${VLLM_SOURCE:+--vllm-source "$VLLM_SOURCE"} 2>&1 \
             | tee "$OUT/layer.log" | tail -40 || status=1 ;;
    trees)
      read -r old_label new_label <<< "${TREE_LABELS:-baseline head}"
      old_runs=""; new_runs=""
      for run in $(seq "${TREE_RUNS:-2}"); do
        # The same benchmark script for both trees; only the package on the path differs.
        PYTHONPATH="$BASELINE_TREE:$PWD/benchmarks:$PWD/tests" timeout "$LIMIT" python3 -P benchmarks/bench_layer.py \
          --out "$OUT/trees/$old_label$run" ${LAYER_ARGS:-} >> "$OUT/trees.log" 2>&1 || status=1
        timeout "$LIMIT" python3 -P benchmarks/bench_layer.py --out "$OUT/trees/$new_label$run" ${LAYER_ARGS:-} \
          >> "$OUT/trees.log" 2>&1 || status=1
        old_runs="$old_runs${old_runs:+,}$OUT/trees/$old_label$run"; new_runs="$new_runs${new_runs:+,}$OUT/trees/$new_label$run"
      done
      python3 -P benchmarks/compare_layer_runs.py --baseline "$old_label=$old_runs" --candidate "$new_label=$new_runs" \
        --out "$OUT/layer_trees.md" | tail -30 || status=1
      # Every run's rows in one file (the device tool brings back few files), each prefixed by its run.
      for run_dir in "$OUT"/trees/*; do sed "s|^|$(basename "$run_dir"),|" "$run_dir"/layer_*.csv; done \
        > "$OUT/layer_trees_runs.csv"
      rm -rf "$OUT/trees" ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
exit $status
