"""The CUDA path of d2r: availability, array interop, and GPU versions of quantisation, aggregation,
the inverted file and k-means (kernels in cuda/, bindings in d2r_native/cuda_bindings.cpp).

Every GPU entry point gives the CPU path's answers: the same word assignments, bit-identical
aggregated codes, the same scores (64-bit fixed-point accumulation on both) and rankings.

Inputs may be numpy arrays (copied to the device), or CuPy / PyTorch CUDA arrays, used in place through
``__cuda_array_interface__`` (no copy when they are C-contiguous with the right dtype). Results come back
as numpy by default; ``output="device"`` returns :class:`DeviceArray` objects that CuPy
(``cupy.asarray``) and PyTorch (``torch.as_tensor(a, device="cuda")``) wrap without a copy.

Without a GPU, or in a build without nvcc, ``is_available()`` is False and every GPU entry point raises
:class:`CudaUnavailableError`; everything else in d2r works on the CPU.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, SupportsInt

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

import d2r._native as _native
from d2r.cuda._surface import surface as _binding
from d2r.core.checks import as_descriptors, check_positive_int
from d2r.core.kernels import AggregatedBatch, check_fingerprint, kernel_spec

if TYPE_CHECKING:
    from d2r._native import _IndexContent
    from d2r.core.codebook import Codebook

__all__ = ["is_available", "is_compiled", "device_count", "device_name", "memory_info", "CudaUnavailableError",
           "CudaError", "CudaMemoryError", "DeviceArray", "quantize", "aggregate", "GpuInvertedFile", "kmeans",
           "CUDA", "index_cpu_to_gpu", "index_gpu_to_cpu"]


class CudaUnavailableError(RuntimeError):
    """A GPU entry point was called where d2r cannot use a GPU (no CUDA build, or no device)."""


#: A CUDA runtime error (a RuntimeError); RuntimeError itself in a build without CUDA.
CudaError: type[RuntimeError] = getattr(_native, "CudaError", RuntimeError)
#: Out of GPU memory (a MemoryError); MemoryError itself in a build without CUDA.
CudaMemoryError: type[MemoryError] = getattr(_native, "CudaMemoryError", MemoryError)
#: A GPU array returned with ``output="device"``, wrapped without a copy by CuPy and PyTorch through
#: ``__cuda_array_interface__``; None in a build without CUDA.
DeviceArray: Any = getattr(_native, "DeviceArray", None)

# The largest k a GPU top-k search selects on the device (larger k: dense scores, ranked on the host).
MAX_K = 1024


def is_compiled() -> bool:
    """True when this build of d2r contains the CUDA kernels (nvcc was found at build time)."""
    return bool(_binding().cuda_compiled())


def device_count() -> int:
    return int(_binding().cuda_device_count())


def is_available() -> bool:
    """True when the CUDA kernels are compiled in and a CUDA device is present."""
    return is_compiled() and device_count() > 0


def require() -> None:
    if not is_compiled():
        raise CudaUnavailableError("this build of d2r has no CUDA kernels (nvcc was not found when it was built, "
                                   "or D2R_CUDA=OFF); reinstall on a machine with the CUDA toolkit")
    if device_count() == 0:
        raise CudaUnavailableError("no CUDA device is available (no GPU, or no NVIDIA driver on this machine)")


def device_name(device: int = 0) -> str:
    require()
    name: str = _binding().cuda_device_name(device)
    return name


def memory_info() -> tuple[int, int]:
    """(free bytes, total bytes) of the current device."""
    require()
    return tuple(_binding().cuda_memory_info())


# ---- array interop ---------------------------------------------------------------------------------
def is_device_array(x: Any) -> bool:
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:  # pragma: no cover - torch CPU tensors raise on the attribute
        return False


def _framework(x: Any) -> str:
    mod = type(x).__module__.split(".")[0]
    return mod if mod in ("torch", "cupy") else "other"


class DeviceInput:
    """A resolved input: pointer, shape, whether it is on the device, and what keeps it alive."""

    __slots__ = ("ptr", "shape", "on_device", "keep")
    ptr: int
    shape: tuple[int, ...]
    on_device: bool
    keep: Any  # the numpy or CUDA array the pointer points into

    def __init__(self, ptr: SupportsInt, shape: Iterable[int], on_device: bool, keep: Any) -> None:
        self.ptr, self.shape, self.on_device, self.keep = int(ptr), tuple(shape), bool(on_device), keep


def _contiguous_device(x: Any, dtype: np.dtype[Any], name: str) -> Any:
    """x (a CUDA array) as a C-contiguous array of dtype on the same device, converting through its own
    framework only when needed."""
    cai = x.__cuda_array_interface__
    ok_dtype = np.dtype(cai["typestr"]) == dtype
    strides = cai.get("strides")
    shape = tuple(cai["shape"])
    if strides is not None:
        expect: list[int] = []
        acc = dtype.itemsize
        for s in reversed(shape):
            expect.append(acc)
            acc *= s
        contiguous = tuple(reversed(expect)) == tuple(strides) or int(np.prod(shape)) == 0
    else:
        contiguous = True
    if ok_dtype and contiguous:
        return x
    fw = _framework(x)
    if fw == "torch":
        import torch

        tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.int32): torch.int32,
               np.dtype(np.uint8): torch.uint8, np.dtype(np.int64): torch.int64}[dtype]
        if x.is_floating_point() != (dtype.kind == "f"):
            raise TypeError(f"{name} has dtype {x.dtype}, expected {dtype}")
        return x.to(tdt).contiguous()
    if fw == "cupy":
        import cupy

        if (np.dtype(cai["typestr"]).kind == "f") != (dtype.kind == "f"):
            raise TypeError(f"{name} has dtype {np.dtype(cai['typestr'])}, expected {dtype}")
        return cupy.ascontiguousarray(x, dtype=dtype)
    raise TypeError(f"{name}: a CUDA array of dtype {np.dtype(cai['typestr'])} with strides {strides}; "
                    f"pass a C-contiguous {dtype} array")


def _device_all_finite(x: Any) -> bool:
    fw = _framework(x)
    if fw == "torch":
        import torch

        return bool(torch.isfinite(x).all().item())
    if fw == "cupy":
        import cupy

        return bool(cupy.isfinite(x).all().get())
    return True  # other producers: not checked (documented)


def as_input_matrix(x: Any, dim: int | None, name: str = "descriptors", dtype: DTypeLike = np.float32) -> DeviceInput:
    """A 2-D float32 (or int32) matrix from numpy, CuPy or PyTorch, validated like the CPU path."""
    dtype = np.dtype(dtype)
    if is_device_array(x):
        x = _contiguous_device(x, dtype, name)
        cai = x.__cuda_array_interface__
        shape = tuple(cai["shape"])
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-D (n, dim), got shape {shape}")
        if dim is not None and shape[1] != dim:
            raise ValueError(f"{name} have dimension {shape[1]}, expected {dim}")
        if dtype.kind == "f" and shape[0] and not _device_all_finite(x):
            raise ValueError(f"{name} contain NaN or Inf")
        return DeviceInput(cai["data"][0], shape, True, x)
    arr: NDArray[Any]
    if dtype.kind == "f":

        arr = as_descriptors(x, dim, name)
    else:
        arr = np.ascontiguousarray(x)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=dtype)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    return DeviceInput(arr.ctypes.data, arr.shape, False, arr)


def to_output(a: Any, output: str, like: Any = None) -> Any:
    """A DeviceArray as numpy ("numpy"), as itself ("device"), or as the framework of `like`."""
    if output == "numpy":
        return a.numpy()
    if output != "device":
        raise ValueError(f"output must be 'numpy' or 'device', got {output!r}")
    fw = _framework(like) if like is not None else "other"
    if fw == "torch":
        import torch

        return torch.as_tensor(a, device="cuda")
    if fw == "cupy":
        import cupy

        return cupy.asarray(a)
    return a


# ---- operations ------------------------------------------------------------------------------------
def _quantizer(codebook: Codebook) -> Any:
    require()
    s = _binding()
    cached = getattr(codebook, "_gpu_quantizer", None)   # (binding surface, quantizer)
    if cached is None or cached[0] is not s:
        cached = (s, s.GpuQuantizer(codebook.centroids))
        codebook._gpu_quantizer = cached
    return cached[1]


def quantize(codebook: Codebook, descriptors: Any, m: int = 1, output: str = "numpy") -> tuple[Any, Any]:
    """The m nearest words of each descriptor on the GPU: (ids int32 (n, m), squared distances float32
    (n, m)), the CPU Codebook.quantize's answer."""

    q = _quantizer(codebook)
    m = check_positive_int(m, "m")
    if m > codebook.n_words:
        raise ValueError(f"m={m} exceeds the number of words ({codebook.n_words})")
    x = as_input_matrix(descriptors, codebook.dim)
    ids, d = q.search(x.ptr, x.on_device, x.shape[0], m)
    return to_output(ids, output, x.keep), to_output(d, output, x.keep)


