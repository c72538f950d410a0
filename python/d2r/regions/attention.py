"""Attention learned from the collection itself, without labels (DELF-style, weight-free).

A small model scores each local descriptor: how likely it is to match another image of the
collection under spatial verification. It is trained on the collection's own verified matches:

* each image is searched in an ASMK* index of the whole images, and verified (putative matches +
  affine RANSAC, :func:`d2r.core.verify.verify_pair`) against its ``neighbours`` nearest ones;
* the features that are RANSAC inliers of a pair with at least ``min_inliers`` inliers are the
  positives (:func:`labels_from_pairs`); the features that are never such an inlier are the
  negatives (``negatives="all"``), or only those of images that verify with no other image
  (``negatives="unmatched"``).

The model is a 2-layer MLP over the (L2-normalised) descriptor, ``sigmoid(w2 . relu(W1 x + b1) + b2)``,
trained with Adam on a class-balanced logistic loss in numpy (deterministic for a seed; no PyTorch
needed, neither to train nor to score). It is saved as a small ``.npz`` beside the codebook
(:meth:`AttentionModel.save`).

Uses, as DELF uses its attention:

* feature selection: :func:`select_by_attention` keeps the top-k features by score;
* region proposals: :func:`attention_boxes` puts boxes around clusters of high-attention features
  (at most ``max_boxes``); :class:`AttentionProposals` is the per-image detector (the region source
  ``attention:MODEL.npz``), and ``--regions attention`` trains the model on the database first.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ATTENTION", "AttentionModel", "AttentionProposals", "attention_boxes", "attention_training_data",
           "collection_attention",
           "labels_from_pairs", "select_by_attention", "train_attention", "verified_pairs"]

#: The marker ``region_source("attention")`` returns: attention trained on the collection itself, which
#: needs the whole collection (as ``discovered``), not one image at a time.
ATTENTION = "attention"

_FORMAT = 1


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


class AttentionModel:
    """A 2-layer MLP ``sigmoid(w2 . relu(W1 x + b1) + b2)`` over L2-normalised descriptors.

    w1: (D, H), b1: (H,), w2: (H,), b2: scalar. :meth:`score` gives float32 scores in (0, 1);
    :meth:`save` / :meth:`load` use a ``.npz`` of the weights (numpy only)."""

    def __init__(self, w1, b1, w2, b2, info: Optional[dict] = None) -> None:
        self.w1 = np.asarray(w1, np.float32)
        self.b1 = np.asarray(b1, np.float32).reshape(-1)
        self.w2 = np.asarray(w2, np.float32).reshape(-1)
        self.b2 = float(np.asarray(b2, np.float64).reshape(()))
        if self.w1.ndim != 2 or self.b1.shape != (self.w1.shape[1],) or self.w2.shape != (self.w1.shape[1],):
            raise ValueError(f"attention model: inconsistent shapes w1 {self.w1.shape}, b1 {self.b1.shape}, "
                             f"w2 {self.w2.shape}")
        for name, a in (("w1", self.w1), ("b1", self.b1), ("w2", self.w2)):
            if not np.all(np.isfinite(a)):
                raise ValueError(f"attention model: NaN or Inf in {name}")
        self.info = dict(info or {})

    @property
    def dim(self) -> int:
        """The descriptor dimension the model takes."""
        return int(self.w1.shape[0])

    def logits(self, descriptors) -> np.ndarray:
        """float64 (n,) scores before the sigmoid."""
        x = np.asarray(descriptors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"attention model: descriptors must be (n, {self.dim}), got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("attention model: NaN or Inf in the descriptors")
        h = np.maximum(_normalize(x) @ self.w1 + self.b1, 0.0)
        return (h @ self.w2).astype(np.float64) + self.b2

    def score(self, descriptors) -> np.ndarray:
        """float32 (n,) attention in (0, 1) of each descriptor."""
        return _sigmoid(self.logits(descriptors)).astype(np.float32)

    def save(self, path) -> str:
        """Writes the weights to ``path`` (``.npz``); returns the path."""
        path = os.fspath(path)
        np.savez(path, format=np.int64(_FORMAT), w1=self.w1, b1=self.b1, w2=self.w2, b2=np.float64(self.b2),
                 info=np.array(repr(self.info)))
        return path if path.endswith(".npz") else path + ".npz"

    @classmethod
    def load(cls, path) -> "AttentionModel":
        """Reads a model written by :meth:`save`; ValueError naming what is wrong with a bad file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"attention model not found: {path!r}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z or int(z["format"]) != _FORMAT:
                    raise ValueError(f"{path}: not a d2r attention model (format {_FORMAT})")
                w1, b1, w2, b2 = (z[k] for k in ("w1", "b1", "w2", "b2"))
        except (OSError, KeyError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            if "not a d2r attention model" in str(exc):
                raise
            raise ValueError(f"{path}: not a d2r attention model ({exc})") from exc
        return cls(w1, b1, w2, b2)

    def __repr__(self) -> str:
        return f"AttentionModel(dim={self.dim}, hidden={self.w1.shape[1]})"


def labels_from_pairs(n_features: Sequence[int], pairs: Iterable[Tuple[int, int, Any, Any]]) -> List[np.ndarray]:
    """Per image, int8 labels of its features: 1 where the feature is a RANSAC inlier of a verified
    pair, 0 elsewhere. pairs: ``(i, j, matches (m, 2) int, inlier_mask (m,) bool)``, matches[:, 0]
    indexing image i's features and matches[:, 1] image j's (as :func:`d2r.core.verify.verify_pair`
    returns them)."""
    counts = [int(c) for c in n_features]
    if any(c < 0 for c in counts):
        raise ValueError("labels_from_pairs: negative feature count")
    labels = [np.zeros(c, np.int8) for c in counts]
    for p, (i, j, matches, mask) in enumerate(pairs):
        i, j = int(i), int(j)
        if not (0 <= i < len(counts) and 0 <= j < len(counts)):
            raise ValueError(f"labels_from_pairs: pair {p} names image {i} or {j}, outside 0..{len(counts) - 1}")
        m = np.asarray(matches, np.int64).reshape(-1, 2)
        k = np.asarray(mask, bool).reshape(-1)
        if len(k) != len(m):
            raise ValueError(f"labels_from_pairs: pair {p}: {len(m)} matches but {len(k)} mask entries")
        m = m[k]
        if len(m) and (m[:, 0].min() < 0 or m[:, 0].max() >= counts[i] or m[:, 1].min() < 0
                       or m[:, 1].max() >= counts[j]):
            raise ValueError(f"labels_from_pairs: pair {p}: a match indexes a feature outside its image")
        labels[i][m[:, 0]] = 1
        labels[j][m[:, 1]] = 1
    return labels


def verified_pairs(features, codebook, neighbours: int = 5, min_inliers: int = 15, seed: int = 0,
                   max_distance: Optional[float] = None) -> list:
    """Each image verified against its ``neighbours`` nearest images in an ASMK* index of the whole
    images (itself left out; each unordered pair once). Returns the pairs with at least ``min_inliers``
    inliers as ``(i, j, matches, inlier_mask)``."""
    from d2r.core.index import Index
    from d2r.core.verify import MAX_DISTANCE, verify_pair

    features = list(features)
    if len(features) < 2:
        raise ValueError("attention: need at least 2 images to find verified matches")
    index = Index(codebook, "asmk*")
    index.add([f.descriptors for f in features], progress=False)
    k = min(int(neighbours) + 1, len(features))
    _, nn = index.search([f.descriptors for f in features], k=k)
    nn = np.asarray(nn).reshape(len(features), -1)
    md = MAX_DISTANCE if max_distance is None else float(max_distance)
    out, done = [], set()
    for i in range(len(features)):
        for j in nn[i].tolist():
            j = int(j)
            if j == i or (min(i, j), max(i, j)) in done:
                continue
            done.add((min(i, j), max(i, j)))
            a, b = features[i], features[j]
            if len(a.descriptors) < 3 or len(b.descriptors) < 3:
                continue
            v = verify_pair((a.descriptors, a.locations), (b.descriptors, b.locations), seed=seed, max_distance=md)
            if v.inliers >= min_inliers:
                out.append((i, j, v.matches, v.inlier_mask))
    return out


def attention_training_data(features, labels: Sequence[np.ndarray], negatives: str = "all"
                            ) -> Tuple[np.ndarray, np.ndarray]:
    """(X float32 (n, D), y int8 (n,)) from per-image labels (:func:`labels_from_pairs`).
    negatives: "all" (every feature that is never an inlier) or "unmatched" (only the features of
    images with no inlier at all)."""
    features = list(features)
    if len(features) != len(labels):
        raise ValueError(f"attention_training_data: {len(features)} images but {len(labels)} label arrays")
    if negatives not in ("all", "unmatched"):
        raise ValueError(f"attention_training_data: negatives must be 'all' or 'unmatched', got {negatives!r}")
    xs, ys = [], []
    for k, (f, lab) in enumerate(zip(features, labels)):
        d = np.asarray(f.descriptors, np.float32)
        lab = np.asarray(lab, np.int8)
        if len(lab) != len(d):
            raise ValueError(f"attention_training_data: image {k} has {len(d)} features but {len(lab)} labels")
        keep = np.ones(len(d), bool) if negatives == "all" or not lab.any() else lab == 1
        xs.append(d[keep])
        ys.append(lab[keep])
    dim = features[0].descriptors.shape[1] if features else 0
    return (np.concatenate(xs) if xs else np.zeros((0, dim), np.float32),
            np.concatenate(ys) if ys else np.zeros(0, np.int8))


def train_attention(X, y, hidden: int = 64, epochs: int = 20, batch: int = 512, lr: float = 3e-3,
                    weight_decay: float = 1e-4, seed: int = 0) -> AttentionModel:
    """Trains the MLP on (X, y) with Adam on a class-balanced logistic loss (each class weighs half).
    Deterministic for a seed. ValueError when a class is missing."""
    X = np.asarray(X, np.float32)
    y = np.asarray(y).reshape(-1)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"train_attention: X must be (n, D) with n = len(y), got {X.shape} and {y.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("train_attention: NaN or Inf in X")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("train_attention: labels must be 0 or 1")
    npos = int((y == 1).sum())
    if npos == 0 or npos == len(y):
        raise ValueError(f"train_attention: need both positives and negatives, got {npos} positives of {len(y)} "
                         "(no verified pairs? lower min_inliers or add images that show the same things)")
    if hidden < 1 or epochs < 1 or batch < 1:
        raise ValueError("train_attention: hidden, epochs and batch must be >= 1")
    rng = np.random.default_rng(seed)
    X = _normalize(X).astype(np.float64)
    t = y.astype(np.float64)
    cw = np.where(y == 1, 0.5 / npos, 0.5 / (len(y) - npos)) * len(y)   # mean weight 1
    d = X.shape[1]
    params = [rng.normal(0, np.sqrt(2.0 / d), (d, hidden)), np.zeros(hidden),
              rng.normal(0, np.sqrt(1.0 / hidden), hidden), np.zeros(())]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1_, b2_, eps, step = 0.9, 0.999, 1e-8, 0
    for _ in range(int(epochs)):
        order = rng.permutation(len(X))
        for s in range(0, len(X), int(batch)):
            idx = order[s:s + int(batch)]
            x, tt, w = X[idx], t[idx], cw[idx]
            w1, bb1, w2, bb2 = params
            a = x @ w1 + bb1
            h = np.maximum(a, 0.0)
            z = h @ w2 + bb2
            g = w * (_sigmoid(z) - tt) / len(idx)          # d loss / d z
            gw2 = h.T @ g
            gb2 = np.asarray(g.sum())
            ga = np.outer(g, w2) * (a > 0)
            gw1 = x.T @ ga
            gb1 = ga.sum(0)
            grads = [gw1 + weight_decay * w1, gb1, gw2 + weight_decay * w2, gb2]
            step += 1
            for k, (p, gr) in enumerate(zip(params, grads)):
                m[k] = b1_ * m[k] + (1 - b1_) * gr
                v[k] = b2_ * v[k] + (1 - b2_) * gr * gr
                mh = m[k] / (1 - b1_ ** step)
                vh = v[k] / (1 - b2_ ** step)
                params[k] = p - lr * mh / (np.sqrt(vh) + eps)
    info = {"positives": npos, "negatives": int(len(y) - npos), "hidden": int(hidden), "epochs": int(epochs),
            "seed": int(seed)}
    return AttentionModel(params[0], params[1], params[2], params[3], info)


def select_by_attention(features, model: AttentionModel, k: int):
    """The ``k`` features of ``features`` (d2r.extract.Features) with the highest attention (ties: the
    earlier feature first), in their original order."""
    from d2r.extract import Features

    if int(k) < 1:
        raise ValueError(f"select_by_attention: k must be >= 1, got {k}")
    n = len(features.descriptors)
    if n <= int(k):
        return features
    s = model.score(features.descriptors)
    keep = np.sort(np.argsort(-s, kind="stable")[: int(k)])
    return Features(features.descriptors[keep], features.locations[keep], features.scales[keep],
                    features.scores[keep])


def attention_boxes(locations, scores, image_size, max_boxes: int = 5, top_fraction: float = 0.25,
                    grid: int = 8, cell_fraction: float = 0.3, margin: float = 0.1, max_area: float = 0.6,
                    min_points: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes around clusters of high-attention features.

    1. The ``top_fraction`` of the features with the highest score are kept (ties: earlier first).
    2. Their scores are summed into a ``grid`` x ``grid`` histogram over the image.
    3. Cells holding at least ``cell_fraction`` of the fullest cell's mass are "on"; each 4-connected
       group of "on" cells is a cluster, scored by its mass over the kept features' total.
    4. A cluster's box is the extent of its kept features, grown by ``margin`` of its size on each
       side and clipped; clusters with fewer than ``min_points`` features or a box over ``max_area`` of
       the image are dropped.

    locations: (n, 2) (y, x) pixels (d2r.extract.Features); image_size: (h, w). Returns float64
    (m, 4) ``x1, y1, x2, y2`` and float32 (m,) scores, best first (ties: the cluster met first in
    row-major cell order), m <= max_boxes."""
    loc = np.asarray(locations, np.float64)
    s = np.asarray(scores, np.float64).reshape(-1)
    if loc.ndim != 2 or loc.shape[1] != 2 or len(loc) != len(s):
        raise ValueError(f"attention_boxes: locations must be (n, 2) with one score each, got {loc.shape} "
                         f"and {s.shape}")
    if not (np.all(np.isfinite(loc)) and np.all(np.isfinite(s))):
        raise ValueError("attention_boxes: NaN or Inf in the locations or scores")
    h, w = (float(v) for v in tuple(image_size)[:2])
    if not (h > 0 and w > 0):
        raise ValueError(f"attention_boxes: image_size must be positive (h, w), got {image_size!r}")
    if not 0 < top_fraction <= 1 or not 0 <= cell_fraction <= 1 or grid < 1 or max_boxes < 0:
        raise ValueError("attention_boxes: need 0 < top_fraction <= 1, 0 <= cell_fraction <= 1, grid >= 1, "
                         "max_boxes >= 0")
    empty = (np.zeros((0, 4)), np.zeros(0, np.float32))
    n_top = int(np.ceil(top_fraction * len(s)))
    if n_top == 0 or max_boxes == 0:
        return empty
    top = np.argsort(-s, kind="stable")[:n_top]
    p, ps = loc[top], np.maximum(s[top], 0.0)
    cy = np.clip((p[:, 0] * grid / h).astype(np.int64), 0, grid - 1)
    cx = np.clip((p[:, 1] * grid / w).astype(np.int64), 0, grid - 1)
    mass = np.zeros((grid, grid))
    np.add.at(mass, (cy, cx), ps)
    total = mass.sum()
    if total <= 0:
        return empty
    on = mass >= cell_fraction * mass.max()
    on &= mass > 0
    label = -np.ones((grid, grid), np.int64)
    n_lab = 0
    for r0 in range(grid):
        for c0 in range(grid):
            if not on[r0, c0] or label[r0, c0] >= 0:
                continue
            stack = [(r0, c0)]
            label[r0, c0] = n_lab
            while stack:
                r, c = stack.pop()
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < grid and 0 <= cc < grid and on[rr, cc] and label[rr, cc] < 0:
                        label[rr, cc] = n_lab
                        stack.append((rr, cc))
            n_lab += 1
    lab = label[cy, cx]
    boxes, bscores = [], []
    for k in range(n_lab):
        sel = lab == k
        if sel.sum() < min_points:
            continue
        y1, x1 = p[sel].min(0)
        y2, x2 = p[sel].max(0)
        my, mx = margin * (y2 - y1), margin * (x2 - x1)
        b = np.array([max(0.0, x1 - mx), max(0.0, y1 - my), min(w, x2 + mx), min(h, y2 + my)])
        if b[2] - b[0] < 2 or b[3] - b[1] < 2 or (b[2] - b[0]) * (b[3] - b[1]) > max_area * w * h:
            continue
        boxes.append(b)
        bscores.append(ps[sel].sum() / total)
    if not boxes:
        return empty
    order = np.argsort(-np.asarray(bscores), kind="stable")[: int(max_boxes)]
    return np.asarray(boxes, np.float64)[order], np.asarray(bscores, np.float32)[order]


class AttentionProposals:
    """Region source ``attention:MODEL.npz``: a detector ``image -> (boxes, scores)`` that extracts
    RootSIFT features (``extractor``, default ``RootSIFT(max_features=1000)``), scores them with the
    model and returns :func:`attention_boxes`. ``model``: an :class:`AttentionModel` or the path of
    its ``.npz``."""

    def __init__(self, model, extractor=None, max_boxes: int = 5, **box_options) -> None:
        self.model = model if isinstance(model, AttentionModel) else AttentionModel.load(model)
        if extractor is None:
            from d2r.extract import RootSIFT

            extractor = RootSIFT(max_features=1000)
        self.extractor = extractor
        self.max_boxes = int(max_boxes)
        self.box_options = box_options

    def boxes_for_features(self, features, image_size) -> Tuple[np.ndarray, np.ndarray]:
        """The boxes of already extracted features of an image of ``image_size`` (h, w)."""
        if len(features.descriptors) == 0:
            return np.zeros((0, 4)), np.zeros(0, np.float32)
        return attention_boxes(features.locations, self.model.score(features.descriptors), image_size,
                               max_boxes=self.max_boxes, **self.box_options)

    def __call__(self, image) -> Tuple[np.ndarray, np.ndarray]:
        from d2r.extract.image import as_image_array

        arr = as_image_array(image)
        return self.boxes_for_features(self.extractor(arr), arr.shape[:2])


def collection_attention(features, codebook, image_sizes=None, max_boxes: int = 5, neighbours: int = 5,
                         min_inliers: int = 15, negatives: str = "all", hidden: int = 64, epochs: int = 10,
                         seed: int = 0, max_distance: Optional[float] = None, **box_options):
    """Trains the attention on a collection's own verified pairs and proposes each image's boxes.

    features: the images' d2r.extract.Features; codebook: a d2r.Codebook (for the search that finds
    the pairs to verify); image_sizes: (h, w) per image (default: the extent of the keypoints).
    Returns ``(model, [(boxes, scores) per image])``."""
    features = list(features)
    if image_sizes is not None and len(image_sizes) != len(features):
        raise ValueError(f"collection_attention: {len(image_sizes)} image sizes for {len(features)} images")
    pairs = verified_pairs(features, codebook, neighbours=neighbours, min_inliers=min_inliers, seed=seed,
                           max_distance=max_distance)
    labels = labels_from_pairs([len(f.descriptors) for f in features], pairs)
    X, y = attention_training_data(features, labels, negatives=negatives)
    model = train_attention(X, y, hidden=hidden, epochs=epochs, seed=seed)
    model.info["pairs"] = len(pairs)
    out = []
    for k, f in enumerate(features):
        loc = np.asarray(f.locations, np.float64).reshape(-1, 2)
        if image_sizes is not None:
            size = tuple(image_sizes[k])[:2]
        else:
            size = (loc[:, 0].max() + 1, loc[:, 1].max() + 1) if len(loc) else (1, 1)
        if len(loc) == 0:
            out.append((np.zeros((0, 4)), np.zeros(0, np.float32)))
            continue
        out.append(attention_boxes(loc, model.score(f.descriptors), size, max_boxes=max_boxes, **box_options))
    return model, out
