"""Deprecated: ``d2r.index`` moved to :mod:`d2r.core.index` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.index", "d2r.core.index")
