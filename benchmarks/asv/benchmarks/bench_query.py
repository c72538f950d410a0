"""ASMK* search (k=100) over synthetic aggregated images (65,536 words, ~990 distinct words per image,
Zipf word law as in benchmarks/bench_scale.py), in memory and memory-mapped, at 1,500 and 100,000
images. The two index files are built once per commit measured (setup_cache, seeded) and saved with
Index.save; each benchmark process loads them with Index.load (mmap=False / True)."""
import os

import numpy as np

from . import _data

N_WORDS = 65536
SIZES = [1500, 100_000]
N_QUERIES = 64
BUILD_CHUNK = 10_000


def _codebook():
    import d2r

    return _data.cached("cb65536", lambda: d2r.Codebook(_data.random_centroids(N_WORDS)))


def _queries():
    cb = _codebook()
    return _data.cached("queries", lambda: _data.zipf_images(N_QUERIES, N_WORDS, seed=7, fingerprint=cb.fingerprint))


def _load(path, mode):
    def make():
        import d2r

        idx = d2r.Index.load(path, mmap=(mode == "mmap"))
        q = _queries()
        idx.search_aggregated(q, k=100)          # warm: the queried lists' pages are resident (and verified)
        return idx
    return _data.cached(("index", path, mode), make)


class _IndexFiles:
    """Builds the two index files once per commit; subclasses share the cache (same setup_cache)."""
    timeout = 300

    def setup_cache(self):
        import d2r

        _data.set_threads(2)                     # the build is not timed
        cb = _codebook()
        out = {"files": {}, "postings": {}, "codebook_bytes": int(cb.centroids.nbytes)}
        for n in SIZES:
            rng = np.random.default_rng(1000 + n)
            idx = d2r.Index(cb, kernel="asmk*")
            postings = 0
            for s in range(0, n, BUILD_CHUNK):
                b = _data.zipf_images(min(BUILD_CHUNK, n - s), N_WORDS, seed=rng, fingerprint=cb.fingerprint)
                postings += int(b.words.shape[0])
                idx.add_aggregated(b)
                del b
            path = os.path.abspath(f"asmk_star_{n}.d2r")
            idx.save(path)
            del idx
            out["files"][n] = path
            out["postings"][n] = postings
        return out

    setup_cache.timeout = 900


class Query(_IndexFiles):
    """One query (~990 words) against the index, k=100."""
    params = [SIZES, ["memory", "mmap"]]
    param_names = ["n_images", "load"]

    def setup(self, cache, n_images, mode):
        _data.set_threads()
        self.index = _load(cache["files"][n_images], mode)
        self.query = _queries()[0]

    def time_query(self, cache, n_images, mode):
        self.index.search_aggregated(self.query, k=100)


class BatchedQuery(_IndexFiles):
    """64 queries in one call, k=100 (the time is for the 64)."""
    params = [SIZES, ["memory", "mmap"]]
    param_names = ["n_images", "load"]

    def setup(self, cache, n_images, mode):
        _data.set_threads()
        self.index = _load(cache["files"][n_images], mode)
        self.queries = _queries()

    def time_batched_query(self, cache, n_images, mode):
        self.index.search_aggregated(self.queries, k=100)


class QueryTwoThreads(_IndexFiles):
    """The 100,000-image memory-mapped single query with two native threads (the setting of
    BENCHMARKS.md section 10; noisier on a shared machine)."""
    params = [[100_000], ["mmap"]]
    param_names = ["n_images", "load"]

    def setup(self, cache, n_images, mode):
        _data.set_threads(2)
        self.index = _load(cache["files"][n_images], mode)
        self.query = _queries()[0]

    def teardown(self, cache, n_images, mode):
        _data.set_threads()

    def time_query_2_threads(self, cache, n_images, mode):
        self.index.search_aggregated(self.query, k=100)


class Load(_IndexFiles):
    """Index.load with the default verification (the file is in the page cache)."""
    params = [SIZES, ["memory", "mmap"]]
    param_names = ["n_images", "load"]
    number = 1
    rounds = 1
    repeat = (3, 5, 30.0)

    def setup(self, cache, n_images, mode):
        _data.set_threads()

    def time_load(self, cache, n_images, mode):
        import d2r

        d2r.Index.load(cache["files"][n_images], mmap=(mode == "mmap"))


class FileSize(_IndexFiles):
    """Index file bytes per posting, the embedded codebook left out."""
    params = [SIZES]
    param_names = ["n_images"]
    unit = "bytes"

    def track_bytes_per_posting(self, cache, n_images):
        size = os.path.getsize(cache["files"][n_images]) - cache["codebook_bytes"]
        return size / cache["postings"][n_images]
