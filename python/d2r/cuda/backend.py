"""The GPU backend of d2r's indexes and codebooks, and the conversion of indexes between the CPU and
the GPU (the role of faiss's ``GpuCloner``: the CPU side never names the GPU).

:data:`CUDA` is registered with :mod:`d2r.core.backend` under the name ``"cuda"`` when :mod:`d2r.cuda`
is imported, so ``Index(codebook, device="cuda")`` and ``index.to("cuda")`` reach it."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import d2r.cuda as _cuda
from d2r.core.aggregate import aggregate_regions_batch, regions_layout
from d2r.core.backend import CPU, copy_content
from d2r.core.checks import as_descriptors

__all__ = ["CUDA", "CudaBackend", "index_cpu_to_gpu", "index_gpu_to_cpu"]


class CudaBackend:
    """Quantisation, aggregation, the inverted file and k-means on the GPU (d2r.cuda), with the CPU
    path's answers. Device arrays (CuPy, PyTorch, anything with ``__cuda_array_interface__``) are used
    in place."""

    name = "cuda"
    is_device = True

    def require(self) -> None:
        _cuda.require()

    def inverted_file(self, n_words: int, dim: int, binary: bool) -> Any:
        return _cuda.GpuInvertedFile(n_words, dim, binary)

    def owns(self, x: Any) -> bool:
        return _cuda.is_device_array(x)

    def as_matrix(self, x: Any, dim: int) -> Any:
        return _cuda.as_input_matrix(x, dim).keep

    def concat(self, arrays: Sequence[Any], dim: int) -> tuple[Any, np.ndarray, bool]:
        """Concatenates CUDA arrays (CuPy or PyTorch) on the device: (x, offsets, single=False)."""
        mats = [_cuda.as_input_matrix(a, dim).keep for a in arrays]
        offs = np.zeros(len(mats) + 1, np.int64)
        offs[1:] = np.cumsum([m.shape[0] for m in mats])
        fw = _cuda._framework(mats[0])
        if fw == "torch":
            import torch

            return torch.cat(mats, 0), offs, False
        if fw == "cupy":
            import cupy

            return cupy.concatenate(mats, 0), offs, False
        raise TypeError("a list of CUDA arrays must be CuPy or PyTorch arrays (or pass one array with offsets)")

    def aggregate_images(self, codebook: Any, x: Any, offsets: np.ndarray, kernel: str, m: int,
                         assignments: Any = None) -> Any:
        return _cuda.aggregate_images(codebook, x, offsets, kernel, m, assignments, output="device")

    def aggregate_regions(self, codebook: Any, regions: list[Any], kernel: str, m: int, assignments: Any = None,
                          fingerprint: str | None = None) -> Any:
        """R-ASMK(*) on the GPU; Naive-R-ASMK (no GPU kernel) on the CPU, inserted from the host."""
        from d2r.core.kernels import kernel_spec

        if kernel_spec(kernel).native_kind != 0:
            return aggregate_regions_batch(codebook, regions, kernel, m, assignments, fingerprint)
        x, assign, ir, rm, mem = regions_layout(codebook, regions, m, assignments, fingerprint)
        return _cuda.aggregate(codebook, x, ir, rm, mem, kernel, m, assign, output="device",
                               fingerprint=None if assign is None else codebook.fingerprint)

    def insert(self, ivf: Any, batches: list[Any], ids: np.ndarray | None) -> np.ndarray:
        return np.asarray(ivf.add_batches(batches, ids))

    def join(self, batches: list[Any]) -> list[Any]:
        return batches

    def host_inverted_file(self, ivf: Any) -> Any:
        return copy_content(ivf, CPU.inverted_file(ivf.n_words, ivf.dim, ivf.binary))

    def move(self, ivf: Any, to: Any, n_words: int, dim: int, binary: bool) -> Any:
        """`ivf`'s content on the other side: a GPU inverted file from a CPU one, or the reverse."""
        return copy_content(ivf, to.inverted_file(n_words, dim, binary))

    def quantize(self, codebook: Any, descriptors: Any, m: int, output: str) -> tuple[Any, Any]:
        return _cuda.quantize(codebook, descriptors, m, output)

    def kmeans(self, descriptors: Any, n_words: int, niter: int, seed: int, max_points_per_centroid: int,
               verbose: bool, progress: Any) -> np.ndarray:
        """d2r's GPU Lloyd iterations on at most max_points_per_centroid * n_words rows (sampled with
        `seed`; a device array is used whole)."""
        if not _cuda.is_device_array(descriptors):
            x = as_descriptors(descriptors)
            cap = int(max_points_per_centroid) * n_words
            if x.shape[0] > cap:
                rows = np.sort(np.random.RandomState(seed).choice(x.shape[0], cap, replace=False))
                x = x[rows]
            descriptors = x
        c, obj = _cuda.kmeans(descriptors, n_words, niter=niter, seed=seed)
        if verbose:
            for i, o in enumerate(obj):
                print(f"k-means iteration {i}: objective {o:.6g}")
        return np.asarray(c)


#: The GPU backend.
CUDA = CudaBackend()


def index_cpu_to_gpu(index: Any) -> Any:
    """Moves a CPU Index to the GPU, in place (``index.to("cuda")``); returns it."""
    return index.to(CUDA)


def index_gpu_to_cpu(index: Any) -> Any:
    """Moves a GPU Index to the CPU, in place (``index.to("cpu")``); returns it."""
    return index.to(CPU)
