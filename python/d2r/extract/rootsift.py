"""RootSIFT local features (OpenCV SIFT + Hellinger mapping).

RootSIFT (Arandjelovic & Zisserman, 2012): each SIFT descriptor is
L1-normalised and then square-rooted element-wise, so that the dot product of
two RootSIFT vectors is the Hellinger kernel of the original SIFT histograms.
After the mapping every row has unit L2 norm (it is re-normalised explicitly to
remove float rounding).

Conventions
-----------
* ``locations`` are ``(y, x)`` in pixels of the *original* image (before any
  ``max_image_size`` downscaling), OpenCV pixel-centre convention (the centre of
  the top-left pixel is ``(0, 0)``), clipped to ``[0, H-1] x [0, W-1]``.
* ``scales`` are the OpenCV keypoint ``size`` (diameter of the meaningful
  neighbourhood), in original-image pixels.
* ``scores`` are the keypoint ``response`` (DoG contrast).
* Features are sorted by decreasing score, ties broken by ``y``, ``x``,
  ``scale`` and orientation, so the output is deterministic and the first ``k``
  rows are always the ``k`` strongest.
* Keypoints whose SIFT descriptor is all-zero (cannot be normalised) are dropped.

Only ``cv2`` and ``numpy`` are needed; ``PIL`` is imported lazily when a PIL
image is passed, and ``tqdm`` lazily by :func:`extract_many`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from d2r.extract.features import SIFT_DIM, Features
from d2r.extract.image import (ImageInput, ImageLoadError, ImageNotFoundError, NoUsableImagesError,  # noqa: F401  (re-exported)
                               TruncatedImageWarning, UnreadableImagesWarning, _cv2, decode_image_rgb,
                               load_image_gray, load_image_rgb, read_image_rgb)
from d2r.extract.parallel import Extracted, extract_many  # noqa: F401

__all__ = [
    "Features",
    "RootSIFT",
    "SIFTResult",
    "ImageLoadError",
    "ImageNotFoundError",
    "load_image_gray",
    "rootsift_from_sift",
    "extract_many",
    "Extracted",
    "TruncatedImageWarning",
    "UnreadableImagesWarning",
    "NoUsableImagesError",
    "MIN_IMAGE_SIDE",
    "SIFT_DIM",
]

#: Images whose height or width is below this (after optional downscaling)
#: yield zero features.
MIN_IMAGE_SIDE = 10

# --------------------------------------------------------------------------- #
# RootSIFT
# --------------------------------------------------------------------------- #
def rootsift_from_sift(desc: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Map SIFT descriptors (N x D, non-negative) to RootSIFT (unit L2 rows).

    L1-normalise, element-wise sqrt, then L2-normalise (a no-op up to rounding).
    All-zero rows stay all-zero (callers should drop them).
    """
    d = np.asarray(desc, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"descriptors must be 2-D, got shape {d.shape}")
    d = np.maximum(d, 0.0)
    l1 = d.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    d = np.sqrt(d / np.maximum(l1, np.float32(eps)))
    l2 = np.sqrt(np.einsum("ij,ij->i", d, d, dtype=np.float64)).astype(np.float32)
    d /= np.maximum(l2, np.float32(eps))[:, None]
    return np.ascontiguousarray(d, dtype=np.float32)


@dataclass
class SIFTResult:
    """Raw (pre-RootSIFT) output of :meth:`RootSIFT.extract_sift`.

    ``sift`` holds OpenCV's float SIFT descriptors (integer-valued, 0..255);
    the other fields follow :class:`Features`.
    """

    sift: np.ndarray
    locations: np.ndarray
    scales: np.ndarray
    scores: np.ndarray

    def to_features(self) -> Features:
        return Features(rootsift_from_sift(self.sift), self.locations,
                        self.scales, self.scores)


