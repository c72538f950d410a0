"""Deprecated: ``d2r.aggregate`` moved to :mod:`d2r.core.aggregate` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.aggregate", "d2r.core.aggregate")
