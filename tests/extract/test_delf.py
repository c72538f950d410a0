"""DELF (d2r.extract.delf): geometry by hand-computed cases, the .datum reader on generated files, and
parity with the official structure built by tf-slim at test time (random weights, converted to the
PyTorch DELF): same feature maps, attention, descriptors and locations. The TensorFlow tests need
`tensorflow` and `tf-slim` (marker `tf`) and skip without them."""
import numpy as np
import pytest

from d2r.extract import delf


def test_receptive_boxes_and_centres_by_hand():
    b = delf.receptive_boxes(2, 3)
    assert b.shape == (6, 4)
    # cell (0, 0): [-145, -145, 145, 145]; cell (1, 2): 32*[1, 2, 1, 2] + bias
    np.testing.assert_array_equal(b[0], [-145, -145, 145, 145])
    np.testing.assert_array_equal(b[5], [32 - 145, 64 - 145, 32 + 145, 64 + 145])
    c = delf.keypoint_centers(b)
    np.testing.assert_array_equal(c, [[0, 0], [0, 32], [0, 64], [32, 0], [32, 32], [32, 64]])
    # at scale 0.5 the boxes (and centres) are divided by the scale: cell (1, 1) -> (64, 64)
    np.testing.assert_array_equal(delf.keypoint_centers(b / np.float32(0.5))[4], [64, 64])


def test_scaled_size_rounds_half_to_even_like_tensorflow():
    assert delf.scaled_size(10, 14, 0.25) == (2, 4)   # 2.5 -> 2, 3.5 -> 4
    assert delf.scaled_size(100, 200, 1.4142) == (141, 283)
    assert delf.scaled_size(7, 9, 2.0) == (14, 18)


