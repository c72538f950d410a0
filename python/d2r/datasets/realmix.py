"""The *realmix* benchmark: a small real-photo instance-retrieval set.

Location
--------
The data live in ``<shared data>/realmix`` where ``<shared data>`` is found by
:func:`find_shared_data`:

1. the environment variable ``D2R_SHARED_DATA`` (pointing to the ``data``
   folder that contains ``realmix/``), if it is set and exists;
2. otherwise the first ``shared/data`` folder found next to the d2r source or
   any of its parent folders, i.e. ``<repo>/shared/data`` or
   ``<repo>/../shared/data``.

gnd.json structure
------------------
``gnd.json`` follows the Revisited Oxford/Paris ``gnd_*.pkl`` layout::

    {"imlist":  ["images/<group>/<name>.jpg", ...],   # 146 database images
     "qimlist": ["images/<group>/<name>.jpg", ...],   # 62 queries (not in imlist)
     "gnd":     [{"easy": [int, ...],                 # indices into imlist
                  "hard": [int, ...],
                  "junk": [int, ...],
                  "bbx":  null}, ...],                # one per query; null = whole image
     "groups":  {"<group>": ["images/<group>/...", ...]},   # all images, queries included
     "notes":   "free text"}

``gnd[i]`` belongs to ``qimlist[i]``. Paths are relative to the realmix folder;
the group of an image is its parent folder name (``images/<group>/...``), and
short names are only unique within a group, so the relative path is the image
id. Database images not in a query's easy/hard/junk lists are negatives for it
(other groups and the ``distractor`` group).

Protocols (as in ROxford/RParis): Easy = positives ``easy``, junk ``junk+hard``;
Medium = positives ``easy+hard``, junk ``junk``; Hard = positives ``hard``, junk
``junk+easy``. Queries without positives under a protocol are skipped.

Families (for per-family reporting, see the dataset README) are derived from
the group name: ``"landmarks"`` (``sacre_coeur``, ``pt_*``, ``berlin_street``,
``lund_street``), ``"wxbs_evd"`` (``wxbs_*``, ``evd_*``) and ``"objects_pairs"``
(everything else: graffiti, bundler_ET, tum_freiburg_desk and the classic
OpenCV / VLFeat / RoMa / LightGlue pairs); database distractors get
``"distractor"``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

__all__ = [
    "RealMix",
    "find_shared_data",
    "find_realmix",
    "load_realmix",
    "realmix_family",
    "realmix_rootsift",
    "realmix_descriptor_sample",
    "default_cache_dir",
    "FAMILIES",
]

ENV_SHARED_DATA = "D2R_SHARED_DATA"
ENV_CACHE_DIR = "D2R_CACHE_DIR"
#: The realmix image families (see the module docstring and :func:`realmix_family`).
FAMILIES = ("landmarks", "wxbs_evd", "objects_pairs")
_LANDMARK_GROUPS = {"sacre_coeur", "berlin_street", "lund_street"}
_CACHE_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- #
# Locating the data
# --------------------------------------------------------------------------- #
def find_shared_data() -> Optional[Path]:
    """Return the shared ``data`` folder, or ``None`` if it cannot be found.

    Checks ``$D2R_SHARED_DATA`` first, then ``shared/data`` in every ancestor
    folder of this source file and of the working directory (covers
    ``<repo>/shared/data`` and ``<repo>/../shared/data`` for an in-place build
    or a command run inside the repository).
    """
    env = os.environ.get(ENV_SHARED_DATA)
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            return p.resolve()
    for start in (Path(__file__).resolve(), Path.cwd().resolve() / "_"):
        for parent in start.parents:
            cand = parent / "shared" / "data"
            if cand.is_dir():
                return cand
    return None


def find_realmix() -> Optional[Path]:
    """Return the realmix folder (containing ``gnd.json``) or ``None``."""
    data = find_shared_data()
    if data is None:
        return None
    root = data / "realmix"
    return root if (root / "gnd.json").is_file() else None


def realmix_family(group: str) -> str:
    """Family label of a realmix group name (see module docstring)."""
    if group == "distractor":
        return "distractor"
    if group.startswith(("wxbs_", "evd_")):
        return "wxbs_evd"
    if group in _LANDMARK_GROUPS or group.startswith("pt_"):
        return "landmarks"
    return "objects_pairs"


def _group_of(relpath: str) -> str:
    parts = Path(relpath).parts
    if len(parts) >= 3 and parts[0] == "images":
        return parts[1]
    return Path(relpath).parent.name


# --------------------------------------------------------------------------- #
# Dataset object
# --------------------------------------------------------------------------- #
@dataclass
class RealMix:
    """Loaded realmix ground truth.

    Attributes
    ----------
    root : Path of the realmix folder.
    imlist, qimlist : absolute paths (str) of database / query images.
    imnames, qimnames : the same, relative to ``root`` (as in gnd.json; use as ids).
    gnd : per query, ``{"easy": [...], "hard": [...], "junk": [...], "bbx": None}``
        with indices into ``imlist``.
    groups : ``{group: [relative paths]}`` (queries included), as in gnd.json.
    db_groups, query_groups : group name of each database image / query.
    db_families, query_families : family label of each image (see module doc).
    notes : the ``notes`` string of gnd.json.
    """

    root: Path
    imlist: List[str]
    qimlist: List[str]
    imnames: List[str]
    qimnames: List[str]
    gnd: List[Dict[str, object]]
    groups: Dict[str, List[str]] = field(default_factory=dict)
    db_groups: List[str] = field(default_factory=list)
    query_groups: List[str] = field(default_factory=list)
    db_families: List[str] = field(default_factory=list)
    query_families: List[str] = field(default_factory=list)
    notes: str = ""

    @property
    def n_db(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def __repr__(self) -> str:
        return (f"RealMix(root={str(self.root)!r}, db={self.n_db}, "
                f"queries={self.n_queries})")


def load_realmix(root: Optional[PathLike] = None) -> RealMix:
    """Load the realmix ground truth (see the module docstring for the format).

    ``root`` is the realmix folder (containing ``gnd.json``); by default it is
    ``find_shared_data() / "realmix"``. Raises ``FileNotFoundError`` if absent.
    """
    if root is None:
        data = find_shared_data()
        if data is None:
            raise FileNotFoundError(
                "realmix data not found: set D2R_SHARED_DATA to the shared 'data' folder "
                "(the one containing realmix/), or place it at <repo>/../shared/data/realmix")
        root = data / "realmix"
    root = Path(root).expanduser()
    gnd_path = root / "gnd.json"
    if not gnd_path.is_file():
        raise FileNotFoundError(
            f"realmix ground truth not found: {gnd_path} does not exist "
            f"(set {ENV_SHARED_DATA} to the shared 'data' folder or pass root=)")
    with open(gnd_path, "r", encoding="utf-8") as f:
        raw = json.load(f)

    try:
        imnames = [str(p) for p in raw["imlist"]]
        qimnames = [str(p) for p in raw["qimlist"]]
        raw_gnd = raw["gnd"]
    except KeyError as exc:
        raise ValueError(f"{gnd_path}: missing key {exc}") from exc
    if len(raw_gnd) != len(qimnames):
        raise ValueError(
            f"{gnd_path}: {len(raw_gnd)} gnd entries for {len(qimnames)} queries")

    n_db = len(imnames)
    gnd: List[Dict[str, object]] = []
    for qi, g in enumerate(raw_gnd):
        entry: Dict[str, object] = {}
        for key in ("easy", "hard", "junk"):
            idx = [int(i) for i in g.get(key, [])]
            bad = [i for i in idx if not 0 <= i < n_db]
            if bad:
                raise ValueError(
                    f"{gnd_path}: gnd[{qi}][{key!r}] has out-of-range indices {bad}")
            entry[key] = idx
        if "bbx" in g:
            entry["bbx"] = g["bbx"]
        gnd.append(entry)

    root_res = root.resolve()
    db_groups = [_group_of(p) for p in imnames]
    q_groups = [_group_of(p) for p in qimnames]
    return RealMix(
        root=root_res,
        imlist=[str(root_res / p) for p in imnames],
        qimlist=[str(root_res / p) for p in qimnames],
        imnames=imnames,
        qimnames=qimnames,
        gnd=gnd,
        groups={str(k): [str(p) for p in v] for k, v in raw.get("groups", {}).items()},
        db_groups=db_groups,
        query_groups=q_groups,
        db_families=[realmix_family(g) for g in db_groups],
        query_families=[realmix_family(g) for g in q_groups],
        notes=str(raw.get("notes", "")),
    )


# --------------------------------------------------------------------------- #
# Cached RootSIFT extraction
# --------------------------------------------------------------------------- #
def default_cache_dir() -> Path:
    """``$D2R_CACHE_DIR`` if set, else ``~/.cache/d2r``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/d2r").expanduser()


