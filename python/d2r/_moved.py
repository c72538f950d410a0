"""Old module paths of d2r <= 0.1, kept for one release as deprecated re-exports.

``d2r/index.py`` and its siblings hold nothing but a module ``__getattr__`` made here: the first use
of a name warns (DeprecationWarning, naming the new path) and returns the object from its new home,
so ``from d2r.index import Index`` keeps working and says where Index lives now."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved(old: str, new: str) -> Callable[[str], Any]:
    """The module ``__getattr__`` of the old path `old`, forwarding to the module `new`."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        target = importlib.import_module(new)
        try:
            value = getattr(target, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} (moved to {new!r}) has no attribute {name!r}") from None
        warnings.warn(f"{old} is deprecated and will be removed in the next release: use {new}.{name}",
                      DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
