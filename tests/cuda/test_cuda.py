"""The CUDA path against the CPU path: identical word assignments, bit-identical aggregated codes,
identical scores and rankings; the clear errors where no GPU is available.

Tests marked `gpu` run only where d2r.cuda.is_available() (the device check script runs them with
`pytest -m gpu`); the others run everywhere, CI included."""
import os

import numpy as np
import pytest

import d2r
from d2r import cuda
from d2r.core.aggregate import aggregate_images, aggregate_regions_batch

# Tests marked gpu run on the real GPU or on the CPU stand-in (tests/cuda/conftest.py).
needs_gpu = pytest.mark.gpu


def _device_array_libs():
    """(name, module) of torch and CuPy where they are installed and can make arrays on a CUDA device
    (a CPU-only torch build, or either library on a machine without a GPU, is left out)."""
    for mod in ("torch", "cupy"):
        try:
            lib = __import__(mod)
            usable = lib.cuda.is_available() if mod == "torch" else lib.cuda.runtime.getDeviceCount() > 0
        except Exception:   # noqa: BLE001 - not installed, or no driver / device
            continue
        if usable:
            yield mod, lib


def _rng(seed=0):
    return np.random.default_rng(seed)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _images(rng, n_img, dim=128, lo=20, hi=300, centers=None):
    out = []
    for _ in range(n_img):
        n = int(rng.integers(lo, hi))
        if centers is not None:
            c = centers[rng.integers(0, centers.shape[0], n)]
            out.append(_unit(c + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)))
        else:
            out.append(_unit(rng.standard_normal((n, dim)).astype(np.float32)))
    return out


# ---- everywhere ---------------------------------------------------------------------------------------
def test_availability_is_consistent():
    assert cuda.is_available() == (cuda.is_compiled() and cuda.device_count() > 0)
    assert d2r.build_info()["cuda"] == cuda.is_compiled()


@pytest.mark.skipif(cuda.is_available(), reason="checks the no-GPU errors")
def test_gpu_entry_points_raise_a_clear_error_without_a_gpu():
    cb = d2r.Codebook(_unit(_rng().standard_normal((32, 8)).astype(np.float32)))
    x = _unit(_rng(1).standard_normal((10, 8)).astype(np.float32))
    for call in (lambda: d2r.Index(cb, device="cuda"),
                 lambda: cb.quantize(x, device="cuda"),
                 lambda: d2r.Codebook.train(x, 4, device="cuda"),
                 lambda: cuda.kmeans(x, 4),
                 lambda: cuda.aggregate_images(cb, x, [0, 10]),
                 lambda: d2r.Index(cb).to("cuda")):
        with pytest.raises(cuda.CudaUnavailableError, match="CUDA"):
            call()
    # the CPU path is untouched
    idx = d2r.Index(cb)
    idx.add(x)
    assert len(idx) == 1


def test_device_argument_is_validated():
    cb = d2r.Codebook(_unit(_rng().standard_normal((32, 8)).astype(np.float32)))
    with pytest.raises(ValueError, match="device"):
        d2r.Index(cb, device="gpu")
    with pytest.raises(ValueError, match="device"):
        cb.quantize(np.zeros((1, 8), np.float32), device="tpu")
    with pytest.raises(ValueError, match="CPU"):
        d2r.RegionalSearchIndex(cb).to("cuda")


def test_cpu_scores_are_order_independent_fixed_point_sums():
    # Two images with the same words and codes (in different insertion positions) score exactly the
    # same and rank by id: the fixed-point sums the GPU path shares.
    rng = _rng(3)
    cb = d2r.Codebook(_unit(rng.standard_normal((64, 16)).astype(np.float32)))
    img = _unit(rng.standard_normal((50, 16)).astype(np.float32))
    other = _images(rng, 5, 16, 10, 40)
    idx = d2r.Index(cb)
    idx.add([other[0], img, other[1], img[::-1].copy(), other[2]], image_ids=[10, 7, 11, 3, 12])
    s, i = idx.search(img, k=None)
    pos = {int(a): b for b, a in enumerate(i)}
    assert s[pos[7]] == s[pos[3]] and pos[3] < pos[7]


# ---- on a GPU ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def realmix():
    """(db descriptors list, query descriptors list, codebook centroids) of real photos: from the file
    the device check carries ($D2R_DEVICE_DATA) or from ../shared/data."""
    path = os.environ.get("D2R_DEVICE_DATA")
    if path and os.path.exists(path):
        z = np.load(path)
        from d2r.extract.rootsift import rootsift_from_sift

        def split(prefix):
            x = rootsift_from_sift(z[prefix + "_sift"].astype(np.float32))
            o = z[prefix + "_offsets"]
            return [x[o[i]:o[i + 1]] for i in range(len(o) - 1)]

        return split("db"), split("q"), z["codebook"]
    from d2r.datasets.realmix import find_realmix, realmix_rootsift

    if find_realmix() is None:
        pytest.skip("no realmix data ($D2R_DEVICE_DATA or ../shared/data/realmix)")
    pytest.importorskip("cv2")
    feats = realmix_rootsift(max_features=1000, progress=False, as_arrays=True)
    sample = np.vstack(feats["query"][20:])
    cbk = d2r.Codebook.train(sample, 1024, niter=8, seed=0)
    return feats["db"][:150], feats["query"][:20], cbk.centroids


