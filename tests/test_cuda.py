"""The CUDA path against the CPU path: identical word assignments, bit-identical aggregated codes,
identical scores and rankings; the clear errors where no GPU is available.

Tests marked `gpu` run only where d2r.cuda.is_available() (the device check script runs them with
`pytest -m gpu`); the others run everywhere, CI included."""
import os

import numpy as np
import pytest

import d2r
from d2r import cuda
from d2r.aggregate import aggregate_images, aggregate_regions_batch

needs_gpu = pytest.mark.skipif(not cuda.is_available(), reason="no CUDA device (or a build without CUDA)")


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
    for mod in ("torch", "cupy"):
        try:
            lib = __import__(mod)
        except ImportError:
            continue
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


@needs_gpu
@pytest.mark.gpu
def test_gpu_out_of_memory_is_a_memory_error_and_the_index_survives():
    rng = _rng(51)
    cb = d2r.Codebook(_unit(rng.standard_normal((64, 128)).astype(np.float32)))
    idx = d2r.Index(cb, device="cuda")
    imgs = _images(rng, 10)
    idx.add(imgs)
    free, total = cuda.memory_info()
    with pytest.raises(cuda.CudaMemoryError, match="out of GPU memory"):
        d2r._native.cuda_alloc_test(int(total * 2))
    assert issubclass(cuda.CudaMemoryError, MemoryError)
    s, i = idx.search(imgs[0], k=3)
    assert i[0] == 0


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
