"""Tests for d2r.datasets.demo (built-in demo set) and d2r.datasets.revisited
(Revisited Oxford/Paris loader, folder + CSV loader, R1M streaming)."""
import hashlib
import json
import os
import pickle
import time

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is needed to write/read images")

from d2r.datasets import demo as dm  # noqa: E402
from d2r.datasets import revisited as rv  # noqa: E402
from d2r.datasets import RealMix  # noqa: E402

try:
    dm.skimage_data_dir()
    HAVE_SKIMAGE = True
except ImportError:
    HAVE_SKIMAGE = False

needs_skimage = pytest.mark.skipif(
    not HAVE_SKIMAGE,
    reason="the demo set is built from photos shipped with scikit-image "
           "(pip install scikit-image); not installed")

SMALL = dict(seed=3, n_views=6, n_distractors=3, size=256,
             objects=("astronaut", "coffee", "motorcycle_left", "text"))


# --------------------------------------------------------------------------- #
# demo set
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    if not HAVE_SKIMAGE:
        pytest.skip("scikit-image not installed")
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="module")
def demo_small(demo_root):
    return dm.make_demo_set(root=demo_root, **SMALL)


def _digests(ds):
    out = {}
    for p in list(ds.imlist) + list(ds.qimlist):
        with open(p, "rb") as f:
            out[os.path.relpath(p, ds.root)] = hashlib.sha1(f.read()).hexdigest()
    return out


@needs_skimage
def test_demo_structure(demo_small):
    ds = demo_small
    assert isinstance(ds, dm.DemoSet) and isinstance(ds, RealMix)
    assert ds.root.name.startswith("demo_") and (ds.root / "gnd.json").is_file()
    objs = list(SMALL["objects"])
    assert ds.query_groups == objs
    kinds = dm._kinds(SMALL["n_views"])
    # 6 views -> 1 junk, 2 hard, 3 easy; motorcycle_left also gets its real view
    assert kinds.count("junk") == 1 and kinds.count("hard") == 2 and kinds.count("easy") == 3
    n_real = int((dm.skimage_data_dir() / "motorcycle_right.png").is_file())
    assert [k for k in ds.db_kinds if k == "real"] == ["real"] * n_real
    assert ds.n_db == len(objs) * SMALL["n_views"] + SMALL["n_distractors"] + n_real
    assert ds.n_queries == len(objs)
    assert len(ds.db_boxes) == len(ds.db_kinds) == ds.n_db
    assert len(ds.imnames) == len(set(ds.imnames))
    assert not set(ds.imnames) & set(ds.qimnames)
    assert all(os.path.isfile(p) for p in ds.imlist + ds.qimlist)
    assert set(ds.db_families) <= {"objects", "distractor"}
    assert ds.params["seed"] == SMALL["seed"] and ds.params["objects"] == objs
    assert set(ds.licences) >= set(objs)
    for name in ds.licences:
        assert name in dm.LICENCES and dm.LICENCES[name]["licence"]


@needs_skimage
def test_demo_gnd_and_boxes(demo_small):
    ds = demo_small
    seen = set()
    for qi, g in enumerate(ds.gnd):
        obj = ds.query_groups[qi]
        lists = [g["easy"], g["hard"], g["junk"]]
        allidx = [i for lst in lists for i in lst]
        assert len(allidx) == len(set(allidx))  # disjoint, no repeats
        assert all(0 <= i < ds.n_db for i in allidx)
        assert g["easy"] and g["hard"] and g["junk"]
        for i in allidx:
            assert ds.db_groups[i] == obj
        assert {ds.db_kinds[i] for i in g["easy"]} <= {"easy", "real"}
        assert {ds.db_kinds[i] for i in g["hard"]} == {"hard"}
        assert {ds.db_kinds[i] for i in g["junk"]} == {"junk"}
        seen.update(allidx)
        # query box inside the query image, reasonably large
        im = cv2.imread(ds.qimlist[qi])
        H, W = im.shape[:2]
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
        assert (x2 - x1) * (y2 - y1) >= 0.2 * W * H
    # every non-distractor db image belongs to exactly one query's lists
    non_distr = {i for i, k in enumerate(ds.db_kinds) if k != "distractor"}
    assert seen == non_distr
    for i, p in enumerate(ds.imlist):
        im = cv2.imread(p)
        assert im is not None
        H, W = im.shape[:2]
        b = ds.db_boxes[i]
        assert b.dtype == np.float64 and b.ndim == 2 and b.shape[1] == 4
        if ds.db_kinds[i] == "distractor":
            assert b.shape[0] == 0
            continue
        assert b.shape[0] == 1
        x1, y1, x2, y2 = b[0]
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, (p, b, (W, H))
        frac = (x2 - x1) * (y2 - y1) / (W * H)
        if ds.db_kinds[i] == "easy":
            assert frac >= 0.4
        elif ds.db_kinds[i] == "hard":
            assert frac < 0.6
            assert x1 > 0 and y1 > 0 and x2 < W and y2 < H  # fully inside
    # gnd.json: realmix structure + boxes
    with open(ds.root / "gnd.json", encoding="utf-8") as f:
        raw = json.load(f)
    for key in ("imlist", "qimlist", "gnd", "groups", "notes", "boxes", "kinds"):
        assert key in raw
    assert len(raw["boxes"]) == len(raw["imlist"])


