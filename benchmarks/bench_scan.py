"""Scan speed of the inverted file, comparable across d2r versions (index formats 2, 3 and 4).

Builds (once per version tag, cached under --dir) an ASMK* index of --images synthetic images with
the word statistics of section 10 (bench_scale.py: 1,000 Zipf draws per image, exponent 0.238,
65,536 words, random 16-byte codes), saves it, loads it memory-mapped (warm) and times, with the
public API and k = 100:

  * single-query latency (median, p95) over --queries queries, each run --rounds times;
  * batched throughput (all --queries queries in one call), ms per query;
  * bytes per posting of the file (file minus codebook, over the postings);
  * the bandwidth bound: the bytes of the lists a query scans (median) over the read bandwidth
    (numpy sums over 2 GiB with as many threads as d2r uses).

The images and queries depend only on --seed, so one run per version (PYTHONPATH pointing at that
version's python/ folder) measures the same index content:

  PYTHONPATH=/tmp/base-scan/python python benchmarks/bench_scan.py --images 100000 --tag base --json a.json
  PYTHONPATH=$PWD/python python benchmarks/bench_scan.py --images 100000 --tag new --json b.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import bandwidth  # noqa: E402

N_WORDS = 65_536
DIM = 128
PER_IMAGE = 1000
BATCH = 10_000


def zipf_batch(d2r, n, exponent, seed, fingerprint):
    rng = np.random.default_rng(seed)
    p = np.arange(1, N_WORDS + 1, dtype=np.float64) ** -float(exponent)
    cdf = np.cumsum(p / p.sum())
    draws = np.searchsorted(cdf, rng.random((n, PER_IMAGE)) * cdf[-1], side="right")
    draws = np.minimum(draws, N_WORDS - 1).astype(np.int32)
    draws.sort(axis=1)
    keep = np.ones(draws.shape, bool)
    keep[:, 1:] = draws[:, 1:] != draws[:, :-1]
    words = draws[keep]
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum(keep.sum(axis=1))
    codes = np.frombuffer(rng.bytes(words.size * 16), np.uint8).reshape(words.size, 16)
    return d2r.AggregatedBatch(offsets, words, codes, fingerprint=fingerprint)




def scanned_bytes(path, queries):
    """Bytes of the posting lists each query's words hold in the file at `path`."""
    from d2r.core import index_io

    meta, sec, _ = index_io.read_index_file(path, mmap=True, verify=False)
    if "word_offsets" in sec:
        wo = np.asarray(sec["word_offsets"], np.int64)
        size = lambda w: wo[w + 1] - wo[w]
    else:   # plain arrays: a 4-byte slot and the code per posting
        off = np.asarray(sec["offsets"], np.int64)
        per = 4 + sec["codes"].reshape(sec["codes"].shape[0], -1).view(np.uint8).shape[1]
        size = lambda w: (off[w + 1] - off[w]) * per
    return np.array([int(size(q.words).sum()) for q in queries])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--exponent", type=float, default=0.238)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/tmp/d2r-scan")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the index file for another run")
    args = ap.parse_args()
    import d2r

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    cb = d2r.Codebook(rng.standard_normal((N_WORDS, DIM)).astype(np.float32))
    path = folder / f"index-{args.images}-{args.tag}.d2r"
    res = {"tag": args.tag, "d2r_file": d2r.__file__, "images": args.images, "threads": d2r.get_num_threads(),
           "simd": d2r.build_info()["simd"], "scan_variant": d2r._native.scan_variant()}
    try:
        from _machine import cpu_model
        res["cpu"] = cpu_model()
    except ImportError:
        pass
    if not path.exists():
        t = time.perf_counter()
        idx = d2r.Index(cb, "asmk*")
        for b, start in enumerate(range(0, args.images, BATCH)):
            m = min(BATCH, args.images - start)
            idx.add_aggregated(zipf_batch(d2r, m, args.exponent, args.seed * 100_003 + b, cb.fingerprint),
                               image_ids=np.arange(start, start + m))
        idx.save(path)
        res["build_s"] = time.perf_counter() - t
        del idx
    idx = d2r.Index.load(path, mmap=True)
    postings = int(idx.stats()["postings"])
    size = path.stat().st_size
    res.update(postings=postings, file_bytes=size, bytes_per_posting=(size - N_WORDS * DIM * 4) / postings)
    q = zipf_batch(d2r, args.queries, args.exponent, args.seed + 7, cb.fingerprint)
    qs = list(q)
    res["scanned_bytes_median"] = float(np.median(scanned_bytes(path, qs)))
    for a in qs:   # warm the page cache and verify the pages
        idx.search_aggregated(a, k=100)
    lat = []
    cpu = time.process_time()
    for _ in range(args.rounds):
        for a in qs:
            t = time.perf_counter()
            idx.search_aggregated(a, k=100)
            lat.append(time.perf_counter() - t)
    # CPU time of the process per query (all threads; spinning OpenMP workers included): less
    # sensitive than wall time to other processes sharing the cores.
    res["query_cpu_ms"] = (time.process_time() - cpu) / len(lat) * 1e3
    lat = np.array(lat)
    res["query_ms_median"] = float(np.median(lat) * 1e3)
    res["query_ms_p95"] = float(np.percentile(lat, 95) * 1e3)
    res["query_ms_min"] = float(lat.min() * 1e3)
    bt = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        idx.search_aggregated(qs, k=100)
        bt.append((time.perf_counter() - t) / len(qs))
    res["batched_ms_per_query"] = float(np.median(bt) * 1e3)
    res["batched_speedup"] = res["query_ms_median"] / res["batched_ms_per_query"]
    r = [np.asarray(x) for x in idx.search_aggregated(qs[:4], k=100)]
    ids = r[0] if r[0].dtype.kind in "iu" else r[1]
    res["top_ids_q0"] = [int(i) for i in ids[0][:10]]
    bw = bandwidth(d2r.get_num_threads())
    res["read_bandwidth_gb_s"] = bw / 1e9
    res["bound_ms"] = res["scanned_bytes_median"] / bw * 1e3
    res["latency_over_bound"] = res["query_ms_median"] / res["bound_ms"]
    print(json.dumps(res))
    if args.json:
        p = Path(args.json)
        old = json.loads(p.read_text()) if p.exists() else []
        p.write_text(json.dumps(old + [res], indent=1))
    if not args.keep:
        del idx
        path.unlink()


if __name__ == "__main__":
    main()
