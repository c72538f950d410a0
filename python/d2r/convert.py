"""Deprecated: ``d2r.convert`` moved to :mod:`d2r.extract.convert` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.convert", "d2r.extract.convert")