@needs_skimage
def test_demo_deterministic_and_cached(demo_root, demo_small, tmp_path):
    ds1 = demo_small
    gnd_path = ds1.root / "gnd.json"
    mtimes = {p: os.stat(p).st_mtime_ns for p in ds1.imlist + [str(gnd_path)]}
    time.sleep(0.05)
    ds2 = dm.make_demo_set(root=demo_root, **SMALL)  # cached: nothing rewritten
    assert ds2.root == ds1.root
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
    assert ds2.imnames == ds1.imnames and ds2.gnd == ds1.gnd
    # no temp folders left behind
    assert [p.name for p in demo_root.iterdir() if p.name.startswith(".")] == []
    assert dm.demo_set_dir(root=demo_root, **SMALL) == ds1.root

    # the same seed in another cache folder: identical files and ground truth
    ds3 = dm.make_demo_set(root=tmp_path, **SMALL)
    assert ds3.root.name == ds1.root.name
    assert ds3.imnames == ds1.imnames and ds3.gnd == ds1.gnd
    assert all(np.array_equal(a, b) for a, b in zip(ds3.db_boxes, ds1.db_boxes))
    assert _digests(ds3) == _digests(ds1)

    # another seed: another folder and other images
    ds4 = dm.make_demo_set(root=tmp_path, **dict(SMALL, seed=SMALL["seed"] + 1))
    assert ds4.root != ds3.root
    assert _digests(ds4) != _digests(ds3)


@needs_skimage
def test_demo_rebuilds_incomplete_cache(tmp_path):
    params = dict(SMALL, n_views=3, n_distractors=1, objects=("chelsea",))
    ds = dm.make_demo_set(root=tmp_path, **params)
    victim = ds.imlist[0]
    os.remove(victim)  # damaged cache: regenerated
    ds2 = dm.make_demo_set(root=tmp_path, **params)
    assert os.path.isfile(victim)
    assert ds2.imnames == ds.imnames
    assert [p.name for p in tmp_path.iterdir()] == [ds.root.name]


def test_demo_bad_params():
    with pytest.raises(ValueError):
        dm._params(0, 0, 1, 256, None)
    with pytest.raises(ValueError):
        dm._params(0, 2, -1, 256, None)
    with pytest.raises(ValueError):
        dm._params(0, 2, 1, 256, ("not_an_object",))
    assert dm._kinds(1) == ["easy"] and dm._kinds(2) == ["easy", "hard"]
    assert set(dm.OBJECT_PHOTOS).isdisjoint(dm.BACKGROUND_PHOTOS)
    assert set(dm.LICENCES) >= set(dm.OBJECT_PHOTOS) | set(dm.BACKGROUND_PHOTOS)


def test_clip_poly_area():
    sq = np.array([[-10, -10], [10, -10], [10, 10], [-10, 10]], np.float64)
    assert dm._quad_area(dm._clip_poly(sq, 0, 0, 100, 100)) == pytest.approx(100.0)
    assert dm._quad_area(dm._clip_poly(sq, -20, -20, 20, 20)) == pytest.approx(400.0)
    assert dm._quad_area(dm._clip_poly(sq, 50, 50, 60, 60)) == 0.0


