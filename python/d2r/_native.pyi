"""Type stub of d2r._native, the pybind11 extension (d2r_native/*_bindings.cpp; the core in csrc/ and cuda/).

Conventions of the bindings: array arguments must already be numpy arrays of the stated dtype (another
dtype or a non-array raises TypeError, nothing is converted silently); shape errors raise ValueError.
Integer and float parameters accept what pybind11 accepts (``SupportsInt | SupportsIndex``, e.g. numpy
integers). The names marked "CUDA build only" exist only where cuda_compiled() is True (a build with
-DD2R_CUDA=ON or AUTO where nvcc was found); the Python layer reaches them with getattr (d2r/cuda.py).
tests/test_native_stub.py checks this file against the built module and the binding sources.
"""

from collections.abc import Sequence
from typing import Any, Protocol, SupportsFloat, SupportsIndex, SupportsInt, TypedDict

import numpy as np
from numpy.typing import NDArray
from typing_extensions import TypeAlias

_Int: TypeAlias = SupportsInt | SupportsIndex
_Float: TypeAlias = SupportsFloat | SupportsIndex

class _CudaArray(Protocol):
    """An object exposing __cuda_array_interface__ (a CuPy array, a PyTorch CUDA tensor, a DeviceArray)."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...

class _IndexContent(TypedDict):
    """InvertedFile.export() / GpuInvertedFile.export(): the live content in CSR form."""

    offsets: NDArray[np.int64]
    slots: NDArray[np.uint32]
    codes: NDArray[np.uint8]
    image_ids: NDArray[np.int64]
    word_counts: NDArray[np.int32]
    next_id: int

class _QuantizerStats(TypedDict):
    rows: int
    pairs: int
    screened: int
    screened2: int
    full: int
    fallback_rows: int
    plain_blocks: int
    pruned_blocks: int
    screen_dims: int
    screen_dims2: int
    dim: int
    prune_decision: int  # -1 undecided, 0 the full product, 1 pruning

# One part of InvertedFile.set_segments: (n_slots, n_entries, word_offsets, postings, page_crc or None,
# page_bytes, the MappedFile holding the arrays or None[, the index format that wrote the postings: 4, or 3
# (converted to 4 in memory)]).
_SegmentPart: TypeAlias = (
    tuple[int, int, NDArray[np.uint64], NDArray[np.uint8], NDArray[np.uint32] | None, int, MappedFile | None]
    | tuple[int, int, NDArray[np.uint64], NDArray[np.uint8], NDArray[np.uint32] | None, int, MappedFile | None, int]
)

# ---- module.cpp: threads and build information --------------------------------------------------

def set_num_threads(n: _Int) -> None: ...
def get_num_threads() -> int: ...
def scan_variants() -> list[str]:
    """The posting-scan kernels this CPU runs (csrc/scan.h): one per SIMD level in build_info()['simd_levels']"""
def scan_variant() -> str:
    """The posting-scan kernels in use (initially the SIMD level's)"""
def set_scan_variant(name: str) -> None:
    """Overrides the posting-scan kernels (for tests and benchmarks; every variant gives the same scores)"""
def build_info() -> dict[str, Any]:
    """compiler, flags, openmp, max_threads, cuda, simd (the level in use), simd_levels, ..."""

# ---- quantize_bindings.cpp -----------------------------------------------------------------------

class Quantizer:
    def __init__(self, centroids: NDArray[np.float32]) -> None: ...
    @property
    def n_words(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def pruning_enabled(self) -> bool: ...
    def search(
        self, descriptors: NDArray[np.float32], m: _Int = 1
    ) -> tuple[NDArray[np.int32], NDArray[np.float32]]: ...
    def stats(self) -> _QuantizerStats: ...
    def reset_stats(self) -> None: ...
    @property
    def prune_policy(self) -> str:
        """'auto' (default: prune while it pays, judged on the first searches), 'always' or 'never'"""
    @prune_policy.setter
    def prune_policy(self, value: str) -> None: ...

# ---- aggregate_bindings.cpp ----------------------------------------------------------------------

def aggregate(
    descriptors: NDArray[np.float32],
    assignments: NDArray[np.int32],
    centroids: NDArray[np.float32],
    image_regions: NDArray[np.int64],
    region_members: NDArray[np.int64],
    members: NDArray[np.int64] | None = None,
    kind: _Int = 0,
    binary: bool = False,
) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float32] | NDArray[np.uint8]]:
    """(word_offsets, words, codes): codes float32 (n, dim), or packed sign bits uint8 (n, ceil(dim / 8))
    when binary. kind (csrc/aggregate.h AggKind): 0 ASMK (R-ASMK over several regions), 1 naive regional."""

