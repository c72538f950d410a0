"""`d2r convert-delf`: the official DELF model -> a weights file for d2r.extract.DELF."""
from __future__ import annotations

from d2r.cli._common import EXIT_OK, add_command


def register(sub) -> None:
    p = add_command(sub, "convert-delf", "official DELF model (delf_gld_20190411, needs TensorFlow once) -> a weights "
                                         "file for d2r.extract.DELF (PyTorch)")
    p.add_argument("model_dir", help="the unpacked archive (model/variables, pca/*.datum)")
    p.add_argument("out", help="output .npz")
    p.add_argument("--pca-dir", default=None, help="folder of mean.datum / pca_proj_mat.datum (default MODEL_DIR/pca)")
    p.set_defaults(func=run)


def run(args) -> int:
    from d2r.extract.convert import convert_delf

    info = convert_delf(args.model_dir, args.out, args.pca_dir)
    print(f"wrote {args.out}: {info['tensors']} tensors, PCA {info['pca'] or 'none'}")
    return EXIT_OK
