"""Conversion of the official TensorFlow files into files d2r reads without TensorFlow:

* ``convert_delf(model_dir, out)``: the ``delf_gld_20190411`` model (SavedModel variables, read through
  TensorFlow) and its ``pca/*.datum`` files (read by d2r's own protobuf reader) into one ``.npz`` that
  :class:`d2r.extract.DELF` loads;
* ``convert_codebook(checkpoint, out)``: an official codebook checkpoint (variable ``clusters``,
  C x 128 centroids) into a ``.npy`` for :class:`d2r.Codebook`.

TensorFlow is needed only here (``pip install tensorflow-cpu``); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d2r.extract.delf import OFFICIAL_ARCHIVE, convert_tf_variables, read_datum, save_weights

OFFICIAL_CODEBOOKS = "rparis6k_codebook_65536 / roxford5k_codebook_65536 (https://storage.googleapis.com/delf/)"


def _tf():
    try:
        import tensorflow as tf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading TensorFlow checkpoints needs TensorFlow: pip install tensorflow-cpu") from exc
    return tf


def checkpoint_variables(prefix) -> dict:
    """Every variable of a TensorFlow checkpoint (``prefix`` as given to a Saver: files prefix.index and
    prefix.data-*), as numpy arrays."""
    prefix = str(prefix)
    if not Path(prefix + ".index").exists():
        raise FileNotFoundError(f"{prefix}.index: no TensorFlow checkpoint there")
    reader = _tf().train.load_checkpoint(prefix)
    return {name: np.asarray(reader.get_tensor(name)) for name in reader.get_variable_to_shape_map()}


def _delf_checkpoint(model_dir: Path) -> Path:
    for cand in (model_dir / "model" / "variables" / "variables", model_dir / "variables" / "variables"):
        if Path(str(cand) + ".index").exists():
            return cand
    raise FileNotFoundError(f"{model_dir}: no SavedModel variables (model/variables/variables.index); "
                            f"MODEL_DIR is the unpacked official {OFFICIAL_ARCHIVE}")


def _resnet_scope(variables: dict) -> str:
    for name in variables:
        if name.endswith("/block1/unit_1/bottleneck_v1/conv1/weights"):
            return name[: -len("/block1/unit_1/bottleneck_v1/conv1/weights")]
    raise ValueError("no tf-slim ResNet v1 variables (…/block1/unit_1/bottleneck_v1/conv1/weights) in the model")


def convert_delf(model_dir, out, pca_dir=None) -> dict:
    """Write the DELF weights (+ PCA when the .datum files are there) to ``out`` (.npz). Returns a summary."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such folder (the unpacked official {OFFICIAL_ARCHIVE})")
    variables = checkpoint_variables(_delf_checkpoint(model_dir))
    state = convert_tf_variables(variables, _resnet_scope(variables))
    pca_dir = Path(pca_dir) if pca_dir is not None else model_dir / "pca"
    pca = None
    mean_f, mat_f = pca_dir / "mean.datum", pca_dir / "pca_proj_mat.datum"
    if mean_f.exists() or mat_f.exists():
        pca = {"mean": read_datum(mean_f).reshape(-1), "matrix": read_datum(mat_f)}
        if pca["matrix"].ndim != 2 or pca["matrix"].shape[1] != pca["mean"].shape[0]:
            raise ValueError(f"PCA matrix {pca['matrix'].shape} does not match its mean {pca['mean'].shape}")
    save_weights(out, state, pca)
    return {"tensors": len(state), "pca": None if pca is None else list(pca["matrix"].shape)}


def convert_codebook(checkpoint, out) -> np.ndarray:
    """The ``clusters`` variable (C x D) of an official codebook checkpoint, saved as .npy."""
    from d2r.core.atomic import atomic_write

    prefix = Path(checkpoint)
    if prefix.is_dir():  # a folder holding one checkpoint
        idx = sorted(prefix.glob("*.index"))
        if not idx:
            raise FileNotFoundError(f"{prefix}: no checkpoint (*.index) in this folder ({OFFICIAL_CODEBOOKS})")
        prefix = idx[0].with_suffix("")
    variables = checkpoint_variables(prefix)
    names = [n for n in variables if n == "clusters" or n.endswith("/clusters")]
    if not names:
        raise ValueError(f"{prefix}: no variable named 'clusters' (has {sorted(variables)[:5]})")
    c = np.ascontiguousarray(variables[names[0]], dtype=np.float32)
    if c.ndim != 2:
        raise ValueError(f"'clusters' has shape {c.shape}, expected (C, D)")
    if not np.isfinite(c).all():
        raise ValueError("'clusters' holds NaN or Inf")
    with atomic_write(out) as f:
        np.save(f, c)
    return c
