"""The feature type of every extractor: :class:`Features` (descriptors, locations, scales, scores)."""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

__all__ = ["Features", "SIFT_DIM"]

#: Dimension of (Root)SIFT descriptors (the default of Features.empty).
SIFT_DIM = 128

# --------------------------------------------------------------------------- #
# Features container
# --------------------------------------------------------------------------- #
@dataclass
class Features:
    """Local features of one image.

    Attributes
    ----------
    descriptors : (N, D) float32, rows of unit L2 norm.
    locations : (N, 2) float32, ``(y, x)`` in original-image pixels.
    scales : (N,) float32, keypoint size in original-image pixels.
    scores : (N,) float32, keypoint response.
    """

    descriptors: np.ndarray
    locations: np.ndarray
    scales: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.descriptors = np.ascontiguousarray(self.descriptors, dtype=np.float32)
        self.locations = np.ascontiguousarray(self.locations, dtype=np.float32)
        self.scales = np.ascontiguousarray(self.scales, dtype=np.float32)
        self.scores = np.ascontiguousarray(self.scores, dtype=np.float32)
        if self.descriptors.ndim != 2:
            raise ValueError(
                f"descriptors must be 2-D (N, D), got shape {self.descriptors.shape}")
        n = self.descriptors.shape[0]
        if self.locations.shape != (n, 2):
            raise ValueError(
                f"locations must have shape ({n}, 2), got {self.locations.shape}")
        if self.scales.shape != (n,):
            raise ValueError(f"scales must have shape ({n},), got {self.scales.shape}")
        if self.scores.shape != (n,):
            raise ValueError(f"scores must have shape ({n},), got {self.scores.shape}")

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    @classmethod
    def empty(cls, dim: int = SIFT_DIM) -> "Features":
        return cls(
            descriptors=np.zeros((0, dim), np.float32),
            locations=np.zeros((0, 2), np.float32),
            scales=np.zeros((0,), np.float32),
            scores=np.zeros((0,), np.float32),
        )

    def subset(self, index) -> "Features":
        """Rows selected by an index array / slice / boolean mask."""
        return Features(self.descriptors[index], self.locations[index],
                        self.scales[index], self.scores[index])
