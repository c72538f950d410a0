"""The one image loader of d2r: files, encoded bytes, PIL images and arrays to uint8 RGB or
grayscale, with typed errors (:class:`ImageLoadError`, :class:`ImageNotFoundError`) and the
truncated-JPEG policy (decoded with a :class:`TruncatedImageWarning`). OpenCV decodes;
:func:`open_image_rgb` falls back to Pillow where OpenCV is not installed."""
from __future__ import annotations

import os
import warnings
from typing import Any, Union

import numpy as np

__all__ = ["ImageInput", "ImageLoadError", "ImageNotFoundError", "NoUsableImagesError", "TruncatedImageWarning",
           "UnreadableImagesWarning", "as_image_array", "decode_image_rgb", "load_image_gray", "load_image_rgb",
           "open_image_rgb", "read_image_rgb"]

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
        image = np.asarray(image.convert("RGB"))  # type: ignore[union-attr]
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


def open_image_rgb(path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB: OpenCV (:func:`read_image_rgb`), Pillow without it."""
    try:
        import cv2  # noqa: F401
        have_cv2 = True
    except ImportError:
        have_cv2 = False
    if have_cv2:
        return read_image_rgb(path)
    p = os.fsdecode(os.fspath(path))
    if not os.path.exists(p):
        raise ImageNotFoundError(f"image file not found: {p!r}")
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading an image file needs opencv-python-headless or Pillow") from exc
    try:
        with Image.open(p) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except OSError as exc:
        raise ImageLoadError(f"cannot decode image file {p!r}: {exc}") from exc


def as_image_array(image) -> np.ndarray:
    """Path, PIL image or uint8 array (HxW, HxWx3, HxWx4) -> uint8 array (arrays kept as given)."""
    if isinstance(image, (str, bytes, os.PathLike)):
        return open_image_rgb(image)
    mod = type(image).__module__ or ""
    if mod.startswith("PIL"):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return np.ascontiguousarray(np.asarray(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image array must be uint8, got dtype {image.dtype}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
            raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
        return image
    raise TypeError(f"image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")
