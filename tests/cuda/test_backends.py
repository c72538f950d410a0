"""The backends (d2r.core.backend, d2r.cuda.backend) and the GPU path's Python layer, on the real GPU or
on the CPU stand-in (tests/cuda/conftest.py): what a user with a GPU does, with the CPU path's answers.

test_gpu_index_add_and_search_equal_cpu is the check that the refactor bug of the previous release
(``Index(device="cuda").add`` raising ``TypeError: 'bool' object is not callable``) would have failed."""
import numpy as np
import pytest

import d2r
from d2r import cuda
from d2r.core.backend import CPU, backend_names, get_backend
from d2r.cuda import standin


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _world(seed=0, n_img=12, dim=32, n_words=128):
    rng = np.random.default_rng(seed)
    cb = d2r.Codebook(_unit(rng.standard_normal((n_words, dim)).astype(np.float32)))
    imgs = [_unit(rng.standard_normal((int(rng.integers(20, 80)), dim)).astype(np.float32)) for _ in range(n_img)]
    return cb, imgs


def test_backend_registry_and_the_index_holds_one():
    assert get_backend("cpu") is CPU and get_backend(CPU) is CPU
    assert get_backend("cuda") is cuda.CUDA
    assert backend_names() == ["cpu", "cuda"]
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        get_backend("tpu")
    cb, _ = _world()
    idx = d2r.Index(cb)
    assert idx.backend is CPU and idx.device == "cpu"
    with pytest.raises(ValueError, match="the device side does"):
        CPU.move(idx._ivf, cuda.CUDA, 1, 1, True)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["asmk*", "asmk"])
def test_gpu_index_add_and_search_equal_cpu(kernel):
    cb, imgs = _world(1)
    gpu, cpu = d2r.Index(cb, kernel, device="cuda"), d2r.Index(cb, kernel)
    assert gpu.device == "cuda" and gpu.backend is cuda.CUDA
    np.testing.assert_array_equal(gpu.add(imgs), cpu.add(imgs))
    for q in imgs[:4]:
        for a, b in zip(gpu.search(q, k=5), cpu.search(q, k=5)):
            np.testing.assert_array_equal(a, b)
    s_g, i_g = gpu.search(imgs[:3], k=None)
    s_c, i_c = cpu.search(imgs[:3], k=None)
    np.testing.assert_array_equal(i_g, i_c)
    np.testing.assert_allclose(s_g, s_c, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_gpu_index_moves_both_ways_and_saves_the_same_file(tmp_path):
    cb, imgs = _world(2)
    cpu = d2r.Index(cb)
    cpu.add(imgs)
    moved = d2r.Index(cb)
    moved.add(imgs)
    assert cuda.index_cpu_to_gpu(moved) is moved and moved.device == "cuda"
    moved.save(tmp_path / "gpu.d2r")           # a device index is saved through a CPU copy
    cpu.save(tmp_path / "cpu.d2r")
    back = d2r.Index.load(tmp_path / "gpu.d2r")
    np.testing.assert_array_equal(back.search(imgs[0], k=None)[1], cpu.search(imgs[0], k=None)[1])
    loaded = d2r.Index.load(tmp_path / "cpu.d2r", device="cuda")
    assert loaded.device == "cuda"
    np.testing.assert_array_equal(loaded.search(imgs[1], k=4)[1], cpu.search(imgs[1], k=4)[1])
    assert cuda.index_gpu_to_cpu(moved).device == "cpu" and moved.backend is CPU
    np.testing.assert_array_equal(moved.search(imgs[2], k=None)[1], cpu.search(imgs[2], k=None)[1])
    assert moved.to("cpu") is moved


@pytest.mark.gpu
def test_gpu_device_array_inputs_and_outputs():
    """Arrays with __cuda_array_interface__ are used in place (the device path of d2r.cuda), and
    output="device" gives device arrays; both equal the CPU path. On the stand-in, its DeviceArray
    (host memory behind the interface) plays the device array; on a GPU, a DeviceArray from quantize."""
    cb, imgs = _world(3)
    x = np.concatenate(imgs)
    offs = np.concatenate([[0], np.cumsum([len(i) for i in imgs])]).astype(np.int64)
    ids_dev, dist_dev = cb.quantize(x, 2, device="cuda", output="device")
    assert hasattr(ids_dev, "__cuda_array_interface__")
    ids_cpu, dist_cpu = cb.quantize(x, 2)
    np.testing.assert_array_equal(ids_dev.numpy(), ids_cpu)
    np.testing.assert_allclose(dist_dev.numpy(), dist_cpu, rtol=1e-6, atol=1e-6)
    if standin.is_active():
        xd = standin.DeviceArray(x)
        assert cuda.is_device_array(xd) and cuda.as_input_matrix(xd, cb.dim).on_device
        gpu = d2r.Index(cb, device="cuda")
        gpu.add(xd, offsets=offs, assignments=standin.DeviceArray(ids_cpu[:, :1].copy()),
                fingerprint=cb.fingerprint)
        cpu = d2r.Index(cb)
        cpu.add(imgs)
        np.testing.assert_array_equal(gpu.search(standin.DeviceArray(imgs[5]), k=None)[1],
                                      cpu.search(imgs[5], k=None)[1])
        batch = cuda.aggregate_images(cb, standin.DeviceArray(x), offs, "asmk*", output="device")
        assert hasattr(batch.words, "__cuda_array_interface__")
        ref = d2r.core.aggregate.aggregate_images(cb, x, offs, "asmk*")
        np.testing.assert_array_equal(batch.to_host().codes, ref.codes)


@pytest.mark.gpu
def test_gpu_codebook_train_and_regional_add():
    cb, imgs = _world(4, n_img=6)
    x = np.concatenate(imgs)
    c1 = d2r.Codebook.train(x, 16, niter=5, seed=1, device="cuda")
    c2 = d2r.Codebook.train(x, 16, niter=5, seed=1, device="cuda")
    np.testing.assert_array_equal(c1.centroids, c2.centroids)
    regions = [[im, im[: len(im) // 2]] for im in imgs]
    for kernel in ("rasmk*", "naive-rasmk"):
        gpu, cpu = d2r.Index(cb, kernel, device="cuda"), d2r.Index(cb, kernel)
        gpu.add_regions_many(regions)
        cpu.add_regions_many(regions)
        np.testing.assert_array_equal(gpu.search(imgs[0], k=None)[1], cpu.search(imgs[0], k=None)[1])


def test_standin_is_off_outside_gpu_tests():
    assert not standin.is_active()
    with standin.active():
        assert standin.is_active() and cuda.is_available()
        assert cuda.device_name() == "d2r CPU stand-in (no GPU)"
    assert not standin.is_active()
