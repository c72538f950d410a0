"""Baseline driver for the PyPI package ``asmk`` 0.1.1 (Jenicek & Tolias, ECCV 2020).

Everything timed here is asmk's own code: ``asmk.codebook.Codebook`` (faiss ``IndexFlatL2``
quantisation), ``asmk.kernel.ASMKKernel.aggregate`` / ``aggregate_image`` (aggregation and
binarisation), ``asmk.inverted_file.IVF.add`` / ``IVF.search`` (inverted file) and
``ASMKKernel.similarity`` + ``functional.asmk_kernel`` (selectivity).  The driver only calls
those in the order ``ASMKMethod.build_ivf`` / ``ASMKMethod.accumulate_scores`` call them, with a
timer between the steps.  See ``ASMK_MAPPING.md`` next to this file for the parameter mapping.

API
---
``build_asmk(centroids, images, binary=True, m_db=1, assignments=None) -> (AsmkBuilt, timings)``
    timings: 'codebook_index', 'quantize' (0 when ``assignments`` is given), 'aggregate',
    'ivf_build', 'total' (seconds).
``search_asmk(built, queries, m_query=1, alpha=3.0, tau=0.0, topk=None, assignments=None)
        -> ([(scores, ranks), ...], timings)``
    ``scores[j]`` is asmk's score of database image j (j = order in which images were given to
    ``build_asmk``), for every database image; ``ranks`` is asmk's own ranking (``IVF.search``,
    cut to ``topk``).  timings: per-query arrays 'quantize', 'aggregate', 'search', 'total'
    (seconds) and 'q_nwords' (asmk's word count per query, needed by the converter below).
``asmk_scores_to_d2r(scores, q_nwords, db_nwords, gamma, q_nwords_d2r=None, db_nwords_d2r=None)``
    converts asmk scores to d2r's conventions (with or without gamma, -1 for empty images).
``aggregate_image_asmk(built, des, m=1, assignments=None) -> (codes, words)``
    asmk's aggregation of one image; ``asmk_packed_to_packbits(codes, D)`` turns its binary codes
    into d2r's ``numpy.packbits`` byte layout.

Configuration used (closest to d2r's ASMK*): ``ASMKKernel(binary=True)`` (``False`` = ASMK with
float codes), ``IVF(use_idf=False)``, ``similarity_threshold=tau`` (0), ``alpha`` (3),
``multiple_assignment=m_db`` / ``m_query`` (d2r default 1 for both; asmk's published configs use 1
for the database and 5 for queries), ``topk=None``.

What cannot be matched (asmk behaviour that is hard-wired)
----------------------------------------------------------
* gamma normalisation is ALWAYS applied: ``IVF.search`` divides every term by
  ``sqrt(norm_factor[db image])`` and the sum by ``sqrt(q_norm_factor)``; with ``use_idf=False``
  these are the word counts, i.e. asmk returns ``|W_X|^-1/2 |W_Y|^-1/2 sum_k sigma(u_k)``.
  ``asmk_scores_to_d2r(..., gamma=False)`` multiplies it back by ``sqrt(nX nY)`` (exact up to
  float rounding) to get d2r's un-normalised sum.
* asmk keeps every assigned word, also words whose residual sum is zero (d2r drops words with
  ``||v|| <= 1e-6``).  Such a word has an all-zero float code (it contributes 0) or an all-zero
  bit code (it DOES contribute to binary scores), and it is counted in asmk's gamma.  The
  converter can rescale gamma to d2r's word counts (``*_nwords_d2r``) but cannot remove the binary
  contribution.  For real descriptors this needs a descriptor exactly on a centroid (rare).
* float codes are ``v / (||v|| + 1e-6)`` (``functional.normalize_vec_l2``), not
  ``v / max(||v||, 1e-6)``: codes have norm ``||v||/(||v||+1e-6)`` < 1, so float ASMK scores are
  slightly low (relative ~ alpha*2e-6/||v||).  Binary codes are unaffected (sign only).
* threshold is ``u >= tau`` (``functional.asmk_kernel``), d2r uses ``u > tau``.  Identical for
  tau = 0 (0**alpha = 0); for tau > 0 a binary ``u`` can hit tau exactly and then differs.
  ``np.power(u, alpha)`` instead of ``sign(u)|u|^alpha``: same for u >= 0.
* Hamming similarity ``u = 1 - 2 h / (32 * ceil(D/32))`` (``hamming.hamming_cdist_packed`` with
  normalization 0): codes are packed in uint32 words, first component = most significant bit.
  Equal to d2r's ``1 - 2h/D`` only when D is a multiple of 32 (D = 128 is fine).
* An image with no descriptors: a database image scores 0 (if it is the last one it is not even
  in asmk's score array; the driver pads with 0); a query gives 0/0 = NaN for all images.  d2r
  gives -1 in both cases; the converter writes -1.
* Ranking: ``np.argsort(-scores)`` (quicksort, not stable), so ties are not ordered by id.
* Quantisation: faiss ``IndexFlatL2`` in float32 (d2r: its own nearest-word search); near ties
  may pick other words.  Pass ``assignments`` to share one quantisation between both.
* No VLAD, R-ASMK or regions in asmk: it is a baseline for ASMK / ASMK* only.

Timing notes: faiss uses all OpenMP threads (2 here); on the 2-core VM identical runs varied up
to ~5x, so repeat and report medians.  ``search_asmk`` per-query 'total' excludes 'quantize' when
``assignments`` is given.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from asmk import asmk_method, codebook as asmk_codebook, index as asmk_index
from asmk import inverted_file as asmk_ivf, kernel as asmk_kernel

__all__ = [
    "AsmkBuilt", "build_asmk", "search_asmk", "asmk_scores_to_d2r", "aggregate_image_asmk",
    "asmk_packed_to_packbits",
]


@dataclasses.dataclass
class AsmkBuilt:
    """Result of build_asmk: asmk's ASMKMethod (codebook, kernel, inverted_file) + bookkeeping."""
    method: asmk_method.ASMKMethod
    n_db: int              # number of database images given (asmk may know fewer, see docstring)
    binary: bool
    m_db: int
    db_nwords: np.ndarray  # asmk's word count per db image (= its gamma^-2), length n_db

    @property
    def ivf(self):
        return self.method.inverted_file

    @property
    def codebook(self):
        return self.method.codebook

    @property
    def kernel(self):
        return self.method.kernel


