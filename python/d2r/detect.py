"""Deprecated: ``d2r.detect`` moved to :mod:`d2r.regions.detect` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.detect", "d2r.regions.detect")
