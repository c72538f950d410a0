"""Loaders for the Revisited Oxford / Paris benchmarks, plain image folders and R1M.

Revisited Oxford / Paris (Radenovic et al., CVPR 2018)
------------------------------------------------------
Standard layout (as the ``revisitop`` download script writes it)::

    <root>/gnd_roxford5k.pkl          (or gnd_rparis6k.pkl)
    <root>/jpg/<name>.jpg             every database image and every query

The pickle is a dict with ``imlist`` and ``qimlist`` (image names without
extension) and ``gnd``: one dict per query with ``easy``, ``hard``, ``junk``
(indices into ``imlist``) and ``bbx`` (``x1, y1, x2, y2``, pixels, floats).
:func:`load_revisited` also accepts the folder above (``<root>/roxford5k/...``).
The pickle is read with a restricted unpickler that only rebuilds plain Python
containers and numpy arrays, so an untrusted file cannot run code.

The result has the attributes of :class:`~d2r.datasets.realmix.RealMix`:
``imnames`` / ``qimnames`` are paths relative to ``root`` (``jpg/<name>.jpg``;
the bare names of the pickle are in ``names`` / ``qnames``), ``gnd`` entries
hold ``easy``/``hard``/``junk`` as lists of int and ``bbx`` as a list of 4
floats. A query file may also be listed in ``imlist`` (the query images are
ordinary files in ``jpg/``); the protocol describes a query by its crop only.

**Query crop** (the protocol): the query is the image cropped to ``bbx``, which
:meth:`RevisitedSet.query_image` returns. As the reference code (revisitop,
``PIL.Image.crop(bbx)``) and the official D2R code
(``crop([int(round(b)) for b in bbx])``) do, the box is rounded to integers with
Python's ``round`` (half to even, what PIL does for float boxes); the crop is
``[y1:y2, x1:x2]``, half-open, and parts of the box outside the image are zero
(as PIL pads them).

Plain folder + CSV of pairs
---------------------------
:func:`load_folder` turns any folder of images plus a CSV of ``query,positive``
rows into the same structure (see its docstring).

revisitop 1M distractors
------------------------
:func:`iter_r1m` streams the R1M image paths in batches (``<root>/jpg/...`` and
the list ``<root>/revisitop1m.txt`` if present), never holding more than one
batch of paths.
"""
from __future__ import annotations

import csv
import io
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from d2r.datasets.realmix import RealMix

__all__ = [
    "IMAGE_EXTENSIONS",
    "REVISITED_NAMES",
    "RevisitedSet",
    "crop_box",
    "iter_r1m",
    "load_folder",
    "load_revisited",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The Revisited datasets :func:`load_revisited` reads.
REVISITED_NAMES = ("roxford5k", "rparis6k")
#: File extensions (lower case) taken as images when a folder is listed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# --------------------------------------------------------------------------- #
# Restricted unpickling
# --------------------------------------------------------------------------- #
_SAFE_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"),
    ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "slice"),
    ("builtins", "range"), ("builtins", "complex"), ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "numpy" and name.endswith("dtype"):  # numpy.dtypes.* in new pickles
            return super().find_class(module, name)
        if module == "numpy.dtypes":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a ground-truth pickle "
            "(only plain containers and numpy arrays are allowed)")


def _load_pickle(path: Path):
    data = path.read_bytes()
    try:
        return _SafeUnpickler(io.BytesIO(data)).load()
    except UnicodeDecodeError:  # Python 2 pickle
        return _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()


# --------------------------------------------------------------------------- #
# Image helpers
# --------------------------------------------------------------------------- #
def _load_rgb(path: str) -> np.ndarray:
    from d2r.extract.image import open_image_rgb as _load_image_rgb  # cv2 if installed, else Pillow

    return _load_image_rgb(path)


def crop_box(bbx) -> Tuple[int, int, int, int]:
    """The integer crop ``(x1, y1, x2, y2)`` of a query box: ``round`` of each
    coordinate (Python's round, as PIL and the official D2R code do)."""
    vals = [float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1)]
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise ValueError(f"bbx must hold 4 finite numbers, got {bbx!r}")
    x1, y1, x2, y2 = (int(round(v)) for v in vals)
    return x1, y1, x2, y2


