"""Extraction of image collections into feature stores: :func:`extract_dataset` (resumable, sharded,
with an image's regions from a detector or proposals), built on the store format of
:mod:`d2r.extract.store`."""
from __future__ import annotations

import os
import warnings
from pathlib import Path


from d2r.core.index_io import FormatWarning
from d2r.extract.store import (SHARD, StoreMismatchError, check_extractor, error_files, extractor_label, write_errors,
                               next_shard_number, save_features, scan_store, shard_files)

__all__ = ["StoredNames", "extract_dataset", "extract_one"]


class StoredNames(list):
    """The names a feature store holds after :func:`extract_dataset` (a sorted list, as before), with
    what the run did: ``kept`` (the images already stored by an earlier run, not extracted again),
    ``added`` (the images this run stored) and ``requested`` (the distinct images the run was given)."""

    kept: int = 0
    added: int = 0
    requested: int = 0

    def summary(self) -> str:
        """e.g. "14 kept from an earlier run, 2 added"."""
        return f"{self.kept} kept from an earlier run, {self.added} added"


def extract_one(extractor, detector, max_regions, path, whole=None):
    """(whole-image Features, (kept boxes, crop Features) or None) of one image path; `whole`: the
    image's whole-image Features when already extracted (only the crops are then extracted)."""
    if detector is None:
        return (extractor(path) if whole is None else whole), None
    from d2r.extract import load_image_rgb
    from d2r.regions.select import regions_by_reextraction, select_boxes

    img = load_image_rgb(path)
    if whole is None:
        whole = extractor(img)
    boxes, scores = detector(path) if getattr(detector, "needs_path", False) else detector(img)
    kept, kept_scores, _ = select_boxes(boxes, scores, img.shape[:2], score_threshold=None, max_boxes=max_regions)
    _, _, crops = regions_by_reextraction(img, extractor, kept, kept_scores, whole_features=whole,
                                          score_threshold=None)
    return whole, (kept, crops)


def _extract_parallel(extractor, todo, shard_size, workers, strict, errors, names, stored_now, feats, regs, flush,
                      bar):
    """extract_dataset's loop with `workers` processes: a shard's images at a time through extract_many,
    each shard flushed once complete."""
    from d2r.extract import UnreadableImagesWarning, extract_many

    for start in range(0, len(todo), shard_size):
        chunk = todo[start:start + shard_size]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadableImagesWarning)  # extract_dataset warns once for all
            got = extract_many(extractor, chunk, workers=workers, progress=False, on_error="raise" if strict else "skip")
        errors += [(str(n), e) for n, e in got.errors]
        for img, f in zip(got.images, got):
            names.append(str(img))
            stored_now.add(str(img))
            feats.append(f)
            regs.append(None)
        flush()
        if bar is not None:
            bar.update(len(chunk))


