"""The native core's build and threads: :func:`build_info`, :func:`set_num_threads`,
:func:`get_num_threads` (re-exported by the top-level package)."""
from __future__ import annotations

import numbers as _numbers
from typing import Any

import d2r._native as _native
from d2r._version import __version__

__all__ = ["MAX_THREADS", "build_info", "get_num_threads", "set_num_threads"]


def build_info() -> dict[str, Any]:
    """How the native core was built: compiler, flags, OpenMP, threads, CUDA, and its SIMD level:
    ``simd`` the level in use ("scalar", "avx2" or "avx512": the best this CPU supports, or the
    environment variable ``D2R_SIMD`` read at import; an unknown or unsupported value fails the
    import), ``simd_levels`` the levels compiled in and supported by this CPU (every level gives the
    same results; the posting scan's kernels follow the same level)."""
    info = dict(_native.build_info())
    info["version"] = __version__
    info["cuda_devices"] = _native.cuda_device_count()
    return info


MAX_THREADS = 4096


def set_num_threads(n: int) -> None:
    """Threads used by the native core, 1 to MAX_THREADS (results do not depend on it)."""
    if isinstance(n, bool) or not isinstance(n, _numbers.Integral) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"number of threads must be an integer from 1 to {MAX_THREADS}, got {n!r}")
    _native.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the native core uses (see set_num_threads)."""
    return int(_native.get_num_threads())
