"""Deprecated: ``d2r.index_io`` moved to :mod:`d2r.core.index_io` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.index_io", "d2r.core.index_io")
