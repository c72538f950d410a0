"""The native core against the plain float64 reference (tests/reference.py) on random inputs:
quantisation, aggregation (ASMK, ASMK*, R-ASMK, R-ASMK*, Naive-R-ASMK), scoring and ranking."""
import numpy as np
import pytest

import d2r
from d2r.core.aggregate import aggregate_images, aggregate_regions_batch

import reference as ref
from support import World, unit  # noqa: F401  (unit: used by the tests below)

SCORE_TOL = 1e-5
CODE_TOL = 1e-5
# A reference code component this close to 0 may binarise either way under float32 rounding.
BIT_AMBIGUOUS = 1e-5


# ------------------------------------------------------------------------------------------------
# data


def assert_bits_match(bits, ref_codes, dim):
    """Packed bits (n, ceil(D/8)) against float reference codes: bit = code > 0 wherever the
    reference component is not within BIT_AMBIGUOUS of 0; the padding bits are 0."""
    bits = np.asarray(bits)
    assert bits.dtype == np.uint8 and bits.shape == (ref_codes.shape[0], (dim + 7) // 8)
    unpacked = np.unpackbits(bits, axis=1)
    assert not unpacked[:, dim:].any(), "padding bits of the last byte must be 0"
    want = ref_codes > 0
    sure = np.abs(ref_codes) > BIT_AMBIGUOUS
    bad = (unpacked[:, :dim].astype(bool) != want) & sure
    assert not bad.any(), f"{int(bad.sum())} sign bits differ from the reference"


def assert_agg_matches(got, want_words, want_float_codes, binary, dim):
    np.testing.assert_array_equal(got.words, want_words)
    if binary:
        assert got.binary
        assert_bits_match(got.codes, want_float_codes, dim)
    else:
        assert got.codes.dtype == np.float32 and got.codes.shape == (len(want_words), dim)
        np.testing.assert_allclose(got.codes, want_float_codes, rtol=0, atol=CODE_TOL)


def ref_float(kernel):
    """The float kernel whose codes a binary kernel binarises."""
    return {"asmk*": "asmk", "rasmk*": "rasmk"}.get(kernel, kernel)


# ------------------------------------------------------------------------------------------------
# quantisation


def float32_pass_error_bound(x, centroids):
    """(n, C) bound on the error of the CPU quantizer's float32 pass, which ranks the words by
    f = ||c||^2 - 2 x.c (||c||^2 computed in double and rounded, x.c accumulated in float32 over D):
    |f - (d - ||x||^2)| <= 2 gamma_D sum_i |x_i c_i| + u ||c||^2 + u |f|, u = 2^-24,
    gamma_D = D u / (1 - D u)."""
    u = 2.0 ** -24
    x64, c64 = np.asarray(x, np.float64), np.asarray(centroids, np.float64)
    gamma = x64.shape[1] * u / (1 - x64.shape[1] * u)
    cn = np.sum(c64 * c64, axis=1)[None, :]
    return 2 * gamma * (np.abs(x64) @ np.abs(c64).T) + u * cn + u * np.abs(cn - 2 * (x64 @ c64.T)) + 1e-12


def certified_rows(x, centroids, d64, m):
    """Rows where the CPU quantizer provably equals the float64 brute force: it re-ranks in double
    its float32 top m + 3, and a true top-m word can only miss that list when 4 words outside the
    true top m lie within 2 eps of the m-th nearest distance d_(m); so d_(m+4) - d_(m) > 2 eps
    suffices. And the float64 ranks 1..m+1 are separated by far more than float64 rounding (1e-9),
    so the double re-check (sum of squared differences) and the reference (the expanded form) order
    them alike."""
    srt = np.sort(d64, axis=1)
    if m + 3 >= d64.shape[1]:
        in_top = np.ones(d64.shape[0], bool)  # every word is a float32 candidate
    else:
        eps = float32_pass_error_bound(x, centroids).max(axis=1)
        in_top = srt[:, m + 3] - srt[:, m - 1] > 2 * eps
    separated = np.min(np.diff(srt[:, :m + 1], axis=1), axis=1) > 1e-9
    return in_top & separated


QUANT_CASES = [
    pytest.param(16, 600, id="C16"),
    pytest.param(1000, 600, id="C1000"),
    pytest.param(8192, 300, id="C8192"),
    # C = 65536 with only a few descriptors keeps this case to a few seconds.
    pytest.param(65536, 24, id="C65536-few-descriptors"),
]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n_words,n_desc", QUANT_CASES)
def test_quantize_matches_brute_force(n_words, n_desc, m):
    rng = np.random.default_rng(n_words + m)
    D = 128
    n_centres = max(4, n_words // 16)
    centres = unit(rng.standard_normal((n_centres, D)))
    centroids = centres[rng.integers(0, n_centres, n_words)] + 0.3 / np.sqrt(D) * rng.standard_normal((n_words, D))
    centroids = centroids.astype(np.float32)
    x = unit(centres[rng.integers(0, n_centres, n_desc)] + 0.4 / np.sqrt(D) * rng.standard_normal((n_desc, D)))
    x = x.astype(np.float32)
    x[:3] = centroids[[0, n_words // 2, n_words - 1]]  # descriptors exactly on words: distance 0
    cb = d2r.Codebook(centroids)
    ids, dist = cb.quantize(x, m=m)
    assert ids.shape == (n_desc, m) and dist.shape == (n_desc, m)
    assert ids.dtype == np.int32 and dist.dtype == np.float32
    d64 = ref.squared_distances(x, centroids)
    ref_ids, _ = ref.quantize(x, centroids, m)
    # The README's guarantee, checked as stated: equality with the float64 brute force on every row
    # the float32 error bound certifies. Measured on these cases: every row is certified (the gap
    # d_(m+4) - d_(m) is at least 1.4e-3, the bound 2 eps at most 3.7e-5; the float64 ranks 1..m+1
    # are at least 4.8e-7 apart), and ids equal the brute force exactly on every row (0 mismatches).
    certified = certified_rows(x, centroids, d64, m)
    assert certified.all(), f"{int((~certified).sum())} rows outside the certified regime: change the data"
    np.testing.assert_array_equal(ids, ref_ids)
    # each row: m distinct words, nearest first; distances are the squared distances of those words
    assert all(np.unique(r).size == m for r in ids)
    np.testing.assert_allclose(dist, np.take_along_axis(d64, ids.astype(np.int64), 1), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= 0)
    np.testing.assert_array_equal(ids[:3, 0], [0, n_words // 2, n_words - 1])


@pytest.mark.parametrize("n_words", [8, 1000, 8192])
def test_quantize_exact_ties_lower_id_wins(n_words):
    rng = np.random.default_rng(7)
    D = 128
    c = rng.standard_normal((n_words, D)).astype(np.float32)
    # word 3 is duplicated at words n-1, n/2 and 5: equal distances, the lower ids first.
    dups = sorted({5, n_words // 2, n_words - 1})
    c[dups] = c[3]
    # words 1 and 2 are e_0 and e_1 (scaled by 4 so that they are the nearest words of the bisector).
    c[1] = 0
    c[1, 0] = 4
    c[2] = 0
    c[2, 1] = 4
    cb = d2r.Codebook(c)
    near3 = (c[3] + 1e-3 * rng.standard_normal((5, D))).astype(np.float32)
    ids, _ = cb.quantize(near3, m=1 + len(dups))
    np.testing.assert_array_equal(ids, np.tile([3] + dups, (5, 1)))
    exact = np.tile(c[3], (2, 1))
    ids, dist = cb.quantize(exact, m=2)
    np.testing.assert_array_equal(ids, [[3, dups[0]]] * 2)
    np.testing.assert_array_equal(dist, 0)
    # the bisector of words 1 and 2: both exactly at the same distance -> word 1 first
    bis = np.zeros((1, D), np.float32)
    bis[0, :2] = 2.0
    ids, dist = cb.quantize(bis, m=2)
    assert ids[0, 0] == 1 and ids[0, 1] == 2 and dist[0, 0] == dist[0, 1]
    # the reference agrees
    r_ids, _ = ref.quantize(np.vstack([near3, exact, bis]), c, 2)
    np.testing.assert_array_equal(r_ids[:5], np.tile([3, dups[0]], (5, 1)))
    np.testing.assert_array_equal(r_ids[-1], [1, 2])


def test_quantize_ties_reversed_duplicates():
    """All words equal: every descriptor gets words 0, 1, 2 (ids ascending)."""
    c = np.tile(np.linspace(-1, 1, 128, dtype=np.float32), (300, 1))
    cb = d2r.Codebook(c)
    x = np.random.default_rng(1).standard_normal((50, 128)).astype(np.float32)
    ids, _ = cb.quantize(x, m=3)
    np.testing.assert_array_equal(ids, np.tile([0, 1, 2], (50, 1)))


# ------------------------------------------------------------------------------------------------
# aggregation: ASMK / ASMK*


@pytest.fixture(scope="module")
def world():
    return World(seed=11)


def _batch_images(w):
    imgs = [w.image() for _ in range(8)]
    imgs.insert(1, np.zeros((0, w.dim), np.float32))               # empty image
    imgs.insert(3, w.image(objects=[4], lo=1, hi=2))               # one descriptor
    imgs.insert(5, w.centroids[[9]].copy())                        # one descriptor exactly on a word: no words
    imgs.insert(6, np.vstack([w.centroids[[9]], w.image([2], 1, 2)]))  # a zero residual next to a real one
    imgs.append(np.zeros((0, w.dim), np.float32))                  # empty image last
    return imgs


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("kernel", ["asmk", "asmk*"])
def test_aggregate_asmk_matches_reference(world, kernel, m):
    w = world
    binary = kernel.endswith("*")
    imgs = _batch_images(w)
    refs = [ref.asmk(x, w.centroids, m) for x in imgs]
    assert refs[1][0].size == 0 and refs[-1][0].size == 0 and refs[3][0].size == m
    if m == 1:
        assert refs[5][0].size == 0 and refs[6][0].size == 1  # residual exactly 0: no word
    single = [d2r.aggregate(x, w.codebook, kernel, m=m) for x in imgs]
    for got, (rw, rc) in zip(single, refs):
        assert_agg_matches(got, rw, rc, binary, w.dim)
    # the batched path (one native call for all images) gives the same, exactly
    offsets = np.cumsum([0] + [len(x) for x in imgs]).astype(np.int64)
    batch = aggregate_images(w.codebook, np.concatenate(imgs), offsets, kernel, m)
    assert len(batch) == len(imgs)
    for got, one in zip(batch, single):
        np.testing.assert_array_equal(got.words, one.words)
        np.testing.assert_array_equal(got.codes, one.codes)
    # ASMK* is exactly the binarised ASMK of the same image
    if binary:
        for got, x in zip(single, imgs):
            f = d2r.aggregate(x, w.codebook, "asmk", m=m)
            np.testing.assert_array_equal(got.words, f.words)
            np.testing.assert_array_equal(got.codes, np.packbits(f.codes > 0, axis=1))


def test_vlad_matches_reference(world):
    w = world
    x = w.image()
    for m in (1, 3):
        for l2 in (False, True):
            np.testing.assert_allclose(d2r.vlad(x, w.codebook, m=m, l2=l2), ref.vlad(x, w.centroids, m, l2),
                                       rtol=0, atol=1e-5)
    regions = [x, x[:10], np.zeros((0, w.dim), np.float32), x[5:30]]
    for l2 in (False, True):
        np.testing.assert_allclose(d2r.vlad(regions, w.codebook, l2=l2), ref.rvlad(regions, w.centroids, 1, l2),
                                   rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# aggregation: regional kernels


def _regional_image(w, n=60, seed=0):
    """An image with region 0 = the whole image, overlapping regions, an empty region and a
    one-descriptor region, as (descriptors, offsets, members) and as the explicit region list."""
    rng = np.random.default_rng(seed)
    x = w.image(lo=20, hi=30)[:n]
    n = x.shape[0]
    regions = [np.arange(n), np.arange(0, n // 2), np.array([], np.int64),
               np.sort(rng.choice(n, size=n // 2, replace=False)), np.array([n - 1]), np.arange(n // 3, n)]
    offsets = np.cumsum([0] + [r.size for r in regions]).astype(np.int64)
    members = np.concatenate(regions).astype(np.int64)
    return x, offsets, members, [x[r] for r in regions]


REGIONAL = ["rasmk", "rasmk*", "naive-rasmk"]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("kernel", REGIONAL)
def test_regional_aggregation_matches_reference(world, kernel, m):
    w = world
    binary = kernel.endswith("*")
    x, offsets, members, region_list = _regional_image(w, seed=m)
    rw, rc = ref.aggregate(region_list, w.centroids, ref_float(kernel), m)
    assert rw.size > 0
    forms = [region_list, d2r.Regions(x, offsets, members), (x, offsets, members)]
    results = [d2r.aggregate(f, w.codebook, kernel, m=m) for f in forms]
    for got in results:
        assert_agg_matches(got, rw, rc, binary, w.dim)
    for got in results[1:]:
        np.testing.assert_array_equal(got.words, results[0].words)
        np.testing.assert_allclose(got.codes.astype(np.float64), results[0].codes.astype(np.float64),
                                   rtol=0, atol=1e-6 if not binary else 0)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("kernel", REGIONAL)
def test_regional_batch_matches_reference(world, kernel, m):
    """Several images in one batched call: contiguous regions (desc, offsets, n_regions), labels,
    all-empty regions, a single region."""
    w = world
    binary = kernel.endswith("*")
    empty = np.zeros((0, w.dim), np.float32)
    a = w.image(lo=10, hi=20)
    b = w.image(lo=10, hi=20)
    x3, off3, mem3, list3 = _regional_image(w, seed=5)
    labels = np.random.default_rng(3).integers(0, 3, size=b.shape[0])
    images = [
        [a, a[:7], empty],                                   # list with an empty region
        (b, np.array([0, 5, 5, b.shape[0]]), 3),             # contiguous CSR with an empty region
        d2r.Regions.from_labels(b, labels, 4),               # labels, region 3 empty
        [empty, empty],                                      # no features at all: no words
        [a],                                                 # one region
        (x3, off3, mem3),                                    # overlapping CSR membership
    ]
    explicit = [
        [a, a[:7], empty],
        [b[:5], empty, b[5:]],
        [b[labels == r] for r in range(4)],
        [empty, empty],
        [a],
        list3,
    ]
    batch = aggregate_regions_batch(w.codebook, images, kernel, m)
    assert len(batch) == len(images)
    for got, regs in zip(batch, explicit):
        rw, rc = ref.aggregate(regs, w.centroids, ref_float(kernel), m)
        assert_agg_matches(got, rw, rc, binary, w.dim)
    assert len(batch[3]) == 0


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("kernel,plain", [("rasmk", "asmk"), ("rasmk*", "asmk*")])
def test_one_region_rasmk_equals_asmk_exactly(world, kernel, plain, m):
    w = world
    for _ in range(5):
        x = w.image()
        r = d2r.aggregate([x], w.codebook, kernel, m=m)
        p = d2r.aggregate(x, w.codebook, plain, m=m)
        np.testing.assert_array_equal(r.words, p.words)
        np.testing.assert_array_equal(r.codes, p.codes)
    # also through the index: same scores exactly
    db = [w.image() for _ in range(6)]
    q = w.image()
    ir = d2r.Index(w.codebook, kernel=kernel, m_db=m)
    ir.add_regions_many([[x] for x in db])
    ip = d2r.Index(w.codebook, kernel=plain, m_db=m)
    ip.add(db)
    sr, idr = ir.search(q, k=None)
    sp, idp = ip.search(q, k=None)
    np.testing.assert_array_equal(idr, idp)
    np.testing.assert_array_equal(sr, sp)


@pytest.mark.parametrize("kernel", REGIONAL)
def test_region_order_does_not_change_regional_codes(world, kernel):
    w = world
    x, offsets, members, region_list = _regional_image(w, seed=9)
    base = d2r.aggregate(region_list, w.codebook, kernel)
    rng = np.random.default_rng(0)
    for _ in range(3):
        perm = rng.permutation(len(region_list))
        got = d2r.aggregate([region_list[i] for i in perm], w.codebook, kernel)
        np.testing.assert_array_equal(got.words, base.words)
        if kernel.endswith("*"):
            rw, rc = ref.aggregate(region_list, w.centroids, ref_float(kernel))
            assert_bits_match(got.codes, rc, w.dim)
        else:
            np.testing.assert_allclose(got.codes, base.codes, rtol=0, atol=1e-6)


def test_rasmk_differs_from_asmk_with_regions(world):
    """Sanity: with several regions R-ASMK is not just ASMK of the union."""
    w = world
    x, offsets, members, region_list = _regional_image(w, seed=2)
    r = d2r.aggregate(region_list, w.codebook, "rasmk")
    p = d2r.aggregate(x, w.codebook, "asmk")
    assert r.words.size != p.words.size or np.abs(r.codes - p.codes).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# scoring and ranking


@pytest.fixture(scope="module")
def scoring_world():
    """A database with related images, exact duplicates (ties), an empty image, an image of
    unrelated objects only, custom non-sorted ids; and queries on the related objects."""
    w = World(seed=3, n_objects=12, word_spread=0.15)
    q_base = [w.image(objects=[0, 1]), w.image(objects=[2, 3, 4]), w.image(objects=[5], lo=3, hi=6)]
    db = [w.image() for _ in range(24)]
    # near-copies of the queries' descriptors give high u; the other images u spread around 0, so
    # tau in {-0.3, 0, 0.2} makes a difference.
    for j in range(6):
        q = q_base[j % 3]
        keep = w.rng.random(len(q)) < 0.7
        noisy = q[keep] + 0.3 / np.sqrt(w.dim) * w.rng.standard_normal((int(keep.sum()), w.dim))
        db.append(unit(noisy).astype(np.float32))
    db.append(np.zeros((0, w.dim), np.float32))                  # no words: scores -1
    db.append(w.image(objects=[10, 11]))                         # unrelated: shares no word with a query
    db.append(w.centroids[[5]].copy())                           # one zero residual: no words
    db.append(db[4].copy())                                      # exact duplicates of image 4 ...
    db.append(db[4].copy())
    db.append(np.zeros((0, w.dim), np.float32))                  # a second empty image (ties at -1)
    ids = np.random.default_rng(0).permutation(1000)[:len(db)].astype(np.int64)
    queries = q_base + [db[4].copy(), w.image(objects=[6, 7, 8, 9])]
    return w, db, ids, queries


def _ref_scores(w, kernel, db, queries, m_db=1, m_query=1, alpha=3.0, tau=0.0, normalize=True):
    qk = "asmk*" if kernel.endswith("*") else "asmk"
    rq = [ref.aggregate(q, w.centroids, qk, m_query) for q in queries]
    rd = [ref.aggregate(x, w.centroids, kernel, m_db) for x in db]
    return np.array([[ref.similarity(q, d, w.dim, alpha, tau, normalize) for d in rd] for q in rq])


def assert_ranking(lib_scores, lib_ids, ref_scores, ids):
    """Library full ranking = the reference ranking (score descending, id ascending)."""
    rs, ri = ref.rank(ref_scores, ids)
    np.testing.assert_allclose(lib_scores, rs, rtol=SCORE_TOL, atol=SCORE_TOL)
    np.testing.assert_array_equal(lib_ids, ri)


@pytest.mark.parametrize("tau", [0.0, 0.2, -0.3])
@pytest.mark.parametrize("alpha", [3.0, 1.5])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kernel", ["asmk", "asmk*"])
def test_scores_and_rankings_match_reference(scoring_world, kernel, normalize, alpha, tau):
    w, db, ids, queries = scoring_world
    idx = d2r.Index(w.codebook, kernel=kernel, alpha=alpha, tau=tau, normalize=normalize)
    idx.add(db, image_ids=ids)
    want = _ref_scores(w, kernel, db, queries, alpha=alpha, tau=tau, normalize=normalize)
    # score_all: insertion order
    s_all, s_ids = idx.score_all(queries)
    np.testing.assert_array_equal(s_ids, ids)
    assert s_all.shape == (len(queries), len(db))
    np.testing.assert_allclose(s_all, want, rtol=SCORE_TOL, atol=SCORE_TOL)
    # no words -> -1, nothing shared -> 0
    for j in (30, 32, 35):
        np.testing.assert_array_equal(s_all[:, j], -1.0)
    np.testing.assert_array_equal(s_all[:, 31], 0.0)
    # duplicates score identically
    np.testing.assert_array_equal(s_all[:, 33], s_all[:, 4])
    np.testing.assert_array_equal(s_all[:, 34], s_all[:, 4])
    # full rankings (k=None), one query at a time and all at once
    multi_s, multi_i = idx.search(queries, k=None)
    assert multi_s.shape == (len(queries), len(db))
    for qi, q in enumerate(queries):
        s, i = idx.search(q, k=None)
        assert_ranking(s, i, want[qi], ids)
        np.testing.assert_array_equal(multi_s[qi], s)
        np.testing.assert_array_equal(multi_i[qi], i)
        # top-k is the prefix of the full ranking; k beyond the index gives everything
        s5, i5 = idx.search(q, k=5)
        np.testing.assert_array_equal(i5, i[:5])
        np.testing.assert_array_equal(s5, s[:5])
        sb, ib = idx.search(q, k=len(db) + 10)
        np.testing.assert_array_equal(ib, i)
    # score_all for one query (1-D) equals its row
    s1, _ = idx.score_all(queries[1])
    np.testing.assert_array_equal(s1, s_all[1])


@pytest.mark.parametrize("kernel,m_db,m_query", [("asmk", 3, 1), ("asmk*", 1, 3), ("asmk", 3, 3)])
def test_scores_multiple_assignment(scoring_world, kernel, m_db, m_query):
    w, db, ids, queries = scoring_world
    idx = d2r.Index(w.codebook, kernel=kernel, m_db=m_db, m_query=m_query)
    idx.add(db, image_ids=ids)
    want = _ref_scores(w, kernel, db, queries, m_db=m_db, m_query=m_query)
    s_all, _ = idx.score_all(queries)
    np.testing.assert_allclose(s_all, want, rtol=SCORE_TOL, atol=SCORE_TOL)
    for qi, q in enumerate(queries):
        s, i = idx.search(q, k=None)
        assert_ranking(s, i, want[qi], ids)


def test_scores_binary_dim_not_multiple_of_8():
    """D = 20: 3 bytes per code; METHOD.md section 4: denominator min(D, 8) * n_bytes = 24."""
    w = World(seed=21, dim=20, n_objects=6, words_per_object=4)
    db = [w.image(objects=[o, (o + 1) % 4]) for o in range(4) for _ in range(3)]
    queries = [w.image(objects=[0]), w.image(objects=[1, 2])]
    for normalize in (True, False):
        idx = d2r.Index(w.codebook, kernel="asmk*", normalize=normalize)
        idx.add(db)
        # score against the library's own codes (isolates the similarity from aggregation)
        rd = [idx.aggregate(x) for x in db]
        for q in queries:
            a = idx.aggregate(q, query=True)
            assert a.codes.shape[1] == 3
            want = [ref.similarity((a.words, a.codes), (d.words, d.codes), 20, normalize=normalize) for d in rd]
            s, _ = idx.score_all(q)
            np.testing.assert_allclose(s, want, rtol=SCORE_TOL, atol=SCORE_TOL)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kernel", REGIONAL)
def test_regional_scores_match_reference(scoring_world, kernel, normalize):
    w, db, ids, queries = scoring_world
    rng = np.random.default_rng(4)
    empty = np.zeros((0, w.dim), np.float32)
    regions = []
    for x in db[:12]:
        n = x.shape[0]
        cut = int(rng.integers(0, n + 1)) if n else 0
        regions.append([x, x[:cut], empty, x[cut // 2:]])
    regions.append([empty, empty])
    regions.append([db[31]])
    idx = d2r.Index(w.codebook, kernel=kernel, normalize=normalize, tau=0.1, alpha=2.0)
    rid = ids[:len(regions)]
    idx.add_regions_many(regions, image_ids=rid)
    qk = "asmk*" if kernel.endswith("*") else "asmk"
    rd = [ref.aggregate(r, w.centroids, kernel) for r in regions]
    for q in queries:
        rq = ref.aggregate(q, w.centroids, qk)
        want = np.array([ref.similarity(rq, d, w.dim, 2.0, 0.1, normalize) for d in rd])
        s_all, s_ids = idx.score_all(q)
        np.testing.assert_array_equal(s_ids, rid)
        np.testing.assert_allclose(s_all, want, rtol=SCORE_TOL, atol=SCORE_TOL)
        s, i = idx.search(q, k=None)
        assert_ranking(s, i, want, rid)
        assert s_all[len(regions) - 2] == -1.0


@pytest.mark.parametrize("kernel", ["asmk", "asmk*"])
def test_regional_search_index_one_region_equals_index(scoring_world, kernel):
    w, db, ids, queries = scoring_world
    plain = d2r.Index(w.codebook, kernel=kernel)
    plain.add(db, image_ids=ids)
    regional = d2r.RegionalSearchIndex(w.codebook, kernel=kernel, pooling="max")
    regional.add(db, image_ids=ids)
    regional2 = d2r.RegionalSearchIndex(w.codebook, kernel=kernel, pooling="mean")
    regional2.add_regions_many([[x] for x in db], image_ids=ids)
    assert len(regional) == len(plain) == len(db)
    for q in queries:
        s, i = plain.search(q, k=None)
        for r in (regional, regional2):
            rs, ri = r.search(q, k=None)
            np.testing.assert_array_equal(ri, i)
            np.testing.assert_allclose(rs, s, rtol=0, atol=1e-7)
        rs, ri = regional.search(q, k=3)
        np.testing.assert_array_equal(ri, i[:3])


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_regional_search_index_pooling_matches_reference(scoring_world, pooling):
    w, db, ids, queries = scoring_world
    empty = np.zeros((0, w.dim), np.float32)
    images = [[db[j], db[j][:5], empty, db[31]] for j in range(10)] + [[empty], [db[31]]]
    idx = d2r.RegionalSearchIndex(w.codebook, kernel="asmk", pooling=pooling)
    img_ids = np.arange(100, 100 + len(images))
    idx.add_regions_many(images, image_ids=img_ids)
    for q in queries[:3]:
        rq = ref.asmk(q, w.centroids)
        want = []
        for regs in images:
            rs = [ref.similarity(rq, ref.asmk(r, w.centroids), w.dim) for r in regs]
            want.append(max(rs) if pooling == "max" else float(np.mean(rs)))
        s, i = idx.search(q, k=None)
        assert_ranking(s, i, np.array(want), img_ids)


def test_results_do_not_depend_on_threads(scoring_world):
    w, db, ids, queries = scoring_world
    big_db = db * 6
    before = d2r.get_num_threads()
    out = {}
    try:
        for n in (1, 2):
            d2r.set_num_threads(n)
            res = []
            for kernel in ("asmk", "asmk*"):
                idx = d2r.Index(w.codebook, kernel=kernel)
                idx.add(big_db)
                res.append(idx.search(queries, k=None))
                res.append(idx.score_all(queries))
            rg = d2r.Index(w.codebook, kernel="rasmk*")
            rg.add_regions_many([[x, x[:4]] for x in big_db])
            res.append(rg.search(queries, k=7))
            res.append(w.codebook.quantize(np.concatenate(big_db), m=3))
            out[n] = res
    finally:
        d2r.set_num_threads(before)
    for a, b in zip(out[1], out[2]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
