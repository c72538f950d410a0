"""A slow, plain numpy reference of the d2r method (METHOD.md sections 3-4), float64 throughout.

Written from METHOD.md only, not from the library: every step is the formula as stated, computed the
obvious way (full distance matrices, explicit loops over regions and words). Used by the tests to
check the native core on random inputs.

Representations: an aggregated image is a pair (words, codes) with `words` ascending int64 and
`codes` a (n_words, D) float64 array (ASMK-type kernels) or a (n_words, ceil(D/8)) uint8 array
(binary kernels). A region list is a list of (n_r, D) arrays.
"""
from __future__ import annotations

import numpy as np

WORD_EPS = 1e-6        # a word is kept when the norm of its (residual) vector exceeds this
L2N_EPS = 1e-12        # l2n(v) = v / sqrt(max(||v||^2, L2N_EPS))


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def l2n(v) -> np.ndarray:
    """v / sqrt(max(||v||^2, 1e-12)) over the whole array (use l2n_rows for per-row)."""
    v = _f64(v)
    return v / np.sqrt(max(float(np.sum(v * v)), L2N_EPS))


def l2n_rows(v) -> np.ndarray:
    v = _f64(v)
    sq = np.sum(v * v, axis=1, keepdims=True)
    return v / np.sqrt(np.maximum(sq, L2N_EPS))


# ------------------------------------------------------------------------------------------------
# Quantisation


