"""d2r against the `asmk` package (PyPI 0.1.1) on the same codebook and descriptors, ASMK*, D = 128.

    python benchmarks/bench_ivf.py                      # clustered descriptors, C = 8192 and 65536
    python benchmarks/bench_ivf.py --data realmix       # RootSIFT of ../shared/data/realmix photos
    python benchmarks/bench_ivf.py --json out.json      # also write the figures as JSON

Stages, each timed for both libraries and reported with the ratio asmk / d2r (> 1: d2r faster):
  1. quantisation: --quant-images images x --desc descriptors against C words: d2r's fused kernel,
     faiss IndexFlatL2 (what asmk uses; BLAS threshold lowered to 20) and numpy BLAS + argmin, per image.
  2. aggregation + inverted-file build of --images images, assignments computed once and shared.
  3. query latency (aggregation + scoring + ranking; median and p95 over --queries queries), with
     the shared assignments, and end to end including quantisation.
  4. index bytes per image and peak memory (RSS growth of a forked process doing the build).
  5. agreement: every (query, image) score within 1e-5 (asmk's scores mapped to d2r's convention:
     both gamma-normalised) and the rankings equal up to ties.
The database images are subsets of a descriptor pool quantised once (so the 5,000-image stages do not
spend minutes quantising); the codebook is sampled from separate descriptors of the same distribution.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import d2r  # noqa: E402
import asmk_baseline  # noqa: E402
from _machine import cpu_model  # noqa: E402


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


# ---- data ----------------------------------------------------------------------------------------

def clustered(rng, n, centers, spread=0.35):
    c = centers[rng.integers(0, len(centers), n)]
    x = c + spread / np.sqrt(c.shape[1]) * rng.standard_normal(c.shape).astype(np.float32)
    x = np.abs(x)  # RootSIFT-like: non-negative
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_clustered(args, rng):
    centers = np.abs(rng.standard_normal((4 * max(args.words), 128))).astype(np.float32)
    pool = clustered(rng, args.quant_images * args.desc, centers)
    book = clustered(rng, max(args.words), centers)
    return pool, book


def make_realmix(args, rng):
    from d2r.datasets.realmix import realmix_rootsift

    feats = realmix_rootsift(max_features=args.desc)
    arrays = [f.descriptors if hasattr(f, "descriptors") else f for f in feats["db"] + feats["query"]]
    pool = np.vstack(arrays).astype(np.float32)
    return pool, arrays


def images_from_pool(rng, pool_n, n_images, n_desc):
    """Each image: n_desc descriptors drawn from a contiguous stretch of the pool (a 'scene')."""
    starts = rng.integers(0, max(1, pool_n - 4 * n_desc), n_images)
    return [np.sort(s + rng.choice(4 * n_desc, n_desc, replace=False)) for s in starts]


# ---- helpers -------------------------------------------------------------------------------------

def timed(f, *a, **k):
    t = time.perf_counter()
    r = f(*a, **k)
    return r, time.perf_counter() - t


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_growth(fn):
    """Runs fn; returns (fn's result, peak RSS growth in bytes during the call). The peak is reset
    through /proc/self/clear_refs first (Linux), so each call measures its own peak. (No fork: the
    OpenMP runtime is not fork-safe.)"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _proc_status_kb("VmRSS")
    res = fn()
    return res, max(0, _proc_status_kb("VmHWM") - before) * 1024


def quant_bench(pool, n_img, n_desc, centroids):
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 20
    cb = d2r.Codebook(centroids)
    imgs = [pool[i * n_desc:(i + 1) * n_desc] for i in range(n_img)]
    res = {}
    t = time.perf_counter()
    for x in imgs:
        cb.quantize(x, 1)
    res["d2r"] = time.perf_counter() - t
    idx = faiss.IndexFlatL2(centroids.shape[1])
    idx.add(centroids)
    t = time.perf_counter()
    for x in imgs:
        idx.search(x, 1)
    res["faiss"] = time.perf_counter() - t
    norms = (centroids.astype(np.float32) ** 2).sum(1)
    t = time.perf_counter()
    for x in imgs:
        np.argmin(norms[None, :] - 2.0 * (x @ centroids.T), axis=1)
    res["numpy"] = time.perf_counter() - t
    return {k: n_img / v for k, v in res.items()}  # images per second


def run(args, C, pool, book, rng, realmix_arrays=None):
    out = {"C": C}
    centroids = book[rng.choice(len(book), C, replace=False)] if realmix_arrays is None else None
    if realmix_arrays is not None:
        # codebook sampled from the query descriptors; the database images are the other photos
        n_db = 146
        qpool = np.vstack(realmix_arrays[n_db:])
        centroids = qpool[rng.choice(len(qpool), min(C, len(qpool)), replace=False)]
        # jittered so that no descriptor equals a centroid: asmk keeps a word whose residual is zero,
        # d2r drops it (METHOD.md section 3), and the agreement check compares like with like
        centroids = (centroids + 1e-3 * rng.standard_normal(centroids.shape)).astype(np.float32)
        C = len(centroids)
        out["C"] = C
    cb = d2r.Codebook(centroids)

    # 1. quantisation throughput
    nq = args.quant_images if realmix_arrays is None else len(realmix_arrays)
    if realmix_arrays is None:
        out["quantize_img_per_s"] = quant_bench(pool, nq, args.desc, centroids)
    print(f"[C={C}] quantisation (images/s): {out.get('quantize_img_per_s')}", flush=True)

    # shared assignments of the whole pool, computed once by d2r (exact)
    (assign_pool, _), t_assign = timed(cb.quantize, pool, 1)
    out["pool_quantize_s"] = t_assign
    if realmix_arrays is None:
        sel = images_from_pool(rng, len(pool), args.images, args.desc)
        qsel = images_from_pool(rng, len(pool), args.queries, args.desc)
    else:
        offs = np.cumsum([0] + [len(a) for a in realmix_arrays])
        sel = [np.arange(offs[i], offs[i + 1]) for i in range(146)]
        qsel = [np.arange(offs[i], offs[i + 1]) for i in range(146, len(realmix_arrays))]
    db = [pool[s] for s in sel]
    db_assign = [assign_pool[s] for s in sel]
    qs = [pool[s] for s in qsel]
    q_assign = [assign_pool[s] for s in qsel]

    # 2. aggregation + build
    x_all = np.vstack(db)
    a_all = np.vstack(db_assign)
    offs = np.cumsum([0] + [len(d) for d in db]).astype(np.int64)

    def d2r_build():
        idx = d2r.Index(cb, "asmk*")
        t = time.perf_counter()
        idx.add(x_all, offsets=offs, assignments=a_all, progress=False)
        return time.perf_counter() - t, idx.stats()

    def asmk_build():
        built, tm = asmk_baseline.build_asmk(centroids, db, binary=True, assignments=db_assign)
        ivf = built.ivf
        nbytes = 0
        for name in ("ivf_vecs", "ivf_image_ids", "counts", "norm_factor", "idf"):
            v = getattr(ivf, name, None)
            if isinstance(v, np.ndarray):
                nbytes += v.nbytes
            elif isinstance(v, list):
                nbytes += sum(a.nbytes for a in v if isinstance(a, np.ndarray))
        return tm["aggregate"] + tm["ivf_build"], nbytes

    (t_d2r, st), mem_d2r = rss_growth(d2r_build)
    (t_asmk, asmk_bytes), mem_asmk = rss_growth(asmk_build)
    out["build_s"] = {"d2r": t_d2r, "asmk": t_asmk, "ratio": t_asmk / t_d2r}
    out["build_ms_per_image"] = {"d2r": 1e3 * t_d2r / len(db), "asmk": 1e3 * t_asmk / len(db)}
    out["bytes_per_image"] = {"d2r": st["bytes_per_image"], "asmk": asmk_bytes / len(db),
                              "words_per_image": st["words_per_image"]}
    out["peak_rss_growth_mb"] = {"d2r": mem_d2r / 2**20, "asmk": mem_asmk / 2**20}
    print(f"[C={C}] build: {out['build_s']}  bytes/img {out['bytes_per_image']}  rss {out['peak_rss_growth_mb']}",
          flush=True)

    # 3. queries
    index = d2r.Index(cb, "asmk*")
    index.add(x_all, offsets=offs, assignments=a_all, progress=False)
    built, _ = asmk_baseline.build_asmk(centroids, db, binary=True, assignments=db_assign)
    lat_d2r, lat_d2r_e2e = [], []
    for q, qa in zip(qs, q_assign):
        index.search(q, k=100, assignments=qa)  # warm
        t = time.perf_counter()
        index.search(q, k=100, assignments=qa)
        lat_d2r.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.search(q, k=100)
        lat_d2r_e2e.append(time.perf_counter() - t)
    res_asmk, tm = asmk_baseline.search_asmk(built, qs, assignments=q_assign)
    lat_asmk = tm["aggregate"] + tm["search"]
    _, tm_e2e = asmk_baseline.search_asmk(built, qs[: min(len(qs), 20)])
    lat_asmk_e2e = tm_e2e["total"]

    def stats(v):
        v = np.asarray(v) * 1e3
        return {"median_ms": float(np.median(v)), "p95_ms": float(np.percentile(v, 95))}

    out["query"] = {"d2r": stats(lat_d2r), "asmk": stats(lat_asmk)}
    out["query"]["ratio_median"] = out["query"]["asmk"]["median_ms"] / out["query"]["d2r"]["median_ms"]
    out["query_end_to_end"] = {"d2r": stats(lat_d2r_e2e), "asmk": stats(lat_asmk_e2e)}
    out["query_end_to_end"]["ratio_median"] = (out["query_end_to_end"]["asmk"]["median_ms"]
                                               / out["query_end_to_end"]["d2r"]["median_ms"])
    print(f"[C={C}] query: {out['query']}\n[C={C}] end to end: {out['query_end_to_end']}", flush=True)

    # 5. agreement
    q_nw = np.array([len(index.aggregate(q, query=True)) for q in qs])
    scores_d2r, _ = index.score_all(qs)  # insertion order = asmk's image order
    asmk_scores = np.vstack([r[0] for r in res_asmk])
    db_nw = index.word_counts  # insertion order = asmk's order
    conv = asmk_baseline.asmk_scores_to_d2r(asmk_scores, tm["q_nwords"], built.db_nwords, gamma=True,
                                            q_nwords_d2r=q_nw, db_nwords_d2r=db_nw)
    diff = np.abs(conv - scores_d2r)
    rank_bad = 0
    for qi in range(len(qs)):
        order = np.lexsort((np.arange(len(db)), -scores_d2r[qi]))
        s = conv[qi][order]
        rank_bad += int(np.sum(np.diff(s) > 1e-5))
    out["agreement"] = {"max_abs_score_diff": float(diff.max()), "pairs": int(diff.size),
                        "ranking_inversions_beyond_1e-5": rank_bad}
    print(f"[C={C}] agreement: {out['agreement']}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["clustered", "realmix"], default="clustered")
    ap.add_argument("--words", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--desc", type=int, default=1000)
    ap.add_argument("--quant-images", type=int, default=200)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    info = {"machine": machine(), "d2r": d2r.build_info(), "args": vars(args),
            "threads": d2r.get_num_threads()}
    print(json.dumps(info), flush=True)
    if args.data == "clustered":
        pool, book = make_clustered(args, rng)
        arrays = None
    else:
        pool, arrays = make_realmix(args, rng)
        book = None
    results = [run(args, C, pool, book, rng, arrays) for C in args.words]
    print("\nstage                          " + "".join(f"{'C=' + str(r['C']):>26s}" for r in results))

    def row(name, f):
        print(f"{name:30s} " + "".join(f"{f(r):>26s}" for r in results))

    if args.data == "clustered":
        row("quantise img/s d2r|faiss|np", lambda r: "{d2r:.0f}|{faiss:.0f}|{numpy:.0f}".format(**r["quantize_img_per_s"]))
        row("  d2r / best baseline", lambda r: "{:.2f}x".format(
            r["quantize_img_per_s"]["d2r"] / max(r["quantize_img_per_s"]["faiss"], r["quantize_img_per_s"]["numpy"])))
    row("build ms/img d2r|asmk", lambda r: "{d2r:.3f}|{asmk:.3f}".format(**r["build_ms_per_image"]))
    row("  asmk / d2r", lambda r: "{:.1f}x".format(r["build_s"]["ratio"]))
    row("query median ms d2r|asmk", lambda r: "{:.2f}|{:.2f}".format(r["query"]["d2r"]["median_ms"], r["query"]["asmk"]["median_ms"]))
    row("query p95 ms d2r|asmk", lambda r: "{:.2f}|{:.2f}".format(r["query"]["d2r"]["p95_ms"], r["query"]["asmk"]["p95_ms"]))
    row("  asmk / d2r (median)", lambda r: "{:.1f}x".format(r["query"]["ratio_median"]))
    row("end-to-end query ms d2r|asmk", lambda r: "{:.1f}|{:.1f}".format(
        r["query_end_to_end"]["d2r"]["median_ms"], r["query_end_to_end"]["asmk"]["median_ms"]))
    row("  asmk / d2r (median)", lambda r: "{:.1f}x".format(r["query_end_to_end"]["ratio_median"]))
    row("bytes/img d2r|asmk", lambda r: "{:.0f}|{:.0f}".format(r["bytes_per_image"]["d2r"], r["bytes_per_image"]["asmk"]))
    row("peak RSS MB d2r|asmk", lambda r: "{:.0f}|{:.0f}".format(r["peak_rss_growth_mb"]["d2r"], r["peak_rss_growth_mb"]["asmk"]))
    row("max |score diff|", lambda r: "{:.2e}".format(r["agreement"]["max_abs_score_diff"]))
    row("ranking inversions", lambda r: str(r["agreement"]["ranking_inversions_beyond_1e-5"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
