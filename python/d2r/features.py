"""Feature stores: local features of many images (descriptors, locations, scales, scores concatenated,
per-image offsets and names) in one .npz file (`save_features`), or in a folder of such shards that
is filled resumably (`extract_dataset`): each shard is written atomically, images already stored are
skipped on a rerun, and images that cannot be read are reported in `errors.json` and skipped, so one
bad file never aborts a run.

With a detector (or weight-free proposals), the store also holds each image's regions: the kept boxes
(x1, y1, x2, y2, in score order) and the features re-extracted on each crop (locations in whole-image
pixels), as the official D2R code builds them. In a .npz: `region_image_offsets` (per image, into the
regions), `region_boxes`, `region_offsets` (per region, into the region_* feature rows),
`region_descriptors`, `region_locations`, `region_scales`, `region_scores`."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._atomic import atomic_write
from ._checks import as_offsets


def _pack(features, prefix=""):
    """Concatenated arrays + offsets of a list of Features."""
    offsets = np.zeros(len(features) + 1, np.int64)
    offsets[1:] = np.cumsum([len(f.descriptors) for f in features])
    dim = features[0].descriptors.shape[1] if features else 128

    def cat(attr, shape):
        parts = [np.asarray(getattr(f, attr), np.float32).reshape((-1,) + shape) for f in features]
        return np.concatenate(parts) if parts else np.zeros((0,) + shape, np.float32)

    return {prefix + "offsets": offsets, prefix + "descriptors": cat("descriptors", (dim,)),
            prefix + "locations": cat("locations", (2,)), prefix + "scales": cat("scales", ()),
            prefix + "scores": cat("scores", ())}


def _unpack(z, n_items, prefix=""):
    """The n_items Features stored under `prefix`; inconsistent offsets or row counts raise ValueError."""
    from .extract import Features

    d, loc = z[prefix + "descriptors"], z[prefix + "locations"]
    sc, scr = z[prefix + "scales"], z[prefix + "scores"]
    offs = _checked_offsets(z, prefix + "offsets", n_items, len(d))
    if not (loc.shape[:1] == sc.shape[:1] == scr.shape[:1] == d.shape[:1]):
        raise ValueError(f"{prefix}descriptors, locations, scales and scores have different numbers of rows")
    return [Features(d[a:b], loc[a:b], sc[a:b], scr[a:b]) for a, b in zip(offs[:-1], offs[1:])]


def _checked_offsets(z, key, n_items, n_rows):
    """z[key] as offsets of n_items items into n_rows rows (from 0, non-decreasing, ending at n_rows)."""
    offs = as_offsets(z[key], n_rows, key)
    if offs.shape[0] != n_items + 1:
        raise ValueError(f"{key} has {offs.shape[0]} entries for {n_items} images (expected {n_items + 1})")
    return offs


def save_features(path, names, features, regions=None) -> None:
    """names: list of str; features: list of d2r.extract.Features; regions (optional): per image a pair
    (boxes (R, 4) x1, y1, x2, y2, list of R Features of the crops)."""
    if len(names) != len(features):
        raise ValueError("one name per Features is required")
    arrays = {"names": np.asarray(names, dtype=str), **_pack(features)}
    if regions is not None:
        if len(regions) != len(features):
            raise ValueError("one (boxes, crop features) pair per image is required")
        boxes = [np.asarray(b, np.float64).reshape(-1, 4) for b, _ in regions]
        if any(b.shape[0] != len(c) for b, (_, c) in zip(boxes, regions)):
            raise ValueError("one crop Features per box is required")
        img_off = np.zeros(len(regions) + 1, np.int64)
        img_off[1:] = np.cumsum([b.shape[0] for b in boxes])
        arrays["region_image_offsets"] = img_off
        arrays["region_boxes"] = np.concatenate(boxes) if boxes else np.zeros((0, 4))
        arrays.update(_pack([f for _, crops in regions for f in crops], "region_"))
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_features(path, regions: bool = False):
    """Returns (names, list of Features) from a .npz file or a feature-store folder; with regions=True,
    (names, Features, regions) where regions[i] is (boxes (R, 4), list of R crop Features), empty for
    an image stored without regions."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such feature file")
    if path.is_dir():
        out = ([], [], [])
        for shard in _shards(path):
            part = load_features(shard, regions=True)
            for acc, p in zip(out, part):
                acc += p
        return out if regions else out[:2]
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z["names"])
            feats = _unpack(z, len(names))
            if "region_image_offsets" in z.files:
                rb = z["region_boxes"]
                io = _checked_offsets(z, "region_image_offsets", len(names), len(rb))
                crops = _unpack(z, len(rb), "region_")
                regs = [(rb[a:b], crops[a:b]) for a, b in zip(io[:-1], io[1:])]
            else:
                regs = [(np.zeros((0, 4)), []) for _ in names]
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a d2r feature file or corrupt ({exc})") from exc
    return (names, feats, regs) if regions else (names, feats)


