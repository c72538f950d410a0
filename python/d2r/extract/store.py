"""Feature stores: local features of many images (descriptors, locations, scales, scores concatenated,
per-image offsets and names) in one .npz file (`save_features`), or in a folder of such shards that
is filled resumably (`extract_dataset`): each shard is written atomically, images already stored are
skipped on a rerun, and images that cannot be read are reported in `errors.json` and skipped, so one
bad file never aborts a run.

With a detector (or weight-free proposals), the store also holds each image's regions: the kept boxes
(x1, y1, x2, y2, in score order) and the features re-extracted on each crop (locations in whole-image
pixels), as the official D2R code builds them. In a .npz: `region_image_offsets` (per image, into the
regions), `region_boxes`, `region_offsets` (per region, into the region_* feature rows),
`region_descriptors`, `region_locations`, `region_scales`, `region_scores`.

Every file records the extractor that made it (`extractor`: the JSON of ``d2r.extract.describe``,
with its fingerprint): a store refuses features of another extractor, and `d2r index` passes the
record on to the index file so that `d2r search` extracts queries the same way. Stores written before
d2r recorded it still load, with a :class:`~d2r.FormatWarning`. Image names are stored as absolute
paths, so a store can be used from any folder; `errors.json` lists the images that could not be read
(across runs, until they are stored).

Writers: `extract_dataset` is the one sequential writer (shards ``shard-NNNNN.npz``). Parallel writers
(``d2r.distributed.extract``: one per Ray actor) write shards of their own, ``shard-WRITER-NNNNN.npz``,
and error lists of their own, ``errors-WRITER.json``; readers see the union, with the error lists
merged (:func:`merge_store_errors` folds them into ``errors.json``). Parallel writers must be given
disjoint images (the Ray pipeline does so); :func:`drop_duplicate_images` removes the copies a writer
that died after writing a shard can leave.

The shard API (for the parallel writers and the index builders): :func:`shard_files` lists a store's
shards in order, :func:`read_shard` reads one, :func:`read_npz` reads named arrays of one file,
:func:`next_shard_number` and :data:`WRITER_SHARD` name a writer's next shard, :func:`write_errors`
writes an error list, :func:`scan_store` reads a store's names, errors and extractor record in one pass.
Extraction of a folder into a store is :func:`d2r.workflows.collection.extract_dataset`."""
from __future__ import annotations

import json
import math
import tokenize
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from d2r.core.atomic import atomic_write
from d2r.core.checks import as_offsets
from d2r.core.index_io import FormatWarning


class StoreMismatchError(ValueError):
    """Features of different extractors (different fingerprints) would be mixed."""


def check_extractor(stored: dict | None, current: dict | None, where) -> None:
    """Raises StoreMismatchError naming both when two extractor records have different fingerprints."""
    if stored and current and stored.get("fingerprint") != current.get("fingerprint"):
        raise StoreMismatchError(
            f"{where} holds features of {extractor_label(stored)}, not of {extractor_label(current)}: "
            "features of different extractors are not comparable; use the same extractor settings or "
            "another store")


def extractor_label(info: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(info.get("params", {}).items()) if v is not None)
    return f"{info.get('name', '?')}({params}) [fingerprint {info.get('fingerprint', '?')}]"


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
    from d2r.extract import Features

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


