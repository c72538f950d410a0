"""Query expansion (d2r.core.expand: HQE, alpha-QE), the inverted file's entry_codes accessor and the
fused re-ranking rule (d2r.core.verify.fused_order), against the slow references of tests/reference.py."""
from __future__ import annotations

import numpy as np
import pytest

import d2r
from d2r.core.expand import HQE, AlphaQE, as_expansion, expand_query
from d2r.core.verify import RerankRule, fused_order, rerank

import reference as ref

DIM = 16
WORDS = 24


def _world(seed=0, n_objects=3, views=4, clutter=6):
    """A codebook, database images (noisy views of a few objects plus clutter) and queries (one more
    view of each object): enough shared words and near-identical codes for expansion to act."""
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((WORDS, DIM)).astype(np.float32)
    objects = [rng.standard_normal((40, DIM)).astype(np.float32) for _ in range(n_objects)]

    def view(o):
        keep = rng.random(len(o)) < 0.8
        x = o[keep] + 0.25 * rng.standard_normal((int(keep.sum()), DIM)).astype(np.float32)
        return np.vstack([x, rng.standard_normal((8, DIM)).astype(np.float32)])

    db = [view(o) for o in objects for _ in range(views)]
    db += [rng.standard_normal((30, DIM)).astype(np.float32) for _ in range(clutter)]
    queries = [view(o) for o in objects]
    return d2r.Codebook(centroids), db, queries


def _regions(x, rng):
    """Whole image plus two halves as regions (a Regions-like list)."""
    h = len(x) // 2
    return [x, x[:h], x[h:]]


def _setup(kind, seed=0):
    cb, db, queries = _world(seed)
    rng = np.random.default_rng(seed + 1)
    if kind == "regional":
        idx = d2r.RegionalSearchIndex(cb, "asmk*", pooling="max")
        regs = [_regions(x, rng) for x in db]
        ids = idx.add_regions_many(regs)
        # the reference database: per image its region entries, aggregated as the index stores them
        entries = [[_agg(cb, "asmk*", r) for r in rr] for rr in regs]
    elif kind == "rasmk*":
        idx = d2r.Index(cb, "rasmk*", normalize=False)
        regs = [_regions(x, rng) for x in db]
        ids = idx.add_regions_many(regs)
        entries = [[_as_pair(idx.aggregate(rr))] for rr in regs]
    else:
        idx = d2r.Index(cb, kind)
        ids = idx.add(db)
        entries = [[_as_pair(idx.aggregate(x))] for x in db]
    return idx, ids, entries, queries


def _qagg(idx, q):
    from d2r.core.aggregate import aggregate

    return aggregate(q, idx.codebook, idx.spec.query_kernel)


def _agg(cb, kernel, x):
    a = d2r.Index(cb, kernel).aggregate(x)
    return _as_pair(a)


def _as_pair(a):
    return (np.asarray(a.words, np.int64), np.asarray(a.codes))


KINDS = ["asmk*", "asmk", "rasmk*", "regional"]


@pytest.mark.parametrize("kind", KINDS)
def test_entry_codes_are_the_stored_aggregates(kind):
    idx, ids, entries, _ = _setup(kind)
    pick = np.array([ids[5], ids[0], ids[9]], np.int64)
    got = idx._ivf.entry_codes(pick, None)
    want = [e for i in (5, 0, 9) for e in entries[i]]
    assert got["image"].tolist() == [k for k, i in enumerate((5, 0, 9)) for _ in entries[i]]
    assert got["word_counts"].tolist() == [len(w) for w, _ in want]
    for e, (w, c) in enumerate(want):
        b, f = got["offsets"][e], got["offsets"][e + 1]
        np.testing.assert_array_equal(got["words"][b:f], w)
        np.testing.assert_array_equal(got["codes"][b:f], c.view(np.uint8).reshape(len(w), -1))
    # restricted to some words
    words = np.array([1, 4, 7, 20], np.int32)
    sub = idx._ivf.entry_codes(pick, words)
    for e, (w, c) in enumerate(want):
        b, f = sub["offsets"][e], sub["offsets"][e + 1]
        np.testing.assert_array_equal(sub["words"][b:f], w[np.isin(w, words)])