def test_datum_roundtrip_and_hand_made_bytes(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    p = tmp_path / "m.datum"
    p.write_bytes(delf.serialize_datum(a))
    np.testing.assert_array_equal(delf.read_datum(p), a)
    u = np.array([[1, 300], [70000, 5]], np.uint32)
    np.testing.assert_array_equal(delf.parse_datum(delf.serialize_datum(u)), u)
    # shape [2] (packed), float_list {value: [1.5, -2.0]} written by hand as protobuf
    raw = bytes([0x0A, 0x01, 0x02, 0x12, 0x0A, 0x0A, 0x08]) + np.array([1.5, -2.0], "<f4").tobytes()
    np.testing.assert_array_equal(delf.parse_datum(raw), [1.5, -2.0])
    with pytest.raises(ValueError):
        delf.parse_datum(raw[:-3])
    with pytest.raises(FileNotFoundError, match="delf_gld_20190411"):
        delf.read_datum(tmp_path / "missing.datum")


def test_postprocess_and_selection():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((5, 8)).astype(np.float32)
    mean = rng.standard_normal(8).astype(np.float32) * 0.1
    mat = np.linalg.qr(rng.standard_normal((8, 8)))[0].astype(np.float32)
    d = delf.postprocess_descriptors(f, mean, mat, 3)
    ref = f / np.linalg.norm(f, axis=1, keepdims=True)
    ref = (ref - mean) @ mat[:3].T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(d, ref, atol=1e-6)
    scores = np.array([1, 5, 5, 3], np.float32)
    _, _, _, s = delf.select_top(np.zeros((4, 4)), np.zeros((4, 2)), np.zeros(4), scores, 3)
    np.testing.assert_array_equal(s, [5, 5, 3])


def test_missing_weights_name_the_official_archive(tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(FileNotFoundError, match="convert-delf"):
        delf.DELF(tmp_path / "nope.npz")


# ---- parity with the official structure (tf-slim) ----------------------------------------------------
def _legacy_layers_alias():
    """TensorFlow >= 2.16 loads tf.layers from `tf_keras.legacy_tf_layers`, which recent tf-keras keeps
    under `tf_keras.src`: alias it so tf-slim builds its layers (test-only shim)."""
    import importlib
    import sys

    try:
        importlib.import_module("tf_keras.legacy_tf_layers.normalization")
    except ImportError:
        try:
            pkg = importlib.import_module("tf_keras.src.legacy_tf_layers")
        except ImportError:
            return
        sys.modules["tf_keras.legacy_tf_layers"] = pkg
        for sub in ("base", "convolutional", "core", "normalization", "pooling"):
            sys.modules[f"tf_keras.legacy_tf_layers.{sub}"] = importlib.import_module(f"tf_keras.src.legacy_tf_layers.{sub}")


def _slim_delf_net(tf, slim, resnet_v1, x):
    """The official structure: tf-slim ResNet-50 v1 blocks 1-3 and the DELF attention head."""
    blocks = [resnet_v1.resnet_v1_block("block1", base_depth=64, num_units=3, stride=2),
              resnet_v1.resnet_v1_block("block2", base_depth=128, num_units=4, stride=2),
              resnet_v1.resnet_v1_block("block3", base_depth=256, num_units=6, stride=2)]
    with slim.arg_scope(resnet_v1.resnet_arg_scope()):
        net, _ = resnet_v1.resnet_v1(x, blocks, num_classes=None, is_training=False, global_pool=False,
                                     scope="resnet_v1_50")
        with tf.compat.v1.variable_scope("attention_block"), slim.arg_scope([slim.batch_norm], is_training=False):
            c1 = slim.conv2d(net, 512, 1, scope="conv1")
            score = slim.conv2d(c1, 1, 1, activation_fn=None, normalizer_fn=None, scope="conv2")
    return net, tf.nn.softplus(score)


def _randomise(tf, sess, seed):
    rng = np.random.default_rng(seed)
    for v in tf.compat.v1.global_variables():  # non-trivial batch-norm statistics
        n = v.name
        shape = v.shape.as_list()
        if n.endswith("moving_mean:0") or n.endswith("beta:0"):
            v.load(rng.normal(0, 0.1, shape).astype(np.float32), sess)
        elif n.endswith("moving_variance:0") or n.endswith("gamma:0"):
            v.load(rng.uniform(0.5, 1.5, shape).astype(np.float32), sess)
        elif n.endswith("conv2/biases:0") and "attention" in n:
            v.load(np.full(shape, 0.5, np.float32), sess)
    return {v.name[:-2]: val for v, val in zip(tf.compat.v1.global_variables(),
                                                sess.run(tf.compat.v1.global_variables()))}


def _tf_slim_model(seed=0, save_prefix=None):
    tf = pytest.importorskip("tensorflow")
    slim = pytest.importorskip("tf_slim")
    _legacy_layers_alias()
    from tf_slim.nets import resnet_v1

    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.random.set_random_seed(seed)  # before any op: the initial weights are reproducible
        img = tf.compat.v1.placeholder(tf.float32, [None, None, 3])
        size = tf.compat.v1.placeholder(tf.int32, [2])
        x = (img - 128.0) / 128.0
        x = tf.compat.v1.image.resize_bilinear(x[None], size, align_corners=False, half_pixel_centers=False)
        net, prob = _slim_delf_net(tf, slim, resnet_v1, x)
        sess = tf.compat.v1.Session(graph=g)
        sess.run(tf.compat.v1.global_variables_initializer())
        variables = _randomise(tf, sess, seed)
        if save_prefix is not None:  # the layout of the official SavedModel's variables
            tf.compat.v1.train.Saver(tf.compat.v1.global_variables()).save(sess, str(save_prefix),
                                                                          write_meta_graph=False)

    def run(image, scale):
        h, w = delf.scaled_size(image.shape[0], image.shape[1], scale)
        f, a = sess.run([net, prob], {img: image.astype(np.float32), size: [h, w]})
        return f[0], a[0, :, :, 0]

    return variables, run


# ---- an independent reference of the official post-processing, in plain numpy (not d2r's code):
# transcribed from tensorflow/models research/delf/delf/python/feature_extractor.py
# (CalculateReceptiveBoxes, CalculateKeypointCenters, PostProcessDescriptors with
# ApplyPcaAndWhitening, use_whitening=False) and the final selection of the max_feature_num highest
# attention scores (tf.image.non_max_suppression with iou_threshold=1.0, which suppresses nothing).
# DELF's configuration: receptive field 291, stride 16 * 2 (the block-3 stride factor), padding 145.
def _official_receptive_boxes(height, width, rf=291.0, stride=32.0, padding=145.0):
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    coordinates = np.reshape(np.stack([y, x], axis=2), [-1, 2])  # [y, x], row-major cells
    point_boxes = np.concatenate([coordinates, coordinates], 1).astype(np.float32)
    bias = np.float32([-padding, -padding, -padding + rf - 1, -padding + rf - 1])
    return np.float32(stride) * point_boxes + bias  # [ymin, xmin, ymax, xmax]


def _official_keypoint_centers(boxes):
    return (boxes[:, :2] + boxes[:, 2:]) / 2.0


def _tf_l2_normalize(x):  # tf.nn.l2_normalize(x, axis=1): x * rsqrt(max(sum(x^2), 1e-12))
    return x / np.sqrt(np.maximum(np.sum(x * x, axis=1, keepdims=True), 1e-12))


def _official_descriptors(features, pca_mean, pca_matrix, pca_dim):
    d = _tf_l2_normalize(np.asarray(features, np.float64))
    d = (pca_matrix[:pca_dim].astype(np.float64) @ (d - pca_mean.astype(np.float64)).T).T
    return _tf_l2_normalize(d)


def _official_cells(maps, scales, threshold, max_features):
    """maps: {scale: (feature map (h, w, 1024), attention (h, w))}. Returns (locations (y, x),
    block-3 features, attention scores) of the selected cells, best score first."""
    locs, feats, att = [], [], []
    for s in scales:
        f, a = maps[s]
        boxes = _official_receptive_boxes(*a.shape) / np.float32(s)
        for i, score in enumerate(a.ravel()):
            if score >= threshold:
                locs.append(_official_keypoint_centers(boxes[i:i + 1])[0])
                feats.append(f.reshape(-1, f.shape[-1])[i])
                att.append(score)
    best = sorted(range(len(att)), key=lambda j: -att[j])[:max_features]
    return (np.array([locs[j] for j in best]), np.array([feats[j] for j in best]),
            np.array([att[j] for j in best]))


def test_official_reference_helpers_by_hand():
    b = _official_receptive_boxes(2, 3)
    np.testing.assert_array_equal(b[0], [-145, -145, 145, 145])
    np.testing.assert_array_equal(b[5], [32 - 145, 64 - 145, 32 + 145, 64 + 145])
    np.testing.assert_array_equal(_official_keypoint_centers(b)[[1, 3]], [[0, 32], [32, 0]])
    f = np.array([[3.0, 4.0], [0.0, 2.0]])
    np.testing.assert_allclose(_official_descriptors(f, np.zeros(2), np.eye(2), 2), [[0.6, 0.8], [0, 1]])
    maps = {1.0: (np.arange(8.0).reshape(2, 2, 2), np.array([[0.1, 0.9], [0.5, 0.3]]))}
    loc, feat, att = _official_cells(maps, (1.0,), 0.2, 2)
    np.testing.assert_array_equal(att, [0.9, 0.5])
    np.testing.assert_array_equal(loc, [[0, 32], [32, 0]])
    np.testing.assert_array_equal(feat, [[2, 3], [4, 5]])


@pytest.mark.tf
def test_pytorch_delf_equals_tf_slim_structure():
    pytest.importorskip("torch")
    variables, run_tf = _tf_slim_model()
    state = delf.convert_tf_variables(variables)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (97, 131, 3)).astype(np.uint8)
    scales = (0.7071, 1.0, 1.4142)
    # feature maps and attention, per scale
    ext = delf.DELF(state=state, scales=scales, device="cpu", score_threshold=0.0, max_features=10_000)
    maps_tf = {s: run_tf(image, s) for s in scales}
    for s in scales:
        f_pt, a_pt = ext.feature_maps(image, s)
        f_tf, a_tf = maps_tf[s]
        assert f_pt.shape == f_tf.shape
        np.testing.assert_allclose(f_pt, f_tf, rtol=1e-4, atol=1e-4 * np.abs(f_tf).max())
        np.testing.assert_allclose(a_pt, a_tf, rtol=1e-4, atol=1e-5)
    # the whole extraction: threshold at the median attention, PCA to 32, a cap k between two clearly
    # different scores (cells of a saturated head tie, and tied cells may be listed in either order)
    thr = float(np.median(np.concatenate([maps_tf[s][1].ravel() for s in scales])))
    mean = rng.normal(0, 0.01, 1024).astype(np.float32)
    mat = np.linalg.qr(rng.standard_normal((1024, 64)))[0].T.astype(np.float32)
    pca = {"mean": mean, "matrix": mat}
    srt = np.sort(np.concatenate([maps_tf[s][1].ravel() for s in scales]))[::-1]
    srt = srt[srt >= thr]
    gaps = [k for k in range(5, srt.size) if srt[k - 1] - srt[k] > 1e-3 * abs(srt[k - 1]) + 1e-5]
    assert gaps, "no clear gap in the attention scores"
    cap = gaps[len(gaps) // 2]
    ext = delf.DELF(state=state, pca=pca, pca_dim=32, scales=scales, device="cpu", score_threshold=thr,
                    max_features=cap)
    got = ext(image)
    # the reference: TensorFlow's maps through the plain-numpy transcription of the official code
    ref_loc, f, a = _official_cells(maps_tf, scales, thr, cap)
    ref = _official_descriptors(f, mean, mat, 32)
    assert got.descriptors.shape == (cap, 32)
    o1, o2 = np.lexsort(got.locations.T[::-1]), np.lexsort(ref_loc.T[::-1])
    np.testing.assert_allclose(got.locations[o1], ref_loc[o2], atol=1e-3)
    np.testing.assert_allclose(got.descriptors[o1], ref[o2], atol=1e-4)
    np.testing.assert_allclose(np.sort(got.scores), np.sort(a), rtol=1e-4, atol=1e-5)


@pytest.mark.tf
def test_tf_resize_bilinear_matches_tensorflow():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(2)
    img = rng.standard_normal((13, 17, 3)).astype(np.float32)
    for h, w in ((3, 4), (9, 24), (26, 34), (13, 17)):
        ref = tf.compat.v1.image.resize_bilinear(img[None], [h, w], align_corners=False,
                                                 half_pixel_centers=False).numpy()[0]
        got = delf.tf_resize_bilinear(torch.as_tensor(img).permute(2, 0, 1), h, w).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.tf
def test_convert_delf_cli_then_pytorch_delf_equals_tf(tmp_path):
    pytest.importorskip("torch")
    from d2r import cli

    model_dir = tmp_path / "delf_gld_20190411"
    (model_dir / "model" / "variables").mkdir(parents=True)
    (model_dir / "pca").mkdir()
    variables, run_tf = _tf_slim_model(seed=3, save_prefix=model_dir / "model" / "variables" / "variables")
    rng = np.random.default_rng(4)
    mean = rng.normal(0, 0.01, 1024).astype(np.float32)
    mat = np.linalg.qr(rng.standard_normal((1024, 256)))[0].T.astype(np.float32)
    (model_dir / "pca" / "mean.datum").write_bytes(delf.serialize_datum(mean))
    (model_dir / "pca" / "pca_proj_mat.datum").write_bytes(delf.serialize_datum(mat))
    out = tmp_path / "delf.npz"
    assert cli.main(["convert-delf", str(model_dir), str(out)]) == 0
    image = rng.integers(0, 256, (80, 112, 3)).astype(np.uint8)
    f_tf, a_tf = run_tf(image, 1.0)
    thr = float(np.median(a_tf))
    ext = delf.DELF(out, scales=(1.0,), device="cpu", score_threshold=thr, max_features=1000)
    got = ext(image)
    ref_loc, f, _ = _official_cells({1.0: (f_tf, a_tf)}, (1.0,), thr, 1000)
    assert len(ref_loc) < 1000
    # every cell above the threshold is kept (no cap reached): compare in location order, since cells
    # with equal attention (a saturated head) may be listed in either order
    ref_desc = _official_descriptors(f, mean, mat, 128)
    o1, o2 = np.lexsort(got.locations.T[::-1]), np.lexsort(ref_loc.T[::-1])
    np.testing.assert_allclose(got.locations[o1], ref_loc[o2], atol=1e-3)
    np.testing.assert_allclose(got.descriptors[o1], ref_desc[o2], atol=1e-4)
    assert got.descriptors.shape[1] == 128
    # a folder that is not the official archive: one line, exit status 2
    assert cli.main(["convert-delf", str(tmp_path / "nothing"), str(out)]) == 2


@pytest.mark.tf
def test_convert_codebook_cli(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from d2r import cli

    rng = np.random.default_rng(5)
    c = rng.standard_normal((64, 128)).astype(np.float32)
    g = tf.Graph()
    with g.as_default():
        v = tf.compat.v1.get_variable("clusters", initializer=c)
        sess = tf.compat.v1.Session(graph=g)
        sess.run(v.initializer)
        tf.compat.v1.train.Saver([v]).save(sess, str(tmp_path / "k65536" / "codebook"), write_meta_graph=False)
    out = tmp_path / "cb.npy"
    assert cli.main(["convert-codebook", str(tmp_path / "k65536"), str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), c)
    import d2r

    assert d2r.Codebook.load(out).n_words == 64
    assert cli.main(["convert-codebook", str(tmp_path / "absent"), str(out)]) == 2


def test_load_image_rgb_forms(tmp_path):
    from d2r.extract import load_image_rgb

    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(load_image_rgb(g)[:, :, 1], g)
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert load_image_rgb(rgba).shape == (2, 2, 3)
    with pytest.raises(TypeError, match="uint8"):
        load_image_rgb(g.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_image_rgb(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(TypeError):
        load_image_rgb(3.5)


@pytest.mark.tf
def test_delftf_runs_a_savedmodel_with_the_official_tensor_names_like_delf(tmp_path):
    """A SavedModel with the official contract (one pyramid level here), built from the tf-slim structure:
    DelfTF's output equals the PyTorch DELF's on the converted weights."""
    pytest.importorskip("torch")
    tf = pytest.importorskip("tensorflow")
    slim = pytest.importorskip("tf_slim")
    _legacy_layers_alias()
    from tf_slim.nets import resnet_v1

    root = tmp_path / "delf_gld_20190411"
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.random.set_random_seed(7)
        img = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
        thr = tf.compat.v1.placeholder(tf.float32, [], name="input_abs_thres")
        scales = tf.compat.v1.placeholder(tf.float32, [None], name="input_scales")
        maxn = tf.compat.v1.placeholder(tf.int32, [], name="input_max_feature_num")
        s = scales[0]
        hw = tf.cast(tf.round(tf.cast(tf.shape(img)[:2], tf.float32) * s), tf.int32)
        x = (tf.cast(img, tf.float32) - 128.0) / 128.0
        x = tf.compat.v1.image.resize_bilinear(x[None], hw, align_corners=False, half_pixel_centers=False)
        net, prob = _slim_delf_net(tf, slim, resnet_v1, x)
        h, w = tf.shape(prob)[1], tf.shape(prob)[2]
        yy, xx = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
        pts = tf.cast(tf.reshape(tf.stack([yy, xx], 2), [-1, 2]), tf.float32)
        boxes = (32.0 * tf.concat([pts, pts], 1) + tf.constant([-145.0, -145.0, 145.0, 145.0])) / s
        att = tf.reshape(prob, [-1])
        idx = tf.reshape(tf.where(att >= thr), [-1])
        b, f, a = tf.gather(boxes, idx), tf.gather(tf.reshape(net, [-1, 1024]), idx), tf.gather(att, idx)
        top = tf.nn.top_k(a, tf.minimum(maxn, tf.size(a)), sorted=True)
        # the official output names
        tf.identity(tf.gather(b, top.indices), name="boxes")
        tf.identity(tf.gather(f, top.indices), name="features")
        tf.identity(tf.fill([tf.size(top.values)], s), name="scales")
        tf.identity(top.values[:, None], name="scores")
        sess = tf.compat.v1.Session(graph=g)
        sess.run(tf.compat.v1.global_variables_initializer())
        variables = _randomise(tf, sess, 7)
        builder = tf.compat.v1.saved_model.Builder(str(root / "model"))
        builder.add_meta_graph_and_variables(sess, [tf.compat.v1.saved_model.tag_constants.SERVING])
        builder.save()
    rng = np.random.default_rng(8)
    mean = rng.normal(0, 0.01, 1024).astype(np.float32)
    mat = np.linalg.qr(rng.standard_normal((1024, 128)))[0].T.astype(np.float32)
    (root / "pca").mkdir()
    (root / "pca" / "mean.datum").write_bytes(delf.serialize_datum(mean))
    (root / "pca" / "pca_proj_mat.datum").write_bytes(delf.serialize_datum(mat))
    image = rng.integers(0, 256, (90, 120, 3)).astype(np.uint8)
    probe = delf.DelfTF(root, scales=(1.0,), score_threshold=0.0, max_features=10_000)
    thr_v = float(np.median(probe.raw(image)[3]))
    tf_ext = delf.DelfTF(root, scales=(1.0,), score_threshold=thr_v, max_features=1000)
    pt_ext = delf.DELF(state=delf.convert_tf_variables(variables), pca={"mean": mean, "matrix": mat},
                       scales=(1.0,), score_threshold=thr_v, max_features=1000, device="cpu")
    a, b = tf_ext(image), pt_ext(image)
    assert a.descriptors.shape == b.descriptors.shape and a.descriptors.shape[1] == 128
    o1, o2 = np.lexsort(a.locations.T[::-1]), np.lexsort(b.locations.T[::-1])
    np.testing.assert_allclose(a.locations[o1], b.locations[o2], atol=1e-3)
    np.testing.assert_allclose(a.descriptors[o1], b.descriptors[o2], atol=1e-4)
    with pytest.raises(FileNotFoundError, match="delf_gld_20190411"):
        delf.DelfTF(tmp_path / "empty")


@pytest.mark.tf
def test_cli_extract_with_delf(tmp_path):
    """`d2r extract --delf WEIGHTS` stores DELF features (converted tf-slim weights, low threshold)."""
    pytest.importorskip("torch")
    from d2r import cli
    from d2r.extract.store import load_features

    variables, _ = _tf_slim_model(seed=9)
    w = tmp_path / "delf.npz"
    delf.save_weights(w, delf.convert_tf_variables(variables))
    img = np.random.default_rng(3).integers(0, 256, (70, 90, 3)).astype(np.uint8)
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "a.png"), img[:, :, ::-1])
    out = tmp_path / "f.npz"
    assert cli.main(["extract", str(tmp_path / "a.png"), "--out", str(out), "--delf", str(w), "--max-features", "7"]) == 0
    names, feats = load_features(out)
    assert len(feats) == 1 and feats[0].descriptors.shape[1] == 1024 and len(feats[0].descriptors) <= 7
    assert cli.main(["extract", str(tmp_path / "a.png"), "--out", str(out), "--delf", str(tmp_path / "no.npz")]) == 2


@pytest.mark.tf
def test_delf_in_worker_processes_equals_serial():
    pytest.importorskip("torch")
    from d2r.extract import extract_many

    variables, _ = _tf_slim_model(seed=11)
    ext = delf.DELF(state=delf.convert_tf_variables(variables), scales=(0.7071, 1.0), score_threshold=0.0,
                    max_features=30, device="cpu")
    rng = np.random.default_rng(12)
    images = [rng.integers(0, 256, (60 + 7 * i, 80, 3)).astype(np.uint8) for i in range(3)]
    serial = extract_many(ext, images, workers=1, progress=False)
    parallel = extract_many(ext, images, workers=2, progress=False)
    for a, b in zip(serial, parallel):
        np.testing.assert_allclose(a.descriptors, b.descriptors, atol=1e-5)
        np.testing.assert_allclose(a.locations, b.locations, atol=1e-4)


@pytest.mark.torch
def test_device_resident_path_equals_the_numpy_path():
    """DELF.extract_device (selection, centres, L2, PCA as torch ops on the extractor's device: the
    issue-14 device-resident query path) gives the features of DELF.__call__ (numpy selection), here
    on the CPU; randomly initialised weights, every cell kept (threshold 0) then the 40 best."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    net = delf._build_net()
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(4)
    pca = {"mean": rng.normal(size=1024).astype(np.float32) * 0.01,
           "matrix": rng.normal(size=(64, 1024)).astype(np.float32)}
    for p, dim in ((pca, 32), (None, 1024)):
        ext = delf.DELF(state=state, pca=p, pca_dim=dim, scales=(0.7071, 1.0, 1.4142), score_threshold=0.0,
                        max_features=40, device="cpu")
        img = rng.integers(0, 256, (97, 130, 3)).astype(np.uint8)
        ref = ext(img)
        got = ext.extract_device(torch.as_tensor(img))
        assert got["descriptors"].shape == (40, dim) and got["descriptors"].device.type == "cpu"
        np.testing.assert_allclose(got["scores"].numpy(), ref.scores, rtol=1e-6)
        np.testing.assert_array_equal(got["scales"].numpy(), ref.scales)
        np.testing.assert_allclose(got["locations"].numpy(), ref.locations, atol=1e-4)
        np.testing.assert_allclose(got["descriptors"].numpy(), ref.descriptors, atol=1e-5)
        small = ext.extract_device(torch.zeros((8, 8, 3), dtype=torch.uint8))
        assert small["descriptors"].shape == (0, dim)
    with pytest.raises(ValueError, match="H x W x 3"):
        ext.extract_device(torch.zeros((8, 8), dtype=torch.uint8))
    # several images: those of one size share each level's forward pass; each equals its own call
    imgs = [rng.integers(0, 256, shape).astype(np.uint8) for shape in ((90, 120, 3), (90, 120, 3), (70, 100, 3),
                                                                       (90, 120, 3), (8, 8, 3))]
    many = ext.extract_device_many([torch.as_tensor(im) for im in imgs])
    for im, got in zip(imgs, many):
        ref = ext(im)
        assert got["descriptors"].shape == ref.descriptors.shape
        np.testing.assert_allclose(got["scores"].numpy(), ref.scores, rtol=1e-5)
        np.testing.assert_allclose(got["locations"].numpy(), ref.locations, atol=1e-4)
        np.testing.assert_allclose(got["descriptors"].numpy(), ref.descriptors, atol=1e-5)
