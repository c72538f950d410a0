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


def query_extractor(record, max_features=None, delf=None, where: str = "the index"):
    """The extractor to extract queries with for an index (or store) whose database features were made
    by the extractor `record` (``describe``'s dict; None: not recorded, RootSIFT(1000) with a
    UserWarning). RootSIFT is rebuilt from the record (`max_features` overrides its count); a
    DELF-type record needs the same weights, `delf` (a path). ValueError when the queries would not
    be comparable (another extractor, other weights)."""
    import warnings

    from d2r.extract.delf import DELF
    from d2r.extract.rootsift import RootSIFT

    if record is None:
        warnings.warn(f"{where} does not record the extractor of its database features (an index written by an "
                      "older d2r or from the Python API); extracting queries with RootSIFT", UserWarning,
                      stacklevel=2)
        return RootSIFT(max_features=max_features or 1000)
    if record.get("name") == "RootSIFT":
        params = dict(record.get("params", {}))
        if max_features is not None:
            params["max_features"] = max_features
        ext = RootSIFT(**params)
    elif delf:
        ext = DELF(delf, max_features=max_features or 1000)  # type: ignore[assignment]
    else:
        raise ValueError(f"{where} was built from {record.get('name')} features; pass the same extractor "
                         "(--delf WEIGHTS) to search it")
    got = describe(ext)
    if got["fingerprint"] != record.get("fingerprint"):
        from d2r.extract.store import extractor_label

        raise ValueError(f"{where} was built from {extractor_label(record)} features, the queries would be "
                         f"{extractor_label(got)}; use the same extractor (and weights)")
    return ext
