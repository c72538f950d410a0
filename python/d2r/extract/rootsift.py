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

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import numpy as np

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
#: Dimension of (Root)SIFT descriptors.
SIFT_DIM = 128

ImageInput = Union[str, "os.PathLike[str]", np.ndarray, Any]


class ImageLoadError(ValueError):
    """An image file could not be read or decoded."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """The image file does not exist (both a ValueError and a FileNotFoundError)."""


class TruncatedImageWarning(UserWarning):
    """An image file was cut short (a JPEG without its end); what could be decoded is used and the
    missing part is filled in grey, as most decoders do."""


class UnreadableImagesWarning(UserWarning):
    """Some images of a batch could not be read and were skipped (``extract_many`` and the feature
    store list them)."""


class NoUsableImagesError(ImageLoadError):
    """None of the images of a batch could be read."""


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


# --------------------------------------------------------------------------- #
# Image loading
# --------------------------------------------------------------------------- #
def _cv2():
    import cv2  # noqa: WPS433 (deferred so that the module imports without cv2)

    return cv2


def _is_pil_image(obj: Any) -> bool:
    # Avoid importing PIL unless the object plausibly is a PIL image.
    mod = type(obj).__module__ or ""
    if not mod.startswith("PIL"):
        return False
    try:
        from PIL import Image  # noqa: WPS433
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Image.Image)


def _array_to_gray(arr: np.ndarray, what: str = "image array") -> np.ndarray:
    cv2 = _cv2()
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return np.ascontiguousarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGBA2GRAY)
    raise ValueError(
        f"{what} must be HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA), got shape {arr.shape}")


def read_image_rgb(path: Union[str, "os.PathLike[str]"]) -> np.ndarray:
    """An image file decoded to HxWx3 uint8 RGB with OpenCV; clear errors for a missing, empty,
    directory or undecodable file."""
    cv2 = _cv2()
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not os.path.exists(p):
        raise ImageNotFoundError(f"image file not found: {p!r}")
    if os.path.isdir(p):
        raise ImageLoadError(f"cannot read image {p!r}: it is a directory")
    try:
        buf = np.fromfile(p, dtype=np.uint8)
    except OSError as exc:
        raise ImageLoadError(f"cannot read image file {p!r}: {exc}") from exc
    return decode_image_rgb(buf, p)


def decode_image_rgb(data, name: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...; bytes or a uint8 array) decoded to HxWx3 uint8 RGB exactly
    as read_image_rgb decodes a file holding them; `name` labels the errors."""
    cv2 = _cv2()
    p = name
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise ImageLoadError(f"cannot decode image file {p!r}: file is empty")
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:  # pragma: no cover - depends on codec
        raise ImageLoadError(f"cannot decode image file {p!r}: {exc}") from exc
    if (bgr is None or bgr.size == 0) and _is_truncated_jpeg(buf):
        # OpenCV >= 5 refuses a JPEG cut short; libjpeg decodes it once the end-of-image marker is
        # there, filling the missing rows in grey (what Pillow and browsers show).
        bgr = cv2.imdecode(np.concatenate([buf, np.frombuffer(b"\xff\xd9", np.uint8)]), cv2.IMREAD_COLOR)
        if bgr is not None and bgr.size:
            warnings.warn(f"image file {p!r} is truncated (a JPEG without its end); decoded what is there, "
                          "the missing part filled in grey", TruncatedImageWarning, stacklevel=3)
    if bgr is None or bgr.size == 0:
        raise ImageLoadError(
            f"cannot decode image file {p!r}: not an image OpenCV can decode (corrupt, truncated or another format)")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _is_truncated_jpeg(buf: np.ndarray) -> bool:
    """A JPEG stream (SOI marker first) whose end-of-image marker is missing."""
    if buf.size < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return False
    tail = np.trim_zeros(buf[-64:], "b")
    return not (tail.size >= 2 and tail[-2] == 0xFF and tail[-1] == 0xD9)