def _crop_padded(img: np.ndarray, box: Tuple[int, int, int, int]) -> np.ndarray:
    """``img[y1:y2, x1:x2]`` with zero padding outside the image (PIL's crop)."""
    x1, y1, x2, y2 = box
    w, h = max(0, x2 - x1), max(0, y2 - y1)
    H, W = img.shape[:2]
    out = np.zeros((h, w) + img.shape[2:], dtype=img.dtype)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = img[sy1:sy2, sx1:sx2]
    return out


# --------------------------------------------------------------------------- #
# Dataset object
# --------------------------------------------------------------------------- #
@dataclass
class RevisitedSet(RealMix):
    """A Revisited-style benchmark: the :class:`~d2r.datasets.realmix.RealMix`
    attributes plus

    name : ``"roxford5k"``, ``"rparis6k"`` or ``"folder"``.
    names, qnames : the bare image names of the ground-truth file.
    """

    name: str = ""
    names: List[str] = field(default_factory=list)
    qnames: List[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"RevisitedSet(name={self.name!r}, root={str(self.root)!r}, "
                f"db={self.n_db}, queries={self.n_queries})")

    def query_box(self, i: int) -> Optional[Tuple[int, int, int, int]]:
        """The integer crop box of query ``i`` (:func:`crop_box`), or None if it has none."""
        bbx = self.gnd[i].get("bbx")
        return None if bbx is None else crop_box(bbx)

    def query_image(self, i: int, crop: bool = True, as_pil: bool = False):
        """Query ``i`` as the protocol describes it: cropped to its ``bbx``.

        Returns an HxWx3 uint8 RGB numpy array (decoded with OpenCV if installed,
        else Pillow, as :mod:`d2r.regions` does), or with ``as_pil=True`` a
        ``PIL.Image`` in RGB mode cropped with ``Image.crop`` exactly as the
        reference code does (needs Pillow). ``crop=False`` gives the whole image.
        Queries without a box (``bbx`` None) are returned whole.
        """
        path = self.qimlist[i]
        box = self.query_box(i) if crop else None
        if as_pil:
            from PIL import Image

            with Image.open(path) as im:
                im = im.convert("RGB")  # type: ignore[assignment]
                return im.crop(box) if box is not None else im
        img = _load_rgb(path)
        return _crop_padded(img, box) if box is not None else img

    def image(self, j: int) -> np.ndarray:
        """Database image ``j`` as an HxWx3 uint8 RGB array."""
        return _load_rgb(self.imlist[j])


def _as_index_list(v, n_db: int, where: str) -> List[int]:
    if v is None:
        return []
    arr = np.asarray(v).reshape(-1)
    if arr.size == 0:
        return []
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{where}: indices must be integers")
    idx = [int(i) for i in arr]
    bad = [i for i in idx if not 0 <= i < n_db]
    if bad:
        raise ValueError(f"{where}: out-of-range indices {bad[:5]}")
    return idx


def _image_relpath(name: str, ext: str = ".jpg") -> str:
    return "jpg/" + (name if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name + ext)


