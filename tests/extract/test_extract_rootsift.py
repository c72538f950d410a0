"""Tests for d2r.extract.rootsift (RootSIFT extraction) and d2r.datasets.realmix."""
import json
import os

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from d2r.extract.rootsift import (  # noqa: E402
    Features,
    ImageLoadError,
    RootSIFT,
    extract_many,
    load_image_gray,
    rootsift_from_sift,
)
from d2r.datasets import realmix as rm  # noqa: E402


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _textured_rgb(h=240, w=320, seed=0):
    """Deterministic textured RGB image with plenty of SIFT keypoints."""
    rng = np.random.default_rng(seed)
    noise = rng.random((h // 4, w // 4, 3)).astype(np.float32)
    img = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    for i in range(12):  # a few solid shapes for corner/blob structure
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(10, w - 40)), int(rng.integers(10, h - 40))
        cv2.rectangle(img, (x, y), (x + int(rng.integers(8, 35)), y + int(rng.integers(8, 35))),
                      c, -1)
    return np.ascontiguousarray(img)


@pytest.fixture(scope="module")
def rgb():
    return _textured_rgb()


@pytest.fixture(scope="module")
def png_path(tmp_path_factory, rgb):
    p = tmp_path_factory.mktemp("img") / "textured.png"
    assert cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return p


def _assert_same(a: Features, b: Features):
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    np.testing.assert_array_equal(a.locations, b.locations)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.scores, b.scores)


def _assert_valid(f: Features, h, w, max_features=None):
    n = len(f)
    assert f.descriptors.shape == (n, 128) and f.descriptors.dtype == np.float32
    assert f.locations.shape == (n, 2) and f.locations.dtype == np.float32
    assert f.scales.shape == (n,) and f.scales.dtype == np.float32
    assert f.scores.shape == (n,) and f.scores.dtype == np.float32
    if max_features is not None:
        assert n <= max_features
    if n:
        np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
        assert (f.descriptors >= 0).all()
        assert (f.locations[:, 0] >= 0).all() and (f.locations[:, 0] <= h - 1).all()
        assert (f.locations[:, 1] >= 0).all() and (f.locations[:, 1] <= w - 1).all()
        assert (f.scales > 0).all()
        assert np.all(np.diff(f.scores) <= 0), "features must be sorted by decreasing score"


# --------------------------------------------------------------------------- #
# Features / RootSIFT mapping
# --------------------------------------------------------------------------- #
def test_features_validates_shapes():
    f = Features(np.zeros((3, 128)), np.zeros((3, 2)), np.zeros(3), np.zeros(3))
    assert len(f) == 3 and f.descriptors.dtype == np.float32
    with pytest.raises(ValueError):
        Features(np.zeros((3, 128)), np.zeros((2, 2)), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError):
        Features(np.zeros((3, 128)), np.zeros((3, 3)), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError):
        Features(np.zeros((3, 128)), np.zeros((3, 2)), np.zeros(4), np.zeros(3))
    with pytest.raises(ValueError):
        Features(np.zeros((3, 128)), np.zeros((3, 2)), np.zeros(3), np.zeros((3, 1)))
    with pytest.raises(ValueError):
        Features(np.zeros(128), np.zeros((1, 2)), np.zeros(1), np.zeros(1))
    e = Features.empty()
    assert e.descriptors.shape == (0, 128) and e.locations.shape == (0, 2)


