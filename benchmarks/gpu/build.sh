#!/usr/bin/env bash
# Builds d2r's extension for the GPU machine's card with CMake directly (what setup.py runs, so the
# machine's setuptools version does not matter), into python/d2r; log in $OUT/build.txt.
#   source benchmarks/gpu/build.sh      (sets PYTHONPATH to python/)
B=/tmp/d2rbuild
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DD2R_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${D2R_CUDA_ARCH:-90}" \
  -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/python/d2r" > "$OUT/build.txt" 2>&1 \
  && cmake --build $B --target _native -j "$(nproc)" >> "$OUT/build.txt" 2>&1 \
  || { echo "BUILD FAILED"; tail -60 "$OUT/build.txt"; exit 1; }
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
