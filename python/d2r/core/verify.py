"""Spatial verification and re-ranking (the DELF / Detect-to-Retrieve re-ranking step).

For a query and each of its top-ranked database images:

1. **putative matches** -- every query descriptor is matched to its nearest
   neighbour among the database image's descriptors (Euclidean distance, brute
   force in the native core), and the pair is kept when that distance is
   ``< max_distance`` (0.9: descriptors are unit-L2 RootSIFT / DELF vectors);
2. **affine RANSAC** on the matched locations -- 3-point minimal samples,
   residual threshold 10 px, 1000 trials; the score is the number of inliers;
3. the top ``100`` images are **re-sorted** by (inliers desc, initial score
   desc), ties by the initial rank.

This is ``MatchFeatures`` / ``RerankByGeometricVerification`` of
``tensorflow/models/research/delf/delf/python/detect_to_retrieve/image_reranking.py``
(scipy ``cKDTree`` + ``skimage.measure.ransac(AffineTransform, min_samples=3,
residual_threshold=10, max_trials=1000)``), made deterministic and fast:

* matching and RANSAC run in C++ (``csrc/ransac.cpp``); pairs are verified in
  parallel (``d2r.set_num_threads``); results do not depend on the number of
  threads;
* RANSAC draws its samples from a fixed generator (xoshiro256** seeded with
  ``seed``); every pair uses the same ``seed``, as the official code passes one
  ``random_state`` to every call (it passes none, so its scores vary from run to
  run; ours are reproducible but are not numpy's random stream);
* skimage's rules are kept: a trial is one random 3-subset of distinct matches;
  inliers have residual ``< threshold``; the best hypothesis has the most
  inliers, ties to the smaller sum of squared residuals; skimage's early stop
  (``stop_probability=1``: after a new best at trial ``t``, stop when ``t >=
  ceil(log(eps) / log(1 - (inliers / n) ** 3))``, i.e. only when most matches
  are inliers) -- ``stop_probability=None`` disables it; the score and the mask
  are those of the best hypothesis, the returned model is its least-squares
  refit on those inliers;
* differences: degenerate samples (collinear or repeated points, on either
  side) are skipped -- they still count as trials -- where skimage fits them
  anyway; residuals are float32 (skimage float64); nearest neighbours are found
  in float32 then their distance is recomputed in float64 for the threshold
  (``cKDTree``: float64 throughout); only near-ties can differ;
* as in the official code, fewer than 4 putative matches give 0 inliers
  (``min_matches``), and the model maps **database** points onto **query**
  points.

Coordinates
-----------
``Features.locations`` are ``(y, x)`` pixels (see :mod:`d2r.extract.rootsift`).
This module swaps them once and works in ``(x, y)`` throughout: the model
``[[a, b, c], [d, e, f]]`` maps a database point ``(x, y)`` to the query point
``(a x + b y + c, d x + e y + f)``. (The official code fits on ``(y, x)``
directly; swapping both sides' axes maps affine models onto affine models and
leaves residual lengths unchanged, so inlier counts do not depend on it.)

Features may be given as any object with ``.descriptors`` (N x D float32) and
``.locations`` (N x 2), e.g. :class:`d2r.extract.Features`, or as a
``(descriptors, locations)`` tuple.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional, Protocol, Sequence, Tuple, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from d2r.core.checks import as_descriptors
import d2r._native as _native

__all__ = [
    "MAX_DISTANCE",
    "MIN_MATCHES",
    "NUM_RANSAC_TRIALS",
    "NUM_TO_RERANK",
    "RESIDUAL_THRESHOLD",
    "PairVerification",
    "RerankRule",
    "DEFAULT_RULE",
    "OFFICIAL_RULE",
    "fused_order",
    "match_descriptors",
    "rerank",
    "rerank_protocol",
    "search_and_rerank",
    "verify_pair",
]

#: Official re-ranking parameters (image_reranking.py): how many top results are re-ranked.
NUM_TO_RERANK = 100
#: Largest descriptor distance of a putative match (matches need a distance ``< MAX_DISTANCE``).
MAX_DISTANCE = 0.9
#: RANSAC inlier threshold on the residual, in pixels.
RESIDUAL_THRESHOLD = 10.0
#: Number of RANSAC trials (3-point samples).
NUM_RANSAC_TRIALS = 1000
#: ``<= 3`` putative matches give 0 inliers in the official code.
MIN_MATCHES = 4

_UINT64_MAX = (1 << 64) - 1


class SearchIndex(Protocol):
    """What search_and_rerank searches: an Index, a RegionalSearchIndex, or anything with their `search`
    (e.g. d2r.distributed.ShardedIndex)."""

    def search(self, queries: Any, k: int | None = ..., *args: Any, **kwargs: Any) -> tuple[Any, Any]: ...


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def _as_float32_2d(x: Any, name: str, cols: Optional[int] = None) -> np.ndarray:
    """d2r's descriptor check (`_checks.as_descriptors`), also accepting float16 and an empty 1-D array."""
    if isinstance(x, np.ndarray) and x.dtype == np.float16:
        x = x.astype(np.float32)
    if isinstance(x, np.ndarray) and x.ndim == 1 and x.size == 0:
        x = x.reshape(0, cols if cols is not None else 0)
    return as_descriptors(x, cols, name)


