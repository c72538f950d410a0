"""Attention learned from the collection (d2r.regions.attention): the training labels and the box
proposals against slow, obvious references written here; the numpy trainer on a toy problem
(deterministic, learns a separable rule); the model file; bad input; the region source by name; and,
on the shared photos (realmix), the measured effect of attention feature selection.

Measured (benchmarks/bench_attention.py, BENCHMARKS.md section 20; 2-core VM shared with other jobs,
the figures do not depend on the load): realmix RootSIFT (1,000 features), the pipeline's 1,024-word
codebook (seed 0), the model trained on 179 verified database pairs (12,729 positives of 133,798
features), ASMK* with each database image cut to half the median number of features:
attention's top half 85.2 / 43.0 / 19.7 (E / M / H), a random half (seed 0) 80.0 / 38.4 / 15.6,
all features 81.4 / 45.4 / 25.9. Floors: 0.3 below the attention figures, and attention above
random by at least 3 Medium (measured +4.6). The realmix test takes about 40 s on that VM.
"""
from __future__ import annotations

import numpy as np
import pytest

from d2r.regions.attention import (ATTENTION, AttentionModel, AttentionProposals, attention_boxes,
                                   attention_training_data, labels_from_pairs, select_by_attention,
                                   train_attention)


# --------------------------------------------------------------------------------------------------
# slow references


def ref_labels(n_features, pairs):
    labels = [[0] * n for n in n_features]
    for i, j, matches, mask in pairs:
        for (a, b), ok in zip(np.asarray(matches).tolist(), np.asarray(mask).tolist()):
            if ok:
                labels[i][a] = 1
                labels[j][b] = 1
    return [np.array(lab, np.int8) for lab in labels]


def ref_boxes(loc, scores, size, max_boxes, top_fraction, grid, cell_fraction, margin, max_area, min_points):
    h, w = size
    n = len(scores)
    n_top = int(np.ceil(top_fraction * n))
    order = sorted(range(n), key=lambda k: (-scores[k], k))[:n_top]
    cells = {}
    mass = [[0.0] * grid for _ in range(grid)]
    for k in order:
        r = min(max(int(loc[k][0] * grid / h), 0), grid - 1)
        c = min(max(int(loc[k][1] * grid / w), 0), grid - 1)
        cells[k] = (r, c)
        mass[r][c] += max(scores[k], 0.0)
    total = sum(sum(row) for row in mass)
    if total <= 0:
        return np.zeros((0, 4)), np.zeros(0)
    peak = max(max(row) for row in mass)
    on = {(r, c) for r in range(grid) for c in range(grid) if mass[r][c] > 0 and mass[r][c] >= cell_fraction * peak}
    parent = {x: x for x in on}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for r, c in on:
        for nb in ((r + 1, c), (r, c + 1)):
            if nb in on:
                a, b = find((r, c)), find(nb)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups = {}
    for x in sorted(on):                      # row-major: a group is named by its first cell
        groups.setdefault(find(x), []).append(x)
    firsts = sorted(min(v) for v in groups.values())
    out = []
    for first in firsts:
        members = set(next(v for v in groups.values() if min(v) == first))
        pts = [k for k in order if cells[k] in members]
        if len(pts) < min_points:
            continue
        ys = [loc[k][0] for k in pts]
        xs = [loc[k][1] for k in pts]
        y1, y2, x1, x2 = min(ys), max(ys), min(xs), max(xs)
        b = [max(0.0, x1 - margin * (x2 - x1)), max(0.0, y1 - margin * (y2 - y1)),
             min(w, x2 + margin * (x2 - x1)), min(h, y2 + margin * (y2 - y1))]
        if b[2] - b[0] < 2 or b[3] - b[1] < 2 or (b[2] - b[0]) * (b[3] - b[1]) > max_area * w * h:
            continue
        out.append((b, sum(max(scores[k], 0.0) for k in pts) / total))
    out = sorted(out, key=lambda t: -t[1])[:max_boxes]   # stable: ties keep row-major order
    return np.array([b for b, _ in out]).reshape(-1, 4), np.array([s for _, s in out])