class RootSIFT:
    """Callable RootSIFT extractor: ``RootSIFT(...)(image) -> Features``.

    Parameters
    ----------
    max_features : int or None
        Keep at most this many keypoints (the strongest by response).
        ``None`` or ``0`` means no limit.
    max_image_size : int or None
        If given, images whose longer side exceeds it are downscaled
        (``cv2.INTER_AREA``) so that the longer side equals it; locations and
        scales are mapped back to original pixels.
    n_octave_layers, contrast_threshold, edge_threshold, sigma :
        Passed to ``cv2.SIFT_create`` (OpenCV defaults).

    Notes
    -----
    The object is picklable (the OpenCV detector is created per call), so it can
    be used with :func:`extract_many` and ``workers > 1``.
    """

    #: Descriptor distance below which two features match in spatial verification. The official
    #: 0.9 is set for DELF descriptors; RootSIFT descriptors are non-negative, so unrelated ones are
    #: close too (0.9 admits mostly false matches and RANSAC then finds 10-25 chance inliers between
    #: unrelated images). d2r.pipeline uses this value when it verifies RootSIFT features.
    match_distance = 0.4

    def __init__(self, max_features: Optional[int] = 1000,
                 max_image_size: Optional[int] = None, *,
                 n_octave_layers: int = 3, contrast_threshold: float = 0.04,
                 edge_threshold: float = 10.0, sigma: float = 1.6) -> None:
        if max_features is not None:
            max_features = int(max_features)
            if max_features < 0:
                raise ValueError(f"max_features must be >= 0 or None, got {max_features}")
            if max_features == 0:
                max_features = None
        if max_image_size is not None:
            max_image_size = int(max_image_size)
            if max_image_size < 1:
                raise ValueError(f"max_image_size must be >= 1 or None, got {max_image_size}")
        self.max_features = max_features
        self.max_image_size = max_image_size
        self.n_octave_layers = int(n_octave_layers)
        self.contrast_threshold = float(contrast_threshold)
        self.edge_threshold = float(edge_threshold)
        self.sigma = float(sigma)

    dim = SIFT_DIM

    def __repr__(self) -> str:
        return (f"RootSIFT(max_features={self.max_features}, "
                f"max_image_size={self.max_image_size})")

    def describe(self) -> dict:
        """What a feature store records of this extractor (``d2r.extract.describe``): its name, all
        its parameters, and those that define the descriptor space (features made with different
        values of these are not comparable; ``max_features`` and ``max_image_size`` only change how
        many are kept and at what resolution)."""
        return {"name": "RootSIFT", "dim": SIFT_DIM,
                "params": {"max_features": self.max_features, "max_image_size": self.max_image_size,
                           "n_octave_layers": self.n_octave_layers, "contrast_threshold": self.contrast_threshold,
                           "edge_threshold": self.edge_threshold, "sigma": self.sigma},
                "descriptor_params": {"n_octave_layers": self.n_octave_layers,
                                      "contrast_threshold": self.contrast_threshold,
                                      "edge_threshold": self.edge_threshold, "sigma": self.sigma}}

    @classmethod
    def from_description(cls, info: dict) -> "RootSIFT":
        """The extractor a ``describe()`` record came from."""
        return cls(**info.get("params", {}))

    def _make_sift(self):
        cv2 = _cv2()
        return cv2.SIFT_create(
            nfeatures=self.max_features or 0,
            nOctaveLayers=self.n_octave_layers,
            contrastThreshold=self.contrast_threshold,
            edgeThreshold=self.edge_threshold,
            sigma=self.sigma,
        )

    def _empty_raw(self) -> SIFTResult:
        return SIFTResult(np.zeros((0, SIFT_DIM), np.float32), np.zeros((0, 2), np.float32),
                          np.zeros((0,), np.float32), np.zeros((0,), np.float32))

    def extract_sift(self, image: ImageInput) -> SIFTResult:
        """Detect keypoints and return raw SIFT descriptors (before RootSIFT)."""
        cv2 = _cv2()
        gray = load_image_gray(image)
        H, W = gray.shape[:2]
        if H < MIN_IMAGE_SIDE or W < MIN_IMAGE_SIDE:
            return self._empty_raw()
        if self.max_image_size is not None and max(H, W) > self.max_image_size:
            s = self.max_image_size / float(max(H, W))
            w = max(1, int(round(W * s)))
            h = max(1, int(round(H * s)))
            gray = cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)
        h, w = gray.shape[:2]
        if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
            return self._empty_raw()

        kps, desc = self._make_sift().detectAndCompute(gray, None)
        if desc is None or len(kps) == 0:
            return self._empty_raw()
        desc = np.asarray(desc, dtype=np.float32).reshape(len(kps), -1)

        n = len(kps)
        arr = np.empty((n, 5), np.float64)
        for i, kp in enumerate(kps):
            arr[i, 0] = kp.pt[1]
            arr[i, 1] = kp.pt[0]
            arr[i, 2] = kp.size
            arr[i, 3] = kp.response
            arr[i, 4] = kp.angle
        # Drop keypoints whose descriptor cannot be normalised.
        keep = desc.sum(axis=1) > 0
        if not keep.all():
            desc, arr = desc[keep], arr[keep]
        # Deterministic order: response desc, then y, x, size, angle (stable sort).
        order = np.lexsort((arr[:, 4], arr[:, 2], arr[:, 1], arr[:, 0], -arr[:, 3]))
        if self.max_features is not None:
            order = order[: self.max_features]
        desc = desc[order]
        arr = arr[order]

        # Map back to original pixels (pixel-centre convention).
        sy = H / float(h)
        sx = W / float(w)
        ys = (arr[:, 0] + 0.5) * sy - 0.5
        xs = (arr[:, 1] + 0.5) * sx - 0.5
        ys = np.clip(ys, 0.0, H - 1.0)
        xs = np.clip(xs, 0.0, W - 1.0)
        loc = np.stack([ys, xs], axis=1).astype(np.float32)
        scales = (arr[:, 2] * np.sqrt(sx * sy)).astype(np.float32)
        scores = arr[:, 3].astype(np.float32)
        return SIFTResult(np.ascontiguousarray(desc), loc, scales, scores)

    def __call__(self, image: ImageInput) -> Features:
        return self.extract_sift(image).to_features()