def squared_distances(x, centroids) -> np.ndarray:
    """Full (n, C) matrix of squared L2 distances in float64, ||x||^2 - 2 x.c + ||c||^2. Computed
    once per distinct centroid and broadcast back, so equal centroids get bit-identical distances
    (exact ties)."""
    x, c = _f64(x), _f64(centroids)
    uniq, inverse = np.unique(c, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    d = (np.sum(x * x, axis=1)[:, None] - 2.0 * (x @ uniq.T) + np.sum(uniq * uniq, axis=1)[None, :])
    d = np.maximum(d, 0.0)
    return d[:, inverse]


def quantize(x, centroids, m: int = 1):
    """The m nearest words of each row of x: (ids int64 (n, m), squared distances float64 (n, m)),
    nearest first, ties broken by the lower word id (a stable sort keeps equal distances in id
    order)."""
    d = squared_distances(x, centroids)
    ids = np.argsort(d, axis=1, kind="stable")[:, :m].astype(np.int64)
    dist = np.take_along_axis(d, ids, axis=1)
    return ids, dist


def nearest_words_exact(x, centroids, m: int = 1) -> np.ndarray:
    """The m nearest words of each row, by the definition (the plain sum of squared differences in
    float64), ties to the lower id; in blocks, for large codebooks: the expanded form ||x||^2 + ||c||^2
    - 2 x.c selects every word within 1e-6 of the m-th distance, and those are re-ranked exactly."""
    x64, c64 = _f64(x), _f64(centroids)
    cn = (c64 * c64).sum(1)
    out = np.empty((x64.shape[0], m), np.int64)
    for r0 in range(0, x64.shape[0], 512):
        xs = x64[r0:r0 + 512]
        d = (xs * xs).sum(1)[:, None] + cn[None, :] - 2.0 * xs @ c64.T
        kth = np.partition(d, m - 1, axis=1)[:, m - 1]
        for i in range(xs.shape[0]):
            cand = np.flatnonzero(d[i] <= kth[i] + 1e-6 * (1.0 + abs(kth[i])))
            diff = c64[cand] - xs[i]
            exact = (diff * diff).sum(1)
            out[r0 + i] = cand[np.lexsort((cand, exact))[:m]]
    return out


# ------------------------------------------------------------------------------------------------
# VLAD / ASMK


def residual_sums(x, centroids, m: int = 1) -> np.ndarray:
    """(C, D): v[k] = sum over x with k among its m nearest words of (x - c_k)."""
    x, c = _f64(x), _f64(centroids)
    v = np.zeros_like(c)
    if x.shape[0] == 0:
        return v
    ids, _ = quantize(x, c, m)
    for i in range(x.shape[0]):
        for k in ids[i]:
            v[k] += x[i] - c[k]
    return v


def vlad(x, centroids, m: int = 1, l2: bool = True) -> np.ndarray:
    v = residual_sums(x, centroids, m).reshape(-1)
    return l2n(v) if l2 else v


def rvlad(regions, centroids, m: int = 1, l2: bool = False) -> np.ndarray:
    """(1/R) * sum_r l2n(VLAD(X_r)) (R counts empty regions), or l2n of the sum when l2."""
    R = len(regions)
    assert R >= 1
    u = np.zeros(_f64(centroids).size, np.float64)
    for xr in regions:
        u += l2n(residual_sums(xr, centroids, m).reshape(-1))
    u /= R
    return l2n(u) if l2 else u


def _words_and_codes(per_word: np.ndarray):
    """Keep the words whose vector norm exceeds 1e-6 (ascending), code = l2n of the vector."""
    norms = np.sqrt(np.sum(per_word * per_word, axis=1))
    words = np.nonzero(norms > WORD_EPS)[0].astype(np.int64)
    return words, l2n_rows(per_word[words])


def binarize(codes) -> np.ndarray:
    """Packed sign bits, most significant bit first: numpy.packbits(code > 0)."""
    codes = _f64(codes)
    if codes.shape[0] == 0:
        return np.zeros((0, (codes.shape[1] + 7) // 8), np.uint8)
    return np.packbits(codes > 0, axis=1)


def asmk(x, centroids, m: int = 1):
    return _words_and_codes(residual_sums(x, centroids, m))


def asmk_star(x, centroids, m: int = 1):
    words, codes = asmk(x, centroids, m)
    return words, binarize(codes)


def rasmk(regions, centroids, m: int = 1):
    if len(regions) == 1:
        return asmk(regions[0], centroids, m)
    c = _f64(centroids)
    u = rvlad(regions, c, m, l2=False).reshape(c.shape)
    return _words_and_codes(u)


def rasmk_star(regions, centroids, m: int = 1):
    words, codes = rasmk(regions, centroids, m)
    return words, binarize(codes)


def naive_rasmk(regions, centroids, m: int = 1):
    """Per word: sum over regions r with k in W_r of |W_r|^(-1/2) l2n(v_r[k]); regions without words
    are skipped; no 1/R and no renormalisation; words = union of the regions' words."""
    c = _f64(centroids)
    acc = np.zeros_like(c)
    present = np.zeros(c.shape[0], bool)
    for xr in regions:
        words, codes = asmk(xr, c, m)
        if words.size == 0:
            continue
        gamma = 1.0 / np.sqrt(words.size)
        acc[words] += gamma * codes
        present[words] = True
    words = np.nonzero(present)[0].astype(np.int64)
    return words, acc[words]


def aggregate(x_or_regions, centroids, kernel: str, m: int = 1):
    kernel = kernel.lower()
    if kernel == "asmk":
        return asmk(x_or_regions, centroids, m)
    if kernel == "asmk*":
        return asmk_star(x_or_regions, centroids, m)
    if kernel == "rasmk":
        return rasmk(x_or_regions, centroids, m)
    if kernel == "rasmk*":
        return rasmk_star(x_or_regions, centroids, m)
    if kernel == "naive-rasmk":
        return naive_rasmk(x_or_regions, centroids, m)
    raise ValueError(kernel)


# ------------------------------------------------------------------------------------------------
# Similarity and ranking


def _popcount(b: np.ndarray) -> int:
    return int(np.unpackbits(np.asarray(b, np.uint8)).sum())


def similarity(query, db, dim: int, alpha: float = 3.0, tau: float = 0.0, normalize: bool = True) -> float:
    """S(X, Y) of METHOD.md section 4. query / db: (words, codes); binary when codes are uint8."""
    qw, qc = np.asarray(query[0]), np.asarray(query[1])
    dw, dc = np.asarray(db[0]), np.asarray(db[1])
    if qw.size == 0 or dw.size == 0:
        return -1.0
    binary = qc.dtype == np.uint8
    assert (dc.dtype == np.uint8) == binary
    total = 0.0
    for i, k in enumerate(qw):
        hit = np.nonzero(dw == k)[0]
        if hit.size == 0:
            continue
        j = int(hit[0])
        if binary:
            n_bytes = qc.shape[1]
            h = _popcount(np.bitwise_xor(qc[i], dc[j]))
            u = 1.0 - 2.0 * h / (min(dim, 8) * n_bytes)
        else:
            u = float(np.dot(_f64(qc[i]), _f64(dc[j])))
        if u > tau:
            total += np.sign(u) * abs(u) ** alpha
    if normalize:
        total /= np.sqrt(float(qw.size) * float(dw.size))
    return float(total)


def rank(scores, ids):
    """Full ranking: score descending, ties by id ascending. Returns (scores, ids) reordered."""
    scores = _f64(scores)
    ids = np.asarray(ids, np.int64)
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
    return scores[order], ids[order]


def score_all(query, database, ids, dim, alpha=3.0, tau=0.0, normalize=True) -> dict:
    """{id: S(query, db)} over a list of aggregated database images."""
    return {int(i): similarity(query, d, dim, alpha, tau, normalize) for i, d in zip(ids, database)}


def search(query, database, ids, dim, alpha=3.0, tau=0.0, normalize=True, k=None):
    s = score_all(query, database, ids, dim, alpha, tau, normalize)
    rs, ri = rank(list(s.values()), list(s.keys()))
    if k is not None:
        rs, ri = rs[:k], ri[:k]
    return rs, ri


# ------------------------------------------------------------------------------------------------
# Query expansion (d2r.core.expand): slow, written from the formulas of its documentation


def _bits(code, dim: int) -> np.ndarray:
    return np.unpackbits(np.asarray(code, np.uint8))[:dim].astype(np.int64)


def _code_u(qc, dc, dim: int) -> float:
    """u of two codes of one word: 1 - 2 h / D (binary) or the dot product (float)."""
    if np.asarray(qc).dtype == np.uint8:
        h = int(np.sum(_bits(qc, dim) != _bits(dc, dim)))
        return 1.0 - 2.0 * h / dim
    return float(np.dot(_f64(qc), _f64(dc)))


def _raw_sum(query, entry, dim: int, alpha: float, tau: float) -> float:
    """sum over shared words of sigma(u) (no gamma; 0 with no shared word)."""
    total = 0.0
    for i, k in enumerate(np.asarray(query[0])):
        for j, kk in enumerate(np.asarray(entry[0])):
            if kk == k:
                u = _code_u(query[1][i], entry[1][j], dim)
                if u > tau:
                    total += np.sign(u) * abs(u) ** alpha
    return total


def _first_results(query, database, ids, dim, alpha, tau, normalize, top):
    """database: per image a list of entries (words, codes); an image's score is its best entry's."""
    scores = [max(similarity(query, e, dim, alpha, tau, normalize) for e in entries) for entries in database]
    _, ranked = rank(scores, ids)
    return [int(i) for i in ranked[:top]]


def _best_entry(query, entries, dim, alpha, tau):
    best, best_s = None, -np.inf
    for e in entries:
        s = _raw_sum(query, e, dim, alpha, tau)
        if s > best_s:
            best, best_s = e, s
    return best


def _expanded(query, chosen, weights, dim, min_images):
    """Per word: the weighted sum of the query's and the chosen entries' codes (signs for binary), then
    bits (> 0; 0 takes the query's bit, or 0) or l2n. Words: the query's plus those of at least
    min_images chosen entries (min_images > 0)."""
    qw = [int(k) for k in query[0]]
    binary = np.asarray(query[1]).dtype == np.uint8
    count: dict = {}
    for e in chosen:
        for k in e[0]:
            count[int(k)] = count.get(int(k), 0) + 1
    words = set(qw)
    if min_images > 0:
        words |= {k for k, c in count.items() if c >= min_images}
    out_codes = []
    for k in sorted(words):
        z = np.zeros(dim)
        qbit = None
        if k in qw:
            c = query[1][qw.index(k)]
            if binary:
                qbit = _bits(c, dim)
                z += 2 * qbit - 1
            else:
                z += _f64(c)
        for e, w in zip(chosen, weights):
            ew = [int(x) for x in e[0]]
            if k in ew:
                c = e[1][ew.index(k)]
                z += w * ((2 * _bits(c, dim) - 1) if binary else _f64(c))
        if binary:
            bits = [(1 if z[d] > 0 else 0) if z[d] != 0 else (int(qbit[d]) if qbit is not None else 0)
                    for d in range(dim)]
            out_codes.append(np.packbits(np.array(bits, np.uint8)))
        else:
            out_codes.append(z / np.sqrt(max(float(np.dot(z, z)), 1e-12)))
    words_arr = np.array(sorted(words), np.int64)
    if binary:
        return words_arr, np.array(out_codes, np.uint8).reshape(len(words), -1)
    return words_arr, np.array(out_codes, np.float64).reshape(len(words), dim)


def hqe(query, database, ids, dim, top=10, hamming=None, min_matches=10, min_images=2, alpha=3.0, tau=0.0,
        normalize=True):
    """Hamming query expansion: reliable images among the first `top` results have at least
    `min_matches` shared words with codes at most `hamming` bits apart (float: dot >= 1 - 2 h / D);
    per word the majority of the query's and the reliable images' bits. Returns (words, codes)."""
    h = dim // 4 if hamming is None else hamming
    first = _first_results(query, database, ids, dim, alpha, tau, normalize, top)
    by_id = {int(i): d for i, d in zip(ids, database)}
    reliable = []
    for i in first:
        e = _best_entry(query, by_id[i], dim, alpha, tau)
        strict = 0
        for a, k in enumerate(query[0]):
            for b, kk in enumerate(e[0]):
                if kk == k and _code_u(query[1][a], e[1][b], dim) >= 1.0 - 2.0 * h / dim - 1e-9:
                    strict += 1
        if strict >= min_matches:
            reliable.append(e)
    if not reliable:
        return np.asarray(query[0], np.int64), np.asarray(query[1])
    return _expanded(query, reliable, [1.0] * len(reliable), dim, min_images)


def alpha_qe(query, database, ids, dim, top=5, a=3.0, min_images=2, alpha=3.0, tau=0.0, normalize=True,
             expansion_ids=None):
    """alpha-QE: the first `top` results (or the first `top` of expansion_ids) weigh
    (S_n / max S_n) ** a, S_n the gamma-normalised similarity to the query, 0 where S_n <= 0."""
    first = (_first_results(query, database, ids, dim, alpha, tau, normalize, top) if expansion_ids is None
             else [int(i) for i in expansion_ids][:top])
    by_id = {int(i): d for i, d in zip(ids, database)}
    entries, sims = [], []
    for i in first:
        e = _best_entry(query, by_id[i], dim, alpha, tau)
        entries.append(e)
        sims.append(_raw_sum(query, e, dim, alpha, tau) / np.sqrt(len(query[0]) * len(e[0])) if len(e[0]) else 0.0)
    smax = max(sims) if sims else 0.0
    chosen, weights = [], []
    for e, s in zip(entries, sims):
        if smax > 0 and s > 0:
            chosen.append(e)
            weights.append((s / smax) ** a)
    if not chosen:
        return np.asarray(query[0], np.int64), np.asarray(query[1])
    return _expanded(query, chosen, weights, dim, min_images)


def fused_rerank(scores, inliers, min_inliers: int, order: str, weight: float = 0.15, cap: int = 100):
    """Candidates in initial order (best first): those with >= min_inliers inliers (every one when
    min_inliers is 0) first, by (inliers desc, score desc, position) or in initial order; the rest
    after them in initial order. order "fused": all sorted by score / max score (when it is > 0) plus
    weight * min(inliers, cap) / cap for the promoted ones, ties by position. Returns the positions."""
    n = len(scores)
    if order == "fused":
        top = max(float(x) for x in scores) if n else 0.0
        keys = []
        for i in range(n):
            k = float(scores[i]) / top if top > 0 else float(scores[i])
            if min_inliers == 0 or max(int(inliers[i]), 0) >= min_inliers:
                k += weight * min(max(int(inliers[i]), 0), cap) / cap
            keys.append(k)
        return sorted(range(n), key=lambda i: (-keys[i], i))
    promoted = [i for i in range(n) if min_inliers == 0 or max(int(inliers[i]), 0) >= min_inliers]
    rest = [i for i in range(n) if i not in promoted]
    if order == "inliers":
        promoted = sorted(promoted, key=lambda i: (-max(int(inliers[i]), 0), -float(scores[i]), i))
    return promoted + rest