class DeviceBatch:
    """Aggregated images on the device, CSR: offsets (numpy), words and codes (DeviceArray)."""

    __slots__ = ("offsets", "words", "codes", "fingerprint")

    offsets: NDArray[np.int64]
    words: Any  # DeviceArray (int32)
    codes: Any  # DeviceArray (uint8 packed bits or float32)
    fingerprint: str | None

    def __init__(self, offsets: NDArray[np.int64], words: Any, codes: Any, fingerprint: str | None = None) -> None:
        self.offsets, self.words, self.codes = offsets, words, codes
        self.fingerprint = fingerprint  # the codebook's, as AggregatedBatch.fingerprint

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def code_bytes(self) -> Any:
        return self.codes  # the device inverted file reads the raw bytes through the pointer

    def to_host(self) -> AggregatedBatch:

        return AggregatedBatch(self.offsets, self.words.numpy(), self.codes.numpy(), self.fingerprint)


def aggregate(codebook: Codebook, descriptors: Any, image_regions: ArrayLike, region_members: ArrayLike,
              members: ArrayLike | None = None, kernel: str = "asmk*", m: int = 1, assignments: Any = None,
              output: str = "numpy", fingerprint: str | None = None) -> AggregatedBatch | DeviceBatch:
    """ASMK / ASMK* / R-ASMK / R-ASMK* aggregation on the GPU with the CPU layout (see
    d2r.aggregate): image i owns regions image_regions[i]:image_regions[i+1], region r the members
    region_members[r]:region_members[r+1] (indices into the descriptors when `members` is given).
    Returns an AggregatedBatch (output="numpy") or a DeviceBatch (output="device"). `fingerprint`: the
    codebook fingerprint the assignments were made with (checked when given)."""

    spec = kernel_spec(kernel)
    if spec.native_kind != 0:
        raise ValueError(f"kernel {spec.name!r} has no GPU aggregation (ASMK, ASMK*, R-ASMK, R-ASMK* do)")
    m = check_positive_int(m, "m")
    q = _quantizer(codebook)
    x = as_input_matrix(descriptors, codebook.dim)
    ir = np.ascontiguousarray(image_regions, dtype=np.int64)
    rm = np.ascontiguousarray(region_members, dtype=np.int64)
    mem = None if members is None else np.ascontiguousarray(members, dtype=np.int64)
    _check_layout(ir, rm, mem, x.shape[0])
    a_ptr, a_dev, a_keep = 0, False, None
    if assignments is not None:
        check_fingerprint(fingerprint, codebook.fingerprint, "the assignments")
        a = as_input_matrix(assignments, None, "assignments", np.int32)
        if a.shape != (x.shape[0], m):
            raise ValueError(f"assignments must have shape ({x.shape[0]}, {m}), got {a.shape}")
        if not a.on_device:
            if a.keep.size and (a.keep.min() < 0 or a.keep.max() >= codebook.n_words):
                raise ValueError(f"assignments hold word ids outside [0, {codebook.n_words})")
        a_ptr, a_dev, a_keep = a.ptr, a.on_device, a.keep
    offs, words, codes = _binding().gpu_aggregate(q, x.ptr, x.on_device, x.shape[0], a_ptr, a_dev, m, ir, rm, mem,
                                               spec.binary)
    del a_keep
    batch = DeviceBatch(offs, words, codes, codebook.fingerprint)
    if output == "numpy":
        return batch.to_host()
    if output != "device":
        raise ValueError(f"output must be 'numpy' or 'device', got {output!r}")
    return batch


