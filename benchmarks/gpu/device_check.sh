#!/usr/bin/env bash
# The GPU check, run on the lent device machine in one call (see BENCHMARKS.md):
#   device run: bash benchmarks/gpu/device_check.sh      (carry: .device_data)
# 1. builds d2r's extension for this GPU with CMake (no internet there),
# 2. runs the GPU tests (pytest -m gpu) against the CPU path, real photos from .device_data,
# 3. runs the GPU benchmark (benchmarks/gpu/bench_gpu.py),
# 4. runs compute-sanitizer memcheck on the small GPU tests when time is left.
# Everything lands in $OUT (log.txt, tests.txt, bench.json, bench.txt, memcheck.txt).
set -uo pipefail
OUT="${OUT:-/tmp/d2r_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
cd "$(dirname "$0")/../.."
T0=$(date +%s)
echo "== $(date -u) on $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
nproc; python3 --version; nvcc --version | tail -1

echo "== build"
source benchmarks/gpu/build.sh
python3 -c "import d2r, json; print(json.dumps(d2r.build_info())); print(d2r.cuda.device_name())"
echo "build done at +$(( $(date +%s) - T0 )) s"

echo "== GPU tests"
export D2R_DEVICE_DATA="$PWD/.device_data/realmix.npz"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py -rs > "$OUT/tests.txt" 2>&1
echo "tests rc=$? at +$(( $(date +%s) - T0 )) s"; tail -30 "$OUT/tests.txt"

echo "== GPU benchmark"
timeout "${BENCH_TIMEOUT:-180}" python3 benchmarks/gpu/bench_gpu.py --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
echo "bench rc=$? at +$(( $(date +%s) - T0 )) s"

if [ "$(( $(date +%s) - T0 ))" -lt "${MEMCHECK_BEFORE:-300}" ] && command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck (small GPU tests)"
  timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_cuda.py -x -k "ties or aggregate_images_equals_cpu or save_load or bad_input" > "$OUT/memcheck.txt" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed|Invalid" "$OUT/memcheck.txt" | head -20
fi
echo "== done at +$(( $(date +%s) - T0 )) s"
