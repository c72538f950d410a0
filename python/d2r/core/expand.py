"""Query expansion for the ASMK family, on the inverted file's own codes: Hamming query expansion (HQE)
and alpha query expansion (alpha-QE).

Both run a first search, build an expanded query from the query's aggregated codes and the codes the
index stores for some of the top results (``InvertedFile.entry_codes``), and search again with it.
Both are exact (no approximation beyond the kernel's) and deterministic (no randomness; ties as the
search breaks them).

Notation (METHOD.md section 4): the query X has words ``W_X`` and codes ``c_X[k]``; a database entry Y
(an image, or one region of a RegionalSearchIndex image) has ``W_Y``, ``c_Y[k]``; for a shared word
``u_k`` is the code similarity (``1 - 2 h / D`` for binary codes at Hamming distance h, the dot product
for float codes). For binary codes a code is used as the sign vector ``s = 2 b - 1`` (b its D bits).

**HQE** (after Tolias and Jégou, "Visual query expansion with or without geometry: refining local
descriptors by exploiting image collection variability", CVPR 2014, adapted from per-feature Hamming
Embedding to ASMK's one code per word):

1. among the first ``top`` results, an image is *reliable* when it has at least ``min_matches``
   *strict correspondences*: shared words whose codes differ in at most ``hamming`` bits
   (``u_k >= 1 - 2 hamming / D``; for float codes the same bound on the dot product);
2. the expanded word set is ``W_X`` plus every word that at least ``min_images`` reliable images
   store (``min_images = 0``: the query's words only);
3. per word, the code is the per-bit majority over the query's code (where X has the word) and the
   reliable images' codes of that word; a tie takes the query's bit, or 0 for a word the query lacks.
   For float codes: ``l2n(c_X[k] + sum of the reliable images' c_Y[k])``.

No geometry is used. With no reliable image the query is searched as it is (the second search then
returns the first's results).

**alpha-QE** (after Radenović, Tolias and Chum's alpha-weighted query expansion, applied per word to
the stored codes instead of global vectors):

1. the expansion images are the first ``top`` results (or the ids given, e.g. the spatially verified
   ones: the pipeline passes those with enough inliers);
2. each gets the weight ``w_Y = (S_n(X, Y) / max_Y S_n(X, Y)) ** alpha`` where ``S_n`` is the
   gamma-normalised similarity ``sum_k sigma(u_k) / sqrt(|W_X| |W_Y|)`` (whatever the index's
   ``normalize``), images with ``S_n <= 0`` weigh 0; the query weighs 1;
3. the expanded word set is as for HQE (``W_X`` plus the words of at least ``min_images`` expansion
   images with a non-zero weight);
4. per word ``z[k] = c_X[k] + sum_Y w_Y c_Y[k]`` (signs for binary codes, the codes for float ones;
   absent terms are 0) and the code is ``z[k] > 0`` bitwise (a zero component takes the query's bit,
   or 0), or ``l2n(z[k])``. This is the weighted average of the aggregated codes taken per word
   before binarisation; for binary indexes the stored codes are already binarised, so their signs
   are averaged.

**Fused** (``fuse=w``, either method): the first search's and the expanded search's full rankings are
combined, each image scored ``s_first / top_first + w * s_expanded / top_expanded`` (each search's
scores divided by its best one). With HQE at ``w = 0.5`` (``expand="hqe-fused"``) no mAP figure fell
on the three sets measured (BENCHMARKS.md section 19), where plain HQE lost up to 2.8 points. It ranks
every image (two full rankings: O(n log n) per query).

A RegionalSearchIndex stores several entries (regions) per image: each expansion image contributes
its one entry most similar to the query (the highest ``sum_k sigma(u_k)``, ties to the first region).

Cost: a second search, plus ``entry_codes``, which decodes the posting lists of the query's words
only when ``min_images = 0`` (about one more search), and every posting list otherwise (O(postings),
the price of adding new words: see BENCHMARKS.md section 19).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from numpy.typing import NDArray

from d2r.core.kernels import Aggregated

__all__ = ["HQE", "HQE_FUSED", "AlphaQE", "Expansion", "as_expansion", "expand_query", "fuse_rankings",
           "search_expanded"]


@dataclass(frozen=True)
class HQE:
    """Hamming query expansion parameters (see the module's documentation).

    top: results of the first search examined; hamming: strict threshold in bits (None: D // 4, i.e.
    32 of 128 bits); min_matches: strict correspondences that make an image reliable; min_images:
    reliable images that must store a word for it to be added (0: no new words); fuse: None (the
    expanded search's ranking) or a weight w >= 0: each image scored ``s_first / top_first + w *
    s_expanded / top_expanded`` (:func:`fuse_rankings`)."""

    top: int = 10
    hamming: int | None = None
    min_matches: int = 10
    min_images: int = 2
    fuse: float | None = None

    def __post_init__(self) -> None:
        _positive_int(self.top, "top")
        if self.hamming is not None:
            _nonneg_int(self.hamming, "hamming")
        _positive_int(self.min_matches, "min_matches")
        _nonneg_int(self.min_images, "min_images")
        _fuse_weight(self.fuse)


@dataclass(frozen=True)
class AlphaQE:
    """alpha query expansion parameters (see the module's documentation).

    top: expansion images (the first results, or at most this many of the ids given); alpha: the
    weight exponent; min_images: expansion images that must store a word for it to be added (0: no
    new words); fuse: as for HQE."""

    top: int = 5
    alpha: float = 3.0
    min_images: int = 2
    fuse: float | None = None

    def __post_init__(self) -> None:
        _positive_int(self.top, "top")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not (
                math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        _nonneg_int(self.min_images, "min_images")
        _fuse_weight(self.fuse)


#: A query expansion: HQE or AlphaQE parameters.
Expansion = Union[HQE, AlphaQE]


def _positive_int(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def _nonneg_int(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {v!r}")


def _fuse_weight(v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                          or not (math.isfinite(v) and float(v) >= 0)):
        raise ValueError(f"fuse must be None or a finite number >= 0, got {v!r}")


#: The expansion that never lowered mAP on the demo set, realmix and the composites (RootSIFT; 20
#: configurations, 60 figures: worst change 0.00, mean +0.37; BENCHMARKS.md section 19): HQE with
#: the first search's scores fused at weight 0.5. ``expand="hqe-fused"``.
HQE_FUSED = HQE(fuse=0.5)


def _unit(scores: NDArray[np.float64]) -> NDArray[np.float64]:
    """Each row divided by its largest score (a row without a positive score as it is)."""
    top = scores.max(axis=1, keepdims=True) if scores.shape[1] else np.ones((scores.shape[0], 1))
    return np.where(top > 0, scores / np.where(top > 0, top, 1.0), scores)


def fuse_rankings(first: tuple[Any, Any], second: tuple[Any, Any], weight: float, k: int) -> tuple[Any, Any]:
    """The fused top k (k < 0: all) of two full rankings of the same images, each (scores, ids) of shape
    (n_queries, n): each image scored ``s1 / max s1 + weight * s2 / max s2`` (per query; a search whose
    best score is not positive is left unscaled), ranked by that score descending, ties by id
    ascending, as a search ranks. Returns (float32 scores, int64 ids)."""
    s1, i1 = np.asarray(first[0], np.float64), np.asarray(first[1], np.int64)
    s2, i2 = np.asarray(second[0], np.float64), np.asarray(second[1], np.int64)
    if s1.shape != s2.shape or i1.shape != s1.shape:
        raise ValueError("fuse_rankings needs two full rankings of the same shape")
    o1, o2 = np.argsort(i1, axis=1, kind="stable"), np.argsort(i2, axis=1, kind="stable")
    ids = np.take_along_axis(i1, o1, axis=1)
    if not np.array_equal(ids, np.take_along_axis(i2, o2, axis=1)):
        raise ValueError("fuse_rankings needs two rankings of the same images")
    fused = (_unit(np.take_along_axis(s1, o1, axis=1)) +
             weight * _unit(np.take_along_axis(s2, o2, axis=1)))
    n = ids.shape[1]
    kk = n if k < 0 else min(k, n)
    order = np.stack([np.lexsort((row_ids, -row)) for row, row_ids in zip(fused, ids)]) if ids.shape[0] else \
        np.zeros((0, n), np.int64)
    order = order[:, :kk]
    return (np.take_along_axis(fused, order, axis=1).astype(np.float32),
            np.take_along_axis(ids, order, axis=1))


def search_expanded(search: Any, expanded: Any, batch: Any, k: int, expansion: Expansion) -> tuple[Any, Any]:
    """An expanded search: ``search(batch, k) -> 2-D (scores, ids)`` (k < 0: every image) and
    ``expanded(batch)`` the expanded batch; with ``expansion.fuse`` the two full rankings fused
    (:func:`fuse_rankings`), else the expanded search's top k."""
    ex = expanded(batch)
    if expansion.fuse is None:
        return search(ex, k)  # type: ignore[no-any-return]
    return fuse_rankings(search(batch, -1), search(ex, -1), float(expansion.fuse), k)


def as_expansion(expand: Any) -> Expansion | None:
    """None, "hqe", "hqe-fused" (:data:`HQE_FUSED`), "aqe" (also "alpha-qe"), or HQE / AlphaQE
    parameters -> parameters or None."""
    if expand is None or isinstance(expand, (HQE, AlphaQE)):
        return expand
    if isinstance(expand, str):
        name = expand.lower()
        if name in ("none", ""):
            return None
        if name == "hqe":
            return HQE()
        if name in ("hqe-fused", "hqe_fused"):
            return HQE_FUSED
        if name in ("aqe", "alpha-qe", "alphaqe"):
            return AlphaQE()
    raise ValueError(f"expand must be None, 'hqe', 'hqe-fused', 'aqe' or d2r.HQE / d2r.AlphaQE parameters, got "
                     f"{expand!r}")


def _similarities(q_words: NDArray[np.int32], q_sign: NDArray[np.float32], words: NDArray[np.int32],
                  sign: NDArray[np.float32], binary: bool) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """(position of each of the entry's words in q_words or -1, u per entry word (nan where not shared))."""
    pos = np.searchsorted(q_words, words)
    pos = np.minimum(pos, max(len(q_words) - 1, 0))
    shared = (q_words[pos] == words) if len(q_words) else np.zeros(len(words), bool)
    u = np.full(len(words), np.nan)
    if shared.any():
        dots = np.einsum("ij,ij->i", sign[shared].astype(np.float64), q_sign[pos[shared]].astype(np.float64))
        u[shared] = dots / sign.shape[1] if binary else dots
    return np.where(shared, pos, -1), u


def _sigma(u: NDArray[np.float64], alpha: float, tau: float) -> NDArray[np.float64]:
    out = np.zeros_like(u)
    ok = np.isfinite(u) & (u > tau)
    out[ok] = np.sign(u[ok]) * np.abs(u[ok]) ** alpha
    return out


def _signs(codes: NDArray[Any], dim: int, binary: bool) -> NDArray[np.float32]:
    if codes.shape[0] == 0:   # an entry without words (e.g. a region without features)
        return np.zeros((0, dim), np.float32)
    if binary:
        bits = np.unpackbits(codes.reshape(codes.shape[0], -1), axis=1)[:, :dim]
        return bits.astype(np.float32) * 2 - 1
    return codes.astype(np.float32)


def _encode(z: NDArray[np.float64], query_sign: NDArray[np.float32] | None, binary: bool) -> NDArray[Any]:
    """Codes of the expanded words: bits of z > 0 (a zero takes the query's sign, else 0) / l2n(z)."""
    if binary:
        pos = z > 0
        if query_sign is not None:
            pos = np.where(z == 0, query_sign > 0, pos)
        packed: NDArray[np.uint8] = np.packbits(pos, axis=1)
        return packed
    norm = np.sqrt(np.maximum((z * z).sum(axis=1, keepdims=True), 1e-12))
    unit: NDArray[np.float32] = (z / norm).astype(np.float32)
    return unit


def expand_query(index: Any, query: Aggregated, ids: Any, expansion: Expansion) -> Aggregated:
    """The expanded query of `query` (aggregated as the index aggregates queries) given result ids
    (best first: the first search's, or the spatially verified ones). `index`: an Index or a
    RegionalSearchIndex on the CPU."""
    if not isinstance(expansion, (HQE, AlphaQE)):
        raise TypeError(f"expansion must be d2r.HQE or d2r.AlphaQE, got {type(expansion).__name__}")
    ivf = index._ivf
    if not hasattr(ivf, "entry_codes"):
        raise NotImplementedError(f"query expansion reads the stored codes of the top results, which the "
                                  f"{index.device!r} index does not expose: move the index to the CPU "
                                  "(index.to('cpu')) to expand queries")
    binary = index.spec.binary
    dim = index.codebook.dim
    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1)[:expansion.top])
    q_words = np.asarray(query.words, np.int32)
    q_sign = _signs(np.asarray(query.codes), dim, binary)
    if ids.size == 0 or q_words.size == 0:
        return query
    new_words = expansion.min_images > 0
    got = ivf.entry_codes(ids, None if new_words else np.ascontiguousarray(q_words))
    offsets, words_all, codes_all, owner = got["offsets"], got["words"], got["codes"], got["image"]
    n_words_of = got["word_counts"]
    if not binary:  # float codes come back as their bytes
        codes_all = np.ascontiguousarray(codes_all).view(np.float32).reshape(-1, dim)
    # per image: its entry most similar to the query (one entry per image unless regional)
    per_image: list[tuple[NDArray[np.int32], NDArray[np.float32], NDArray[np.int64], NDArray[np.float64]] | None]
    per_image = [None] * ids.size
    n_words_y = np.zeros(ids.size, np.int64)   # |W_Y| of each image's chosen entry
    best = np.full(ids.size, -np.inf)
    for e in range(owner.shape[0]):
        w = words_all[offsets[e]:offsets[e + 1]]
        s = _signs(codes_all[offsets[e]:offsets[e + 1]], dim, binary)
        pos, u = _similarities(q_words, q_sign, w, s, binary)
        score = float(_sigma(u, index.alpha, index.tau).sum())
        i = int(owner[e])
        if score > best[i]:
            best[i], per_image[i], n_words_y[i] = score, (w, s, pos, u), int(n_words_of[e])
    # the images used and their weights
    if isinstance(expansion, HQE):
        h = dim // 4 if expansion.hamming is None else expansion.hamming
        u_strict = 1.0 - 2.0 * h / dim
        weights = np.zeros(ids.size)
        for i, item in enumerate(per_image):
            if item is not None and int(np.sum(item[3] >= u_strict - 1e-9)) >= expansion.min_matches:
                weights[i] = 1.0
    else:
        n_words_x = q_words.size
        sn = np.zeros(ids.size)
        for i, item in enumerate(per_image):
            if item is not None and n_words_y[i]:
                sn[i] = float(_sigma(item[3], index.alpha, index.tau).sum()) / math.sqrt(n_words_x * n_words_y[i])
        top = sn.max() if sn.size else 0.0
        weights = np.where(sn > 0, (np.maximum(sn, 0) / top) ** expansion.alpha, 0.0) if top > 0 else np.zeros(ids.size)
    used = [i for i in range(ids.size) if weights[i] > 0 and per_image[i] is not None]
    if not used:
        return query
    # the expanded word set
    words = q_words
    if new_words:
        stacked: NDArray[np.int32] = np.concatenate([per_image[i][0] for i in used])  # type: ignore[index]
        cand, counts = np.unique(stacked, return_counts=True)
        extra = cand[(counts >= expansion.min_images) & ~np.isin(cand, q_words)]
        words = np.union1d(q_words, extra).astype(np.int32)
    z = np.zeros((words.size, q_sign.shape[1]))
    qpos = np.searchsorted(words, q_words)
    z[qpos] += q_sign
    for i in used:
        w, s, _, _ = per_image[i]  # type: ignore[misc]
        p = np.searchsorted(words, w)
        p = np.minimum(p, words.size - 1)
        keep = words[p] == w
        np.add.at(z, p[keep], weights[i] * s[keep].astype(np.float64))
    query_sign_full = None
    if binary:
        query_sign_full = np.full((words.size, q_sign.shape[1]), -1.0, np.float32)
        query_sign_full[qpos] = q_sign
    codes = _encode(z, query_sign_full, binary)
    return Aggregated(words, codes, query.fingerprint)
