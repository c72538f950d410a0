"""Deprecated: ``d2r.codebook`` moved to :mod:`d2r.core.codebook` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.codebook", "d2r.core.codebook")