_SHARD = "shard-{:05d}.npz"


def _shards(folder: Path):
    return sorted(folder.glob("shard-*.npz"))


def extract_dataset(images, folder, extractor=None, shard_size: int = 256, progress: bool = True, detector=None,
                    max_regions: int = 5):
    """Extract features of `images` (paths) into the feature-store `folder`, resumably.

    Images whose name (str(path)) is already in a shard are skipped; the rest are extracted in shards
    of `shard_size`, each written atomically once complete (an interruption loses at most the shard
    in progress). An image that cannot be read (missing, empty, truncated, not an image) is recorded
    with its reason in `folder/errors.json` (this run's list) and skipped. Returns (names stored,
    errors of this run as a list of (name, reason)).

    detector: optional ``image -> (boxes, scores)`` (a d2r.detect Detector, weight-free proposals
    included); the `max_regions` best boxes of each image then become regions, re-extracted on their
    crops and stored beside the whole-image features (``load_features(..., regions=True)``).
    """
    import json

    from .extract import ImageLoadError, RootSIFT

    if isinstance(images, (str, bytes, os.PathLike)):
        raise TypeError(f"images must be a list of image paths, got one path {images!r}: pass [{images!r}] for "
                        "one image (the `d2r extract` command expands folders and .txt lists)")
    images = list(images)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extractor = extractor or RootSIFT(max_features=1000)
    shards = _shards(folder)
    done = set()
    for shard in shards:
        try:
            with np.load(shard, allow_pickle=False) as z:
                done.update(str(n) for n in z["names"])
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{shard}: corrupt feature shard ({exc}); delete it to re-extract its images") from exc
    todo = [str(p) for p in images if str(p) not in done]
    next_index = (int(shards[-1].stem.split("-")[1]) + 1) if shards else 0
    errors = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="extract", unit="img")
    names, feats, regs = [], [], []

    def flush():
        nonlocal next_index, names, feats, regs
        if names:
            save_features(folder / _SHARD.format(next_index), names, feats, regs if detector is not None else None)
            next_index += 1
            names, feats, regs = [], [], []

    def extract_one(path):
        if detector is None:
            return extractor(path), None
        from .extract import load_image_rgb
        from .regions import regions_by_reextraction, select_boxes

        img = load_image_rgb(path)
        whole = extractor(img)
        boxes, scores = detector(img)
        kept, kept_scores, _ = select_boxes(boxes, scores, img.shape[:2], score_threshold=None, max_boxes=max_regions)
        _, _, crops = regions_by_reextraction(img, extractor, kept, kept_scores, whole_features=whole,
                                              score_threshold=None)
        return whole, (kept, crops)

    for path in todo:
        try:
            f, r = extract_one(path)
        except (ImageLoadError, OSError, ValueError) as exc:
            errors.append((path, str(exc)))
        else:
            names.append(path)
            feats.append(f)
            regs.append(r)
            if len(names) >= shard_size:
                flush()
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()
    with atomic_write(folder / "errors.json") as fh:
        fh.write(json.dumps([{"image": n, "error": e} for n, e in errors], indent=1).encode("utf-8"))
    stored = sorted(done | {str(p) for p in images} - {n for n, _ in errors})
    return stored, errors
