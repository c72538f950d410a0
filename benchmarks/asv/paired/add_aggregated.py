import sys, time
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__import__("os").path.abspath(__file__)), ".."))
import d2r
from benchmarks import _data
d2r.set_num_threads(1)
cb = d2r.Codebook(_data.random_centroids(65536))
batch = _data.zipf_images(1500, 65536, seed=5, fingerprint=cb.fingerprint)
ts = []
for _ in range(int(sys.argv[1])):
    index = d2r.Index(cb, kernel="asmk*")
    t = time.perf_counter()
    index.add_aggregated(batch)
    ts.append(time.perf_counter() - t)
ts.sort()
print(ts[len(ts) // 2] * 1e3, "ms")
