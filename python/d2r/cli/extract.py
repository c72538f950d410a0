"""`d2r extract`: local features of images into a feature store."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from d2r.cli._common import (EXIT_OK, UsageError, _common, _emit_json, _extract_listing_skips, _images,
                             _ray_option, _skipped, add_command, ray_session)


def register(sub) -> None:
    p = add_command(sub, "extract",
                    "local features of images into a feature store (a resumable folder of shards, or one .npz)")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or .txt lists of paths")
    p.add_argument("--out", required=True, help="a folder (resumable: images already stored are skipped) or a file "
                                                "name ending in .npz")
    p.add_argument("--max-features", type=int, default=1000, help="features kept per image (the strongest)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes extracting in parallel (RootSIFT, without --detector/--proposals)")
    p.add_argument("--delf", default=None, metavar="WEIGHTS",
                   help="extract DELF instead of RootSIFT, with weights from `d2r convert-delf` (needs PyTorch)")
    p.add_argument("--regions", default=None, metavar="SOURCE",
                   help="also store each image's regions, re-extracted on their crops: none, grid:L (an L-level R-MAC "
                        "grid), mser, keypoints (keypoint clusters), ssd-coco (COCO SSD-MobileNet-v2 through "
                        "OpenCV), detector:MODEL_DIR (an official D2R detector; needs TensorFlow), boxes:FILE "
                        "(JSON or CSV boxes), discovered (found from the collection itself: each image verified "
                        "against its nearest neighbours in a first ASMK* index; no weights; see --codebook), "
                        "attention:MODEL.npz (boxes around high-attention features, d2r.regions.attention)")
    p.add_argument("--proposals", choices=["grid", "mser", "keypoints"], default=None,
                   help="deprecated: --regions grid:3 | mser | keypoints")
    p.add_argument("--detector", default=None, metavar="MODEL_DIR",
                   help="deprecated: --regions detector:MODEL_DIR")
    p.add_argument("--max-regions", type=int, default=5, help="regions kept per image")
    p.add_argument("--codebook", default=None,
                   help="--regions discovered: the codebook of the first index (default: k-means with --words on "
                        "the images' own features, saved in OUT/discover/)")
    p.add_argument("--words", type=int, default=1024, help="--regions discovered: words of the codebook it trains")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: skip it and list it)")
    _ray_option(p, "extract on a Ray cluster (Ray Data, one extractor actor per CPU or GPU; --workers: the number "
                   "of actors)")
    _common(p)
    p.set_defaults(func=run)


def _make_extractor(args):
    if getattr(args, "delf", None):
        from d2r.extract import DELF

        return DELF(args.delf, max_features=args.max_features)  # one process (the GPU when PyTorch sees one)
    from d2r.extract import RootSIFT

    return RootSIFT(max_features=args.max_features)


def _region_spec(args):
    """--regions, or the deprecated --proposals / --detector it replaces (with a warning)."""
    spec = getattr(args, "regions", None)
    old = None
    if getattr(args, "proposals", None):
        old = ("--proposals " + args.proposals, {"grid": "grid:3"}.get(args.proposals, args.proposals))
    if getattr(args, "detector", None):
        if old is not None:
            raise UsageError("give one region source: --regions (--proposals and --detector are its old names)")
        old = ("--detector " + args.detector, "detector:" + args.detector)
    if old is not None:
        if spec is not None:
            raise UsageError(f"give one region source: --regions {spec} or {old[0]} (its old name), not both")
        warnings.warn(f"{old[0]} is deprecated: use --regions {old[1]}", DeprecationWarning)
        spec = old[1]
    return spec


def run(args) -> int:
    from d2r.extract import describe
    from d2r.extract.store import save_features
    from d2r.workflows.collection import extract_dataset

    paths = _images(args.images)
    sift = _make_extractor(args)
    workers = 1 if args.delf else args.workers
    detector = None
    spec = _region_spec(args)
    if spec is not None:
        from d2r.regions import detect

        if str(args.out).endswith(".npz"):
            raise UsageError("regions (--regions) are stored in a feature-store folder: give --out a folder name, "
                             "not a .npz file")
        try:
            detector = detect.region_source(spec, max_boxes=args.max_regions)
            spec = detect.canonical_region_source(spec)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from None
        if detector is detect.DISCOVERED:
            if args.ray:
                raise UsageError("--regions discovered runs on this machine (not with --ray yet): its first pass "
                                 "can be made on a cluster with `d2r extract --ray` into a store of its own, then "
                                 "`d2r.discover.discover_regions` in Python")
            return _run_discovered(args, paths, sift, workers)
        if isinstance(detector, str) and detector == "attention":
            raise UsageError("--regions attention trains its model on the whole collection: `d2r evaluate --regions "
                             "attention` does; here give a trained model, --regions attention:MODEL.npz "
                             "(d2r.regions.attention.AttentionModel.save)")
        if detector is None:
            spec = None
    on_error = "raise" if args.strict else "skip"
    if args.ray:
        if str(args.out).endswith(".npz") or args.strict:
            raise UsageError("--ray writes a feature-store folder (give --out a folder name) and skips unreadable "
                             "images (no --strict)")
        from d2r import distributed

        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {args.out}: exists and is not a folder (--ray writes a feature-store folder)")
        out.mkdir(exist_ok=True)   # the store folder, which holds ray.log from the start
        ext = distributed._Factory(type(sift), args.delf, max_features=args.max_features) if args.delf else sift
        if spec is not None and spec.startswith("detector:"):   # a TensorFlow model: loaded in each actor
            detector = distributed._Factory(detect.TFSavedModelDetector, spec.partition(":")[2])
        from d2r.extract import UnreadableImagesWarning

        with ray_session(args, args.ray, out), warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadableImagesWarning)   # the skipped images are listed below
            stored, errors = distributed.extract(paths, args.out, ext,
                                                 actors=args.workers if args.workers > 1 else None,
                                                 detector=detector, max_regions=args.max_regions, region_source=spec,
                                                 progress=not args.quiet)
    elif str(args.out).endswith(".npz"):
        feats = _extract_listing_skips(sift, paths, workers=workers, progress=not args.quiet, on_error=on_error)
        names = [os.path.abspath(p) for p in feats.images]
        save_features(args.out, names, list(feats), extractor=describe(sift), errors=feats.errors)
        stored, errors = names, feats.errors
    else:
        stored, errors = extract_dataset(paths, args.out, sift, detector=detector, max_regions=args.max_regions,
                                         region_source=spec,
                                         workers=workers,
                                         progress=not args.quiet, strict=args.strict)
    skipped = _skipped("extract", errors, args.json)
    counts = _counts(stored)
    if args.json:
        _emit_json({"store": str(args.out), "images_stored": len(stored), **counts, "skipped": skipped})
    else:
        where = "listed in errors.json" if not str(args.out).endswith(".npz") else "listed in the file's errors"
        print(f"{len(stored)} images stored in {args.out}" + _counts_text(counts, errors, where))
    return EXIT_OK


def _counts(stored) -> dict:
    """{"kept": images already stored by an earlier run, "added": images this run stored} when known."""
    if hasattr(stored, "kept"):
        return {"kept": int(stored.kept), "added": int(stored.added)}
    return {}


def _counts_text(counts, errors, where) -> str:
    parts = []
    if counts and counts["kept"]:   # a resumed run: what it found and what it added
        parts.append(f"{counts['kept']} kept from an earlier run, {counts['added']} added")
    if errors:
        parts.append(f"{len(errors)} unreadable, {where}")
    return f" ({'; '.join(parts)})" if parts else ""


def _run_discovered(args, paths, sift, workers) -> int:
    """`d2r extract --regions discovered`: d2r.workflows.discovered.extract_with_discovered_regions, reported."""
    from d2r.workflows.discovered import extract_with_discovered_regions

    res = extract_with_discovered_regions(paths, args.out, sift, workers=workers, codebook=args.codebook,
                                          words=args.words, max_regions=args.max_regions, strict=args.strict,
                                          progress=not args.quiet)
    out, errors, boxes_file = Path(args.out), res["errors"], res["boxes_file"]
    skipped = _skipped("extract", errors, args.json)
    counts = _counts(res["stored"])
    summary = {"store": str(out), "images_stored": len(res["stored"]), **counts, "skipped": skipped,
               "regions_per_image": res["regions_per_image"],
               "images_without_regions": res["images_without_regions"],
               "codebook_words": res["codebook_words"]}
    if args.json:
        _emit_json(summary)
    else:
        print(f"{len(res['stored'])} images stored in {out} with regions discovered from the collection "
              f"({summary['regions_per_image']:.1f} per new image, {summary['images_without_regions']} new images "
              f"without one; boxes in {boxes_file})" + _counts_text(counts, errors, f"listed in {res['errors_file']}"))
    return EXIT_OK
