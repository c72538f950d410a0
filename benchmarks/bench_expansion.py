"""Re-ranking and query expansion on the three small sets: the demo set, realmix and the realmix clutter
composites of bench_region_gain.py. RootSIFT; per set one codebook, per region source the regions
re-extracted on their crops; the inliers of every (query, database image) pair are computed once
(affine RANSAC, whole-image features) and shared by every re-ranking rule.

Per set x region source x method (ASMK* gamma on over whole images, R-ASMK* gamma off and regional
search max over the source's regions) x expansion (none, HQE, alpha-QE) x re-ranking (none, the
official inlier order, the fused rule of d2r.core.verify): mAP Easy / Medium / Hard, and the query
time of the expanded search against the plain one (same run).

    python benchmarks/bench_expansion.py prepare            # features, regions, inliers (cached)
    python benchmarks/bench_expansion.py table --json benchmarks/results/expansion.json
    python benchmarks/bench_expansion.py rules              # the re-ranking rule study
    python benchmarks/bench_expansion.py seeds --sets realmix --features cnn   # ASMK* per codebook seed

The cache lives in $D2R_CACHE_DIR or ~/.cache/d2r (bench_expansion_<set>.pkl); it is rebuilt with
--rebuild. The composites have one relevance level: their Easy = Medium figure is reported, Hard is
empty.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import d2r  # noqa: E402
from d2r.core.evaluate import revisited  # noqa: E402
from d2r.extract import Features, RootSIFT  # noqa: E402

SETS = ("demo", "realmix", "composites")
SOURCES = {"demo": ("none", "discovered", "dataset"), "realmix": ("none", "discovered", "keypoints"),
           "composites": ("none", "discovered", "mser", "oracle")}
MAX_REGIONS = 5
# the accurate CNN features cost 4-5 CPU s per Mpixel (7 scales): they are measured on whole images only
# (re-extracting every region's crop took too long on the shared 2-core machine)
SOURCES_CNN = {"cnn": ("none",), "cnn-fast": ("none", "discovered", "keypoints")}


def cache_dir() -> Path:
    d = Path(os.environ.get("D2R_CACHE_DIR", "~/.cache/d2r")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pack(feats):
    return [(f.descriptors, f.locations) for f in feats]


def _feat(t):
    d, loc = t
    return Features(d, loc, np.ones(len(d), np.float32), np.ones(len(d), np.float32))


def prepare_demo_realmix(name, progress=False, features="rootsift"):
    from d2r.workflows.pipeline import extract_queries

    if features != "rootsift":   # the CNN features (realmix only): the pipeline's extractor, PCA on 20 images
        if name != "realmix":
            raise SystemExit(f"--features {features}: only the realmix set is prepared with the CNN features")
        from d2r.cli import pipeline_extractor
        from d2r.datasets import load_realmix

        ds = load_realmix()
        t = time.perf_counter()
        ex = pipeline_extractor(features, ds, seed=0)
        print(f"realmix {features}: PCA learned ({time.perf_counter() - t:.0f} s)", flush=True)
        t, c = time.perf_counter(), time.process_time()
        db = [ex(p) for p in ds.imlist]
        q = extract_queries(ds, ex, progress=False)
        n = len(ds.imlist) + len(ds.qimlist)
        extract_s = {"wall_s_per_image": (time.perf_counter() - t) / n, "cpu_s_per_image": (time.process_time() - c) / n}
        print(f"realmix {features}: {n} images extracted, {extract_s['wall_s_per_image']:.2f} s / image wall, "
              f"{extract_s['cpu_s_per_image']:.2f} CPU s", flush=True)
        return _finish_prepare(name, ds, ex, db, q, progress, extract_s, SOURCES_CNN[features])
    ex = RootSIFT(max_features=1000)
    if name == "demo":
        from d2r.datasets import make_demo_set

        ds = make_demo_set(progress=False)
        db = [ex(p) for p in ds.imlist]
        q = extract_queries(ds, ex, progress=False)
    else:
        from d2r.datasets import realmix_rootsift

        r = realmix_rootsift(1000, progress=False)
        ds, db, q = r["dataset"], r["db"], r["query"]
        from d2r.datasets import find_realmix
        root = find_realmix()
        ds.imlist = [str(root / p) for p in ds.imlist] if not Path(ds.imlist[0]).is_absolute() else ds.imlist
    return _finish_prepare(name, ds, ex, db, q, progress)


def _finish_prepare(name, ds, ex, db, q, progress, extract_s=None, sources=None):
    from d2r.regions.discover import discover_regions
    from d2r.workflows.pipeline import database_regions, train_codebook

    cb = train_codebook(db, 1024, 0, progress=False)
    regions = {}
    for src in sources or SOURCES[name]:
        t = time.perf_counter()
        if src == "discovered":
            found = discover_regions(db, cb, max_regions=MAX_REGIONS, seed=0, progress=False)
            spec = [b for b, _ in found]
        else:
            spec = src
        regs, boxes, _ = database_regions(ds, ex, db, spec, MAX_REGIONS, progress=progress)
        regions[src] = regs
        print(f"{name}: regions {src}: {np.mean([len(r) - 1 for r in regs]):.1f}/image "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    gnd = [{k: list(g.get(k, [])) for k in ("easy", "hard", "junk")} for g in ds.gnd]
    return {"db": _pack(db), "query": _pack(q), "centroids": cb.centroids, "regions": regions, "gnd": gnd,
            "match_distance": float(getattr(ex, "match_distance", 0.9)), "extract": extract_s}


def prepare_composites(progress=False):
    import bench_region_gain as brg
    from d2r.regions.detect import region_source
    from d2r.regions.discover import discover_regions

    ds, queries, specs, images, gt_boxes, ids, relevance = brg.build(brg.SEED)
    ex = RootSIFT(max_features=brg.FEATURES)
    whole = [ex(img) for img in images]
    qf = [ex(ds.qimlist[q]) for q in queries]
    clutter = np.concatenate([f.descriptors for f, s in zip(whole, specs) if s[1] < 0])
    rng = np.random.default_rng(brg.SEED)
    sample = clutter[np.sort(rng.choice(len(clutter), size=min(200_000, len(clutter)), replace=False))]
    cb = d2r.Codebook.train(sample, brg.WORDS, niter=10, seed=brg.SEED)
    # database position p holds the composite with id ids[k] == p
    order = np.argsort(ids)
    db = [whole[k] for k in order]
    imgs = [images[k] for k in order]
    boxes_gt = [gt_boxes[k] for k in order]
    regions = {}
    for src in SOURCES["composites"]:
        t = time.perf_counter()
        if src == "none":
            boxes = [np.zeros((0, 4)) for _ in imgs]
        elif src == "oracle":
            boxes = boxes_gt
        elif src == "discovered":
            found = discover_regions(db, cb, image_sizes=[im.shape[:2] for im in imgs], max_regions=MAX_REGIONS,
                                     progress=False)
            boxes = [b for b, _ in found]
        else:
            det = region_source(src, max_boxes=MAX_REGIONS)
            boxes = [det(im)[0][:MAX_REGIONS] for im in imgs]
        regs = crop_regions(imgs, boxes, db, ex)
        regions[src] = regs
        print(f"composites: regions {src}: {np.mean([len(r) - 1 for r in regs]):.1f}/image "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    gnd = [{"easy": sorted(pos), "hard": [], "junk": sorted(ign)} for pos, ign in relevance]
    return {"db": _pack(db), "query": _pack(qf), "centroids": cb.centroids, "regions": regions, "gnd": gnd}


def crop_regions(images, boxes, feats, extractor):
    """bench_region_gain.crop_regions (the regions of boxes, re-extracted on their crops)."""
    import bench_region_gain as brg

    return brg.crop_regions(images, boxes, feats, extractor)


def inlier_matrix(data, match_distance=0.4):
    """(n_queries, n_db) inliers of every pair (whole-image features, the official RANSAC settings)."""
    from d2r.core.verify import rerank

    db = [_feat(t) for t in data["db"]]
    out = np.zeros((len(data["query"]), len(db)), np.int64)
    for qi, t in enumerate(data["query"]):
        _, inl = rerank(_feat(t), db, top=None, seed=0, max_distance=match_distance)
        out[qi] = inl
    return out


def load(name, rebuild=False, features="rootsift"):
    suffix = "" if features == "rootsift" else "_" + features.replace("-", "_")
    path = cache_dir() / f"bench_expansion_{name}{suffix}.pkl"
    if path.exists() and not rebuild:
        with open(path, "rb") as f:
            return pickle.load(f)
    t = time.perf_counter()
    if name == "composites":
        if features != "rootsift":
            raise SystemExit(f"--features {features}: only the realmix set is prepared with the CNN features")
        data = prepare_composites()
    else:
        data = prepare_demo_realmix(name, features=features)
    t_inl = time.perf_counter()
    # RootSIFT matches at distance 0.4 (this study's setting); the CNN features at the pipeline's distance
    # for an extractor without its own (0.9)
    data["inliers"] = inlier_matrix(data, 0.4 if features == "rootsift" else data.get("match_distance", 0.9))
    print(f"{name}: prepared in {time.perf_counter() - t:.0f} s (inliers {time.perf_counter() - t_inl:.0f} s)",
          flush=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(data, f)
    os.replace(tmp, path)
    return data


def make_index(data, method, source):
    cb = d2r.Codebook(data["centroids"])
    if method == "ASMK*":
        idx = d2r.Index(cb, "asmk*")
        idx.add([d for d, _ in data["db"]], progress=False)
    elif method == "R-ASMK* (gamma off)":
        idx = d2r.Index(cb, "rasmk*", normalize=False)
        idx.add_regions_many(data["regions"][source], progress=False)
    else:
        idx = d2r.RegionalSearchIndex(cb, "asmk*", pooling="max")
        idx.add_regions_many(data["regions"][source], progress=False)
    return idx


def rankings(idx, data, expand=None):
    qs = [d for d, _ in data["query"]]
    t = time.perf_counter()
    s, i = idx.search(qs, k=None, expand=expand)
    return np.asarray(s), np.asarray(i), (time.perf_counter() - t) / len(qs)


def maps(ranks, gnd):
    res = revisited(ranks, gnd)
    return {p: (100 * res[p]["map"] if res[p].get("n_queries", 1) else None) for p in ("easy", "medium", "hard")}


def rerank_with(ranks, scores, inliers, gnd, rule, top=100):
    """Protocol-aware re-ranking (as d2r.core.verify.rerank_protocol) with `rule` (a
    d2r.core.verify.RerankRule or None: the official inlier order). Returns mAP per protocol."""
    from d2r.core.verify import fused_order

    out = {}
    for p in ("easy", "medium", "hard"):
        new = np.empty_like(ranks)
        for qi in range(ranks.shape[0]):
            g = gnd[qi]
            ign = set(g["junk"]) | (set(g["easy"]) if p == "hard" else set()) | (set(g["hard"]) if p == "easy" else set())
            row = ranks[qi]
            keep = np.array([j for j in row.tolist() if j not in ign][:top], np.int64)
            pos = {j: k for k, j in enumerate(row.tolist())}
            sc = np.array([scores[qi][pos[j]] for j in keep], np.float64)
            inl = inliers[qi][keep]
            order = fused_order(sc, inl, rule)
            head = set(keep.tolist())
            new[qi] = np.concatenate([keep[order], [j for j in row.tolist() if j not in head]])
        out[p] = new
    return {p: maps(out[p], gnd)[p] for p in ("easy", "medium", "hard")}


METHODS = ("ASMK*", "R-ASMK* (gamma off)", "Regional search, max")


def configs(datas):
    """(set, source, method) triples measured: ASMK* once per set (whole images), the regional methods
    per region source."""
    for name, data in datas.items():
        yield name, "none", "ASMK*"
        for src in data["regions"]:
            for m in METHODS[1:]:
                if not (src == "none" and m.startswith("Regional")):   # that is ASMK* again
                    yield name, src, m


def rules_study(datas):
    from d2r.core.verify import RerankRule

    rules = [None] + [RerankRule(t, "inliers") for t in (10, 15, 20, 30)]
    rules += [RerankRule(t, "fused", w, c) for t in (8, 10, 12, 15) for w in (0.05, 0.1, 0.15, 0.25) for c in (100, 200)]
    deltas = {str(r): [] for r in rules}
    out = {"configs": []}
    for name, src, method in configs(datas):
        data = datas[name]
        idx = make_index(data, method, src)
        s, i, _ = rankings(idx, data)
        base = maps(i, data["gnd"])
        row = {"set": name, "source": src, "method": method, "base": base, "rules": {}}
        for r in rules:
            m = rerank_with(i, s, data["inliers"], data["gnd"], r)
            row["rules"][str(r)] = m
            deltas[str(r)].append([m[p] - base[p] for p in ("easy", "medium", "hard") if base[p] is not None])
        out["configs"].append(row)
        print(f"{name:10s} {src:10s} {method:22s} base M {base['medium']:.1f}  official "
              f"{row['rules']['None']['medium']:.1f}", flush=True)
    print(f"{'rule':45s} {'min delta':>9s} {'mean delta':>10s} {'mean dM':>8s}")
    for r in rules:
        d = deltas[str(r)]
        flat = [x for row in d for x in row]
        dm = [row[1] for row in d]
        print(f"{str(r):45s} {min(flat):9.2f} {np.mean(flat):10.2f} {np.mean(dm):8.2f}")
    out["summary"] = {k: {"min": float(min(x for row in v for x in row)), "mean": float(np.mean([x for row in v for x in row]))}
                      for k, v in deltas.items()}
    return out


def verified_rankings(idx, data, expansion, min_inliers, top=100):
    """alpha-QE / HQE over the spatially verified results: the expansion images are the first search's
    results with at least `min_inliers` inliers, best first (the fused rule's promoted head)."""
    from d2r.core.aggregate import aggregate
    from d2r.core.expand import expand_query

    scores, ids, times = [], [], []
    for qi, (d, _) in enumerate(data["query"]):
        t = time.perf_counter()
        qa = aggregate(d, idx.codebook, idx.spec.query_kernel)
        _, first = idx.search_aggregated(qa, k=top)
        inl = data["inliers"][qi][first]
        chosen = first[inl >= max(min_inliers, 1)]
        ex = expand_query(idx, qa, chosen, expansion) if chosen.size else qa
        s, i = idx.search_aggregated(ex, k=None)
        times.append(time.perf_counter() - t)
        scores.append(s)
        ids.append(i)
    return np.stack(scores), np.stack(ids), float(np.median(times))


def expansions_study(datas, expansions, verified=None):
    """mAP deltas of each expansion against no expansion, over every configuration."""
    out = {"configs": []}
    deltas = {str(e): [] for e in expansions}
    for name, src, method in configs(datas):
        data = datas[name]
        idx = make_index(data, method, src)
        s, i, t0 = rankings(idx, data)
        base = maps(i, data["gnd"])
        row = {"set": name, "source": src, "method": method, "base": base, "expansions": {}}
        line = f"{name:10s} {src:10s} {method:22s} M {base['medium']:5.1f} H {base['hard'] or 0:5.1f} |"
        for e in expansions:
            if verified is not None:
                s2, i2, t1 = verified_rankings(idx, data, e, verified)
            else:
                s2, i2, t1 = rankings(idx, data, e)
            m = maps(i2, data["gnd"])
            row["expansions"][str(e)] = {**m, "time_ratio": t1 / t0}
            deltas[str(e)].append([m[p] - base[p] for p in ("easy", "medium", "hard") if base[p] is not None])
            line += f" {m['medium'] - base['medium']:+5.1f}"
        print(line, flush=True)
        out["configs"].append(row)
    for e in expansions:
        d = deltas[str(e)]
        flat = [x for r in d for x in r]
        print(f"{str(e):60s} min {min(flat):6.2f} mean {np.mean(flat):6.2f} mean dM {np.mean([r[1] for r in d]):6.2f}")
    return out


def table(datas, args):
    """Set x source x method x expansion x re-ranking: mAP E / M / H and the expanded search's time
    against the plain one (the same run, one query at a time)."""
    from d2r.core.expand import as_expansion
    from d2r.core.verify import DEFAULT_RULE, OFFICIAL_RULE

    expansions = {"none": None, "hqe": as_expansion("hqe"), "aqe": as_expansion("aqe"),
                  "hqe+sv": as_expansion("hqe"), "aqe+sv": as_expansion("aqe")}
    out = {"rule": str(DEFAULT_RULE), "expansions": {k: str(v) for k, v in expansions.items()}, "rows": []}
    print(f"{'set':10s} {'source':10s} {'method':22s} {'expand':6s} {'E':>5s} {'M':>5s} {'H':>5s} | official SV "
          f"E/M/H | fused SV E/M/H | time x", flush=True)
    for name, src, method in configs(datas):
        data = datas[name]
        idx = make_index(data, method, src)
        t_plain = None
        for ename, e in expansions.items():
            # time: one query at a time, plain and expanded alternately in this run
            if ename.endswith("+sv"):   # over the verified results (inliers cached: search time only)
                s, i, t = verified_rankings(idx, data, e, DEFAULT_RULE.min_inliers)
            else:
                s, i, t = rankings_one_by_one(idx, data, e)
            if e is None:
                t_plain = t
            m = maps(i, data["gnd"])
            off = rerank_with(i, s, data["inliers"], data["gnd"], OFFICIAL_RULE)
            fus = rerank_with(i, s, data["inliers"], data["gnd"], DEFAULT_RULE)
            row = {"set": name, "source": src, "method": method, "expand": ename, "map": m, "official_sv": off,
                   "fused_sv": fus, "seconds_per_query": t, "time_vs_plain": t / t_plain}
            out["rows"].append(row)

            def f(d):
                return "/".join("-" if d[p] is None else f"{d[p]:.1f}" for p in ("easy", "medium", "hard"))

            print(f"{name:10s} {src:10s} {method:22s} {ename:6s} {f(m):>17s} | {f(off):>17s} | {f(fus):>17s} | "
                  f"{t / t_plain:.2f}", flush=True)
    return out


def rankings_one_by_one(idx, data, expand):
    scores, ids, times = [], [], []
    for d, _ in data["query"]:
        t = time.perf_counter()
        s, i = idx.search(d, k=None, expand=expand)
        times.append(time.perf_counter() - t)
        scores.append(s)
        ids.append(i)
    return np.stack(scores), np.stack(ids), float(np.median(times))


def seeds_study(datas, seeds):
    """ASMK* (plain) mAP with the codebook trained with each k-means seed: how much of a difference
    between two feature sets is the codebook's chance."""
    from d2r.workflows.pipeline import train_codebook

    out = {}
    for name, data in datas.items():
        db = [d for d, _ in data["db"]]
        rows = []
        for seed in seeds:
            cb = train_codebook(db, len(data["centroids"]), seed, progress=False)
            idx = d2r.Index(cb, "asmk*")
            idx.add(db, progress=False)
            _, i, _ = rankings(idx, data)
            m = maps(i, data["gnd"])
            rows.append({"seed": seed, **m})
            print(f"{name} seed {seed}: ASMK* mAP E / M / H {m['easy']:.1f} / {m['medium']:.1f} / {m['hard']:.1f}",
                  flush=True)
        out[name] = rows
        for p in ("easy", "medium", "hard"):
            v = [r[p] for r in rows]
            print(f"  {p}: mean {np.mean(v):.1f}, min {min(v):.1f}, max {max(v):.1f}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prepare", "table", "rules", "qe", "seeds"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds: the k-means seeds")
    ap.add_argument("--verified", type=int, default=None, help="qe: expand over the results with this many inliers")
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--features", default="rootsift", choices=["rootsift", "cnn", "cnn-fast"],
                    help="local features (cnn, cnn-fast: realmix only; cached apart, bench_expansion_realmix_cnn.pkl)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.what == "prepare":
        for s in args.sets:
            load(s, args.rebuild, args.features)
        return
    datas = {s: load(s, features=args.features) for s in args.sets}
    if args.what == "rules":
        res = rules_study(datas)
    elif args.what == "seeds":
        res = seeds_study(datas, args.seeds)
    elif args.what == "qe":
        from d2r.core.expand import HQE, AlphaQE

        exps = [HQE(), HQE(top=5), HQE(top=20), HQE(min_matches=5), HQE(min_matches=20), HQE(hamming=24),
                HQE(hamming=40), HQE(min_images=0), HQE(min_images=3),
                AlphaQE(), AlphaQE(top=3), AlphaQE(top=10), AlphaQE(alpha=1.0), AlphaQE(alpha=6.0),
                AlphaQE(min_images=0), AlphaQE(min_images=3)]
        res = expansions_study(datas, exps, args.verified)
    else:
        res = table(datas, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
