"""The golden values of METHOD.md section 5 (from the official DELF unit tests), through the public
d2r API. Tolerance 1e-5."""
import numpy as np
import pytest

import d2r

import reference as ref

TOL = 1e-5

CENTROIDS = np.array([[.5, .5], [0, 0], [1, 0], [-.5, -.5], [0, 1]], np.float32)
FEATURES = np.array([[1, 0], [-1, 0], [1, 2]], np.float32)
FEATURES4 = np.vstack([FEATURES, [[0, 2]]]).astype(np.float32)
REGIONS_3_1 = [FEATURES4[:3], FEATURES4[3:]]
EMPTY = np.zeros((0, 2), np.float32)
REGIONS_0_3_0_1 = [EMPTY, FEATURES4[:3], EMPTY, FEATURES4[3:]]


@pytest.fixture(scope="module")
def cb():
    return d2r.Codebook(CENTROIDS)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=0, atol=TOL)


# ---- VLAD / R-VLAD ------------------------------------------------------------------------------

VLAD_CASES = {
    "vlad_l2": (FEATURES, 1, True, [0, 0, 0, 0, 0, 0, -0.316228, 0.316228, 0.632456, 0.632456]),
    "vlad_no_l2": (FEATURES, 1, False, [0, 0, 0, 0, 0, 0, -0.5, 0.5, 1, 1]),
    "vlad_m3_no_l2": (FEATURES, 3, False, [1, 1, 0, 0, 0, 2, -0.5, 0.5, 0, 0]),
    "rvlad_3_1_no_l2": (REGIONS_3_1, 1, False, [0, 0, 0, 0, 0, 0, -0.158114, 0.158114, 0.316228, 0.816228]),
    "rvlad_3_1_l2": (REGIONS_3_1, 1, True, [0, 0, 0, 0, 0, 0, -0.175011, 0.175011, 0.350021, 0.903453]),
    "rvlad_0_3_0_1_no_l2": (REGIONS_0_3_0_1, 1, False,
                            [0, 0, 0, 0, 0, 0, -0.079057, 0.079057, 0.158114, 0.408114]),
}


@pytest.mark.parametrize("case", sorted(VLAD_CASES))
def test_vlad_golden(cb, case):
    x, m, l2, want = VLAD_CASES[case]
    got = d2r.vlad(x, cb, m=m, l2=l2)
    assert got.shape == (10,)
    _close(got, want)


def test_rvlad_golden_region_forms(cb):
    """The same [3, 1] and [0, 3, 0, 1] R-VLADs given as d2r.Regions and as CSR tuples."""
    want = [0, 0, 0, 0, 0, 0, -0.158114, 0.158114, 0.316228, 0.816228]
    _close(d2r.vlad(d2r.Regions(FEATURES4, np.array([0, 3, 4])), cb, l2=False), want)
    _close(d2r.vlad((FEATURES4, np.array([0, 3, 4]), 2), cb, l2=False), want)
    _close(d2r.vlad((FEATURES4, np.array([0, 3, 4]), np.array([0, 1, 2, 3])), cb, l2=False), want)
    want4 = [0, 0, 0, 0, 0, 0, -0.079057, 0.079057, 0.158114, 0.408114]
    _close(d2r.vlad((FEATURES4, np.array([0, 0, 3, 3, 4]), 4), cb, l2=False), want4)
    _close(d2r.vlad(d2r.Regions(FEATURES4, np.array([0, 0, 3, 3, 4]), np.arange(4)), cb, l2=False), want4)


# ---- ASMK family --------------------------------------------------------------------------------

def test_asmk_golden(cb):
    a = d2r.aggregate(FEATURES, cb, "asmk")
    np.testing.assert_array_equal(a.words, [3, 4])  # word 2 has a zero residual
    assert a.codes.dtype == np.float32 and a.codes.shape == (2, 2)
    _close(a.codes.reshape(-1), [-0.707107, 0.707107, 0.707107, 0.707107])


def test_asmk_m3_golden(cb):
    a = d2r.aggregate(FEATURES, cb, "asmk", m=3)
    np.testing.assert_array_equal(a.words, [0, 2, 3])
    _close(a.codes.reshape(-1), [0.707107, 0.707107, 0, 1, -0.707107, 0.707107])


def test_asmk_star_golden(cb):
    a = d2r.aggregate(FEATURES, cb, "asmk*")
    np.testing.assert_array_equal(a.words, [3, 4])
    assert a.codes.dtype == np.uint8 and a.codes.shape == (2, 1)
    np.testing.assert_array_equal(a.codes.reshape(-1), [64, 192])


def test_rasmk_golden(cb):
    a = d2r.aggregate(REGIONS_3_1, cb, "rasmk")
    np.testing.assert_array_equal(a.words, [3, 4])
    _close(a.codes.reshape(-1), [-0.707107, 0.707107, 0.361261, 0.932465])


def test_rasmk_star_golden(cb):
    a = d2r.aggregate(REGIONS_3_1, cb, "rasmk*")
    np.testing.assert_array_equal(a.words, [3, 4])
    assert a.codes.dtype == np.uint8
    np.testing.assert_array_equal(a.codes.reshape(-1), [64, 192])


