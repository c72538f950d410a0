#!/usr/bin/env bash
# The GPU check, run on the lent device machine in one call (see BENCHMARKS.md):
#   device run: bash benchmarks/gpu/device_check.sh      (carry: .device_data)
# In priority order, so that the whole run fits in about 6 minutes and a rerun fits in the session's
# 15 minutes of device time (issue 14):
# 1. builds d2r's extension for this GPU with CMake (no internet there),
# 2. runs the GPU tests (pytest -m gpu) against the CPU path, real photos from .device_data,
# 3. runs compute-sanitizer memcheck, then racecheck, on the small GPU tests,
# 4. runs the GPU benchmark (benchmarks/gpu/bench_gpu.py) with what is left of the budget.
# Everything lands in $OUT (log.txt, tests.txt, memcheck.txt, racecheck.txt, bench.json, bench.txt).
# BUDGET_S (default 360): the whole run's budget; a stage that would start too late is skipped, saying so.
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

SMALL="ties or aggregate_images_equals_cpu or save_load or bad_input"
for tool in memcheck racecheck; do
  if [ "$(( $(date +%s) - T0 ))" -lt "$(( ${BUDGET_S:-360} - 150 ))" ] && command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer $tool (small GPU tests)"
    timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_cuda.py -x -k "$SMALL" > "$OUT/$tool.txt" 2>&1
    echo "$tool rc=$? at +$(( $(date +%s) - T0 )) s"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|Invalid|hazard" "$OUT/$tool.txt" | head -20
  else
    echo "== $tool skipped (no compute-sanitizer, or too late: +$(( $(date +%s) - T0 )) s)"
  fi
done

LEFT=$(( ${BUDGET_S:-360} - ( $(date +%s) - T0 ) - 10 ))
if [ "$LEFT" -gt 30 ]; then
  echo "== GPU benchmark (${LEFT} s left)"
  timeout "$LEFT" python3 benchmarks/gpu/bench_gpu.py --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
  echo "bench rc=$? at +$(( $(date +%s) - T0 )) s"
else
  echo "== GPU benchmark skipped (+$(( $(date +%s) - T0 )) s: no time left in the ${BUDGET_S:-360} s budget)"
fi
echo "== done at +$(( $(date +%s) - T0 )) s"
