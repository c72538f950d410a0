#!/usr/bin/env python
"""Exact quantisation speed: d2r's CPU quantizer (pruned, exact) against faiss IndexFlatL2.

Real RootSIFT descriptors of held-out photos, one call per image (up to --max-desc descriptors), a
k-means codebook trained on the other photos (or given with --codebook). Reports images/s of both,
their ratio, the share of the descriptor x word products the pruning skipped, an exactness check of
d2r against a float64 brute force on a subset, and the machine. Also a synthetic unclustered codebook
(--unclustered), where d2r must fall back to the full product.

    python benchmarks/bench_quantize.py --images ../shared/data/realmix/images \\
        --cache /tmp/qcache --words 65536 --json out.json

The timings of d2r and faiss alternate within one run (medians of --reps repetitions).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import d2r  # noqa: E402
from reference import nearest_words_exact  # noqa: E402


def machine():
    model, flags = platform.processor() or "?", ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("?", "", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                f = line.split(":", 1)[1].split()
                flags = "avx512f" if "avx512f" in f else "avx2" if "avx2" in f else "sse"
    except OSError:
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "simd": flags, "omp_threads": os.environ.get("OMP_NUM_THREADS")}


def brute_force(x, c, m):
    """float64 m nearest words, ties to the lower id (tests/reference.py)."""
    return nearest_words_exact(x, c, m)


def descriptors(images_root, cache, max_desc, train_features):
    """(train descriptors, [query descriptors per image]); every 4th photo (i % 4 == 1) is held out."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    tpath, qpath = cache / "train_desc.npy", cache / "query_desc.npz"
    if tpath.exists() and qpath.exists():
        qz = np.load(qpath)
        return np.load(tpath), [qz[k][:max_desc] for k in qz.files]
    from d2r.extract.rootsift import RootSIFT, extract_many

    paths = sorted(Path(images_root).rglob("*.jpg"))
    if not paths:
        raise SystemExit(f"no .jpg photos under {images_root}")
    out = extract_many(RootSIFT(max_features=train_features, max_image_size=1600), [str(p) for p in paths],
                       progress=False)
    feats = dict(zip(out.images, out))
    q = [str(p) for i, p in enumerate(paths) if i % 4 == 1]
    t = [str(p) for i, p in enumerate(paths) if i % 4 != 1]
    train = np.concatenate([feats[p].descriptors for p in t if p in feats]).astype(np.float32)
    queries = [feats[p].descriptors[:1000].astype(np.float32) for p in q if p in feats]
    np.save(tpath, train)
    np.savez(qpath, *queries)
    return train, [x[:max_desc] for x in queries]


def codebook(path, train, n_words, niter):
    if path and Path(path).exists():
        return np.load(path).astype(np.float32)
    import faiss

    t0 = time.time()
    km = faiss.Kmeans(train.shape[1], n_words, niter=niter, seed=1, min_points_per_centroid=1,
                      max_points_per_centroid=10**6)
    km.train(train)
    c = km.centroids.astype(np.float32)
    print(f"k-means: {n_words} words on {len(train)} descriptors, {niter} iterations: {time.time() - t0:.0f} s",
          flush=True)
    if path:
        np.save(path, c)
    return c


