"""Backends: where an index or a codebook computes, chosen once.

An :class:`~d2r.core.index.Index` holds one backend object; every operation that depends on the device
(building the inverted file, aggregating, inserting, quantising, k-means, saving a device index) asks
it, so the index and codebook code has no device branches. :data:`CPU` is the native CPU core. The GPU
side (:mod:`d2r.cuda`) defines its own backend and registers it under the name ``"cuda"`` when it is
imported (``import d2r`` does); this module never imports it, and conversion between devices lives on
the device side (:meth:`Backend.move`), as faiss's ``GpuCloner`` does.

Backends are stateless and shared: any number of indexes and threads may use one at once."""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

import d2r._native as _native

__all__ = ["Backend", "CpuBackend", "CPU", "backend_names", "get_backend", "register_backend"]


class Backend(Protocol):
    """What an index or codebook asks of the device it runs on."""

    #: The device name users pass (``device="cpu"``).
    name: str
    #: True for a backend whose data lives outside host memory (it converts indexes to and from the CPU).
    is_device: bool

    def require(self) -> None:
        """Raise a clear error when the backend cannot be used on this machine."""

    def inverted_file(self, n_words: int, dim: int, binary: bool) -> Any:
        """A new, empty inverted file (the native CPU InvertedFile's interface)."""

    def owns(self, x: Any) -> bool:
        """True when `x` is an array of this device, to be used in place (never for numpy arrays)."""

    def as_matrix(self, x: Any, dim: int) -> Any:
        """A validated (n, dim) float32 matrix of this device, from an array it owns."""

    def concat(self, arrays: Sequence[Any], dim: int) -> tuple[Any, np.ndarray, bool]:
        """(concatenated matrix, offsets int64, single=False) of a list of arrays it owns."""

    def aggregate_images(self, codebook: Any, x: Any, offsets: np.ndarray, kernel: str, m: int,
                         assignments: Any = None) -> Any:
        """Aggregated plain images (one region each): an AggregatedBatch or a device batch."""

    def aggregate_regions(self, codebook: Any, regions: list[Any], kernel: str, m: int, assignments: Any = None,
                          fingerprint: str | None = None) -> Any:
        """Aggregated images given by their regions (R-ASMK, R-ASMK*, Naive-R-ASMK)."""

    def insert(self, ivf: Any, batches: list[Any], ids: np.ndarray | None) -> np.ndarray:
        """Inserts aggregated batches into `ivf` in one atomic call; returns the ids."""

    def join(self, batches: list[Any]) -> list[Any]:
        """Query batches as the backend searches them (the CPU joins them into one call: one snapshot)."""

    def host_inverted_file(self, ivf: Any) -> Any:
        """A CPU inverted file with `ivf`'s content (itself on the CPU), for saving."""

    def move(self, ivf: Any, to: "Backend", n_words: int, dim: int, binary: bool) -> Any:
        """`ivf`'s content as a new inverted file of the backend `to` (one of the two is this one)."""

    def quantize(self, codebook: Any, descriptors: Any, m: int, output: str) -> tuple[Any, Any]:
        """(word ids int32 (n, m), squared distances float32 (n, m)), nearest first."""

    def kmeans(self, descriptors: Any, n_words: int, niter: int, seed: int, max_points_per_centroid: int,
               verbose: bool, progress: Any) -> np.ndarray:
        """k-means centroids float32 (n_words, dim)."""


def copy_content(src: Any, dst: Any) -> Any:
    """Fills the empty inverted file `dst` with the content of `src` (export / set_content); returns dst."""
    ex = src.export()
    dst.set_content(ex["offsets"], ex["slots"], ex["codes"], np.array(ex["image_ids"]), np.array(ex["word_counts"]),
                    int(ex["next_id"]))
    return dst


