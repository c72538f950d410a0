"""Seeded synthetic data shared by the asv benchmarks (no files, no downloads).

Everything here uses only numpy and d2r's public API (d2r.Codebook, d2r.AggregatedBatch, ...), so the
suite runs unchanged on every commit since the format-2 release (24a730b): asv always takes the
benchmark code from the working tree and only builds d2r from the commit being measured.
"""
from __future__ import annotations

import numpy as np

DIM = 128
CODE_BYTES = 16                 # ASMK* binary codes of 128-D descriptors
ZIPF_EXPONENT = 0.238           # measured on realmix RootSIFT (benchmarks/results/scale.json, BENCHMARKS s. 10)
THREADS = 1                     # one native thread: a shared 2-core machine gives steadier numbers

_CACHE: dict = {}


def set_threads(n: int = THREADS) -> None:
    import d2r

    if hasattr(d2r, "set_num_threads"):
        d2r.set_num_threads(n)


def cached(key, make):
    """make() once per benchmark process (asv re-runs setup before every sample)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def clustered_centroids(n_words: int, seed: int = 0, n_clusters: int = 256) -> np.ndarray:
    """(n_words, 128) float32 unit vectors grouped around `n_clusters` centres (a k-means codebook
    of local descriptors is clustered like this, not uniform on the sphere)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, DIM)).astype(np.float32)
    owner = rng.integers(0, n_clusters, n_words)
    c = centres[owner] + np.float32(0.6) * rng.standard_normal((n_words, DIM), dtype=np.float32)
    return _unit_rows(c)


def descriptors_near(centroids: np.ndarray, n: int, seed: int, noise: float = 0.08):
    """(descriptors (n, 128) float32, the generating word of each (n,) int32): each descriptor is a
    random word plus Gaussian noise (per dimension `noise`: at 65,536 words about the distance to its
    nearest neighbouring word), renormalised."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, centroids.shape[0], n).astype(np.int32)
    x = centroids[words] + np.float32(noise) * rng.standard_normal((n, centroids.shape[1]), dtype=np.float32)
    return _unit_rows(x), words


def random_centroids(n_words: int, seed: int = 0) -> np.ndarray:
    """Codebook for benchmarks fed with synthetic aggregated images (only its shape and fingerprint matter)."""
    rng = np.random.default_rng(seed)
    return _unit_rows(rng.standard_normal((n_words, DIM), dtype=np.float32))


def zipf_images(n_images: int, n_words: int, descriptors_per_image: int = 1000, exponent: float = ZIPF_EXPONENT,
                code_bytes: int = CODE_BYTES, seed=0, fingerprint=None):
    """Synthetic aggregated ASMK* images: a copy of ``d2r.synthetic.zipf_images`` as of 125be59 (same
    arrays for the same seed), kept here so that every commit is measured on identical data, including
    commits from before d2r.synthetic had it. Each image draws `descriptors_per_image` words from a Zipf
    law over `n_words` and keeps the distinct ones, each with random code bytes. Returns a
    d2r.AggregatedBatch."""
    import d2r

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    p = np.arange(1, n_words + 1, dtype=np.float64) ** -float(exponent)
    cdf = np.cumsum(p / p.sum())
    draws = np.searchsorted(cdf, rng.random((n_images, descriptors_per_image)) * cdf[-1], side="right")
    draws = np.minimum(draws, n_words - 1).astype(np.int32)
    draws.sort(axis=1)
    keep = np.ones(draws.shape, bool)
    keep[:, 1:] = draws[:, 1:] != draws[:, :-1]
    words = draws[keep]
    offsets = np.zeros(n_images + 1, np.int64)
    offsets[1:] = np.cumsum(keep.sum(axis=1))
    codes = np.frombuffer(rng.bytes(words.size * code_bytes), np.uint8).reshape(words.size, code_bytes)
    return d2r.AggregatedBatch(offsets, words, codes, fingerprint=fingerprint)