def load_revisited(root: PathLike, name: str = "roxford5k", *,
                   check_files: bool = False) -> RevisitedSet:
    """Load Revisited Oxford (``"roxford5k"``) or Paris (``"rparis6k"``).

    ``root`` holds ``gnd_<name>.pkl`` and ``jpg/`` (or is the folder above, with
    ``<root>/<name>/gnd_<name>.pkl``). ``check_files=True`` raises
    ``FileNotFoundError`` if an image listed is missing. Returns a
    :class:`RevisitedSet` (see the module docstring).
    """
    name = str(name).lower()
    if name not in REVISITED_NAMES:
        raise ValueError(f"name must be one of {REVISITED_NAMES}, got {name!r}")
    root = Path(root).expanduser()
    gnd_path = root / f"gnd_{name}.pkl"
    if not gnd_path.is_file() and (root / name / f"gnd_{name}.pkl").is_file():
        root = root / name
        gnd_path = root / f"gnd_{name}.pkl"
    if not gnd_path.is_file():
        raise FileNotFoundError(
            f"{name} ground truth not found: {gnd_path} does not exist "
            f"(expected <root>/gnd_{name}.pkl and <root>/jpg/*.jpg)")
    raw = _load_pickle(gnd_path)
    if not isinstance(raw, dict):
        raise ValueError(f"{gnd_path}: expected a dict, got {type(raw).__name__}")
    try:
        names = [str(n) for n in raw["imlist"]]
        qnames = [str(n) for n in raw["qimlist"]]
        raw_gnd = list(raw["gnd"])
    except KeyError as exc:
        raise ValueError(f"{gnd_path}: missing key {exc}") from exc
    if len(raw_gnd) != len(qnames):
        raise ValueError(f"{gnd_path}: {len(raw_gnd)} gnd entries for {len(qnames)} queries")

    n_db = len(names)
    gnd: List[Dict[str, object]] = []
    for qi, g in enumerate(raw_gnd):
        if not isinstance(g, dict):
            raise ValueError(f"{gnd_path}: gnd[{qi}] is not a dict")
        entry: Dict[str, object] = {}
        for key in ("easy", "hard", "junk"):
            entry[key] = _as_index_list(g.get(key), n_db, f"{gnd_path}: gnd[{qi}][{key!r}]")
        bbx = g.get("bbx")
        if bbx is not None:
            b = np.asarray(bbx, dtype=np.float64).reshape(-1)
            if b.size != 4 or not np.all(np.isfinite(b)):
                raise ValueError(f"{gnd_path}: gnd[{qi}]['bbx'] must hold 4 finite numbers")
            bbx = [float(v) for v in b]
        entry["bbx"] = bbx
        gnd.append(entry)

    root_res = root.resolve()
    imnames = [_image_relpath(n) for n in names]
    qimnames = [_image_relpath(n) for n in qnames]
    if check_files:
        missing = [p for p in imnames + qimnames if not (root_res / p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} {name} image(s) missing under {root_res}, e.g. {missing[0]}")
    return RevisitedSet(
        root=root_res,
        imlist=[str(root_res / p) for p in imnames],
        qimlist=[str(root_res / p) for p in qimnames],
        imnames=imnames,
        qimnames=qimnames,
        gnd=gnd,
        groups={},
        db_groups=[name] * n_db,
        query_groups=[name] * len(qnames),
        db_families=["landmarks"] * n_db,
        query_families=["landmarks"] * len(qnames),
        notes=f"Revisited {name} ({gnd_path.name})",
        name=name,
        names=names,
        qnames=qnames,
    )


# --------------------------------------------------------------------------- #
# Plain folder + CSV of (query, positive) pairs
# --------------------------------------------------------------------------- #
def _list_images(root: Path) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append(Path(os.path.relpath(os.path.join(dirpath, f), root)).as_posix())
    return out


def _norm_rel(root: Path, p: str) -> str:
    q = Path(p.strip())
    if q.is_absolute():
        try:
            q = q.resolve().relative_to(root)
        except ValueError as exc:
            raise ValueError(f"{p!r} is not inside {root}") from exc
    return Path(os.path.normpath(q.as_posix())).as_posix()


def load_folder(root: PathLike, pairs_csv: PathLike) -> RevisitedSet:
    """A plain folder of images with a CSV of ``(query, positive)`` pairs.

    * ``root``: a folder of images (searched recursively; extensions
      :data:`IMAGE_EXTENSIONS`, hidden files and folders skipped, sorted order).
    * ``pairs_csv``: CSV rows ``query,positive[,kind]`` with paths relative to
      ``root`` (or absolute paths inside it); ``kind`` is ``easy`` (default),
      ``hard`` or ``junk``. Blank lines and lines starting with ``#`` are
      skipped; a first row whose first cell is not an image file (e.g.
      ``query,positive``) is taken as a header.
    * Queries are the files named in the first column (in order of first
      appearance); the database is every other image of the folder (the CSV
      file itself is never an image). Positives go to ``easy`` (or the given
      kind); a positive that is itself a query is not in the database and is
      dropped with a warning. ``bbx`` is None (whole image).

    Raises ``FileNotFoundError`` if a file named in the CSV does not exist.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    pairs_csv = Path(pairs_csv).expanduser()
    all_images = _list_images(root)
    all_set = set(all_images)

    rows: List[Tuple[str, str, str]] = []
    with open(pairs_csv, "r", encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if len(cells) < 2:
                raise ValueError(f"{pairs_csv}:{lineno}: expected 'query,positive[,kind]'")
            q, p = _norm_rel(root, cells[0]), _norm_rel(root, cells[1])
            kind = cells[2].lower() if len(cells) > 2 and cells[2] else "easy"
            if not rows and q not in all_set and not (root / q).is_file():
                continue  # header row
            if kind not in ("easy", "hard", "junk"):
                raise ValueError(f"{pairs_csv}:{lineno}: kind must be easy, hard or junk, "
                                 f"got {cells[2]!r}")
            for x in (q, p):
                if x not in all_set:
                    if (root / x).is_file():
                        raise ValueError(f"{pairs_csv}:{lineno}: {x!r} is not an image "
                                         f"(extensions {IMAGE_EXTENSIONS})")
                    raise FileNotFoundError(f"{pairs_csv}:{lineno}: {root / x} does not exist")
            rows.append((q, p, kind))

    qimnames: List[str] = []
    for q, _, _ in rows:
        if q not in qimnames:
            qimnames.append(q)
    qset = set(qimnames)
    imnames = [p for p in all_images if p not in qset]
    pos = {p: i for i, p in enumerate(imnames)}
    gnd: list[dict] = [{"easy": [], "hard": [], "junk": [], "bbx": None} for _ in qimnames]
    qidx = {q: i for i, q in enumerate(qimnames)}
    dropped = []
    for q, p, kind in rows:
        if p not in pos:
            dropped.append((q, p))
            continue
        lst = gnd[qidx[q]][kind]
        if pos[p] not in lst:
            lst.append(pos[p])
    for g in gnd:
        for k in ("easy", "hard", "junk"):
            g[k].sort()
    if dropped:
        warnings.warn(f"{len(dropped)} positive(s) are queries themselves and not in the "
                      f"database, dropped, e.g. {dropped[0]}", stacklevel=2)

    def group(rel: str) -> str:
        parent = Path(rel).parent.name
        return parent or "."

    return RevisitedSet(
        root=root,
        imlist=[str(root / p) for p in imnames],
        qimlist=[str(root / p) for p in qimnames],
        imnames=imnames,
        qimnames=qimnames,
        gnd=gnd,
        groups={},
        db_groups=[group(p) for p in imnames],
        query_groups=[group(p) for p in qimnames],
        db_families=["folder"] * len(imnames),
        query_families=["folder"] * len(qimnames),
        notes=f"folder {root} with pairs {pairs_csv.name}",
        name="folder",
        names=list(imnames),
        qnames=list(qimnames),
    )


# --------------------------------------------------------------------------- #
# revisitop 1M distractors
# --------------------------------------------------------------------------- #
def _batched(it, batch: int) -> Iterator[List[str]]:
    buf: List[str] = []
    for x in it:
        buf.append(x)
        if len(buf) >= batch:
            yield buf
            buf = []
    if buf:
        yield buf


def _r1m_from_list(root: Path, list_path: Path, check_exists: bool) -> Iterator[str]:
    jpg = root / "jpg"
    with open(list_path, "r", encoding="utf-8") as f:
        for line in f:
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                name += ".jpg"  # revisitop adds cfg['ext'] to names without one
            p = root / name if name.startswith("jpg/") else jpg / name
            if check_exists and not p.is_file():
                raise FileNotFoundError(f"{list_path}: listed image {p} does not exist")
            yield str(p)


def _r1m_walk(top: Path) -> Iterator[str]:
    stack = [str(top)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=True):
                subdirs.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                yield e.path
        stack.extend(reversed(subdirs))  # depth first, sorted order


def iter_r1m(root: PathLike, batch: int = 1000, *, use_list: bool = True,
             check_exists: bool = False) -> Iterator[List[str]]:
    """Stream the revisitop 1M distractor image paths in batches (lists of str).

    ``root`` is the ``revisitop1m`` folder: images under ``<root>/jpg/...``
    and, if present (and ``use_list``), the image list ``<root>/revisitop1m.txt``
    (one path per line, relative to ``<root>/jpg``; ``.jpg`` is appended to a
    name without an extension, as revisitop does), whose order is kept.
    Without the list, ``<root>/jpg`` is walked depth-first in sorted order
    (images with the extensions of :data:`IMAGE_EXTENSIONS`). Paths are read
    lazily: at most one batch is held at a time. ``check_exists`` checks each
    listed file (one stat per image). The last batch may be shorter.
    """
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    root = Path(root).expanduser()
    list_path = root / "revisitop1m.txt"
    if use_list and list_path.is_file():
        source = _r1m_from_list(root, list_path, check_exists)
    else:
        jpg = root / "jpg"
        if not jpg.is_dir():
            raise FileNotFoundError(
                f"revisitop1m images not found: {jpg} is not a folder "
                "(expected <root>/jpg/... and optionally <root>/revisitop1m.txt)")
        source = _r1m_walk(jpg)
    return _batched(source, int(batch))