def _check_layout(ir: NDArray[np.int64], rm: NDArray[np.int64], mem: NDArray[np.int64] | None, n_desc: int) -> None:
    if ir.ndim != 1 or ir.size < 1 or ir[0] != 0 or np.any(np.diff(ir) < 0):
        raise ValueError("image_regions must be non-decreasing offsets starting at 0")
    if rm.ndim != 1 or rm.size < 1 or rm[0] != 0 or np.any(np.diff(rm) < 0):
        raise ValueError("region_members must be non-decreasing offsets starting at 0")
    if ir[-1] != rm.size - 1:
        raise ValueError("image_regions must end at the number of regions")
    if mem is None:
        if rm[-1] != n_desc:
            raise ValueError("without members, region_members must end at the number of descriptors")
    else:
        if mem.ndim != 1 or mem.size != rm[-1]:
            raise ValueError("members must be 1-D with region_members[-1] entries")
        if mem.size and (mem.min() < 0 or mem.max() >= n_desc):
            raise ValueError("members hold descriptor indices out of range")


def aggregate_images(codebook: Codebook, descriptors: Any, offsets: ArrayLike, kernel: str = "asmk*", m: int = 1,
                     assignments: Any = None, output: str = "numpy",
                     fingerprint: str | None = None) -> AggregatedBatch | DeviceBatch:
    """Plain images (one region each) on the GPU: image i is descriptors[offsets[i]:offsets[i+1]]."""
    offs = np.ascontiguousarray(offsets, dtype=np.int64)
    n = offs.shape[0] - 1
    return aggregate(codebook, descriptors, np.arange(n + 1, dtype=np.int64), offs, None, kernel, m, assignments,
                     output, fingerprint)


