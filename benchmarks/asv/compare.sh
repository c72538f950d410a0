#!/usr/bin/env bash
# Speed-regression check of d2r between two commits with asv (airspeed velocity).
#
#   benchmarks/asv/compare.sh [BASE] [HEAD]      # default: HEAD^ HEAD, the hot paths only
#
# Builds d2r at both commits in asv's own virtualenv (D2R_CUDA=OFF; the first build of a commit takes
# minutes, later builds reuse CMake's objects), runs the benchmarks of both (asv continuous), prints
# the comparison, and exits 1 when a benchmark got slower by more than FACTOR (asv's statistics
# must also call the difference significant).
#
# Environment:
#   BENCH   regex of benchmarks to run (asv -b); default: the hot paths below. BENCH=. runs them all.
#   FACTOR  slowdown ratio counted as a regression (default 1.05: 5 %).
#   OUT     also write the `asv compare` table to this file.
#   ASV     the asv executable (default: asv on PATH, else /work/venv/bin/asv).
#   QUICK=1 one sample per benchmark (asv --quick): a smoke test, not a measurement.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
base_name="${1:-HEAD^}"
head_name="${2:-HEAD}"
base="$(git rev-parse --verify --quiet "${base_name}^{commit}")" || { echo "unknown commit: $base_name" >&2; exit 2; }
head="$(git rev-parse --verify --quiet "${head_name}^{commit}")" || { echo "unknown commit: $head_name" >&2; exit 2; }
HOT='bench_quantize|bench_query\.(Query|BatchedQuery)\.|bench_add\.Add(Aggregated|Descriptors)\.|bench_regional'
BENCH="${BENCH:-$HOT}"
FACTOR="${FACTOR:-1.05}"
ASV="${ASV:-$(command -v asv || echo /work/venv/bin/asv)}"
MACHINE="${ASV_MACHINE:-d2r-dev}"

if ! "$ASV" machine --machine "$MACHINE" --yes >/dev/null 2>&1; then
    echo "asv machine setup failed" >&2; exit 2
fi
extra=()
[ "${QUICK:-0}" = 1 ] && extra+=(--quick)
echo "asv continuous: ${base:0:8} (${base_name}) -> ${head:0:8} (${head_name}), factor ${FACTOR}, -b '${BENCH}'"
start=$(date +%s)
"$ASV" continuous --machine "$MACHINE" --factor "$FACTOR" -b "$BENCH" --show-stderr "${extra[@]}" "$base" "$head"
rc=$?
echo "asv continuous: exit ${rc}, $(( $(date +%s) - start )) s"
# Rows with no ratio (n/a: a benchmark not run for one of the commits this time) are left out.
table="$("$ASV" compare --machine "$MACHINE" --factor "$FACTOR" --sort ratio "$base" "$head" |
        awk -F'|' '$5 !~ /^ *n\/a *$/')"
echo "$table"
if [ -n "${OUT:-}" ]; then
    {
        echo "# asv compare --factor ${FACTOR} --sort ratio ${base:0:8} ${head:0:8}   (${base_name} -> ${head_name})"
        echo "# machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; d2r native threads: 1 (QueryTwoThreads: 2)"
        echo "$table"
    } > "$OUT"
    echo "written: $OUT"
fi
exit $rc
