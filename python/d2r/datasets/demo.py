"""The built-in *demo* set: a small instance-retrieval benchmark made on the fly.

It is generated from photographs that ship inside the scikit-image wheel
(``skimage/data/``; ``pip install scikit-image``), so it needs no download: the
files are read from the installed package folder, skimage's download functions
are never called, and only files present there are used (missing ones are
skipped and the folder name changes, see *Caching*).

Content
-------
* **Objects** (:data:`OBJECT_PHOTOS`): textured photos. Each object gives one
  query and ``n_views`` database views.
* **Backgrounds** (:data:`BACKGROUND_PHOTOS`): textures and other photos used
  only to build clutter (scene backgrounds, clutter patches, occluders); an
  object photo never appears as clutter, so a database image shows at most one
  object.
* **Query** (one per object): a mild view of the object (rotation <= 4 deg, small
  perspective change) occupying 35-55 % of a cluttered frame; its ground truth
  ``bbx`` is the object's box, so the query is meant to be cropped to it
  (Revisited Oxford/Paris protocol).
* **Database views** of each object, each with a random homography (rotation,
  perspective, anisotropic scale), an illumination change of the object (gamma,
  gain, colour cast), and a camera pipeline on the whole frame (Gaussian blur,
  noise, JPEG re-compression at quality 30-85) before the final JPEG (q = 92):

  ==========  ==================================================================
  kind        what it is
  ==========  ==================================================================
  ``easy``    the object fills most of the frame (>= 40 % of it; up to 35 % of
              the object may be cropped away)
  ``hard``    the object pasted small (3-10 % of the frame area), fully inside,
              with a stronger viewpoint change, into a cluttered scene; a third
              of them are partly occluded by a clutter patch
  ``junk``    barely visible: pushed off the frame so that 5-20 % of it remains,
              or tiny (0.4-1.2 % of the frame) under a strong viewpoint change
  ``real``    a real second photo of the object, where skimage has one
              (``motorcycle_right`` for ``motorcycle_left``); counted as easy
  ==========  ==================================================================

  With ``n_views = n`` an object gets ``max(1, n // 6)`` junk views (none for
  n < 3), ``(n - junk) // 2`` hard views and the rest easy.
* **Distractors**: ``n_distractors`` clutter-only scenes (background photos only).

Ground truth (Revisited style): per query ``easy`` (easy + real views),
``hard`` and ``junk`` index lists into ``imlist``, and ``bbx``; every other
database image is a negative. Each database image also has ground-truth boxes
(``x1, y1, x2, y2`` in pixels, float64, half-open, as :mod:`d2r.regions` uses):
one box around the visible object pixels (for occluded views the un-occluded
extent, as an annotator would draw it); none for distractors.

Files and gnd.json
------------------
``<set folder>/images/<group>/<name>.jpg`` with ``<group>`` the object name or
``distractor``; queries are ``images/<object>/query.jpg``. ``gnd.json`` has the
structure of the realmix ``gnd.json`` (see :mod:`d2r.datasets.realmix`) plus::

    "boxes":  [[[x1, y1, x2, y2], ...], ...],   # per database image (parallel to imlist)
    "kinds":  ["easy" | "hard" | "junk" | "real" | "distractor", ...],  # per database image
    "params": {...}, "version": int, "hash": str, "sources": {name: file}, "licences": {...}

The database order is shuffled (seeded), so that a method scoring everything
equal gets chance-level results.

Caching
-------
:func:`make_demo_set` writes the set to ``<root>/demo_<hash>/`` where ``root``
defaults to :func:`~d2r.datasets.realmix.default_cache_dir` (``$D2R_CACHE_DIR``
or ``~/.cache/d2r``) and ``<hash>`` covers the generator version, all
parameters, the OpenCV version and the content of the source photos used. The
set is built in a temporary folder next to it and renamed into place, so a
folder with that name is always complete; later calls reuse it.

Licences of the source photos
-----------------------------
From the docstrings of ``skimage/data/__init__.py`` (scikit-image 0.26; the
``README.txt`` of that folder names no licences). Photos whose docstring states
nothing ("not stated") are distributed as part of scikit-image
(BSD-3-Clause). Full texts and links: :data:`LICENCES`.

=====================  ==========  ==================================  ===================================
photo (file)           role        licence / copyright                 source
=====================  ==========  ==================================  ===================================
astronaut.png          object      public domain (no known copyright)  NASA Great Images, flic.kr/p/r9qvLn
chelsea.png            object      CC0 (Stefan van der Walt)           scikit-image
coffee.png             object      CC0 (Rachel Michetti)               courtesy of Pikolo Espresso Bar
motorcycle_left.png    object      not stated (skimage BSD-3)          Middlebury 2014 stereo (Scharstein)
motorcycle_right.png   real view   not stated (skimage BSD-3)          Middlebury 2014 stereo (Scharstein)
rocket.jpg             object      public domain (SpaceX)              SpaceX Photos on Flickr (DSCOVR)
camera.png             object      CC0 (Lav Varshney)                  scikit-image (since 0.18, #3927)
coins.png              object      no known copyright restrictions     Brooklyn Museum Collection
page.png               object      not stated (skimage BSD-3)          scikit-image
text.png               object      public domain (no known copyright)  Wikipedia, File:Corner.png
logo.png               object      not stated (skimage BSD-3)          scikit-image logo
hubble_deep_field.jpg  object      public domain (NASA)                HubbleSite, 2012 release 37
ihc.png                object      no known copyright restrictions     CMMI (immunohistochemistry)
brick.png              background  CC0                                 CC0Textures Bricks25 (transformed)
grass.png              background  CC0                                 DeviantArt, linolafett Grass-01
gravel.png             background  CC0                                 CC0Textures Gravel04
moon.png               background  not stated (skimage BSD-3)          scikit-image
cell.png               background  CC0                                 Mueller et al., Opt. Express 2018
clock_motion.png       background  public domain (S. van der Walt)     scikit-image
retina.jpg             background  CC0 1.0                             Wikimedia Commons (M. Haggstrom)
color.png              background  not stated (skimage BSD-3)          scikit-image colour wheel
horse.png              background  CC0 (Andreas Preuss)                openclipart
microaneurysms.png     background  CC0 (Andreas Maier)                 HRF fundus database, 07_dr.JPG
=====================  ==========  ==================================  ===================================

The generated images are derivative works of these photos and carry the same
terms.

Speed: the default set (12 objects x 8 views + 1 real view + 20 distractors =
117 database images, 12 queries, 800 px) takes a few seconds on one core.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from d2r.datasets.realmix import RealMix, default_cache_dir, load_realmix

__all__ = [
    "BACKGROUND_PHOTOS",
    "DemoSet",
    "LICENCES",
    "OBJECT_PHOTOS",
    "demo_set_dir",
    "load_demo_set",
    "make_demo_set",
    "skimage_data_dir",
]

PathLike = Union[str, "os.PathLike[str]"]

_VERSION = 2  # bump whenever the generated images or gnd.json change (part of the cache key)
_JPEG_QUALITY = 92

#: Object photos, in canonical order (an object's random stream depends on its
#: position here, not on which objects are selected).
OBJECT_PHOTOS: Tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "motorcycle_left", "rocket", "camera",
    "coins", "page", "text", "logo", "hubble_deep_field", "ihc",
)
#: Background / clutter photos (never used as objects).
BACKGROUND_PHOTOS: Tuple[str, ...] = (
    "brick", "grass", "gravel", "moon", "cell", "clock_motion", "retina",
    "color", "horse", "microaneurysms",
)
#: Real extra views of an object (database images of kind "real").
_REAL_VIEWS: Dict[str, Tuple[str, ...]] = {"motorcycle_left": ("motorcycle_right",)}

_FILES: Dict[str, str] = {
    "astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
    "motorcycle_left": "motorcycle_left.png", "motorcycle_right": "motorcycle_right.png",
    "rocket": "rocket.jpg", "camera": "camera.png", "coins": "coins.png",
    "page": "page.png", "text": "text.png", "logo": "logo.png",
    "hubble_deep_field": "hubble_deep_field.jpg", "ihc": "ihc.png",
    "brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png",
    "moon": "moon.png", "cell": "cell.png", "clock_motion": "clock_motion.png",
    "retina": "retina.jpg", "color": "color.png", "horse": "horse.png",
    "microaneurysms": "microaneurysms.png",
}

_BSD = "not stated in its docstring; distributed with scikit-image (BSD-3-Clause)"

#: Licence and source of each photo used (from ``skimage/data/__init__.py``).
LICENCES: Dict[str, Dict[str, str]] = {
    "astronaut": {"file": "astronaut.png", "role": "object",
                  "licence": "public domain (no known copyright restrictions)",
                  "source": "NASA Great Images database, https://flic.kr/p/r9qvLn "
                            "(astronaut Eileen Collins)"},
    "chelsea": {"file": "chelsea.png", "role": "object",
                "licence": "CC0 (photographer Stefan van der Walt)",
                "source": "scikit-image (Chelsea the cat)"},
    "coffee": {"file": "coffee.png", "role": "object",
               "licence": "CC0 (photographer Rachel Michetti)",
               "source": "courtesy of Pikolo Espresso Bar"},
    "motorcycle_left": {"file": "motorcycle_left.png", "role": "object", "licence": _BSD,
                        "source": "Middlebury 2014 stereo benchmark (Scharstein et al., "
                                  "GCPR 2014), downsampled x4"},
    "motorcycle_right": {"file": "motorcycle_right.png", "role": "real view of motorcycle_left",
                         "licence": _BSD,
                         "source": "Middlebury 2014 stereo benchmark (Scharstein et al., "
                                   "GCPR 2014), downsampled x4"},
    "rocket": {"file": "rocket.jpg", "role": "object",
               "licence": "public domain (released by SpaceX)",
               "source": "SpaceX Photos, https://www.flickr.com/photos/spacexphotos/16511594820"},
    "camera": {"file": "camera.png", "role": "object",
               "licence": "CC0 (photographer Lav Varshney)",
               "source": "scikit-image (replaced in 0.18, scikit-image issue #3927)"},
    "coins": {"file": "coins.png", "role": "object",
              "licence": "no known copyright restrictions",
              "source": "Brooklyn Museum Collection (Greek coins from Pompeii)"},
    "page": {"file": "page.png", "role": "object", "licence": _BSD,
             "source": "scikit-image (scanned page)"},
    "text": {"file": "text.png", "role": "object",
             "licence": "public domain (no known copyright restrictions)",
             "source": "Wikipedia, https://en.wikipedia.org/wiki/File:Corner.png"},
    "logo": {"file": "logo.png", "role": "object", "licence": _BSD,
             "source": "scikit-image logo"},
    "hubble_deep_field": {"file": "hubble_deep_field.jpg", "role": "object",
                          "licence": "public domain (NASA media guidelines)",
                          "source": "HubbleSite, 2012 release 37 (Hubble eXtreme Deep Field)"},
    "ihc": {"file": "ihc.png", "role": "object",
            "licence": "no known copyright restrictions",
            "source": "Center for Microscopy And Molecular Imaging (CMMI)"},
    "brick": {"file": "brick.png", "role": "background", "licence": "CC0",
              "source": "CC0Textures, Bricks25 (perspective-corrected, cropped by scikit-image)"},
    "grass": {"file": "grass.png", "role": "background", "licence": "CC0",
              "source": "DeviantArt, linolafett, Grass-01"},
    "gravel": {"file": "gravel.png", "role": "background", "licence": "CC0",
               "source": "CC0Textures, Gravel04"},
    "moon": {"file": "moon.png", "role": "background", "licence": _BSD,
             "source": "scikit-image (surface of the moon)"},
    "cell": {"file": "cell.png", "role": "background", "licence": "CC0",
             "source": "Mueller et al., Optics Express 26(8), 2018 (qpformat)"},
    "clock_motion": {"file": "clock_motion.png", "role": "background",
                     "licence": "public domain (photographer Stefan van der Walt)",
                     "source": "scikit-image (motion-blurred clock)"},
    "retina": {"file": "retina.jpg", "role": "background", "licence": "CC0 1.0",
               "source": "Wikimedia Commons, Fundus_photograph_of_normal_left_eye.jpg "
                         "(Mikael Haggstrom)"},
    "color": {"file": "color.png", "role": "background", "licence": _BSD,
              "source": "scikit-image (colour wheel)"},
    "horse": {"file": "horse.png", "role": "background",
              "licence": "CC0 (Andreas Preuss, marauder)",
              "source": "openclipart, horse-by-marauder"},
    "microaneurysms": {"file": "microaneurysms.png", "role": "background",
                       "licence": "CC0 (Andreas Maier)",
                       "source": "High-Resolution Fundus (HRF) Image Database, 07_dr.JPG"},
}


# --------------------------------------------------------------------------- #
# Source photos
# --------------------------------------------------------------------------- #
def skimage_data_dir() -> Path:
    """The ``data`` folder of the installed scikit-image package (not imported).

    Raises ``ImportError`` (with the install hint) if scikit-image is absent.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the d2r demo set is built from photos shipped with scikit-image: "
            "pip install scikit-image  (or: pip install d2r[demo])")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data"
        if d.is_dir():
            return d
    raise ImportError("scikit-image is installed but its data folder was not found")