def test_naive_rasmk_golden(cb):
    a = d2r.aggregate(REGIONS_3_1, cb, "naive-rasmk")
    np.testing.assert_array_equal(a.words, [3, 4])
    _close(a.codes.reshape(-1), [-0.5, 0.5, 0.5, 1.5])


def test_rasmk_golden_through_index(cb):
    """The index stores what d2r.aggregate computes for a regional kernel."""
    idx = d2r.Index(cb, kernel="rasmk")
    agg = idx.aggregate(REGIONS_3_1)
    np.testing.assert_array_equal(agg.words, [3, 4])
    _close(agg.codes.reshape(-1), [-0.707107, 0.707107, 0.361261, 0.932465])


# ---- similarity (D = 2) -------------------------------------------------------------------------

SIM_X = d2r.Aggregated(np.arange(5), np.array(
    [[0, 0], [-0.707107, -0.707107], [0.5, 0.866025], [0.816497, 0.577350], [1, 0]], np.float32))
SIM_Y = d2r.Aggregated(np.array([1, 2, 4]), np.array([[0, 1], [1, 0], [0.707107, 0.707107]], np.float32))
SIM_XB = d2r.Aggregated(np.arange(5), np.array([[0], [0], [3], [3], [3]], np.uint8))
SIM_YB = d2r.Aggregated(np.array([1, 2, 4]), np.array([[1], [2], [3]], np.uint8))


@pytest.mark.parametrize("normalize,want", [(False, 0.478554), (True, 0.123562)])
def test_similarity_asmk_golden(cb, normalize, want):
    idx = d2r.Index(cb, kernel="asmk", normalize=normalize)
    idx.add_aggregated([SIM_Y], image_ids=[7])
    s, i = idx.search_aggregated(SIM_X, k=None)
    np.testing.assert_array_equal(i, [7])
    _close(s, [want])
    # score_all and search with the aggregated query agree.
    s2, i2 = idx.search_aggregated([SIM_X], k=1)
    _close(s2, [[want]])
    np.testing.assert_array_equal(i2, [[7]])


def test_similarity_asmk_star_golden(cb):
    idx = d2r.Index(cb, kernel="asmk*", normalize=True)
    idx.add_aggregated(SIM_YB)
    s, i = idx.search_aggregated(SIM_XB, k=10)
    np.testing.assert_array_equal(i, [0])
    _close(s, [0.258199])


def test_similarity_golden_score_all(cb):
    """score_all on raw descriptors: the golden features as a query against the golden images."""
    for kernel in ("asmk", "asmk*"):
        idx = d2r.Index(cb, kernel=kernel)
        db = [FEATURES, FEATURES4, np.array([[0, 1]], np.float32)]
        idx.add(db)
        scores, ids = idx.score_all(FEATURES)
        np.testing.assert_array_equal(ids, [0, 1, 2])
        q = idx.aggregate(FEATURES, query=True)
        want = [ref.similarity((q.words, q.codes), (d.words, d.codes), 2)
                for d in (idx.aggregate(x) for x in db)]
        _close(scores, want)
        # the query against itself: every shared word has u = 1, gamma = 1/|W|, so S = 1
        _close(scores[0], 1.0)


# ---- the reference reproduces the golden values too ---------------------------------------------

def test_reference_golden():
    c = CENTROIDS
    for name, (x, m, l2, want) in VLAD_CASES.items():
        got = ref.vlad(x, c, m, l2) if isinstance(x, np.ndarray) else ref.rvlad(x, c, m, l2)
        _close(got, want)
    w, codes = ref.asmk(FEATURES, c)
    np.testing.assert_array_equal(w, [3, 4])
    _close(codes.reshape(-1), [-0.707107, 0.707107, 0.707107, 0.707107])
    w, codes = ref.asmk(FEATURES, c, 3)
    np.testing.assert_array_equal(w, [0, 2, 3])
    _close(codes.reshape(-1), [0.707107, 0.707107, 0, 1, -0.707107, 0.707107])
    w, bits = ref.asmk_star(FEATURES, c)
    np.testing.assert_array_equal(bits.reshape(-1), [64, 192])
    w, codes = ref.rasmk(REGIONS_3_1, c)
    _close(codes.reshape(-1), [-0.707107, 0.707107, 0.361261, 0.932465])
    w, bits = ref.rasmk_star(REGIONS_3_1, c)
    np.testing.assert_array_equal(bits.reshape(-1), [64, 192])
    w, codes = ref.naive_rasmk(REGIONS_3_1, c)
    np.testing.assert_array_equal(w, [3, 4])
    _close(codes.reshape(-1), [-0.5, 0.5, 0.5, 1.5])
    X, Y = (SIM_X.words, SIM_X.codes), (SIM_Y.words, SIM_Y.codes)
    _close(ref.similarity(X, Y, 2, normalize=False), 0.478554)
    _close(ref.similarity(X, Y, 2, normalize=True), 0.123562)
    _close(ref.similarity((SIM_XB.words, SIM_XB.codes), (SIM_YB.words, SIM_YB.codes), 2), 0.258199)