def _assert_same_quantization(cb, x, m):
    ids_c, d_c = cb.quantize(x, m)
    ids_g, d_g = cb.quantize(x, m, device="cuda")
    bad = np.nonzero((ids_c != ids_g).any(axis=1))[0]
    assert bad.size == 0, f"{bad.size} rows differ, first {bad[:5]}: cpu {ids_c[bad[:3]]} gpu {ids_g[bad[:3]]}"
    np.testing.assert_allclose(d_g, d_c, rtol=1e-6, atol=1e-6)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("k,dim,m", [(4096, 128, 1), (4096, 128, 3), (1000, 96, 10), (65536, 128, 1),
                                     (300, 12, 2), (37, 128, 20)])
def test_gpu_quantize_equals_cpu_random(k, dim, m):
    rng = _rng(k + m)
    cb = d2r.Codebook(_unit(rng.standard_normal((k, dim)).astype(np.float32)))
    n = 2000 if k < 65536 else 700
    _assert_same_quantization(cb, _unit(rng.standard_normal((n, dim)).astype(np.float32)), m)


@needs_gpu
@pytest.mark.gpu
def test_gpu_quantize_ties_and_near_ties():
    rng = _rng(5)
    c = _unit(rng.standard_normal((512, 32)).astype(np.float32))
    c[100] = c[7]  # exact duplicates: the lower id wins on both paths
    c[300] = c[7]
    x = np.vstack([c[7] + 1e-4 * rng.standard_normal((50, 32)), (c[1] + c[2]) / 2, (c[3] + c[4]) / 2,
                   c[:100]]).astype(np.float32)
    cb = d2r.Codebook(c)
    _assert_same_quantization(cb, x, 1)
    _assert_same_quantization(cb, x, 4)
    ids, _ = cb.quantize(c[7:8], 3, device="cuda")
    assert list(ids[0]) == [7, 100, 300]


@needs_gpu
@pytest.mark.gpu
def test_gpu_quantize_realmix(realmix):
    db, q, centroids = realmix
    cb = d2r.Codebook(centroids)
    x = np.vstack(db[:40] + q)
    _assert_same_quantization(cb, x, 1)
    _assert_same_quantization(cb, x, 3)


def _assert_same_batch(a, b):
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.words, b.words)
    if a.codes.dtype == np.uint8:
        np.testing.assert_array_equal(a.codes, b.codes)
    else:
        np.testing.assert_allclose(a.codes, b.codes, rtol=0, atol=1e-6)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["asmk*", "asmk"])
@pytest.mark.parametrize("m", [1, 3])
def test_gpu_aggregate_images_equals_cpu(kernel, m):
    rng = _rng(11)
    centers = _unit(rng.standard_normal((64, 128)).astype(np.float32))
    cb = d2r.Codebook(centers[:48] + 0.01)
    imgs = _images(rng, 40, 128, 0, 200, centers)
    x = np.vstack(imgs)
    offs = np.cumsum([0] + [len(a) for a in imgs]).astype(np.int64)
    cpu = aggregate_images(cb, x, offs, kernel, m)
    gpu = cuda.aggregate_images(cb, x, offs, kernel, m)
    _assert_same_batch(cpu, gpu)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["rasmk*", "rasmk"])
def test_gpu_regional_aggregation_equals_cpu(kernel):
    rng = _rng(12)
    cb = d2r.Codebook(_unit(rng.standard_normal((256, 128)).astype(np.float32)))
    regions = []
    for i in range(25):
        n = int(rng.integers(30, 200))
        x = _unit(rng.standard_normal((n, 128)).astype(np.float32))
        R = int(rng.integers(1, 5))
        members, offs = [np.arange(n)], [0, n]
        for _ in range(R - 1):  # overlapping boxes
            sel = np.sort(rng.choice(n, int(rng.integers(0, n)), replace=False))
            members.append(sel)
            offs.append(offs[-1] + sel.size)
        regions.append(d2r.Regions(x, np.array(offs, np.int64), np.concatenate(members).astype(np.int64)))
    cpu = aggregate_regions_batch(cb, regions, kernel, 1)
    # the same layout for the GPU call
    xs = np.vstack([r.descriptors for r in regions])
    base = np.cumsum([0] + [r.descriptors.shape[0] for r in regions])
    image_regions = np.cumsum([0] + [r.n_regions for r in regions]).astype(np.int64)
    sizes = np.concatenate([np.diff(r.offsets) for r in regions])
    region_members = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    members = np.concatenate([r.members + b for r, b in zip(regions, base[:-1])]).astype(np.int64)
    gpu = cuda.aggregate(cb, xs, image_regions, region_members, members, kernel, 1)
    _assert_same_batch(cpu, gpu)


def _pair(cb, kernel, normalize=True, m=1):
    return (d2r.Index(cb, kernel=kernel, normalize=normalize, m_db=m, m_query=m),
            d2r.Index(cb, kernel=kernel, normalize=normalize, m_db=m, m_query=m, device="cuda"))


def _assert_same_search(cpu, gpu, queries, k):
    s_c, i_c = cpu.search(queries, k=k)
    s_g, i_g = gpu.search(queries, k=k)
    np.testing.assert_array_equal(s_c, s_g)
    np.testing.assert_array_equal(i_c, i_g)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kernel,normalize,m", [("asmk*", True, 1), ("asmk*", False, 2), ("asmk", True, 1)])
