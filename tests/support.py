"""Helpers shared by the tests (no test imports another test file): synthetic clustered data with a
known structure (:class:`World`)."""
import numpy as np

import d2r


def unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


class World:
    """Clustered data: `n_objects` random unit centres; the codebook has `words_per_object` words
    around each centre; an image draws descriptors around some of the centres, so images that share
    objects share visual words and images of disjoint objects share none."""

    def __init__(self, seed, dim=128, n_objects=12, words_per_object=6, word_spread=0.45, desc_spread=0.5):
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.n_objects = n_objects
        self.centres = unit(self.rng.standard_normal((n_objects, dim)))
        owner = np.repeat(np.arange(n_objects), words_per_object)
        words = self.centres[owner] + word_spread / np.sqrt(dim) * self.rng.standard_normal((owner.size, dim))
        self.centroids = words.astype(np.float32)
        self.codebook = d2r.Codebook(self.centroids)
        self.desc_spread = desc_spread

    def descriptors(self, objects, per_object):
        parts = []
        for o, n in zip(objects, per_object):
            x = self.centres[o] + self.desc_spread / np.sqrt(self.dim) * self.rng.standard_normal((n, self.dim))
            parts.append(unit(x))
        if not parts:
            return np.zeros((0, self.dim), np.float32)
        x = np.concatenate(parts)
        return x[self.rng.permutation(x.shape[0])].astype(np.float32)

    def image(self, objects=None, lo=5, hi=40):
        if objects is None:
            k = int(self.rng.integers(1, 4))
            objects = self.rng.choice(self.n_objects - 2, size=k, replace=False)  # the last 2: "unrelated"
        return self.descriptors(objects, self.rng.integers(lo, hi, size=len(objects)))


def start_local_ray(ray) -> None:
    """A fresh local Ray cluster of 2 CPUs whose workers import d2r the way this process does (a source
    checkout on PYTHONPATH, or the installed package)."""
    import os
    from pathlib import Path

    from d2r import distributed

    root = str(Path(d2r.__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                         if p])
    if ray.is_initialized():
        ray.shutdown()
    distributed.connect("local", num_cpus=2)
