"""Deprecated: ``d2r.serve`` moved to :mod:`d2r.distributed.serve` (this path works, with a DeprecationWarning, for one
release)."""
from d2r._moved import moved

__getattr__ = moved("d2r.serve", "d2r.distributed.serve")