def test_gpu_index_equals_cpu(kernel, normalize, m):
    rng = _rng(21)
    centers = _unit(rng.standard_normal((200, 128)).astype(np.float32))
    cb = d2r.Codebook(_unit(centers[:160] + 0.05 * rng.standard_normal((160, 128)).astype(np.float32)))
    imgs = _images(rng, 300, 128, 0, 150, centers)
    cpu, gpu = _pair(cb, kernel, normalize, m)
    ids = rng.permutation(10_000)[:300]
    for lo, hi in ((0, 100), (100, 101), (101, 180), (180, 300)):  # several parts, merged on the way
        cpu.add(imgs[lo:hi], image_ids=ids[lo:hi])
        gpu.add(imgs[lo:hi], image_ids=ids[lo:hi])
    queries = _images(rng, 12, 128, 0, 200, centers) + [imgs[5], imgs[5]]
    for k in (1, 10, 100, 300, None):
        _assert_same_search(cpu, gpu, queries, k)
    np.testing.assert_array_equal(cpu.score_all(queries)[0], gpu.score_all(queries)[0])
    np.testing.assert_array_equal(cpu.ids, gpu.ids)
    # removal, then the same results again
    gone = ids[[3, 50, 299]]
    assert cpu.remove(gone) == gpu.remove(gone) == 3
    _assert_same_search(cpu, gpu, queries, 25)
    # moving back to the CPU and saving keep the content
    back = d2r.Index(cb, kernel=kernel, normalize=normalize, m_db=m, m_query=m, device="cuda")
    back.add(imgs[:50], image_ids=ids[:50])
    s1 = back.search(queries, k=20)
    back.to("cpu")
    s2 = back.search(queries, k=20)
    np.testing.assert_array_equal(s1[0], s2[0])
    np.testing.assert_array_equal(s1[1], s2[1])


@needs_gpu
@pytest.mark.gpu
def test_gpu_index_save_load_roundtrip(tmp_path):
    rng = _rng(22)
    cb = d2r.Codebook(_unit(rng.standard_normal((128, 128)).astype(np.float32)))
    imgs = _images(rng, 60)
    gpu = d2r.Index(cb, device="cuda")
    gpu.add(imgs)
    gpu.save(tmp_path / "i.d2r")
    cpu = d2r.Index.load(tmp_path / "i.d2r")
    again = d2r.Index.load(tmp_path / "i.d2r", device="cuda")
    q = imgs[:5]
    for other in (cpu, again):
        a, b = gpu.search(q, k=30), other.search(q, k=30)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@needs_gpu
@pytest.mark.gpu
def test_gpu_index_realmix_rankings_equal_cpu(realmix):
    db, q, centroids = realmix
    cb = d2r.Codebook(centroids)
    for kernel in ("asmk*", "asmk"):
        cpu, gpu = _pair(cb, kernel)
        cpu.add(db)
        gpu.add(db)
        _assert_same_search(cpu, gpu, q, None)
        _assert_same_search(cpu, gpu, q, 50)


@needs_gpu
@pytest.mark.gpu
def test_gpu_inputs_from_torch_and_cupy_without_copies():
    rng = _rng(31)
    cb = d2r.Codebook(_unit(rng.standard_normal((256, 128)).astype(np.float32)))
    x = _unit(rng.standard_normal((500, 128)).astype(np.float32))
    ref = cb.quantize(x, 2)
    for mod, lib in _device_array_libs():
        xd = lib.as_tensor(x, device="cuda") if mod == "torch" else lib.asarray(x)
        ids, d = cb.quantize(xd, 2, device="cuda", output="device")
        assert type(ids).__module__.split(".")[0] == mod
        got = ids.cpu().numpy() if mod == "torch" else ids.get()
        np.testing.assert_array_equal(got, ref[0])
        # a non-contiguous view is made contiguous on the device, not refused
        ids2, _ = cb.quantize(xd[::2], 2, device="cuda")
        np.testing.assert_array_equal(ids2, ref[0][::2])
        # NaN on the device is refused
        bad = xd.clone() if mod == "torch" else xd.copy()
        bad[3, 4] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            cb.quantize(bad, 1, device="cuda")
        idx = d2r.Index(cb, device="cuda")
        idx.add(xd, offsets=np.array([0, 100, 300, 500]))
        cpu = d2r.Index(cb)
        cpu.add(x, offsets=np.array([0, 100, 300, 500]))
        a, b = idx.search(xd[100:300], k=3), cpu.search(x[100:300], k=3)
        np.testing.assert_array_equal(a[1], b[1])


@needs_gpu
@pytest.mark.gpu
def test_gpu_kmeans_is_deterministic_and_descends():
    rng = _rng(41)
    centers = _unit(rng.standard_normal((64, 32)).astype(np.float32))
    x = _unit(centers[rng.integers(0, 64, 20000)] + 0.2 * rng.standard_normal((20000, 32)).astype(np.float32))
    c1, o1 = cuda.kmeans(x, 64, niter=10, seed=3)
    c2, o2 = cuda.kmeans(x, 64, niter=10, seed=3)
    np.testing.assert_array_equal(c1, c2)
    assert o1 == o2
    assert o1[-1] < o1[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(o1, o1[1:]))
    cb = d2r.Codebook.train(x, 64, niter=10, seed=3, device="cuda", max_points_per_centroid=1000)
    np.testing.assert_array_equal(cb.centroids, c1)
    # most true centres have a learned centroid in their direction
    d = ((centers[:, None, :] - _unit(c1)[None]) ** 2).sum(-1).min(1)
    assert np.median(d) < 0.01


