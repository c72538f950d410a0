"""Deprecated: ``d2r.verify`` moved to :mod:`d2r.core.verify` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.verify", "d2r.core.verify")