def _cache_path(cache_dir: Optional[PathLike], max_features: Optional[int],
                max_image_size: Optional[int]) -> Path:
    d = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"realmix_rootsift_{max_features or 0}"
    if max_image_size is not None:
        name += f"_s{int(max_image_size)}"
    return d / (name + ".npz")


def _cv2_version() -> str:
    import cv2  # noqa: WPS433

    return str(cv2.__version__)


def _atomic_savez(path: Path, **arrays) -> None:
    from d2r.core.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def _load_cache(path: Path, names: List[str], sizes: np.ndarray,
                max_features: Optional[int], max_image_size: Optional[int]):
    """Return the npz contents as a dict if valid for these inputs, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception:  # corrupt / truncated cache: rebuild
        return None
    try:
        ok = (
            int(data["version"]) == _CACHE_VERSION
            and int(data["max_features"]) == int(max_features or 0)
            and int(data["max_image_size"]) == int(max_image_size or 0)
            and str(data["cv2_version"]) == _cv2_version()
            and list(data["names"]) == list(names)
            and np.array_equal(data["file_sizes"], sizes)
        )
    except (KeyError, ValueError, TypeError):
        return None
    return data if ok else None


class _RawSIFT:
    """Picklable wrapper returning the raw SIFT result (for caching)."""

    def __init__(self, extractor) -> None:
        self.extractor = extractor

    def __call__(self, image):
        return self.extractor.extract_sift(image)


def _build_or_load(max_features: Optional[int], cache_dir: Optional[PathLike],
                   root: Optional[PathLike], max_image_size: Optional[int],
                   workers: int, progress: bool, recompute: bool):
    ds = load_realmix(root)
    rel = ds.imnames + ds.qimnames
    paths = ds.imlist + ds.qimlist
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} realmix image(s) missing, e.g. {missing[0]}")
    sizes = np.array([os.path.getsize(p) for p in paths], dtype=np.int64)
    path = _cache_path(cache_dir, max_features, max_image_size)

    data = None if recompute else _load_cache(path, rel, sizes, max_features, max_image_size)
    if data is None:
        from d2r.extract.rootsift import RootSIFT, extract_many  # noqa: WPS433

        ex = RootSIFT(max_features=max_features, max_image_size=max_image_size)
        raws = extract_many(_RawSIFT(ex), paths, workers=workers, progress=progress,
                            desc="realmix RootSIFT", on_error="raise")  # the ground truth needs every image
        counts = np.array([len(r.sift) for r in raws], dtype=np.int64)
        sift = np.concatenate([r.sift for r in raws], axis=0) if raws else \
            np.zeros((0, 128), np.float32)
        # OpenCV SIFT descriptors are integer-valued in [0, 255]: store as uint8
        # (4x smaller) when that holds exactly; RootSIFT is recomputed on load.
        if sift.size == 0 or (np.all(sift == np.round(sift)) and sift.min() >= 0
                              and sift.max() <= 255):
            sift_store = sift.astype(np.uint8)
        else:  # pragma: no cover - other OpenCV builds
            sift_store = sift.astype(np.float32)
        data = dict(
            version=np.int64(_CACHE_VERSION),
            max_features=np.int64(max_features or 0),
            max_image_size=np.int64(max_image_size or 0),
            cv2_version=np.str_(_cv2_version()),
            names=np.array(rel, dtype=np.str_),
            n_db=np.int64(len(ds.imnames)),
            file_sizes=sizes,
            counts=counts,
            sift=sift_store,
            locations=np.concatenate([r.locations for r in raws], axis=0)
            if raws else np.zeros((0, 2), np.float32),
            scales=np.concatenate([r.scales for r in raws]) if raws else np.zeros(0, np.float32),
            scores=np.concatenate([r.scores for r in raws]) if raws else np.zeros(0, np.float32),
        )
        _atomic_savez(path, **data)
    return ds, data, path


def realmix_rootsift(max_features: Optional[int] = 1000,
                     cache_dir: Optional[PathLike] = None, *,
                     root: Optional[PathLike] = None,
                     max_image_size: Optional[int] = None,
                     workers: int = 1, progress: bool = True,
                     as_arrays: bool = False, recompute: bool = False) -> dict:
    """RootSIFT features of every realmix image, cached in one ``.npz``.

    The cache file is ``<cache_dir>/realmix_rootsift_<max_features>.npz``
    (``_s<max_image_size>`` appended when ``max_image_size`` is set);
    ``cache_dir`` defaults to :func:`default_cache_dir` (``~/.cache/d2r``). It
    is written atomically (temp file + ``os.replace``) and is rebuilt when the
    image list, file sizes, parameters or OpenCV version differ.

    Returns a dict with
      * ``"db"`` / ``"query"``: lists of :class:`~d2r.extract.rootsift.Features`
        in ``imlist`` / ``qimlist`` order (or lists of (N, 128) float32
        descriptor arrays when ``as_arrays=True``);
      * ``"imlist"`` / ``"qimlist"``: relative image names;
      * ``"dataset"``: the :class:`RealMix` object; ``"cache_path"``: str.
    """
    ds, data, path = _build_or_load(max_features, cache_dir, root, max_image_size,
                                    workers, progress, recompute)
    from d2r.extract.rootsift import Features, rootsift_from_sift  # noqa: WPS433

    counts = data["counts"].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    desc = rootsift_from_sift(data["sift"].astype(np.float32))
    n_db = int(data["n_db"])
    out: List[object] = []
    for i in range(len(counts)):
        a, b = int(offsets[i]), int(offsets[i + 1])
        if as_arrays:
            out.append(desc[a:b])
        else:
            out.append(Features(desc[a:b], data["locations"][a:b],
                                data["scales"][a:b], data["scores"][a:b]))
    return {
        "db": out[:n_db],
        "query": out[n_db:],
        "imlist": list(ds.imnames),
        "qimlist": list(ds.qimnames),
        "dataset": ds,
        "cache_path": str(path),
    }


def realmix_descriptor_sample(n: Optional[int] = 100_000,
                              max_features: Optional[int] = 1000,
                              cache_dir: Optional[PathLike] = None, *,
                              split: str = "db", seed: int = 0,
                              root: Optional[PathLike] = None,
                              max_image_size: Optional[int] = None,
                              workers: int = 1, progress: bool = True) -> np.ndarray:
    """A flat (n, 128) float32 sample of realmix RootSIFT descriptors.

    Uses (and if needed builds) the same cache as :func:`realmix_rootsift`, but
    builds no per-image objects and applies RootSIFT only to the sampled rows.
    ``split`` is ``"db"``, ``"query"`` or ``"all"``; ``n=None`` (or ``n`` larger
    than available) returns every descriptor of the split, in file order.
    Otherwise rows are drawn without replacement with ``np.random.default_rng(seed)``
    and returned in increasing row order (deterministic).
    """
    _, data, _ = _build_or_load(max_features, cache_dir, root, max_image_size,
                                workers, progress, False)
    from d2r.extract.rootsift import rootsift_from_sift  # noqa: WPS433

    counts = data["counts"].astype(np.int64)
    n_db_rows = int(counts[: int(data["n_db"])].sum())
    sift = data["sift"]
    if split == "db":
        sift = sift[:n_db_rows]
    elif split == "query":
        sift = sift[n_db_rows:]
    elif split != "all":
        raise ValueError(f"split must be 'db', 'query' or 'all', got {split!r}")
    if n is not None and int(n) < len(sift):
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(sift), size=int(n), replace=False))
        sift = sift[idx]
    return rootsift_from_sift(sift.astype(np.float32))
