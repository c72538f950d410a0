"""One d2r version's query figures on one index file built by bench_scan.py (--keep), for the
side-by-side table of BENCHMARKS.md section 14: with 1 and 2 threads, single queries (wall min /
median / p95 over 64 queries, process CPU time per query) and the 64 queries in one call (wall and
CPU per query). Run it alternately for each version (PYTHONPATH pointing at that version):

  for r in 1 2 3 4; do
    PYTHONPATH=/tmp/rel-scan/python python benchmarks/bench_scan_measure.py /tmp/d2r-scan/index-100000-rel.d2r rel
    PYTHONPATH=/tmp/base-scan/python python benchmarks/bench_scan_measure.py /tmp/d2r-scan/index-100000-v3.d2r base
    PYTHONPATH=$PWD/python python benchmarks/bench_scan_measure.py /tmp/d2r-scan/index-100000-v4.d2r new
  done
"""
import json, sys, time
import numpy as np
import d2r
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_scan import zipf_batch, N_WORDS, DIM
path, tag = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
cb = d2r.Codebook(rng.standard_normal((N_WORDS, DIM)).astype(np.float32))
idx = d2r.Index.load(path, mmap=True)
qs = list(zipf_batch(d2r, 64, 0.238, 7, cb.fingerprint))
for a in qs: idx.search_aggregated(a, k=100)
out = {"tag": tag, "file": path}
for threads in (1, 2):
    d2r.set_num_threads(threads)
    lat = []
    c0 = time.process_time()
    for a in qs:
        t = time.perf_counter(); idx.search_aggregated(a, k=100); lat.append(time.perf_counter() - t)
    cpu = (time.process_time() - c0) / len(qs)
    lat = np.array(lat) * 1e3
    c0 = time.process_time(); t = time.perf_counter()
    idx.search_aggregated(qs, k=100)
    bw, bc = (time.perf_counter() - t) / len(qs) * 1e3, (time.process_time() - c0) / len(qs) * 1e3
    out[f"t{threads}"] = dict(min=lat.min(), median=float(np.median(lat)), p95=float(np.percentile(lat, 95)),
                              cpu=cpu * 1e3, batched_wall=bw, batched_cpu=bc)
print(json.dumps(out))