def test_entry_codes_bad_input():
    idx, ids, _, _ = _setup("asmk*")
    with pytest.raises(KeyError, match="not in the index"):
        idx._ivf.entry_codes(np.array([999], np.int64), None)
    with pytest.raises(ValueError, match="twice"):
        idx._ivf.entry_codes(np.array([1, 1], np.int64), None)
    with pytest.raises(ValueError, match="ascending"):
        idx._ivf.entry_codes(np.array([1], np.int64), np.array([3, 2], np.int32))
    with pytest.raises(ValueError, match="out of range"):
        idx._ivf.entry_codes(np.array([1], np.int64), np.array([WORDS], np.int32))
    with pytest.raises(TypeError):
        idx._ivf.entry_codes(np.array([1], np.int32), None)
    idx.remove([int(ids[2])])
    with pytest.raises(KeyError):
        idx._ivf.entry_codes(np.array([ids[2]], np.int64), None)
    assert idx._ivf.entry_codes(np.zeros(0, np.int64), None)["offsets"].tolist() == [0]


def _ref_expand(idx, entries, ids, q_pair, expansion):
    dim = idx.codebook.dim
    normalize = idx.normalize
    if isinstance(expansion, HQE):
        return ref.hqe(q_pair, entries, ids, dim, expansion.top, expansion.hamming, expansion.min_matches,
                       expansion.min_images, idx.alpha, idx.tau, normalize)
    return ref.alpha_qe(q_pair, entries, ids, dim, expansion.top, expansion.alpha, expansion.min_images,
                        idx.alpha, idx.tau, normalize)