def _available(data_dir: Path, names: Sequence[str]) -> List[str]:
    return [n for n in names if (data_dir / _FILES[n]).is_file()]


def _strip_png_iccp(data: bytes) -> bytes:
    """Drop ``iCCP`` chunks from PNG bytes (libpng warns about page.png's; the
    pixels do not depend on it, OpenCV ignores colour profiles)."""
    sig = b"\x89PNG\r\n\x1a\n"
    if not data.startswith(sig):
        return data
    out, pos = [sig], len(sig)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        if data[pos + 4:pos + 8] != b"iCCP":
            out.append(data[pos:end])
        pos = end
    return b"".join(out)


def _read_photo(path: Path) -> np.ndarray:
    """A photo as HxWx3 uint8 BGR; alpha composited on white."""
    import cv2

    buf = np.frombuffer(_strip_png_iccp(Path(path).read_bytes()), dtype=np.uint8)
    im = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if im is None:
        raise ValueError(f"cannot decode {path}")
    if im.dtype != np.uint8:
        im = cv2.convertScaleAbs(im, alpha=255.0 / max(1.0, float(im.max())))
    if im.ndim == 2:
        return cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
    if im.shape[2] == 4:
        a = im[:, :, 3:4].astype(np.float32) / 255.0
        rgb = im[:, :, :3].astype(np.float32)
        return np.clip(rgb * a + 255.0 * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(im[:, :, :3])


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# Image synthesis
# --------------------------------------------------------------------------- #
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _canvas_size(rng: np.random.Generator, size: int,
                 landscape: Optional[bool] = None) -> Tuple[int, int]:
    """(W, H) with long side ``size``, a random aspect, and the given (else a
    random, 70 % landscape) orientation."""
    aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 16 / 10]))
    short = int(round(size / aspect))
    land = rng.random() < 0.7
    if landscape is not None:
        land = landscape
    return (size, short) if land else (short, size)


