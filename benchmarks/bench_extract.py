"""Extractor and detector speed on real photos (realmix database images, longest side capped at
--side): RootSIFT (1 and --workers processes), DELF (PyTorch, the official 7-scale pyramid; random
weights, which cost the same as the official ones), EfficientNet-Lite0 dense features (the same pyramid),
and the COCO SSD-MobileNet-v2 detector through OpenCV DNN. Seconds per image, on this machine's CPU
(PyTorch uses every core).

    python benchmarks/bench_extract.py [--images 6] [--sift-images 40] [--side 1024] [--json out.json]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=6, help="images for the deep extractors and the detector")
    ap.add_argument("--sift-images", type=int, default=40, help="images for RootSIFT (worker start-up amortised)")
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--image-dir", default=None, help="a folder of .jpg instead of realmix")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for the deep extractors")
    args = ap.parse_args()
    images = load_images(args.images, args.side, args.image_dir)
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
