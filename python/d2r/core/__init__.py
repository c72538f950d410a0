"""The engine: codebooks, aggregation, the inverted-file indexes and their file format, spatial
verification and the Revisited evaluation, over numpy and the native module only.

Layer rule (checked by ``tests/test_layers.py`` and the import-linter contract in ``pyproject.toml``):
``d2r.core`` imports nothing else of d2r. The GPU side (:mod:`d2r.cuda`) builds on it and registers its
backend here (:mod:`d2r.core.backend`); the applications (extract, regions, datasets, workflows,
distributed, cli) import it, never the reverse."""
