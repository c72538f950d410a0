"""Adding images: aggregation of descriptors (ASMK*, R-ASMK*) and insertion of aggregated images.

The descriptors' word assignments are given (the words that generated them), so these time the
aggregation and the inverted-file insertion without the quantiser (bench_quantize times that)."""
import numpy as np

from . import _data

N_WORDS = 8192


def _descriptor_images(n_images, per_image, seed):
    c = _data.clustered_centroids(N_WORDS, seed=1)
    x, w = _data.descriptors_near(c, n_images * per_image, seed=seed)
    return c, x, w


class AddDescriptors:
    """Index.add of 100 images of 1,000 descriptors each (ASMK*), word assignments given."""
    number = 1
    timeout = 300

    def setup(self):
        import d2r

        _data.set_threads()
        c, self.x, w = _data.cached("add-desc", lambda: _descriptor_images(100, 1000, seed=3))
        self.cb = _data.cached("cb8192", lambda: d2r.Codebook(c))
        self.assign = w.reshape(-1, 1)
        self.offsets = np.arange(0, 101, dtype=np.int64) * 1000
        self.index = d2r.Index(self.cb, kernel="asmk*")

    def time_add_asmk_star(self):
        self.index.add(self.x, offsets=self.offsets, assignments=self.assign, fingerprint=self.cb.fingerprint)


class AddRegions:
    """Index.add_regions_many of 100 images (R-ASMK*): 1,000 descriptors, 5 regions each (the whole
    image and four random halves), word assignments given."""
    number = 1
    timeout = 300

    def setup(self):
        import d2r

        _data.set_threads()
        c, x, w = _data.cached("add-desc", lambda: _descriptor_images(100, 1000, seed=3))
        self.cb = _data.cached("cb8192", lambda: d2r.Codebook(c))
        self.regions, self.assign = _data.cached("add-regions", lambda: _regions(d2r, x, w, 100, 1000, seed=4))
        self.index = d2r.Index(self.cb, kernel="rasmk*")

    def time_add_regions_rasmk_star(self):
        self.index.add_regions_many(self.regions, assignments=self.assign, fingerprint=self.cb.fingerprint)


def _regions(d2r, x, w, n_images, per_image, seed, n_sub=4, share=0.5):
    rng = np.random.default_rng(seed)
    regions, assign = [], []
    for i in range(n_images):
        rows = slice(i * per_image, (i + 1) * per_image)
        subs = [np.sort(rng.choice(per_image, int(per_image * share), replace=False)) for _ in range(n_sub)]
        members = np.concatenate([np.arange(per_image)] + subs).astype(np.int64)
        offsets = np.zeros(n_sub + 2, np.int64)
        offsets[1:] = np.cumsum([per_image] + [s.size for s in subs])
        regions.append(d2r.Regions(x[rows], offsets, members))
        assign.append(w[rows].reshape(-1, 1))
    return regions, assign


class AddAggregated:
    """Index.add_aggregated of 1,500 synthetic aggregated ASMK* images (65,536 words, ~990 words each)."""
    number = 1
    timeout = 300

    def setup(self):
        import d2r

        _data.set_threads()
        self.cb = _data.cached("cb65536", lambda: d2r.Codebook(_data.random_centroids(65536)))
        self.batch = _data.cached("agg1500", lambda: _data.zipf_images(1500, 65536, seed=5,
                                                                         fingerprint=self.cb.fingerprint))
        self.index = d2r.Index(self.cb, kernel="asmk*")

    def time_add_aggregated(self):
        self.index.add_aggregated(self.batch)
