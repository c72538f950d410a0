"""Attention learned from the collection (d2r.regions.attention) on the three small sets of
bench_expansion.py: the demo set, realmix and the realmix clutter composites (features, codebooks,
regions of the other sources and the query x database inliers come from its cache:
run ``python benchmarks/bench_expansion.py prepare`` first).

Per set: the model is trained on the database's own verified pairs (no labels), then

* feature selection: ASMK* over the top-k database features by attention (queries keep theirs, or
  are selected too), against ASMK* over all features;
* region proposals: at most 5 boxes around high-attention clusters per database image, re-extracted
  on their crops (as every other source), under R-ASMK* (gamma off) and regional search (max),
  against no regions, discovered regions and (composites) the pasted box: "gain share" is
  (mAP - none) / (oracle - none) in the same run.

    python benchmarks/bench_attention.py --json benchmarks/results/attention.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_expansion as be  # noqa: E402
import d2r  # noqa: E402
from d2r.extract import Features, RootSIFT  # noqa: E402
from d2r.regions.attention import (attention_boxes, attention_training_data, labels_from_pairs,  # noqa: E402
                                   select_by_attention, train_attention, verified_pairs)

MAX_REGIONS = 5


def images_of(name):
    """The database images (HxWx3 uint8 arrays or paths) in the cache's database order."""
    from d2r.extract.rootsift import read_image_rgb

    if name == "composites":
        import bench_region_gain as brg

        _, _, _, images, _, ids, _ = brg.build(brg.SEED)
        order = np.argsort(ids)
        return [images[k] for k in order]
    if name == "demo":
        from d2r.datasets import make_demo_set

        return [read_image_rgb(p) for p in make_demo_set(progress=False).imlist]
    from pathlib import Path

    from d2r.datasets import find_realmix, realmix_rootsift

    ds = realmix_rootsift(1000, progress=False)["dataset"]
    root = find_realmix()
    return [read_image_rgb(p if Path(p).is_absolute() else str(root / p)) for p in ds.imlist]


def feats(data, key):
    return [Features(d, loc.astype(np.float32), np.ones(len(d), np.float32), np.ones(len(d), np.float32))
            for d, loc in data[key]]


def regional_maps(data, regions):
    out = {}
    for method in ("R-ASMK* (gamma off)", "Regional search, max"):
        d = dict(data)
        d["regions"] = {"x": regions}
        idx = be.make_index(d, method, "x")
        _, i, _ = be.rankings(idx, d)
        out[method] = be.maps(i, data["gnd"])
    return out


