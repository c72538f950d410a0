"""Concurrent search throughput of one index, ASMK*, D = 128: queries per second from 1, 2 and 4
Python threads on a fresh index and on a memory-mapped one (Index.load(mmap=True)), with and without a
writer thread adding and removing images meanwhile; plus single-query latency.

    python benchmarks/bench_concurrency.py --label new --out new.json
    PYTHONPATH=/path/to/old/python python benchmarks/bench_concurrency.py --label old --out old.json
    python benchmarks/bench_concurrency.py --compare old.json new.json   # the two side by side

Data as in bench_ivf.py: clustered RootSIFT-like descriptors, a pool quantised once, each database
image a subset of the pool (--images images of --desc descriptors, --words words). Queries are
aggregated once beforehand and searched with search_aggregated(k=--k), so the figures are those of
the inverted file (scoring and top-k) and of the bindings, not of quantisation.

Throughput: each configuration runs --duration seconds, --repeats times (interleaved with the other
configurations); reported: the median queries per second and the min-max over the repeats. A
configuration still running --grace seconds after its end is taken for a deadlock: a watchdog ends
the process (status 1, every thread's stack on stderr); the --out file then holds what was measured
before and names the configuration that hung (--compare prints it). The
writer thread alternates add_aggregated of a batch of --writer-batch images and their removal (the
index size stays the same), as fast as it can; its adds + removes per second are reported.
Latency: one query at a time, one thread, --latency-runs runs interleaved over the two indexes;
median and a 95% bootstrap interval of the median, and min / max.
The native core's OpenMP threads: all cores unless --omp-threads (each Python thread's call then runs
its own OpenMP team).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import d2r
from d2r.core.aggregate import aggregate_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402


def machine() -> dict:
    return {"cpu": cpu_model(), "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def clustered(rng, n, centers, spread=0.35):
    c = centers[rng.integers(0, len(centers), n)]
    x = c + spread / np.sqrt(c.shape[1]) * rng.standard_normal(c.shape).astype(np.float32)
    x = np.abs(x)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(args):
    rng = np.random.default_rng(args.seed)
    centers = np.abs(rng.standard_normal((4 * args.words, 128))).astype(np.float32)
    cb = d2r.Codebook(clustered(rng, args.words, centers))
    pool = clustered(rng, args.pool, centers)
    assign, _ = cb.quantize(pool, 1)

    def images(n):
        starts = rng.integers(0, args.pool - 4 * args.desc, n)
        sel = [np.sort(s + rng.choice(4 * args.desc, args.desc, replace=False)) for s in starts]
        x = np.concatenate([pool[s] for s in sel])
        a = np.concatenate([assign[s] for s in sel])
        offs = np.arange(0, n * args.desc + 1, args.desc, dtype=np.int64)
        return aggregate_images(cb, x, offs, "asmk*", 1, a)

    return cb, images(args.images), images(args.queries), images(args.writer_batch)


def throughput(index, queries, n_threads, duration, k, writer_batch=None):
    """Queries per second of n_threads threads searching `index` for `duration` seconds (each thread
    searches one query at a time, rotating through `queries`); with writer_batch, a writer thread
    adds that batch and removes it again in a loop meanwhile. Returns (qps, writer ops per second)."""
    stop = threading.Event()
    start = threading.Barrier(n_threads + 1 + (writer_batch is not None))
    counts = [0] * n_threads
    writes = [0]
    errors = []

    def reader(t):
        try:
            n = len(queries)
            i = t * 7919
            start.wait()
            while not stop.is_set():
                index.search_aggregated(queries[i % n], k=k)
                i += 1
                counts[t] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def writer():
        try:
            ids = np.arange(10**12, 10**12 + len(writer_batch), dtype=np.int64)
            start.wait()
            while not stop.is_set():
                index.add_aggregated(writer_batch, image_ids=ids)
                index.remove(ids)
                writes[0] += 2
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(n_threads)]
    if writer_batch is not None:
        threads.append(threading.Thread(target=writer))
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(duration)
    stop.set()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts) / elapsed, writes[0] / elapsed


def bootstrap_median_ci(v, rng, n_boot=2000, level=0.95):
    v = np.asarray(v)
    meds = np.median(v[rng.integers(0, len(v), (n_boot, len(v)))], axis=1)
    lo, hi = np.percentile(meds, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def run(args):
    if args.omp_threads:
        d2r.set_num_threads(args.omp_threads)
    info = {"label": args.label, "machine": machine(), "d2r": d2r.build_info(), "omp_threads": d2r.get_num_threads(),
            "args": vars(args)}
    print(json.dumps(info), flush=True)
    t = time.perf_counter()
    cb, db, queries, batch = make_data(args)
    fresh = d2r.Index(cb, "asmk*")
    fresh.add_aggregated(db)
    tmp = tempfile.mkdtemp(prefix="d2r_bench_conc_")
    path = Path(tmp) / "index.d2r"
    fresh.save(path)
    mapped = d2r.Index.load(path, mmap=True)
    qlist = [queries[i] for i in range(len(queries))]
    print(f"data and indexes: {time.perf_counter() - t:.1f} s; {len(fresh)} images, "
          f"{fresh.stats()['postings']} postings, {len(qlist)} queries", flush=True)
    for idx in (fresh, mapped):  # warm-up
        for q in qlist[:20]:
            idx.search_aggregated(q, k=args.k)

    indexes = {"fresh": fresh, "mmap": mapped}
    samples, writer_rates, lat = {}, {}, {kind: [] for kind in indexes}

    def report(hung=None):
        results = []
        for c, v in samples.items():
            if v:
                results.append({"index": c[0], "threads": c[1], "writer": c[2], "qps_median": float(np.median(v)),
                                "qps_min": float(min(v)), "qps_max": float(max(v)), "qps": v,
                                "writer_ops_per_s": float(np.median(writer_rates[c])) if c[2] else None})
        rng = np.random.default_rng(1)
        latency = {}
        for kind, v in lat.items():
            if v:
                ms = np.asarray(v) * 1e3
                lo, hi = bootstrap_median_ci(ms, rng)
                latency[kind] = {"median_ms": float(np.median(ms)), "ci95_ms": [lo, hi], "min_ms": float(ms.min()),
                                 "max_ms": float(ms.max()), "runs": len(ms)}
        r = {"info": info, "throughput": results, "latency": latency, "hung": hung}
        if args.out:
            Path(args.out).write_text(json.dumps(r, indent=1))
        return r

    def measure(configs):
        """Every configuration once per round, interleaved. A deadlocked configuration can hold the GIL,
        so the watchdog is faulthandler's (a native thread): the JSON written before each configuration
        names it as the one that hung, and the watchdog ends the process (status 1) with every thread's
        stack on stderr."""
        for rep in range(args.repeats):
            for c in configs:
                kind, n, w = c
                report({"index": kind, "threads": n, "writer": w, "round": rep + 1,
                        "what": f"not finished {args.grace:.0f} s after its end: ended by the watchdog"})
                faulthandler.dump_traceback_later(args.duration + args.grace, exit=True)
                qps, wps = throughput(indexes[kind], qlist, n, args.duration, args.k, batch if w else None)
                faulthandler.cancel_dump_traceback_later()
                samples.setdefault(c, []).append(qps)
                writer_rates.setdefault(c, []).append(wps)
            print(f"{'with' if configs[0][2] else 'without'} a writer: round {rep + 1}/{args.repeats} done",
                  flush=True)

    # Readers alone, the single-query latency, then readers with a writer (where the old builds could
    # deadlock: what was measured before is in the JSON already).
    measure([(kind, n, False) for kind in indexes for n in args.threads])
    for r in range(args.latency_runs):  # interleaved over the two indexes
        q = qlist[r % len(qlist)]
        for kind, idx in indexes.items():
            t = time.perf_counter()
            idx.search_aggregated(q, k=args.k)
            lat[kind].append(time.perf_counter() - t)
    measure([(kind, n, True) for kind in indexes for n in args.threads])
    del mapped, indexes
    try:
        path.unlink()
        os.rmdir(tmp)
    except OSError:
        pass
    return report()


def print_report(r):
    m = r["info"]["machine"]
    print(f"\n[{r['info']['label']}] {m['cpu']}, nproc {m['nproc']} (affinity {m['affinity']}), "
          f"OpenMP threads {r['info']['omp_threads']}, d2r {r['info']['d2r'].get('version')}; "
          f"{r['info']['args']['images']} images, {r['info']['args']['words']} words, k={r['info']['args']['k']}")
    print(f"{'index':6s} {'writer':6s} {'threads':>7s} {'qps (median)':>13s} {'min-max':>17s} {'writer ops/s':>13s}")
    for x in r["throughput"]:
        wr = f"{x['writer_ops_per_s']:.1f}" if x["writer"] else "-"
        print(f"{x['index']:6s} {'yes' if x['writer'] else 'no':6s} {x['threads']:7d} {x['qps_median']:13.0f} "
              f"{x['qps_min']:8.0f}-{x['qps_max']:<8.0f} {wr:>13s}")
    if r.get("hung"):
        h = r["hung"]
        print(f"HUNG (deadlock): {h['index']} index, {h['threads']} reader threads, writer {h['writer']}, round "
              f"{h['round']}: {h['what']}; nothing measured after it")
    if not r["latency"]:
        return
    for kind, v in r["latency"].items():
        print(f"single-query latency, {kind}: median {v['median_ms']:.3f} ms (95% CI {v['ci95_ms'][0]:.3f}-"
              f"{v['ci95_ms'][1]:.3f}), min {v['min_ms']:.3f}, max {v['max_ms']:.3f}, {v['runs']} runs")


def compare(paths):
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for r in runs:
        print_report(r)
    print("\nqps (median) side by side")
    labels = [r["info"]["label"] for r in runs]
    print(f"{'index':6s} {'writer':6s} {'threads':>7s} " + " ".join(f"{lab:>12s}" for lab in labels))
    keyed = [{(x["index"], x["writer"], x["threads"]): x for x in r["throughput"]} for r in runs]
    for key in dict.fromkeys(k for kk in keyed for k in kk):
        vals = [f"{k[key]['qps_median']:12.0f}" if key in k else f"{'-':>12s}" for k in keyed]
        print(f"{key[0]:6s} {'yes' if key[1] else 'no':6s} {key[2]:7d} " + " ".join(vals))
    machines = {json.dumps(r["info"]["machine"], sort_keys=True) for r in runs}
    if len(machines) > 1:
        print("\nnote: the runs come from different machines; compare with care")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="run", help="a name for this build / run, kept in the JSON")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--compare", nargs="+", metavar="JSON", help="print earlier --out files side by side")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--desc", type=int, default=300, help="descriptors per image and per query")
    ap.add_argument("--words", type=int, default=1024)
    ap.add_argument("--pool", type=int, default=200_000, help="descriptors quantised once, images drawn from them")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--duration", type=float, default=1.5, help="seconds per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--writer-batch", type=int, default=20)
    ap.add_argument("--grace", type=float, default=60.0, help="seconds after a measurement before it counts as hung")
    ap.add_argument("--latency-runs", type=int, default=41)
    ap.add_argument("--omp-threads", type=int, default=0, help="d2r.set_num_threads (0: leave the default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.compare:
        compare(args.compare)
        return
    if args.latency_runs < 20:
        ap.error("--latency-runs must be at least 20")
    r = run(args)
    print_report(r)
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1))
        print(f"\nwritten to {args.out}")



if __name__ == "__main__":
    sys.exit(main())