def test_rootsift_mapping():
    rng = np.random.default_rng(1)
    sift = rng.integers(0, 200, size=(20, 128)).astype(np.float32)
    sift[3] = 0.0
    r = rootsift_from_sift(sift)
    assert r.dtype == np.float32 and r.shape == sift.shape
    ok = np.arange(20) != 3
    np.testing.assert_allclose(np.linalg.norm(r[ok], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(r[ok], np.sqrt(sift[ok] / sift[ok].sum(1, keepdims=True)),
                               rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(r)) and not r[3].any()


# --------------------------------------------------------------------------- #
# RootSIFT extractor
# --------------------------------------------------------------------------- #
def test_shapes_norm_bounds(rgb):
    f = RootSIFT(max_features=1000)(rgb)
    assert len(f) > 50
    _assert_valid(f, *rgb.shape[:2], max_features=1000)


def test_deterministic(rgb):
    a = RootSIFT(300)(rgb)
    b = RootSIFT(300)(rgb.copy())
    c = RootSIFT(300)(rgb)
    _assert_same(a, b)
    _assert_same(a, c)


def test_max_features_respected_and_strongest(rgb):
    full = RootSIFT(max_features=None)(rgb)
    assert len(full) > 60
    k = 40
    f = RootSIFT(max_features=k)(rgb)
    assert len(f) == k
    _assert_valid(f, *rgb.shape[:2], max_features=k)
    # the kept keypoints are the k strongest of the unlimited run
    np.testing.assert_array_equal(f.scores, full.scores[:k])
    np.testing.assert_array_equal(f.locations, full.locations[:k])


def test_max_image_size_maps_to_original(rgb):
    big = cv2.resize(rgb, (640, 480), interpolation=cv2.INTER_CUBIC)
    f = RootSIFT(500, max_image_size=320)(big)
    _assert_valid(f, 480, 640, max_features=500)
    # features of the 320x240 working image, mapped back: they span the original
    assert len(f) > 50
    assert f.locations[:, 0].max() > 240 and f.locations[:, 1].max() > 320
    # equals extracting on the (gray, INTER_AREA) downscaled image, coordinates x2
    small = cv2.resize(load_image_gray(big), (320, 240), interpolation=cv2.INTER_AREA)
    g = RootSIFT(500)(small)
    np.testing.assert_array_equal(f.descriptors, g.descriptors)
    np.testing.assert_allclose(f.locations, (g.locations + 0.5) * 2 - 0.5, atol=1e-3)
    np.testing.assert_allclose(f.scales, g.scales * 2, rtol=1e-6)
    # an image already within the limit is untouched
    _assert_same(RootSIFT(500, max_image_size=1000)(rgb), RootSIFT(500)(rgb))


@pytest.mark.parametrize("shape", [(9, 100), (100, 9), (5, 5), (0, 0), (9, 9, 3)])
def test_small_image_gives_zero_features(shape):
    img = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.uint8)
    f = RootSIFT()(img)
    assert len(f) == 0
    assert f.descriptors.shape == (0, 128) and f.descriptors.dtype == np.float32
    assert f.locations.shape == (0, 2)
    assert f.scales.shape == (0,) and f.scores.shape == (0,)


def test_blank_image_gives_zero_features():
    f = RootSIFT()(np.full((64, 64, 3), 128, np.uint8))
    assert len(f) == 0 and f.descriptors.shape == (0, 128)


def test_corrupt_and_missing_files_raise_value_error(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    with pytest.raises(ValueError, match="corrupt.jpg"):
        RootSIFT()(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        RootSIFT()(str(empty))
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ValueError, match="missing.jpg"):
        RootSIFT()(missing)
    with pytest.raises(FileNotFoundError):
        RootSIFT()(missing)
    with pytest.raises(ImageLoadError):
        RootSIFT()(tmp_path)  # a directory


def test_bad_array_inputs():
    with pytest.raises(TypeError):
        RootSIFT()(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError):
        RootSIFT()(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(TypeError):
        RootSIFT()(12345)


def test_path_array_pil_agree(rgb, png_path):
    ex = RootSIFT(400)
    from_array = ex(rgb)
    _assert_same(ex(png_path), from_array)  # pathlib.Path
    _assert_same(ex(str(png_path)), from_array)  # str
    # grayscale input equals the converted RGB
    _assert_same(ex(load_image_gray(rgb)), from_array)
    try:
        from PIL import Image
    except ImportError:
        pytest.skip("PIL (Pillow) not installed: PIL input not tested")
    _assert_same(ex(Image.fromarray(rgb)), from_array)
    _assert_same(ex(Image.open(png_path)), from_array)


def test_jpeg_path_matches_decoded_array(tmp_path, rgb):
    p = tmp_path / "x.jpg"
    assert cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    decoded = cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    _assert_same(RootSIFT(300)(p), RootSIFT(300)(decoded))


def test_extract_many(rgb, png_path):
    ex = RootSIFT(200)
    imgs = [rgb, png_path, _textured_rgb(120, 160, seed=3)]
    ref = [ex(im) for im in imgs]
    out1 = extract_many(ex, imgs, workers=1, progress=False)
    assert len(out1) == 3
    for a, b in zip(out1, ref):
        _assert_same(a, b)
    out2 = extract_many(ex, imgs, workers=2, progress=True)
    for a, b in zip(out2, ref):
        _assert_same(a, b)
    assert extract_many(ex, [], progress=False) == []


# --------------------------------------------------------------------------- #
# realmix dataset helpers on a tiny fake dataset (no shared data needed)
# --------------------------------------------------------------------------- #
@pytest.fixture()
def fake_realmix(tmp_path):
    root = tmp_path / "realmix"
    names = {"db": ["images/a/a2.png", "images/b/b2.png", "images/distractor/d.png"],
             "q": ["images/a/a1.png", "images/b/b1.png"]}
    for i, rel in enumerate(names["db"] + names["q"]):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img = _textured_rgb(96, 128, seed=10 + i)
        assert cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    gnd = {"imlist": names["db"], "qimlist": names["q"],
           "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": None},
                   {"easy": [], "hard": [1], "junk": [0], "bbx": None}],
           "groups": {"a": ["images/a/a1.png", "images/a/a2.png"],
                      "b": ["images/b/b1.png", "images/b/b2.png"],
                      "distractor": ["images/distractor/d.png"]},
           "notes": "fake"}
    (root / "gnd.json").write_text(json.dumps(gnd))
    return root


def test_load_fake_realmix(fake_realmix):
    ds = rm.load_realmix(fake_realmix)
    assert ds.n_db == 3 and ds.n_queries == 2
    assert ds.gnd[1] == {"easy": [], "hard": [1], "junk": [0], "bbx": None}
    assert ds.query_groups == ["a", "b"] and ds.db_groups[2] == "distractor"
    assert all(os.path.isfile(p) for p in ds.imlist + ds.qimlist)
    with pytest.raises(FileNotFoundError):
        rm.load_realmix(fake_realmix / "nope")


def test_realmix_rootsift_cache(fake_realmix, tmp_path):
    cache = tmp_path / "cache"
    r1 = rm.realmix_rootsift(max_features=100, cache_dir=cache, root=fake_realmix,
                             progress=False)
    path = cache / "realmix_rootsift_100.npz"
    assert r1["cache_path"] == str(path) and path.is_file()
    assert sorted(os.listdir(cache)) == ["realmix_rootsift_100.npz"]  # no temp files left
    assert len(r1["db"]) == 3 and len(r1["query"]) == 2
    ex = RootSIFT(100)
    ds = r1["dataset"]
    for f, p in zip(r1["db"] + r1["query"], ds.imlist + ds.qimlist):
        _assert_same(f, ex(p))
    mtime = path.stat().st_mtime_ns
    r2 = rm.realmix_rootsift(max_features=100, cache_dir=cache, root=fake_realmix,
                             progress=False, as_arrays=True)
    assert path.stat().st_mtime_ns == mtime  # served from the cache
    for a, f in zip(r2["db"], r1["db"]):
        np.testing.assert_array_equal(a, f.descriptors)
    sample = rm.realmix_descriptor_sample(50, max_features=100, cache_dir=cache,
                                          root=fake_realmix, progress=False)
    assert sample.shape == (50, 128) and sample.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sample, axis=1), 1.0, atol=1e-5)
    alldb = rm.realmix_descriptor_sample(None, max_features=100, cache_dir=cache,
                                         root=fake_realmix, progress=False)
    np.testing.assert_array_equal(alldb, np.concatenate([f.descriptors for f in r1["db"]]))


