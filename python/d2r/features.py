"""A small feature store: local features of many images in one .npz file (descriptors, locations,
scales, scores concatenated, per-image offsets and names), written atomically."""
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
    """Returns (names, list of Features)."""
    from .extract import Features

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such feature file")
    try:
        z = np.load(path, allow_pickle=False)
        names, offs = list(z["names"]), z["offsets"]
        d, loc, sc, scr = z["descriptors"], z["locations"], z["scales"], z["scores"]
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a d2r feature file ({exc})") from exc
    feats = [Features(d[a:b], loc[a:b], sc[a:b], scr[a:b]) for a, b in zip(offs[:-1], offs[1:])]
    return names, feats
