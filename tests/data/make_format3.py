"""Writes format3.d2r and format3_expected.npz (tests/test_scan.py): run with a d2r of index format 3
(commit 125be59) on the path, e.g.

    git worktree add /tmp/base-scan 125be59   # build its extension, then:
    PYTHONPATH=/tmp/base-scan/python python tests/data/make_format3.py
"""
from pathlib import Path

import numpy as np

import d2r
from d2r.synthetic import zipf_images

assert d2r.index_io.FORMAT_VERSION == 3, "needs the d2r of index format 3"
here = Path(__file__).parent
cb = d2r.Codebook(np.random.default_rng(3).standard_normal((64, 128)).astype(np.float32))
idx = d2r.Index(cb, "asmk*")
idx.add_aggregated(zipf_images(500, 64, 80, 0.6, seed=10, fingerprint=cb.fingerprint))
idx.remove(np.arange(0, 500, 37))
idx.save(here / "format3.d2r")
qs = list(zipf_images(6, 64, 80, 0.6, seed=11, fingerprint=cb.fingerprint))
r = [np.asarray(x) for x in idx.search_aggregated(qs, k=None)]
ids, scores = (r[0], r[1]) if r[0].dtype.kind in "iu" else (r[1], r[0])
np.savez(here / "format3_expected.npz", ids=ids, scores=scores)
