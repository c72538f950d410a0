"""From detector boxes to regions (METHOD.md sections 1-2).

A database image is indexed by R-ASMK / R-ASMK* as a list of regions: region 0 is always the whole
image, regions 1..R-1 are the detected boxes with score >= 0.1 (the D2R default). This module turns
boxes into regions in the two ways the method allows:

* :func:`regions_by_reextraction` -- the official recipe: each box is cropped from the original
  image (``floor(x1), floor(y1), ceil(x2), ceil(y2)``) and local features are extracted again on the
  crop. The crop gets its own feature budget and its own scales; this is where the regional gain
  comes from, so tests and demos of the regional effect should use it.
* :func:`regions_by_selection` -- a cheap variant: region r holds the whole-image descriptors whose
  location falls inside box r. It changes a word's code only where the word has features both
  inside and outside the box, and never the word set, so it gains much less.

Conventions
-----------
* Boxes are ``(x1, y1, x2, y2)`` in pixels of the original image, float64, half-open:
  a point ``(y, x)`` is inside when ``x1 <= x < x2`` and ``y1 <= y < y2``. The image spans
  ``[0, W] x [0, H]``; clipping maps every box into it.
* Feature locations are ``(y, x)`` in pixels (as :class:`d2r.extract.Features` stores them).
* The official detector writes boxes normalised as ``(ymin, xmin, ymax, xmax)`` in [0, 1]:
  :func:`boxes_from_normalized` converts them.
* Selection (:func:`select_boxes`), in this order: keep ``score >= score_threshold``; sort by score,
  descending, stable (equal scores keep their input order); clip to the image; drop boxes that are
  empty or inverted after clipping (``x2 <= x1`` or ``y2 <= y1``); keep at most ``max_boxes``.
  Dropping is counted in :class:`RegionStats`, never an error; NaN / Inf and wrong shapes raise
  ValueError.

Only numpy is imported here; OpenCV (or PIL) is imported when an image file has to be read.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np

from d2r.core.aggregate import Regions
from d2r.extract.image import as_image_array

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "RegionStats",
    "boxes_from_normalized",
    "crop_bounds",
    "grid_proposals",
    "regions_by_reextraction",
    "regions_by_selection",
    "select_boxes",
]

#: Detector score threshold of the official D2R configuration.
DEFAULT_SCORE_THRESHOLD = 0.1


@dataclass
class RegionStats:
    """What happened to the boxes of one image.

    n_boxes_in: boxes given. n_below_threshold: dropped for ``score < score_threshold``.
    n_dropped_empty: dropped because they were empty or inverted after clipping.
    n_clipped: kept boxes whose coordinates were changed by clipping to the image.
    n_capped: dropped by ``max_boxes`` (the lowest-scoring ones).
    n_regions: regions produced, region 0 (the whole image) included, i.e. kept boxes + 1.

    ``n_boxes_in == n_below_threshold + n_dropped_empty + n_capped + n_regions - 1``.
    """

    n_boxes_in: int = 0
    n_below_threshold: int = 0
    n_dropped_empty: int = 0
    n_clipped: int = 0
    n_capped: int = 0
    n_regions: int = 1


# --------------------------------------------------------------------------------------------------
# Validation helpers


def _as_boxes(boxes, name: str = "boxes") -> np.ndarray:
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, shape (k, 4)") from exc
    if b.ndim == 1 and b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must have shape (k, 4), got {b.shape}")
    if b.size and not np.isfinite(b).all():
        raise ValueError(f"{name} contain NaN or Inf")
    return np.array(b, dtype=np.float64, copy=True)


def _as_scores(scores, k: int) -> np.ndarray:
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError("scores must be numeric, shape (k,)") from exc
    if s.shape != (k,):
        raise ValueError(f"scores must have shape ({k},) (one per box), got {s.shape}")
    if s.size and not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    return np.array(s, dtype=np.float64, copy=True)


def _as_image_size(image_size) -> Tuple[int, int]:
    try:
        h, w = image_size
    except (TypeError, ValueError) as exc:
        raise ValueError(f"image_size must be (H, W), got {image_size!r}") from exc
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0 \
                or int(v) != v:  # type: ignore[call-overload]
            raise ValueError(f"image_size must be two positive integers (H, W), got {image_size!r}")
    return int(h), int(w)


# --------------------------------------------------------------------------------------------------
# Boxes


def boxes_from_normalized(boxes_yxyx, image_size) -> np.ndarray:
    """Official detector boxes, normalised ``(ymin, xmin, ymax, xmax)`` in [0, 1], to pixel
    ``(x1, y1, x2, y2)`` = ``(xmin W, ymin H, xmax W, ymax H)`` (float64, not clipped, not rounded;
    :func:`crop_bounds` then gives the official crop)."""
    b = _as_boxes(boxes_yxyx, "boxes_yxyx")
    h, w = _as_image_size(image_size)
    out = np.empty_like(b)
    out[:, 0] = b[:, 1] * w
    out[:, 1] = b[:, 0] * h
    out[:, 2] = b[:, 3] * w
    out[:, 3] = b[:, 2] * h
    return out


def crop_bounds(box) -> Tuple[int, int, int, int]:
    """Integer pixel bounds ``(x0, y0, x1, y1)`` of the crop of a box, as the official code crops:
    ``(floor(x1), floor(y1), ceil(x2), ceil(y2))``; the crop is ``image[y0:y1, x0:x1]``."""
    b = _as_boxes(np.reshape(np.asarray(box, dtype=np.float64), (1, 4)), "box")[0]
    return (int(math.floor(b[0])), int(math.floor(b[1])), int(math.ceil(b[2])), int(math.ceil(b[3])))


def select_boxes(boxes, scores=None, image_size=None, score_threshold: Optional[float] = DEFAULT_SCORE_THRESHOLD,
                 max_boxes: Optional[int] = None):
    """Detector boxes -> the boxes that become regions.

    boxes: (k, 4) ``(x1, y1, x2, y2)`` pixels. scores: (k,) detector scores, or None (every box is
    kept in the given order: no threshold, no sorting). image_size: ``(H, W)``; None skips clipping
    (empty / inverted boxes are still dropped). score_threshold: keep ``score >= score_threshold``
    (None: no threshold). max_boxes: keep at most this many (the highest-scoring), None: no cap.

    Returns ``(boxes float64 (n, 4), scores float64 (n,) or None, RegionStats)``.
    """
    b = _as_boxes(boxes)
    k = b.shape[0]
    s = None if scores is None else _as_scores(scores, k)
    if score_threshold is not None and (isinstance(score_threshold, bool)
                                        or not isinstance(score_threshold, numbers.Real)
                                        or not math.isfinite(score_threshold)):
        raise ValueError(f"score_threshold must be a finite number or None, got {score_threshold!r}")
    if max_boxes is not None and (isinstance(max_boxes, bool) or not isinstance(max_boxes, numbers.Integral)
                                  or max_boxes < 0):
        raise ValueError(f"max_boxes must be a non-negative integer or None, got {max_boxes!r}")
    size = None if image_size is None else _as_image_size(image_size)

    stats = RegionStats(n_boxes_in=k)
    if s is not None:
        if score_threshold is not None:
            keep = s >= float(score_threshold)
            stats.n_below_threshold = int(k - keep.sum())
            b, s = b[keep], s[keep]
        order = np.argsort(-s, kind="stable")
        b, s = b[order], s[order]

    clipped = np.zeros(b.shape[0], dtype=bool)
    if size is not None and b.shape[0]:
        h, w = size
        c = b.copy()
        c[:, [0, 2]] = np.clip(c[:, [0, 2]], 0.0, float(w))
        c[:, [1, 3]] = np.clip(c[:, [1, 3]], 0.0, float(h))
        clipped = np.any(c != b, axis=1)
        b = c
    nonempty = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    stats.n_dropped_empty = int(b.shape[0] - nonempty.sum())
    b, clipped = b[nonempty], clipped[nonempty]
    if s is not None:
        s = s[nonempty]
    if max_boxes is not None and b.shape[0] > max_boxes:
        stats.n_capped = int(b.shape[0] - max_boxes)
        b, clipped = b[:max_boxes], clipped[:max_boxes]
        if s is not None:
            s = s[:max_boxes]
    stats.n_clipped = int(clipped.sum())
    stats.n_regions = int(b.shape[0]) + 1
    return np.ascontiguousarray(b), s, stats


# --------------------------------------------------------------------------------------------------
# Regions by selection


def _features_parts(features, what: str = "features"):
    desc = getattr(features, "descriptors", None)
    loc = getattr(features, "locations", None)
    if desc is None or loc is None:
        raise TypeError(f"{what} must have .descriptors and .locations (d2r.extract.Features), "
                        f"got {type(features).__name__}")
    desc = np.asarray(desc)
    loc = np.asarray(loc, dtype=np.float64)
    if desc.ndim != 2:
        raise ValueError(f"{what}.descriptors must be 2-D (n, D), got shape {desc.shape}")
    if loc.shape != (desc.shape[0], 2):
        raise ValueError(f"{what}.locations must have shape ({desc.shape[0]}, 2) as (y, x), got {loc.shape}")
    if loc.size and not np.isfinite(loc).all():
        raise ValueError(f"{what}.locations contain NaN or Inf")
    return desc, loc


def regions_by_selection(features, boxes, scores=None, image_size=None, **select_kw):
    """Regions from whole-image features: region 0 holds every descriptor, region r (r >= 1) the
    descriptors whose location ``(y, x)`` lies in box r (``x1 <= x < x2``, ``y1 <= y < y2``), boxes
    taken from :func:`select_boxes` (so in score order). A descriptor may belong to several regions;
    the result uses the CSR membership form of :class:`d2r.Regions` (descriptors are not copied per
    region). Empty regions are kept (they count in R).

    scores None: every box is kept (no threshold). image_size ``(H, W)``: boxes are clipped to it
    (None: not clipped, which does not change membership). ``select_kw``: score_threshold,
    max_boxes. Returns ``(d2r.Regions, RegionStats)``.
    """
    desc, loc = _features_parts(features)
    sel, _, stats = select_boxes(boxes, scores, image_size, **select_kw)
    n = desc.shape[0]
    y, x = loc[:, 0], loc[:, 1]
    parts = [np.arange(n, dtype=np.int64)]
    for x1, y1, x2, y2 in sel:
        inside = (x >= x1) & (x < x2) & (y >= y1) & (y < y2)
        parts.append(np.flatnonzero(inside).astype(np.int64))
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([p.shape[0] for p in parts])
    return Regions(desc, offsets, np.concatenate(parts)), stats


# --------------------------------------------------------------------------------------------------
# Regions by re-extraction


def _shift_features(features, dy: float, dx: float):
    """A copy of features with locations moved by (dy, dx) (crop pixels -> whole-image pixels)."""
    _, loc = _features_parts(features, "extractor output")
    moved = (loc + np.array([dy, dx], dtype=np.float64)).astype(np.float32)
    if dataclasses.is_dataclass(features) and not isinstance(features, type):
        return dataclasses.replace(features, locations=moved)
    out = copy.copy(features)
    out.locations = moved
    return out


def regions_by_reextraction(image, extractor: Callable, boxes, scores=None, whole_features=None,
                            **select_kw):
    """Regions as the official D2R code builds them: each selected box is cropped from the original
    image with :func:`crop_bounds` (``floor(x1), floor(y1), ceil(x2), ceil(y2)``) and the extractor
    is run on the crop.

    image: a path, a PIL image or a uint8 array (HxW, HxWx3 RGB, HxWx4); crops are passed to the
    extractor as uint8 arrays of the same layout (files are decoded to RGB). extractor: any callable
    image -> Features (e.g. ``d2r.extract.RootSIFT(max_features=1000)``). whole_features: region 0's
    features (or an (n, D) descriptor array) if already extracted; otherwise region 0 is
    ``extractor(image)``. Boxes are clipped to the image; ``select_kw`` as in :func:`select_boxes`.

    Returns ``(regions, stats, crop_features)``: regions is a list of (n_r, D) descriptor arrays,
    region 0 (whole image) first, then one per kept box in score order (what ``Index.add_regions``
    takes); crop_features the extractor's Features for each crop, with locations mapped back to
    whole-image pixels (crop location + (floor(y1), floor(x1))).
    """
    if not callable(extractor):
        raise TypeError(f"extractor must be callable (image -> Features), got {type(extractor).__name__}")
    img = as_image_array(image)
    size = (int(img.shape[0]), int(img.shape[1]))
    sel, _, stats = select_boxes(boxes, scores, size, **select_kw)

    if whole_features is None:
        whole_features = extractor(img)
    whole: np.ndarray | None
    if isinstance(whole_features, np.ndarray):
        whole = whole_features
    else:
        whole = getattr(whole_features, "descriptors", None)
        if whole is None:
            raise TypeError("whole_features (or the extractor's output) must be Features or an (n, D) array")
    regions: List[np.ndarray] = [np.asarray(whole)]
    crops = []
    for box in sel:
        x0, y0, x1, y1 = crop_bounds(box)
        crop = np.ascontiguousarray(img[y0:y1, x0:x1])
        f = extractor(crop)
        f = _shift_features(f, float(y0), float(x0))
        crops.append(f)
        regions.append(np.asarray(f.descriptors))
    return regions, stats, crops


def grid_proposals(image_size, levels: int = 2, overlap: float = 0.4) -> np.ndarray:
    """Weight-free region proposals: the R-MAC multi-scale grid (Tolias et al.). At level l = 1..levels,
    square regions of side 2 * min(H, W) / (l + 1), laid out with about `overlap` overlap along the
    longer side. Returns (k, 4) boxes x1, y1, x2, y2 in pixels (the whole image is not included; it is
    region 0 anyway)."""
    h, w = _as_image_size(image_size)
    out = []
    for level in range(1, int(levels) + 1):
        side = 2.0 * min(h, w) / (level + 1)
        nx = max(1, int(math.ceil((w - side) / (side * (1 - overlap)))) + 1) if w > side else 1
        ny = max(1, int(math.ceil((h - side) / (side * (1 - overlap)))) + 1) if h > side else 1
        xs = np.linspace(0, max(w - side, 0), nx)
        ys = np.linspace(0, max(h - side, 0), ny)
        for y in ys:
            for x in xs:
                out.append((x, y, min(x + side, w), min(y + side, h)))
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)
