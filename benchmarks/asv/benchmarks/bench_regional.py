"""Regional search (RegionalSearchIndex, max pooling): every region of a database image is its own
ASMK* entry and an image scores the max over its regions. 2,000 images of 300 descriptors with 5
regions each (10,000 entries), 8,192 words, one query of 1,000 descriptors, k=100."""
import numpy as np

from . import _data
from .bench_add import _regions

N_WORDS = 8192
N_IMAGES = 2000
PER_IMAGE = 300


def _build():
    import d2r

    c = _data.clustered_centroids(N_WORDS, seed=1)
    cb = d2r.Codebook(c)
    x, w = _data.descriptors_near(c, N_IMAGES * PER_IMAGE, seed=11)
    regions, assign = _regions(d2r, x, w, N_IMAGES, PER_IMAGE, seed=12)
    idx = d2r.RegionalSearchIndex(cb, kernel="asmk*", pooling="max")
    idx.add_regions_many(regions, progress=False, assignments=assign, fingerprint=cb.fingerprint)
    qx, _ = _data.descriptors_near(c, 1000, seed=13)
    q = d2r.aggregate(qx, cb, "asmk*")
    return idx, q


class RegionalSearch:
    timeout = 300

    def setup(self):
        _data.set_threads()
        self.index, self.query = _data.cached("regional", _build)

    def time_regional_search(self):
        self.index.search_aggregated(self.query, k=100)
