import sys, time
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__import__("os").path.abspath(__file__)), ".."))
import numpy as np
import d2r
from benchmarks import _data
d2r.set_num_threads(1)
n_words = int(sys.argv[1])
c = _data.clustered_centroids(n_words, seed=1)
cb = d2r.Codebook(c)
x, _ = _data.descriptors_near(c, 1000, seed=2)
cb.quantize(x[:10], 1)
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
    cb.quantize(x, 1)
print((time.perf_counter() - t) / int(sys.argv[2]) * 1e3, "ms", d2r.build_info().get("simd"))
