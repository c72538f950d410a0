"""Prepare the realmix data the GPU check carries to the device machine (which has no ../shared and no
faiss): raw SIFT of 150 database images and 20 queries (uint8, RootSIFT is applied there by the same
d2r code) and a 1,024-word codebook trained here with faiss. Writes .device_data/realmix.npz (git-ignored;
`run` carries it)."""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

import d2r  # noqa: E402
from d2r.datasets.realmix import _build_or_load, realmix_rootsift  # noqa: E402


def main():
    feats = realmix_rootsift(max_features=1000, progress=False, as_arrays=True)
    _, data, _ = _build_or_load(1000, None, None, None, 1, False, False)
    sift = data["sift"]
    assert np.all(sift == np.round(sift)) and sift.min() >= 0 and sift.max() <= 255, "SIFT is not 0..255 integer"
    counts = data["counts"].astype(np.int64)
    offs = np.concatenate([[0], np.cumsum(counts)])
    n_db = int(data["n_db"])

    def pack(rows):
        parts = [sift[offs[i]:offs[i + 1]] for i in rows]
        o = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])]).astype(np.int64)
        return np.vstack(parts).astype(np.uint8), o

    db_sift, db_off = pack(range(min(150, n_db)))
    q_sift, q_off = pack(range(n_db, n_db + 20))
    sample = np.vstack(feats["query"][20:])
    cb = d2r.Codebook.train(sample, 1024, niter=8, seed=0)
    out = ROOT / ".device_data"
    out.mkdir(exist_ok=True)
    np.savez_compressed(out / "realmix.npz", db_sift=db_sift, db_offsets=db_off, q_sift=q_sift, q_offsets=q_off,
                        codebook=cb.centroids)
    print(out / "realmix.npz", (out / "realmix.npz").stat().st_size // 1024, "KiB")


if __name__ == "__main__":
    main()
