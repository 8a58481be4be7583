#!/usr/bin/env bash
# What the H100 runs, in as few device calls as possible: bash benchmarks/gpu_session.sh STAGE...
#   tests     every test, the CUDA-marked ones included (Triton kernels on the GPU)
#   memcheck  compute-sanitizer memcheck over tests/memcheck_edges.py
#   kernels   benchmarks/bench_kernels.py (per-kernel times)
#   layer     benchmarks/bench_layer.py (the 18-cell table against transformers)
# Logs and result files go to $OUT (the device tool brings them back).
set -uo pipefail
OUT=${OUT:-/tmp/moe_ops_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
status=0
for stage in "$@"; do
  echo "=== $stage"
  case "$stage" in
    tests) python3 -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -40 || status=1 ;;
    memcheck) compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/memcheck_edges.py \
                > "$OUT/memcheck.log" 2>&1 || status=1; tail -15 "$OUT/memcheck.log" ;;
    kernels) python3 benchmarks/bench_kernels.py --out "$OUT" ${KERNEL_ARGS:-} || status=1 ;;
    layer) python3 benchmarks/bench_layer.py --out "$OUT" ${LAYER_ARGS:-} 2>&1 | tee "$OUT/layer.log" | tail -60 || status=1 ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
exit $status
