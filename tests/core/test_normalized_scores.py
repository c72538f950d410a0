"""Scores a person can read (issue 26): Index.normalized_scores divides a search's raw scores by the
query's own self-similarity (without gamma), so 1.0 is the query image itself and 0 an image sharing
no word with it, with gamma on or off; checked against the float64 reference (tests/reference.py)."""
from __future__ import annotations

import numpy as np
import pytest

import d2r
import reference as ref
from support import World


@pytest.fixture(scope="module")
def world():
    w = World(3, dim=64)
    db = [w.image(objects=[o % 10, (o + 3) % 10], lo=20, hi=40) for o in range(12)]
    db.append(w.image(objects=[10, 11], lo=20, hi=40))         # the "unrelated" objects: no word shared
    return w, db


@pytest.mark.parametrize("kernel", ["asmk*", "asmk"])
@pytest.mark.parametrize("normalize", [True, False])
def test_identical_image_scores_one_and_unrelated_zero(world, kernel, normalize):
    w, db = world
    index = d2r.Index(w.codebook, kernel, normalize=normalize)
    index.add(db)
    q = db[4]
    scores, ids = index.search(q, k=None)
    norm = index.normalized_scores(q, scores, ids)
    assert ids[0] == 4 and abs(norm[0] - 1.0) <= 1e-6, (scores[:3], norm[:3])
    assert norm[list(ids).index(12)] == 0.0                   # the unrelated image shares no word
    assert np.all((norm[1:] >= 0) & (norm[1:] < 1)), norm
    # the reference: the shared words' selective similarity over the query's with itself, no gamma
    rq = ref.aggregate(q, w.centroids, kernel)
    own = ref.similarity(rq, rq, w.dim, normalize=False)
    want = [ref.similarity(rq, ref.aggregate(db[i], w.centroids, kernel), w.dim, normalize=False) / own for i in ids]
    np.testing.assert_allclose(norm, want, rtol=1e-5, atol=1e-6)


def test_same_with_gamma_on_and_off_and_not_shrunk_by_a_large_image(world):
    """With gamma on the raw score is already 1 for the image itself, but it shrinks with the database
    image's size; the normalised score does not: an image holding the query and much else reads high."""
    w, db = world
    q = db[2]
    big = np.concatenate([q, w.image(objects=[5, 6, 7, 8, 9], lo=60, hi=80)])
    on, off = d2r.Index(w.codebook, "asmk*"), d2r.Index(w.codebook, "asmk*", normalize=False)
    for idx in (on, off):
        idx.add(db + [big])
    s_on, i_on = on.search(q, k=None)
    s_off, i_off = off.search(q, k=None)
    n_on = dict(zip(i_on.tolist(), on.normalized_scores(q, s_on, i_on)))
    n_off = dict(zip(i_off.tolist(), off.normalized_scores(q, s_off, i_off)))
    for i in n_on:
        assert abs(n_on[i] - n_off[i]) <= 1e-5, (i, n_on[i], n_off[i])
    raw_big = float(s_on[list(i_on).index(13)])
    assert raw_big < 0.6 < n_on[13], (raw_big, n_on[13])


def test_several_queries_regional_kernel_and_aggregated_queries(world):
    w, db = world
    index = d2r.Index(w.codebook, "rasmk*")
    regions = [[x, x[: len(x) // 2]] for x in db]               # region 0 the whole image, one crop
    index.add_regions_many(regions)
    qs = [db[0], db[7]]
    scores, ids = index.search(qs, k=5)
    norm = index.normalized_scores(qs, scores, ids)
    assert norm.shape == (2, 5)
    for r, q in enumerate(qs):
        rq = ref.aggregate(q, w.centroids, "asmk*")
        own = ref.similarity(rq, rq, w.dim, normalize=False)
        want = [ref.similarity(rq, ref.aggregate(regions[i], w.centroids, "rasmk*"), w.dim, normalize=False) / own
                for i in ids[r]]
        np.testing.assert_allclose(norm[r], want, rtol=1e-5, atol=1e-6)
        assert norm[r][0] > 0.5                                 # the image itself, aggregated from its regions
    agg = index.aggregate(db[7], query=True)
    s, i = index.search_aggregated(agg, k=5)
    np.testing.assert_allclose(index.normalized_scores(agg, s, i), norm[1], rtol=1e-6)


def test_no_features_stays_minus_one_and_bad_input_is_named(world):
    w, db = world
    index = d2r.Index(w.codebook, "asmk*")
    index.add(db[:3] + [np.zeros((0, w.dim), np.float32)])
    s, i = index.search(db[0], k=None)
    n = index.normalized_scores(db[0], s, i)
    assert s[list(i).index(3)] == -1 and n[list(i).index(3)] == -1
    empty = np.zeros((0, w.dim), np.float32)
    s, i = index.search(empty, k=2)
    assert np.all(index.normalized_scores(empty, s, i) == -1)
    s, i = index.search(db[0], k=2)
    assert np.isnan(index.normalized_scores(db[0], s, np.array([i[0], 999]))[1])   # not in the index
    with pytest.raises(ValueError, match="must be a search's results"):
        index.normalized_scores([db[0], db[1]], s, i)
    with pytest.raises(ValueError, match="must be a search's results"):
        index.normalized_scores(db[0], s, i[:1])