# --------------------------------------------------------------------------- #
# Revisited Oxford / Paris
# --------------------------------------------------------------------------- #
def _write_img(path, h, w, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return img


@pytest.fixture
def fake_roxford(tmp_path):
    root = tmp_path / "roxford5k"
    names = [f"img_{i:03d}" for i in range(6)]
    for i, n in enumerate(names):
        _write_img(root / "jpg" / f"{n}.jpg", 40 + i, 60 + 2 * i, i)
    qnames = ["img_000", "img_003"]
    gnd = [
        {"easy": np.array([1, 2]), "hard": [3], "junk": [], "bbx": np.array([5.4, 6.5, 30.6, 33.5])},
        {"easy": [], "hard": np.array([4, 5], dtype=np.int64), "junk": [0],
         "bbx": [-2.0, 0.0, 70.0, 45.0]},  # beyond the 66 x 43 image
    ]
    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": names, "qimlist": qnames, "gnd": gnd}, f)
    return root


def test_load_revisited(fake_roxford):
    ds = rv.load_revisited(fake_roxford, "roxford5k", check_files=True)
    assert isinstance(ds, rv.RevisitedSet) and isinstance(ds, RealMix)
    assert ds.n_db == 6 and ds.n_queries == 2
    assert ds.imnames[0] == "jpg/img_000.jpg" and ds.names[0] == "img_000"
    assert ds.qimlist[1] == str(fake_roxford.resolve() / "jpg" / "img_003.jpg")
    assert ds.gnd[0] == {"easy": [1, 2], "hard": [3], "junk": [], "bbx": [5.4, 6.5, 30.6, 33.5]}
    assert ds.gnd[1]["hard"] == [4, 5] and ds.gnd[1]["junk"] == [0]
    assert all(isinstance(i, int) for i in ds.gnd[1]["hard"])
    # the folder above also works
    ds2 = rv.load_revisited(fake_roxford.parent, "roxford5k")
    assert ds2.imlist == ds.imlist
    with pytest.raises(FileNotFoundError):
        rv.load_revisited(fake_roxford, "rparis6k")
    with pytest.raises(ValueError):
        rv.load_revisited(fake_roxford, "holidays")


def test_revisited_query_crop(fake_roxford):
    ds = rv.load_revisited(fake_roxford, "roxford5k")
    full = cv2.cvtColor(cv2.imread(ds.qimlist[0]), cv2.COLOR_BGR2RGB)
    # round half to even: 5.4 -> 5, 6.5 -> 6, 30.6 -> 31, 33.5 -> 34
    assert ds.query_box(0) == (5, 6, 31, 34)
    crop = ds.query_image(0)
    assert crop.dtype == np.uint8 and crop.shape == (28, 26, 3)
    assert np.array_equal(crop, full[6:34, 5:31])
    assert np.array_equal(ds.query_image(0, crop=False), full)
    # a box beyond the image: zero padding, as PIL's crop
    full1 = cv2.cvtColor(cv2.imread(ds.qimlist[1]), cv2.COLOR_BGR2RGB)  # 43 x 66
    assert full1.shape == (43, 66, 3)
    c1 = ds.query_image(1)
    assert c1.shape == (45, 72, 3)
    assert np.array_equal(c1[:43, 2:68], full1)
    assert not c1[:, :2].any() and not c1[43:].any() and not c1[:, 68:].any()
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(ds.qimlist[0]) as im:
        pil_full = np.asarray(im.convert("RGB"))
    pil = ds.query_image(0, as_pil=True)
    assert pil.size == (26, 28)
    assert np.array_equal(np.asarray(pil), pil_full[6:34, 5:31])
    pil1 = np.asarray(ds.query_image(1, as_pil=True))
    assert pil1.shape == c1.shape and not pil1[:, :2].any() and not pil1[43:].any()


def test_revisited_rejects_unsafe_pickle(tmp_path):
    root = tmp_path / "rparis6k"
    (root / "jpg").mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [Evil()]}, f)
    with pytest.raises(pickle.UnpicklingError):
        rv.load_revisited(root, "rparis6k")


def test_revisited_bad_indices(tmp_path):
    root = tmp_path / "rparis6k"
    (root / "jpg").mkdir(parents=True)
    with open(root / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["a"],
                     "gnd": [{"easy": [3], "hard": [], "junk": [], "bbx": None}]}, f)
    with pytest.raises(ValueError):
        rv.load_revisited(root, "rparis6k")