def _quad(rng, w: int, h: int, center, area: float, rot_deg: float, persp: float,
          aniso: float = 0.1) -> np.ndarray:
    """Corners (TL, TR, BR, BL) of a w x h image mapped to about ``area`` pixels."""
    s = np.sqrt(area / float(w * h))
    a = np.exp(rng.uniform(-aniso, aniso))
    hw, hh = 0.5 * w * s * a, 0.5 * h * s / a
    pts = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]], np.float64)
    pts += rng.uniform(-persp, persp, (4, 2)) * np.array([2 * hw, 2 * hh])
    t = np.deg2rad(rng.uniform(-rot_deg, rot_deg))
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return pts @ rot.T + np.asarray(center, np.float64)


def _quad_area(q: np.ndarray) -> float:
    x, y = q[:, 0], q[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _clip_poly(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Sutherland-Hodgman clipping of a polygon (N, 2) to a rectangle."""
    pts = [tuple(p) for p in np.asarray(poly, np.float64)]
    for axis, bound, keep_greater in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if not pts:
            break
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            cin = cur[axis] >= bound if keep_greater else cur[axis] <= bound
            pin = prev[axis] >= bound if keep_greater else prev[axis] <= bound
            if cin != pin:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if cin:
                out.append(cur)
        pts = out
    return np.array(pts, np.float64).reshape(-1, 2)


def _paste(canvas: np.ndarray, img: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """Warp ``img`` onto ``quad`` of ``canvas`` (in place); return the uint8 mask."""
    import cv2

    H, W = canvas.shape[:2]
    h, w = img.shape[:2]
    scale = np.sqrt(_quad_area(quad) / float(w * h))
    if scale < 0.8:  # pre-shrink with area averaging to avoid aliasing
        f = min(1.0, 1.25 * scale)
        nw, nh = max(2, int(round(w * f))), max(2, int(round(h * f)))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        h, w = nh, nw
    mask = np.zeros((H, W), np.uint8)
    # work only inside the quad's bounding box (clipped to the canvas)
    x0 = max(0, int(np.floor(quad[:, 0].min())) - 1)
    y0 = max(0, int(np.floor(quad[:, 1].min())) - 1)
    x1 = min(W, int(np.ceil(quad[:, 0].max())) + 1)
    y1 = min(H, int(np.ceil(quad[:, 1].max())) + 1)
    if x1 <= x0 or y1 <= y0:
        return mask
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    dst = (quad - np.array([x0, y0], np.float64)).astype(np.float32)
    M = cv2.getPerspectiveTransform(src, dst)
    dsize = (x1 - x0, y1 - y0)
    warped = cv2.warpPerspective(img, M, dsize, flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT)
    m = cv2.warpPerspective(np.full((h, w), 255, np.uint8), M, dsize,
                            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    mask[y0:y1, x0:x1] = m
    roi = canvas[y0:y1, x0:x1]
    a = m.astype(np.float32)[:, :, None] * np.float32(1.0 / 255.0)
    blended = roi.astype(np.float32)
    blended += (warped.astype(np.float32) - blended) * a
    blended += 0.5
    np.clip(blended, 0, 255, out=blended)
    roi[...] = blended.astype(np.uint8)
    return mask


def _mask_box(mask: np.ndarray) -> Optional[List[float]]:
    m = mask > 127
    cols = np.flatnonzero(m.any(axis=0))
    rows = np.flatnonzero(m.any(axis=1))
    if cols.size == 0:
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _illumination(rng, img: np.ndarray, strength: float) -> np.ndarray:
    """Gamma, gain and colour cast (``strength`` in [0, 1])."""
    import cv2

    g = float(np.exp(rng.uniform(-0.5, 0.5) * strength))
    gain = 1.0 + rng.uniform(-0.3, 0.3) * strength
    cast = 1.0 + rng.uniform(-0.12, 0.12, 3) * strength
    x = np.arange(256, dtype=np.float64) / 255.0
    lut = np.stack([np.clip(255.0 * gain * c * x ** g + 0.5, 0, 255) for c in cast], axis=1)
    lut = lut.astype(np.uint8).reshape(256, 1, 3)
    return cv2.LUT(img, lut)


def _camera(rng, img: np.ndarray, strength: float) -> np.ndarray:
    """Blur, sensor noise and JPEG re-compression of the whole frame."""
    import cv2

    if rng.random() < 0.5 * strength + 0.1:
        sigma = rng.uniform(0.4, 0.4 + 1.4 * strength)
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if rng.random() < 0.5:
        sd = rng.uniform(1.0, 1.0 + 4.0 * strength)
        noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sd)
        img = np.clip(img.astype(np.float32) + noise + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.4 + 0.4 * strength:
        q = int(rng.integers(30, 86))
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
        dec = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
        if dec is not None:
            img = dec
    return img


def _random_crop(rng, img: np.ndarray, aspect: float, min_frac: float) -> np.ndarray:
    """A random crop of aspect ``aspect`` (w / h), at least ``min_frac`` of the largest one."""
    h, w = img.shape[:2]
    if w / h > aspect:
        ch, cw = float(h), h * aspect
    else:
        cw, ch = float(w), w / aspect
    f = rng.uniform(min_frac, 1.0)
    cw, ch = max(2.0, cw * f), max(2.0, ch * f)
    x0 = int(rng.uniform(0, max(0.0, w - cw)))
    y0 = int(rng.uniform(0, max(0.0, h - ch)))
    return img[y0:y0 + max(2, int(ch)), x0:x0 + max(2, int(cw))]


def _clutter(rng, bgs: List[np.ndarray], W: int, H: int, n_patches: Tuple[int, int] = (2, 5)
             ) -> np.ndarray:
    """A scene made of background photos only."""
    import cv2

    base = bgs[int(rng.integers(len(bgs)))]
    crop = _random_crop(rng, base, W / H, 0.4)
    canvas = cv2.resize(crop, (W, H), interpolation=cv2.INTER_AREA
                        if crop.shape[1] > W else cv2.INTER_LINEAR)
    canvas = _illumination(rng, canvas, 0.6)
    for _ in range(int(rng.integers(n_patches[0], n_patches[1] + 1))):
        src = bgs[int(rng.integers(len(bgs)))]
        patch = _random_crop(rng, src, float(np.exp(rng.uniform(-0.5, 0.5))), 0.3)
        patch = _illumination(rng, patch, 0.6)
        side = rng.uniform(0.2, 0.5) * max(W, H)
        center = (rng.uniform(0, W), rng.uniform(0, H))
        q = _quad(rng, patch.shape[1], patch.shape[0], center, side * side, 45.0, 0.1)
        _paste(canvas, patch, q)
    return canvas


def _place(rng, obj: np.ndarray, W: int, H: int, *, area: Tuple[float, float],
           rot: float, persp: float, vis: Tuple[float, float], min_cover: float = 0.0,
           spread: float = 1.0, margin: float = 0.0, tries: int = 60) -> np.ndarray:
    """Sample a quad for ``obj`` whose visible fraction lies in ``vis``.

    ``spread``: the centre is drawn in a box ``spread`` times the frame size,
    centred on the frame. ``min_cover``: minimum fraction of the frame covered.
    ``margin``: the visible part is counted inside the frame inset by this
    fraction of its short side.
    If ``vis[0] >= 0.9`` (object meant to be whole) the area is capped so that
    the object's extent fits the frame. The sample closest to the constraints is
    returned if none satisfies them.
    """
    h, w = obj.shape[:2]
    m_px = int(round(margin * min(W, H)))
    fit = float(w * h) * min((W - 2 * m_px) / (1.3 * w), (H - 2 * m_px) / (1.3 * h)) ** 2
    best, best_err = None, np.inf
    for _ in range(tries):
        a = rng.uniform(*area) * W * H
        if vis[0] >= 0.9:
            a = min(a, fit)
        cx = W * (0.5 + spread * rng.uniform(-0.5, 0.5))
        cy = H * (0.5 + spread * rng.uniform(-0.5, 0.5))
        q = _quad(rng, w, h, (cx, cy), a, rot, persp)
        qa = _quad_area(q)
        inside = _quad_area(_clip_poly(q, m_px, m_px, W - m_px, H - m_px)) / max(qa, 1e-9)
        cover = _quad_area(_clip_poly(q, 0, 0, W, H)) / float(W * H)
        err = max(0.0, vis[0] - inside) + max(0.0, inside - vis[1]) + max(0.0, min_cover - cover)
        if err < best_err:
            best, best_err = q, err
        if err == 0.0:
            break
    assert best is not None   # the first try always improves on an infinite error
    return best


def _view(rng, kind: str, obj: np.ndarray, bgs: List[np.ndarray], size: int
          ) -> Tuple[np.ndarray, Optional[List[float]]]:
    """One database view of ``obj``; returns (BGR image, gt box)."""
    h, w = obj.shape[:2]
    W, H = _canvas_size(rng, size, landscape=(w >= h) if kind == "easy" else None)
    canvas = _clutter(rng, bgs, W, H)
    if kind == "easy":
        q = _place(rng, obj, W, H, area=(0.5, 1.1), rot=15.0, persp=0.08,
                   vis=(0.65, 1.0), min_cover=0.4, spread=0.3)
        strength = 0.6
    elif kind == "hard":
        q = _place(rng, obj, W, H, area=(0.03, 0.10), rot=30.0, persp=0.15,
                   vis=(0.9999, 1.0), spread=0.9, margin=0.01)
        strength = 1.0
    elif kind == "junk":
        if rng.random() < 0.5:  # mostly off the frame
            q = _place(rng, obj, W, H, area=(0.3, 0.6), rot=30.0, persp=0.12,
                       vis=(0.05, 0.20), spread=2.0)
        else:  # tiny, strong viewpoint change
            q = _place(rng, obj, W, H, area=(0.004, 0.012), rot=60.0, persp=0.2,
                       vis=(0.9999, 1.0), spread=0.9, margin=0.01)
        strength = 1.0
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    mask = _paste(canvas, _illumination(rng, obj, strength), q)
    box = _mask_box(mask)
    if kind == "hard" and rng.random() < 1 / 3 and box is not None:  # partial occluder
        src = bgs[int(rng.integers(len(bgs)))]
        patch = _illumination(rng, _random_crop(rng, src, 1.0, 0.3), 0.6)
        x1, y1, x2, y2 = box
        side = 0.5 * np.sqrt(_quad_area(q))
        t = rng.uniform(0, 1)
        edge = int(rng.integers(4))
        cx, cy = [(x1 + t * (x2 - x1), y1), (x2, y1 + t * (y2 - y1)),
                  (x1 + t * (x2 - x1), y2), (x1, y1 + t * (y2 - y1))][edge]
        _paste(canvas, patch, _quad(rng, patch.shape[1], patch.shape[0], (cx, cy),
                                    side * side, 30.0, 0.05))
    canvas = _camera(rng, canvas, strength)
    return canvas, box


def _query(rng, obj: np.ndarray, bgs: List[np.ndarray], size: int
           ) -> Tuple[np.ndarray, Optional[List[float]]]:
    h, w = obj.shape[:2]
    W, H = _canvas_size(rng, size, landscape=w >= h)
    canvas = _clutter(rng, bgs, W, H)
    q = _place(rng, obj, W, H, area=(0.35, 0.55), rot=4.0, persp=0.04,
               vis=(0.9999, 1.0), spread=0.3, margin=0.02)
    mask = _paste(canvas, _illumination(rng, obj, 0.2), q)
    return canvas, _mask_box(mask)


def _distractor(rng, bgs: List[np.ndarray], size: int) -> np.ndarray:
    W, H = _canvas_size(rng, size)
    canvas = _clutter(rng, bgs, W, H, n_patches=(3, 6))
    return _camera(rng, canvas, 0.8)


def _kinds(n_views: int) -> List[str]:
    n_junk = max(1, n_views // 6) if n_views >= 3 else 0
    n_hard = (n_views - n_junk) // 2
    n_easy = n_views - n_junk - n_hard
    return ["easy"] * n_easy + ["hard"] * n_hard + ["junk"] * n_junk


# --------------------------------------------------------------------------- #
# Dataset object and cache
# --------------------------------------------------------------------------- #
@dataclass
class DemoSet(RealMix):
    """The demo set: the :class:`~d2r.datasets.realmix.RealMix` attributes plus

    db_boxes : per database image, a (k, 4) float64 array of ground-truth boxes
        ``(x1, y1, x2, y2)`` in pixels (k = 1 for object views, 0 for distractors).
    db_kinds : per database image, ``"easy"``, ``"hard"``, ``"junk"``, ``"real"``
        or ``"distractor"``.

    params : the generation parameters; licences : :data:`LICENCES` of the photos used.

    ``gnd[i]["bbx"]`` is the query's object box (the query is meant to be cropped
    to it); ``db_groups`` / ``query_groups`` are object names (``"distractor"``
    for clutter-only images); families are ``"objects"`` / ``"distractor"``.
    """

    db_boxes: List[np.ndarray] = field(default_factory=list)
    db_kinds: List[str] = field(default_factory=list)
    params: Dict[str, object] = field(default_factory=dict)
    licences: Dict[str, Dict[str, str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"DemoSet(root={str(self.root)!r}, db={self.n_db}, "
                f"queries={self.n_queries})")


def _params(seed, n_views, n_distractors, size, objects) -> Dict[str, object]:
    if int(n_views) < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if int(n_distractors) < 0:
        raise ValueError(f"n_distractors must be >= 0, got {n_distractors}")
    if not 64 <= int(size) <= 4096:
        raise ValueError(f"size must be in [64, 4096], got {size}")
    if objects is None:
        objs = list(OBJECT_PHOTOS)
    else:
        objs = [str(o) for o in objects]
        unknown = [o for o in objs if o not in OBJECT_PHOTOS]
        if unknown:
            raise ValueError(f"unknown demo objects {unknown}; choose from {OBJECT_PHOTOS}")
        if len(set(objs)) != len(objs):
            raise ValueError("objects must not repeat")
        if not objs:
            raise ValueError("objects must not be empty")
    return {"seed": int(seed), "n_views": int(n_views), "n_distractors": int(n_distractors),
            "size": int(size), "objects": objs}


def _source_info(data_dir: Path, params) -> Tuple[List[str], List[str], Dict[str, str]]:
    objs = _available(data_dir, params["objects"])
    bgs = _available(data_dir, BACKGROUND_PHOTOS)
    if not objs:
        raise FileNotFoundError(f"none of the demo object photos is in {data_dir}")
    if not bgs:
        raise FileNotFoundError(f"none of the demo background photos is in {data_dir}")
    used = list(objs) + [r for o in objs for r in _REAL_VIEWS.get(o, ())
                         if (data_dir / _FILES[r]).is_file()] + list(bgs)
    return objs, bgs, {n: _FILES[n] for n in used}


def _set_hash(params, data_dir: Path, sources: Dict[str, str]) -> str:
    import cv2

    key = {"version": _VERSION, "params": params, "cv2": str(cv2.__version__),
           "sources": {n: _file_digest(data_dir / f) for n, f in sorted(sources.items())}}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def demo_set_dir(root: Optional[PathLike] = None, seed: int = 0, n_views: int = 8,
                 n_distractors: int = 20, size: int = 800,
                 objects: Optional[Sequence[str]] = None) -> Path:
    """The folder :func:`make_demo_set` uses for these parameters (may not exist)."""
    params = _params(seed, n_views, n_distractors, size, objects)
    data_dir = skimage_data_dir()
    _, _, sources = _source_info(data_dir, params)
    base = Path(root).expanduser() if root is not None else default_cache_dir()
    return base / f"demo_{_set_hash(params, data_dir, sources)}"


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:  # pragma: no cover
        raise OSError(f"JPEG encoding failed for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    buf.tofile(str(path))


def _generate(out: Path, params, data_dir: Path, set_hash: str, progress: bool = True) -> None:
    from d2r.core.progress import bar as progress_bar

    objs, bg_names, sources = _source_info(data_dir, params)
    seed, size = params["seed"], params["size"]
    bgs = [_read_photo(data_dir / _FILES[n]) for n in bg_names]
    kinds = _kinds(params["n_views"])
    n_real = sum(1 for name in objs for real in _REAL_VIEWS.get(name, ()) if real in sources)
    bar = progress_bar(len(objs) * (1 + len(kinds)) + n_real + params["n_distractors"],
                       "generate the demo set (once)", progress)

    def write_image(path, img):
        _write_jpeg(path, img)
        if bar is not None:
            bar.update(1)

    db: List[Tuple[str, str, str, List[List[float]]]] = []  # (relpath, group, kind, boxes)
    queries: List[Tuple[str, str, Optional[List[float]]]] = []
    for name in objs:
        oi = OBJECT_PHOTOS.index(name)
        obj = _read_photo(data_dir / _FILES[name])
        img, bbx = _query(_rng(seed, 1, oi), obj, bgs, size)
        rel = f"images/{name}/query.jpg"
        write_image(out / rel, img)
        queries.append((rel, name, bbx))
        for j, kind in enumerate(kinds):
            img, box = _view(_rng(seed, 2, oi, j), kind, obj, bgs, size)
            rel = f"images/{name}/v{j:03d}.jpg"
            write_image(out / rel, img)
            db.append((rel, name, kind, [box] if box is not None else []))
        for k, real in enumerate(_REAL_VIEWS.get(name, ())):
            if real not in sources:
                continue
            img = _read_photo(data_dir / _FILES[real])
            rel = f"images/{name}/real{k:02d}.jpg"
            write_image(out / rel, img)
            h, w = img.shape[:2]
            db.append((rel, name, "real", [[0.0, 0.0, float(w), float(h)]]))
    for d in range(params["n_distractors"]):
        img = _distractor(_rng(seed, 3, d), bgs, size)
        rel = f"images/distractor/d{d:04d}.jpg"
        write_image(out / rel, img)
        db.append((rel, "distractor", "distractor", []))

    order = _rng(seed, 4).permutation(len(db))
    db = [db[i] for i in order]
    gnd = []
    for _, name, bbx in queries:
        sel = {k: [i for i, e in enumerate(db) if e[1] == name and e[2] in k]
               for k in (("easy", "real"), ("hard",), ("junk",))}
        gnd.append({"easy": sel[("easy", "real")], "hard": sel[("hard",)],
                    "junk": sel[("junk",)], "bbx": bbx})
    groups: Dict[str, List[str]] = {}
    for rel, name, _ in queries:
        groups.setdefault(name, []).append(rel)
    for rel, name, _, _ in sorted(db, key=lambda e: e[0]):
        groups.setdefault(name, []).append(rel)
    doc = {
        "imlist": [e[0] for e in db],
        "qimlist": [q[0] for q in queries],
        "gnd": gnd,
        "groups": groups,
        "boxes": [e[3] for e in db],
        "kinds": [e[2] for e in db],
        "params": params,
        "version": _VERSION,
        "hash": set_hash,
        "sources": sources,
        "licences": {n: LICENCES[n] for n in sources},
        "notes": ("d2r demo set generated from scikit-image sample photos "
                  "(see d2r.datasets.demo; licences in 'licences'). Synthetic views: "
                  "easy = object fills the frame, hard = small (3-10% of the frame) in "
                  "clutter, junk = barely visible; boxes are x1,y1,x2,y2 pixels."),
    }
    with open(out / "gnd.json", "w", encoding="utf-8") as f:
        json.dump(doc, f)
    if bar is not None:
        bar.close()


def _valid_set(folder: Path, set_hash: str) -> bool:
    gp = folder / "gnd.json"
    if not gp.is_file():
        return False
    try:
        with open(gp, "r", encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("hash") != set_hash or int(raw.get("version", -1)) != _VERSION:
            return False
        return all((folder / p).is_file() for p in list(raw["imlist"]) + list(raw["qimlist"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_demo_set(folder: PathLike) -> DemoSet:
    """Load an already generated demo set folder (the one holding ``gnd.json``)."""
    folder = Path(folder).expanduser()
    base = load_realmix(folder)
    with open(folder / "gnd.json", "r", encoding="utf-8") as f:
        raw = json.load(f)
    boxes = raw.get("boxes")
    if boxes is None or len(boxes) != base.n_db:
        raise ValueError(f"{folder / 'gnd.json'}: 'boxes' missing or not one entry per db image")
    kw = {f.name: getattr(base, f.name) for f in fields(RealMix)}
    kw["db_families"] = ["distractor" if g == "distractor" else "objects" for g in base.db_groups]
    kw["query_families"] = ["objects" for _ in base.query_groups]
    return DemoSet(
        **kw,
        db_boxes=[np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in boxes],
        db_kinds=[str(k) for k in raw.get("kinds", [])],
        params=dict(raw.get("params", {})),
        licences=dict(raw.get("licences", {})),
    )


def make_demo_set(root: Optional[PathLike] = None, seed: int = 0, n_views: int = 8,
                  n_distractors: int = 40, size: int = 1024, *,
                  objects: Optional[Sequence[str]] = None, force: bool = False,
                  verbose: bool = False, progress: bool = True) -> DemoSet:
    """Build (or reuse) the demo set and return it as a :class:`DemoSet`.

    Parameters
    ----------
    root : folder under which the set's own folder ``demo_<hash>`` is created
        (default :func:`~d2r.datasets.realmix.default_cache_dir`, i.e.
        ``$D2R_CACHE_DIR`` or ``~/.cache/d2r``). The returned ``.root`` is
        ``<root>/demo_<hash>``.
    seed : random seed; the set is a deterministic function of the seed, the
        parameters, the source photos and the OpenCV version.
    n_views : synthetic database views per object (see the module docstring for
        the easy / hard / junk split).
    n_distractors : clutter-only database images.
    size : long side of the generated images in pixels (the query too).
    objects : subset of :data:`OBJECT_PHOTOS` (default all that are installed).
    force : regenerate even if a complete set is cached.

    progress : a progress bar while the set is generated (the first time).

    Defaults: 12 queries and 137 database images of 1,024 px (generated in about 10 s).
    """
    params = _params(seed, n_views, n_distractors, size, objects)
    data_dir = skimage_data_dir()
    _, _, sources = _source_info(data_dir, params)
    set_hash = _set_hash(params, data_dir, sources)
    base = Path(root).expanduser() if root is not None else default_cache_dir()
    final = base / f"demo_{set_hash}"
    if not force and _valid_set(final, set_hash):
        return load_demo_set(final)

    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo_{set_hash}.", suffix=".tmp", dir=str(base)))
    try:
        t0 = time.perf_counter()
        _generate(tmp, params, data_dir, set_hash, progress)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700
        if verbose:
            print(f"d2r demo set generated in {time.perf_counter() - t0:.1f} s: {final}")
        if final.exists():  # stale / incomplete, forced, or another process won a race
            if not force and _valid_set(final, set_hash):
                shutil.rmtree(tmp, ignore_errors=True)
                return load_demo_set(final)
            trash = Path(tempfile.mkdtemp(prefix=f".demo_{set_hash}.", suffix=".old",
                                          dir=str(base)))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy in between
            if not _valid_set(final, set_hash):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_demo_set(final)