def vlad(
    descriptors: NDArray[np.float32],
    assignments: NDArray[np.int32],
    centroids: NDArray[np.float32],
    image_regions: NDArray[np.int64],
    region_members: NDArray[np.int64],
    members: NDArray[np.int64] | None = None,
    l2: bool = False,
) -> NDArray[np.float32]: ...

# ---- io_bindings.cpp -----------------------------------------------------------------------------

class MappedFile:
    """A read-only memory map of a whole file, released without the GIL"""

    def __init__(self, path: str) -> None: ...
    def __len__(self) -> int: ...
    @property
    def truncated(self) -> bool: ...

# ---- ivf_bindings.cpp ----------------------------------------------------------------------------

class InvertedFile:
    """Inverted file (csrc/ivf.h). Thread-safe: readers run concurrently with each other and with one writer at a time; every operation is atomic."""

    def __init__(self, n_words: _Int, dim: _Int, binary: bool, multi_entry: bool = False) -> None: ...
    @property
    def n_words(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def binary(self) -> bool: ...
    @property
    def multi_entry(self) -> bool: ...
    @property
    def code_bytes(self) -> int: ...
    @property
    def n_images(self) -> int: ...
    @property
    def n_entries(self) -> int: ...
    @property
    def next_id(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def n_segments(self) -> int: ...
    @property
    def dead_images(self) -> int: ...
    def contains(self, image_id: _Int) -> bool: ...
    def image_ids(self) -> NDArray[np.int64]: ...
    def entry_ids(self) -> NDArray[np.int64]:
        """The id of every live entry (slot order)"""
    def word_counts(self) -> NDArray[np.int32]:
        """The word count of every live entry (slot order)"""
    def add(
        self,
        word_offsets: NDArray[np.int64],
        words: NDArray[np.int32],
        codes: NDArray[np.uint8],
        image_ids: NDArray[np.int64] | None = None,
        auto_index: NDArray[np.int64] | None = None,
    ) -> NDArray[np.int64]: ...
    def remove(self, image_ids: NDArray[np.int64]) -> int: ...
    def search(
        self,
        word_offsets: NDArray[np.int64],
        words: NDArray[np.int32],
        codes: NDArray[np.uint8],
        k: _Int,
        alpha: _Float = 3.0,
        tau: _Float = 0.0,
        normalize: bool = True,
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]: ...
    def score_all(
        self,
        word_offsets: NDArray[np.int64],
        words: NDArray[np.int32],
        codes: NDArray[np.uint8],
        alpha: _Float = 3.0,
        tau: _Float = 0.0,
        normalize: bool = True,
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]: ...
    def search_pooled(
        self,
        word_offsets: NDArray[np.int64],
        words: NDArray[np.int32],
        codes: NDArray[np.uint8],
        mean: bool,
        k: _Int,
        alpha: _Float = 3.0,
        tau: _Float = 0.0,
        normalize: bool = True,
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]: ...
    def export(self) -> _IndexContent: ...
    def entry_codes(self, image_ids: NDArray[np.int64], words: NDArray[np.int32] | None = None) -> dict[str, Any]:
        """The stored codes of the given images' entries (image, word_counts, offsets, words, codes),
        restricted to the ascending `words` (None: all): for query expansion."""
    def set_content(
        self,
        offsets: NDArray[np.int64],
        slots: NDArray[np.uint32],
        codes: NDArray[np.uint8],
        image_ids: NDArray[np.int64],
        word_counts: NDArray[np.int32],
        next_id: _Int,
    ) -> None: ...
    def set_segments(
        self,
        parts: list[_SegmentPart],
        image_ids: NDArray[np.int64],
        word_counts: NDArray[np.int32],
        next_id: _Int,
    ) -> None: ...
    def verify(self) -> int:
        """Verifies every page checksum now; returns the bytes verified (IndexFileError on a mismatch)"""
    def compact(self) -> int: ...
    def writer(self, page_bytes: _Int = 1048576) -> PostingWriter:
        """A PostingWriter over the current snapshot (the live postings as one compressed segment)"""

class PostingWriter:
    """Streams a snapshot's postings compressed (csrc/ivf.h). One thread at a time."""

    # No constructor: made by InvertedFile.writer().
    def next(self, min_bytes: _Int = 67108864) -> NDArray[np.uint8]: ...
    @property
    def done(self) -> bool: ...
    @property
    def n_entries(self) -> int: ...
    @property
    def next_id(self) -> int: ...
    @property
    def page_bytes(self) -> int: ...
    def word_offsets(self) -> NDArray[np.uint64]: ...
    def page_crc(self) -> NDArray[np.uint32]: ...
    def image_ids(self) -> NDArray[np.int64]: ...
    def word_counts(self) -> NDArray[np.int32]: ...

# ---- ransac_bindings.cpp -------------------------------------------------------------------------

def match_descriptors(
    query_descriptors: NDArray[np.float32], database_descriptors: NDArray[np.float32], max_distance: _Float = 0.9
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """Nearest database descriptor of each query descriptor (squared L2, ties -> lower index), kept when its
    distance is < max_distance. Returns (query_idx int64, database_idx int64, distance float32), in
    increasing query index."""

def affine_ransac(
    src_xy: NDArray[np.float32],
    dst_xy: NDArray[np.float32],
    threshold: _Float = 10.0,
    max_trials: _Int = 1000,
    seed: _Int = 0,
    stop_probability: _Float = 1.0,
) -> tuple[int, NDArray[np.float32] | None, NDArray[np.bool_]]:
    """Affine RANSAC (3-point samples) mapping src_xy onto dst_xy (both n x 2 float32, (x, y)).
    Returns (inliers, model 2x3 float32 or None, inlier mask bool[n])."""

def verify_many(
    query_descriptors: Sequence[NDArray[np.float32]],
    query_xy: Sequence[NDArray[np.float32]],
    database_descriptors: Sequence[NDArray[np.float32]],
    database_xy: Sequence[NDArray[np.float32]],
    pairs: NDArray[np.int64],
    max_distance: _Float = 0.9,
    threshold: _Float = 10.0,
    max_trials: _Int = 1000,
    seed: _Int = 0,
    stop_probability: _Float = 1.0,
    min_matches: _Int = 4,
) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    """Putative matches + affine RANSAC for each (query image, database image) pair; images are lists of
    float32 arrays (descriptors n x D, locations n x 2 as (x, y)). Returns (inliers int32[P],
    n_matches int32[P]). Pairs run in parallel; results do not depend on the number of threads."""

# ---- cuda_bindings.cpp: in every build ---------------------------------------------------------

def cuda_compiled() -> bool: ...
def cuda_device_count() -> int: ...

# ---- cuda_bindings.cpp: CUDA build only ----------------------------------------------------------

def cuda_device_name(device: _Int = 0) -> str: ...
def cuda_runtime_info() -> str: ...
def cuda_memory_info() -> tuple[int, int]:
    """(free bytes, total bytes) of the current device."""

def cuda_alloc_test(arg0: _Int, /) -> int:
    """Allocates (and frees) that many device bytes: the out-of-memory path, for the tests."""

class CudaError(RuntimeError): ...
class CudaMemoryError(MemoryError): ...

class DeviceArray:
    """A result left in device memory. No constructor: made by GpuQuantizer.search and gpu_aggregate."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...
    def numpy(self) -> NDArray[Any]: ...
    def __len__(self) -> int: ...
    def __repr__(self) -> str: ...

class GpuQuantizer:
    def __init__(self, centroids: NDArray[np.float32]) -> None: ...
    @property
    def n_words(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def last_fallback_rows(self) -> int: ...
    def search(self, x_ptr: _Int, on_device: bool, n: _Int, m: _Int) -> tuple[DeviceArray, DeviceArray]:
        """(assignments int32 (n, m), distances float32 (n, m)) on the device; x_ptr: n x dim float32."""

def gpu_aggregate(
    quantizer: GpuQuantizer,
    x_ptr: _Int,
    x_on_device: bool,
    n_desc: _Int,
    assign_ptr: _Int,
    assign_on_device: bool,
    m: _Int,
    image_regions: NDArray[np.int64],
    region_members: NDArray[np.int64],
    members: NDArray[np.int64] | None,
    binary: bool,
) -> tuple[NDArray[np.int64], DeviceArray, DeviceArray]:
    """(word_offsets, words int32, codes: packed bits uint8 or float32) with the words and codes on the
    device; assign_ptr 0: the quantizer assigns."""

# An array argument of GpuInvertedFile: numpy (host) or a C-contiguous CUDA array.
_HostOrDevice: TypeAlias = NDArray[Any] | _CudaArray

class GpuInvertedFile:
    def __init__(self, n_words: _Int, dim: _Int, binary: bool) -> None: ...
    @property
    def n_words(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def binary(self) -> bool: ...
    @property
    def code_bytes(self) -> int: ...
    @property
    def n_images(self) -> int: ...
    @property
    def n_entries(self) -> int: ...
    @property
    def next_id(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def n_parts(self) -> int: ...
    def contains(self, image_id: _Int) -> bool: ...
    def image_ids(self) -> NDArray[np.int64]: ...
    def word_counts(self) -> NDArray[np.int32]: ...
    def add(
        self,
        word_offsets: NDArray[np.int64],
        words: _HostOrDevice,
        codes: _HostOrDevice,
        image_ids: NDArray[np.int64] | None = None,
    ) -> NDArray[np.int64]: ...
    def add_batches(
        self,
        batches: Sequence[tuple[NDArray[np.int64], _HostOrDevice, _HostOrDevice]],
        image_ids: NDArray[np.int64] | None = None,
    ) -> NDArray[np.int64]: ...
    def remove(self, image_ids: NDArray[np.int64]) -> int: ...
    def merge(self) -> None: ...
    def search(
        self,
        word_offsets: NDArray[np.int64],
        words: _HostOrDevice,
        codes: _HostOrDevice,
        k: _Int,
        alpha: _Float = 3.0,
        tau: _Float = 0.0,
        normalize: bool = True,
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]: ...
    def score_all(
        self,
        word_offsets: NDArray[np.int64],
        words: _HostOrDevice,
        codes: _HostOrDevice,
        alpha: _Float = 3.0,
        tau: _Float = 0.0,
        normalize: bool = True,
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]: ...
    def export(self) -> _IndexContent: ...
    def set_content(
        self,
        offsets: NDArray[np.int64],
        slots: NDArray[np.uint32],
        codes: NDArray[np.uint8] | NDArray[np.float32],
        image_ids: NDArray[np.int64],
        word_counts: NDArray[np.int32],
        next_id: _Int,
        owner: object = None,
    ) -> None: ...
    def _fail_after_allocations(self, n: _Int) -> None:
        """Test hook: the n-th device allocation of the next operation raises CudaMemoryError."""

def gpu_kmeans(
    x_ptr: _Int, on_device: bool, n: _Int, dim: _Int, k: _Int, niter: _Int, seed: _Int
) -> tuple[NDArray[np.float32], list[float]]:
    """(centroids float32 (k, dim), the objective of each iteration); x_ptr: n x dim float32."""
