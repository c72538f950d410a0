"""The binding surface d2r.cuda computes with: the native module's CUDA part, or a stand-in of it
(:mod:`d2r.cuda.standin`, for machines without a GPU). Chosen here, in one place."""
from __future__ import annotations

from typing import Any

import d2r._native as _native

_active: Any = None


def surface() -> Any:
    """The active binding surface (the native module unless a stand-in was set)."""
    return _native if _active is None else _active


def set_surface(s: Any) -> Any:
    """Sets the binding surface (None: the native module); returns the previous one."""
    global _active
    prev = _active
    _active = s
    return prev
