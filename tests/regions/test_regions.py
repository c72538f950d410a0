"""Tests for d2r.regions: box selection, regions by selection and by re-extraction."""
import math

import numpy as np
import pytest

import d2r
from d2r.extract import Features
from d2r.regions.select import (RegionStats, boxes_from_normalized, crop_bounds, regions_by_reextraction,
                         regions_by_selection, select_boxes)


def _stats_consistent(st: RegionStats):
    assert st.n_boxes_in == st.n_below_threshold + st.n_dropped_empty + st.n_capped + st.n_regions - 1


def _features(locs_yx, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    n = len(locs_yx)
    d = rng.standard_normal((n, dim)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return Features(d, np.asarray(locs_yx, np.float32).reshape(n, 2), np.ones(n, np.float32),
                    np.arange(n, 0, -1, dtype=np.float32))


def _region_rows(regions: d2r.Regions, r: int) -> np.ndarray:
    return np.sort(regions.members[regions.offsets[r]:regions.offsets[r + 1]])


# --------------------------------------------------------------------------------------------------
# select_boxes


def test_threshold_default_is_0_1_inclusive():
    boxes = [[0, 0, 10, 10]] * 4
    scores = [0.05, 0.1, 0.0999, 0.5]
    b, s, st = select_boxes(boxes, scores, (100, 100))
    assert st.n_below_threshold == 2
    np.testing.assert_array_equal(s, [0.5, 0.1])
    assert b.shape == (2, 4) and b.dtype == np.float64
    assert st.n_regions == 3
    _stats_consistent(st)


def test_threshold_none_and_custom():
    boxes = [[0, 0, 10, 10]] * 3
    _, s, st = select_boxes(boxes, [0.01, 0.2, 0.3], (50, 50), score_threshold=None)
    assert st.n_below_threshold == 0 and len(s) == 3
    _, s, st = select_boxes(boxes, [0.01, 0.2, 0.3], (50, 50), score_threshold=0.25)
    assert st.n_below_threshold == 2 and list(s) == [0.3]


def test_sorted_by_score_descending_stable():
    boxes = np.array([[i, 0, i + 5, 5] for i in range(5)], float)
    scores = [0.3, 0.9, 0.3, 0.9, 0.5]
    b, s, _ = select_boxes(boxes, scores, (100, 100))
    np.testing.assert_array_equal(s, [0.9, 0.9, 0.5, 0.3, 0.3])
    np.testing.assert_array_equal(b[:, 0], [1, 3, 4, 0, 2])  # ties keep input order


def test_no_scores_keeps_everything_in_order():
    boxes = [[5, 5, 9, 9], [0, 0, 3, 3]]
    b, s, st = select_boxes(boxes, None, (20, 20))
    assert s is None
    np.testing.assert_array_equal(b, boxes)
    assert st.n_regions == 3 and st.n_below_threshold == 0


def test_clipping():
    boxes = [[-5, -2, 50, 30], [10, 10, 20, 20], [90, 40, 130, 70]]
    b, _, st = select_boxes(boxes, [1.0, 0.9, 0.8], (60, 100))  # H=60, W=100
    np.testing.assert_array_equal(b, [[0, 0, 50, 30], [10, 10, 20, 20], [90, 40, 100, 60]])
    assert st.n_clipped == 2 and st.n_dropped_empty == 0
    _stats_consistent(st)


def test_empty_and_inverted_dropped_and_counted():
    boxes = [
        [10, 10, 10, 20],    # zero width
        [10, 10, 20, 10],    # zero height
        [30, 10, 20, 20],    # inverted x
        [10, 30, 20, 20],    # inverted y
        [120, 10, 150, 20],  # right of the image: empty after clipping
        [-30, -30, -1, -1],  # above-left: empty after clipping
        [5, 5, 15, 15],      # fine
    ]
    b, s, st = select_boxes(boxes, [0.5] * 7, (100, 100))
    assert st.n_dropped_empty == 6
    np.testing.assert_array_equal(b, [[5, 5, 15, 15]])
    assert st.n_regions == 2 and st.n_clipped == 0
    _stats_consistent(st)


def test_no_image_size_no_clipping_but_drops_inverted():
    b, _, st = select_boxes([[-5, -5, 500, 500], [3, 3, 1, 1]], [1, 1], None)
    np.testing.assert_array_equal(b, [[-5, -5, 500, 500]])
    assert st.n_clipped == 0 and st.n_dropped_empty == 1


def test_cap_keeps_highest_scores():
    boxes = np.array([[i, 0, i + 5, 5] for i in range(6)], float)
    scores = [0.2, 0.8, 0.05, 0.6, 0.9, 0.4]
    b, s, st = select_boxes(boxes, scores, (50, 50), max_boxes=2)
    np.testing.assert_array_equal(s, [0.9, 0.8])
    np.testing.assert_array_equal(b[:, 0], [4, 1])
    assert st == RegionStats(n_boxes_in=6, n_below_threshold=1, n_dropped_empty=0, n_clipped=0, n_capped=3,
                             n_regions=3)
    _, _, st0 = select_boxes(boxes, scores, (50, 50), max_boxes=0)
    assert st0.n_regions == 1 and st0.n_capped == 5


def test_no_boxes():
    for empty in ([], np.zeros((0, 4))):
        b, s, st = select_boxes(empty, [], (10, 10))
        assert b.shape == (0, 4) and s.shape == (0,)
        assert st == RegionStats(n_boxes_in=0, n_regions=1)


@pytest.mark.parametrize("boxes, scores", [
    ([[0, 0, np.nan, 5]], [1.0]),
    ([[0, 0, np.inf, 5]], [1.0]),
    ([[0, 0, 5, 5]], [np.nan]),
    ([[0, 0, 5, 5]], [-np.inf]),
])
def test_nan_inf_raise(boxes, scores):
    with pytest.raises(ValueError, match="NaN or Inf"):
        select_boxes(boxes, scores, (10, 10))


@pytest.mark.parametrize("boxes, scores, size", [
    ([0, 0, 5, 5], [1.0], (10, 10)),               # 1-D box
    ([[0, 0, 5]], [1.0], (10, 10)),                # 3 coordinates
    ([[[0, 0, 5, 5]]], [1.0], (10, 10)),           # 3-D
    ([[0, 0, 5, 5]], [1.0, 2.0], (10, 10)),        # score count
    ([[0, 0, 5, 5]], [[1.0]], (10, 10)),           # 2-D scores
    ([[0, 0, 5, 5]], [1.0], (10,)),                # image size
    ([[0, 0, 5, 5]], [1.0], (0, 10)),
    ([[0, 0, 5, 5]], [1.0], (10.5, 10)),
    ([["a", 0, 5, 5]], [1.0], (10, 10)),           # not numeric
])
def test_bad_shapes_raise(boxes, scores, size):
    with pytest.raises(ValueError):
        select_boxes(boxes, scores, size)


def test_bad_options_raise():
    with pytest.raises(ValueError):
        select_boxes([[0, 0, 5, 5]], [1.0], (10, 10), max_boxes=-1)
    with pytest.raises(ValueError):
        select_boxes([[0, 0, 5, 5]], [1.0], (10, 10), score_threshold=float("nan"))


def test_input_not_modified():
    boxes = np.array([[-5.0, 0, 50, 5]])
    scores = np.array([0.5])
    select_boxes(boxes, scores, (10, 10))
    np.testing.assert_array_equal(boxes, [[-5.0, 0, 50, 5]])


# --------------------------------------------------------------------------------------------------
# boxes_from_normalized, crop_bounds


def test_boxes_from_normalized():
    yxyx = [[0.1, 0.2, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0]]
    b = boxes_from_normalized(yxyx, (200, 400))  # H=200, W=400
    np.testing.assert_allclose(b, [[80, 20, 300, 100], [0, 0, 400, 200]])
    with pytest.raises(ValueError):
        boxes_from_normalized([[0, 0, 1]], (10, 10))
    with pytest.raises(ValueError):
        boxes_from_normalized([[0, 0, np.nan, 1]], (10, 10))


def test_crop_bounds_floor_ceil():
    assert crop_bounds([10.2, 20.9, 30.1, 40.0]) == (10, 20, 31, 40)
    assert crop_bounds([0, 0, 5, 5]) == (0, 0, 5, 5)
    # The official crop of a normalised box: floor(xmin W), floor(ymin H), ceil(xmax W), ceil(ymax H).
    H, W = 333, 517
    yxyx = [0.123, 0.456, 0.789, 0.901]
    assert crop_bounds(boxes_from_normalized([yxyx], (H, W))[0]) == (
        math.floor(0.456 * W), math.floor(0.123 * H), math.ceil(0.901 * W), math.ceil(0.789 * H))


# --------------------------------------------------------------------------------------------------
# regions_by_selection


def test_selection_membership_edges_and_overlap():
    locs = [
        (5, 5),      # 0: inside box A only
        (10, 10),    # 1: on A's top-left corner (inside: x1 <= x, y1 <= y) and inside B
        (20, 15),    # 2: on A's bottom edge y == y2 (outside A), inside B
        (15, 20),    # 3: on A's right edge x == x2 (outside A), inside B
        (50, 50),    # 4: in neither
        (12, 12),    # 5: in A and B (overlap)
        (29.9, 29.9),  # 6: inside B just before its exclusive edge
    ]
    f = _features(locs)
    A = [0, 0, 20, 20]  # x1, y1, x2, y2 -> 0 <= x < 20, 0 <= y < 20
    B = [10, 10, 30, 30]
    regs, st = regions_by_selection(f, [A, B], [0.9, 0.8], image_size=(100, 100))
    assert isinstance(regs, d2r.Regions) and regs.members is not None
    assert regs.n_regions == 3 and st.n_regions == 3
    np.testing.assert_array_equal(_region_rows(regs, 0), np.arange(7))
    np.testing.assert_array_equal(_region_rows(regs, 1), [0, 1, 5])
    np.testing.assert_array_equal(_region_rows(regs, 2), [1, 2, 3, 5, 6])
    np.testing.assert_array_equal(regs.descriptors, f.descriptors)


def test_selection_order_threshold_and_empty_region():
    f = _features([(5, 5), (50, 50)])
    boxes = [[0, 0, 10, 10], [40, 40, 60, 60], [70, 70, 80, 80], [0, 0, 100, 100]]
    regs, st = regions_by_selection(f, boxes, [0.3, 0.9, 0.5, 0.05], image_size=(100, 100))
    assert st.n_below_threshold == 1 and regs.n_regions == 4
    # score order: box 1 (0.9), box 2 (0.5, no features: an empty region, still counted), box 0 (0.3)
    np.testing.assert_array_equal(_region_rows(regs, 1), [1])
    assert _region_rows(regs, 2).size == 0
    np.testing.assert_array_equal(_region_rows(regs, 3), [0])


def test_selection_scores_none_keeps_all():
    f = _features([(5, 5)])
    regs, st = regions_by_selection(f, [[0, 0, 10, 10], [20, 20, 30, 30]])
    assert regs.n_regions == 3 and st.n_below_threshold == 0


def test_selection_rejects_non_features():
    with pytest.raises(TypeError):
        regions_by_selection(np.zeros((3, 8), np.float32), [[0, 0, 1, 1]])


# --------------------------------------------------------------------------------------------------
# regions_by_reextraction


class FakeExtractor:
    """Records the crops it gets; returns one feature per 4x4 block at the block centre, whose
    descriptor encodes the (whole-image) pixel value there."""

    def __init__(self, dim=8):
        self.dim = dim
        self.calls = []

    def __call__(self, img):
        img = np.asarray(img)
        self.calls.append(img.copy())
        h, w = img.shape[:2]
        ys, xs = np.meshgrid(np.arange(2, h, 4), np.arange(2, w, 4), indexing="ij")
        ys, xs = ys.ravel(), xs.ravel()
        n = ys.size
        d = np.zeros((n, self.dim), np.float32)
        d[:, 0] = 1.0
        if n:
            d[:, 1] = img[ys, xs, 0] if img.ndim == 3 else img[ys, xs]
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return Features(d, np.stack([ys, xs], 1).astype(np.float32), np.ones(n, np.float32),
                        np.ones(n, np.float32))


def _coord_image(h=60, w=80):
    """RGB image whose channel 0 is x + y (mod 256), channel 1 = y, channel 2 = x."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([(xs + ys) % 256, ys, xs], axis=2).astype(np.uint8)


def test_reextraction_crops_follow_floor_ceil():
    img = _coord_image()
    ex = FakeExtractor()
    boxes = [[10.7, 5.2, 30.1, 25.0], [-4.0, 40.5, 20.5, 90.0]]  # the second is clipped to H=60
    regions, st, crops = regions_by_reextraction(img, ex, boxes, [0.9, 0.8])
    assert len(ex.calls) == 3  # whole image + 2 crops
    np.testing.assert_array_equal(ex.calls[0], img)
    np.testing.assert_array_equal(ex.calls[1], img[5:25, 10:31])   # floor(5.2)=5 .. ceil(25)=25, 10 .. 31
    np.testing.assert_array_equal(ex.calls[2], img[40:60, 0:21])   # clipped x1=0, y2=60; ceil(20.5)=21
    assert st.n_clipped == 1 and st.n_regions == 3
    assert len(regions) == 3 and len(crops) == 2
    np.testing.assert_array_equal(regions[0], ex(img).descriptors)


def test_reextraction_locations_mapped_back():
    img = _coord_image()
    ex = FakeExtractor()
    _, _, crops = regions_by_reextraction(img, ex, [[10.7, 5.2, 30.1, 25.0]], None)
    f = crops[0]
    assert len(f) > 0
    ys = f.locations[:, 0].astype(int)
    xs = f.locations[:, 1].astype(int)
    # Mapped locations fall inside the crop's whole-image bounds, and the pixel value recorded by the
    # extractor in crop coordinates is the whole image's pixel value at the mapped location.
    assert ys.min() >= 5 and ys.max() < 25 and xs.min() >= 10 and xs.max() < 31
    expected = img[ys, xs, 0].astype(np.float32)
    recorded = f.descriptors[:, 1] / f.descriptors[:, 0]
    np.testing.assert_allclose(recorded, expected, rtol=1e-5)
    # ...and the first feature sits at crop (2, 2) -> whole image (7, 12)
    assert tuple(f.locations[0]) == (7.0, 12.0)


def test_reextraction_whole_features_given_and_threshold():
    img = _coord_image()
    ex = FakeExtractor()
    whole = _features([(1, 1), (2, 2)])
    regions, st, crops = regions_by_reextraction(img, ex, [[0, 0, 20, 20], [0, 0, 40, 40]], [0.05, 0.5],
                                                 whole_features=whole)
    assert len(ex.calls) == 1  # only the kept crop; the whole image is not re-extracted
    np.testing.assert_array_equal(ex.calls[0], img[0:40, 0:40])
    np.testing.assert_array_equal(regions[0], whole.descriptors)
    assert st.n_below_threshold == 1 and len(regions) == 2


def test_reextraction_from_path_and_gray(tmp_path):
    cv2 = pytest.importorskip("cv2")
    img = _coord_image()
    p = tmp_path / "img.png"
    assert cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    ex = FakeExtractor()
    regions_by_reextraction(str(p), ex, [[10, 10, 20, 20]])
    np.testing.assert_array_equal(ex.calls[0], img)               # decoded as RGB
    np.testing.assert_array_equal(ex.calls[1], img[10:20, 10:20])
    gray = img[:, :, 1].copy()
    ex2 = FakeExtractor()
    regions_by_reextraction(gray, ex2, [[10, 10, 20, 20]])
    np.testing.assert_array_equal(ex2.calls[1], gray[10:20, 10:20])


def test_reextraction_bad_inputs():
    img = _coord_image()
    with pytest.raises(TypeError):
        regions_by_reextraction(img, "not callable", [[0, 0, 5, 5]])
    with pytest.raises(TypeError):
        regions_by_reextraction(img.astype(np.float32), FakeExtractor(), [[0, 0, 5, 5]])
    with pytest.raises(ValueError):
        regions_by_reextraction(img, FakeExtractor(), [[0, 0, 5, np.nan]])


# --------------------------------------------------------------------------------------------------
# Both outputs go into a regional index


def test_outputs_accepted_by_rasmk_index():
    rng = np.random.default_rng(3)
    dim = 8
    cb = d2r.Codebook(rng.standard_normal((16, dim)).astype(np.float32))
    img = _coord_image()
    ex = FakeExtractor(dim)
    whole = ex(img)
    boxes = [[10, 10, 40, 40], [30, 20, 70, 50]]
    reg_sel, _ = regions_by_selection(whole, boxes, [0.9, 0.5], image_size=img.shape[:2])
    reg_re, _, _ = regions_by_reextraction(img, ex, boxes, [0.9, 0.5], whole_features=whole)

    for kernel in ("rasmk*", "rasmk"):
        idx = d2r.Index(cb, kernel)
        i0 = idx.add_regions(reg_sel)
        i1 = idx.add_regions(reg_re)
        assert (i0, i1) == (0, 1) and len(idx) == 2
        idx.add_regions_many([reg_sel, reg_re])
        assert len(idx) == 4
        s, ids = idx.search(whole.descriptors, k=None)
        assert sorted(ids.tolist()) == [0, 1, 2, 3]
        # The stored aggregation equals the library's own aggregation of the same regions.
        a = idx.aggregate(reg_re)
        b = d2r.aggregate(reg_re, cb, kernel)
        np.testing.assert_array_equal(a.words, b.words)

    rs = d2r.RegionalSearchIndex(cb, "asmk*")
    rs.add_regions_many([reg_sel, reg_re])
    assert len(rs) == 2
