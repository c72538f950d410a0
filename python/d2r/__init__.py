"""d2r: Detect-to-Retrieve image retrieval (ASMK, ASMK*, R-ASMK, R-ASMK*) with a native C++ core.

Quick start::

    import d2r
    cb = d2r.Codebook.train(sample_descriptors, n_words=1024, seed=0)
    index = d2r.Index(cb, kernel="asmk*")
    index.add([desc_img0, desc_img1, ...])
    scores, ids = index.search(query_descriptors, k=10)
"""
import numbers as _numbers

from ._version import __version__
from . import _native
from .aggregate import Aggregated, AggregatedBatch, Regions, aggregate, vlad, KERNELS
from .codebook import Codebook
from .index import Index, RegionalSearchIndex
from .index_io import FormatWarning, IndexFileError
from .features import StoreMismatchError, extract_dataset, load_features, save_features, store_info
from . import cuda

__all__ = ["__version__", "Aggregated", "AggregatedBatch", "Codebook", "FormatWarning", "Index", "IndexFileError",
           "KERNELS", "RegionalSearchIndex", "Regions", "StoreMismatchError", "aggregate", "build_info", "cuda",
           "extract_dataset", "load_features", "save_features", "store_info", "get_num_threads",
           "set_num_threads", "vlad"]


def build_info() -> dict:
    """How the native core was built: compiler, flags, OpenMP, threads, CUDA, and its SIMD level:
    ``simd`` the level in use ("scalar", "avx2" or "avx512": the best this CPU supports, or the
    environment variable ``D2R_SIMD`` read at import), ``simd_levels`` the levels compiled in and
    supported by this CPU (every level gives the same results)."""
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