# ---- the inverted file's boundary -------------------------------------------------------------------
# Plain functions (no device needed, so the CPU tests exercise them): the dtypes, shapes and sizes of what
# crosses into the native GPU inverted file, checked before any device call. The native side checks them
# again together with the content (offsets, word ids and their order, ids against the index) under its lock.
def _shape_dtype(a: Any) -> tuple[tuple[int, ...], np.dtype[Any], bool]:
    """(shape, dtype, on_device) of a numpy or CUDA array, without reading device memory."""
    if is_device_array(a):
        cai = a.__cuda_array_interface__
        return tuple(int(s) for s in cai["shape"]), np.dtype(cai["typestr"]), True
    if not isinstance(a, np.ndarray):
        raise TypeError(f"expected a numpy or CUDA array, got {type(a).__name__}")
    return a.shape, a.dtype, False


def _as_offsets(offsets: ArrayLike, name: str = "word_offsets") -> NDArray[np.int64]:
    off = np.asarray(offsets)
    if off.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got {off.dtype}")
    off = np.ascontiguousarray(off, dtype=np.int64)
    if off.ndim != 1 or off.size < 1:
        raise ValueError(f"{name} must be 1-D and non-empty")
    if off[0] != 0:
        raise ValueError(f"{name} must start at 0")
    if off.size > 1 and np.any(off[1:] < off[:-1]):
        raise ValueError(f"{name} must be non-decreasing")
    return off


