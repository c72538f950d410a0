"""Cluttered composites from real photos: a view pasted at a small fraction of the area of an unrelated
photo, with its box. Used by the regional end-to-end test and the proposals benchmark (realmix)."""
from __future__ import annotations

from typing import Tuple

import numpy as np


def resize_rgb(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """OpenCV resize to w x h (INTER_AREA when shrinking, INTER_LINEAR when enlarging)."""
    import cv2

    interp = cv2.INTER_AREA if w * h < img.shape[0] * img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, (int(w), int(h)), interpolation=interp)


def paste_composite(background: np.ndarray, view: np.ndarray, rng: np.random.Generator, side: int = 1024,
                    area: Tuple[float, float] = (0.05, 0.15)) -> Tuple[np.ndarray, np.ndarray]:
    """background resized to `side` (longest side) with `view` pasted over a fraction of its area drawn
    uniformly from `area`, at a random position, aspect ratio kept. Returns (image, box (1, 4) as
    x1, y1, x2, y2 of the pasted area)."""
    bh, bw = background.shape[:2]
    s = side / max(bh, bw)
    W, H = max(1, round(bw * s)), max(1, round(bh * s))
    comp = resize_rgb(background, W, H).copy()
    frac = rng.uniform(*area)
    vh, vw = view.shape[:2]
    aspect = vw / vh
    h = np.sqrt(frac * W * H / aspect)
    w = aspect * h
    shrink = min(1.0, W / w, H / h)
    w, h = max(16, int(round(w * shrink))), max(16, int(round(h * shrink)))
    x0 = int(rng.integers(0, W - w + 1))
    y0 = int(rng.integers(0, H - h + 1))
    comp[y0:y0 + h, x0:x0 + w] = resize_rgb(view, w, h)
    return comp, np.array([[x0, y0, x0 + w, y0 + h]], np.float64)


def paste_clutter_composite(background: np.ndarray, view: np.ndarray, others, rng: np.random.Generator,
                            side: int = 1024, area: Tuple[float, float] = (0.04, 0.15)
                            ) -> Tuple[np.ndarray, np.ndarray]:
    """As :func:`paste_composite`, with the photos of `others` (unrelated) pasted first, each over a
    fraction of the area drawn from `area` at a random position, then `view` on top (unoccluded): the
    object is one of several pasted things, as in a cluttered scene. Returns (image, the view's box
    (1, 4))."""
    comp = background
    for o in others:
        comp, _ = paste_composite(comp, o, rng, side, area)
    return paste_composite(comp, view, rng, side, area)