def bench(name, c, queries, m, reps, check_images, blas_threshold):
    import faiss

    faiss.cvar.distance_compute_blas_threshold = blas_threshold
    t0 = time.time()
    cb = d2r.Codebook(c)
    build_s = time.time() - t0
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    for x in queries[:2]:  # warm-up
        cb.quantize(x, m)
        index.search(x, m)
    rates = {"d2r": [], "faiss": [], "d2r_full_product": []}
    n_desc = sum(len(x) for x in queries)
    q = cb._quantizer
    for _ in range(reps):
        q.reset_stats()
        t0 = time.perf_counter()
        for x in queries:
            cb.quantize(x, m)
        rates["d2r"].append(len(queries) / (time.perf_counter() - t0))
        st = q.stats()
        t0 = time.perf_counter()
        for x in queries:
            index.search(x, m)
        rates["faiss"].append(len(queries) / (time.perf_counter() - t0))
        # the exact fused product without pruning (what the default policy falls back to)
        q.prune_policy = "never"
        t0 = time.perf_counter()
        for x in queries:
            cb.quantize(x, m)
        rates["d2r_full_product"].append(len(queries) / (time.perf_counter() - t0))
        q.prune_policy = "auto"
    d2r_ips, faiss_ips = float(np.median(rates["d2r"])), float(np.median(rates["faiss"]))
    full_ips = float(np.median(rates["d2r_full_product"]))
    k, k2, D = st["screen_dims"], st["screen_dims2"], st["dim"]
    pairs = max(1, st["pairs"])
    # exactness on a subset: ids equal to the float64 brute force
    mismatch, checked, faiss_agree = 0, 0, 0
    for x in queries[:check_images]:
        ids, _ = cb.quantize(x, m)
        ref = brute_force(x, c, m)
        mismatch += int((ids != ref).any(1).sum())
        checked += len(x)
        faiss_agree += int((index.search(x, m)[1] == ref).all(1).sum())
    res = {
        "case": name, "n_words": int(c.shape[0]), "dim": int(c.shape[1]), "m": m, "images": len(queries),
        "descriptors": int(n_desc), "mean_descriptors_per_image": n_desc / len(queries),
        "d2r_images_per_s": d2r_ips, "faiss_images_per_s": faiss_ips, "speedup_vs_faiss": d2r_ips / faiss_ips,
        "d2r_runs": rates["d2r"], "faiss_runs": rates["faiss"],
        "d2r_full_product_images_per_s": full_ips, "speedup_vs_full_product": d2r_ips / full_ips,
        "simd": d2r.build_info()["simd"], "prune_decision": st["prune_decision"],
        "d2r_gflops_equivalent": 2.0 * n_desc * c.shape[0] * c.shape[1] * d2r_ips / len(queries) / 1e9,
        "faiss_gflops": 2.0 * n_desc * c.shape[0] * c.shape[1] * faiss_ips / len(queries) / 1e9,
        "pruning_enabled": bool(q.pruning_enabled),
        "pruned_fraction": 1.0 - st["full"] / pairs,
        # multiply-adds done / those of the full product (phase A counted in full)
        "work_fraction": ((st["screened"] * k + st["screened2"] * (k2 - k) + st["full"] * (D - k2)) / (pairs * D))
        if st["pruned_blocks"] else st["full"] / pairs,
        "fallback_rows": st["fallback_rows"], "plain_blocks": st["plain_blocks"], "pruned_blocks": st["pruned_blocks"],
        "codebook_build_s": build_s,
        "exact_check_rows": checked, "exact_mismatch_rows": mismatch, "faiss_rows_equal_to_float64": faiss_agree,
    }
    print(f"{name}: C={c.shape[0]} m={m} {len(queries)} images ({n_desc / len(queries):.0f} desc/image): "
          f"d2r {d2r_ips:.2f} img/s, faiss {faiss_ips:.2f} img/s, x{d2r_ips / faiss_ips:.2f}; "
          f"full product {full_ips:.2f} img/s (d2r / full x{d2r_ips / full_ips:.2f}, pruning decision "
          f"{st['prune_decision']}); "
          f"pruned {100 * res['pruned_fraction']:.1f}% of products (work {100 * res['work_fraction']:.1f}% of full), "
          f"exact: {mismatch} / {checked} rows differ from float64 (faiss equal on {faiss_agree})", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/realmix/images"))
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/d2r-bench-quantize"),
                    help="folder for the extracted descriptors and trained codebooks")
    ap.add_argument("--codebook", action="append", default=[], help="a cached codebook .npy (repeatable)")
    ap.add_argument("--words", type=int, action="append", default=[],
                    help="codebook sizes to train when no --codebook (default 65536 and 8192)")
    ap.add_argument("--niter", type=int, default=6)
    ap.add_argument("--train-features", type=int, default=3000)
    ap.add_argument("--max-desc", type=int, default=1000)
    ap.add_argument("--n-images", type=int, default=100)
    ap.add_argument("--m", type=int, action="append", default=[])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--check-images", type=int, default=3)
    ap.add_argument("--blas-threshold", type=int, default=20)
    ap.add_argument("--unclustered", action="store_true", help="also a synthetic unclustered codebook")
    ap.add_argument("--only-unclustered", action="store_true", help="skip the real codebooks")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    train, queries = descriptors(a.images, a.cache, a.max_desc, a.train_features)
    queries = [x for x in queries if len(x)][:a.n_images]
    books = []
    for p in a.codebook:
        books.append((Path(p).stem, np.load(p).astype(np.float32)))
    if not books:
        for w in (a.words or [65536, 8192]):
            books.append((f"realmix-kmeans-{w}", codebook(Path(a.cache) / f"codebook_{w}.npy", train, w, a.niter)))
    out = {"machine": machine(), "results": []}
    print(json.dumps(out["machine"]), flush=True)
    for m in (a.m or [1]):
        for name, c in ([] if a.only_unclustered else books):
            out["results"].append(bench(name, c, queries, m, a.reps, a.check_images, a.blas_threshold))
        if a.unclustered:
            # a codebook with no cluster structure, queried by descriptors of the same distribution
            # (the hard case: the pruning cannot pay and d2r must fall back to the full product)
            rng = np.random.default_rng(0)
            n_words = max(cb.shape[0] for _, cb in books)
            c = rng.standard_normal((n_words, 128)).astype(np.float32)
            gq = [rng.standard_normal(x.shape).astype(np.float32) for x in queries]
            out["results"].append(bench(f"gaussian-unclustered-{n_words}", c, gq, m, a.reps, 1, a.blas_threshold))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
