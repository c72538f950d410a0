"""Feature stores: local features of many images (descriptors, locations, scales, scores concatenated,
per-image offsets and names) in one .npz file (`save_features`), or in a folder of such shards that
is filled resumably (`extract_dataset`): each shard is written atomically, images already stored are
skipped on a rerun, and images that cannot be read are reported in `errors.json` and skipped, so one
bad file never aborts a run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._atomic import atomic_write


def save_features(path, names, features) -> None:
    """names: list of str; features: list of d2r.extract.Features."""
    if len(names) != len(features):
        raise ValueError("one name per Features is required")
    offsets = np.zeros(len(features) + 1, np.int64)
    offsets[1:] = np.cumsum([len(f.descriptors) for f in features])
    dim = features[0].descriptors.shape[1] if features else 128

    def cat(attr, shape):
        parts = [np.asarray(getattr(f, attr), np.float32).reshape((-1,) + shape) for f in features]
        return np.concatenate(parts) if parts else np.zeros((0,) + shape, np.float32)

    with atomic_write(path) as f:
        np.savez(f, names=np.asarray(names, dtype=str), offsets=offsets, descriptors=cat("descriptors", (dim,)),
                 locations=cat("locations", (2,)), scales=cat("scales", ()), scores=cat("scores", ()))


def load_features(path):
    """Returns (names, list of Features) from a .npz file or a feature-store folder."""
    from .extract import Features

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such feature file")
    if path.is_dir():
        names, feats = [], []
        for shard in _shards(path):
            n, f = load_features(shard)
            names += n
            feats += f
        return names, feats
    try:
        z = np.load(path, allow_pickle=False)
        names, offs = list(z["names"]), z["offsets"]
        d, loc, sc, scr = z["descriptors"], z["locations"], z["scales"], z["scores"]
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a d2r feature file ({exc})") from exc
    feats = [Features(d[a:b], loc[a:b], sc[a:b], scr[a:b]) for a, b in zip(offs[:-1], offs[1:])]
    return names, feats


_SHARD = "shard-{:05d}.npz"


def _shards(folder: Path):
    return sorted(folder.glob("shard-*.npz"))


def extract_dataset(images, folder, extractor=None, shard_size: int = 256, progress: bool = True):
    """Extract features of `images` (paths) into the feature-store `folder`, resumably.

    Images whose name (str(path)) is already in a shard are skipped; the rest are extracted in shards
    of `shard_size`, each written atomically once complete (an interruption loses at most the shard
    in progress). An image that cannot be read (missing, empty, truncated, not an image) is recorded
    with its reason in `folder/errors.json` (this run's list) and skipped. Returns (names stored,
    errors of this run as a list of (name, reason)).
    """
    import json

    from .extract import ImageLoadError, RootSIFT

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
    names, feats = [], []

    def flush():
        nonlocal next_index, names, feats
        if names:
            save_features(folder / _SHARD.format(next_index), names, feats)
            next_index += 1
            names, feats = [], []

    for path in todo:
        try:
            f = extractor(path)
        except (ImageLoadError, OSError, ValueError) as exc:
            errors.append((path, str(exc)))
        else:
            names.append(path)
            feats.append(f)
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
