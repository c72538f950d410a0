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

import numpy as np

from . import _native

__all__ = ["is_available", "is_compiled", "device_count", "device_name", "memory_info", "CudaUnavailableError",
           "CudaError", "CudaMemoryError", "DeviceArray", "quantize", "aggregate", "GpuInvertedFile", "kmeans"]


class CudaUnavailableError(RuntimeError):
    """A GPU entry point was called where d2r cannot use a GPU (no CUDA build, or no device)."""


CudaError = getattr(_native, "CudaError", RuntimeError)
CudaMemoryError = getattr(_native, "CudaMemoryError", MemoryError)
DeviceArray = getattr(_native, "DeviceArray", None)

# The largest k a GPU top-k search selects on the device (larger k: dense scores, ranked on the host).
MAX_K = 1024


def is_compiled() -> bool:
    """True when this build of d2r contains the CUDA kernels (nvcc was found at build time)."""
    return bool(_native.cuda_compiled())


def device_count() -> int:
    return int(_native.cuda_device_count())


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
    return _native.cuda_device_name(device)


def memory_info() -> tuple[int, int]:
    """(free bytes, total bytes) of the current device."""
    require()
    return tuple(_native.cuda_memory_info())


# ---- array interop ---------------------------------------------------------------------------------
def is_device_array(x) -> bool:
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:  # pragma: no cover - torch CPU tensors raise on the attribute
        return False


def _framework(x) -> str:
    mod = type(x).__module__.split(".")[0]
    return mod if mod in ("torch", "cupy") else "other"


class DeviceInput:
    """A resolved input: pointer, shape, whether it is on the device, and what keeps it alive."""

    __slots__ = ("ptr", "shape", "on_device", "keep")

    def __init__(self, ptr, shape, on_device, keep):
        self.ptr, self.shape, self.on_device, self.keep = int(ptr), tuple(shape), bool(on_device), keep


def _contiguous_device(x, dtype: np.dtype, name: str):
    """x (a CUDA array) as a C-contiguous array of dtype on the same device, converting through its own
    framework only when needed."""
    cai = x.__cuda_array_interface__
    ok_dtype = np.dtype(cai["typestr"]) == dtype
    strides = cai.get("strides")
    shape = tuple(cai["shape"])
    if strides is not None:
        expect, acc = [], dtype.itemsize
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


def _device_all_finite(x) -> bool:
    fw = _framework(x)
    if fw == "torch":
        import torch

        return bool(torch.isfinite(x).all().item())
    if fw == "cupy":
        import cupy

        return bool(cupy.isfinite(x).all().get())
    return True  # other producers: not checked (documented)


def as_input_matrix(x, dim: int | None, name: str = "descriptors", dtype=np.float32) -> DeviceInput:
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
    if dtype.kind == "f":
        from ._checks import as_descriptors

        arr = as_descriptors(x, dim, name)
    else:
        arr = np.ascontiguousarray(x)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=dtype)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    return DeviceInput(arr.ctypes.data, arr.shape, False, arr)


def to_output(a, output: str, like=None):
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
def _quantizer(codebook):
    require()
    q = getattr(codebook, "_gpu_quantizer", None)
    if q is None:
        q = _native.GpuQuantizer(codebook.centroids)
        codebook._gpu_quantizer = q
    return q


def quantize(codebook, descriptors, m: int = 1, output: str = "numpy"):
    """The m nearest words of each descriptor on the GPU: (ids int32 (n, m), squared distances float32
    (n, m)), the CPU Codebook.quantize's answer."""
    from ._checks import check_positive_int

    q = _quantizer(codebook)
    m = check_positive_int(m, "m")
    if m > codebook.n_words:
        raise ValueError(f"m={m} exceeds the number of words ({codebook.n_words})")
    x = as_input_matrix(descriptors, codebook.dim)
    ids, d = q.search(x.ptr, x.on_device, x.shape[0], m)
    return to_output(ids, output, x.keep), to_output(d, output, x.keep)


class DeviceBatch:
    """Aggregated images on the device, CSR: offsets (numpy), words and codes (DeviceArray)."""

    __slots__ = ("offsets", "words", "codes")

    def __init__(self, offsets, words, codes):
        self.offsets, self.words, self.codes = offsets, words, codes

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def code_bytes(self):
        return self.codes  # the device inverted file reads the raw bytes through the pointer

    def to_host(self):
        from .aggregate import AggregatedBatch

        return AggregatedBatch(self.offsets, self.words.numpy(), self.codes.numpy())


def aggregate(codebook, descriptors, image_regions, region_members, members=None, kernel: str = "asmk*", m: int = 1,
              assignments=None, output: str = "numpy"):
    """ASMK / ASMK* / R-ASMK / R-ASMK* aggregation on the GPU with the CPU layout (see
    d2r.aggregate): image i owns regions image_regions[i]:image_regions[i+1], region r the members
    region_members[r]:region_members[r+1] (indices into the descriptors when `members` is given).
    Returns an AggregatedBatch (output="numpy") or a DeviceBatch (output="device")."""
    from ._checks import check_positive_int
    from .aggregate import kernel_spec

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
        a = as_input_matrix(assignments, None, "assignments", np.int32)
        if a.shape != (x.shape[0], m):
            raise ValueError(f"assignments must have shape ({x.shape[0]}, {m}), got {a.shape}")
        if not a.on_device:
            if a.keep.size and (a.keep.min() < 0 or a.keep.max() >= codebook.n_words):
                raise ValueError(f"assignments hold word ids outside [0, {codebook.n_words})")
        a_ptr, a_dev, a_keep = a.ptr, a.on_device, a.keep
    offs, words, codes = _native.gpu_aggregate(q, x.ptr, x.on_device, x.shape[0], a_ptr, a_dev, m, ir, rm, mem,
                                               spec.binary)
    del a_keep
    batch = DeviceBatch(offs, words, codes)
    if output == "numpy":
        return batch.to_host()
    if output != "device":
        raise ValueError(f"output must be 'numpy' or 'device', got {output!r}")
    return batch


