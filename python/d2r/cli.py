"""The `d2r` command."""
from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    from .demo import run_synthetic_demo

    run_synthetic_demo(n_objects=args.objects, n_clutter=args.clutter, n_words=args.words, seed=args.seed,
                       out=sys.stdout)
    return 0


def _info(args) -> int:
    import json

    from . import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="d2r", description="Detect-to-Retrieve image retrieval (ASMK*, R-ASMK*)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="index and search built-in synthetic scenes with ASMK*, R-ASMK* and regional search")
    p.add_argument("--objects", type=int, default=60, help="number of objects (queries)")
    p.add_argument("--clutter", type=int, default=600, help="number of clutter-only database images")
    p.add_argument("--words", type=int, default=1024, help="codebook size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    p = sub.add_parser("info", help="print how the native core was built")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"d2r {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    t0 = time.time()
    sys.exit(main())
