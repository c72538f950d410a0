"""Deprecated: ``d2r.report`` moved to :mod:`d2r.workflows.report` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.report", "d2r.workflows.report")
