"""Visual-word codebooks: training (faiss k-means), storage (.npy) and exact quantisation (native)."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import d2r._native as _native
from d2r.core.atomic import atomic_write
from d2r.core.checks import as_descriptors, check_positive_int
from d2r.core.backend import get_backend

#: The largest squared norm a centroid may have: float32's largest value / 8, so that the squared
#: distance of a descriptor of no larger norm, |x - c|^2 <= 2 |x|^2 + 2 |c|^2, stays finite in float32.
MAX_SQUARED_NORM = float(np.finfo(np.float32).max) / 8


class Codebook:
    """C visual words of dimension D (float32). Quantisation is exact: the m nearest words in squared
    L2 distance, ties broken by the lower word id, computed by the native fused kernel.

    The centroids must be finite, and no squared norm may exceed `MAX_SQUARED_NORM` (about 4.3e37:
    beyond, squared distances overflow float32): otherwise ValueError."""

    #: Set by d2r.cuda on first GPU use: (binding surface, its GpuQuantizer of these centroids).
    _gpu_quantizer: tuple[Any, Any]

    def __init__(self, centroids: Any) -> None:
        c = as_descriptors(centroids, name="centroids")
        if c.shape[0] < 1:
            raise ValueError("a codebook needs at least one word")
        if c.shape[1] < 1:
            raise ValueError("a codebook needs dimension >= 1")
        sq = np.einsum("ij,ij->i", c, c, dtype=np.float64)   # NaN and Inf: refused by as_descriptors
        if sq.max() > MAX_SQUARED_NORM:
            w = int(np.argmax(sq))
            raise ValueError(f"centroids are too large: word {w} has squared norm {sq[w]:.3g}, above "
                             f"{MAX_SQUARED_NORM:.3g}, so squared distances would overflow float32 (the "
                             "quantiser computes in float32); rescale the codebook and the descriptors")
        c = c.copy()
        c.setflags(write=False)
        self._centroids = c
        self._quantizer_obj: _native.Quantizer | None = None  # built on first use (the pruning structure
        self._quantizer_lock = threading.Lock()   # takes about 1 s at 65,536 words; loading an index never needs it)
        self._fingerprint: str | None = None

    @property
    def _quantizer(self) -> _native.Quantizer:
        q = self._quantizer_obj
        if q is None:
            with self._quantizer_lock:
                if self._quantizer_obj is None:
                    self._quantizer_obj = _native.Quantizer(self._centroids)
                q = self._quantizer_obj
        return q

    @classmethod
    def from_array(cls, centroids: Any) -> "Codebook":
        return cls(centroids)

    @classmethod
    def train(cls, descriptors: Any, n_words: int, niter: int = 20, seed: int = 0, verbose: bool = False,
              max_points_per_centroid: int = 256, device: str = "cpu", progress: bool | None = None) -> "Codebook":
        """k-means on a descriptor sample, seedable. device="cpu": faiss, which samples at most
        `max_points_per_centroid * n_words` points. device="cuda": d2r's GPU Lloyd iterations
        (d2r.cuda.kmeans: random initialisation, exact assignment, deterministic update) on the same
        sample size; descriptors may then be a CuPy / PyTorch CUDA array (used whole).
        progress: show the elapsed time while it runs (None: when the work is large, about a few
        seconds or more)."""
        backend = get_backend(device)
        backend.require()
        n_words = check_positive_int(n_words, "n_words")
        return cls(backend.kmeans(descriptors, n_words, niter, seed, max_points_per_centroid, verbose, progress))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Codebook":
        """A codebook saved by :meth:`save` (or ``d2r train-codebook``): a .npy file of float32 (or
        float64) centroids, shape (n_words, dim)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such codebook file")
        if path.is_dir():
            raise ValueError(f"{path}: is a folder, not a codebook file (.npy)")
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise ValueError(f"{path}: not a codebook (.npy) file: it does not start with the NumPy header; "
                             "make one with `d2r train-codebook` or d2r.Codebook.save")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            reason = "it holds Python objects" if "allow_pickle" in str(exc) else f"unreadable: {exc}"
            raise ValueError(f"{path}: not a usable codebook (.npy) file ({reason}); make one with "
                             "`d2r train-codebook` or d2r.Codebook.save") from None
        if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind != "f":
            raise ValueError(f"{path}: a codebook is a 2-D float array (n_words, dim), this file holds "
                             f"{getattr(arr, 'dtype', type(arr))} of shape {getattr(arr, 'shape', '?')}")
        return cls(arr)

    def save(self, path: str | os.PathLike[str]) -> None:
        with atomic_write(path) as f:
            np.save(f, self._centroids)

    @property
    def centroids(self) -> NDArray[np.float32]:
        return self._centroids

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying this codebook: a SHA-256 of its shape and float32 centroids.
        Aggregated objects and index files carry it, so that data made with another codebook (even
        of the same shape) is refused rather than scored into garbage."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"d2r-codebook:%d:%d:" % self._centroids.shape)
            h.update(self._centroids.astype("<f4", copy=False).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def n_words(self) -> int:
        n: int = self._centroids.shape[0]
        return n

    @property
    def dim(self) -> int:
        d: int = self._centroids.shape[1]
        return d

    def __len__(self) -> int:
        return self.n_words

    def __repr__(self) -> str:
        return f"Codebook(n_words={self.n_words}, dim={self.dim}, fingerprint={self.fingerprint!r})"

    def quantize(self, descriptors: Any, m: int = 1, device: str = "cpu", output: str = "numpy") -> tuple[Any, Any]:
        """Returns (ids int32 (n, m), squared distances float32 (n, m)), nearest first, ties by the
        lower word id. device="cuda" runs on the GPU (same answers; descriptors may be CuPy / PyTorch
        CUDA arrays; output="device" keeps the results there)."""
        return get_backend(device).quantize(self, descriptors, m, output)
