"""The CPU quantizer with exact pruning (csrc/quantize.cpp) equals a float64 brute force: the m
nearest words by squared L2, ties to the lower word id. Real RootSIFT descriptors with a k-means
codebook (where the pruning skips most of the product), adversarial codebooks and descriptors
(duplicate words, exact ties, descriptors on words, far-away descriptors, an unclustered codebook
where the quantizer falls back to the full product)."""
import os
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r import _native

from reference import nearest_words_exact

MIN_PRUNE_WORDS = 4096  # Quantizer::kMinPruneWords


def brute_force(x, c, m):
    """float64 m nearest words, ties to the lower id (tests/reference.py)."""
    return nearest_words_exact(x, c, m)


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def clustered_codebook(n_words, dim=128, seed=0, spread=0.25):
    rng = np.random.default_rng(seed)
    centres = unit(np.abs(rng.standard_normal((max(8, n_words // 64), dim))))
    c = centres[rng.integers(0, len(centres), n_words)] + spread / np.sqrt(dim) * rng.standard_normal((n_words, dim))
    return unit(np.abs(c)).astype(np.float32), centres


def near_descriptors(centres, n, seed=1, spread=0.3):
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    x = centres[rng.integers(0, len(centres), n)] + spread / np.sqrt(dim) * rng.standard_normal((n, dim))
    return unit(np.abs(x)).astype(np.float32)


def check(q, x, c, m):
    ids, dist = q.search(np.ascontiguousarray(x, np.float32), m)
    ref = brute_force(x, c, m)
    bad = np.flatnonzero((ids != ref).any(1))
    assert bad.size == 0, f"m={m}: {bad.size} rows differ from the float64 brute force, e.g. row {bad[0]}: {ids[bad[0]]} vs {ref[bad[0]]}"
    d64 = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[ids[:64]]) ** 2).sum(-1) if len(x) <= 64 else None
    if d64 is not None:
        np.testing.assert_allclose(dist, d64, rtol=1e-6, atol=1e-6)
    return ids, dist


# ------------------------------------------------------------------------------------------------
# synthetic clustered codebook: the pruned path, m = 1, 3, 8, n = 1 and n = 5000


@pytest.fixture(scope="module")
def clustered():
    c, centres = clustered_codebook(MIN_PRUNE_WORDS)
    return c, centres, _native.Quantizer(c)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_clustered_many_rows(clustered, m):
    c, centres, q = clustered
    assert q.pruning_enabled
    x = near_descriptors(centres, 5000, seed=m)
    q.reset_stats()
    check(q, x, c, m)
    s = q.stats()
    assert s["rows"] == 5000 and s["pairs"] == 5000 * len(c)
    # the pruning really skips most of the product on clustered data (else this test would pass
    # with the pruning switched off)
    assert s["full"] < 0.5 * s["pairs"], s


@pytest.mark.parametrize("m", [1, 3, 8])
def test_clustered_one_row(clustered, m):
    c, centres, q = clustered
    for seed in range(5):
        check(q, near_descriptors(centres, 1, seed=100 + seed), c, m)


# ------------------------------------------------------------------------------------------------
# adversarial cases


def test_duplicate_words_ties_to_lower_id():
    c, centres = clustered_codebook(MIN_PRUNE_WORDS, seed=3)
    rng = np.random.default_rng(3)
    # 12 copies of word 7 scattered through the codebook, and 5 copies of word 2000
    dup7 = np.sort(rng.choice(np.arange(8, len(c)), 12, replace=False))
    c[dup7] = c[7]
    dup2k = np.array([2001, 2500, 3000, 4000, 4095])
    c[dup2k] = c[2000]
    q = _native.Quantizer(c)
    assert q.pruning_enabled
    near7 = unit(c[7][None, :] + 1e-3 * np.abs(rng.standard_normal((50, c.shape[1])))).astype(np.float32)
    for m in (1, 3, 8, 13):
        ids, _ = check(q, near7, c, m)
        np.testing.assert_array_equal(ids[:, 0], 7)
    ids, _ = check(q, np.tile(c[7], (3, 1)), c, 13)  # exactly on the word: 13 words at distance 0
    np.testing.assert_array_equal(ids[0], np.concatenate([[7], dup7]))
    ids, _ = check(q, np.tile(c[2000], (2, 1)), c, 8)
    np.testing.assert_array_equal(ids[0, :6], np.concatenate([[2000], dup2k]))
    x = np.concatenate([near_descriptors(centres, 2000, seed=5), c[rng.integers(0, len(c), 300)]])
    for m in (1, 3, 8):
        check(q, x, c, m)


def test_near_duplicates_below_float32_resolution():
    """40 words within a few ulps of word 7: their float32 distances are rounding noise, so the float32
    top m + 3 is not the true one; the certificate must send these rows to the exact threshold scan."""
    c, centres = clustered_codebook(MIN_PRUNE_WORDS, seed=9)
    rng = np.random.default_rng(9)
    near = np.sort(rng.choice(np.arange(8, len(c)), 40, replace=False))
    for w in near:
        v = c[7].copy()
        for _ in range(6):
            j = rng.integers(0, c.shape[1])
            v[j] = np.nextafter(v[j], np.float32(np.inf) if rng.random() < 0.5 else np.float32(-np.inf))
        c[w] = v
    q = _native.Quantizer(c)
    x = unit(c[7][None, :] + 0.02 * np.abs(rng.standard_normal((400, c.shape[1])))).astype(np.float32)
    q.reset_stats()
    for m in (1, 3, 8):
        check(q, x, c, m)
    assert q.stats()["fallback_rows"] > 0


def test_exact_bisector_tie():
    c, _ = clustered_codebook(MIN_PRUNE_WORDS, seed=4)
    # words 10 and 3000 symmetric about a point x: x is exactly equidistant -> word 10 first
    x = np.zeros((1, c.shape[1]), np.float32)
    x[0, :4] = 0.5
    c[10] = x[0]
    c[10, 0] += 0.25
    c[3000] = x[0]
    c[3000, 0] -= 0.25
    q = _native.Quantizer(c)
    ids, dist = q.search(x, 2)
    assert list(ids[0]) == [10, 3000] and dist[0, 0] == dist[0, 1]
    check(q, x, c, 2)
    # the same with the lower id on the other side
    c2 = c.copy()
    c2[[10, 3000]] = c2[[3000, 10]]
    ids, _ = _native.Quantizer(c2).search(x, 2)
    assert list(ids[0]) == [10, 3000]


def test_descriptors_on_words_and_far_away():
    c, centres = clustered_codebook(MIN_PRUNE_WORDS, seed=5)
    q = _native.Quantizer(c)
    rng = np.random.default_rng(5)
    on = c[rng.choice(len(c), 500, replace=False)]
    ids, dist = check(q, on, c, 3)
    assert (dist[:, 0] == 0).all()
    far = np.concatenate([near_descriptors(centres, 300, seed=6) * 1000.0,
                          -near_descriptors(centres, 300, seed=7) * 50.0,
                          rng.standard_normal((300, c.shape[1])).astype(np.float32) * 1e6]).astype(np.float32)
    for m in (1, 3, 8):
        check(q, far, c, m)
    # float32 would overflow: the float64 brute force takes over
    huge = (near_descriptors(centres, 4, seed=8) * 1e18).astype(np.float32)
    ids, _ = q.search(huge, 2)
    np.testing.assert_array_equal(ids, brute_force(huge, c, 2))


def test_unclustered_codebook_falls_back():
    rng = np.random.default_rng(6)
    c = rng.standard_normal((MIN_PRUNE_WORDS, 128)).astype(np.float32)
    q = _native.Quantizer(c)
    x = rng.standard_normal((3000, 128)).astype(np.float32)
    q.reset_stats()
    for m in (1, 3, 8):
        check(q, x, c, m)
    s = q.stats()
    assert s["plain_blocks"] > 0, s  # pruning does not pay: the full product
    check(q, x[:1], c, 3)


def test_large_m_and_small_codebooks():
    c, centres = clustered_codebook(MIN_PRUNE_WORDS, seed=7)
    q = _native.Quantizer(c)
    x = near_descriptors(centres, 200, seed=9)
    check(q, x, c, 70)  # m beyond phase A's limit
    for n_words in (1, 5, 300, MIN_PRUNE_WORDS - 1):
        cs = c[:n_words].copy()
        qs = _native.Quantizer(cs)
        assert not qs.pruning_enabled
        for m in sorted({1, min(3, n_words), n_words if n_words <= 5 else 8}):
            check(qs, x, cs, m)


def test_codebook_api_uses_it():
    c, centres = clustered_codebook(MIN_PRUNE_WORDS, seed=8)
    x = near_descriptors(centres, 1000, seed=10)
    ids, dist = d2r.Codebook(c).quantize(x, m=3)
    np.testing.assert_array_equal(ids, brute_force(x, c, 3))
    assert ids.dtype == np.int32 and dist.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# real RootSIFT descriptors and a k-means codebook (skipped without the shared data)


def _realmix_images():
    root = os.environ.get("D2R_SHARED_DATA")
    if not root or not (Path(root) / "realmix" / "images").is_dir():
        pytest.skip("real photos not found: expected ../shared/data/realmix/images beside the repository "
                    "(or $D2R_SHARED_DATA/realmix/images)")
    return sorted((Path(root) / "realmix" / "images").rglob("*.jpg"))


@pytest.fixture(scope="module")
def real():
    paths = _realmix_images()
    faiss = pytest.importorskip("faiss")
    pytest.importorskip("cv2")
    from d2r.extract.rootsift import RootSIFT, extract_many

    step = max(1, len(paths) // 16)
    chosen = [str(p) for p in paths[::step][:16]]
    feats = extract_many(RootSIFT(max_features=1500, max_image_size=800), chosen, progress=False)
    train = np.concatenate([f.descriptors for f in feats[:12]]).astype(np.float32)
    query = np.concatenate([f.descriptors[:500] for f in feats[12:]]).astype(np.float32)
    km = faiss.Kmeans(128, MIN_PRUNE_WORDS, niter=4, seed=1, min_points_per_centroid=1, max_points_per_centroid=10**6)
    km.train(train)
    return km.centroids.astype(np.float32), query


@pytest.mark.parametrize("m", [1, 3, 8])
def test_real_rootsift(real, m):
    c, x = real
    assert len(x) >= 500
    q = _native.Quantizer(c)
    assert q.pruning_enabled
    q.reset_stats()
    check(q, x, c, m)
    check(q, x[:1], c, m)
    s = q.stats()
    assert s["full"] < 0.5 * s["pairs"], s


def test_prune_policy(clustered):
    """auto (the default) keeps pruning where it pays (clustered words) and switches to the exact full
    product after the first 1,000 descriptors where it does not (Gaussian words); always / never force
    it; every policy gives the exact answer."""
    c, centres, q = clustered
    assert q.prune_policy == "auto"
    check(q, near_descriptors(centres, 1200, seed=21), c, 2)
    assert q.stats()["prune_decision"] == 1
    rng = np.random.default_rng(22)
    g = rng.standard_normal((MIN_PRUNE_WORDS, 128)).astype(np.float32)
    qg = _native.Quantizer(g)
    assert qg.stats()["prune_decision"] == -1
    x = rng.standard_normal((1500, 128)).astype(np.float32)
    check(qg, x, g, 3)
    assert qg.stats()["prune_decision"] == 0
    qg.reset_stats()
    check(qg, x[:300], g, 3)
    s = qg.stats()
    assert s["pruned_blocks"] == 0 and s["screened"] == 0 and s["full"] == s["pairs"], s
    for policy in ("always", "never"):
        qg.prune_policy = policy
        assert qg.prune_policy == policy
        check(qg, x[:300], g, 3)
    with pytest.raises(ValueError, match="prune_policy"):
        qg.prune_policy = "sometimes"