def _check_batch(offsets: ArrayLike, words: Any, codes: Any, n_words: int, code_bytes: int, binary: bool,
                 what: str = "") -> tuple[NDArray[np.int64], Any, Any]:
    """Validated (offsets int64, words, codes) of a batch for the GPU inverted file: offsets int64 from 0,
    non-decreasing, ending at the number of words; words int32 1-D; codes uint8 (n, code_bytes) (packed
    bits, or the raw bytes of float codes) or, for a float index, float32 (n, code_bytes / 4). Host arrays
    come back C-contiguous (integer words converted to int32 only when every id fits); device arrays
    (__cuda_array_interface__) C-contiguous on their device. Word ids and their order are checked
    natively (d2r::check_codes on the host, the same rules on the device)."""
    off = _as_offsets(offsets, what + "word_offsets")
    e = int(off[-1])
    if is_device_array(words):
        shape, dt, _ = _shape_dtype(words)
        if dt != np.int32:
            raise TypeError(f"{what}words have dtype {dt}, expected int32")
        words = _contiguous_device(words, np.dtype(np.int32), what + "words")
    else:
        w = np.asarray(words)
        if w.dtype.kind not in "iu":
            raise TypeError(f"{what}words must be integer word ids, got {w.dtype}")
        if w.dtype != np.int32:
            if w.size and (w.min() < 0 or w.max() >= n_words):
                raise ValueError(f"{what}visual word id out of range [0, {n_words})")
            w = w.astype(np.int32)
        words = np.ascontiguousarray(w)
        shape = words.shape
    if len(shape) != 1 or shape[0] != e:
        raise ValueError(f"{what}words must be 1-D with word_offsets[-1] = {e} entries, got shape {tuple(shape)}")
    dim = code_bytes * 8 if binary else code_bytes // 4
    if is_device_array(codes):
        shape, dt, _ = _shape_dtype(codes)
        codes = _contiguous_device(codes, dt, what + "codes") if dt in (np.uint8, np.float32) else codes
    else:
        codes = np.asarray(codes)
        if codes.dtype in (np.uint8, np.float32):
            codes = np.ascontiguousarray(codes)
        shape, dt = codes.shape, codes.dtype
    if dt == np.uint8:
        width = code_bytes
    elif dt == np.float32 and not binary:
        width = dim
    else:
        want = "uint8 (packed bits)" if binary else "float32 (or their raw bytes as uint8)"
        raise TypeError(f"{what}codes have dtype {dt}, expected {want}")
    if len(shape) != 2 or shape[0] != e or shape[1] != width:
        raise ValueError(f"{what}codes must have shape ({e}, {width}), got {tuple(shape)}")
    return off, words, codes


_MAX_ID = 1 << 62  # as the native indexes: ids stay far from int64 overflow (next_id = max + 1)


def _check_new_ids(image_ids: ArrayLike | None, n: int) -> NDArray[np.int64] | None:
    """image_ids as int64 (n,): non-negative and unique (None stays None: the index allocates them).
    Whether they are already in the index is checked natively, under its lock."""
    if image_ids is None:
        return None
    ids = np.asarray(image_ids)
    if ids.dtype.kind not in "iu" and not (ids.size == 0 and ids.dtype.kind == "f"):
        raise TypeError(f"image ids must be integers, got {ids.dtype}")
    if ids.dtype.kind == "u" and ids.size and ids.max() >= _MAX_ID:
        raise ValueError("image ids must be in [0, 2^62)")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"one image id per image is required: {n} images, {ids.size} ids")
    if ids.size and (ids.min() < 0 or ids.max() >= _MAX_ID):
        raise ValueError("image ids must be in [0, 2^62) (non-negative)")
    if ids.size > 1 and np.unique(ids).size != ids.size:
        raise ValueError("duplicate image ids in one add")
    return ids