class CpuBackend:
    """The native CPU core (csrc/ through d2r._native)."""

    name = "cpu"
    is_device = False

    def require(self) -> None:
        return None

    def inverted_file(self, n_words: int, dim: int, binary: bool) -> Any:
        return _native.InvertedFile(int(n_words), int(dim), bool(binary))

    def owns(self, x: Any) -> bool:
        return False

    def as_matrix(self, x: Any, dim: int) -> Any:
        raise TypeError("the CPU backend takes numpy arrays")

    def concat(self, arrays: Sequence[Any], dim: int) -> tuple[Any, np.ndarray, bool]:
        raise TypeError("the CPU backend takes numpy arrays")

    def aggregate_images(self, codebook: Any, x: Any, offsets: np.ndarray, kernel: str, m: int,
                         assignments: Any = None) -> Any:
        from d2r.core.aggregate import aggregate_images

        return aggregate_images(codebook, x, offsets, kernel, m, assignments)

    def aggregate_regions(self, codebook: Any, regions: list[Any], kernel: str, m: int, assignments: Any = None,
                          fingerprint: str | None = None) -> Any:
        from d2r.core.aggregate import aggregate_regions_batch

        return aggregate_regions_batch(codebook, regions, kernel, m, assignments, fingerprint)

    def insert(self, ivf: Any, batches: list[Any], ids: np.ndarray | None) -> np.ndarray:
        from d2r.core.kernels import AggregatedBatch

        b = AggregatedBatch.concat(batches)
        return np.asarray(ivf.add(b.offsets, b.words, b.code_bytes, ids))

    def join(self, batches: list[Any]) -> list[Any]:
        from d2r.core.kernels import AggregatedBatch

        return [AggregatedBatch.concat(batches)] if len(batches) > 1 else batches

    def host_inverted_file(self, ivf: Any) -> Any:
        return ivf

    def move(self, ivf: Any, to: Backend, n_words: int, dim: int, binary: bool) -> Any:
        raise ValueError(f"the CPU backend does not convert to {to.name!r}: the device side does")

    def quantize(self, codebook: Any, descriptors: Any, m: int, output: str) -> tuple[Any, Any]:
        from d2r.core.checks import as_descriptors, check_positive_int

        if output != "numpy":
            raise ValueError(f"output must be 'numpy' on the CPU, got {output!r}")
        x = as_descriptors(descriptors, codebook.dim)
        m = check_positive_int(m, "m")
        if m > codebook.n_words:
            raise ValueError(f"m={m} exceeds the number of words ({codebook.n_words})")
        ids, dist = codebook._quantizer.search(x, m)
        return ids, dist

    def kmeans(self, descriptors: Any, n_words: int, niter: int, seed: int, max_points_per_centroid: int,
               verbose: bool, progress: Any) -> np.ndarray:
        import warnings

        from d2r.core.checks import as_descriptors
        from d2r.core.progress import busy

        x = as_descriptors(descriptors)
        if x.shape[0] < n_words:
            raise ValueError(f"k-means needs at least n_words={n_words} descriptors, got {x.shape[0]}")
        try:
            import faiss
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("Codebook.train needs faiss: pip install faiss-cpu") from exc
        # min_points_per_centroid only sets when faiss prints its own warning (to the C stderr); d2r warns
        km = faiss.Kmeans(x.shape[1], n_words, niter=int(niter), seed=int(seed), verbose=verbose,
                          max_points_per_centroid=int(max_points_per_centroid), min_points_per_centroid=1)
        n_used = min(x.shape[0], int(max_points_per_centroid) * n_words)
        if n_used < 39 * n_words:
            warnings.warn(f"k-means on {n_used} descriptors for {n_words} words: fewer than 39 per word (faiss's "
                          "recommended minimum), so the codebook may be poor; use fewer words or more images",
                          UserWarning, stacklevel=3)
        if progress is None:
            progress = float(n_used) * n_words * x.shape[1] * int(niter) > 2e10
        with busy(f"k-means ({n_words} words, {n_used} descriptors, {int(niter)} iterations)", progress):
            km.train(x)
        return np.asarray(km.centroids)


#: The CPU backend (always available).
CPU = CpuBackend()

_BACKENDS: dict[str, Backend] = {CPU.name: CPU}


def register_backend(backend: Backend) -> None:
    """Makes `backend` available by its name (``device=backend.name``). The GPU side calls it on import."""
    _BACKENDS[backend.name] = backend


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(device: str | Backend) -> Backend:
    """The backend of a device name ("cpu", "cuda") or a backend object (returned as it is)."""
    if isinstance(device, str):
        b = _BACKENDS.get(device)
        if b is not None:
            return b
    elif hasattr(device, "name") and hasattr(device, "inverted_file"):
        return device
    names = " or ".join(repr(n) for n in backend_names())
    raise ValueError(f"device must be {names}, got {device!r}")