def _params(C, binary, m_db, m_query=1, alpha=3.0, tau=0.0, topk=None):
    return {
        "index": {"gpu_id": None},
        "train_codebook": {"codebook": {"size": int(C)}},
        "build_ivf": {"kernel": {"binary": bool(binary)}, "ivf": {"use_idf": False},
                      "quantize": {"multiple_assignment": int(m_db)}, "aggregate": {}},
        "query_ivf": {"quantize": {"multiple_assignment": int(m_query)}, "aggregate": {},
                      "search": {"topk": topk},
                      "similarity": {"similarity_threshold": float(tau), "alpha": float(alpha)}},
    }


def _as_2d_assign(a):
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[:, None]
    return a.astype(np.int64, copy=False)


def build_asmk(centroids, images, binary=True, m_db=1, assignments=None):
    """Index ``images`` (list of (n_i, D) float32) with asmk; see module docstring."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    C, D = centroids.shape
    n_db = len(images)
    if assignments is not None:
        assert len(assignments) == n_db
        assignments = [_as_2d_assign(a) for a in assignments]
        m_db = assignments[0].shape[1] if n_db else m_db
    params = _params(C, binary, m_db)
    timings = {}
    t_all = time.perf_counter()

    # Codebook (asmk: Codebook.index -> faiss IndexFlatL2)
    t0 = time.perf_counter()
    cdb = asmk_codebook.Codebook(asmk_index.initialize_index(None), size=int(C))
    cdb.index(centroids)
    timings["codebook_index"] = time.perf_counter() - t0

    kern = asmk_kernel.ASMKKernel(cdb, **params["build_ivf"]["kernel"])
    ivf = asmk_ivf.IVF.initialize_empty(**params["build_ivf"]["ivf"], codebook_size=cdb.size)

    sizes = [len(x) for x in images]
    des = (np.concatenate([np.asarray(x, dtype=np.float32).reshape(-1, D) for x in images])
           if n_db else np.zeros((0, D), np.float32))
    des = np.ascontiguousarray(des)
    imids = np.repeat(np.arange(n_db, dtype=np.int64), sizes)

    # Quantize (IvfBuilder.add: one Codebook.quantize call over all descriptors)
    t0 = time.perf_counter()
    if assignments is None:
        des_q, word_ids, imids_q = cdb.quantize(des, imids, **params["build_ivf"]["quantize"])
    else:
        des_q, imids_q = des, imids
        word_ids = (np.concatenate(assignments) if n_db else np.zeros((0, m_db), np.int64))
    timings["quantize"] = time.perf_counter() - t0 if assignments is None else 0.0

    t_agg = t_ivf = 0.0
    if len(des_q):
        t0 = time.perf_counter()
        agg = kern.aggregate(des_q, word_ids, imids_q, **params["build_ivf"]["aggregate"])
        t_agg = time.perf_counter() - t0
        t0 = time.perf_counter()
        ivf.add(*agg)
        t_ivf = time.perf_counter() - t0
    timings["aggregate"] = t_agg
    timings["ivf_build"] = t_ivf
    timings["total"] = time.perf_counter() - t_all

    method = asmk_method.ASMKMethod(params, {"build_ivf": {"index_time": t_agg + t_ivf}},
                                    codebook=cdb, kernel=kern, inverted_file=ivf)
    db_nwords = np.zeros(n_db)
    db_nwords[:ivf.n_images] = np.asarray(ivf.norm_factor)[:n_db]
    return AsmkBuilt(method, n_db, bool(binary), int(m_db), db_nwords), timings


def aggregate_image_asmk(built, des, m=1, assignments=None):
    """asmk's (codes, words) for one image: Codebook.quantize + ASMKKernel.aggregate_image."""
    des = np.ascontiguousarray(np.asarray(des, dtype=np.float32).reshape(-1, built.codebook.centroids.shape[1]))
    if assignments is None:
        _, word_ids = built.codebook.quantize(des, multiple_assignment=int(m))
    else:
        word_ids = _as_2d_assign(assignments)
    return built.kernel.aggregate_image(des, word_ids)


