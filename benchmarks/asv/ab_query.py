"""Paired, interleaved A/B timing of the 100,000-image query between two builds of d2r.

asv measures one commit after the other (one build is installed in its environment at a time), so on
a machine whose load changes from minute to minute (other jobs' builds) a whole round of one commit
can run 2 to 4 times slower than the next. This script keeps both builds loaded at once, in two
worker processes, and alternates short bursts of queries between them (A, B, A, B, ...): each burst
pair sees the same load, and the median of the per-pair ratios B/A is the slowdown.
(--modes regional / add do the same for bench_regional's search and bench_add.AddDescriptors.)

The index is the one of bench_query (same data, same seed: 65,536 words, ~990 words per image,
Zipf exponent 0.238), built by each build for itself and saved to DIR. One native thread.

Usage (the builds: unpacked wheels, e.g. from benchmarks/asv/.asv/env/*/asv-build-cache/<commit>/):
  python benchmarks/asv/ab_query.py --a /tmp/ab/24a730b --b /tmp/ab/125be59 --dir /tmp/ab \
      --modes mmap memory --pairs 30 --burst 10 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def worker(path: str, mode: str) -> None:
    sys.path.insert(0, str(HERE))
    import d2r
    from benchmarks import _data
    from benchmarks.bench_query import BUILD_CHUNK, N_WORDS, _codebook, _queries

    if mode == "regional":                                # bench_regional's index and query
        from benchmarks.bench_regional import _build

        _data.set_threads(1)
        idx, q = _build()
        return _serve(lambda: idx.search_aggregated(q, k=100))
    if mode == "add":                                     # bench_add.AddDescriptors' operation
        from benchmarks.bench_add import AddDescriptors

        bench = AddDescriptors()

        def add():
            bench.setup()                                 # a new empty index (not timed below: cached data)
            t = time.perf_counter()
            bench.time_add_asmk_star()
            return time.perf_counter() - t
        return _serve(None, timed=add)
    _data.set_threads(2)
    cb = _codebook()
    n = 100_000
    if not os.path.exists(path):
        rng = np.random.default_rng(1000 + n)            # as bench_query's setup_cache
        idx = d2r.Index(cb, kernel="asmk*")
        for s in range(0, n, BUILD_CHUNK):
            idx.add_aggregated(_data.zipf_images(min(BUILD_CHUNK, n - s), N_WORDS, seed=rng,
                                                 fingerprint=cb.fingerprint))
        idx.save(path + ".tmp")
        del idx
        os.replace(path + ".tmp", path)
    _data.set_threads(1)
    idx = d2r.Index.load(path, mmap=(mode == "mmap"))
    qs = _queries()
    idx.search_aggregated(qs, k=100)                      # warm
    _serve(lambda: idx.search_aggregated(qs[0], k=100), lambda: idx.search_aggregated(qs, k=100))


def _serve(single, batch=None, timed=None) -> None:
    """Answers "single N" (N timed calls of `single`, or of `timed`, which returns its own time) and
    "batch N" (one timed call of `batch`: the 64 queries) with the list of times."""
    if timed is None:
        def timed():
            t = time.perf_counter()
            single()
            return time.perf_counter() - t
    timed()                                               # warm
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "single":
            ts = [timed() for _ in range(int(cmd[1]))]
        else:
            t = time.perf_counter()
            batch()
            ts = [time.perf_counter() - t]
        print(json.dumps(ts), flush=True)


def _build_id(root) -> str:
    """8 hex digits of the SHA-1 of the build's native module (a file made by another build is not reused)."""
    import hashlib

    so = sorted(Path(root, "d2r").glob("_native*.so"))
    return hashlib.sha1(so[0].read_bytes()).hexdigest()[:8] if so else "nonative"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="folder holding build A's d2r package (the base)")
    ap.add_argument("--b", required=True, help="folder holding build B's d2r package")
    ap.add_argument("--dir", required=True, help="where the index files go (one per build)")
    ap.add_argument("--modes", nargs="+", default=["mmap", "memory"],
                    help="mmap, memory (the 100,000-image query), regional (bench_regional's search), "
                         "add (bench_add.AddDescriptors)")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--burst", type=int, default=10, help="single queries per burst")
    ap.add_argument("--json")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    out = {"a": args.a, "b": args.b, "pairs": args.pairs, "burst": args.burst, "threads": 1, "results": {}}
    for mode in args.modes:
        procs = {}
        for key, root in (("a", args.a), ("b", args.b)):
            env = {**os.environ, "PYTHONPATH": root}
            f = str(Path(args.dir) / f"ab_100000_{Path(root).name}_{_build_id(root)}.d2r")  # one file per build
            procs[key] = subprocess.Popen([sys.executable, __file__, "--a", "-", "--b", "-", "--dir", "-",
                                           "--worker", f, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True, env=env)
            assert procs[key].stdout.readline().strip() == "ready"   # built (if needed) and loaded
        for kind in (("single",) if mode in ("regional", "add") else ("single", "batch")):
            med = {"a": [], "b": []}
            n_pairs = args.pairs if kind == "single" else max(4, args.pairs // 3)
            for i in range(n_pairs):
                order = ("a", "b") if i % 2 == 0 else ("b", "a")
                for key in order:
                    p = procs[key]
                    p.stdin.write(f"{kind} {args.burst}\n")
                    p.stdin.flush()
                    med[key].append(float(np.median(json.loads(p.stdout.readline()))))
            a, b = np.array(med["a"]), np.array(med["b"])
            r = b / a
            res = {"a_ms_median": float(np.median(a) * 1e3), "b_ms_median": float(np.median(b) * 1e3),
                   "a_ms_min": float(a.min() * 1e3), "b_ms_min": float(b.min() * 1e3),
                   "ratio_median": float(np.median(r)), "ratio_q25": float(np.quantile(r, 0.25)),
                   "ratio_q75": float(np.quantile(r, 0.75)), "pairs": n_pairs, "pairs_b_slower": int((r > 1).sum())}
            out["results"][f"{kind}_{mode}"] = res
            print(f"{kind:6s} {mode:6s}  A {res['a_ms_median']:8.2f} ms  B {res['b_ms_median']:8.2f} ms  "
                  f"B/A median {res['ratio_median']:.2f} (IQR {res['ratio_q25']:.2f}-{res['ratio_q75']:.2f}), "
                  f"B slower in {res['pairs_b_slower']}/{n_pairs} pairs", flush=True)
        for p in procs.values():
            p.stdin.close()
            p.wait()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
