import sys, time
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__import__("os").path.abspath(__file__)), ".."))
import numpy as np
import d2r
from benchmarks import _data
d2r.set_num_threads(1)
cb = d2r.Codebook(_data.random_centroids(65536))
batch = _data.zipf_images(1500, 65536, seed=5, fingerprint=cb.fingerprint)
q = _data.zipf_images(20, 65536, seed=9, fingerprint=cb.fingerprint)
index = d2r.Index(cb, kernel="asmk*")
index.add_aggregated(batch)
qs = [q[i] for i in range(len(q))]
for x in qs[:3]:
    index.search_aggregated(x, k=100)
ts = []
for _ in range(5):
    for x in qs:
        t = time.perf_counter(); index.search_aggregated(x, k=100); ts.append(time.perf_counter() - t)
ts.sort()
print(ts[len(ts) // 2] * 1e6, "us")
