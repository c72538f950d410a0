"""Local features: one image loader (:mod:`d2r.extract.image`), the feature type
(:class:`Features`), the extractors (RootSIFT with OpenCV, the default; DELF and EfficientNet-Lite0 with
PyTorch, optional), extraction of many images (:func:`extract_many`) and the feature store
(:mod:`d2r.extract.store`, re-exported at the top level of d2r)."""
from d2r.extract.rootsift import (
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
from d2r.extract.cnn import EfficientNetLite0Features, learn_pca
from d2r.extract.delf import DELF, DelfTF
from d2r.extract.describe import describe

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