def search_asmk(built, queries, m_query=1, alpha=3.0, tau=0.0, topk=None, assignments=None):
    """Query asmk with each of ``queries``; returns every db image's score (see module docstring)."""
    cdb, kern, ivf = built.codebook, built.kernel, built.ivf
    D = cdb.centroids.shape[1]
    params = _params(cdb.size, built.binary, built.m_db, m_query, alpha, tau, topk)["query_ivf"]
    similarity_func = lambda *x: kern.similarity(*x, **params["similarity"])  # as accumulate_scores
    nq = len(queries)
    tq, ta, ts, tt = (np.zeros(nq) for _ in range(4))
    q_nwords = np.zeros(nq)
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):  # asmk's 0/0 for a query with no words
        for i, q in enumerate(queries):
            qd = np.ascontiguousarray(np.asarray(q, dtype=np.float32).reshape(-1, D))
            t0 = time.perf_counter()
            if assignments is None:
                quantized = cdb.quantize(qd, **params["quantize"])
            else:
                quantized = (qd, _as_2d_assign(assignments[i]).reshape(len(qd), -1))
            t1 = time.perf_counter()
            aggregated = kern.aggregate_image(*quantized, **params["aggregate"])
            t2 = time.perf_counter()
            # topk=None: IVF.search always argsorts everything and only slices afterwards, so
            # the cost is the same as with topk; we need every score.
            ranks, sorted_scores = ivf.search(*aggregated, topk=None, similarity_func=similarity_func)
            t3 = time.perf_counter()
            tq[i] = t1 - t0 if assignments is None else 0.0
            ta[i], ts[i], tt[i] = t2 - t1, t3 - t2, t3 - t0 - (0.0 if assignments is None else t1 - t0)
            q_nwords[i] = len(aggregated[1])
            # db images asmk does not know (trailing images without descriptors) score 0, as
            # asmk's other images without words do (NaN for a query without words, as asmk's 0/0)
            scores = np.full(built.n_db, np.nan if len(aggregated[1]) == 0 else 0.0)
            scores[ranks] = sorted_scores
            out.append((scores, ranks if topk is None else ranks[:topk]))
    timings = {"quantize": tq, "aggregate": ta, "search": ts, "total": tt, "q_nwords": q_nwords}
    return out, timings


