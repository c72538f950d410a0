"""DELF local features (METHOD.md section 2) in PyTorch, with the official "DELF-GLD" configuration.

The network is tf-slim's ResNet-50 v1 cut after block3 (stride in the last unit of each block,
``conv2d_same``: explicit symmetric padding then VALID for strided convolutions, SAME for stride 1 and
the 3x3 max-pool) and DELF's attention head (1x1 conv to 512 + batch norm + ReLU, 1x1 conv to 1,
softplus). Extraction: ``(pixel - 128) / 128``, a 7-scale pyramid resized with TensorFlow 1's
``resize_bilinear`` (``align_corners=False``, no half-pixel centres), cells with attention >= 100,
the 1000 best over all scales, receptive-field centres as locations (y, x), then L2, PCA to 128,
L2.

Weights: ``d2r convert-delf`` writes them from the official ``delf_gld_20190411`` files (needs
TensorFlow once); :func:`convert_tf_variables` maps tf-slim variable names. Nothing is downloaded.
PyTorch is an optional dependency (``pip install torch==2.13.0``).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from d2r.extract.rootsift import MIN_IMAGE_SIDE, Features

OFFICIAL_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
RF_SIZE, RF_STRIDE, RF_PADDING = 291, 32, 145
OFFICIAL_ARCHIVE = "delf_gld_20190411.tar.gz (https://storage.googleapis.com/delf/delf_gld_20190411.tar.gz)"
_BLOCKS = ((64, 3), (128, 4), (256, 6))  # (base depth, units) of block1..block3, stride 2 in the last unit


# ---- geometry (pure numpy, shared with DelfTF) ------------------------------------------------------
def receptive_boxes(height: int, width: int, rf: int = RF_SIZE, stride: int = RF_STRIDE,
                    padding: int = RF_PADDING) -> np.ndarray:
    """Receptive field (ymin, xmin, ymax, xmax) of every cell of a height x width feature map, row-major:
    ``stride * [i, j, i, j] + [-padding, -padding, rf - 1 - padding, rf - 1 - padding]`` (official)."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pts = np.stack([y.ravel(), x.ravel()], 1).astype(np.float32)
    boxes = stride * np.concatenate([pts, pts], 1)
    return boxes + np.array([-padding, -padding, rf - 1 - padding, rf - 1 - padding], np.float32)


def keypoint_centers(boxes: np.ndarray) -> np.ndarray:
    """Centres (y, x) of boxes (ymin, xmin, ymax, xmax)."""
    return ((boxes[:, :2] + boxes[:, 2:]) / 2.0).astype(np.float32)


def scaled_size(height: int, width: int, scale: float):
    """The pyramid level's size: round(side * scale) with TensorFlow's round-half-to-even."""
    return int(np.round(height * np.float32(scale))), int(np.round(width * np.float32(scale)))