# --------------------------------------------------------------------------- #
# the real realmix data (skipped when the shared data are absent)
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def realmix():
    if rm.find_realmix() is None:
        pytest.skip("realmix shared data not found (set D2R_SHARED_DATA to the shared "
                    "'data' folder containing realmix/)")
    return rm.load_realmix()


def test_realmix_ground_truth(realmix):
    ds = realmix
    assert ds.n_db == 146 and ds.n_queries == 62 and len(ds.gnd) == 62
    assert not set(ds.imnames) & set(ds.qimnames)
    for g in ds.gnd:
        assert set(g) >= {"easy", "hard", "junk"}
        assert len(g["easy"]) + len(g["hard"]) >= 1
        for k in ("easy", "hard", "junk"):
            assert all(0 <= i < ds.n_db for i in g[k])
    assert set(ds.query_families) <= set(rm.FAMILIES)
    assert ds.db_families.count("distractor") == 27


def test_realmix_image_extraction(realmix):
    p = realmix.qimlist[0]
    h, w = cv2.imread(p).shape[:2]
    f = RootSIFT(1000)(p)
    assert len(f) > 0
    _assert_valid(f, h, w, max_features=1000)
    g = RootSIFT(200, max_image_size=max(h, w) // 2)(p)
    _assert_valid(g, h, w, max_features=200)
