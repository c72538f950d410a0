"""Deprecated: ``d2r.features`` moved to :mod:`d2r.extract.store` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.features", "d2r.extract.store")
