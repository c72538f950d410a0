"""Deprecated: ``d2r.discover`` moved to :mod:`d2r.regions.discover` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.discover", "d2r.regions.discover")
