"""`d2r train-codebook`: a k-means codebook (visual words) from a feature store."""
from __future__ import annotations

from d2r.cli._common import EXIT_OK, UsageError, _common, _emit_json, add_command


def register(sub) -> None:
    p = add_command(sub, "train-codebook", "k-means codebook (visual words) from a feature store")
    p.add_argument("features", help="a feature store (folder or .npz) made by `d2r extract`")
    p.add_argument("--words", type=int, default=1024, help="number of visual words (k in k-means)")
    p.add_argument("--iters", type=int, default=10, help="k-means (Lloyd) iterations")
    p.add_argument("--sample", type=int, default=200_000,
                   help="descriptors drawn at random (seeded) for k-means; faiss uses at most 256 per word")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sample and of k-means")
    p.add_argument("--out", required=True, help="output codebook file (.npy)")
    _common(p)
    p.set_defaults(func=run)


def run(args) -> int:
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