EXPANSIONS = [HQE(top=6, min_matches=3, min_images=2), HQE(top=6, hamming=2, min_matches=2, min_images=0),
              AlphaQE(top=4, alpha=3.0, min_images=2), AlphaQE(top=3, alpha=1.0, min_images=0)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("expansion", EXPANSIONS, ids=str)
def test_expansion_matches_reference(kind, expansion):
    idx, ids, entries, queries = _setup(kind)
    changed = 0
    for q in queries:
        qa = _qagg(idx, q)
        _, first = idx.search_aggregated(qa, k=expansion.top)
        got = expand_query(idx, qa, first, expansion)
        want_w, want_c = _ref_expand(idx, entries, ids, _as_pair(qa), expansion)
        np.testing.assert_array_equal(got.words, want_w)
        if idx.spec.binary:
            np.testing.assert_array_equal(got.codes, want_c)
        else:
            np.testing.assert_allclose(got.codes, want_c, atol=1e-5)
        changed += not (np.array_equal(got.words, qa.words) and np.array_equal(got.codes, qa.codes))
        # the second search is a plain search with the expanded query
        s, i = idx.search(q, k=None, expand=expansion)
        if kind != "regional":
            rs, ri = ref.search((want_w, want_c), [es[0] for es in entries], ids, DIM, idx.alpha, idx.tau,
                                idx.normalize)
        if kind != "regional":
            np.testing.assert_array_equal(i, ri)
            np.testing.assert_allclose(s, rs, atol=1e-5)
        else:
            s2, i2 = idx.search_aggregated(got, k=None)
            np.testing.assert_array_equal(i, i2)
            np.testing.assert_array_equal(s, s2)
    assert changed > 0, "the expansion never changed a query: the test data do not exercise it"


@pytest.mark.parametrize("kind", KINDS)
def test_expansion_is_deterministic_and_batch_independent(kind):
    idx, _, _, queries = _setup(kind)
    for e in ("hqe", "aqe"):
        one = [idx.search(q, k=5, expand=e) for q in queries]
        many = idx.search(queries, k=5, expand=e)
        again = idx.search(queries, k=5, expand=e)
        for n, (s, i) in enumerate(one):
            np.testing.assert_array_equal(i, many[1][n])
            np.testing.assert_array_equal(s, many[0][n])
        np.testing.assert_array_equal(many[0], again[0])
        np.testing.assert_array_equal(many[1], again[1])


def test_expand_argument():
    assert as_expansion(None) is None and as_expansion("none") is None
    assert as_expansion("hqe") == HQE() and as_expansion("aqe") == AlphaQE()
    with pytest.raises(ValueError, match="expand must be"):
        as_expansion("qe")
    with pytest.raises(ValueError, match="top"):
        HQE(top=0)
    with pytest.raises(ValueError, match="alpha"):
        AlphaQE(alpha=float("nan"))
    idx, _, _, queries = _setup("asmk*")
    with pytest.raises(ValueError, match="expand must be"):
        idx.search(queries[0], expand="bogus")


def test_alpha_qe_over_given_ids_matches_reference():
    """The pipeline's use: alpha-QE over ids chosen outside (the spatially verified results)."""
    idx, ids, entries, queries = _setup("asmk*")
    qa = _qagg(idx, queries[1])
    chosen = np.array([ids[7], ids[4], ids[5]], np.int64)
    got = expand_query(idx, qa, chosen, AlphaQE(top=3))
    want_w, want_c = ref.alpha_qe(_as_pair(qa), entries, ids, DIM, 3, 3.0, 2, idx.alpha, idx.tau, idx.normalize,
                                  expansion_ids=chosen)
    np.testing.assert_array_equal(got.words, want_w)
    np.testing.assert_array_equal(got.codes, want_c)


# ------------------------------------------------------------------------------------------------
# fused re-ranking


@pytest.mark.parametrize("seed", range(5))
def test_fused_order_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = 40
    scores = np.sort(rng.random(n))[::-1].copy()
    scores[5] = scores[6]  # a tie
    inliers = rng.integers(-1, 60, n)
    for t in (0, 5, 20, 100):
        for order in ("inliers", "score"):
            got = fused_order(scores, inliers, RerankRule(t, order))
            assert got.tolist() == ref.fused_rerank(scores, inliers, t, order)
        for w, cap in ((0.15, 100), (1.0, 30)):
            got = fused_order(scores, inliers, RerankRule(t, "fused", w, cap))
            assert got.tolist() == ref.fused_rerank(scores, inliers, t, "fused", w, cap)
    assert fused_order(scores, inliers, RerankRule()).tolist() == ref.fused_rerank(scores, inliers, 15, "fused",
                                                                                    0.15, 100)


def test_official_rule_is_the_official_sort():
    """RerankRule(0, 'inliers') (OFFICIAL_RULE) reproduces rerank()'s (inliers, score) order."""
    from d2r.core.verify import OFFICIAL_RULE

    rng = np.random.default_rng(3)
    feats = [(rng.standard_normal((30, 8)).astype(np.float32), rng.random((30, 2)).astype(np.float32) * 100)
             for _ in range(12)]
    scores = np.sort(rng.random(12))[::-1]
    order, inl = rerank(feats[0], feats, scores, top=None)
    assert fused_order(scores, inl, RerankRule(0, "inliers")).tolist() == order.tolist()
    assert fused_order(scores, inl, None).tolist() == order.tolist()
    assert fused_order(scores, inl, OFFICIAL_RULE).tolist() == order.tolist()


def test_rerank_rule_bad_input():
    with pytest.raises(ValueError, match="order"):
        RerankRule(5, "bogus")
    with pytest.raises(ValueError, match="weight"):
        RerankRule(5, "fused", -1.0)
    with pytest.raises(ValueError, match="min_inliers"):
        RerankRule(-1)
    with pytest.raises(ValueError, match="differ in length"):
        fused_order([1.0, 0.5], [3])


def test_pipeline_expands_over_the_verified_results_only():
    """d2r.workflows.pipeline.verified_expansion: the expansion images are the top results with at
    least DEFAULT_RULE.min_inliers inliers. Database images 0-2 repeat the query's features at its
    locations (shifted: verified), the others have random locations (not verified)."""
    from d2r.core.aggregate import aggregate
    from d2r.core.verify import DEFAULT_RULE
    from d2r.extract import Features
    from d2r.workflows.pipeline import verified_expansion

    cb, db, queries = _world(4)
    rng = np.random.default_rng(5)
    q = queries[0]
    q_xy = rng.uniform(0, 500, (len(q), 2)).astype(np.float32)

    def feats(x, xy):
        return Features(x, xy, np.ones(len(x), np.float32), np.ones(len(x), np.float32))

    db = [q.copy(), q.copy(), q.copy()] + db
    db_feats = [feats(x, q_xy + 7 * k if k < 3 else rng.uniform(0, 500, (len(x), 2)).astype(np.float32))
                for k, x in enumerate(db)]
    idx = d2r.Index(cb, "asmk*")
    ids = idx.add(db)
    s, i = verified_expansion(idx, feats(q, q_xy), db_feats, AlphaQE(), top=10, max_distance=0.9)
    qa = aggregate(q, cb, "asmk*")
    _, first = idx.search_aggregated(qa, k=10)
    verified = [j for j in first if j in set(ids[:3].tolist())]
    assert len(verified) == 3 and DEFAULT_RULE.min_inliers <= len(q)
    s2, i2 = idx.search_aggregated(expand_query(idx, qa, np.array(verified, np.int64), AlphaQE()), k=None)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_array_equal(s, s2)


def test_expansion_with_a_region_without_words():
    """Regression: a RegionalSearchIndex image with an empty region (no features, no words) among the
    expansion images made expand_query fail reshaping its zero codes."""
    cb, db, queries = _world(6)
    idx = d2r.RegionalSearchIndex(cb, "asmk*", pooling="max")
    empty = np.zeros((0, DIM), np.float32)
    idx.add_regions_many([[x, x[: len(x) // 2], empty] for x in db])
    for e in ("hqe", "aqe"):
        s, i = idx.search(queries[0], k=None, expand=e)
        assert len(i) == len(db) and np.all(np.diff(s) <= 0)


def _fuse_reference(first, second, weight, k):
    """Fused ranking, the obvious way: per query a dict id -> score of each search, each divided by its
    best score when that is positive, summed with the weight, sorted by (-score, id)."""
    out_s, out_i = [], []
    for s1, i1, s2, i2 in zip(first[0], first[1], second[0], second[1]):
        a = {int(i): float(s) for s, i in zip(s1, i1)}
        b = {int(i): float(s) for s, i in zip(s2, i2)}
        assert set(a) == set(b)
        ta, tb = max(a.values()), max(b.values())
        fused = {i: (a[i] / ta if ta > 0 else a[i]) + weight * (b[i] / tb if tb > 0 else b[i]) for i in a}
        order = sorted(fused, key=lambda i: (-fused[i], i))[: (len(fused) if k < 0 else k)]
        out_s.append([fused[i] for i in order])
        out_i.append(order)
    return np.array(out_s, np.float32), np.array(out_i, np.int64)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_expansion_matches_reference(kind):
    """expand=HQE(fuse=w) / AlphaQE(fuse=w): the first search's and the expanded search's full rankings
    fused per image (d2r.core.expand.fuse_rankings) against the dict-based reference above; k cuts the
    fused full ranking."""
    idx, _, _, queries = _setup(kind)
    first = idx.search(queries, k=None)
    for plain, fused in ((HQE(min_matches=2), HQE(min_matches=2, fuse=0.5)), (AlphaQE(), AlphaQE(fuse=1.0)),
                         (HQE(min_matches=2), HQE(min_matches=2, fuse=0.0))):
        second = idx.search(queries, k=None, expand=plain)
        want = _fuse_reference(first, second, fused.fuse, -1)
        got = idx.search(queries, k=None, expand=fused)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        top = idx.search(queries, k=3, expand=fused)
        np.testing.assert_array_equal(top[1], want[1][:, :3])
        one = idx.search(queries[1], k=3, expand=fused)
        np.testing.assert_array_equal(one[1], want[1][1, :3])
        if fused.fuse == 0.0:   # weight 0: the first search's order
            np.testing.assert_array_equal(got[1], first[1])
    # the fusion changes some ranking here (the test would notice a fusion that does nothing)
    fused_ids = idx.search(queries, k=None, expand=HQE(min_matches=2, fuse=0.5))[1]
    assert not (np.array_equal(fused_ids, first[1]) and
                np.array_equal(fused_ids, idx.search(queries, k=None, expand=HQE(min_matches=2))[1]))


def test_fuse_argument_and_rankings_checks():
    from d2r.core.expand import HQE_FUSED, fuse_rankings

    assert as_expansion("hqe-fused") == HQE_FUSED == HQE(fuse=0.5)
    for bad in (-0.5, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="fuse"):
            HQE(fuse=bad)
        with pytest.raises(ValueError, match="fuse"):
            AlphaQE(fuse=bad)
    s = np.array([[0.9, 0.5, 0.1]], np.float32)
    with pytest.raises(ValueError, match="same images"):
        fuse_rankings((s, np.array([[0, 1, 2]])), (s, np.array([[0, 1, 3]])), 0.5, -1)
    with pytest.raises(ValueError, match="same shape"):
        fuse_rankings((s, np.array([[0, 1, 2]])), (s[:, :2], np.array([[0, 1]])), 0.5, -1)
    # non-positive best scores are not rescaled
    got = fuse_rankings((np.array([[-1.0, -2.0]]), np.array([[4, 7]])), (np.array([[0.5, 0.25]]), np.array([[7, 4]])),
                        1.0, -1)
    np.testing.assert_array_equal(got[1], [[4, 7]])   # 4: -1 + 0.25 / 0.5; 7: -2 + 1
    np.testing.assert_allclose(got[0], [[-0.5, -1.0]])
