"""Extractor and detector speed on real photos (realmix database images, longest side capped at
--side): RootSIFT (1 and --workers processes), DELF (PyTorch, the official 7-scale pyramid; random
weights, which cost the same as the official ones), EfficientNet-Lite0 dense features (the same pyramid),
and the COCO SSD-MobileNet-v2 detector through OpenCV DNN. Seconds per image, on this machine's CPU
(PyTorch uses every core).

    python benchmarks/bench_extract.py [--images 6] [--sift-images 40] [--side 1024] [--json out.json]
    python benchmarks/bench_extract.py --only cnn --megapixels 1.0 --images 8 --threads 1 2 --json out.json

--only cnn: the EfficientNet-Lite0 extractor alone, accurate and fast presets and the former
implementation (the package's modules, batch norms unfolded: the reference of the speed-up), each with
torch.set_num_threads(T) for every T of --threads, alternating in one run. --megapixels resizes every
image to that area (aspect kept) instead of capping its side. Wall and CPU (process) seconds per image.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from d2r.datasets import find_realmix, load_realmix
from d2r.extract import RootSIFT, extract_many
from d2r.extract.rootsift import read_image_rgb


def load_images(n: int, side: int, folder=None):
    import cv2
    from pathlib import Path

    if folder:  # e.g. the images carried to a GPU machine
        paths = sorted(Path(folder).glob("*.jpg"))
        paths = (paths * (n // max(1, len(paths)) + 1))[:n]
    else:
        root = find_realmix()
        if root is None:
            raise SystemExit("realmix not found (../shared/data/realmix or $D2R_SHARED_DATA)")
        ds = load_realmix(root)
        paths = [root / name for name in ds.imlist[:: max(1, len(ds.imlist) // n)][:n]]
    out = []
    for path in paths:
        img = read_image_rgb(path)
        s = side / max(img.shape[:2])
        if s < 1:
            img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
        out.append(img)
    return out


def timed(fn, images):
    fn(images[:1])  # warm-up (model load, first-call costs)
    t = time.perf_counter()
    res = fn(images)
    return (time.perf_counter() - t) / len(images), res


def resize_to_area(img, megapixels):
    import cv2

    s = (megapixels * 1e6 / (img.shape[0] * img.shape[1])) ** 0.5
    return cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


class UnfusedLite0:
    """The former EfficientNet-Lite0 extraction (before the batch norms were folded: the package's
    modules, torch.no_grad), kept here as the reference of the speed-up."""

    def __init__(self, fast):
        self.ex = fast

    def feature_maps(self, image, scale):
        import torch

        from d2r.extract.cnn import _STAGE_ENDS
        from d2r.extract.delf import scaled_size, tf_resize_bilinear

        m = self.ex.model
        img = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        h, w = scaled_size(image.shape[0], image.shape[1], scale)
        with torch.no_grad():
            x = (tf_resize_bilinear(img, h, w)[None] - 127.0) / 128.0
            x = m._swish(m._bn0(m._conv_stem(x)))
            outs = []
            for i, block in enumerate(m._blocks[: _STAGE_ENDS[-1] + 1]):
                x = block(x)
                if i in _STAGE_ENDS:
                    outs.append(x)
            f = torch.cat(outs, 1)[0].permute(1, 2, 0).numpy()
        return f, np.linalg.norm(f, axis=2)


def cnn_speed(images, threads, repeats=1):
    """Accurate / fast presets and the unfused reference, wall and CPU seconds per image, per thread count;
    the variants alternate image by image so that the machine's load falls on all of them alike."""
    import torch

    from d2r.extract import EfficientNetLite0Features

    acc = EfficientNetLite0Features(device="cpu")
    fast = EfficientNetLite0Features(device="cpu", preset="fast")
    ref = EfficientNetLite0Features(device="cpu")
    ref.feature_maps = UnfusedLite0(ref).feature_maps
    variants = {"accurate (7 scales)": acc, "fast (3 scales, side <= 1024)": fast,
                "accurate, unfused (the former code)": ref}
    out = {}
    for t in threads:
        torch.set_num_threads(t)
        for ex in variants.values():
            ex(images[0])  # warm-up
        wall = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        feats = {k: [] for k in variants}
        for _ in range(repeats):
            for img in images:
                for k, ex in variants.items():
                    c, w0 = time.process_time(), time.perf_counter()
                    f = ex(img)
                    wall[k].append(time.perf_counter() - w0)
                    cpu[k].append(time.process_time() - c)
                    feats[k].append(len(f.descriptors))
        for k in variants:
            row = {"threads": t, "wall_s_per_image": float(np.mean(wall[k])), "cpu_s_per_image": float(np.mean(cpu[k])),
                   "wall_s_max": float(np.max(wall[k])), "features_per_image": float(np.mean(feats[k]))}
            out[f"{k}, {t} thread{'s' if t > 1 else ''}"] = row
            print(f"{k:40s} {t} threads: {row['wall_s_per_image']:.3f} s/image wall (max {row['wall_s_max']:.3f}), "
                  f"{row['cpu_s_per_image']:.3f} CPU s/image, {row['features_per_image']:.0f} features", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=6, help="images for the deep extractors and the detector")
    ap.add_argument("--sift-images", type=int, default=40, help="images for RootSIFT (worker start-up amortised)")
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--image-dir", default=None, help="a folder of .jpg instead of realmix")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for the deep extractors")
    ap.add_argument("--only", choices=["cnn"], default=None, help="cnn: the EfficientNet-Lite0 presets alone")
    ap.add_argument("--megapixels", type=float, default=None, help="resize every image to this area")
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="--only cnn: PyTorch thread counts")
    args = ap.parse_args()
    images = load_images(args.images, args.side, args.image_dir)
    if args.megapixels:
        images = [resize_to_area(im, args.megapixels) for im in images]
    if args.only == "cnn":
        load = os.getloadavg()
        res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "load_average_before": load, "images": len(images),
               "mean_pixels": float(np.mean([im.shape[0] * im.shape[1] for im in images])),
               "sizes": [list(im.shape[:2]) for im in images]}
        print(f"{len(images)} images, {res['mean_pixels'] / 1e6:.2f} Mpixel on average; load average {load}", flush=True)
        res["cnn"] = cnn_speed(images, args.threads)
        res["load_average_after"] = os.getloadavg()
        print(f"load average after: {res['load_average_after']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "device": args.device,
           "images": len(images),
           "mean_pixels": float(np.mean([im.shape[0] * im.shape[1] for im in images])), "extractors": {}}

    def report(name, sec, feats, note=""):
        n = float(np.mean([len(f.descriptors) if hasattr(f, "descriptors") else
                           len(f["descriptors"]) if isinstance(f, dict) else len(f[0]) for f in feats]))
        res["extractors"][name] = {"s_per_image": sec, "features_per_image": n, "note": note}
        print(f"{name:44s} {sec:8.3f} s/image  {n:7.1f} features or boxes / image  {note}", flush=True)

    sift = RootSIFT(max_features=1000)
    many = load_images(args.sift_images, args.side, args.image_dir)
    report(f"RootSIFT, 1 process ({len(many)} images)", *timed(lambda ims: [sift(im) for im in ims], many))
    report(f"RootSIFT, {args.workers} processes ({len(many)} images)",
           *timed(lambda ims: extract_many(sift, ims, workers=args.workers, progress=False), many),
           "process start-up included")
    try:
        import torch

        from d2r.extract import DELF, EfficientNetLite0Features
        from d2r.extract.delf import _build_net

        state = {k: v.numpy() for k, v in _build_net().state_dict().items() if not k.endswith("num_batches_tracked")}
        delf = DELF(state=state, device=args.device, score_threshold=0.0)
        report("DELF (PyTorch, 7 scales, top 1000)", *timed(lambda ims: [delf(im) for im in ims], images),
               f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"))
        def on_device(fn):   # the device path returns device tensors: wait for the device before timing
            def run(ims):
                out = fn(ims)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                return out
            return run

        tensors = [torch.as_tensor(im).to(args.device) for im in images]
        report("DELF device path (extract_device)",
               *timed(on_device(lambda ims: [delf.extract_device(t) for t in ims]), tensors),
               "selection, centres, L2 and PCA on the device; images already there")
        import cv2

        h, w = images[0].shape[:2]   # one size for all, so that each pyramid level is one batch
        same = [torch.as_tensor(cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA)).to(args.device) for im in images]
        report(f"DELF device path, batched ({len(same)} images of {h}x{w})",
               *timed(on_device(lambda ims: delf.extract_device_many(ims)), same),
               "extract_device_many: one forward pass per level for all images")
        lite = EfficientNetLite0Features(device=args.device)
        report("EfficientNet-Lite0 dense (7 scales, top 1000)", *timed(lambda ims: [lite(im) for im in ims], images))
    except ImportError as exc:
        print(f"(deep extractors skipped: {exc})")
    try:
        from d2r.regions.detect import OpenCVDnnDetector, ssd_mobilenet_v2_coco_files

        det = OpenCVDnnDetector(*ssd_mobilenet_v2_coco_files())
        report("SSD-MobileNet-v2 COCO detector (OpenCV DNN)", *timed(lambda ims: [det(im) for im in ims], images))
    except Exception as exc:  # the detector package is optional
        print(f"(detector skipped: {exc})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