def _ivf_batch(rng, n_img, n_words=64, dim=128, binary=True, lo=0, hi=20, scale=1.0):
    """A random aggregated batch for the inverted file: (offsets int64, words int32, codes): per image
    distinct ascending words; codes packed bits (binary) or unit float32 vectors times `scale`."""
    counts = rng.integers(lo, hi + 1, n_img)
    words = [np.sort(rng.choice(n_words, int(c), replace=False)) for c in counts]
    offs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    w = np.concatenate(words).astype(np.int32) if n_img else np.zeros(0, np.int32)
    e = int(offs[-1])
    if binary:
        codes = rng.integers(0, 256, (e, (dim + 7) // 8)).astype(np.uint8)
    else:
        codes = _unit(rng.standard_normal((e, dim)).astype(np.float32)) * np.float32(scale) if e else \
            np.zeros((0, dim), np.float32)
    return offs, w, codes


def _ivf_state(f, q):
    """Everything observable of a GPU inverted file (q: a query batch)."""
    ex = f.export()
    s, i = f.search(*q, -1, 3.0, 0.0, True)
    s5, i5 = f.search(*q, 5, 3.0, 0.0, True)
    sa, ida = f.score_all(*q, 3.0, 0.0, True)
    return {"export": ex, "search": (s, i, s5, i5), "score_all": (sa, ida), "n_images": f.n_images,
            "n_entries": f.n_entries, "next_id": f.next_id, "ids": f.image_ids(), "counts": f.word_counts(),
            "n_parts": f.n_parts, "memory": f.memory_bytes,
            "contains": [f.contains(int(x)) for x in list(f.image_ids()[:5]) + [10**9]]}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for kk in x:
                np.testing.assert_array_equal(np.asarray(x[kk]), np.asarray(y[kk]), err_msg=f"{key}[{kk}]")
        elif isinstance(x, tuple):
            for u, v in zip(x, y):
                np.testing.assert_array_equal(u, v, err_msg=key)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=key)


# ---- the GPU inverted file's boundary, checked before any device call (runs everywhere) ------------------
def test_ivf_boundary_check_batch_accepts_and_normalises():
    rng = _rng(70)
    off, w, c = _ivf_batch(rng, 4)
    o2, w2, c2 = cuda._check_batch(list(off), w.astype(np.int64), c, 64, 16, True)
    assert o2.dtype == np.int64 and w2.dtype == np.int32 and c2.dtype == np.uint8
    np.testing.assert_array_equal(w2, w)
    # float index: float32 (E, dim) codes or their raw bytes (E, 4 * dim)
    off, w, c = _ivf_batch(rng, 3, dim=8, binary=False)
    for codes in (c, c.view(np.uint8)):
        cuda._check_batch(off, w, codes, 64, 32, False)
    # an empty batch
    cuda._check_batch(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros((0, 16), np.uint8), 64, 16, True)


@pytest.mark.parametrize("change,err,match", [
    (lambda o, w, c: (o.astype(np.float64), w, c), TypeError, "integer"),
    (lambda o, w, c: (o[1:], w, c), ValueError, "start at 0"),
    (lambda o, w, c: (np.array([0, 5, 3, o[-1]]), w, c), ValueError, "non-decreasing"),
    (lambda o, w, c: (o, w[:-1], c), ValueError, "words must be 1-D"),
    (lambda o, w, c: (o, w.astype(np.float32), c), TypeError, "integer word ids"),
    (lambda o, w, c: (o, (w + 1000).astype(np.int64), c), ValueError, "out of range"),
    (lambda o, w, c: (o, w, c[:-1]), ValueError, "codes must have shape"),
    (lambda o, w, c: (o, w, c[:, :8]), ValueError, "codes must have shape"),
    (lambda o, w, c: (o, w, c.astype(np.int8)), TypeError, "dtype"),
    (lambda o, w, c: (o, w, c.astype(np.float32)), TypeError, "dtype"),  # a binary index takes packed bits
    (lambda o, w, c: (o, w, c.reshape(-1)), ValueError, "codes must have shape"),
])
def test_ivf_boundary_check_batch_refuses(change, err, match):
    rng = _rng(71)
    off, w, c = _ivf_batch(rng, 3, lo=2, hi=6)
    with pytest.raises(err, match=match):
        cuda._check_batch(*change(off, w, c), 64, 16, True)


def test_ivf_boundary_float_codes_width():
    rng = _rng(72)
    off, w, c = _ivf_batch(rng, 3, dim=8, binary=False, lo=1)
    with pytest.raises(ValueError, match="shape"):
        cuda._check_batch(off, w, c[:, :7], 64, 32, False)
    with pytest.raises(TypeError, match="dtype"):
        cuda._check_batch(off, w, c.astype(np.float64), 64, 32, False)


def test_ivf_boundary_new_ids():
    assert cuda._check_new_ids(None, 3) is None
    ids = cuda._check_new_ids([5, 1, 9], 3)
    assert ids.dtype == np.int64 and list(ids) == [5, 1, 9]
    assert cuda._check_new_ids(np.zeros(0), 0).shape == (0,)
    with pytest.raises(ValueError, match="non-negative"):
        cuda._check_new_ids([1, -2, 3], 3)
    with pytest.raises(ValueError, match="2\\^62"):
        cuda._check_new_ids([1, 2**62], 2)
    with pytest.raises(ValueError, match="duplicate"):
        cuda._check_new_ids([1, 2, 1], 3)
    with pytest.raises(ValueError, match="one image id per image"):
        cuda._check_new_ids([1, 2], 3)
    with pytest.raises(ValueError, match="one image id per image"):
        cuda._check_new_ids([[1, 2, 3]], 3)
    with pytest.raises(TypeError, match="integers"):
        cuda._check_new_ids([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="2\\^62"):
        cuda._check_new_ids(np.array([2**63], np.uint64), 1)


def _content():
    # 3 words, 3 images: word 0 -> slots 0, 2; word 1 -> slot 1; word 2 -> slots 0, 1, 2
    return dict(offsets=np.array([0, 2, 3, 6], np.int64), slots=np.array([0, 2, 1, 0, 1, 2], np.uint32),
                codes=np.arange(6 * 2, dtype=np.uint8).reshape(6, 2), image_ids=np.array([4, 9, 2], np.int64),
                word_counts=np.array([2, 2, 2], np.int32), next_id=10)


def test_ivf_boundary_check_content():
    got = cuda._check_content(**_content(), n_words=3, code_bytes=2, binary=True)
    assert [a.dtype for a in got[:5]] == [np.int64, np.uint32, np.uint8, np.int64, np.int32] and got[5] == 10
    flat = _content()
    flat["codes"] = flat["codes"].reshape(-1)
    assert cuda._check_content(**flat, n_words=3, code_bytes=2, binary=True)[2].shape == (6, 2)
    empty = dict(offsets=np.zeros(4, np.int64), slots=np.zeros(0, np.uint32), codes=np.zeros((0, 2), np.uint8),
                 image_ids=np.zeros(0, np.int64), word_counts=np.zeros(0, np.int32), next_id=0)
    cuda._check_content(**empty, n_words=3, code_bytes=2, binary=True)


@pytest.mark.parametrize("key,value,err,match", [
    ("offsets", np.array([0, 2, 3], np.int64), ValueError, "n_words \\+ 1"),
    ("offsets", np.array([1, 2, 3, 6], np.int64), ValueError, "start at 0"),
    ("offsets", np.array([0, 3, 2, 6], np.int64), ValueError, "non-decreasing"),
    ("slots", np.array([0, 2, 1, 0, 1], np.uint32), ValueError, "slots must be 1-D"),
    ("slots", np.array([0, 3, 1, 0, 1, 2], np.uint32), ValueError, "slot out of range"),
    ("image_ids", np.array([4, 4, 2], np.int64), ValueError, "duplicate"),
    ("image_ids", np.array([4, -1, 2], np.int64), ValueError, "negative"),
    ("image_ids", np.array([4, 9], np.int64), ValueError, "one length"),
    ("word_counts", np.array([2, 2, 1], np.int32), ValueError, "word count"),
    ("next_id", 9, ValueError, "next_id"),
    ("next_id", -1, ValueError, "next_id"),
    ("next_id", 2**62 + 1, ValueError, "next_id"),
    ("image_ids", np.array([4, 2**62, 2], np.int64), ValueError, "2\\^62"),
    ("next_id", 10.0, TypeError, "next_id"),
    ("codes", np.zeros((6, 3), np.uint8), ValueError, "codes must have shape"),
    ("codes", np.zeros((6, 2), np.int16), TypeError, "dtype"),
])
def test_ivf_boundary_check_content_refuses(key, value, err, match):
    c = _content()
    c[key] = value
    with pytest.raises(err, match=match):
        cuda._check_content(**c, n_words=3, code_bytes=2, binary=True)


# ---- the GPU inverted file on a GPU ---------------------------------------------------------------------
def _gpu_ivf(rng, binary=True, n_add=(40, 30, 20, 10), dim=128):
    f = cuda.GpuInvertedFile(64, dim, binary)
    for n in n_add:  # several adds: several parts, merged on the way
        f.add(*_ivf_batch(rng, n, dim=dim, binary=binary))
    return f


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("binary", [True, False])
def test_gpu_ivf_operations_roll_back_on_out_of_memory(binary):
    """Every device allocation of every operation is made to fail in turn: the operation raises
    CudaMemoryError and the index answers exactly as before; then it succeeds."""
    assert issubclass(cuda.CudaMemoryError, MemoryError)
    rng = _rng(80)
    q = _ivf_batch(rng, 6, binary=binary, lo=1)
    new = _ivf_batch(rng, 25, binary=binary)
    more = [_ivf_batch(rng, 7, binary=binary), _ivf_batch(rng, 0, binary=binary), _ivf_batch(rng, 12, binary=binary)]
    seed_f = _gpu_ivf(_rng(81), binary)
    content = seed_f.export()
    ops = {
        "add": lambda f: f.add(*new),
        "add_default_ids": lambda f: f.add(*new, image_ids=None),
        "add_batches": lambda f: f.add_batches([type("B", (), {"offsets": o, "words": w, "codes": c})()
                                                for o, w, c in more]),
        "remove": lambda f: f.remove(f.image_ids()[[0, 3, 41, 99]]),
        "remove_last": lambda f: f.remove(f.image_ids()[-2:]),
        "merge": lambda f: f.merge(),
        "set_content": lambda f: f.set_content(content["offsets"], content["slots"], content["codes"][::-1].copy(),
                                               content["image_ids"] + 1000, content["word_counts"], 5000),
        "search": lambda f: f.search(*q, 10, 3.0, 0.0, True),
        "search_all": lambda f: f.search(*q, -1, 3.0, 0.0, True),
        "score_all": lambda f: f.score_all(*q, 3.0, 0.0, True),
        "export": lambda f: f.export(),
    }
    for name, op in ops.items():
        f = _gpu_ivf(_rng(81), binary)
        before = _ivf_state(f, q)
        failures = 0
        for n in range(1, 200):
            f._fail_after_allocations(n)
            try:
                op(f)
            except cuda.CudaMemoryError as exc:
                assert "injected" in str(exc)
                failures += 1
                _assert_same_state(_ivf_state(f, q), before)
                continue
            break
        else:
            pytest.fail(f"{name}: still failing after 200 allocations")
        if name == "export":  # downloads only: nothing to fail
            assert failures == 0
        else:
            assert failures >= 1, f"{name} allocated nothing on the device"
        # the hook is spent: later operations allocate normally
        _ivf_state(f, q)


@needs_gpu
@pytest.mark.gpu
def test_gpu_ivf_boundary_refuses_bad_input_and_keeps_the_index():
    rng = _rng(82)
    f = _gpu_ivf(rng, True, (30,))
    q = _ivf_batch(rng, 3, lo=1)
    before = _ivf_state(f, q)
    off, w, c = _ivf_batch(rng, 4, lo=2, hi=6)
    raw = f._f
    with pytest.raises(TypeError, match="int32"):
        raw.add(off, w.astype(np.int64), c, None)
    with pytest.raises(ValueError, match="words must be 1-D"):
        raw.add(off, w[:-1], c, None)
    with pytest.raises(ValueError, match="codes must have shape"):
        raw.add(off, w, np.ascontiguousarray(c[:, :8]), None)
    with pytest.raises(TypeError, match="dtype"):
        raw.add(off, w, c.astype(np.float32), None)
    with pytest.raises(ValueError, match="start at 0"):
        raw.add(off + 1, w, c, None)
    with pytest.raises(TypeError, match="C-contiguous"):
        raw.add(off, np.repeat(w, 2)[::2], c, None)
    with pytest.raises(ValueError, match="one image id"):
        raw.add(off, w, c, np.arange(3, dtype=np.int64))
    bad = off.copy()
    bad[2] = bad[1] - 1
    with pytest.raises(ValueError, match="non-decreasing"):
        raw.add(bad, w, c, None)
    with pytest.raises(ValueError, match="out of range"):
        raw.add(off, np.where(np.arange(w.size) == 1, 64, w).astype(np.int32), c, None)
    with pytest.raises(ValueError, match="ascending"):
        raw.add(off, w[::-1].copy(), c, None)
    # ids 0..29 are indexed: the range is checked per id before "already" (cuda/ivf.cu), so fresh ids here
    for ids, match in (([100, 101, 102, -3], "2\\^62"), ([100, 101, 102, 2**62], "2\\^62"), ([100, 101, 100, 102], "duplicate"),
                       ([100, 101, 102, 5], "already")):
        with pytest.raises(ValueError, match=match):
            raw.add(off, w, c, np.array(ids, np.int64))
    with pytest.raises(KeyError, match="image id 12345 is not in the index"):
        f.remove([3, 12345])
    # set_content validates the content like the CPU index
    ex = f.export()
    for key, mutate, match in (
            ("slots", lambda a: a[::-1].copy(), "sorted by slot|out of range"),
            ("word_counts", lambda a: a + 1, "word count"),
            ("image_ids", lambda a: np.where(np.arange(a.size) == 1, a[0], a), "duplicate"),
            ("image_ids", lambda a: -a - 1, "negative|image id out of range"),   # cuda/ivf.cu: "out of range"
            ("offsets", lambda a: np.where(np.arange(a.size) == 5, a[6] + 1, a), "non-decreasing")):
        args = {k: v for k, v in ex.items()}
        args[key] = mutate(args[key])
        with pytest.raises(ValueError, match=match):
            raw.set_content(args["offsets"], args["slots"], args["codes"], args["image_ids"], args["word_counts"],
                            args["next_id"])
    with pytest.raises(ValueError, match="next_id"):
        raw.set_content(ex["offsets"], ex["slots"], ex["codes"], ex["image_ids"], ex["word_counts"],
                        int(ex["image_ids"].max()))
    _assert_same_state(_ivf_state(f, q), before)
    # device words are checked on the device
    for mod, lib in _device_array_libs():
        dw = lib.as_tensor(w[::-1].copy(), device="cuda") if mod == "torch" else lib.asarray(w[::-1].copy())
        with pytest.raises(ValueError, match="ascending"):
            f.add(off, dw, c)
        _assert_same_state(_ivf_state(f, q), before)


@needs_gpu
@pytest.mark.gpu
def test_gpu_ivf_fixed_point_range_is_guarded():
    rng = _rng(83)
    f = cuda.GpuInvertedFile(64, 16, False)
    f.add(*_ivf_batch(rng, 10, dim=16, binary=False, lo=1, scale=1.0))
    q = _ivf_batch(rng, 2, dim=16, binary=False, lo=1)
    f.search(*q, 5, 3.0, 0.0, True)
    # codes of norm 2^11: sigma up to 2^33 for alpha = 3, beyond 2^31 / n_query_words
    f.add(*_ivf_batch(rng, 3, dim=16, binary=False, lo=1, scale=2.0 ** 11))
    with pytest.raises(ValueError, match="fixed-point range"):
        f.search(*q, 5, 3.0, 0.0, True)
    with pytest.raises(ValueError, match="fixed-point range"):
        f.score_all(*q, 3.0, 0.0, True)
    f.search(*q, 5, 1.0, 0.0, True)  # 2^11 * 20 words: within range
    off, w, c = _ivf_batch(rng, 2, dim=16, binary=False, lo=1)
    c[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        f.add(off, w, c)


@needs_gpu
@pytest.mark.gpu
def test_gpu_ivf_full_ranking_beyond_max_k_and_removal():
    """k > MAX_K ranks dense scores on the host under the same lock: it extends the device top-k; removal
    filters the parts on the device and renumbers the slots in order."""
    rng = _rng(85)
    f = _gpu_ivf(rng, True, (700, 500, 300))
    q = _ivf_batch(rng, 3, lo=5)
    s_all, i_all = f.search(*q, -1, 3.0, 0.0, True)
    s_top, i_top = f.search(*q, cuda.MAX_K, 3.0, 0.0, True)
    assert s_all.shape == (3, 1500) and s_top.shape == (3, cuda.MAX_K)
    np.testing.assert_array_equal(s_all[:, :cuda.MAX_K], s_top)
    np.testing.assert_array_equal(i_all[:, :cuda.MAX_K], i_top)
    dense, ids = f.score_all(*q, 3.0, 0.0, True)
    np.testing.assert_array_equal(ids, f.image_ids())
    np.testing.assert_array_equal(np.sort(dense, axis=1)[:, ::-1], s_all)
    gone = f.image_ids()[rng.choice(1500, 400, replace=False)]
    assert f.remove(np.concatenate([gone, gone[:10]])) == 400  # repeated ids count once
    keep = ~np.isin(ids, gone)
    dense2, ids2 = f.score_all(*q, 3.0, 0.0, True)
    np.testing.assert_array_equal(ids2, ids[keep])
    np.testing.assert_array_equal(dense2, dense[:, keep])
    ex = f.export()
    assert ex["slots"].size == f.n_entries == int(f.word_counts().sum())


@needs_gpu
@pytest.mark.gpu
def test_gpu_ivf_concurrent_add_and_search_are_well_formed():
    import threading

    rng = _rng(84)
    f = _gpu_ivf(rng, True, (50,))
    batches = [[_ivf_batch(np.random.default_rng(1000 * t + i), 20) for i in range(15)] for t in range(2)]
    q = _ivf_batch(rng, 4, lo=1)
    errors, added, results = [], [], []

    def adder(t):
        try:
            for b in batches[t]:
                added.append(f.add(*b))  # default ids, allocated under the lock
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def searcher():
        try:
            for _ in range(25):
                results.append(("search", f.search(*q, 7, 3.0, 0.0, True)))
                results.append(("all", f.score_all(*q, 3.0, 0.0, True)))
                results.append(("n", (f.n_images, f.image_ids(), f.export())))
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=adder, args=(t,)) for t in range(2)] + \
        [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ids = np.concatenate([f.image_ids()[:50]] + added)
    assert np.unique(ids).size == ids.size == f.n_images == 50 + 2 * 15 * 20
    np.testing.assert_array_equal(np.sort(f.image_ids()), np.arange(f.n_images))
    for kind, r in results:
        if kind == "search":
            s, i = r
            assert s.shape == i.shape == (4, 7)
            assert np.all(np.diff(s, axis=1) <= 0) and np.all((i >= 0) & (i < f.n_images))
        elif kind == "all":
            s, i = r
            assert s.shape == (4, i.shape[0]) and np.unique(i).size == i.size
        else:
            n, i, ex = r
            assert n <= f.n_images and ex["image_ids"].size == ex["word_counts"].size
            assert int(ex["word_counts"].sum()) == ex["slots"].size == int(ex["offsets"][-1])
    # the final state scores as a fresh index with the same content
    g = cuda.GpuInvertedFile(64, 128, True)
    ex = f.export()
    g.set_content(ex["offsets"], ex["slots"], ex["codes"], ex["image_ids"], ex["word_counts"], ex["next_id"])
    for a, b in zip(f.search(*q, 20, 3.0, 0.0, True), g.search(*q, 20, 3.0, 0.0, True)):
        np.testing.assert_array_equal(a, b)


@needs_gpu
@pytest.mark.gpu
def test_gpu_bad_input_is_refused():
    rng = _rng(61)
    cb = d2r.Codebook(_unit(rng.standard_normal((64, 16)).astype(np.float32)))
    idx = d2r.Index(cb, device="cuda")
    with pytest.raises(ValueError, match="dimension"):
        idx.add(np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        idx.add(np.full((5, 16), np.nan, np.float32))
    with pytest.raises(ValueError, match="m="):
        cb.quantize(np.zeros((2, 16), np.float32), 100, device="cuda")
    idx.add(_images(rng, 3, 16, 5, 20), image_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="already"):
        idx.add(_images(rng, 1, 16, 5, 20), image_ids=[2])
    assert len(idx) == 3


def _random_regions(rng, n_images, dim=128):
    regions = []
    for _ in range(n_images):
        n = int(rng.integers(20, 120))
        x = _unit(rng.standard_normal((n, dim)).astype(np.float32))
        members, offs = [np.arange(n)], [0, n]
        for _ in range(int(rng.integers(0, 4))):  # overlapping boxes, some empty
            sel = np.sort(rng.choice(n, int(rng.integers(0, n)), replace=False))
            members.append(sel)
            offs.append(offs[-1] + sel.size)
        regions.append(d2r.Regions(x, np.array(offs, np.int64), np.concatenate(members).astype(np.int64)))
    return regions


def test_regions_layout_and_the_gpu_backend_of_add_regions():
    """R-ASMK aggregation inside a GPU index's add_regions (issue 14): regions_layout builds the layout a
    hand-made one gives, and the GPU backend hands d2r.cuda.aggregate exactly what makes the CPU's batches
    (d2r.cuda.aggregate here is the CPU kernel on the layout it receives: the GPU kernel's equality with
    the CPU kernel on one layout is test_gpu_regional_aggregation_equals_cpu). Naive-R-ASMK has no GPU
    aggregation: it stays on the CPU."""
    from d2r import _native
    from d2r.core.aggregate import AggregatedBatch, regions_layout
    from d2r.cuda import backend as cuda_backend

    rng = _rng(31)
    cb = d2r.Codebook(_unit(rng.standard_normal((64, 128)).astype(np.float32)))
    regions = _random_regions(rng, 9)
    x, assign, ir, rm, mem = regions_layout(cb, regions)
    base = np.cumsum([0] + [r.descriptors.shape[0] for r in regions])
    np.testing.assert_array_equal(x, np.vstack([r.descriptors for r in regions]))
    assert assign is None
    np.testing.assert_array_equal(ir, np.cumsum([0] + [r.n_regions for r in regions]))
    np.testing.assert_array_equal(rm, np.concatenate([[0], np.cumsum(np.concatenate([np.diff(r.offsets)
                                                                                     for r in regions]))]))
    np.testing.assert_array_equal(mem, np.concatenate([r.members + b for r, b in zip(regions, base[:-1])]))

    calls = []

    def fake_aggregate(codebook, xs, image_regions, region_members, members, kernel, m, assignments=None,
                       output="numpy", fingerprint=None):
        calls.append((kernel, m, output, assignments is None))
        a = codebook.quantize(xs, m)[0] if assignments is None else assignments
        offs, words, codes = _native.aggregate(xs, a, codebook.centroids, image_regions, region_members, members,
                                               kind=0, binary=kernel.endswith("*"))
        return AggregatedBatch(offs, words, codes, codebook.fingerprint)

    real = cuda_backend._cuda.aggregate
    for kernel, m in (("rasmk*", 1), ("rasmk", 2), ("naive-rasmk", 1)):
        idx = d2r.Index(cb, kernel, m_db=m)
        cpu = idx._region_batches(regions, batch_size=4)
        calls.clear()
        idx._backend = cuda.CUDA   # only the aggregation under test: no GPU inverted file is touched
        cuda_backend._cuda.aggregate = fake_aggregate
        try:
            got = idx._region_batches(regions, batch_size=4)
        finally:
            cuda_backend._cuda.aggregate = real
            idx._backend = d2r.core.backend.CPU
        assert len(got) == len(cpu) == 3
        for a, b in zip(cpu, got):
            np.testing.assert_array_equal(a.offsets, b.offsets)
            np.testing.assert_array_equal(a.words, b.words)
            np.testing.assert_array_equal(a.code_bytes, b.code_bytes)
        assert calls == ([] if kernel == "naive-rasmk" else [(kernel, m, "device", True)] * 3), calls


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["rasmk*", "rasmk"])
def test_gpu_index_add_regions_equals_cpu(kernel):
    """add_regions_many on a GPU index aggregates on the GPU (R-ASMK, R-ASMK*): the same rankings and
    scores as the CPU index."""
    rng = _rng(32)
    cb = d2r.Codebook(_unit(rng.standard_normal((128, 128)).astype(np.float32)))
    regions = _random_regions(rng, 40)
    cpu, gpu = _pair(cb, kernel)
    ids = rng.permutation(1000)[:40]
    cpu.add_regions_many(regions, image_ids=ids, batch_size=16)
    gpu.add_regions_many(regions, image_ids=ids, batch_size=16)
    queries = [r.descriptors[:50] for r in regions[:6]]
    for k in (1, 10, None):
        _assert_same_search(cpu, gpu, queries, k)