def asmk_scores_to_d2r(scores, q_nwords, db_nwords, gamma, q_nwords_d2r=None, db_nwords_d2r=None):
    """Convert asmk scores (always gamma-normalised with asmk's word counts) to d2r's convention.

    scores: (n_db,) or (n_q, n_db); q_nwords: scalar or (n_q,); db_nwords: (n_db,) asmk counts
    (``built.db_nwords`` and ``timings['q_nwords']``).  gamma=False: raw sum of sigma;
    gamma=True: divided by sqrt of d2r's word counts (default: asmk's).  Images with no word
    (by d2r's counts) get -1, as in d2r.
    """
    s = np.asarray(scores, dtype=np.float64)
    one = s.ndim == 1
    s = np.atleast_2d(s)
    qa = np.asarray(q_nwords, dtype=np.float64).reshape(-1, 1)
    da = np.asarray(db_nwords, dtype=np.float64).reshape(1, -1)
    qd = qa if q_nwords_d2r is None else np.asarray(q_nwords_d2r, np.float64).reshape(-1, 1)
    dd = da if db_nwords_d2r is None else np.asarray(db_nwords_d2r, np.float64).reshape(1, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.where(da > 0, s * np.sqrt(qa * da), 0.0)
        res = raw / np.sqrt(qd * dd) if gamma else raw
    res = np.where((qd == 0) | (dd == 0), -1.0, res)
    return res[0] if one else res


def asmk_packed_to_packbits(codes, D):
    """asmk's uint32 codes (MSB = first component) -> d2r's numpy.packbits bytes, ceil(D/8)/word."""
    codes = np.ascontiguousarray(codes, dtype=np.uint32)
    return codes.astype(">u4").view(np.uint8).reshape(len(codes), -1)[:, :(D + 7) // 8]


# ---------------------------------------------------------------------------------------------
# Self-check against a plain float64 numpy implementation of METHOD.md sections 3-4
# ---------------------------------------------------------------------------------------------

def _ref_assign(X, C, m):
    X = np.asarray(X, np.float64)
    C = np.asarray(C, np.float64)
    d2 = ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1)
    return np.argsort(d2, axis=1, kind="stable")[:, :m]


def _ref_aggregate(X, C, assign, binary, asmk_eps=False):
    """METHOD.md 3: v[k] = sum residuals; keep ||v|| > 1e-6; l2n; binarise (packbits of > 0).
    asmk_eps=True: normalise by ||v|| + 1e-6 as asmk does (diagnosis only)."""
    X = np.asarray(X, np.float64)
    C = np.asarray(C, np.float64)
    agg = {}
    for x, ks in zip(X, assign):
        for k in ks:
            agg[int(k)] = agg.get(int(k), 0.0) + (x - C[k])
    out = {}
    for k in sorted(agg):
        v = agg[k]
        n2 = float(v @ v)
        if np.sqrt(n2) > 1e-6:
            code = v / (np.sqrt(n2) + 1e-6 if asmk_eps else np.sqrt(max(n2, 1e-12)))
            out[k] = np.packbits(code > 0) if binary else code
    return out


def _ref_score(qa, da, D, binary, alpha=3.0, tau=0.0, gamma=True):
    if not qa or not da:
        return -1.0
    s = 0.0
    for k, cq in qa.items():
        if k not in da:
            continue
        if binary:
            h = int(np.unpackbits(np.bitwise_xor(cq, da[k])).sum())
            u = 1.0 - 2.0 * h / D
        else:
            u = float(cq @ da[k])
        if u > tau:
            s += np.sign(u) * abs(u) ** alpha
    if gamma:
        s /= np.sqrt(len(qa) * len(da))
    return s


def _synthetic(rng, n_img, n_desc, C, D, n_obj=40, noise=0.3, centres=None):
    """Clustered unit descriptors: each image draws from n_obj of the codebook's 'true' centres."""
    if centres is None:
        centres = rng.standard_normal((C, D)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    imgs = []
    for n in n_desc if hasattr(n_desc, "__len__") else [n_desc] * n_img:
        obj = rng.choice(len(centres), size=n_obj, replace=False)
        x = centres[rng.choice(obj, size=n)] + noise * rng.standard_normal((n, D)).astype(np.float32) / np.sqrt(D)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        imgs.append(x.astype(np.float32))
    return centres, imgs


def _self_check(seed=0):
    rng = np.random.default_rng(seed)
    C, D = 64, 128
    centres, imgs = _synthetic(rng, 0, [30, 50, 0, 40, 25, 60, 35, 45, 20, 0], C, D, n_obj=12, noise=0.8)
    codebook = (centres + 0.05 * rng.standard_normal(centres.shape)).astype(np.float32)
    db, qs = imgs[:8] + imgs[9:], imgs[5:8] + [imgs[2]]  # db images 2 and 8 empty, query 3 empty
    print(f"self-check: C={C} D={D} n_db={len(db)} n_q={len(qs)} (db images 2 and 8 and query 3 empty)")
    results = {}
    for binary in (True, False):
        for m_db, m_q in ((1, 1), (2, 3)):
            ref_db_as = [_ref_assign(x, codebook, m_db) for x in db]
            ref_q_as = [_ref_assign(x, codebook, m_q) for x in qs]
            rdb = [_ref_aggregate(x, codebook, a, binary) for x, a in zip(db, ref_db_as)]
            rq = [_ref_aggregate(x, codebook, a, binary) for x, a in zip(qs, ref_q_as)]
            built, _ = build_asmk(codebook, db, binary=binary, m_db=m_db)
            res, tim = search_asmk(built, qs, m_query=m_q)
            S = np.stack([r[0] for r in res])
            # same assignment check (faiss float32 vs float64 brute force)
            fa = [built.codebook.quantize(np.ascontiguousarray(x), multiple_assignment=m_db)[1] for x in db if len(x)]
            same_assign = all(np.array_equal(np.sort(a, 1), np.sort(b, 1)) for a, b in
                              zip(fa, [a for a, x in zip(ref_db_as, db) if len(x)]))
            for gamma in (True, False):
                ref = np.array([[_ref_score(q, d, D, binary, gamma=gamma) for d in rdb] for q in rq])
                conv = asmk_scores_to_d2r(S, tim["q_nwords"], built.db_nwords, gamma,
                                          q_nwords_d2r=[len(q) for q in rq],
                                          db_nwords_d2r=[len(d) for d in rdb])
                err = np.abs(conv - ref).max()
                rel = (np.abs(conv - ref) / np.maximum(np.abs(ref), 1e-12)).max()
                results[(binary, m_db, m_q, gamma)] = err
                print(f"  {'ASMK*' if binary else 'ASMK '} m_db={m_db} m_q={m_q} gamma={gamma!s:5}: "
                      f"max|asmk->d2r - ref| = {err:.3e} (max rel {rel:.2e}); "
                      f"faiss assignments == ref: {same_assign}")
            if not binary:
                rdb_e = [_ref_aggregate(x, codebook, a, binary, True) for x, a in zip(db, ref_db_as)]
                rq_e = [_ref_aggregate(x, codebook, a, binary, True) for x, a in zip(qs, ref_q_as)]
                ref_e = np.array([[_ref_score(q, d, D, binary, gamma=False) for d in rdb_e] for q in rq_e])
                conv = asmk_scores_to_d2r(S, tim["q_nwords"], built.db_nwords, False)
                print(f"    same, reference using asmk's ||v||+1e-6 normalisation: "
                      f"max|diff| = {np.abs(conv - ref_e).max():.3e}")
            if binary and m_db == 1:
                # code layout check: asmk bytes == packbits of the reference
                codes, words = aggregate_image_asmk(built, db[0], m=1)
                ok = all(np.array_equal(asmk_packed_to_packbits(codes, D)[j], rdb[0][int(w)])
                         for j, w in enumerate(words))
                print(f"  ASMK* codes of db image 0 == numpy.packbits(l2n(v) > 0): {ok}")
            raw_nan = np.isnan(S[3]).all()
            if binary and m_db == 1:
                print(f"  raw asmk: empty query -> NaN row: {raw_nan}; empty db image -> score "
                      f"{S[0, 2]:.1f}, trailing empty db image padded -> {S[0, -1]:.1f}")

    # Quirk demo: a word with an exactly zero residual (descriptor == centroid).
    x0 = np.vstack([codebook[5:6], db[0][:10]]).astype(np.float32)
    x1 = np.vstack([codebook[5:6], db[1][:10]]).astype(np.float32)
    for binary in (True, False):
        built, _ = build_asmk(codebook, [x1], binary=binary)
        res, tim = search_asmk(built, [x0])
        a = [_ref_aggregate(x, codebook, _ref_assign(x, codebook, 1), binary) for x in (x0, x1)]
        ref = _ref_score(a[0], a[1], D, binary, gamma=False)
        conv = asmk_scores_to_d2r(res[0][0], tim["q_nwords"][0], built.db_nwords, False)
        print(f"  quirk, zero-residual word shared ({'ASMK*' if binary else 'ASMK '}): asmk words "
              f"{int(tim['q_nwords'][0])}/{int(built.db_nwords[0])} vs d2r {len(a[0])}/{len(a[1])}; "
              f"raw sum asmk {conv[0]:.4f} vs d2r {ref:.4f}")
    # Quirk demo: D not a multiple of 32 (asmk divides Hamming distances by 32*ceil(D/32)).
    D2 = 40
    cb2 = rng.standard_normal((4, D2)).astype(np.float32)
    xa, xb = (rng.standard_normal((6, D2)).astype(np.float32) for _ in range(2))
    built, _ = build_asmk(cb2, [xb], binary=True)
    res, tim = search_asmk(built, [xa])
    a = [_ref_aggregate(x, cb2, _ref_assign(x, cb2, 1), True) for x in (xa, xb)]
    print(f"  quirk, D={D2} ASMK*: raw sum asmk "
          f"{asmk_scores_to_d2r(res[0][0], tim['q_nwords'][0], built.db_nwords, False)[0]:.4f} "
          f"vs d2r {_ref_score(a[0], a[1], D2, True, gamma=False):.4f}")
    return results


def _bench(n_img=500, n_desc=1000, C=8192, D=128, n_q=20, seed=0, binary=True, m_q=1, n_obj=300):
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    centres, imgs = _synthetic(rng, n_img + n_q, n_desc, C, D, n_obj=n_obj, noise=0.5)
    codebook = (centres + 0.02 * rng.standard_normal(centres.shape) / np.sqrt(D)).astype(np.float32)
    print(f"bench: {n_obj} true clusters/image, {n_img} db images x {n_desc} desc, {n_q} queries, C={C} D={D} "
          f"{'ASMK*' if binary else 'ASMK'} m_q={m_q} (data {time.perf_counter() - t0:.1f}s)")
    db, qs = imgs[:n_img], imgs[n_img:]
    built, tb = build_asmk(codebook, db, binary=binary, m_db=1)
    print("  build: " + ", ".join(f"{k} {v:.2f}s" for k, v in tb.items())
          + f"; words/image {built.db_nwords.mean():.0f}")
    res, ts = search_asmk(built, qs, m_query=m_q)
    print("  search per query (ms, mean/median): " + ", ".join(
        f"{k} {1e3 * ts[k].mean():.1f}/{1e3 * np.median(ts[k]):.1f}"
        for k in ("quantize", "aggregate", "search", "total")))
    return tb, ts


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", action="store_true", help="also time asmk at benchmark scale")
    p.add_argument("--n-img", type=int, default=500)
    p.add_argument("--n-desc", type=int, default=1000)
    p.add_argument("--C", type=int, default=8192)
    p.add_argument("--n-q", type=int, default=20)
    p.add_argument("--float", action="store_true", help="bench ASMK (float codes) instead of ASMK*")
    p.add_argument("--m-q", type=int, default=1)
    p.add_argument("--n-obj", type=int, default=300, help="true clusters per synthetic image")
    a = p.parse_args()
    _self_check()
    if a.bench:
        _bench(a.n_img, a.n_desc, a.C, 128, a.n_q, binary=not a.float, m_q=a.m_q, n_obj=a.n_obj)
