"""Local feature extraction: RootSIFT (OpenCV, the default) and DELF (PyTorch, optional)."""
from .rootsift import (
    MIN_IMAGE_SIDE,
    SIFT_DIM,
    Features,
    ImageLoadError,
    ImageNotFoundError,
    NoUsableImagesError,
    RootSIFT,
    Extracted,
    TruncatedImageWarning,
    UnreadableImagesWarning,
    SIFTResult,
    decode_image_rgb,
    extract_many,
    load_image_gray,
    load_image_rgb,
    rootsift_from_sift,
)
from .cnn import EfficientNetLite0Features, learn_pca
from .delf import DELF, DelfTF
from .describe import describe

__all__ = [
    "Features",
    "decode_image_rgb",
    "RootSIFT",
    "SIFTResult",
    "ImageLoadError",
    "ImageNotFoundError",
    "extract_many",
    "Extracted",
    "TruncatedImageWarning",
    "UnreadableImagesWarning",
    "NoUsableImagesError",
    "describe",
    "load_image_gray",
    "load_image_rgb",
    "DELF",
    "EfficientNetLite0Features",
    "learn_pca",
    "DelfTF",
    "rootsift_from_sift",
    "MIN_IMAGE_SIDE",
    "SIFT_DIM",
]
