#!/usr/bin/env bash
# Nsight Compute profile of the GPU quantizer's kernels (one launch each) on the device machine:
#   device run: bash benchmarks/gpu/profile.sh        -> $OUT/ncu.txt
set -uo pipefail
OUT="${OUT:-/tmp/d2r_out}"; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
source benchmarks/gpu/build.sh
cat > /tmp/prof_q.py <<'PY'
import numpy as np, d2r, torch
rng = np.random.default_rng(0)
u = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
cb = d2r.Codebook(u(rng.standard_normal((65536, 128)).astype(np.float32)))
x = torch.as_tensor(u(rng.standard_normal((64000, 128)).astype(np.float32)), device="cuda")
cb.quantize(x[:1000], 1, device="cuda", output="device")
cb.quantize(x, 1, device="cuda", output="device")
PY
timeout 240 ncu --target-processes all -k regex:"approx_topk|recheck" -s 2 -c 2 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  python3 /tmp/prof_q.py > "$OUT/ncu.txt" 2>&1
echo "ncu rc=$?"
grep -E "approx_topk|recheck|Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|Warp Cycles|Executed Ipc|Shared Memory Configuration|Dynamic Shared|Local" "$OUT/ncu.txt" | head -80