def _unpack(features: Any, name: str, dim: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(descriptors (N, D) float32, xy (N, 2) float32 as (x, y)) of a features object or tuple."""
    if hasattr(features, "descriptors") and hasattr(features, "locations"):
        desc, loc = features.descriptors, features.locations
    elif isinstance(features, (tuple, list)) and len(features) == 2:
        desc, loc = features
    else:
        raise TypeError(f"{name} must have .descriptors and .locations (e.g. d2r.extract.Features) or be a "
                        f"(descriptors, locations) pair, got {type(features).__name__}")
    desc = _as_float32_2d(desc, f"{name}.descriptors")
    if desc.shape[0] == 0 and dim is not None:
        desc = desc.reshape(0, dim)
    loc = _as_float32_2d(loc, f"{name}.locations", cols=2)
    if loc.shape[0] != desc.shape[0]:
        raise ValueError(f"{name}: {desc.shape[0]} descriptors but {loc.shape[0]} locations")
    if dim is not None and desc.shape[1] != dim:
        raise ValueError(f"{name}: descriptor dimension {desc.shape[1]} differs from the query's ({dim})")
    xy = np.ascontiguousarray(loc[:, ::-1])  # (y, x) -> (x, y)
    return desc, xy


def _int(value: Any, name: str, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if v < minimum or (maximum is not None and v > maximum):
        hi = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be >= {minimum}{hi}, got {v}")
    return v


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _params(max_distance: Any, threshold: Any, max_trials: Any, seed: Any, stop_probability: Any,
            min_matches: Any) -> dict[str, Any]:
    max_distance = _float(max_distance, "max_distance")
    if not max_distance > 0:  # inf allowed: every nearest neighbour is a match
        raise ValueError(f"max_distance must be > 0, got {max_distance}")
    threshold = _float(threshold, "threshold")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be finite and > 0, got {threshold}")
    max_trials = _int(max_trials, "max_trials", 0, 2**31 - 1)
    seed = _int(seed, "seed", 0, _UINT64_MAX)
    if stop_probability is None:
        stop = -1.0
    else:
        stop = _float(stop_probability, "stop_probability")
        if not 0.0 <= stop <= 1.0:
            raise ValueError(f"stop_probability must be in [0, 1] or None, got {stop_probability}")
    min_matches = _int(min_matches, "min_matches", 0, 2**31 - 1)
    return dict(max_distance=max_distance, threshold=threshold, max_trials=max_trials, seed=seed,
                stop_probability=stop, min_matches=min_matches)


@dataclass(frozen=True)
class RerankRule:
    """How spatial verification re-orders the verified results (the initial scores s, best first, and
    each result's inliers n).

    Images with at least `min_inliers` inliers (every one when it is 0) are *promoted*; then, by `order`:

    * "fused" (the default): every verified result is sorted by ``s / max(s) + b``, where the bonus
      ``b = weight * min(n, cap) / cap`` for promoted results and 0 for the others (ties keep the
      initial order);
    * "inliers": the promoted results move ahead of the others, sorted by (inliers desc, initial
      score desc), and the others keep their initial order;
    * "score": the promoted results move ahead of the others, both in their initial order.

    ``OFFICIAL_RULE = RerankRule(0, "inliers")`` is the official DELF re-ranking (every verified result
    sorted by inliers). ``DEFAULT_RULE = RerankRule()`` (15 inliers, fused, weight 0.15, cap 100) is
    d2r's, chosen by measurement (BENCHMARKS.md section 19): over the demo set, realmix and the
    composites, 20 configurations and the three protocols, it never lowered mAP, where the official
    rule lost up to 12.8 points."""

    min_inliers: int = 15
    order: str = "fused"
    weight: float = 0.15
    cap: int = 100

    def __post_init__(self) -> None:
        _int(self.min_inliers, "min_inliers", 0)
        _int(self.cap, "cap", 1)
        if self.order not in ("inliers", "score", "fused"):
            raise ValueError(f"order must be 'inliers', 'score' or 'fused', got {self.order!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) or not (
                math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight!r}")


#: The official re-ranking: every verified result sorted by (inliers, initial score).
OFFICIAL_RULE = RerankRule(0, "inliers")
#: d2r's re-ranking (rerank_protocol, search_and_rerank, the pipeline, ``d2r search --rerank``).
DEFAULT_RULE = RerankRule()


def fused_order(initial_scores: ArrayLike, inliers: ArrayLike, rule: RerankRule | None = None
                ) -> NDArray[np.int64]:
    """The re-ranked order of candidates given in their initial order (best first): (n,) indices.
    initial_scores: (n,) their scores; inliers: (n,) their inlier counts (-1 or any count below
    ``rule.min_inliers``: not promoted); rule: a RerankRule (None: the official sort). Ties keep the
    initial order."""
    rule = OFFICIAL_RULE if rule is None else rule
    sc = np.asarray(initial_scores, np.float64).reshape(-1)
    inl = np.asarray(inliers, np.int64).reshape(-1)
    if sc.shape != inl.shape:
        raise ValueError(f"initial_scores and inliers differ in length ({sc.shape[0]} vs {inl.shape[0]})")
    n = sc.shape[0]
    position = np.arange(n, dtype=np.int64)
    promoted = np.maximum(inl, 0) >= rule.min_inliers
    if rule.min_inliers == 0:
        promoted[:] = True
    if rule.order == "fused":
        top = sc.max() if n else 0.0
        base = sc / top if top > 0 else sc
        bonus = np.where(promoted, rule.weight * np.minimum(np.maximum(inl, 0), rule.cap) / rule.cap, 0.0)
        return np.lexsort((position, -(base + bonus))).astype(np.int64)
    head = position[promoted]
    if rule.order == "inliers":
        head = head[np.lexsort((head, -sc[head], -np.maximum(inl[head], 0)))]
    return np.concatenate([head, position[~promoted]]).astype(np.int64)


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
@overload
def match_descriptors(q_desc: Any, db_desc: Any, max_distance: float = ..., *,
                      return_distances: Literal[False] = ...) -> NDArray[np.int64]: ...
@overload
def match_descriptors(q_desc: Any, db_desc: Any, max_distance: float = ..., *,
                      return_distances: Literal[True]) -> tuple[NDArray[np.int64], NDArray[np.float32]]: ...
@overload
def match_descriptors(q_desc: Any, db_desc: Any, max_distance: float = ..., *, return_distances: bool
                      ) -> NDArray[np.int64] | tuple[NDArray[np.int64], NDArray[np.float32]]: ...
def match_descriptors(q_desc: Any, db_desc: Any, max_distance: float = MAX_DISTANCE, *,
                      return_distances: bool = False
                      ) -> NDArray[np.int64] | tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Putative matches: the nearest database descriptor of every query descriptor.

    Returns an ``(M, 2)`` int64 array of ``(query_index, database_index)``
    pairs, in increasing query index, for the query descriptors whose nearest
    neighbour (Euclidean distance, ties to the lower index) is closer than
    ``max_distance`` (strict). Several query descriptors may match the same
    database descriptor (no cross-check, no ratio test, as in DELF). With
    ``return_distances=True`` also returns the ``(M,)`` float32 distances.
    """
    q = _as_float32_2d(q_desc, "q_desc")
    db = _as_float32_2d(db_desc, "db_desc")
    if q.shape[0] == 0 and db.ndim == 2:
        q = q.reshape(0, db.shape[1])
    if db.shape[0] == 0:
        db = db.reshape(0, q.shape[1])
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"q_desc and db_desc have different dimensions ({q.shape[1]} vs {db.shape[1]})")
    md = _float(max_distance, "max_distance")
    if not md > 0:
        raise ValueError(f"max_distance must be > 0, got {max_distance}")
    if q.shape[1] == 0 or q.shape[0] == 0 or db.shape[0] == 0:
        pairs = np.zeros((0, 2), np.int64)
        return (pairs, np.zeros(0, np.float32)) if return_distances else pairs
    qi, di, dist = _native.match_descriptors(q, db, md)
    pairs = np.stack([qi, di], axis=1).astype(np.int64, copy=False)
    return (pairs, dist) if return_distances else pairs


class PairVerification(NamedTuple):
    """Result of :func:`verify_pair`."""

    #: Number of RANSAC inliers (the re-ranking score).
    inliers: int
    #: (2, 3) float64 affine map from database (x, y) to query (x, y), least-squares refit on the
    #: inliers; None when there is no model (too few matches, all samples degenerate).
    model: Optional[np.ndarray]
    #: (M,) bool: which putative matches are inliers.
    inlier_mask: np.ndarray
    #: (M, 2) int64 putative matches (query_index, database_index).
    matches: np.ndarray


def verify_pair(q_features: Any, db_features: Any, *, max_distance: float = MAX_DISTANCE,
                threshold: float = RESIDUAL_THRESHOLD, max_trials: int = NUM_RANSAC_TRIALS,
                seed: int = 0, stop_probability: Optional[float] = 1.0,
                min_matches: int = MIN_MATCHES) -> PairVerification:
    """Putative matches + affine RANSAC between a query and one database image.

    The inlier count equals what :func:`rerank` computes for the same pair and
    seed. ``stop_probability``: skimage's early-stop rule (1 = skimage's
    default); ``None`` always runs ``max_trials`` trials. Fewer than
    ``min_matches`` putative matches give 0 inliers and no model.
    """
    p = _params(max_distance, threshold, max_trials, seed, stop_probability, min_matches)
    qd, qxy = _unpack(q_features, "q_features")
    dd, dxy = _unpack(db_features, "db_features", dim=qd.shape[1])
    matches = match_descriptors(qd, dd, p["max_distance"])
    m = matches.shape[0]
    if m < p["min_matches"] or m < 3:
        return PairVerification(0, None, np.zeros(m, bool), matches)
    src = np.ascontiguousarray(dxy[matches[:, 1]])
    dst = np.ascontiguousarray(qxy[matches[:, 0]])
    inliers, model, mask = _native.affine_ransac(src, dst, p["threshold"], p["max_trials"], p["seed"],
                                                 p["stop_probability"])
    if model is not None:
        model = np.asarray(model, dtype=np.float64)
    return PairVerification(int(inliers), model, np.asarray(mask, dtype=bool), matches)


def rerank(query_features: Any, candidate_features_list: Sequence[Any], initial_scores: ArrayLike | None = None,
           top: Optional[int] = NUM_TO_RERANK, *, max_distance: float = MAX_DISTANCE,
           threshold: float = RESIDUAL_THRESHOLD, max_trials: int = NUM_RANSAC_TRIALS, seed: int = 0,
           stop_probability: Optional[float] = 1.0, min_matches: int = MIN_MATCHES
           ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Re-rank candidates by spatial verification (DELF ``RerankByGeometricVerification``).

    Parameters
    ----------
    query_features
        Features of the query (``.descriptors``, ``.locations``).
    candidate_features_list
        Sequence of the candidates' features. Only the
        ``top`` verified ones are accessed (``len()`` and ``[i]``), so a lazy
        sequence works.
    initial_scores
        (n,) initial similarity of each candidate (higher is
        better); ``None`` means the list is already in rank order.
    top
        Number of candidates verified: the ``top`` best by initial score
        (ties: earlier in the list); ``None``: all.

    Returns
    -------
    order
        (n,) int64 candidate indices, best first: every candidate sorted by
        (inliers desc, initial score desc, list position asc), where
        candidates that were not verified count as 0 inliers -- exactly the
        official sort. With consistent scores this is "the verified ones by
        (inliers, initial score), then the rest in initial order".
    inliers
        (n,) int64 inlier count of each candidate (indexed like the
        input list), -1 for candidates that were not verified.
    """
    p = _params(max_distance, threshold, max_trials, seed, stop_probability, min_matches)
    n = len(candidate_features_list)
    if top is None:
        top = n
    top = _int(top, "top", 0)
    if initial_scores is None:
        scores = -np.arange(n, dtype=np.float64)
    else:
        scores = np.asarray(initial_scores)
        if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
            raise TypeError(f"initial_scores must be numbers, got dtype {scores.dtype}")
        scores = scores.astype(np.float64).reshape(-1) if scores.ndim <= 1 else scores
        if scores.ndim != 1 or scores.shape[0] != n:
            raise ValueError(f"initial_scores must have shape ({n},), got {np.shape(initial_scores)}")
        if np.isnan(scores).any():
            raise ValueError("initial_scores contain NaN")
    position = np.arange(n, dtype=np.int64)
    initial_order = np.lexsort((position, -scores))
    selected = initial_order[:min(top, n)]

    qd, qxy = _unpack(query_features, "query_features")
    descs: list[NDArray[np.float32]] = []
    xys: list[NDArray[np.float32]] = []
    for i in selected:
        d, xy = _unpack(candidate_features_list[int(i)], f"candidate_features_list[{int(i)}]", dim=qd.shape[1])
        descs.append(d)
        xys.append(xy)
    inliers = np.full(n, -1, dtype=np.int64)
    if len(selected) and qd.shape[0] == 0:
        inliers[selected] = 0
    elif len(selected):
        pairs = np.zeros((len(selected), 2), np.int64)
        pairs[:, 1] = np.arange(len(selected))
        counts, _ = _native.verify_many([qd], [qxy], descs, xys, pairs, p["max_distance"], p["threshold"],
                                        p["max_trials"], p["seed"], p["stop_probability"], p["min_matches"])
        inliers[selected] = counts
    order = np.lexsort((position, -scores, -np.maximum(inliers, 0)))
    return order.astype(np.int64), inliers


def rerank_protocol(ranks: ArrayLike, scores: ArrayLike, query_features: Sequence[Any], db_features: Sequence[Any],
                    gnd: Sequence[Mapping[str, Any]], top: int = NUM_TO_RERANK, seed: int = 0,
                    protocols: Sequence[str] = ("medium", "hard"), progress: bool = False,
                    desc: str = "spatial verification", rule: RerankRule | None = None,
                    **verify_kw: Any) -> dict[str, Any]:
    """The official protocol-aware re-ranking inside the Revisited evaluation: for Medium and Hard
    separately, the top `top` non-junk results of each query (junk as that protocol defines it) are
    spatially verified and re-ordered by `rule` (default: DEFAULT_RULE, the fused rule; OFFICIAL_RULE
    re-sorts them all by (inliers, initial score) as the official code does); the rest keep their
    order. Each (query, image) pair is verified once and shared by both protocols.

    ranks, scores: (n_queries, n_database) full rankings and their scores. Returns
    {protocol: d2r.evaluate.revisited(...)[protocol], "ranks": {protocol: reranked ranks},
    "seconds_per_query": ...}. progress: a progress bar over the queries.
    """
    import time

    from d2r.core.progress import iterate
    from d2r.core.evaluate import revisited

    ranks = np.asarray(ranks)
    scores = np.asarray(scores)
    t0 = time.perf_counter()
    out_ranks = {p: np.empty_like(ranks) for p in protocols}
    for qi in iterate(range(ranks.shape[0]), ranks.shape[0], desc, progress, unit="query"):
        g = gnd[qi]
        easy, hard, junk = (set(int(i) for i in g.get(k, [])) for k in ("easy", "hard", "junk"))
        ignored = {"medium": junk, "hard": junk | easy, "easy": junk | hard}
        heads: dict[str, list[int]] = {}
        for p in protocols:
            keep = [int(j) for j in ranks[qi] if int(j) not in ignored[p]]
            heads[p] = keep[:top]
        cand = sorted(set().union(*heads.values()))
        position = {j: k for k, j in enumerate(cand)}
        if cand:
            _, inl = rerank(query_features[qi], [db_features[j] for j in cand], top=None, seed=seed, **verify_kw)
        else:
            inl = np.zeros(0, np.int64)
        score_of = dict(zip(ranks[qi].tolist(), scores[qi].tolist()))
        for p in protocols:
            head = heads[p]
            order = fused_order([score_of[j] for j in head], [inl[position[j]] for j in head],
                                DEFAULT_RULE if rule is None else rule)
            new_head = [head[int(k)] for k in order]
            head_set = set(head)
            rest = [int(j) for j in ranks[qi] if int(j) not in head_set]
            out_ranks[p][qi] = np.asarray(new_head + rest, dtype=ranks.dtype)
    seconds = (time.perf_counter() - t0) / max(1, ranks.shape[0])
    result: dict[str, Any] = {p: revisited(out_ranks[p], gnd)[p] for p in protocols}
    result["ranks"] = out_ranks
    result["seconds_per_query"] = seconds
    return result


def search_and_rerank(index: SearchIndex, query_features: Any, db_features: Any, k: int = 100,
                      top: int = NUM_TO_RERANK, seed: int = 0, rule: RerankRule | None = None,
                      expand: Any = None, **verify_kw: Any
                      ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """Search, then spatially verify the plain top `top` results (the search-API entry point; the
    evaluation uses :func:`rerank_protocol`).

    index: a d2r.Index (or RegionalSearchIndex); query_features: the query's Features;
    db_features: image id -> Features (a dict, or a sequence indexed by id). Returns
    (ids, inliers, scores): the first max(k, top) results, the verified head re-ordered by `rule`
    (default DEFAULT_RULE; OFFICIAL_RULE: by (inliers desc, initial score desc, initial rank asc)),
    the rest in their initial order, cut to k; inliers is -1 for results that were not verified;
    scores are the initial similarity scores. `expand`: the search's query expansion
    (``index.search(..., expand=)``: "hqe", "aqe", d2r.HQE / d2r.AlphaQE).
    """
    n = max(int(k), int(top))
    q_desc = _unpack(query_features, "query_features")[0]
    scores, ids = index.search(q_desc, k=n) if expand is None else index.search(q_desc, k=n, expand=expand)
    head = min(int(top), len(ids))
    _, inl = rerank(query_features, [db_features[int(i)] for i in ids[:head]], scores[:head], top=head,
                    seed=seed, **verify_kw)
    order = fused_order(scores[:head], inl, DEFAULT_RULE if rule is None else rule)
    new_ids = np.concatenate([ids[:head][order], ids[head:]])[:k]
    new_scores = np.concatenate([scores[:head][order], scores[head:]])[:k]
    new_inl = np.concatenate([inl[order], np.full(len(ids) - head, -1, np.int64)])[:k]
    return new_ids, new_inl, new_scores
