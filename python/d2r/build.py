"""Deprecated: ``d2r.build`` moved to :mod:`d2r.workflows.build` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.build", "d2r.workflows.build")
