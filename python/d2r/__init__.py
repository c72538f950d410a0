"""d2r: Detect-to-Retrieve image retrieval (ASMK, ASMK*, R-ASMK, R-ASMK*) with a native C++ core.

Quick start::

    import d2r
    cb = d2r.Codebook.train(sample_descriptors, n_words=1024, seed=0)
    index = d2r.Index(cb, kernel="asmk*")
    index.add([desc_img0, desc_img1, ...])
    scores, ids = index.search(query_descriptors, k=10)
"""
from d2r._version import __version__
from d2r import _native
from d2r.core.runtime import MAX_THREADS, build_info, get_num_threads, set_num_threads
from d2r.core.aggregate import Aggregated, AggregatedBatch, Regions, aggregate, vlad, KERNELS
from d2r.core.codebook import Codebook
from d2r.core.index import Index, RegionalSearchIndex
from d2r.core.expand import HQE, AlphaQE
from d2r.core.index_io import FormatWarning, IndexFileError
from d2r.extract.store import StoreMismatchError, load_features, save_features, store_info
from d2r.workflows.collection import extract_dataset
from d2r import cuda

__all__ = ["__version__", "Aggregated", "AggregatedBatch", "AlphaQE", "Codebook", "HQE", "FormatWarning", "Index", "IndexFileError",
           "KERNELS", "RegionalSearchIndex", "Regions", "StoreMismatchError", "aggregate", "build_info", "cuda",
           "extract_dataset", "load_features", "save_features", "store_info", "get_num_threads",
           "set_num_threads", "vlad"]
