#!/usr/bin/env bash
# Fuzzing (issue 24): builds the libFuzzer targets (tests/fuzz/native, clang with ASan + UBSan), replays
# every regression input in full, runs each libFuzzer and atheris target for a bounded time from its
# seed corpus, and prints executions and coverage per target. Fails on any crash (a sanitizer report,
# a failed check of a target, an exception a target does not allow), a compiler warning, or a hang.
#
# Run from the repository root inside the CI venv (d2r installed; atheris is installed here if missing:
# the `fuzz` extra). Environment:
#   D2R_FUZZ_SECONDS  seconds per target (default 60)
#   D2R_FUZZ_BUILD    the build folder of the libFuzzer targets (default build/ci-fuzz)
#   D2R_FUZZ_KEEP     a folder to keep the grown corpora and crash inputs in (default: a temporary one)
# Time on a 2-core machine (measured while loaded): the build from scratch about 3 min, then 5 targets
# (6 with tests/fuzz/py/serve_requests.py) x D2R_FUZZ_SECONDS, plus about 2 min of replays, atheris's
# start-up and a no-op cmake check (5 s per target: 2 min 15 s in all without the build): about 10 min
# with the default 60 s.
set -euo pipefail

SECS=${D2R_FUZZ_SECONDS:-60}
BUILD=${D2R_FUZZ_BUILD:-build/ci-fuzz}
PY=${PYTHON:-python}
if [ -n "${D2R_FUZZ_KEEP:-}" ]; then WORK=$D2R_FUZZ_KEEP; mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
SUDO=$(command -v sudo || true)
export OMP_NUM_THREADS=1  # one thread per target: the fuzzers run one input at a time

echo "== fuzz: clang with libFuzzer"
if ! command -v clang++ >/dev/null 2>&1; then
  $SUDO apt-get update -qq > "$WORK/apt.log" 2>&1 \
    && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >> "$WORK/apt.log" 2>&1 \
    || { cat "$WORK/apt.log"; echo "cannot install clang for the fuzz targets"; exit 1; }
fi
printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n' > "$WORK/probe.cpp"
if ! clang++ -fsanitize=fuzzer "$WORK/probe.cpp" -o "$WORK/probe" 2> "$WORK/probe.log"; then
  cat "$WORK/probe.log"; echo "clang++ cannot link libFuzzer (-fsanitize=fuzzer): install clang's runtime (libclang-rt-dev)"; exit 1
fi

echo "== fuzz: building the libFuzzer targets ($BUILD)"
CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DD2R_FUZZ=ON -DD2R_OPENMP=OFF \
      -DD2R_BUILD_PYTHON=OFF -DD2R_BUILD_TESTS=OFF -DD2R_NATIVE_ARCH=OFF -DD2R_CUDA=OFF > "$WORK/build.log" 2>&1 \
      || { cat "$WORK/build.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" --target fuzz_postings fuzz_index_segments fuzz_index_segments_fixcrc \
      >> "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
if grep -E "warning:" "$WORK/build.log"; then echo "compiler warnings in the fuzz build"; exit 1; fi

if ! "$PY" -c "import atheris" 2>/dev/null; then
  echo "== fuzz: installing atheris (the fuzz extra)"
  "$PY" -m pip install -q "atheris>=2.3"
fi

SUMMARY=()
# run_fuzzer NAME CORPUS_NAME CMD...: the regression inputs once each, then a timed run from the seeds.
run_fuzzer() {
  local name=$1 corpus=$2; shift 2
  local reg=tests/fuzz/regressions/$corpus
  if compgen -G "$reg/*" > /dev/null; then
    echo "== fuzz: $name: replaying $(ls "$reg" | wc -l) regression input(s)"
    if ! "$@" "$reg"/* > "$WORK/$name.regressions.log" 2>&1; then
      tail -n 60 "$WORK/$name.regressions.log"; echo "FUZZ FAILURE: $name crashes on a regression input"; exit 1
    fi
  fi
  echo "== fuzz: $name: ${SECS}s from tests/fuzz/corpus/$corpus"
  mkdir -p "$WORK/corpus-$name"
  local rc=0
  "$@" "$WORK/corpus-$name" "tests/fuzz/corpus/$corpus" -max_total_time="$SECS" -timeout=60 -print_final_stats=1 \
       -artifact_prefix="$WORK/crash-$name-" > "$WORK/$name.log" 2>&1 || rc=$?
  local done_line execs
  done_line=$(grep -E "^#[0-9]+[[:space:]]+(DONE|INITED)" "$WORK/$name.log" | tail -n 1 || true)
  execs=$(grep -E "^stat::number_of_executed_units" "$WORK/$name.log" | awk '{print $2}' || true)
  echo "   $(echo "$done_line" | tr "\t" " ")"
  SUMMARY+=("$(printf '%-24s executions %-10s %s' "$name" "${execs:-?}" "$(echo "$done_line" | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)")")
  if [ "$rc" -ne 0 ]; then
    tail -n 80 "$WORK/$name.log"
    echo "FUZZ FAILURE: $name (exit $rc); the input: $(ls "$WORK"/crash-"$name"-* 2>/dev/null | head -n 1)"
    echo "Add it (minimised: the target with -minimize_crash=1 -runs=10000) to tests/fuzz/regressions/$corpus/ with the fix."
    exit 1
  fi
}

for t in postings index_segments index_segments_fixcrc; do
  run_fuzzer "$t" "${t%_fixcrc}" "$BUILD/fuzz_$t"
done

echo "== fuzz: every seed and regression input through the Python targets (pytest)"
"$PY" -m pytest -q -p no:cacheprovider tests/fuzz/test_corpora.py

for f in tests/fuzz/py/*.py; do
  t=$(basename "$f" .py)
  case "$t" in _*) continue ;; esac
  [ -d "tests/fuzz/corpus/$t" ] || { echo "FUZZ FAILURE: $f has no seed corpus tests/fuzz/corpus/$t"; exit 1; }
  run_fuzzer "py-$t" "$t" "$PY" "$f"
done

echo "== fuzz: summary (${SECS}s per target; coverage: libFuzzer's cov (edges) / ft (features))"
printf '%s\n' "${SUMMARY[@]}"
