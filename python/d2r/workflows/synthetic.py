"""`d2r demo --dataset synthetic`: the indexing pipeline on synthetic descriptor scenes (no images).

Each object is a set of local "parts" (unit 128-D descriptors); a view of an object draws some of its
parts with noise. A database image shows an object small, inside clutter: its whole-image features
hold only a few object descriptors (the feature budget is spent on clutter), while its detected box,
re-extracted on the crop as the official D2R pipeline does, holds mostly object descriptors. Clutter-
only images get a box on clutter. Queries are clean views. This is where regional aggregation
(R-ASMK*) helps: the database entry keeps the crop's object words.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from d2r.core.codebook import Codebook
from d2r.workflows.pipeline import default_methods


def _views(rng, parts, n, noise):
    idx = rng.integers(0, parts.shape[0], size=n)
    x = parts[idx] + noise * rng.standard_normal((n, parts.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_scenes(n_objects=60, n_clutter=600, dim=128, seed=0, budget=400, object_share=0.05, crop=250):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((256, dim)).astype(np.float32)

    def parts(n):
        base = centers[rng.integers(0, centers.shape[0], size=n)]
        p = base + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    objects = [parts(300) for _ in range(n_objects)]
    clutter_parts = parts(30000)
    noise = 1.2 / np.sqrt(dim)  # noise vector norm about 1.2 against unit parts
    n_obj = max(1, int(budget * object_share))
    queries, db, positives = [], [], []
    for o, op in enumerate(objects):
        queries.append(_views(rng, op, budget, noise))
        pos = []
        for _ in range(2):
            whole = np.vstack([_views(rng, op, n_obj, noise), _views(rng, clutter_parts, budget - n_obj, noise)])
            box = np.vstack([_views(rng, op, int(crop * 0.4), noise),
                             _views(rng, clutter_parts, crop - int(crop * 0.4), noise)])
            pos.append(len(db))
            db.append([whole, box])
        positives.append(pos)
    for _ in range(n_clutter):
        db.append([_views(rng, clutter_parts, budget, noise), _views(rng, clutter_parts, crop, noise)])
    return queries, db, positives


def average_precision(ranked_ids, positives) -> float:
    pos = set(positives)
    hits, ap = 0, 0.0
    for r, i in enumerate(ranked_ids, start=1):
        if int(i) in pos:
            hits += 1
            ap += hits / r
    return ap / len(pos)


def run_synthetic_demo(n_objects=60, n_clutter=600, n_words=1024, seed=0, out=sys.stdout):
    t0 = time.perf_counter()
    queries, db, positives = make_scenes(n_objects, n_clutter, seed=seed)
    print(f"d2r demo: {len(queries)} queries, {len(db)} database images (objects small inside clutter), "
          f"{n_words}-word codebook", file=out)
    sample = np.vstack([d[0] for d in db[::3]] + queries[::3])
    try:
        cb = Codebook.train(sample, n_words, niter=10, seed=seed)
        how = "k-means (faiss)"
    except ImportError:
        rng = np.random.default_rng(seed)
        cb = Codebook(sample[rng.choice(sample.shape[0], n_words, replace=False)])
        how = "random sample (faiss not installed)"
    print(f"codebook: {how}, {time.perf_counter() - t0:.1f} s", file=out)
    methods = default_methods(cb)
    rows = []
    for name, make, form in methods:
        idx = make()
        t = time.perf_counter()
        if form == "whole":
            idx.add([d[0] for d in db])
        else:
            idx.add_regions_many(db)
        build = time.perf_counter() - t
        lat = []
        aps = []
        for q, pos in zip(queries, positives):
            t = time.perf_counter()
            _, ids = idx.search(q, k=None)
            lat.append(time.perf_counter() - t)
            aps.append(average_precision(ids, pos))
        st = idx.stats()
        rows.append((name, 100 * np.mean(aps), st["entries"], st["bytes_per_image"], build, 1000 * np.median(lat)))
    print(f"\n{'method':32s} {'mAP %':>7s} {'entries':>8s} {'bytes/img':>10s} {'build s':>8s} {'query ms':>9s}", file=out)
    for r in rows:
        print(f"{r[0]:32s} {r[1]:7.1f} {r[2]:8d} {r[3]:10.0f} {r[4]:8.2f} {r[5]:9.2f}", file=out)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s. Synthetic descriptors: see `d2r demo --help`; "
          "`d2r demo` (without --dataset synthetic) runs the real-photo pipeline.", file=out)
    return rows


def zipf_word_probabilities(n_words: int, exponent: float) -> np.ndarray:
    """p(word of rank r) proportional to r^-exponent, r = 1..n_words (word ids in rank order)."""
    p = np.arange(1, n_words + 1, dtype=np.float64) ** -float(exponent)
    return p / p.sum()


def zipf_images(n_images: int, n_words: int, descriptors_per_image: int = 1000, exponent: float = 1.0,
                code_bytes: int = 16, seed=0, fingerprint=None):
    """Synthetic aggregated ASMK* images with realistic word statistics, for benchmarks at scale: each
    image draws `descriptors_per_image` words independently from a Zipf law over `n_words` words
    (:func:`zipf_word_probabilities`) and keeps the distinct ones (about 980 of 1,000 at 65,536
    words and exponent 1), each with random binary code bytes. Returns a d2r.AggregatedBatch (made
    by the codebook with `fingerprint`, if given). seed: an int or a numpy Generator."""
    from d2r.core.aggregate import AggregatedBatch

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    cdf = np.cumsum(zipf_word_probabilities(n_words, exponent))
    draws = np.searchsorted(cdf, rng.random((n_images, descriptors_per_image)) * cdf[-1], side="right")
    draws = np.minimum(draws, n_words - 1).astype(np.int32)
    draws.sort(axis=1)
    keep = np.ones(draws.shape, bool)
    keep[:, 1:] = draws[:, 1:] != draws[:, :-1]
    words = draws[keep]
    offsets = np.zeros(n_images + 1, np.int64)
    offsets[1:] = np.cumsum(keep.sum(axis=1))
    codes = np.frombuffer(rng.bytes(words.size * code_bytes), np.uint8).reshape(words.size, code_bytes)
    return AggregatedBatch(offsets, words, codes, fingerprint=fingerprint)
