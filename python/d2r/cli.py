"""The `d2r` command: demo (the main job), extract, train-codebook, index, search, evaluate, convert-delf,
convert-codebook, info."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _dataset(spec: str):
    """'demo', 'realmix', 'synthetic', 'roxford5k:ROOT', 'rparis6k:ROOT' or 'folder:ROOT:PAIRS.csv'."""
    if spec == "demo":
        from .datasets.demo import make_demo_set

        return make_demo_set()
    if spec == "realmix":
        from .datasets import load_realmix

        return load_realmix()
    name, _, rest = spec.partition(":")
    if name in ("roxford5k", "rparis6k") and rest:
        from .datasets.revisited import load_revisited

        return load_revisited(rest, name)
    if name == "folder" and rest:
        from .datasets.revisited import load_folder

        root, _, pairs = rest.partition(":")
        return load_folder(root, pairs)
    raise ValueError(f"unknown dataset {spec!r}: use demo, realmix, synthetic, roxford5k:ROOT, rparis6k:ROOT "
                     "or folder:ROOT:PAIRS.csv")


def _demo(args) -> int:
    if args.dataset == "synthetic":
        from .synthetic import run_synthetic_demo

        run_synthetic_demo(seed=args.seed, out=sys.stdout)
        return 0
    from .pipeline import run

    ds = _dataset(args.dataset)
    run(ds, n_words=args.words, proposals=args.proposals, rerank=not args.no_rerank, report_dir=args.report,
        seed=args.seed, progress=not args.quiet)
    return 0


def _images(paths):
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"))
        elif p.suffix == ".txt":
            out += [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image, folder or list")
    if not out:
        raise ValueError("no images found")
    return out


def _extract(args) -> int:
    from .extract import RootSIFT, extract_many
    from .features import extract_dataset, save_features

    paths = _images(args.images)
    if args.delf:
        from .extract import DELF

        sift = DELF(args.delf, max_features=args.max_features)  # one process (the GPU when PyTorch sees one)
        args.workers = 1
    else:
        sift = RootSIFT(max_features=args.max_features)
    detector = None
    if args.detector or args.proposals:
        from . import detect

        if str(args.out).endswith(".npz"):
            raise ValueError("regions (--proposals / --detector) are stored in a feature-store folder, not a .npz")
        detector = (detect.TFSavedModelDetector(args.detector) if args.detector else
                    {"grid": lambda: detect.GridProposals(levels=3), "mser": detect.MSERProposals,
                     "keypoints": detect.KeypointClusterProposals}[args.proposals]())
    if str(args.out).endswith(".npz"):
        feats = extract_many(sift, [str(p) for p in paths], workers=args.workers)
        save_features(args.out, [str(p) for p in paths], feats)
        print(f"{len(paths)} images, {sum(len(f.descriptors) for f in feats)} descriptors -> {args.out}")
        return 0
    stored, errors = extract_dataset(paths, args.out, sift, detector=detector, max_regions=args.max_regions)
    for name, err in errors:
        print(f"skipped {name}: {err}", file=sys.stderr)
    print(f"{len(stored)} images stored in {args.out} ({len(errors)} unreadable, listed in errors.json)")
    return 0


def _train(args) -> int:
    import numpy as np

    from .codebook import Codebook
    from .features import load_features

    _, feats = load_features(args.features)
    x = np.vstack([f.descriptors for f in feats])
    if args.sample and len(x) > args.sample:
        x = x[np.random.default_rng(args.seed).choice(len(x), args.sample, replace=False)]
    cb = Codebook.train(x, args.words, niter=args.iters, seed=args.seed)
    cb.save(args.out)
    print(f"codebook {cb.n_words} x {cb.dim} -> {args.out}")
    return 0


def _index(args) -> int:
    from .codebook import Codebook
    from .features import load_features
    from .index import Index

    names, feats = load_features(args.features)
    index = Index(Codebook.load(args.codebook), kernel=args.kernel, normalize=not args.no_gamma)
    index.add([f.descriptors for f in feats], progress=True)
    index.save(args.out)
    (Path(str(args.out) + ".names.txt")).write_text("\n".join(names) + "\n")
    st = index.stats()
    print(f"{st['images']} images, {st['words_per_image']:.0f} words/image, {st['bytes_per_image']:.0f} bytes/image "
          f"-> {args.out}")
    return 0


def _search(args) -> int:
    from .extract import RootSIFT
    from .index import Index

    index = Index.load(args.index)
    names_file = Path(str(args.index) + ".names.txt")
    names = names_file.read_text().splitlines() if names_file.exists() else None
    sift = RootSIFT(max_features=args.max_features)
    for q in _images(args.queries):
        scores, ids = index.search(sift(str(q)).descriptors, k=args.k)
        print(f"# {q}")
        for s, i in zip(scores, ids):
            print(f"{s:.6f}\t{names[i] if names and i < len(names) else i}")
    return 0


def _evaluate(args) -> int:
    from .pipeline import run

    run(_dataset(args.dataset), n_words=args.words, proposals=args.proposals, rerank=args.rerank,
        report_dir=args.report, seed=args.seed, progress=not args.quiet)
    return 0


def _info(args) -> int:
    import json

    from . import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def _convert_delf(args) -> int:
    from .convert import convert_delf

    info = convert_delf(args.model_dir, args.out, args.pca_dir)
    print(f"wrote {args.out}: {info['tensors']} tensors, PCA {info['pca'] or 'none'}")
    return 0


def _convert_codebook(args) -> int:
    from .convert import convert_codebook

    c = convert_codebook(args.checkpoint, args.out)
    print(f"wrote {args.out}: {c.shape[0]} words x {c.shape[1]} dimensions")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2r", description="Detect-to-Retrieve image retrieval (ASMK*, R-ASMK*)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def pipeline_options(p, rerank_default):
        p.add_argument("--dataset", default="demo",
                       help="demo (built-in photos), realmix, synthetic, roxford5k:ROOT, rparis6k:ROOT, folder:ROOT:PAIRS.csv")
        p.add_argument("--words", type=int, default=1024, help="codebook size (default 1024)")
        p.add_argument("--proposals", default="dataset", choices=["dataset", "grid", "none"],
                       help="database regions: the dataset's boxes, a weight-free R-MAC grid, or none")
        p.add_argument("--report", default="d2r-report", help="folder for the HTML report (default d2r-report)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("demo", help="the whole pipeline on built-in photographs, with a table and an HTML report")
    pipeline_options(p, True)
    p.add_argument("--no-rerank", action="store_true", help="skip spatial verification")
    p.set_defaults(func=_demo)

    p = sub.add_parser("extract", help="RootSIFT (or DELF) features of images (files, folders or .txt lists) into a "
                                       "feature store: a resumable folder of shards, or one .npz file")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="a folder (resumable; unreadable images are skipped and "
                                                "listed in errors.json) or a file ending in .npz")
    p.add_argument("--max-features", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--delf", default=None, metavar="WEIGHTS",
                   help="extract DELF instead of RootSIFT, with weights from `d2r convert-delf` (needs PyTorch)")
    p.add_argument("--proposals", choices=["grid", "mser", "keypoints"], default=None,
                   help="also store regions: weight-free proposals (grid: 3-level R-MAC), re-extracted on crops")
    p.add_argument("--detector", default=None, metavar="MODEL_DIR",
                   help="also store regions from the official D2R detector (SavedModel; needs TensorFlow)")
    p.add_argument("--max-regions", type=int, default=5, help="regions kept per image (default 5)")
    p.set_defaults(func=_extract)

    p = sub.add_parser("train-codebook", help="k-means codebook from a feature store")
    p.add_argument("features")
    p.add_argument("--words", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sample", type=int, default=1_000_000, help="descriptors sampled for k-means")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_train)

    p = sub.add_parser("index", help="build an index file from a feature store and a codebook")
    p.add_argument("features")
    p.add_argument("--codebook", required=True)
    p.add_argument("--kernel", default="asmk*", choices=["asmk*", "asmk"])
    p.add_argument("--no-gamma", action="store_true", help="disable gamma normalisation")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_index)

    p = sub.add_parser("search", help="search an index with query images")
    p.add_argument("index")
    p.add_argument("queries", nargs="+")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--max-features", type=int, default=1000)
    p.set_defaults(func=_search)

    p = sub.add_parser("evaluate", help="the pipeline on a dataset with the Revisited evaluation")
    pipeline_options(p, False)
    p.add_argument("--rerank", action="store_true", help="spatial verification of the top 100")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("convert-delf", help="official DELF model (delf_gld_20190411, needs TensorFlow once) -> "
                                            "a weights file for d2r.extract.DELF (PyTorch)")
    p.add_argument("model_dir", help="the unpacked archive (model/variables, pca/*.datum)")
    p.add_argument("out", help="output .npz")
    p.add_argument("--pca-dir", default=None, help="folder of mean.datum / pca_proj_mat.datum (default MODEL_DIR/pca)")
    p.set_defaults(func=_convert_delf)

    p = sub.add_parser("convert-codebook", help="official codebook checkpoint (variable 'clusters') -> .npy")
    p.add_argument("checkpoint", help="checkpoint prefix (or a folder holding one)")
    p.add_argument("out", help="output .npy")
    p.set_defaults(func=_convert_codebook)

    p = sub.add_parser("info", help="how the native core was built")
    p.set_defaults(func=_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, KeyError, ImportError) as exc:
        print(f"d2r {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