# --------------------------------------------------------------------------------------------------
# training data


def test_labels_match_the_reference():
    rng = np.random.default_rng(0)
    n_features = [int(v) for v in rng.integers(0, 40, 6)]
    pairs = []
    for _ in range(10):
        i, j = (int(v) for v in rng.choice(6, 2, replace=False))
        if n_features[i] == 0 or n_features[j] == 0:
            continue
        m = int(rng.integers(0, 30))
        matches = np.stack([rng.integers(0, n_features[i], m), rng.integers(0, n_features[j], m)], 1)
        pairs.append((i, j, matches, rng.random(m) < 0.4))
    got = labels_from_pairs(n_features, pairs)
    want = ref_labels(n_features, pairs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == np.int8 and np.array_equal(g, w)
    assert sum(int(g.sum()) for g in got) > 0


def test_training_data_negatives():
    from d2r.extract import Features

    rng = np.random.default_rng(1)
    feats = [Features(rng.random((n, 4)).astype(np.float32), np.zeros((n, 2), np.float32),
                      np.ones(n, np.float32), np.ones(n, np.float32)) for n in (5, 3, 4)]
    labels = [np.array([1, 0, 0, 1, 0], np.int8), np.zeros(3, np.int8), np.array([0, 1, 0, 0], np.int8)]
    X, y = attention_training_data(feats, labels, "all")
    assert len(X) == 12 and y.tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    assert np.array_equal(X[5:8], feats[1].descriptors)
    X, y = attention_training_data(feats, labels, "unmatched")   # image 1 matches nothing: its features only
    assert y.tolist() == [1, 1, 0, 0, 0, 1]
    assert np.array_equal(X[2:5], feats[1].descriptors)


def test_training_data_bad_input():
    from d2r.extract import Features

    f = Features(np.zeros((3, 4), np.float32), np.zeros((3, 2), np.float32), np.ones(3, np.float32),
                 np.ones(3, np.float32))
    with pytest.raises(ValueError, match="negatives"):
        attention_training_data([f], [np.zeros(3, np.int8)], "some")
    with pytest.raises(ValueError, match="3 features but 2 labels"):
        attention_training_data([f], [np.zeros(2, np.int8)])
    with pytest.raises(ValueError, match="1 images but 2 label arrays"):
        attention_training_data([f], [np.zeros(3, np.int8)] * 2)
    with pytest.raises(ValueError, match="outside"):
        labels_from_pairs([3, 3], [(0, 2, np.zeros((0, 2)), np.zeros(0, bool))])
    with pytest.raises(ValueError, match="a match indexes a feature outside"):
        labels_from_pairs([3, 3], [(0, 1, np.array([[0, 3]]), np.array([True]))])
    with pytest.raises(ValueError, match="mask entries"):
        labels_from_pairs([3, 3], [(0, 1, np.array([[0, 1]]), np.array([True, False]))])


# --------------------------------------------------------------------------------------------------
# the trainer and the model


def _toy(seed, n=2000, d=16):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = ((X[:, 0] > 0) & (X[:, 1] > 0)).astype(np.int8)    # a rule an MLP can learn (scale-free), imbalanced
    return X, y


def _auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean(pos[:, None] > neg[None, :]))


def test_trainer_learns_and_is_deterministic():
    X, y = _toy(0)
    a = train_attention(X, y, hidden=16, epochs=150, seed=3)
    b = train_attention(X, y, hidden=16, epochs=150, seed=3)
    assert np.array_equal(a.w1, b.w1) and a.b2 == b.b2
    Xt, yt = _toy(1)
    assert _auc(a.score(Xt), yt) > 0.96   # measured 0.973
    c = train_attention(X, y, hidden=16, epochs=150, seed=4)
    assert not np.array_equal(a.w1, c.w1)


