"""Spatial-verification re-ranking speed: d2r.verify.rerank vs a naive numpy statement of the official
DELF / D2R code (cKDTree nearest neighbours + skimage-style affine RANSAC loop).

    python benchmarks/bench_verify.py                     # realmix RootSIFT if found, else synthetic
    python benchmarks/bench_verify.py --data synthetic    # 1000-feature synthetic images
    python benchmarks/bench_verify.py --queries 5 --top 100 --naive-pairs 3 --json out.json

Per query: re-rank the top --top database images (1000 RootSIFT features each, --features), i.e.
putative matches (nearest neighbour, distance < 0.9) + affine RANSAC (3-point samples, 10 px,
1000 trials, skimage's early stop) for every pair, then the sort. Reported: median seconds per query
(over --queries queries x --repeat runs), pairs per second, the share of the matching stage (a run with
max_trials=0), at the current thread count and on one thread. The naive baseline (numpy, one pair
at a time: scipy cKDTree when scipy is installed, else a numpy matrix product + argmin, then a Python
loop of up to 1000 RANSAC trials with numpy residuals and skimage's early stop, like
skimage.measure.ransac) is timed on --naive-pairs pairs (the best re-ranked images of the query with
the strongest match) and extrapolated to --top pairs for the ratio. Inlier counts of both are printed
for those pairs (their random streams differ, so they agree closely but not exactly).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import d2r  # noqa: E402
from d2r.core.verify import rerank, verify_pair  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ivf import machine  # noqa: E402


# ---- data ----------------------------------------------------------------------------------------
def realmix_data(n_features):
    try:
        from d2r.datasets import find_realmix, realmix_rootsift
        import cv2  # noqa: F401
    except Exception as exc:  # pragma: no cover
        print(f"# realmix unavailable ({exc}); using synthetic data", flush=True)
        return None
    if find_realmix() is None:
        print("# realmix not found (../shared/data); using synthetic data", flush=True)
        return None
    feats = realmix_rootsift(n_features, progress=False)
    return feats["query"], feats["db"]


def synthetic_data(n_features, n_db, n_queries, seed=0):
    """Unit descriptors with realistic structure: each query shares 10-40 % of its features (under an
    affine map, 1 px noise) with 5 database images; the rest are unrelated images."""
    from d2r.extract.rootsift import Features

    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def feats(desc, yx):
        n = len(desc)
        return Features(unit(desc), yx.astype(np.float32), np.ones(n, np.float32), np.ones(n, np.float32))

    db = [feats(rng.random((n_features, 128)) ** 2, rng.uniform(0, 768, (n_features, 2))) for _ in range(n_db)]
    queries = []
    for q in range(n_queries):
        desc = rng.random((n_features, 128)) ** 2
        yx = rng.uniform(0, 768, (n_features, 2))
        for j in range(5):
            img = (q * 5 + j) % n_db
            k = int(n_features * rng.uniform(0.1, 0.4))
            src = rng.choice(n_features, k, replace=False)
            dst = rng.choice(n_features, k, replace=False)
            desc[dst] = db[img].descriptors[src] + 0.02 * rng.standard_normal((k, 128))
            A = np.array([[0.9, 0.15], [-0.1, 1.1]]) * rng.uniform(0.7, 1.3)
            yx[dst] = db[img].locations[src] @ A.T + rng.uniform(-50, 50, 2) + rng.normal(0, 1, (k, 2))
        queries.append(feats(np.abs(desc), yx))
    return queries, db


def initial_ranking(query, db):
    """A cheap initial score (cosine of mean descriptors) standing in for the ASMK* scores."""
    m = np.stack([f.descriptors.mean(0) if len(f) else np.zeros(query.dim, np.float32) for f in db])
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    qm = query.descriptors.mean(0)
    return m @ (qm / max(np.linalg.norm(qm), 1e-12))


# ---- naive official approach ----------------------------------------------------------------------
def _dynamic_max_trials(n_inliers, n_samples, min_samples, probability):
    eps = np.spacing(1)
    if probability == 0:
        return 0
    if n_inliers == 0:
        return np.inf
    nom = max(eps, 1 - probability)
    denom = max(eps, 1 - (n_inliers / n_samples) ** min_samples)
    with np.errstate(divide="ignore"):
        return np.ceil(np.log(nom) / np.log(denom))


def naive_match_features(q_loc, q_desc, db_loc, db_desc, rng, max_distance=0.9, threshold=10.0,
                         max_trials=1000):
    """image_reranking.MatchFeatures restated with numpy (and scipy's cKDTree when available)."""
    try:
        from scipy import spatial
        _, idx = spatial.cKDTree(db_desc).query(q_desc, distance_upper_bound=max_distance)
        keep = idx != len(db_desc)
    except ImportError:
        d2 = (q_desc ** 2).sum(1)[:, None] - 2 * q_desc @ db_desc.T + (db_desc ** 2).sum(1)[None]
        idx = d2.argmin(1)
        keep = np.sqrt(np.maximum(d2[np.arange(len(idx)), idx], 0)) < max_distance
    src = db_loc[idx[keep]].astype(np.float64)
    dst = q_loc[keep].astype(np.float64)
    n = len(src)
    if n <= 3:
        return 0
    S = np.hstack([src, np.ones((n, 1))])
    best, best_sum = 0, np.inf
    for trial in range(max_trials):
        sample = rng.choice(n, 3, replace=False)
        try:
            M = np.linalg.solve(S[sample], dst[sample])  # skimage: AffineTransform.estimate (SVD)
        except np.linalg.LinAlgError:
            continue
        r = np.sqrt(((S @ M - dst) ** 2).sum(1))
        cnt, s = int((r < threshold).sum()), float((r ** 2).sum())
        if cnt > best or (cnt == best and s < best_sum):
            best, best_sum = cnt, s
            if trial >= _dynamic_max_trials(best, n, 3, 1.0):
                break
    return best


# ---- main -----------------------------------------------------------------------------------------
def time_rerank(queries, db, top, repeat, **kw):
    times, pairs = [], 0
    for q in queries:
        scores = initial_ranking(q, db)
        for _ in range(repeat):
            t0 = time.perf_counter()
            rerank(q, db, scores, top=top, **kw)
            times.append(time.perf_counter() - t0)
        pairs = min(top, len(db))
    return statistics.median(times), pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["auto", "realmix", "synthetic"], default="auto")
    ap.add_argument("--features", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-pairs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    data = None if args.data == "synthetic" else realmix_data(args.features)
    if data is None and args.data == "realmix":
        sys.exit("realmix requested but unavailable")
    source = "realmix RootSIFT" if data is not None else "synthetic"
    if data is None:
        data = synthetic_data(args.features, max(args.top, 120), args.queries)
    queries, db = data
    queries = [q for q in queries if len(q) > 0][: args.queries]
    n_feat = float(np.mean([len(f) for f in db]))
    info = {"machine": machine(), "d2r": d2r.build_info(), "data": source, "db_images": len(db),
            "mean_features": round(n_feat, 1), "args": vars(args)}
    print(json.dumps(info), flush=True)

    results = {}
    threads = d2r.get_num_threads()
    for nt in sorted({threads, 1}, reverse=True):
        d2r.set_num_threads(nt)
        t_full, pairs = time_rerank(queries, db, args.top, args.repeat)
        t_match, _ = time_rerank(queries, db, args.top, args.repeat, max_trials=0)
        results[f"threads_{nt}"] = {"median_s_per_query": t_full, "pairs_per_s": pairs / t_full,
                                    "matching_share": t_match / t_full}
        print(f"d2r rerank, {nt} thread(s): median {t_full:.3f} s/query for {pairs} pairs "
              f"({pairs / t_full:.0f} pairs/s; matching {100 * t_match / t_full:.0f} % of it)", flush=True)
    d2r.set_num_threads(threads)

    # naive baseline on a few pairs: the query whose best re-ranked image has the most inliers, and
    # its first re-ranked images (a true match first, then weaker ones)
    best_q, best_order, best_inl = None, None, -1
    for q in queries:
        order, inl = rerank(q, db, initial_ranking(q, db), top=args.top)
        if inl[order[0]] > best_inl:
            best_q, best_order, best_inl = q, order, int(inl[order[0]])
    rng = np.random.default_rng(0)
    naive_t, ours_t, rows = [], [], []
    q = best_q
    for j in best_order[: args.naive_pairs]:
        f = db[int(j)]
        t0 = time.perf_counter()
        n_naive = naive_match_features(q.locations, q.descriptors, f.locations, f.descriptors, rng)
        naive_t.append(time.perf_counter() - t0)
        d2r.set_num_threads(1)
        t0 = time.perf_counter()
        n_ours = verify_pair(q, f).inliers
        ours_t.append(time.perf_counter() - t0)
        d2r.set_num_threads(threads)
        rows.append((int(j), n_naive, n_ours))
    per_pair = statistics.mean(naive_t)
    naive_query = per_pair * min(args.top, len(db))
    best = results[f"threads_{threads}"]["median_s_per_query"]
    results["naive"] = {"s_per_pair": per_pair, "s_per_query_extrapolated": naive_query,
                        "d2r_single_pair_1_thread_s": statistics.mean(ours_t),
                        "ratio_naive_over_d2r": naive_query / best, "inliers_naive_vs_d2r": rows}
    print(f"naive numpy/official: {per_pair:.3f} s/pair -> {naive_query:.1f} s/query (extrapolated); "
          f"d2r is {naive_query / best:.0f}x faster ({threads} thread(s)); "
          f"single pair, 1 thread: d2r {1e3 * statistics.mean(ours_t):.1f} ms", flush=True)
    for j, a, b in rows:
        print(f"  db image {j}: inliers naive {a}, d2r {b}")
    if args.json:
        Path(args.json).write_text(json.dumps({**info, **results}, indent=1))


if __name__ == "__main__":
    main()
