"""Deprecated: ``d2r.evaluate`` moved to :mod:`d2r.core.evaluate` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.evaluate", "d2r.core.evaluate")