# --------------------------------------------------------------------------- #
# folder + CSV
# --------------------------------------------------------------------------- #
def test_load_folder(tmp_path):
    root = tmp_path / "photos"
    files = ["a/q1.jpg", "a/p1.jpg", "a/p2.png", "b/q2.jpg", "b/p3.jpg", "b/neg.jpg",
             "c/other.jpeg"]
    for i, f in enumerate(files):
        _write_img(root / f, 20, 30, i)
    (root / "notes.txt").write_text("not an image")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        "query,positive\n"
        "a/q1.jpg,a/p1.jpg\n"
        "\n"
        "# a comment\n"
        f"a/q1.jpg, {root / 'a/p2.png'}\n"
        "b/q2.jpg,b/p3.jpg,hard\n"
        "b/q2.jpg,a/q1.jpg\n")  # positive that is a query: dropped with a warning
    with pytest.warns(UserWarning, match="dropped"):
        ds = rv.load_folder(root, csv_path)
    assert ds.qimnames == ["a/q1.jpg", "b/q2.jpg"]
    assert ds.imnames == ["a/p1.jpg", "a/p2.png", "b/neg.jpg", "b/p3.jpg", "c/other.jpeg"]
    assert ds.gnd[0] == {"easy": [0, 1], "hard": [], "junk": [], "bbx": None}
    assert ds.gnd[1] == {"easy": [], "hard": [3], "junk": [], "bbx": None}
    assert ds.db_groups == ["a", "a", "b", "b", "c"] and ds.query_groups == ["a", "b"]
    assert all(os.path.isfile(p) for p in ds.imlist + ds.qimlist)
    assert ds.query_image(0).shape == (20, 30, 3)

    bad = tmp_path / "bad.csv"
    bad.write_text("a/q1.jpg,a/missing.jpg\n")
    with pytest.raises(FileNotFoundError):
        rv.load_folder(root, bad)
    bad.write_text("a/q1.jpg,a/p1.jpg,maybe\n")
    with pytest.raises(ValueError):
        rv.load_folder(root, bad)


# --------------------------------------------------------------------------- #
# revisitop 1M streaming
# --------------------------------------------------------------------------- #
@pytest.fixture
def fake_r1m(tmp_path):
    root = tmp_path / "revisitop1m"
    rels = []
    for d in ("b0", "a1", "a0"):
        for k in range(3):
            rel = f"{d[0]}/{d}/{d}_{k}.jpg"
            p = root / "jpg" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"\xff\xd8\xff")  # contents are not read
            rels.append(rel)
    (root / "jpg" / "a" / "readme.txt").write_text("x")
    return root, rels


def test_iter_r1m_glob(fake_r1m):
    root, rels = fake_r1m
    it = rv.iter_r1m(root, batch=4)
    assert iter(it) is it  # a lazy iterator, not a list
    batches = list(it)
    assert [len(b) for b in batches] == [4, 4, 1]
    flat = [p for b in batches for p in b]
    expected = [str(root / "jpg" / r) for r in sorted(rels)]
    assert flat == expected


def test_iter_r1m_list(fake_r1m):
    root, rels = fake_r1m
    listed = [rels[4], rels[0][:-4], "jpg/" + rels[2]]  # no extension / jpg/ prefix
    (root / "revisitop1m.txt").write_text("\n".join(listed) + "\n\n")
    batches = list(rv.iter_r1m(root, batch=2, check_exists=True))
    assert [len(b) for b in batches] == [2, 1]
    assert [p for b in batches for p in b] == [
        str(root / "jpg" / rels[4]), str(root / "jpg" / rels[0]), str(root / "jpg" / rels[2])]
    # ignoring the list walks the tree
    assert sum(len(b) for b in rv.iter_r1m(root, batch=100, use_list=False)) == len(rels)
    (root / "revisitop1m.txt").write_text("nope/missing.jpg\n")
    with pytest.raises(FileNotFoundError):
        list(rv.iter_r1m(root, check_exists=True))
    with pytest.raises(FileNotFoundError):
        rv.iter_r1m(root / "nowhere")
    with pytest.raises(ValueError):
        rv.iter_r1m(root, batch=0)