def _check_layout(ir, rm, mem, n_desc):
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


def aggregate_images(codebook, descriptors, offsets, kernel: str = "asmk*", m: int = 1, assignments=None,
                     output: str = "numpy"):
    """Plain images (one region each) on the GPU: image i is descriptors[offsets[i]:offsets[i+1]]."""
    offs = np.ascontiguousarray(offsets, dtype=np.int64)
    n = offs.shape[0] - 1
    return aggregate(codebook, descriptors, np.arange(n + 1, dtype=np.int64), offs, None, kernel, m, assignments,
                     output)


def _ptr(a):
    if a is None:
        return 0, False, None
    if is_device_array(a):
        return a.__cuda_array_interface__["data"][0], True, a
    arr = np.ascontiguousarray(a)
    return arr.ctypes.data, False, arr


class GpuInvertedFile:
    """The device inverted file behind Index(device="cuda"): the CPU InvertedFile's interface over
    _native.GpuInvertedFile (host or device batches in; numpy out)."""

    def __init__(self, n_words: int, dim: int, binary: bool):
        require()
        self._f = _native.GpuInvertedFile(n_words, dim, binary)

    n_words = property(lambda self: self._f.n_words)
    dim = property(lambda self: self._f.dim)
    binary = property(lambda self: self._f.binary)
    code_bytes = property(lambda self: self._f.code_bytes)
    n_images = property(lambda self: self._f.n_images)
    n_entries = property(lambda self: self._f.n_entries)
    memory_bytes = property(lambda self: self._f.memory_bytes)
    n_parts = property(lambda self: self._f.n_parts)

    def contains(self, image_id) -> bool:
        return self._f.contains(int(image_id))

    def add(self, offsets, words, codes, ids):
        wp, wd, wk = _ptr(words)
        cp, cd, ck = _ptr(codes)
        if wd != cd:
            raise ValueError("words and codes must both be on the host or both on the device")
        self._f.add(np.ascontiguousarray(offsets, np.int64), wp, cp, wd, np.ascontiguousarray(ids, np.int64))
        del wk, ck

    def search(self, offsets, words, codes, k, alpha, tau, normalize):
        n = self.n_images
        kk = n if (k < 0 or k > n) else k
        offsets = np.ascontiguousarray(offsets, np.int64)
        nq = offsets.shape[0] - 1
        if kk == 0:
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        wp, wd, wk = _ptr(words)
        cp, cd, ck = _ptr(codes)
        if kk <= MAX_K:
            return self._f.search(offsets, wp, cp, wd, kk, alpha, tau, normalize)
        s = self._f.score_all(offsets, wp, cp, wd, alpha, tau, normalize)
        ids = self.image_ids()
        order = np.lexsort((np.broadcast_to(ids, s.shape), -s), axis=1)[:, :kk]
        return np.take_along_axis(s, order, 1), ids[order]

    def score_all(self, offsets, words, codes, alpha, tau, normalize):
        wp, wd, wk = _ptr(words)
        cp, cd, ck = _ptr(codes)
        return self._f.score_all(np.ascontiguousarray(offsets, np.int64), wp, cp, wd, alpha, tau, normalize)

    def image_ids(self) -> np.ndarray:
        return np.asarray(self._f.image_ids)

    def export(self) -> dict:
        return self._f.export()

    def merge(self) -> None:
        pass

    def set_content(self, offsets, slots, codes, image_ids, word_counts):
        self._f.set_content(np.ascontiguousarray(offsets, np.int64), np.ascontiguousarray(slots, np.uint32),
                            np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(image_ids, np.int64),
                            np.ascontiguousarray(word_counts, np.int32))

    def remove(self, ids) -> int:
        """Removal runs on the CPU index (download, compact, upload): O(index size)."""
        cpu = _native.InvertedFile(self.n_words, self.dim, self.binary)
        ex = self.export()
        cpu.set_content(ex["offsets"], ex["slots"], ex["codes"].reshape(-1), ex["image_ids"], ex["word_counts"])
        n = cpu.remove(np.ascontiguousarray(ids, np.int64))
        ex = cpu.export()
        self.set_content(ex["offsets"], ex["slots"], ex["codes"], ex["image_ids"], ex["word_counts"])
        return n


def kmeans(descriptors, n_words: int, niter: int = 20, seed: int = 0):
    """Lloyd k-means on the GPU (random initialisation from `seed`, exact assignment, deterministic
    float64 update, faiss-style split of empty clusters). Returns (centroids float32 (k, D), objective
    per iteration)."""
    require()
    x = as_input_matrix(descriptors, None, "descriptors")
    n, dim = x.shape
    if n < n_words:
        raise ValueError(f"k-means needs at least n_words={n_words} descriptors, got {n}")
    c, obj = _native.gpu_kmeans(x.ptr, x.on_device, n, dim, int(n_words), int(niter), int(seed))
    return c, list(obj)
