"""Deprecated: ``d2r.pipeline`` moved to :mod:`d2r.workflows.pipeline` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.pipeline", "d2r.workflows.pipeline")
