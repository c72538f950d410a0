"""d2r against the `asmk` package (PyPI) on the same codebook and descriptors.

Parameter mapping (benchmarks/ASMK_MAPPING.md has the details): asmk always applies gamma
normalisation with its own word counts, keeps words whose residual is zero, normalises codes with
+1e-6, thresholds with >=, and packs bits into uint32 (its Hamming denominator is 32*ceil(D/32), D
for D = 128). With D = 128, k-means centroids (no descriptor equals a centroid, so no zero residuals),
d2r's normalize=True and tau = 0 the two define the same scores: compared within 1e-5, and the
rankings equal up to ties.
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import d2r

asmk = pytest.importorskip("asmk", reason="the asmk package is not installed (pip install asmk)")
faiss = pytest.importorskip("faiss", reason="faiss is needed by asmk")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "asmk_baseline.py"


@pytest.fixture(scope="module")
def baseline():
    spec = importlib.util.spec_from_file_location("asmk_baseline", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["asmk_baseline"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def clustered(rng, n, centres, spread=0.5):
    c = centres[rng.integers(0, len(centres), n)]
    x = c + spread / np.sqrt(c.shape[1]) * rng.standard_normal(c.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, 128))
    codebook = d2r.Codebook.train(clustered(rng, 20000, centres), 256, niter=8, seed=0)
    db = [clustered(rng, int(rng.integers(20, 300)), centres[rng.choice(40, 3, replace=False)]) for _ in range(80)]
    queries = [clustered(rng, 200, centres[rng.choice(40, 3, replace=False)]) for _ in range(10)]
    return codebook, db, queries


def compare(baseline, codebook, db, queries, kernel, m_db, m_query, tol):
    binary = kernel == "asmk*"
    index = d2r.Index(codebook, kernel, m_db=m_db, m_query=m_query, normalize=True)
    index.add(db)
    ours, ids = index.score_all(queries)
    assert np.array_equal(ids, np.arange(len(db)))
    # both libraries on the same (d2r-exact) assignments: faiss and d2r agree except at near-ties
    built, _ = baseline.build_asmk(codebook.centroids, db, binary=binary,
                                   assignments=[codebook.quantize(x, m_db)[0] for x in db])
    res, tm = baseline.search_asmk(built, queries, m_query=m_query,
                                   assignments=[codebook.quantize(q, m_query)[0] for q in queries])
    theirs = baseline.asmk_scores_to_d2r(np.vstack([r[0] for r in res]), tm["q_nwords"], built.db_nwords, gamma=True)
    # same word sets (no zero residuals with k-means centroids)
    assert np.array_equal(built.db_nwords, [len(index.aggregate(x)) for x in db])
    np.testing.assert_allclose(ours, theirs, atol=tol, rtol=0)
    for q in range(len(queries)):
        order = np.lexsort((np.arange(len(db)), -ours[q]))
        assert np.all(np.diff(theirs[q][order]) <= tol), "rankings differ beyond ties"
    # and d2r's top-k is its full ranking's prefix
    s, i = index.search(queries[0], k=10)
    np.testing.assert_array_equal(i, np.lexsort((np.arange(len(db)), -ours[0]))[:10])


@pytest.mark.parametrize("m_db,m_query", [(1, 1), (1, 3), (2, 5)])
def test_asmk_star_scores_equal_asmk_package(baseline, data, m_db, m_query):
    compare(baseline, *data, "asmk*", m_db, m_query, tol=1e-5)


@pytest.mark.parametrize("m_db,m_query", [(1, 1), (1, 3)])
def test_asmk_float_scores_equal_asmk_package(baseline, data, m_db, m_query):
    # asmk normalises codes by (||v|| + 1e-6): a relative difference of about 1e-6 per code
    compare(baseline, *data, "asmk", m_db, m_query, tol=1e-5)


def test_asmk_star_codes_equal_asmk_package(baseline, data):
    codebook, db, _ = data
    built, _ = baseline.build_asmk(codebook.centroids, db[:5], binary=True,
                                   assignments=[codebook.quantize(x, 1)[0] for x in db[:5]])
    for x in db[:5]:
        codes, words = baseline.aggregate_image_asmk(built, x, 1, codebook.quantize(x, 1)[0])[:2]
        ours = d2r.aggregate(x, codebook, "asmk*")
        np.testing.assert_array_equal(np.asarray(words), ours.words)
        np.testing.assert_array_equal(baseline.asmk_packed_to_packbits(codes, 128), ours.codes)


def test_realmix_rootsift_rankings_equal_asmk_package(baseline):
    from d2r.datasets.realmix import find_realmix, realmix_rootsift

    if find_realmix() is None:
        pytest.skip("../shared/data/realmix is absent (real-photo tests need the shared data)")
    pytest.importorskip("cv2", reason="RootSIFT needs opencv-python-headless")
    feats = realmix_rootsift(max_features=1000, progress=False)
    db = [f.descriptors for f in feats["db"]]
    queries = [f.descriptors for f in feats["query"]][:20]
    sample = np.vstack([f.descriptors for f in feats["query"][20:]])
    codebook = d2r.Codebook.train(sample, 512, niter=8, seed=0)
    compare(baseline, codebook, db, queries, "asmk*", 1, 1, tol=1e-5)