def save_features(path, names, features, regions=None, extractor=None, errors=None, region_source=None) -> None:
    """names: list of str; features: list of d2r.extract.Features; regions (optional): per image a pair
    (boxes (R, 4) x1, y1, x2, y2, list of R Features of the crops); extractor: the extractor that made
    them, or its ``d2r.extract.describe`` record (stored with the features); errors: optional
    (image, reason) pairs of images that could not be read (stored as the file's `errors`);
    region_source: the name of the regions' source (``d2r.detect.canonical_region_source``), stored."""
    if len(names) != len(features):
        raise ValueError("one name per Features is required")
    arrays = {"names": np.asarray(names, dtype=str), **_pack(features)}
    if extractor is not None and not isinstance(extractor, dict):
        from d2r.extract import describe

        extractor = describe(extractor)
    arrays["extractor"] = np.asarray(json.dumps(extractor, sort_keys=True))  # "null": not known
    if errors:
        arrays["errors"] = np.asarray(json.dumps([{"image": n, "error": e} for n, e in errors]))
    if region_source is not None:
        arrays["region_source"] = np.asarray(str(region_source))
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
    an image stored without regions. Shards of different extractors raise StoreMismatchError; a store
    without an extractor record (written by an older d2r) loads with a FormatWarning."""
    path = Path(path)
    info = store_info(path)
    if info["images"] == 0:
        raise ValueError(f"{path}: the feature store holds no images"
                         + (f" ({len(info['errors'])} could not be read, see errors.json)" if info["errors"] else "")
                         + "; extract some with `d2r extract IMAGES --out STORE`")
    if not info["recorded"]:
        warnings.warn(f"{path}: written by an older d2r, without a record of its extractor; it loads, but nothing "
                      "checks that queries are extracted the same way (re-extract to add the record)", FormatWarning,
                      stacklevel=2)
    out: tuple[list, list, list] = ([], [], [])
    for shard in (shard_files(path) if path.is_dir() else [path]):
        for acc, p in zip(out, read_shard(shard)):
            acc += p
    return out if regions else out[:2]


# What reading a damaged .npz can raise besides ValueError / KeyError / OSError: zipfile's errors (a
# broken archive, an encrypted member: RuntimeError, an unknown compression: NotImplementedError), a
# truncated or corrupt compressed member (EOFError, zlib.error).
_NPZ_ERRORS = (KeyError, TypeError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
               NotImplementedError, RuntimeError)


def _open_npz(path: Path):
    """np.load of a .npz file (allow_pickle=False) once each member is checked to hold exactly the
    bytes its .npy header declares: a damaged or crafted header (a shape of 10^12 rows) raises
    ValueError instead of numpy allocating what the file does not hold."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with zf.open(info) as f:
                version = npy_format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"member {info.filename!r} has .npy format version {version}")
                try:
                    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else \
                        npy_format.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                except _NPZ_ERRORS + (SyntaxError, tokenize.TokenError) as exc:
                    # numpy parses the header's Python literal: a damaged one can raise tokenize's
                    # or the parser's errors too.
                    raise ValueError(f"member {info.filename!r} has a corrupt .npy header ({exc!r:.200})") from None
                held = info.file_size - f.tell()
            if dtype.hasobject:
                raise ValueError(f"member {info.filename!r} holds Python objects")
            if math.prod(shape) * dtype.itemsize != held:
                raise ValueError(f"member {info.filename!r} declares shape {shape} of {dtype} but holds {held} bytes")
    return np.load(path, allow_pickle=False)


def read_npz(path: Path, keys=None):
    """{key: array} of a .npz feature file (all keys, or those of `keys` it has); a file that is not
    one raises ValueError naming it."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a feature file")
    try:
        with _open_npz(path) as z:
            return {k: z[k] for k in z.files if keys is None or k in keys}
    except Exception as exc:
        reason = "it holds Python objects" if "allow_pickle" in str(exc) else str(exc)
        raise ValueError(f"{path}: not a d2r feature file, or corrupt ({reason}); make one with "
                         "`d2r extract IMAGES --out STORE`") from None


def _extractor_of(z, path) -> dict | str | None:
    """The file's extractor record: a dict, None (saved without one), or "absent" (an older d2r)."""
    if "extractor" not in z:
        return "absent"
    try:
        info = json.loads(str(z["extractor"]))
        if info is None:
            return None
        if not isinstance(info, dict) or "fingerprint" not in info:
            raise ValueError("not an object with a fingerprint")
    except ValueError as exc:
        raise ValueError(f"{path}: corrupt feature file (its extractor record: {exc})") from None
    return info


def store_info(path) -> dict:
    """What a feature store (folder or .npz) holds, without reading its features: ``{"extractor":
    describe() record or None (not known), "recorded": False for stores of an older d2r (no record),
    "images": count, "shards": count, "regions": whether
    region features are stored, "region_source": the recorded name of their source (e.g. "grid:3") or
    None, "errors": [(image, reason)] of images that could not be read}``.
    Shards of different extractors raise StoreMismatchError."""
    return scan_store(path)[0]


