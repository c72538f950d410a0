"""The GPU path's argument checks, on the real GPU or the CPU stand-in (tests/cuda/conftest.py): every
bad argument gets the clear error the CPU path gives, before any device work."""
import numpy as np
import pytest

import d2r
from d2r import cuda
from d2r.cuda import standin

pytestmark = pytest.mark.gpu


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def cb():
    return d2r.Codebook(_unit(np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)))


def _device(a):
    """A device array: the stand-in's on the stand-in, a DeviceArray made by quantize on a GPU."""
    if standin.is_active():
        return standin.DeviceArray(np.ascontiguousarray(a))
    pytest.skip("needs CuPy or PyTorch on a real GPU (covered by test_gpu_inputs_from_torch_and_cupy_without_copies)")


def test_device_info(cb):
    assert cuda.is_available() and cuda.device_count() >= 1
    free, total = cuda.memory_info()
    assert 0 <= free <= total
    assert isinstance(cuda.device_name(), str)


def test_input_matrix_checks(cb):
    x = _unit(np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="must be 2-D"):
        cuda.as_input_matrix(_device(x.reshape(-1)), 8)
    with pytest.raises(ValueError, match="dimension 8, expected 4"):
        cuda.as_input_matrix(_device(x), 4)
    with pytest.raises(TypeError, match="C-contiguous"):
        cuda.as_input_matrix(type("A", (), {"__cuda_array_interface__": {
            "shape": (5, 8), "typestr": "<f4", "data": (x.ctypes.data, False), "version": 3,
            "strides": (64, 4)}})(), 8)
    with pytest.raises(TypeError, match="integer"):
        cuda.as_input_matrix(x, None, "assignments", np.int32)
    with pytest.raises(ValueError, match="2-D"):
        cuda.as_input_matrix(np.zeros(4, np.int32), None, "assignments", np.int32)
    assert cuda.as_input_matrix(np.zeros((2, 3), np.int64), None, "a", np.int32).keep.dtype == np.int32


def test_quantize_and_aggregate_checks(cb):
    x = _unit(np.random.default_rng(2).standard_normal((12, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="output must be"):
        cuda.quantize(cb, x, 1, output="cupy")
    with pytest.raises(ValueError, match="exceeds"):
        cuda.quantize(cb, x, 33)
    with pytest.raises(ValueError, match="no GPU aggregation"):
        cuda.aggregate_images(cb, x, [0, 12], "naive-rasmk")
    with pytest.raises(ValueError, match="assignments must have shape"):
        cuda.aggregate_images(cb, x, [0, 12], assignments=np.zeros((11, 1), np.int32))
    with pytest.raises(ValueError, match="outside"):
        cuda.aggregate_images(cb, x, [0, 12], assignments=np.full((12, 1), 40, np.int32))
    with pytest.raises(ValueError, match="output must be"):
        cuda.aggregate_images(cb, x, [0, 12], output="torch")
    good = cuda.aggregate_images(cb, x, [0, 5, 12], output="device")
    assert len(good) == 2
    ref = d2r.core.aggregate.aggregate_images(cb, x, np.array([0, 5, 12], np.int64), "asmk*")
    np.testing.assert_array_equal(good.to_host().codes, ref.codes)
    ir, rm = np.array([0, 1, 2]), np.array([0, 5, 12])
    for args, match in (((np.array([1, 2]), rm, None), "image_regions"), ((ir, np.array([1, 5, 12]), None), "region_members"),
                        ((np.array([0, 1]), rm, None), "end at the number of regions"),
                        ((ir, np.array([0, 5, 11]), None), "without members"),
                        ((ir, rm, np.zeros(3, np.int64)), "members must be 1-D"),
                        ((ir, rm, np.full(12, 99, np.int64)), "out of range")):
        with pytest.raises(ValueError, match=match):
            cuda.aggregate(cb, x, *args)
    with pytest.raises(ValueError, match="at least n_words"):
        cuda.kmeans(x, 20)


def test_inverted_file_boundary_checks():
    f = cuda.GpuInvertedFile(16, 8, False)
    ok = (np.array([0, 2], np.int64), np.array([1, 3], np.int32), np.ones((2, 8), np.float32))
    f.add(*ok)
    assert (f.n_words, f.dim, f.binary, f.code_bytes, f.n_images, f.n_entries) == (16, 8, False, 32, 1, 2)
    assert f.next_id == 1 and f.n_parts >= 1 and f.memory_bytes >= 0 and f.contains(0) and not f.contains(5)
    assert f.verify() == 0 and f.compact() == 0
    f.merge()
    with pytest.raises(TypeError, match="int32"):
        f.add(ok[0], _device(ok[1].astype(np.int64)), ok[2])
    with pytest.raises(ValueError, match="1-D and non-empty"):
        f.add(np.zeros(0, np.int64), ok[1], ok[2])
    with pytest.raises(TypeError, match="integer"):
        f.add(ok[0].astype(np.float32), ok[1], ok[2])
    with pytest.raises(TypeError, match="integers"):
        f.remove(np.array([0.5]))
    assert f.remove([]) == 0
    ex = f.export()
    for key, value, err, match in (("offsets", ex["offsets"].astype(np.float32), TypeError, "offsets must be integers"),
                                   ("slots", ex["slots"].astype(np.float32), TypeError, "slots must be integers"),
                                   ("image_ids", ex["image_ids"].astype(np.float32), TypeError, "integer arrays")):
        args = dict(ex)
        args[key] = value
        with pytest.raises(err, match=match):
            f.set_content(args["offsets"], args["slots"], args["codes"], args["image_ids"], args["word_counts"],
                          args["next_id"])
    f.set_content(ex["offsets"], ex["slots"], ex["codes"].view(np.float32), ex["image_ids"], ex["word_counts"],
                  ex["next_id"])  # float codes of a float index: accepted as they are
    np.testing.assert_array_equal(f.export()["codes"], ex["codes"])


def test_the_cuda_backend_through_the_index(cb):
    """The index's device-array paths: one device array with offsets, and the sampled k-means."""
    rng = np.random.default_rng(5)
    x = _unit(rng.standard_normal((4000, 8)).astype(np.float32))
    c = d2r.Codebook.train(x, 8, niter=3, seed=2, device="cuda", max_points_per_centroid=100, verbose=True)
    assert c.centroids.shape == (8, 8)
    idx = d2r.Index(cb, device="cuda")
    xd = _device(x[:300])
    idx.add(xd, offsets=np.array([0, 100, 300]))
    assert len(idx) == 2
    with pytest.raises(TypeError, match="CuPy or PyTorch"):
        idx.add([xd, xd])        # a list of device arrays is concatenated by their own framework