def test_model_score_matches_numpy_formula_and_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    m = AttentionModel(rng.normal(size=(8, 5)), rng.normal(size=5), rng.normal(size=5), 0.3)
    x = rng.normal(size=(7, 8)).astype(np.float32)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = 1 / (1 + np.exp(-(np.maximum(xn @ m.w1 + m.b1, 0) @ m.w2 + 0.3)))
    assert np.allclose(m.score(x), want, atol=1e-5)
    path = m.save(tmp_path / "att.npz")
    m2 = AttentionModel.load(path)
    assert np.array_equal(m2.score(x), m.score(x))
    bad = tmp_path / "bad.npz"
    np.savez(bad, w1=m.w1)
    with pytest.raises(ValueError, match="not a d2r attention model"):
        AttentionModel.load(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a d2r attention model"):
        AttentionModel.load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        AttentionModel.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        m.score(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        m.score(np.full((1, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        AttentionModel(np.zeros((8, 5)), np.zeros(4), np.zeros(5), 0.0)


def test_trainer_bad_input():
    X, y = _toy(0, n=50)
    with pytest.raises(ValueError, match="both positives and negatives"):
        train_attention(X, np.zeros(50, np.int8))
    with pytest.raises(ValueError, match="0 or 1"):
        train_attention(X, np.full(50, 2))
    with pytest.raises(ValueError, match="NaN"):
        train_attention(np.full((50, 16), np.nan), y)
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        train_attention(X, y[:10])


def test_select_by_attention_keeps_the_top_k_in_order():
    from d2r.extract import Features

    rng = np.random.default_rng(5)
    m = AttentionModel(rng.normal(size=(8, 5)), rng.normal(size=5), rng.normal(size=5), 0.0)
    d = rng.normal(size=(20, 8)).astype(np.float32)
    f = Features(d, rng.random((20, 2)).astype(np.float32), np.arange(20, dtype=np.float32),
                 np.ones(20, np.float32))
    g = select_by_attention(f, m, 6)
    s = m.score(d)
    want = sorted(sorted(range(20), key=lambda k: (-s[k], k))[:6])
    assert g.scales.astype(int).tolist() == want
    assert select_by_attention(f, m, 50) is f
    with pytest.raises(ValueError, match="k must be"):
        select_by_attention(f, m, 0)


# --------------------------------------------------------------------------------------------------
# boxes


@pytest.mark.parametrize("seed", range(6))
def test_boxes_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = 300 + 50 * seed, 400
    n = 400
    loc = np.stack([rng.random(n) * h, rng.random(n) * w], 1)
    s = rng.random(n) * 0.3
    for _ in range(1 + seed % 3):    # a few clusters of high scores
        cy, cx = rng.random() * h, rng.random() * w
        k = rng.choice(n, 60, replace=False)
        loc[k] = np.stack([np.clip(cy + rng.normal(0, 15, 60), 0, h - 1), np.clip(cx + rng.normal(0, 15, 60), 0, w - 1)], 1)
        s[k] = 0.7 + 0.3 * rng.random(60)
    opts = dict(max_boxes=[5, 2, 5, 1, 3, 5][seed], top_fraction=[0.25, 0.2, 0.4, 0.25, 0.1, 1.0][seed],
                grid=[8, 6, 10, 8, 4, 8][seed], cell_fraction=[0.3, 0.5, 0.2, 0.3, 0.0, 0.4][seed],
                margin=0.1, max_area=0.6, min_points=[8, 5, 3, 8, 2, 8][seed])
    b, sc = attention_boxes(loc, s, (h, w), **opts)
    rb, rs = ref_boxes(loc.tolist(), s.tolist(), (h, w), **opts)
    assert b.shape == rb.shape and len(b) <= opts["max_boxes"]
    assert np.allclose(b, rb) and np.allclose(sc, rs, atol=1e-6)
    if seed == 0:
        assert len(b) >= 1


def test_boxes_find_a_planted_cluster():
    rng = np.random.default_rng(9)
    loc = np.stack([rng.random(500) * 480, rng.random(500) * 640], 1)
    s = rng.random(500) * 0.2
    loc[:80] = np.stack([200 + rng.random(80) * 60, 300 + rng.random(80) * 80], 1)
    s[:80] = 0.9
    b, sc = attention_boxes(loc, s, (480, 640), top_fraction=0.2)
    assert len(b) >= 1 and sc[0] > 0.5
    from d2r.regions.detect import box_iou

    assert box_iou(b[:1], np.array([[300, 200, 380, 260]]))[0, 0] >= 0.6


def test_boxes_bad_input_and_empty():
    loc = np.zeros((4, 2))
    with pytest.raises(ValueError, match="one score each"):
        attention_boxes(loc, np.ones(3), (10, 10))
    with pytest.raises(ValueError, match="NaN"):
        attention_boxes(loc, np.array([1, np.nan, 1, 1]), (10, 10))
    with pytest.raises(ValueError, match="image_size"):
        attention_boxes(loc, np.ones(4), (0, 10))
    with pytest.raises(ValueError, match="top_fraction"):
        attention_boxes(loc, np.ones(4), (10, 10), top_fraction=0)
    b, s = attention_boxes(np.zeros((0, 2)), np.zeros(0), (10, 10))
    assert b.shape == (0, 4) and s.shape == (0,)


# --------------------------------------------------------------------------------------------------
# the region source


def test_region_source_names(tmp_path):
    from d2r.regions.detect import canonical_region_source, region_source

    assert region_source("attention") == ATTENTION
    with pytest.raises(ValueError, match="attention:MODEL.npz"):
        region_source("attention:" + str(tmp_path / "missing.npz"))
    rng = np.random.default_rng(0)
    path = AttentionModel(rng.normal(size=(128, 8)), np.zeros(8), rng.normal(size=8), 0.0).save(tmp_path / "a.npz")
    src = region_source("attention:" + path, max_boxes=3)
    assert isinstance(src, AttentionProposals) and src.max_boxes == 3
    assert canonical_region_source("attention:" + path) == "attention:" + path
    pytest.importorskip("cv2", reason="RootSIFT needs OpenCV")
    img = (rng.random((240, 320, 3)) * 255).astype(np.uint8)
    b, s = src(img)
    assert b.shape[1] == 4 and len(b) <= 3 and len(b) == len(s)


def test_pipeline_refuses_attention_without_the_collection():
    from d2r.workflows.pipeline import database_regions

    class DS:
        imlist = ["a.jpg"]

    with pytest.raises(ValueError, match="collection_attention"):
        database_regions(DS(), None, [None], "attention", 5, progress=False)


# --------------------------------------------------------------------------------------------------
# measured on the shared photos


@pytest.mark.slow
def test_attention_selection_on_realmix():
    pytest.importorskip("cv2", reason="RootSIFT needs OpenCV")
    pytest.importorskip("faiss", reason="Codebook.train needs faiss")
    import d2r
    from d2r.core.evaluate import revisited
    from d2r.datasets import find_realmix, realmix_rootsift
    from d2r.regions.attention import verified_pairs
    from d2r.workflows.pipeline import train_codebook

    if find_realmix() is None:
        pytest.skip("../shared/data/realmix is absent")
    r = realmix_rootsift(1000, progress=False)
    db, q, gnd = r["db"], r["query"], r["dataset"].gnd
    cb = train_codebook(db, 1024, 0, progress=False)
    pairs = verified_pairs(db, cb, neighbours=5, min_inliers=15, seed=0)
    labels = labels_from_pairs([len(f.descriptors) for f in db], pairs)
    X, y = attention_training_data(db, labels)
    model = train_attention(X, y, hidden=64, epochs=10, seed=0)
    k = int(round(0.5 * np.median([len(f.descriptors) for f in db])))

    def mean_ap(descs):
        idx = d2r.Index(cb, "asmk*")
        idx.add(descs, progress=False)
        _, ranks = idx.search([f.descriptors for f in q], k=None)
        res = revisited(np.asarray(ranks), gnd)
        return [100 * res[p]["map"] for p in ("easy", "medium", "hard")]

    att = mean_ap([select_by_attention(f, model, k).descriptors for f in db])
    rng = np.random.default_rng(0)
    rnd = mean_ap([f.descriptors[np.sort(rng.choice(len(f.descriptors), k, replace=False))]
                   if len(f.descriptors) > k else f.descriptors for f in db])
    assert all(a >= m - 0.3 for a, m in zip(att, (85.2, 43.0, 19.7))), att
    assert att[1] >= rnd[1] + 3.0, (att, rnd)
