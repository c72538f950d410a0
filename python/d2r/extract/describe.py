"""What a feature store records of the extractor that filled it: ``describe(extractor)`` gives its
name, its parameters and a fingerprint of what defines its descriptor space, so that features of
different extractors (RootSIFT and DELF are both 128-D) are never mixed silently."""
from __future__ import annotations

import hashlib
import json

import numpy as np


def _simple(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) or x is None for x in v):
        return list(v)
    return None


def _hash_arrays(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[k]))
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def describe(extractor) -> dict:
    """``{"name", "params", "fingerprint"}`` of an extractor. The fingerprint (16 hex digits) hashes
    the name and the parameters that define the descriptors (for DELF-type extractors, their weights
    too); two extractors with the same fingerprint make comparable descriptors. Extractors may define
    ``describe()`` (RootSIFT does); for others the simple attributes (numbers, strings) are used."""
    if hasattr(extractor, "describe"):
        info = dict(extractor.describe())
    else:
        name = type(extractor).__name__
        params = {k: _simple(v) for k, v in sorted(vars(extractor).items())
                  if not k.startswith("_") and _simple(v) is not None} if hasattr(extractor, "__dict__") else {}
        info = {"name": name, "params": params, "descriptor_params": dict(params)}
        state = getattr(extractor, "_state", None)
        if isinstance(state, dict):
            info["descriptor_params"]["weights"] = _hash_arrays(state)
        pca = getattr(extractor, "pca", None)
        if isinstance(pca, dict):
            info["descriptor_params"]["pca"] = _hash_arrays(pca)
    key = json.dumps({"name": info["name"], "descriptor_params": info.get("descriptor_params", {})},
                     sort_keys=True, default=str)
    info["fingerprint"] = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return info
