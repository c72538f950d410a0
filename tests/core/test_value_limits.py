"""The numeric limits of a codebook and of image ids (issue 24): a codebook with NaN or Inf, or with
centroids so large that squared distances overflow float32, is refused at construction and at load
with a ValueError (IndexFileError for a file) naming the problem; image ids lie in [0, 2**62), and the
default ids stop there with a clear error, the index unchanged."""
from __future__ import annotations

import numpy as np
import pytest

import d2r
from d2r.core.codebook import MAX_SQUARED_NORM
from d2r.workflows.synthetic import zipf_images

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import crafted  # noqa: E402


def _centroids(seed=0, n=16, dim=32):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_codebook_is_refused(value):
    c = _centroids()
    c[3, 5] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        d2r.Codebook(c)


@pytest.mark.parametrize("scale", [1e30, 1e19])
def test_overflowing_codebook_is_refused(scale):
    """Scaled by 1e30 the centroids are finite float32 but their squared norms (about 1e61) are not;
    by 1e19 the squared norms (about 3e39) pass float32's maximum too."""
    c = _centroids() * np.float32(scale)
    assert np.isfinite(c).all()
    with pytest.raises(ValueError, match="too large.*overflow float32"):
        d2r.Codebook(c)


def test_largest_allowed_codebook_quantises_finitely():
    """At the limit the quantiser's distances stay finite: the nearest words are those of a float64
    reference."""
    c = _centroids(n=64).astype(np.float64)
    c *= np.sqrt(MAX_SQUARED_NORM * 0.99) / np.linalg.norm(c, axis=1).max()
    cb = d2r.Codebook(c.astype(np.float32))
    x = (c[:8] * 0.999).astype(np.float32)   # descriptors of the same scale, one near each of 8 words
    words, dist = cb.quantize(x)
    ref = np.argmin(((x.astype(np.float64)[:, None, :] - cb.centroids.astype(np.float64)[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(np.asarray(words).reshape(-1), ref)
    assert np.isfinite(np.asarray(dist)).all()
    # the farthest pair too: every distance of the full ranking stays finite
    words, dist = cb.quantize(x, m=64)
    assert np.isfinite(np.asarray(dist)).all()


def test_index_file_with_an_overflowing_codebook_is_refused(tmp_path):
    cb = d2r.Codebook(_centroids(n=32, dim=128))
    idx = d2r.Index(cb, "asmk*")
    idx.add_aggregated(zipf_images(50, 32, 20, 0.3, seed=1, fingerprint=cb.fingerprint))
    idx.save(tmp_path / "ok.d2r")
    meta, sec, version = crafted.read(tmp_path / "ok.d2r")
    sec["centroids"] = sec["centroids"] * np.float32(1e30)
    crafted.write(tmp_path / "bad.d2r", meta, sec, version)   # every checksum valid
    for mmap in (False, True):
        with pytest.raises(d2r.IndexFileError, match="codebook.*too large"):
            d2r.Index.load(tmp_path / "bad.d2r", mmap=mmap)


def test_ids_stop_below_2_62():
    cb = d2r.Codebook(_centroids(n=32, dim=128))
    batch = zipf_images(3, 32, 20, 0.3, seed=2, fingerprint=cb.fingerprint)
    idx = d2r.Index(cb, "asmk*")
    idx.add_aggregated(batch[0], image_ids=[2**62 - 1])   # the largest id
    assert idx.ids.tolist() == [2**62 - 1]
    for ids in ([2**62], [-1], None):   # None: the default id would be 2**62
        with pytest.raises(ValueError, match=r"2\^62|2\*\*62|non-negative"):
            idx.add_aggregated(batch[1], image_ids=ids)
    assert idx.ids.tolist() == [2**62 - 1]
    reg = d2r.RegionalSearchIndex(cb)
    with pytest.raises(ValueError, match=r"2\^62|2\*\*62"):
        reg.add_regions_many([[np.asarray(cb.centroids[:3])]], image_ids=[2**62])
