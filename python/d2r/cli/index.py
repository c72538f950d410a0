"""`d2r index`: an index file (or a sharded index, ``--shards``) from a feature store and a codebook."""
from __future__ import annotations

from pathlib import Path

from d2r.cli._common import EXIT_OK, UsageError, _common, _emit_json, _names_file, _ray_option, add_command, ray_session


def register(sub) -> None:
    p = add_command(sub, "index",
                    "build an index file from a feature store and a codebook (image names in OUT.names.txt)")
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
    p.set_defaults(func=run)


def run(args) -> int:
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


def _index_sharded(args, codebook) -> int:
    from d2r import distributed

    if args.base is not None:
        raise UsageError("--base is not supported with --shards / --ray (build the distractors into the store instead)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: a sharded index is a folder (manifest.json and one file per shard); "
                         "give a folder name")
    Path(args.out).mkdir(exist_ok=True)   # the index folder, which holds ray.log from the start
    with ray_session(args, args.ray or "local", args.out):
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
