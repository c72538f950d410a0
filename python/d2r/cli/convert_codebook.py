"""`d2r convert-codebook`: an official codebook checkpoint -> .npy."""
from __future__ import annotations

from d2r.cli._common import EXIT_OK, add_command


def register(sub) -> None:
    p = add_command(sub, "convert-codebook", "official codebook checkpoint (variable 'clusters') -> .npy")
    p.add_argument("checkpoint", help="checkpoint prefix (or a folder holding one)")
    p.add_argument("out", help="output .npy")
    p.set_defaults(func=run)


def run(args) -> int:
    from d2r.extract.convert import convert_codebook

    c = convert_codebook(args.checkpoint, args.out)
    print(f"wrote {args.out}: {c.shape[0]} words x {c.shape[1]} dimensions")
    return EXIT_OK
