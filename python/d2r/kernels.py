"""Deprecated: ``d2r.kernels`` moved to :mod:`d2r.core.kernels` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.kernels", "d2r.core.kernels")
