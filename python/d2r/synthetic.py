"""Deprecated: ``d2r.synthetic`` moved to :mod:`d2r.workflows.synthetic` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.synthetic", "d2r.workflows.synthetic")
