"""`d2r search`: query images against an index file or a sharded index; the ranked images with their
scores."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from d2r.cli._common import (EXIT_OK, NothingUsable, UsageError, _common, _emit_json, _extract_listing_skips,
                             _images, _names_file, _query_extractor, _ray_option, _skipped, add_command,
                             ray_session)


def register(sub) -> None:
    p = add_command(sub, "search", "search an index with query images; prints the ranked images with their scores")
    p.add_argument("index", help="an index file from `d2r index`, or a sharded-index folder (`d2r index --shards N`; "
                                 "searched in this process, every shard memory-mapped, unless --ray is given)")
    p.add_argument("queries", nargs="+", help="query image files, folders or .txt lists")
    p.add_argument("-k", type=int, default=10, help="results per query")
    p.add_argument("--max-features", type=int, default=None,
                   help="features extracted per query (default: as many as for the indexed images, recorded by "
                        "`d2r index`; 1000 when not recorded)")
    p.add_argument("--rerank", action="store_true",
                   help="spatially verify the top results (affine RANSAC) and sort them by inliers; needs --features")
    p.add_argument("--rerank-top", type=int, default=100, help="results verified with --rerank")
    p.add_argument("--rerank-rule", default="fused", choices=["fused", "official"],
                   help="with --rerank: fused (only results with enough inliers move up, ordered by inliers; the "
                        "default) or official (every verified result sorted by inliers, as DELF does)")
    p.add_argument("--expand", default="none", choices=["none", "hqe", "hqe-fused", "aqe"],
                   help="query expansion: hqe (Hamming query expansion: the query's codes refined with those of "
                        "reliable top results), hqe-fused (its scores fused with the first search's: never lowered "
                        "mAP where measured) or aqe (alpha-QE over the top results); a second search")
    p.add_argument("--features", default=None, metavar="STORE",
                   help="the feature store the index was built from (for --rerank)")
    p.add_argument("--delf", default=None, metavar="WEIGHTS", help="DELF weights, for an index of DELF features")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable query image")
    _ray_option(p, "search a sharded index's shards on a Ray cluster, one actor per shard (default: in this process, "
                   "without Ray)")
    _common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    sharded = Path(args.index).is_dir() or Path(args.index).name == "manifest.json"
    if not sharded:
        if args.ray:
            raise UsageError(f"--ray searches a sharded index (a folder from `d2r index --shards N`); {args.index} is "
                             "one index file, searched in this process")
        return _run(args, None)
    from d2r.distributed.sharded import MANIFEST, read_manifest

    folder = Path(args.index) if Path(args.index).is_dir() else Path(args.index).parent
    if not (folder / MANIFEST).is_file():   # before anything starts (Ray takes seconds)
        raise UsageError(f"{args.index}: a folder without {MANIFEST}, so not a sharded index (a finished `d2r index "
                         "--shards N` writes it last; an unfinished one resumes when run again); give an index file "
                         "or a sharded-index folder")
    read_manifest(folder)   # corrupt or foreign: ValueError, before Ray starts
    if args.rerank:
        raise UsageError("--rerank is not supported on a sharded index yet; search a single index file")
    if not args.ray:
        from d2r.distributed.sharded import LocalShardedIndex

        with LocalShardedIndex(folder) as index:
            return _run(args, index)
    from d2r import distributed

    with ray_session(args, args.ray, folder):
        with distributed.ShardedIndex(folder) as index:
            return _run(args, index)


def _run(args, index) -> int:
    from d2r.extract import NoUsableImagesError
    from d2r.core.index import Index

    sharded = index is not None
    if sharded:
        names = index.names
    else:
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
    expand = None if args.expand == "none" else args.expand
    for q, qf in zip(extracted.images, extracted):
        # normalised scores: from an Index (not from regional search, nor a sharded index yet)
        query = index.aggregate(qf.descriptors, query=True) if isinstance(index, Index) else qf.descriptors
        if args.rerank:
            from d2r.core.verify import search_and_rerank

            from d2r.cli._pipeline import _rule_arg

            ids, inliers, scores = search_and_rerank(index, qf, db_feats, k=args.k, top=args.rerank_top,
                                                     max_distance=getattr(extractor, "match_distance", 0.9),
                                                     rule=_rule_arg(args.rerank_rule), expand=expand)
        else:
            if isinstance(index, Index):
                scores, ids = index.search_aggregated(query, k=args.k, expand=expand)
            else:
                scores, ids = index.search(query, k=args.k, expand=expand)
            inliers = None
        # (an expanded query's scores are not shares of the original query's self-similarity: no norm)
        normalized = (index.normalized_scores(query, scores, ids) if isinstance(index, Index) and expand is None
                      else [None] * len(ids))
        rows = []
        for r, (s, i, n) in enumerate(zip(scores, ids, normalized)):
            row: dict = {"rank": r + 1, "id": int(i), "score": float(s),
                         "normalized": None if n is None or not np.isfinite(n) else round(float(n), 6)}
            row["name"] = names[int(i)] if names is not None and int(i) < len(names) else None
            if inliers is not None:
                row["inliers"] = int(inliers[r])
            rows.append(row)
        results.append({"query": q, "descriptors": int(len(qf.descriptors)), "results": rows})
        if not args.json:
            _print_query(q, qf, rows, inliers is not None, first=len(results) == 1, index=index, args=args)
    if args.json:
        _emit_json({"index": str(args.index), "k": args.k, "kernel": index.kernel, "normalize": index.normalize,
                    "reranked": bool(args.rerank), "expand": expand, "queries": results, "skipped": skipped})
    return EXIT_OK


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


def _print_query(q, qf, rows, reranked, first, index, args):
    from d2r.core.index import Index

    readable = isinstance(index, Index)
    if first:
        scale = (" / sqrt(|W_query| |W_image|): 1 = the same image" if index.normalize
                 else " (gamma normalisation off: grows with the number of shared words)")
        from d2r.core.kernels import kernel_label

        print(f"# score: {kernel_label(index.kernel)} similarity, the sum of the selective matches of the visual words the "
              f"query and the image share{scale}, 0 = no word in common, -1 = no features")
        if readable:
            print("# norm: the same sum as a share of the query's similarity to itself (without gamma): 1 = the "
                  "query image itself, 0 = no word in common; it does not shrink with the image's size")
        if reranked:
            how = ("every verified result sorted by inliers, then score" if args.rerank_rule == "official" else
                   "results with enough inliers move up, sorted by inliers; the others keep their order")
            print(f"# inliers: matches consistent with one affine transform (spatial verification of the top "
                  f"{args.rerank_top}; -1: not verified); {how}")
    print(f"query: {q} ({len(qf.descriptors)} features)")
    head = (f"{'rank':>4}  {'score':>8}  " + (f"{'norm':>6}  " if readable else "")
            + (f"{'inliers':>7}  " if reranked else "") + "image")
    print(head)
    for row in rows:
        name = row["name"] if row["name"] is not None else f"id {row['id']}"
        norm = "" if not readable else ("     -  " if row["normalized"] is None else f"{row['normalized']:6.3f}  ")
        print(f"{row['rank']:>4}  {row['score']:8.4f}  " + norm + (f"{row['inliers']:>7}  " if reranked else "")
              + name)
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
