"""Regions discovered from the database (d2r.discover): the same landmark view pasted into two
unrelated real photos (realmix, at 5-15 % of their area) is found in both, as a box overlapping the
pasted area (IoU >= 0.5), and nothing is found in composites whose content no other image shows.
The method's share of the oracle's mAP gain on clutter composites is measured by
benchmarks/bench_region_gain.py (BENCHMARKS.md section 13)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2", reason="the discovered-regions test needs opencv-python-headless (RootSIFT)")
pytest.importorskip("faiss", reason="Codebook.train needs faiss (pip install faiss-cpu)")

import d2r  # noqa: E402
from d2r.datasets import find_realmix, load_realmix, realmix_family  # noqa: E402
from d2r.datasets.composites import paste_composite  # noqa: E402
from d2r.detect import box_iou  # noqa: E402
from d2r.discover import discover_regions  # noqa: E402
from d2r.extract import RootSIFT  # noqa: E402
from d2r.extract.rootsift import read_image_rgb  # noqa: E402


@pytest.fixture(scope="module")
def composites():
    root = find_realmix()
    if root is None:
        pytest.skip("../shared/data/realmix is absent (real-photo tests need the shared data)")
    ds = load_realmix(root)
    rng = np.random.default_rng(3)
    landmarks = [i for i, g in enumerate(ds.db_groups) if realmix_family(g) == "landmarks"]
    groups = sorted(g for g in ds.groups if realmix_family(g) != "landmarks")   # one photo per group: unrelated
    pick = rng.choice(len(groups), size=6, replace=False)
    bgs = [read_image_rgb(root / sorted(ds.groups[groups[int(i)]])[0]) for i in pick]
    view = read_image_rgb(root / ds.imlist[landmarks[int(rng.integers(len(landmarks)))]])
    images, boxes = [], []
    for b in range(2):   # the same view in two unrelated photos
        img, box = paste_composite(bgs[b], view, rng, 1024, (0.05, 0.15))
        images.append(img)
        boxes.append(box)
    for b in range(2, 6, 2):   # unrelated content only
        img, box = paste_composite(bgs[b], bgs[b + 1], rng, 1024, (0.05, 0.15))
        images.append(img)
        boxes.append(box)
    ex = RootSIFT(max_features=2000)
    feats = [ex(img) for img in images]
    cb = d2r.Codebook.train(np.concatenate([f.descriptors for f in feats]), 512, niter=10, seed=0)
    return images, boxes, feats, cb


def test_shared_view_is_discovered(composites):
    images, boxes, feats, cb = composites
    found = discover_regions(feats, cb, image_sizes=[im.shape[:2] for im in images], progress=False)
    for k in (0, 1):
        b, s = found[k]
        assert len(b) >= 1 and s[0] >= 20
        assert box_iou(b, boxes[k]).max() >= 0.5, (b, boxes[k])
    for k in (2, 3):
        assert len(found[k][0]) == 0, found[k]
    assert found.stats["pairs_verified"] >= 4


def test_images_added_later_use_the_index(composites):
    """An image not in the index (about to be added) gets its regions from the images that are."""
    images, boxes, feats, cb = composites
    index = d2r.Index(cb, "asmk*")
    index.add([f.descriptors for f in feats[1:]], image_ids=[1, 2, 3])
    found = discover_regions([feats[0]], index=index, db_features={1: feats[1], 2: feats[2], 3: feats[3]},
                             image_sizes=[images[0].shape[:2]], progress=False)
    assert box_iou(found[0][0], boxes[0]).max() >= 0.5
    with pytest.raises(ValueError, match="db_features"):
        discover_regions([feats[0]], index=index)
