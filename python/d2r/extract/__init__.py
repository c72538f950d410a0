"""Local feature extraction (RootSIFT)."""
from .rootsift import (
    MIN_IMAGE_SIDE,
    SIFT_DIM,
    Features,
    ImageLoadError,
    ImageNotFoundError,
    RootSIFT,
    SIFTResult,
    extract_many,
    load_image_gray,
    rootsift_from_sift,
)

__all__ = [
    "Features",
    "RootSIFT",
    "SIFTResult",
    "ImageLoadError",
    "ImageNotFoundError",
    "extract_many",
    "load_image_gray",
    "rootsift_from_sift",
    "MIN_IMAGE_SIDE",
    "SIFT_DIM",
]