def load_image_rgb(image: ImageInput) -> np.ndarray:
    """An HxWx3 uint8 RGB image from a path, a PIL image or an array (HxWx3 RGB, HxWx4 RGBA, HxW gray)."""
    if isinstance(image, (str, bytes)) or isinstance(image, os.PathLike):
        return read_image_rgb(os.fsdecode(image) if isinstance(image, bytes) else image)
    if _is_pil_image(image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError("image must be a path (str / os.PathLike), a PIL image or a numpy uint8 "
                        f"array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise ValueError(f"image must be HxW, HxWx3 or HxWx4, got shape {image.shape}")


def _read_file_gray(path: Union[str, "os.PathLike[str]"]) -> np.ndarray:
    # Decode to colour then convert, so that a path gives exactly the same
    # grayscale image as the equivalent RGB array (libjpeg's direct-to-gray
    # decoding differs by rounding).
    return _cv2().cvtColor(read_image_rgb(path), _cv2().COLOR_RGB2GRAY)


def load_image_gray(image: ImageInput) -> np.ndarray:
    """Return an HxW uint8 grayscale image from a path, PIL image or array.

    Arrays are interpreted as RGB (HxWx3), RGBA (HxWx4) or grayscale (HxW).
    Colour is converted with the ITU-R BT.601 luma weights (``cv2.COLOR_RGB2GRAY``).
    """
    if isinstance(image, (str, bytes)) or isinstance(image, os.PathLike):
        if isinstance(image, bytes):
            image = os.fsdecode(image)
        return _read_file_gray(image)
    if isinstance(image, np.ndarray):
        return _array_to_gray(image)
    if _is_pil_image(image):
        im = image
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        return _array_to_gray(np.asarray(im), what="PIL image")
    raise TypeError(
        "image must be a path (str / os.PathLike), a PIL image or a numpy uint8 "
        f"array, got {type(image).__name__}")


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


# --------------------------------------------------------------------------- #
# Batch extraction
# --------------------------------------------------------------------------- #
_WORKER_FN = None


def _worker_init(fn, cv_threads: Optional[int]) -> None:
    global _WORKER_FN
    _WORKER_FN = fn
    if cv_threads is not None:
        try:
            _cv2().setNumThreads(cv_threads)
        except Exception:  # pragma: no cover
            pass


def _worker_call(item):
    return _WORKER_FN(item)


def _safe_call(item):
    """In a worker process: (features, None, truncation warnings) or (None, reason, ...) for an image
    that cannot be read; truncated-image warnings are returned, so that the parent reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedImageWarning)
        out = _call_safely(_WORKER_FN, item)
    return out[:2] + ([str(w.message) for w in caught if issubclass(w.category, TruncatedImageWarning)],)


def _call_safely(fn, item):
    """(features, None, []) or (None, reason, []) for an image that cannot be read."""
    try:
        return fn(item), None, []
    except ImageLoadError as exc:
        return None, str(exc), []


class Extracted(list):
    """What :func:`extract_many` returns: a list of the Features of the readable images, in input
    order, with

    images : the inputs those Features belong to (same order);
    kept : their positions in the input;
    errors : ``(input, reason)`` for each image that could not be read (skipped).
    """

    def __init__(self, features=(), images=(), kept=(), errors=()):
        super().__init__(features)
        self.images = list(images)
        self.kept = list(kept)
        self.errors = list(errors)


def _describe_input(im) -> str:
    return os.fspath(im) if isinstance(im, (str, os.PathLike)) else f"<{type(im).__name__}>"


def extract_many(extractor, images: Iterable[ImageInput], workers: int = 1,
                 progress: bool = True, desc: str = "extract",
                 mp_context: Optional[str] = None, on_error: str = "skip") -> "Extracted":
    """Apply ``extractor`` to every image, in order, with a tqdm progress bar.

    Parameters
    ----------
    extractor
        A callable ``image -> Features`` (e.g. :class:`RootSIFT`); must be
        picklable when ``workers > 1``.
    images
        An iterable of paths / arrays / PIL images.
    workers
        Number of processes; ``1`` runs in this process. Each worker runs
        OpenCV single-threaded.
    progress
        Show a tqdm bar.
    desc
        The bar's label.
    mp_context
        Multiprocessing start method; default ``"spawn"``, so the
        extractor (and its module) must be importable by name in a fresh
        interpreter. ``"fork"`` is NOT safe once OpenCV has run multi-threaded
        code in the parent (inherited thread-pool state can deadlock the
        children); with ``"fork"`` OpenCV's thread count is left untouched.
    on_error
        What to do with an image that cannot be read (missing, empty,
        not an image, undecodable): ``"skip"`` (the default) leaves it out,
        lists it in the result's ``errors`` and warns once
        (:class:`UnreadableImagesWarning`); ``"raise"`` stops at the first one
        with its :class:`ImageLoadError`. A truncated JPEG that can still be
        decoded is used, with a :class:`TruncatedImageWarning`.

    Returns
    -------
    Extracted
        The Features of the readable images in input order (a list), with
        ``.images``, ``.kept`` and ``.errors``. When images were given but none
        could be read, :class:`NoUsableImagesError` is raised instead.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    from .._progress import iterate

    images = list(images)
    workers = max(1, int(workers or 1))

    def bar(it):
        return iterate(it, len(images), desc, progress)

    method = mp_context or "spawn"
    if workers > 1 and method != "fork" and not _main_is_spawnable():
        warnings.warn(
            "extract_many: the __main__ script is not a file (e.g. read from stdin), so "
            "worker processes cannot be spawned; extracting in this process instead",
            RuntimeWarning, stacklevel=2)
        workers = 1

    out = Extracted()

    def collect(i, result):
        feats, reason, truncated = result
        for msg in truncated:
            warnings.warn(msg, TruncatedImageWarning, stacklevel=3)
        if reason is None:
            out.append(feats)
            out.images.append(images[i])
            out.kept.append(i)
        elif on_error == "raise":
            raise ImageLoadError(reason)
        else:
            out.errors.append((_describe_input(images[i]), reason))

    if workers == 1 or len(images) <= 1:
        for i, im in enumerate(bar(images)):
            collect(i, _call_safely(extractor, im))
    else:
        import multiprocessing as mp  # noqa: WPS433
        from concurrent.futures import ProcessPoolExecutor  # noqa: WPS433
        from concurrent.futures.process import BrokenProcessPool  # noqa: WPS433

        ctx = mp.get_context(method)
        workers = min(workers, len(images))
        cv_threads = None if method == "fork" else 1
        # ProcessPoolExecutor (unlike multiprocessing.Pool) raises BrokenProcessPool
        # instead of hanging when a worker cannot start (e.g. import failure).
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(extractor, cv_threads)) as pool:
            try:
                for i, result in enumerate(bar(pool.map(_safe_call, images, chunksize=1))):
                    collect(i, result)
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    f"extract_many: worker processes ({method!r}) died; with 'spawn' the "
                    "extractor's module must be importable in a fresh interpreter and the "
                    "main script must be guarded by `if __name__ == '__main__':`") from exc
    if out.errors:
        if not out:
            raise NoUsableImagesError(f"none of the {len(images)} images could be read; first: "
                                      f"{out.errors[0][1]}")
        warnings.warn(f"{len(out.errors)} of {len(images)} images could not be read and were skipped (first: "
                      f"{out.errors[0][1]}); they are listed in the result's .errors", UnreadableImagesWarning,
                      stacklevel=2)
    return out


def _main_is_spawnable() -> bool:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)