def postprocess_descriptors(features: np.ndarray, pca_mean=None, pca_matrix=None, pca_dim: int = 128) -> np.ndarray:
    """L2-normalise, subtract the PCA mean, project on the first pca_dim rows, L2-normalise (official)."""
    def l2n(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    d = l2n(features.astype(np.float32))
    if pca_matrix is not None:
        d = (d - pca_mean[None, :]) @ pca_matrix[:pca_dim].T
        d = l2n(d)
    return np.ascontiguousarray(d, dtype=np.float32)


def cells_to_features(locations, feats, scales, scores, pca=None, pca_dim: int = 128) -> Features:
    """Features of the selected cells: descriptors post-processed as DELF does (PCA when given)."""
    pm = None if pca is None else pca["mean"]
    pmat = None if pca is None else pca["matrix"]
    return Features(postprocess_descriptors(feats, pm, pmat, pca_dim), locations, scales, scores)


def no_cells(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(locations, features, scales, scores) of an image too small to have features."""
    return (np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32), np.zeros(0, np.float32),
            np.zeros(0, np.float32))


def select_top(boxes, feats, scales, scores, max_features: int):
    """The max_features highest scores over all scales (stable for ties, as an IoU-1.0 NMS keeps all)."""
    order = np.argsort(-scores, kind="stable")[:max_features]
    return boxes[order], feats[order], scales[order], scores[order]


# ---- the .datum files (official PCA parameters) ------------------------------------------------------
def _varint(buf: bytes, pos: int):
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def parse_datum(data: bytes) -> np.ndarray:
    """A serialised DELF ``DatumProto`` (shape: repeated uint32 = 1; float_list = 2 or uint32_list = 3,
    each a message with repeated value = 1) as a numpy array."""
    pos, shape, values, kind = 0, [], None, None
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            n, pos = _varint(data, pos)
            chunk = data[pos:pos + n]
            if len(chunk) != n:
                raise ValueError("truncated datum field")
            pos += n
            if field == 1:  # packed shape
                p = 0
                while p < len(chunk):
                    v, p = _varint(chunk, p)
                    shape.append(v)
            elif field in (2, 3):
                kind = field
                values = _parse_list(chunk, field)
        elif wire == 0:
            v, pos = _varint(data, pos)
            if field == 1:
                shape.append(v)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in a datum file")
    if values is None:
        raise ValueError("datum holds no values")
    arr = np.asarray(values, dtype=np.float32 if kind == 2 else np.uint32)
    if shape and int(np.prod(shape)) != arr.size:
        raise ValueError(f"datum shape {shape} does not match its {arr.size} values")
    return arr.reshape(shape) if shape else arr


def _parse_list(msg: bytes, kind: int):
    out: list = []
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        field, wire = key >> 3, key & 7
        if field != 1:
            raise ValueError("unexpected field in a datum value list")
        if wire == 2:
            n, pos = _varint(msg, pos)
            chunk = msg[pos:pos + n]
            pos += n
            if kind == 2:
                out.extend(struct.unpack(f"<{n // 4}f", chunk))
            else:
                p = 0
                while p < len(chunk):
                    v, p = _varint(chunk, p)
                    out.append(v)
        elif wire == 5 and kind == 2:
            out.append(struct.unpack("<f", msg[pos:pos + 4])[0])
            pos += 4
        elif wire == 0 and kind == 3:
            v, pos = _varint(msg, pos)
            out.append(v)
        else:
            raise ValueError(f"unexpected wire type {wire} in a datum value list")
    return out


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def serialize_datum(arr: np.ndarray) -> bytes:
    """The inverse of parse_datum (float32 or uint32 arrays), as DELF's datum_io writes it."""
    arr = np.asarray(arr)
    shape = b"".join(_enc_varint(int(s)) for s in arr.shape)
    out = _enc_varint((1 << 3) | 2) + _enc_varint(len(shape)) + shape
    if arr.dtype.kind == "f":
        vals = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        inner = _enc_varint((1 << 3) | 2) + _enc_varint(len(vals)) + vals
        return out + _enc_varint((2 << 3) | 2) + _enc_varint(len(inner)) + inner
    vals = b"".join(_enc_varint(int(v)) for v in arr.ravel())
    inner = _enc_varint((1 << 3) | 2) + _enc_varint(len(vals)) + vals
    return out + _enc_varint((3 << 3) | 2) + _enc_varint(len(inner)) + inner


def read_datum(path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such .datum file (it comes with {OFFICIAL_ARCHIVE})")
    return parse_datum(path.read_bytes())


# ---- the network (PyTorch) --------------------------------------------------------------------------
def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("d2r.extract.DELF needs PyTorch: pip install torch==2.13.0") from exc
    return torch


def _build_net():
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    def conv2d_same(x, conv, stride):
        k = conv.kernel_size[0]
        if stride == 1:
            p = (k - 1) // 2
            return conv(F.pad(x, (p, k - 1 - p, p, k - 1 - p))) if k > 1 else conv(x)
        pad_total = k - 1
        beg = pad_total // 2
        return conv(F.pad(x, (beg, pad_total - beg, beg, pad_total - beg)))

    class ConvBN(nn.Module):
        def __init__(self, cin, cout, k, stride=1, relu=True):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=1e-5)
            self.stride, self.relu = stride, relu

        def forward(self, x):
            if self.conv.kernel_size[0] == 1:
                x = self.conv(x)  # 1x1, SAME == VALID (a strided 1x1 subsamples)
            else:
                x = conv2d_same(x, self.conv, self.stride)
            x = self.bn(x)
            return F.relu(x) if self.relu else x

    class Bottleneck(nn.Module):
        def __init__(self, cin, depth, bottleneck, stride):
            super().__init__()
            self.stride = stride
            self.shortcut = None if cin == depth else ConvBN(cin, depth, 1, stride, relu=False)
            self.conv1 = ConvBN(cin, bottleneck, 1)
            self.conv2 = ConvBN(bottleneck, bottleneck, 3, stride)
            self.conv3 = ConvBN(bottleneck, depth, 1, relu=False)

        def forward(self, x):
            if self.shortcut is None:
                sc = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            else:
                sc = self.shortcut(x)
            return F.relu(sc + self.conv3(self.conv2(self.conv1(x))))

    class DelfNet(nn.Module):
        """ResNet-50 v1 (tf-slim) to block3 + DELF attention. forward(NCHW normalised image) ->
        (features (N, 1024, h, w), attention (N, h, w))."""

        def __init__(self):
            super().__init__()
            self.conv1 = ConvBN(3, 64, 7, 2)
            blocks, cin = [], 64
            for base, units in _BLOCKS:
                layers = []
                for u in range(units):
                    layers.append(Bottleneck(cin, base * 4, base, 2 if u == units - 1 else 1))
                    cin = base * 4
                blocks.append(nn.Sequential(*layers))
            self.blocks = nn.ModuleList(blocks)
            self.att_conv1 = ConvBN(1024, 512, 1)
            self.att_conv2 = nn.Conv2d(512, 1, 1, bias=True)

        def forward(self, x):
            x = self.conv1(x)
            # 3x3 max-pool, stride 2, TensorFlow SAME padding (-inf)
            h, w = x.shape[-2:]
            ph = max((-(-h // 2) - 1) * 2 + 3 - h, 0)
            pw = max((-(-w // 2) - 1) * 2 + 3 - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=float("-inf"))
            x = F.max_pool2d(x, 3, 2)
            for b in self.blocks:
                x = b(x)
            att = F.softplus(self.att_conv2(self.att_conv1(x)))
            return x, att[:, 0]

    return DelfNet()


def tf_resize_bilinear(img, out_h: int, out_w: int):
    """TensorFlow 1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False) of a (C, H, W)
    torch tensor: source coordinate = destination * (in / out)."""
    torch = _torch()
    c, h, w = img.shape
    if (out_h, out_w) == (h, w):
        return img

    def axis(n_in, n_out):
        src = torch.arange(n_out, dtype=torch.float32) * (float(n_in) / float(n_out))
        i0 = torch.floor(src).long().clamp(max=n_in - 1)
        i1 = torch.clamp(i0 + 1, max=n_in - 1)
        return i0, i1, (src - i0.float())

    y0, y1, fy = axis(h, out_h)
    x0, x1, fx = axis(w, out_w)
    dev = img.device
    y0, y1, fy, x0, x1, fx = (t.to(dev) for t in (y0, y1, fy, x0, x1, fx))
    r0, r1 = img[:, y0], img[:, y1]   # the two source rows of every output row, gathered once
    a0 = r0[:, :, x0]
    top = a0 + (r0[:, :, x1] - a0) * fx
    b0 = r1[:, :, x0]
    bot = b0 + (r1[:, :, x1] - b0) * fx
    return top + (bot - top) * fy[:, None]


# ---- weights ----------------------------------------------------------------------------------------
_BN_KEYS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def convert_tf_variables(variables: Dict[str, np.ndarray], resnet_scope: str = "resnet_v1_50") -> Dict[str, np.ndarray]:
    """tf-slim variable name -> array (the official DELF checkpoint, or a tf-slim graph) into the
    DelfNet state dict (numpy arrays). Attention variables are found under any scope containing
    "attention" with layers conv1 / conv2 (or attconv1 / attconv2)."""
    out: Dict[str, np.ndarray] = {}

    def put_conv(prefix_tf, prefix_pt):
        w = variables[f"{prefix_tf}/weights"]
        out[f"{prefix_pt}.conv.weight"] = np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))
        for k_tf, k_pt in _BN_KEYS.items():
            out[f"{prefix_pt}.bn.{k_pt}"] = np.asarray(variables[f"{prefix_tf}/BatchNorm/{k_tf}"])

    try:
        put_conv(f"{resnet_scope}/conv1", "conv1")
        for b, (_, units) in enumerate(_BLOCKS):
            for u in range(units):
                tf_unit = f"{resnet_scope}/block{b + 1}/unit_{u + 1}/bottleneck_v1"
                pt_unit = f"blocks.{b}.{u}"
                if f"{tf_unit}/shortcut/weights" in variables:
                    put_conv(f"{tf_unit}/shortcut", f"{pt_unit}.shortcut")
                for c in ("conv1", "conv2", "conv3"):
                    put_conv(f"{tf_unit}/{c}", f"{pt_unit}.{c}")
    except KeyError as exc:
        raise ValueError(f"not a tf-slim ResNet-50 v1 checkpoint under {resnet_scope!r}: missing {exc}") from exc
    att = {}
    pat = re.compile(r"(^|.*/)[^/]*attention[^/]*(/.*)?/(att)?conv([12])/(weights|biases)$")
    for name in variables:
        m = pat.match(name)
        if m:
            att[(int(m.group(4)), m.group(5))] = name
    if (1, "weights") not in att or (2, "weights") not in att or (2, "biases") not in att:
        raise ValueError("no DELF attention variables (.../attention.../conv1, conv2) in the checkpoint")
    a1 = att[(1, "weights")].rsplit("/", 1)[0]
    put_conv(a1, "att_conv1")
    w2 = variables[att[(2, "weights")]]
    out["att_conv2.weight"] = np.ascontiguousarray(np.transpose(w2, (3, 2, 0, 1)))
    out["att_conv2.bias"] = np.asarray(variables[att[(2, "biases")]])
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def save_weights(path, state: Dict[str, np.ndarray], pca: Optional[Dict[str, np.ndarray]] = None) -> None:
    """A .npz of the converted network (and PCA) that DELF loads without TensorFlow."""
    from d2r.core.atomic import atomic_write

    arrays = {f"net/{k}": v for k, v in state.items()}
    if pca is not None:
        arrays.update({f"pca/{k}": np.asarray(v, np.float32) for k, v in pca.items()})
    with atomic_write(path) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


def load_weights(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no DELF weights; make them with `d2r convert-delf MODEL_DIR {path}` "
                                f"from the official {OFFICIAL_ARCHIVE}")
    z = np.load(path)
    net = {k[4:]: z[k] for k in z.files if k.startswith("net/")}
    pca = {k[4:]: z[k] for k in z.files if k.startswith("pca/")}
    return net, (pca or None)


class RebuiltInWorkers:
    """Pickles without its network (attribute `_model_attr`); unpickling, in a worker process of
    d2r.extract.extract_many, rebuilds it with `_rebuild()` and one PyTorch thread per worker."""

    _model_attr = "net"

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop(self._model_attr, None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        _torch().set_num_threads(1)
        self._rebuild()


class DELF(RebuiltInWorkers):
    """DELF extractor (PyTorch): ``DELF(weights)(image) -> Features`` with 128-D descriptors (PCA) or
    1024-D (no PCA in the weights file). image: a path, a PIL image or an HxWx3 uint8 array (RGB)."""

    def __init__(self, weights=None, *, state=None, pca=None, scales: Sequence[float] = OFFICIAL_SCALES,
                 score_threshold: float = 100.0, max_features: int = 1000, pca_dim: int = 128,
                 device: Optional[str] = None):
        torch = _torch()
        if weights is not None:
            state, pca_file = load_weights(weights)
            pca = pca if pca is not None else pca_file
        if state is None:
            raise ValueError("DELF needs weights (a file from `d2r convert-delf`) or a state dict")
        self._state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        self.net = _build_net()
        missing = self.net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
        bad = [k for k in missing.missing_keys if not k.endswith("num_batches_tracked")]
        if bad or missing.unexpected_keys:
            raise ValueError(f"DELF weights do not match the network: missing {bad[:3]}, unexpected "
                             f"{missing.unexpected_keys[:3]}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.net.eval().to(self.device)
        self.scales = tuple(float(s) for s in scales)
        self.score_threshold = float(score_threshold)
        self.max_features = int(max_features)
        self.pca = pca
        self.pca_dim = int(pca_dim)

    def _rebuild(self):
        torch = _torch()
        self.net = _build_net()
        self.net.load_state_dict({k: torch.as_tensor(v) for k, v in self._state.items()}, strict=False)
        self.net.eval().to(self.device)

    def feature_maps(self, image: np.ndarray, scale: float):
        """(features (h, w, 1024), attention (h, w)) at one pyramid scale, as numpy."""
        torch = _torch()
        img = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        img = (img - 128.0) / 128.0
        h, w = scaled_size(image.shape[0], image.shape[1], scale)
        with torch.no_grad():
            x = tf_resize_bilinear(img.to(self.device), h, w)[None]
            f, a = self.net(x)
        return f[0].permute(1, 2, 0).cpu().numpy(), a[0].cpu().numpy()

    def __call__(self, image) -> Features:
        from d2r.extract.rootsift import load_image_rgb

        img = load_image_rgb(image)
        if min(img.shape[:2]) < MIN_IMAGE_SIDE:
            return cells_to_features(*no_cells(1024), self.pca, self.pca_dim)
        B, Fs, S, A = [], [], [], []
        for s in self.scales:
            f, a = self.feature_maps(img, s)
            hh, ww = a.shape
            boxes = receptive_boxes(hh, ww) / np.float32(s)
            keep = np.nonzero(a.ravel() >= self.score_threshold)[0]
            B.append(boxes[keep])
            Fs.append(f.reshape(-1, f.shape[-1])[keep])
            S.append(np.full(keep.size, s, np.float32))
            A.append(a.ravel()[keep])
        boxes, feats, scales, scores = select_top(np.concatenate(B), np.concatenate(Fs), np.concatenate(S),
                                                  np.concatenate(A), self.max_features)
        return cells_to_features(keypoint_centers(boxes), feats, scales, scores, self.pca, self.pca_dim)

    def extract_device(self, image):
        """The device-resident path: DELF features as torch tensors on ``self.device`` (a dict:
        ``descriptors`` (n, d) float32, ``locations`` (n, 2) (y, x), ``scales`` (n,), ``scores`` (n,)).
        image: an HxWx3 uint8 torch tensor (already on the device: no host copy), or anything
        ``__call__`` takes. The pyramid, the attention threshold, the top ``max_features`` selection
        (stable, as :func:`select_top`), the receptive-field centres, L2, PCA and L2 all run on the
        device, so the descriptors can go straight to a GPU index (``d2r.cuda`` takes torch tensors
        through DLPack). Same features as ``__call__`` (float32 on both paths; on a GPU, with TF32
        off: ``torch.backends.cudnn.allow_tf32 = False``)."""
        return self.extract_device_many([image])[0]

    def extract_device_many(self, images):
        """:meth:`extract_device` of several images, one dict each, in order. Images of the same size
        go through the network together: one forward pass per pyramid level for the whole group
        (the batch norm is in inference mode, so each image's maps are its own)."""
        torch = _torch()
        from d2r.extract.rootsift import load_image_rgb

        tensors = []
        for image in images:
            if torch.is_tensor(image):
                if image.ndim != 3 or image.shape[2] != 3:
                    raise ValueError(f"image tensor must be H x W x 3 (RGB), got shape {tuple(image.shape)}")
                tensors.append(image.to(self.device))
            else:
                tensors.append(torch.as_tensor(np.ascontiguousarray(load_image_rgb(image))).to(self.device))
        groups = {}
        for i, t in enumerate(tensors):
            groups.setdefault((int(t.shape[0]), int(t.shape[1])), []).append(i)
        out = [None] * len(tensors)
        for (H, W), members in groups.items():
            if min(H, W) < MIN_IMAGE_SIDE:
                for i in members:
                    out[i] = self._device_features([], [], [], [])
                continue
            x = (torch.stack([tensors[i] for i in members]).permute(0, 3, 1, 2).to(torch.float32) - 128.0) / 128.0
            per = [([], [], [], []) for _ in members]
            with torch.no_grad():
                for s in self.scales:
                    h, w = scaled_size(H, W, s)
                    xs = torch.stack([tf_resize_bilinear(x[b], h, w) for b in range(len(members))])
                    f, a = self.net(xs)
                    for b in range(len(members)):
                        self._device_cells(f[b], a[b], s, per[b])
            for b, i in enumerate(members):
                out[i] = self._device_features(*per[b])
        return out

    def _device_cells(self, f, a, s, acc):
        """Append one pyramid level's kept cells (centres, features, scales, scores) to acc."""
        torch = _torch()
        ww = a.shape[1]
        a = a.reshape(-1)
        keep = torch.nonzero(a >= self.score_threshold).squeeze(1)
        iy = torch.div(keep, ww, rounding_mode="floor").to(torch.float32)
        ix = (keep % ww).to(torch.float32)
        # the receptive box's centre, as keypoint_centers(receptive_boxes(...) / scale)
        sc = np.float32(s)
        lo_y, lo_x = (RF_STRIDE * iy - RF_PADDING) / sc, (RF_STRIDE * ix - RF_PADDING) / sc
        hi_y = (RF_STRIDE * iy + (RF_SIZE - 1 - RF_PADDING)) / sc
        hi_x = (RF_STRIDE * ix + (RF_SIZE - 1 - RF_PADDING)) / sc
        acc[0].append(torch.stack([(lo_y + hi_y) / 2.0, (lo_x + hi_x) / 2.0], 1))
        acc[1].append(f.permute(1, 2, 0).reshape(-1, f.shape[0])[keep])
        acc[2].append(torch.full((keep.numel(),), s, dtype=torch.float32, device=self.device))
        acc[3].append(a[keep])

    def _device_features(self, C, Fs, S, A):
        """The selection (stable top max_features), L2, PCA, L2 of an image's kept cells, on the device."""
        torch = _torch()
        dim = self.pca_dim if self.pca is not None else 1024
        if not A:
            z = dict(dtype=torch.float32, device=self.device)
            return {"descriptors": torch.zeros((0, dim), **z), "locations": torch.zeros((0, 2), **z),
                    "scales": torch.zeros(0, **z), "scores": torch.zeros(0, **z)}
        with torch.no_grad():
            scores = torch.cat(A)
            order = torch.sort(-scores, stable=True).indices[:self.max_features]
            feats = torch.cat(Fs)[order]
            d = feats / torch.clamp(torch.linalg.vector_norm(feats, dim=1, keepdim=True), min=1e-12)
            if self.pca is not None:
                mean = torch.as_tensor(np.asarray(self.pca["mean"], np.float32), device=self.device)
                mat = torch.as_tensor(np.asarray(self.pca["matrix"], np.float32)[:self.pca_dim], device=self.device)
                d = (d - mean[None, :]) @ mat.T
                d = d / torch.clamp(torch.linalg.vector_norm(d, dim=1, keepdim=True), min=1e-12)
        return {"descriptors": d.contiguous(), "locations": torch.cat(C)[order], "scales": torch.cat(S)[order],
                "scores": scores[order]}


class DelfTF:
    """The official DELF SavedModel run through TensorFlow (optional; ``pip install ".[tf]"``), with the
    official tensor names (``input_image``, ``input_abs_thres``, ``input_scales``,
    ``input_max_feature_num`` -> ``boxes``, ``features``, ``scales``, ``scores``) and the same
    post-processing as :class:`DELF` (centres of the boxes as locations; L2, PCA, L2), so the two can be
    compared image by image. model_dir: the unpacked ``delf_gld_20190411`` (``model/`` and ``pca/``) or
    the SavedModel folder itself."""

    def __init__(self, model_dir, pca_dir=None, *, scales: Sequence[float] = OFFICIAL_SCALES,
                 score_threshold: float = 100.0, max_features: int = 1000, pca_dim: int = 128, use_pca: bool = True):
        try:
            import tensorflow as tf
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("DelfTF needs TensorFlow: pip install tensorflow-cpu") from exc
        root = Path(model_dir)
        saved = root / "model" if (root / "model" / "saved_model.pb").exists() else root
        if not (saved / "saved_model.pb").exists():
            raise FileNotFoundError(f"{root}: no saved_model.pb (in it or in model/); DelfTF needs the unpacked "
                                    f"official {OFFICIAL_ARCHIVE}")
        self._graph = tf.Graph()
        self._sess = tf.compat.v1.Session(graph=self._graph)
        with self._graph.as_default():
            tf.compat.v1.saved_model.loader.load(self._sess, [tf.compat.v1.saved_model.tag_constants.SERVING],
                                                 str(saved))
        g = self._graph
        self._inputs = [g.get_tensor_by_name(n) for n in
                        ("input_image:0", "input_abs_thres:0", "input_scales:0", "input_max_feature_num:0")]
        self._outputs = [g.get_tensor_by_name(n) for n in ("boxes:0", "features:0", "scales:0", "scores:0")]
        self.scales = tuple(float(s) for s in scales)
        self.score_threshold = float(score_threshold)
        self.max_features = int(max_features)
        self.pca_dim = int(pca_dim)
        self.pca = None
        pca_dir = Path(pca_dir) if pca_dir is not None else root / "pca"
        if use_pca and (pca_dir / "mean.datum").exists():
            self.pca = {"mean": read_datum(pca_dir / "mean.datum").reshape(-1),
                        "matrix": read_datum(pca_dir / "pca_proj_mat.datum")}

    def raw(self, image):
        """The SavedModel's own outputs: (boxes, features, scales, scores) as numpy."""
        from d2r.extract.rootsift import load_image_rgb

        img = load_image_rgb(image)
        feed = dict(zip(self._inputs, (img, self.score_threshold, np.asarray(self.scales, np.float32),
                                       self.max_features)))
        boxes, feats, scales, scores = self._sess.run(self._outputs, feed)
        return boxes, feats, np.asarray(scales).reshape(-1), np.asarray(scores).reshape(-1)

    def __call__(self, image) -> Features:
        from d2r.extract.rootsift import load_image_rgb

        img = load_image_rgb(image)
        if min(img.shape[:2]) < MIN_IMAGE_SIDE:
            return cells_to_features(*no_cells(1024), self.pca, self.pca_dim)
        boxes, feats, scales, scores = self.raw(img)
        return cells_to_features(keypoint_centers(np.asarray(boxes, np.float32)), feats, scales, scores, self.pca,
                                 self.pca_dim)