def extract_dataset(images, folder, extractor=None, shard_size: int = 256, progress: bool = True, detector=None,
                    max_regions: int = 5, strict: bool = False, workers: int = 1, region_source=None,
                    whole_features=None, desc: str = "extract"):
    """Extract features of `images` (paths) into the feature-store `folder`, resumably.

    Images already in a shard are skipped (names are stored as absolute paths); the rest are extracted
    in shards of `shard_size`, each written atomically once complete (an interruption loses at most
    the shard in progress). The store records the extractor (``d2r.extract.describe``) and refuses
    another one (:class:`StoreMismatchError`, naming both).

    Unreadable images (missing, empty, not an image, undecodable) follow d2r's one policy: skipped,
    listed with their reason in ``folder/errors.json`` (kept across runs until the image is stored)
    and in the returned errors, with one :class:`~d2r.extract.UnreadableImagesWarning`; when no image
    at all could be stored, :class:`~d2r.extract.NoUsableImagesError`. ``strict=True`` stops at the
    first unreadable image instead (the shards done so far are kept) with its ImageLoadError. A
    truncated JPEG that can still be decoded is used, with a TruncatedImageWarning. Returns (names
    stored, errors of this run as a list of (name, reason)); the names are a :class:`StoredNames`
    list, which also counts the images kept from an earlier run and those this run added.

    detector: optional ``image -> (boxes, scores)`` (a d2r.detect Detector, weight-free proposals
    included); the `max_regions` best boxes of each image then become regions, re-extracted on their
    crops and stored beside the whole-image features (``load_features(..., regions=True)``).

    region_source: the detector's name (``d2r.detect.canonical_region_source``, e.g. "grid:3"), recorded
    in the store; a store holding regions of another source refuses the new ones (StoreMismatchError).

    workers: processes extracting in parallel (without a detector; the extractor must be picklable,
    e.g. RootSIFT): each shard's images are shared out among them, and shards are still written in
    order, one at a time, so an interrupted run resumes the same way.

    whole_features: optional mapping {absolute image path: Features} of whole-image features already
    extracted with the same extractor (e.g. by a first pass that found the regions): they are stored
    as they are and only the crops are extracted.

    desc: the progress bar's label.
    """
    from d2r.extract import ImageLoadError, NoUsableImagesError, RootSIFT, UnreadableImagesWarning, describe

    if isinstance(images, (str, bytes, os.PathLike)):
        raise TypeError(f"images must be a list of image paths, got one path {images!r}: pass [{images!r}] for "
                        "one image (the `d2r extract` command expands folders and .txt lists)")
    images = [os.path.abspath(os.fspath(p)) for p in images]
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder (a feature store is a folder, or pass a name "
                         "ending in .npz for one file)")
    extractor = extractor or RootSIFT(max_features=1000)
    info = describe(extractor)
    shards = shard_files(folder) if folder.exists() else []
    stored_info, stored_names = scan_store(folder) if folder.exists() else ({"errors": []}, [])
    if shards:
        if not stored_info["recorded"]:
            warnings.warn(f"{folder}: written by an older d2r, without a record of its extractor; new shards "
                          f"will record {extractor_label(info)}", FormatWarning, stacklevel=2)
        check_extractor(stored_info["extractor"], info, folder)
        if (detector is not None and region_source is not None and stored_info.get("region_source") is not None
                and stored_info["region_source"] != region_source):
            raise StoreMismatchError(f"{folder} holds regions from {stored_info['region_source']}, not from "
                                     f"{region_source}; use the same --regions or another store")
    done = {os.path.abspath(n) for n in stored_names}
    folder.mkdir(parents=True, exist_ok=True)
    old_errors = stored_info["errors"]
    todo = [p for p in dict.fromkeys(images) if p not in done]
    next_index = next_shard_number(shards)
    errors: list = []
    from d2r.core.progress import bar as progress_bar

    n_todo = len(todo)
    bar = progress_bar(n_todo, desc, progress, leave=True)
    names: list = []
    feats: list = []
    regs: list = []
    n_stored = len(done)

    def flush():
        nonlocal next_index, n_stored
        if names:
            save_features(folder / SHARD.format(next_index), names, feats, regs if detector is not None else None,
                          extractor=info, region_source=region_source if detector is not None else None)
            next_index += 1
            n_stored += len(names)
            names.clear()   # in place: the parallel loop holds these lists
            feats.clear()
            regs.clear()

    def write_error_list():
        this_run = {n for n, _ in errors}
        kept = [(n, e) for n, e in old_errors if n not in done and n not in this_run and n not in stored_now]
        write_errors(folder / "errors.json", kept + errors)
        for f in error_files(folder):   # merged now
            if f.name != "errors.json":
                f.unlink()

    stored_now: set = set()
    try:
        if workers > 1 and detector is None:
            _extract_parallel(extractor, todo, shard_size, workers, strict, errors, names, stored_now, feats, regs,
                              flush, bar)
            todo = []
        for path in todo:
            try:
                f, r = extract_one(extractor, detector, max_regions, path,
                                    None if whole_features is None else whole_features.get(path))
            except ImageLoadError as exc:
                errors.append((path, str(exc)))
                if strict:
                    raise
            else:
                names.append(path)
                stored_now.add(path)
                feats.append(f)
                regs.append(r)
                if len(names) >= shard_size:
                    flush()
            if bar is not None:
                bar.update(1)
    finally:
        flush()
        if bar is not None:
            bar.close()
        write_error_list()
    requested = list(dict.fromkeys(images))
    kept = len(done)
    if errors:
        if n_stored == 0:
            raise NoUsableImagesError(f"none of the {n_todo} images could be read (first: {errors[0][1]}); "
                                      f"all are listed in {folder / 'errors.json'}")
        before = f"; {kept} already stored were kept" if kept else ""
        warnings.warn(f"{len(errors)} of the {n_todo} images to extract could not be read and were skipped, "
                      f"{len(stored_now)} were added{before} (first: {errors[0][1]}); all are listed in "
                      f"{folder / 'errors.json'}", UnreadableImagesWarning, stacklevel=2)
    stored = StoredNames(sorted(done | stored_now))
    stored.kept, stored.added, stored.requested = kept, len(stored_now), len(requested)
    return stored, errors
