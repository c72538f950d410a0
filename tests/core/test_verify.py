"""Tests of d2r.verify (spatial verification / re-ranking, native csrc/ransac.cpp)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r import _native
from d2r.core.verify import (
    MIN_MATCHES,
    PairVerification,
    match_descriptors,
    rerank,
    verify_pair,
)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _unit(x):
    x = np.asarray(x, np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _affine_problem(n=400, outlier_frac=0.5, noise=1.0, seed=0, size=800.0):
    """Matched points: dst = A src + t + noise for inliers, uniform for outliers."""
    rng = np.random.default_rng(seed)
    A = np.array([[0.92, 0.21, 31.0], [-0.12, 1.08, -18.0]])
    src = rng.uniform(0, size, (n, 2))
    dst = src @ A[:, :2].T + A[:, 2] + rng.normal(0, noise, (n, 2))
    out = rng.random(n) < outlier_frac
    dst[out] = rng.uniform(0, size, (int(out.sum()), 2))
    truth = np.linalg.norm(src @ A[:, :2].T + A[:, 2] - dst, axis=1) < 10.0
    return src.astype(np.float32), dst.astype(np.float32), A, truth


def _features_pair(n_db=600, n_common=300, seed=0, dim=128, outliers=0.0):
    """A database image and a query that sees n_common of its features under a known affine map
    ((y, x) locations, as Features store them)."""
    rng = np.random.default_rng(seed)
    db_desc = _unit(rng.random((n_db, dim)))
    db_xy = rng.uniform(0, 640, (n_db, 2))
    A = np.array([[0.8, -0.3, 120.0], [0.25, 0.9, 40.0]])
    common = rng.choice(n_db, n_common, replace=False)
    q_xy_common = db_xy[common] @ A[:, :2].T + A[:, 2] + rng.normal(0, 0.7, (n_common, 2))
    n_extra = n_db - n_common
    q_desc = np.concatenate([db_desc[common] + 0.01 * rng.standard_normal((n_common, dim)),
                             rng.random((n_extra, dim))])
    q_xy = np.concatenate([q_xy_common, rng.uniform(0, 640, (n_extra, 2))])
    if outliers:
        k = int(outliers * n_common)
        q_xy[:k] = rng.uniform(0, 640, (k, 2))
    q = (_unit(q_desc), q_xy[:, ::-1].astype(np.float32))
    db = (db_desc, db_xy[:, ::-1].astype(np.float32))
    return q, db, A


def _random_features(n, seed, dim=128):
    rng = np.random.default_rng(seed)
    return (_unit(rng.random((n, dim))), rng.uniform(0, 640, (n, 2)).astype(np.float32))


@pytest.fixture
def threads():
    before = d2r.get_num_threads()
    yield
    d2r.set_num_threads(before)


# --------------------------------------------------------------------------- #
# matching
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("nq,ndb,dim", [(1, 1, 1), (37, 53, 5), (200, 333, 128), (130, 31, 40)])
def test_match_descriptors_equals_float64_bruteforce(nq, ndb, dim):
    rng = np.random.default_rng(nq * 7 + ndb)
    q = _unit(rng.standard_normal((nq, dim)))
    db = _unit(rng.standard_normal((ndb, dim)))
    db[: min(ndb, nq) // 2] = q[: min(ndb, nq) // 2]  # some exact matches (distance 0)
    d2 = ((q.astype(np.float64)[:, None] - db.astype(np.float64)[None]) ** 2).sum(-1)
    nn = d2.argmin(1)
    dist = np.sqrt(d2[np.arange(nq), nn])
    for md in (0.5, 0.9, 1.2, np.inf):
        pairs, got = match_descriptors(q, db, md, return_distances=True)
        keep = dist < md
        assert pairs.dtype == np.int64 and pairs.shape == (int(keep.sum()), 2)
        np.testing.assert_array_equal(pairs[:, 0], np.nonzero(keep)[0])
        np.testing.assert_array_equal(pairs[:, 1], nn[keep])
        np.testing.assert_allclose(got, dist[keep], atol=1e-6)


def test_match_descriptors_ties_and_empty():
    q = np.array([[1, 0, 0]], np.float32)
    db = np.array([[0, 1, 0], [1, 0, 0], [1, 0, 0]], np.float32)  # duplicate nearest rows
    np.testing.assert_array_equal(match_descriptors(q, db), [[0, 1]])
    assert match_descriptors(np.zeros((0, 3), np.float32), db).shape == (0, 2)
    assert match_descriptors(q, np.zeros((0, 3), np.float32)).shape == (0, 2)
    # strict threshold: distance exactly 1 is not < 1
    assert match_descriptors(q, np.array([[0, 0, 0]], np.float32), 1.0).shape == (0, 2)
    assert match_descriptors(q, np.array([[0, 0, 0]], np.float32), 1.0001).shape == (1, 2)


def test_match_descriptors_validation():
    q = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="dimension"):
        match_descriptors(q, np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError):
        match_descriptors(q.astype(np.int32), q)
    with pytest.raises(ValueError):
        match_descriptors(q, q, max_distance=0)
    with pytest.raises(ValueError, match="NaN"):
        match_descriptors(np.full((2, 4), np.nan, np.float32), q)
    with pytest.raises(TypeError):  # the native layer refuses silent conversions
        _native.match_descriptors(q.astype(np.float64), q)


# --------------------------------------------------------------------------- #
# RANSAC
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("outlier_frac", [0.0, 0.3, 0.6, 0.8])
def test_ransac_recovers_known_affine(outlier_frac):
    src, dst, A, truth = _affine_problem(outlier_frac=outlier_frac, seed=int(outlier_frac * 10))
    inliers, model, mask = _native.affine_ransac(src, dst, 10.0, 1000, 0, 1.0)
    assert mask.dtype == bool and mask.shape == (len(src),)
    assert inliers == mask.sum()
    # all true inliers (noise sigma 1 px << 10 px) and almost no outlier
    assert inliers >= 0.97 * truth.sum()
    assert (mask & ~truth).sum() <= 2
    assert model.shape == (2, 3)
    np.testing.assert_allclose(model[:, :2], A[:, :2], atol=0.01)
    np.testing.assert_allclose(model[:, 2], A[:, 2], atol=2.0)


def test_ransac_exact_data_and_model_convention():
    # dst = (a x + b y + c, d x + e y + f), points interleaved (x, y)
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, (50, 2)).astype(np.float32)
    A = np.array([[2.0, 0.5, 3.0], [-0.25, 1.5, 7.0]])
    dst = (src @ A[:, :2].T + A[:, 2]).astype(np.float32)
    inliers, model, mask = _native.affine_ransac(src, dst, 0.5, 1000, 0, 1.0)
    assert inliers == 50 and mask.all()
    np.testing.assert_allclose(model, A, atol=1e-3)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_ransac_too_few_points(n):
    pts = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    inliers, model, mask = _native.affine_ransac(pts, pts + 1, 10.0, 1000, 0, 1.0)
    assert inliers == 0 and model is None and mask.shape == (n,) and not mask.any()


def test_ransac_degenerate_samples_give_no_model():
    t = np.linspace(0, 100, 40, dtype=np.float32)
    line = np.stack([t, 2 * t + 1], 1)  # collinear source points
    inliers, model, mask = _native.affine_ransac(line, line * 0.5, 10.0, 1000, 0, -1.0)
    assert inliers == 0 and model is None and not mask.any()
    same = np.tile(np.float32([[5, 5]]), (30, 1))  # repeated points
    assert _native.affine_ransac(same, same, 10.0, 1000, 0, 1.0)[0] == 0
    # good source triangle but collinear destinations: a singular map, rejected too
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (30, 2)).astype(np.float32)
    assert _native.affine_ransac(src, line[:30], 10.0, 1000, 0, 1.0)[0] == 0
    # exactly 3 non-collinear points: one exact model
    tri = np.float32([[0, 0], [10, 0], [0, 10]])
    assert _native.affine_ransac(tri, tri * 2 + 1, 1.0, 10, 0, 1.0)[0] == 3


def test_ransac_non_finite_points_do_not_crash():
    src, dst, _, _ = _affine_problem(n=100, outlier_frac=0.2)
    src[:5] = np.nan
    dst[5:8] = np.inf
    inliers, model, mask = _native.affine_ransac(src, dst, 10.0, 500, 0, 1.0)
    assert 0 < inliers <= 92 and not mask[:8].any()


def test_ransac_seed_determinism():
    src, dst, _, truth = _affine_problem(n=300, outlier_frac=0.85, seed=5)
    a = _native.affine_ransac(src, dst, 10.0, 200, 123, -1.0)
    b = _native.affine_ransac(src, dst, 10.0, 200, 123, -1.0)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    # the seed drives the samples: single-trial inlier sets vary with it
    masks = {tuple(np.nonzero(_native.affine_ransac(src, dst, 10.0, 1, s, -1.0)[2])[0]) for s in range(20)}
    assert len(masks) >= 15
    # Seeds up to 2**64 - 1 are accepted and all 64 bits drive the stream. Measured (this problem:
    # 300 points, 43 true inliers at 10 px): with seed 2**64 - 1 and 1000 trials RANSAC finds exactly
    # the 43 true inliers (as do seeds 2**64 - 2, 2**63, 2**32 - 1, 2**32 and 123; seed 0 stops early
    # at 33), and the single-trial inlier sets of the seeds below are pairwise different (a seed
    # truncated to 32 or 63 bits, or wrapped to a signed value, would repeat one).
    inliers, _, mask = _native.affine_ransac(src, dst, 10.0, 1000, 2**64 - 1, 1.0)
    assert inliers == truth.sum() == 43
    np.testing.assert_array_equal(mask.astype(bool), truth)
    seeds = [2**64 - 1, 2**64 - 2, 2**63, 2**63 - 1, 2**32, 2**32 - 1, 0]
    single = {tuple(np.nonzero(_native.affine_ransac(src, dst, 10.0, 1, s, -1.0)[2])[0]) for s in seeds}
    assert len(single) == len(seeds)


def test_ransac_early_stop_rule():
    # skimage's rule with stop_probability=1 only stops when nearly all points are inliers; with
    # stop_probability=0 it stops at the first model found.
    src, dst, _, truth = _affine_problem(n=300, outlier_frac=0.0, seed=2)
    full = _native.affine_ransac(src, dst, 10.0, 1000, 0, -1.0)[0]
    assert full == truth.sum()
    assert _native.affine_ransac(src, dst, 10.0, 1000, 0, 1.0)[0] == full
    src, dst, _, truth = _affine_problem(n=300, outlier_frac=0.7, seed=2)
    first = _native.affine_ransac(src, dst, 10.0, 1000, 7, 0.0)[0]
    single = _native.affine_ransac(src, dst, 10.0, 1, 7, -1.0)[0]
    assert first == single  # trial 0 is not degenerate here, so both keep the first hypothesis
    assert _native.affine_ransac(src, dst, 10.0, 1000, 7, 1.0)[0] >= first


def test_ransac_mask_count_consistency_many_cases():
    for seed in range(25):
        src, dst, _, _ = _affine_problem(n=20 + 13 * seed, outlier_frac=0.2 + 0.03 * seed, seed=seed)
        inliers, model, mask = _native.affine_ransac(src, dst, 10.0, 300, seed, 1.0)
        assert inliers == int(mask.sum())


def test_ransac_validation():
    p = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError):
        _native.affine_ransac(p, np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError):
        _native.affine_ransac(np.zeros((5, 3), np.float32), np.zeros((5, 3), np.float32))
    with pytest.raises(TypeError):
        _native.affine_ransac(p.astype(np.float64), p)
    with pytest.raises(ValueError):
        _native.affine_ransac(p, p, threshold=0.0)
    with pytest.raises(ValueError):
        _native.affine_ransac(p, p, max_trials=-1)
    with pytest.raises(ValueError):
        _native.affine_ransac(p, p, stop_probability=1.5)


def _skimage_like_ransac(src, dst, threshold, max_trials, rng):
    """A small numpy re-statement of skimage.measure.ransac(AffineTransform, min_samples=3),
    without early stop: the reference behaviour the native code follows."""
    n = len(src)
    best, best_sum = 0, np.inf
    S = np.hstack([src, np.ones((n, 1))]).astype(np.float64)
    for _ in range(max_trials):
        idx = rng.choice(n, 3, replace=False)
        try:
            M = np.linalg.solve(S[idx], dst[idx].astype(np.float64))
        except np.linalg.LinAlgError:
            continue
        r = np.linalg.norm(S @ M - dst, axis=1)
        cnt, s = int((r < threshold).sum()), float((r ** 2).sum())
        if cnt > best or (cnt == best and s < best_sum):
            best, best_sum = cnt, s
    return best


@pytest.mark.parametrize("outlier_frac", [0.5, 0.75])
def test_ransac_agrees_with_skimage_like_reference(outlier_frac):
    src, dst, _, truth = _affine_problem(n=250, outlier_frac=outlier_frac, seed=11)
    ref = _skimage_like_ransac(src, dst, 10.0, 1000, np.random.default_rng(0))
    ours = _native.affine_ransac(src, dst, 10.0, 1000, 0, -1.0)[0]
    assert abs(ours - ref) <= max(2, 0.05 * truth.sum())


def test_ransac_against_skimage_if_installed():
    measure = pytest.importorskip("skimage.measure", reason="scikit-image is optional (not a dependency)")
    transform = pytest.importorskip("skimage.transform")
    src, dst, _, truth = _affine_problem(n=250, outlier_frac=0.6, seed=4)
    import inspect

    seed_kw = "rng" if "rng" in inspect.signature(measure.ransac).parameters else "random_state"
    _, ref_mask = measure.ransac((src.astype(np.float64), dst.astype(np.float64)), transform.AffineTransform,
                                 min_samples=3, residual_threshold=10, max_trials=1000, **{seed_kw: 0})
    ours = _native.affine_ransac(src, dst, 10.0, 1000, 0, 1.0)[0]
    assert abs(ours - int(ref_mask.sum())) <= max(2, 0.05 * truth.sum())


# --------------------------------------------------------------------------- #
# verify_pair / rerank
# --------------------------------------------------------------------------- #
def test_verify_pair_synthetic_features():
    q, db, A = _features_pair(n_db=600, n_common=300, seed=1)
    res = verify_pair(q, db)
    assert isinstance(res, PairVerification)
    assert res.matches.shape[1] == 2 and len(res.inlier_mask) == len(res.matches)
    assert res.inliers == res.inlier_mask.sum()
    assert 295 <= res.inliers <= 305
    # the model maps database (x, y) to query (x, y)
    np.testing.assert_allclose(res.model[:, :2], A[:, :2], atol=0.01)
    np.testing.assert_allclose(res.model[:, 2], A[:, 2], atol=1.5)
    # inlier matches pair the common features: query rows < 300
    assert (res.matches[res.inlier_mask, 0] < 300).all()
    unrelated = verify_pair(q, _random_features(600, seed=9))
    assert unrelated.inliers < 20


def test_verify_pair_few_matches_is_zero():
    q, db, _ = _features_pair(n_db=50, n_common=3, seed=2)
    # only the 3 common features are closer than 0.3: <= 3 matches -> 0 (official rule)
    res = verify_pair(q, db, max_distance=0.3)
    assert len(res.matches) == 3
    assert res.inliers == 0 and res.model is None and not res.inlier_mask.any()
    res = verify_pair(q, db, max_distance=0.3, min_matches=3)
    assert res.inliers == 3
    empty = (np.zeros((0, 128), np.float32), np.zeros((0, 2), np.float32))
    assert verify_pair(q, empty).inliers == 0
    assert verify_pair(empty, db).inliers == 0
    assert MIN_MATCHES == 4


def test_verify_pair_accepts_features_objects():
    from d2r.extract.rootsift import Features

    q, db, _ = _features_pair(seed=3)
    fq = Features(q[0], q[1], np.ones(len(q[0])), np.ones(len(q[0])))
    fdb = Features(db[0], db[1], np.ones(len(db[0])), np.ones(len(db[0])))
    assert verify_pair(fq, fdb).inliers == verify_pair(q, db).inliers


def test_verify_validation():
    q, db, _ = _features_pair(n_db=40, n_common=20)
    with pytest.raises(ValueError, match="dimension"):
        verify_pair(q, (np.zeros((5, 64), np.float32), np.zeros((5, 2), np.float32)))
    with pytest.raises(ValueError, match="locations"):
        verify_pair(q, (db[0], db[1][:-1]))
    with pytest.raises(TypeError):
        verify_pair(q, "not features")
    with pytest.raises(TypeError):
        verify_pair(q, db, seed=1.5)
    with pytest.raises(ValueError):
        verify_pair(q, db, seed=-1)
    with pytest.raises(ValueError):
        verify_pair(q, db, threshold=float("inf"))
    with pytest.raises(ValueError):
        verify_pair(q, db, stop_probability=2.0)
    with pytest.raises(ValueError):
        rerank(q, [db, db], initial_scores=[1.0])
    with pytest.raises(ValueError):
        rerank(q, [db, db], initial_scores=[1.0, np.nan])
    with pytest.raises(ValueError):
        rerank(q, [db], top=-1)


def _candidates(seed=0):
    """Query + 12 candidates: 4 true views with 60..240 common features, 8 unrelated images."""
    q, _, _ = _features_pair(seed=seed)
    rng = np.random.default_rng(seed + 100)
    cands = []
    truth = {}
    for i in range(12):
        if i % 3 == 1:
            k = 60 * (len(truth) + 1)
            idx = rng.choice(300, k, replace=False)  # common features of the query (rows < 300)
            desc = q[0][idx] + 0.01 * rng.standard_normal((k, 128)).astype(np.float32)
            loc = q[1][idx] * 0.5 + 17  # another (affine) view of those features, (y, x)
            extra = _random_features(400, seed=1000 + i)
            cands.append((_unit(np.concatenate([desc, extra[0]])),
                          np.concatenate([loc, extra[1]]).astype(np.float32)))
            truth[i] = k
        else:
            cands.append(_random_features(400, seed=2000 + i))
    return q, cands, truth


def test_rerank_orders_true_matches_first():
    q, cands, truth = _candidates()
    scores = np.linspace(1.0, 0.0, len(cands))
    order, inliers = rerank(q, cands, scores)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(len(cands)))
    # true views first, by number of common features
    assert order[:4].tolist() == sorted(truth, key=lambda i: -truth[i])
    for i, k in truth.items():
        assert k - 3 <= inliers[i] <= k + 3
    # the official sort key: (inliers, initial score) descending, stable
    key = [(max(inliers[i], 0), scores[i], -i) for i in range(len(cands))]
    assert order.tolist() == sorted(range(len(cands)), key=lambda i: key[i], reverse=True)
    # each score equals verify_pair's on the same pair and seed
    for i in range(len(cands)):
        assert inliers[i] == verify_pair(q, cands[i]).inliers


def test_rerank_top_and_ties():
    q, cands, truth = _candidates(seed=1)
    scores = np.arange(len(cands), 0, -1, dtype=np.float64)  # list already in rank order
    order, inliers = rerank(q, cands, scores, top=5)
    assert (inliers[:5] >= 0).all() and (inliers[5:] == -1).all()
    verified_true = [i for i in truth if i < 5]
    assert order[: len(verified_true)].tolist() == sorted(verified_true, key=lambda i: -inliers[i])
    # candidates after the top keep their initial order, after every verified image with inliers
    np.testing.assert_array_equal(order[-7:], np.arange(5, 12))
    # initial_scores=None: list order is the initial rank; ties of scores by list position
    o2, i2 = rerank(q, cands, None, top=5)
    np.testing.assert_array_equal(o2, order)
    np.testing.assert_array_equal(i2, inliers)
    o3, i3 = rerank(q, cands, np.zeros(len(cands)), top=5)
    np.testing.assert_array_equal(i3, inliers)
    # top=0: nothing verified, initial order
    o4, i4 = rerank(q, cands, scores, top=0)
    np.testing.assert_array_equal(o4, np.arange(len(cands)))
    assert (i4 == -1).all()
    # top selects by score, not by list position
    rev = scores[::-1].copy()
    _, i5 = rerank(q, cands, rev, top=3)
    assert (i5[-3:] >= 0).all() and (i5[:-3] == -1).all()
    # empty candidate list / empty query
    o6, i6 = rerank(q, [], [])
    assert o6.shape == (0,) and i6.shape == (0,)
    empty = (np.zeros((0, 128), np.float32), np.zeros((0, 2), np.float32))
    _, i7 = rerank(empty, cands, scores)
    assert (i7[:100] == 0).all()


def test_rerank_deterministic_and_thread_independent(threads):
    q, cands, _ = _candidates(seed=2)
    cands = cands * 3  # 36 pairs: the pair-parallel path; 1 pair: the row-parallel path
    scores = np.linspace(1, 0, len(cands))
    results = []
    for nt in (1, 2, 3):
        d2r.set_num_threads(nt)
        results.append(rerank(q, cands, scores, seed=5))
        results.append(rerank(q, cands[:1], scores[:1], seed=5))
    for o, i in results[2::2]:
        np.testing.assert_array_equal(o, results[0][0])
        np.testing.assert_array_equal(i, results[0][1])
    for o, i in results[3::2]:
        np.testing.assert_array_equal(i, results[1][1])
    assert results[1][1][0] == results[0][1][0]
    # same seed -> same result; the pairs share the seed, so duplicated candidates score the same
    inl = results[0][1]
    np.testing.assert_array_equal(inl[:12], inl[12:24])


def test_verify_many_direct_batch(threads):
    q, cands, truth = _candidates(seed=3)
    qd, qyx = q
    descs = [c[0] for c in cands]
    xys = [np.ascontiguousarray(c[1][:, ::-1]) for c in cands]
    pairs = np.array([[0, i] for i in range(len(cands))] * 2, np.int64)
    a, na = _native.verify_many([qd], [np.ascontiguousarray(qyx[:, ::-1])], descs, xys, pairs)
    d2r.set_num_threads(1)
    b, nb = _native.verify_many([qd], [np.ascontiguousarray(qyx[:, ::-1])], descs, xys, pairs)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(na, nb)
    assert a.dtype == np.int32 and len(a) == len(pairs)
    with pytest.raises(ValueError, match="out of range"):
        _native.verify_many([qd], [qyx], descs, xys, np.array([[0, 99]], np.int64))
    with pytest.raises(ValueError):
        _native.verify_many([qd], [qyx], descs, xys[:-1], pairs)
    with pytest.raises(ValueError):
        _native.verify_many([qd], [qyx], descs, xys, pairs, max_distance=-1.0)


# --------------------------------------------------------------------------- #
# real photographs (../shared/data/realmix)
# --------------------------------------------------------------------------- #
def _realmix_images() -> Path:
    try:
        from d2r.datasets import find_realmix
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"d2r.datasets unavailable: {exc}")
    root = find_realmix()
    if root is None or not (root / "images" / "graffiti" / "affnet_img1.jpg").exists():
        pytest.skip("realmix photos not found (../shared/data/realmix absent; set D2R_SHARED_DATA)")
    return root / "images"


def test_real_photos_graffiti_vs_unrelated():
    pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) is needed for RootSIFT")
    from d2r.extract import RootSIFT

    images = _realmix_images()
    unrelated_dir = images / "leuven"
    unrelated = sorted(unrelated_dir.iterdir())[0] if unrelated_dir.is_dir() else None
    if unrelated is None:
        pytest.skip("realmix/images/leuven missing")
    ex = RootSIFT(max_features=1000)
    f1 = ex(images / "graffiti" / "affnet_img1.jpg")
    f2 = ex(images / "graffiti" / "affnet_img2.jpg")
    fu = ex(unrelated)
    same = verify_pair(f1, f2)
    other = verify_pair(f1, fu)
    assert same.inliers >= 100, same.inliers
    assert same.inliers >= 5 * max(other.inliers, 1), (same.inliers, other.inliers)
    # graffiti img2 is a moderate viewpoint change of img1: the fitted map is far from singular
    assert abs(np.linalg.det(same.model[:, :2])) > 0.3
    order, inliers = rerank(f1, [fu, f2], [1.0, 0.5])
    assert order.tolist() == [1, 0]
    assert inliers[1] == same.inliers and inliers[0] == other.inliers


def test_search_and_rerank_puts_the_verified_match_first():
    """The search-API entry point: a database image that is a true geometric match of the query rises
    above one that only shares visual words; unverified tail keeps its order."""
    import d2r
    from d2r.extract import Features
    from d2r.core.verify import search_and_rerank

    rng = np.random.default_rng(3)
    n, dim = 300, 32
    desc = rng.random((n, dim)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    xy = rng.uniform(0, 400, (n, 2)).astype(np.float32)
    q = Features(desc, xy, np.ones(n, np.float32), np.ones(n, np.float32))
    # image 0: same descriptors, locations permuted (no geometric consistency)
    perm = rng.permutation(n)
    bad = Features(desc, xy[perm], np.ones(n, np.float32), np.ones(n, np.float32))
    # image 1: same descriptors, locations under an affine map
    A = np.array([[0.9, 0.1], [-0.1, 1.05]], np.float32)
    good = Features(desc, xy @ A.T + 20, np.ones(n, np.float32), np.ones(n, np.float32))
    others = [Features(rng.random((50, dim)).astype(np.float32) / 4, rng.uniform(0, 400, (50, 2)).astype(np.float32),
                       np.ones(50, np.float32), np.ones(50, np.float32)) for _ in range(5)]
    feats = [bad, good] + others
    cb = d2r.Codebook(desc[:16])
    index = d2r.Index(cb, "asmk*")
    index.add([f.descriptors for f in feats])
    ids, inliers, scores = search_and_rerank(index, q, feats, k=5, top=3)
    assert ids[0] == 1 and inliers[0] > inliers[1]
    assert len(ids) == 5 and np.all(inliers[3:] == -1)
