"""Device dispatch without an import cycle: the GPU side (d2r.cuda) depends on the CPU side and
registers itself here when imported (d2r/__init__ imports it), so the CPU modules (codebook, index)
reach the GPU implementation at call time without importing d2r.cuda."""
from __future__ import annotations

_gpu = None


def register_gpu(module) -> None:
    global _gpu
    _gpu = module


def gpu():
    """The d2r.cuda module."""
    if _gpu is None:  # d2r.cuda registers itself on import; importing d2r imports it
        import importlib

        importlib.import_module("d2r.cuda")
    return _gpu