def scan_store(path):
    """(store_info's dict, the stored image names): one pass over the shards' small arrays."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such feature store (a folder or .npz file made by `d2r extract`)")
    shards = shard_files(path) if path.is_dir() else [path]
    info = {"extractor": None, "recorded": True, "images": 0, "shards": len(shards), "regions": False,
            "region_source": None, "errors": []}
    first = None
    names = []
    for shard in shards:
        z = read_npz(shard, {"names", "extractor", "region_image_offsets", "errors", "region_source"})
        if "names" not in z:
            raise ValueError(f"{shard}: not a d2r feature file (no image names)")
        ex = _extractor_of(z, shard)
        if ex == "absent":
            info["recorded"], ex = False, None
        # Shards without a record (older d2r, or saved without one) may sit beside recorded ones (a store
        # extended by a newer d2r): the store's extractor is the recorded one, and all records must agree.
        if ex is not None:
            if first is None:
                first = ex
                info["extractor"] = ex
            else:
                check_extractor(first, ex, shard)
        names += [str(n) for n in z["names"]]
        info["images"] += len(z["names"])
        info["regions"] = info["regions"] or "region_image_offsets" in z
        if "region_source" in z:
            src = str(z["region_source"])
            if info["region_source"] is not None and info["region_source"] != src:
                raise StoreMismatchError(f"{shard}: regions from {src}, but other shards of {path} hold regions "
                                         f"from {info['region_source']}; use one region source per store")
            info["region_source"] = src
        if "errors" in z:
            info["errors"] += [(e["image"], e["error"]) for e in json.loads(str(z["errors"]))]
    if path.is_dir():
        info["errors"] = _merged_errors(path, set(names))
    return info, names


def error_files(folder: Path):
    """errors.json (a store's one merged list) and the per-writer lists (errors-WRITER.json) of parallel
    writers (``d2r.distributed.extract``) not merged yet."""
    return [p for p in [folder / "errors.json"] + sorted(folder.glob("errors-*.json")) if p.exists()]


def _merged_errors(folder: Path, stored: set) -> list:
    """The store's unreadable images: every error list merged (one entry per image, the latest list
    wins), without the images that have been stored since."""
    merged = {}
    for f in error_files(folder):
        try:
            for e in json.loads(f.read_text("utf-8")):
                merged[e["image"]] = e["error"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{f}: corrupt ({exc}); delete it (it only lists unreadable images)") from None
    return [(n, e) for n, e in merged.items() if n not in stored]


def merge_store_errors(folder) -> list:
    """Merge the per-writer error lists of a feature-store folder into its errors.json (atomically) and
    delete them; returns the merged list of (image, reason). Run once the parallel writers are done."""
    folder = Path(folder)
    files = error_files(folder)
    _, names = scan_store(folder)
    errors = _merged_errors(folder, set(names))
    if files:
        write_errors(folder / "errors.json", errors)
        for f in files:
            if f.name != "errors.json":
                f.unlink()
    return errors


def drop_duplicate_images(folder) -> int:
    """Keep one copy of each image in a feature-store folder (the first, in shard order): a shard that
    repeats images stored before is rewritten without them (atomically), or deleted when nothing else
    is left. Parallel writers can leave such copies when a writer dies after writing a shard but
    before reporting it, and its batch is run again. Returns the number of copies dropped."""
    folder = Path(folder)
    seen, dropped = set(), 0
    for shard in shard_files(folder):
        names = [str(n) for n in read_npz(shard, {"names"})["names"]]
        keep = [n not in seen for n in names]
        seen.update(names)
        if all(keep):
            continue
        dropped += keep.count(False)
        if not any(keep):
            shard.unlink()
            continue
        z = read_npz(shard, {"extractor", "region_image_offsets"})
        extractor = _extractor_of(z, shard)
        n, f, r = read_shard(shard)
        save_features(shard, [a for a, k in zip(n, keep) if k], [a for a, k in zip(f, keep) if k],
                      [a for a, k in zip(r, keep) if k] if "region_image_offsets" in z else None,
                      extractor=None if extractor == "absent" else extractor)
    return dropped


def write_errors(path: Path, errors) -> None:
    with atomic_write(path) as fh:
        fh.write(json.dumps([{"image": n, "error": e} for n, e in errors], indent=1).encode("utf-8"))


def read_shard(path: Path):
    """(names, Features, regions) of one .npz feature file."""
    try:
        with _open_npz(path) as z:
            names = list(z["names"])
            feats = _unpack(z, len(names))
            if "region_image_offsets" in z.files:
                rb = z["region_boxes"]
                io = _checked_offsets(z, "region_image_offsets", len(names), len(rb))
                crops = _unpack(z, len(rb), "region_")
                regs = [(rb[a:b], crops[a:b]) for a, b in zip(io[:-1], io[1:])]
            else:
                regs = [(np.zeros((0, 4)), []) for _ in names]
    except _NPZ_ERRORS as exc:
        raise ValueError(f"{path}: not a d2r feature file or corrupt ({exc})") from exc
    return names, feats, regs


SHARD = "shard-{:05d}.npz"
#: A parallel writer's shards: shard-WRITER-NNNNN.npz (WRITER: letters and digits, unique per writer).
WRITER_SHARD = "shard-{}-{:05d}.npz"


def shard_files(folder: Path):
    return sorted(folder.glob("shard-*.npz"))


def next_shard_number(shards, writer=None) -> int:
    """The next free shard number of the one sequential writer (writer None: shard-NNNNN.npz) or of a
    named parallel writer (shard-WRITER-NNNNN.npz)."""
    numbers = []
    for p in shards:
        parts = p.stem.split("-")
        if writer is None and len(parts) == 2 and parts[1].isdigit():
            numbers.append(int(parts[1]))
        elif writer is not None and len(parts) == 3 and parts[1] == writer and parts[2].isdigit():
            numbers.append(int(parts[2]))
    return max(numbers) + 1 if numbers else 0
