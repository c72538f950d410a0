"""Regions discovered from the database itself: a landmark is what other photos also show.

For each database image, :func:`discover_regions` searches a first ASMK* index (the whole images)
for its nearest neighbours, spatially verifies the pair with each (putative matches + affine RANSAC,
:func:`d2r.verify.verify_pair`), and keeps, for every verified pair (at least ``min_inliers``
inliers), the box of the image's inlier keypoints (from the 5th to the 95th percentile of their
coordinates, robust to a few stray inliers), grown by ``margin`` of its size on each side. Boxes that overlap (IoU above ``merge_iou``) are merged into their union, scored by the sum of
their inliers; the ``max_regions`` best are the image's regions, and boxes covering most of the image
(``max_area``) are left out (the whole image is always region 0). No weights, no training: the
regions come from the collection.

Cost: one search (k = ``neighbours`` + 1) and at most ``neighbours`` verifications per image; at a
million images, as many searches as images (about 0.1 s each at 1M on 2 cores, BENCHMARKS.md section
10) plus the verifications (a few ms each): about a day on 2 cores, spread over a cluster like the
extraction. Images added later get their regions from the index as it is then (pass the index and
the stored features of its images): a landmark no image in the index shows yet gets no region until
it is searched again.
"""
from __future__ import annotations

import time

import numpy as np

__all__ = ["DiscoveredRegions", "discover_regions"]


class DiscoveredRegions(list):
    """Per image, (boxes (R, 4) float64 x1, y1, x2, y2, scores (R,) float32: the merged boxes' inliers),
    best first. ``stats``: images, verified pairs, seconds (search, verification)."""

    stats: dict


def _merge(boxes, scores, merge_iou):
    """Greedy: each box, best first, joins (union) the first kept box it overlaps by more than
    merge_iou, or is kept."""
    from d2r.regions.detect import box_iou

    kept_b, kept_s = [], []
    for b, s in sorted(zip(boxes, scores), key=lambda t: -t[1]):
        if kept_b:
            iou = box_iou(np.asarray(kept_b), b[None])[:, 0]
            j = int(np.argmax(iou))
            if iou[j] > merge_iou:
                k = kept_b[j]
                kept_b[j] = np.array([min(k[0], b[0]), min(k[1], b[1]), max(k[2], b[2]), max(k[3], b[3])])
                kept_s[j] += s
                continue
        kept_b.append(np.asarray(b, np.float64))
        kept_s.append(float(s))
    order = np.argsort(-np.asarray(kept_s), kind="stable")
    return np.asarray(kept_b, np.float64).reshape(-1, 4)[order], np.asarray(kept_s, np.float32)[order]