def run_set(name, args):
    t0 = time.perf_counter()
    data = be.load(name)
    db = feats(data, "db")
    cb = d2r.Codebook(data["centroids"])
    res = {"set": name}
    t = time.perf_counter()
    pairs = verified_pairs(db, cb, neighbours=args.neighbours, min_inliers=args.min_inliers, seed=0)
    labels = labels_from_pairs([len(f.descriptors) for f in db], pairs)
    X, y = attention_training_data(db, labels, negatives=args.negatives)
    t_pairs = time.perf_counter() - t
    t = time.perf_counter()
    model = train_attention(X, y, hidden=args.hidden, epochs=args.epochs, seed=0)
    t_train = time.perf_counter() - t
    s = model.score(X)
    pos, neg = s[y == 1], s[y == 0]
    auc = float(np.mean(pos[:, None] > neg[None, np.random.default_rng(0).choice(len(neg), min(5000, len(neg)))]))
    res["training"] = {"pairs": len(pairs), "positives": int(y.sum()), "negatives": int(len(y) - y.sum()),
                       "images_with_positives": int(sum(lab.any() for lab in labels)), "auc_train": auc,
                       "s_pairs": t_pairs, "s_train": t_train}
    print(f"{name}: {len(pairs)} verified pairs, {int(y.sum())} positives / {len(y)} "
          f"({res['training']['images_with_positives']} images), train AUC {auc:.3f}, "
          f"pairs {t_pairs:.0f} s, training {t_train:.0f} s", flush=True)

    # (a) feature selection, ASMK*
    idx = be.make_index(data, "ASMK*", "none")
    _, i, _ = be.rankings(idx, data)
    res["asmk"] = {"all": be.maps(i, data["gnd"])}
    n = int(np.median([len(f.descriptors) for f in db]))
    for frac in args.select:
        k = max(1, int(round(frac * n)))
        sel = [select_by_attention(f, model, k) for f in db]
        d2 = dict(data)
        d2["db"] = [(f.descriptors, f.locations) for f in sel]
        idx = be.make_index(d2, "ASMK*", "none")
        _, i, _ = be.rankings(idx, d2)
        res["asmk"][f"db top {frac:.2f}"] = be.maps(i, data["gnd"])
        rng = np.random.default_rng(0)   # the same number of features chosen at random, for reference
        picks = [np.sort(rng.choice(len(f.descriptors), k, replace=False)) if len(f.descriptors) > k
                 else np.arange(len(f.descriptors)) for f in db]
        d3 = dict(data)
        d3["db"] = [(f.descriptors[p], f.locations[p]) for f, p in zip(db, picks)]
        idx = be.make_index(d3, "ASMK*", "none")
        _, i, _ = be.rankings(idx, d3)
        res["asmk"][f"db random {frac:.2f}"] = be.maps(i, data["gnd"])
        print(f"{name}: ASMK* M {res['asmk']['all']['medium']:.1f} | db top {frac:.2f} "
              f"{res['asmk'][f'db top {frac:.2f}']['medium']:.1f} | random {res['asmk'][f'db random {frac:.2f}']['medium']:.1f}",
              flush=True)

    # (b) region proposals
    images = images_of(name)
    ex = RootSIFT(max_features=2000 if name == "composites" else 1000)
    t = time.perf_counter()
    boxes = [attention_boxes(f.locations, model.score(f.descriptors), im.shape[:2], max_boxes=MAX_REGIONS,
                             top_fraction=args.top_fraction, grid=args.grid, cell_fraction=args.cell_fraction)[0]
             for f, im in zip(db, images)]
    t_prop = (time.perf_counter() - t) / len(db)
    regs = be.crop_regions(images, boxes, db, ex)
    res["regions_per_image"] = float(np.mean([len(b) for b in boxes]))
    res["s_per_image_propose"] = t_prop
    res["regional"] = {"attention": regional_maps(data, regs)}
    for src, r in data["regions"].items():
        res["regional"][src] = regional_maps(data, r)
    if name == "composites":
        import bench_region_gain as brg

        _, _, _, _, gt, ids, _ = brg.build(brg.SEED)
        gt = [gt[k] for k in np.argsort(ids)]
        from d2r.regions.detect import box_iou

        hits = [bool(len(b) and box_iou(np.asarray(b), g).max() >= 0.5) for b, g in zip(boxes, gt)
                if len(np.asarray(g).reshape(-1, 4))]
        res["recall_iou50_all_composites"] = float(np.mean(hits))
    for src, r in res["regional"].items():
        print(f"{name}: {src:12s} " + " | ".join(f"{m}: E/M/H " + "/".join("-" if v is None else f"{v:.1f}"
                                                                             for v in r[m].values())
                                                for m in r), flush=True)
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(be.SETS))
    ap.add_argument("--neighbours", type=int, default=5)
    ap.add_argument("--min-inliers", type=int, default=15)
    ap.add_argument("--negatives", default="all", choices=["all", "unmatched"])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--select", type=float, nargs="*", default=[0.5, 0.75])
    ap.add_argument("--top-fraction", type=float, default=0.25)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--cell-fraction", type=float, default=0.3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = {"args": vars(args), "sets": {}}
    for name in args.sets:
        out["sets"][name] = run_set(name, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
