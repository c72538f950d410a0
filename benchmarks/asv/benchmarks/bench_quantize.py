"""Exact quantisation (Codebook.quantize, m=1) of one query's 1,000 descriptors."""
import numpy as np

from . import _data


class Quantize:
    params = [[8192, 65536]]
    param_names = ["n_words"]
    timeout = 300

    def setup(self, n_words):
        import d2r

        _data.set_threads()
        self.codebook, self.x = _data.cached(("quantize", n_words), lambda: self._make(d2r, n_words))

    @staticmethod
    def _make(d2r, n_words):
        c = _data.clustered_centroids(n_words, seed=1)
        cb = d2r.Codebook(c)
        x, _ = _data.descriptors_near(c, 1000, seed=2)
        cb.quantize(x[:10], 1)          # builds the quantiser where that is lazy (outside the timing)
        return cb, x

    def time_quantize(self, n_words):
        self.codebook.quantize(self.x, 1)