def discover_regions(features, codebook=None, *, index=None, db_features=None, ids=None, neighbours: int = 5,
                     rounds: int = 3, min_inliers: int = 20, max_regions: int = 5, margin: float = 0.15,
                     merge_iou: float = 0.3, max_area: float = 0.6, min_features: int = 30, explain_radius: float = 24.0, image_sizes=None,
                     seed: int = 0, progress: bool = True):
    """Regions of each image of `features` (d2r.extract.Features, locations (y, x) pixels) from the
    images it verifies against in an index of whole images.

    Either `codebook` (an ASMK* index of `features` themselves is built, the images' own ids 0..n-1
    excluded from their neighbours), or `index` (an existing ASMK* index) with `db_features` (the
    Features of its images: a sequence indexed by id or a mapping id -> Features) and `ids` (the ids of
    `features` in it, excluded from their own neighbours; None for images not in it, e.g. images about
    to be added). image_sizes: (h, w) per image, to clip the boxes (default: the extent of the
    keypoints).

    rounds: searches per image. The first searches with all the image's features; each later one
    with only the features not explained yet (farther than `explain_radius` pixels from every inlier
    of a verified pair, large boxes' included), so that what one neighbour explains (a shared
    background, say) does not hide what others show, each against `neighbours` new neighbours. Returns a :class:`DiscoveredRegions` list of (boxes, scores)."""
    from d2r.core.index import Index
    from d2r.core.verify import verify_pair
    from d2r.core.progress import bar as _bar

    features = list(features)
    n = len(features)
    if index is None:
        if codebook is None:
            raise ValueError("give a codebook (to index the images themselves) or an index with db_features")
        index = Index(codebook, "asmk*")
        index.add([f.descriptors for f in features], progress=False)
        db_features, ids = features, np.arange(n)
    elif db_features is None:
        raise ValueError("with an index, db_features (the Features of its images, by id) are needed to verify")
    if ids is not None and len(ids) != n:
        raise ValueError(f"{len(ids)} ids given for {n} images")
    locs = [np.asarray(f.locations, np.float64).reshape(-1, 2) for f in features]
    sizes = []
    for i in range(n):
        if image_sizes is not None:
            sizes.append(tuple(image_sizes[i][:2]))
        else:
            sizes.append((locs[i][:, 0].max() + 1, locs[i][:, 1].max() + 1) if len(locs[i]) else (1, 1))
    # the features explained by a verified neighbour: its inliers and the features near them
    explained = [np.zeros(len(locs[i]), bool) for i in range(n)]
    found: list[tuple[list, list]] = [([], []) for _ in range(n)]    # the region candidates: boxes, inliers
    seen = [set() if ids is None or ids[i] is None else {int(ids[i])} for i in range(n)]
    pairs, t_search, t_verify = 0, 0.0, 0.0
    bar = _bar(n, "discover regions", progress)
    for r in range(int(rounds)):
        active, queries, masks = [], [], []
        for i in range(n):
            m = ~explained[i] if len(explained[i]) else np.ones(len(locs[i]), bool)
            if m.sum() >= min_features:
                active.append(i)
                queries.append(np.ascontiguousarray(features[i].descriptors[m]))
                masks.append(m)
        if not active:
            break
        if bar is not None:   # one pass per search round over the images it searches: counts are images
            bar.reset(total=len(active))
            bar.set_description(f"discover regions (round {r + 1} of at most {int(rounds)})")
        t = time.perf_counter()
        _, nn = index.search(queries, k=int(neighbours) + max(len(seen[i]) for i in active))
        nn = np.asarray(nn).reshape(len(active), -1)
        t_search += time.perf_counter() - t
        t = time.perf_counter()
        for a, i in enumerate(active):
            h, w = sizes[i]
            q = (queries[a], locs[i][masks[a]])
            done = 0
            for j in nn[a]:
                j = int(j)
                if j in seen[i] or done >= neighbours:
                    continue
                seen[i].add(j)
                done += 1
                other = db_features[j]
                if len(q[0]) < 3 or len(other.descriptors) < 3:
                    continue
                v = verify_pair(q, other, seed=seed)
                pairs += 1
                if v.inliers < min_inliers:
                    continue
                pts = q[1][v.matches[v.inlier_mask, 0]]          # (y, x) of this image's inliers
                y1, x1 = np.percentile(pts, 5, axis=0)   # robust to a few stray inliers
                y2, x2 = np.percentile(pts, 95, axis=0)
                mx, my = margin * (x2 - x1), margin * (y2 - y1)
                box = np.array([max(0.0, x1 - mx), max(0.0, y1 - my), min(float(w), x2 + mx),
                                min(float(h), y2 + my)])
                for c in range(0, len(pts), 256):   # features within explain_radius pixels of an inlier
                    d = np.abs(locs[i][:, None, :] - pts[None, c:c + 256, :]).max(2).min(1)
                    explained[i] |= d <= explain_radius
                if (box[2] - box[0]) * (box[3] - box[1]) <= max_area * w * h:
                    found[i][0].append(box)
                    found[i][1].append(v.inliers)
            if bar is not None:
                bar.update(1)
        t_verify += time.perf_counter() - t
    if bar is not None:
        bar.close()
    out = DiscoveredRegions()
    for boxes, scores in found:
        if boxes:
            b, s = _merge(boxes, scores, merge_iou)
            out.append((b[:max_regions], s[:max_regions]))
        else:
            out.append((np.zeros((0, 4)), np.zeros(0, np.float32)))
    out.stats = {"images": n, "pairs_verified": pairs, "search_s": t_search, "verify_s": t_verify}
    return out
