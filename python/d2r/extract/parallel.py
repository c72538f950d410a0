"""Extraction of many images: a worker pool with the one unreadable-image policy
(:func:`extract_many`, :class:`Extracted`)."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Iterable, Optional

from d2r.extract.image import (ImageInput, ImageLoadError, NoUsableImagesError, TruncatedImageWarning,
                               UnreadableImagesWarning, _cv2)

__all__ = ["Extracted", "extract_many"]

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
    from d2r.core.progress import iterate

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
