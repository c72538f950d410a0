"""`d2r evaluate`: the pipeline on a dataset with the Revisited evaluation, or a prebuilt index
evaluated on the dataset's queries (``--index``)."""
from __future__ import annotations

from pathlib import Path

from d2r.cli._common import EXIT_OK, UsageError, _emit_json, _names_file, _query_extractor, add_command
from d2r.cli._pipeline import _dataset, pipeline_options, run_pipeline


def register(sub) -> None:
    p = add_command(sub, "evaluate",
                    "the pipeline on a dataset with the Revisited evaluation (mAP Easy / Medium / Hard)")
    pipeline_options(p)
    p.add_argument("--rerank", action="store_true", help="spatial verification of the top 100")
    p.add_argument("--index", default=None, metavar="INDEX",
                   help="evaluate the dataset's queries against this prebuilt index (its database images plus "
                        "distractors, e.g. from `d2r index STORE --base r1m.d2r`) instead of running the pipeline")
    p.add_argument("--max-features", type=int, default=None,
                   help="features per query with --index (default: the index's record)")
    p.add_argument("--delf", default=None, metavar="WEIGHTS", help="DELF weights, for an index of DELF features")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.index is None:
        return run_pipeline(args, rerank=args.rerank)
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