def _check_content(offsets: ArrayLike, slots: ArrayLike, codes: ArrayLike, image_ids: ArrayLike, word_counts: ArrayLike,
                   next_id: Any, n_words: int, code_bytes: int, binary: bool
                   ) -> tuple[NDArray[np.int64], NDArray[np.uint32], NDArray[Any], NDArray[np.int64], NDArray[np.int32],
                              int]:
    """set_content's arrays, validated for their structure (the per-posting content, slots in range and
    ascending per word with the word counts matching, is checked natively): returns them as
    (offsets int64, slots uint32, codes uint8 (E, code_bytes) or float32 (E, dim), image ids int64, word
    counts int32, next_id int)."""
    off = np.asarray(offsets)
    if off.dtype.kind not in "iu":
        raise TypeError(f"offsets must be integers, got {off.dtype}")
    off = np.ascontiguousarray(off, dtype=np.int64)
    if off.ndim != 1 or off.shape[0] != n_words + 1:
        raise ValueError(f"corrupt index: offsets must be 1-D with n_words + 1 = {n_words + 1} entries")
    if off[0] != 0 or np.any(off[1:] < off[:-1]):
        raise ValueError("corrupt index: posting offsets must start at 0 and be non-decreasing")
    sl = np.asarray(slots)
    if sl.dtype.kind not in "iu":
        raise TypeError(f"slots must be integers, got {sl.dtype}")
    e = int(off[-1])
    if sl.ndim != 1 or sl.shape[0] != e:
        raise ValueError(f"corrupt index: slots must be 1-D with offsets[-1] = {e} entries")
    ids = np.asarray(image_ids)
    counts = np.asarray(word_counts)
    if ids.dtype.kind not in "iu" or counts.dtype.kind not in "iu":
        raise TypeError("image_ids and word_counts must be integer arrays")
    if ids.ndim != 1 or counts.shape != ids.shape:
        raise ValueError("corrupt index: image_ids and word_counts must be 1-D of one length")
    n = ids.shape[0]
    if sl.size and (sl.min() < 0 or sl.max() >= n):
        raise ValueError("corrupt index: posting slot out of range")
    if n and (ids.min() < 0 or ids.max() >= _MAX_ID):
        raise ValueError("corrupt index: negative or duplicate image id (ids are in [0, 2^62))")
    if n > 1 and np.unique(ids).size != n:
        raise ValueError("corrupt index: negative or duplicate image id")
    if n and (counts.min() < 0 or int(counts.sum()) != e):
        raise ValueError("corrupt index: word count of an image does not match its postings")
    if isinstance(next_id, (bool, np.bool_)) or not isinstance(next_id, (int, np.integer)):
        raise TypeError(f"next_id must be an integer, got {type(next_id).__name__}")
    next_id = int(next_id)
    if next_id < 0 or next_id > _MAX_ID or (n and next_id <= int(ids.max())):
        raise ValueError("corrupt index: next_id must exceed every image id")
    c = np.asarray(codes)
    if c.dtype == np.uint8:
        width = code_bytes
    elif c.dtype == np.float32 and not binary:
        width = code_bytes // 4
    else:
        raise TypeError(f"codes have dtype {c.dtype}, expected uint8" + ("" if binary else " or float32"))
    if c.ndim == 1 and c.dtype == np.uint8 and c.shape[0] == e * code_bytes:
        c = c.reshape(e, code_bytes)
    if c.ndim != 2 or c.shape != (e, width):
        raise ValueError(f"corrupt index: codes must have shape ({e}, {width}), got {c.shape}")
    return (off, np.ascontiguousarray(sl, dtype=np.uint32), np.ascontiguousarray(c),
            np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(counts, dtype=np.int32), next_id)


def _batch_codes(batch: AggregatedBatch | DeviceBatch) -> Any:
    """A batch's codes for the inverted file: its own codes array (host AggregatedBatch or DeviceBatch)."""
    return batch.codes


