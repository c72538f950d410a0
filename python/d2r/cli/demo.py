"""`d2r demo`: the whole pipeline on built-in photographs (or a dataset): one table and an HTML report."""
from __future__ import annotations

import sys

from d2r.cli._common import EXIT_OK, add_command
from d2r.cli._pipeline import pipeline_options, run_pipeline


def register(sub) -> None:
    p = add_command(sub, "demo", "the whole pipeline on built-in photographs: one table and an HTML report",
                    "Extracts RootSIFT, re-extracts each database box, trains a codebook, builds ASMK*, R-ASMK* and "
                    "regional-search indexes, searches, re-ranks with spatial verification and evaluates with the "
                    "Revisited protocol (mAP Easy / Medium / Hard).")
    pipeline_options(p)
    p.add_argument("--no-rerank", action="store_true", help="skip spatial verification")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.dataset == "synthetic":
        from d2r.workflows.synthetic import run_synthetic_demo

        run_synthetic_demo(seed=args.seed, out=sys.stdout)
        return EXIT_OK
    return run_pipeline(args, rerank=not args.no_rerank)