class GpuInvertedFile:
    """The device inverted file behind Index(device="cuda"): the CPU InvertedFile's interface over
    _native.GpuInvertedFile (host or device batches in; numpy out).

    Every operation is atomic (all or nothing, also on running out of GPU memory) and runs under the
    native index's lock, accessors included; the GIL is released while it waits for and holds the lock,
    so threads may add, remove and search concurrently."""

    def __init__(self, n_words: int, dim: int, binary: bool) -> None:
        require()
        self._f: Any = _binding().GpuInvertedFile(int(n_words), int(dim), bool(binary))

    n_words = property(lambda self: self._f.n_words)
    dim = property(lambda self: self._f.dim)
    binary = property(lambda self: self._f.binary)
    code_bytes = property(lambda self: self._f.code_bytes)
    n_images = property(lambda self: self._f.n_images)
    n_entries = property(lambda self: self._f.n_entries)
    memory_bytes = property(lambda self: self._f.memory_bytes)
    next_id = property(lambda self: self._f.next_id)
    n_parts = property(lambda self: self._f.n_parts)

    def contains(self, image_id: SupportsInt) -> bool:
        found: bool = self._f.contains(int(image_id))
        return found

    def _batch(self, offsets: ArrayLike, words: Any, codes: Any, what: str = "") -> tuple[NDArray[np.int64], Any, Any]:
        return _check_batch(offsets, words, codes, self.n_words, self.code_bytes, self.binary, what)

    def add(self, word_offsets: ArrayLike, words: Any, codes: Any, image_ids: ArrayLike | None = None) -> np.ndarray:
        """Adds images (host or device arrays); image_ids None: consecutive ids from next_id, allocated
        atomically. Returns the ids. All or nothing."""
        off, w, c = self._batch(word_offsets, words, codes)
        ids = _check_new_ids(image_ids, off.shape[0] - 1)
        added: NDArray[np.int64] = self._f.add(off, w, c, ids)
        return added

    def add_batches(self, batches: Iterable[AggregatedBatch | DeviceBatch], image_ids: ArrayLike | None = None
                    ) -> np.ndarray:
        """Adds several batches (objects with .offsets, .words, .codes: AggregatedBatch or DeviceBatch)
        atomically: all or nothing. Returns the ids."""
        batches = list(batches)
        args = [self._batch(b.offsets, b.words, _batch_codes(b), f"batch {i}: ") for i, b in enumerate(batches)]
        ids = _check_new_ids(image_ids, sum(a[0].shape[0] - 1 for a in args))
        added: NDArray[np.int64] = self._f.add_batches(args, ids)
        return added

    def remove(self, image_ids: ArrayLike) -> int:
        """Removes images by id (KeyError, and no change, when one is absent); filtered on the device."""
        ids = np.asarray(image_ids)
        if ids.size == 0:
            return 0
        if ids.dtype.kind not in "iu":
            raise TypeError(f"image ids must be integers, got {ids.dtype}")
        return int(self._f.remove(np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)))

    def merge(self) -> None:
        self._f.merge()

    def search(self, word_offsets: ArrayLike, words: Any, codes: Any, k: SupportsInt, alpha: float, tau: float,
               normalize: bool) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Top-k per query (k < 0: every image): (scores float32 (nq, kk), ids int64 (nq, kk))."""
        off, w, c = self._batch(word_offsets, words, codes, "query ")
        found: tuple[NDArray[np.float32], NDArray[np.int64]] = self._f.search(
            off, w, c, int(k), float(alpha), float(tau), bool(normalize))
        return found

    def score_all(self, word_offsets: ArrayLike, words: Any, codes: Any, alpha: float, tau: float,
                  normalize: bool) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """(scores float32 (nq, n_images), ids int64 (n_images,)) in slot order, from one state."""
        off, w, c = self._batch(word_offsets, words, codes, "query ")
        scored: tuple[NDArray[np.float32], NDArray[np.int64]] = self._f.score_all(
            off, w, c, float(alpha), float(tau), bool(normalize))
        return scored

    def image_ids(self) -> NDArray[np.int64]:
        ids: NDArray[np.int64] = self._f.image_ids()
        return ids

    def word_counts(self) -> NDArray[np.int32]:
        counts: NDArray[np.int32] = self._f.word_counts()
        return counts

    def export(self) -> _IndexContent:
        """offsets, slots, codes (E, code_bytes) uint8, image_ids, word_counts (owned numpy copies), next_id."""
        content: _IndexContent = self._f.export()
        return content

    def set_content(self, offsets: ArrayLike, slots: ArrayLike, codes: ArrayLike, image_ids: ArrayLike,
                    word_counts: ArrayLike, next_id: Any, owner: object = None) -> None:
        """Replaces the content (validated; atomic). owner is ignored: the arrays are copied to the device."""
        args = _check_content(offsets, slots, codes, image_ids, word_counts, next_id, self.n_words,
                              self.code_bytes, self.binary)
        self._f.set_content(*args)

    def _fail_after_allocations(self, n: int) -> None:
        """Test hook: the n-th device allocation of the next operation raises CudaMemoryError."""
        self._f._fail_after_allocations(int(n))

    def verify(self) -> int:
        """0: a device index holds no checksummed pages (its file is checked when loaded)."""
        return 0

    def compact(self) -> int:
        """0: removes on the device rewrite the postings at once (no tombstones to drop)."""
        return 0


def kmeans(descriptors: Any, n_words: int, niter: int = 20, seed: int = 0) -> tuple[NDArray[np.float32], list[float]]:
    """Lloyd k-means on the GPU (random initialisation from `seed`, exact assignment, deterministic
    float64 update, faiss-style split of empty clusters). Returns (centroids float32 (k, D), objective
    per iteration)."""
    require()
    x = as_input_matrix(descriptors, None, "descriptors")
    n, dim = x.shape
    if n < n_words:
        raise ValueError(f"k-means needs at least n_words={n_words} descriptors, got {n}")
    c, obj = _binding().gpu_kmeans(x.ptr, x.on_device, n, dim, int(n_words), int(niter), int(seed))
    return c, list(obj)



from d2r.cuda.backend import CUDA, index_cpu_to_gpu, index_gpu_to_cpu  # noqa: E402  (needs the names above)
from d2r.core.backend import register_backend  # noqa: E402

register_backend(CUDA)
