"""A CPU stand-in for the CUDA extension's binding surface, so that the GPU path's Python layer runs
where no GPU exists (CI, every developer machine).

It offers what ``d2r_native/cuda_bindings.cpp`` binds — ``cuda_compiled``, ``cuda_device_count``,
``cuda_device_name``, ``cuda_memory_info``, ``DeviceArray``, ``GpuQuantizer``, ``gpu_aggregate``,
``GpuInvertedFile``, ``gpu_kmeans`` — with the same arguments, the same argument checks and the same
answers, computed by the CPU kernels. "Device" memory is host memory: results come back as
:class:`DeviceArray` objects that expose ``__cuda_array_interface__`` (and DLPack) over host buffers,
and inputs arrive as raw pointers exactly as the real bindings receive them, so :mod:`d2r.cuda` takes
the same code paths (pointer resolution, device-array inputs, ``output="device"``, rollbacks).

Use it through :func:`activate` / :func:`deactivate` or the :func:`active` context manager; the tests
of ``tests/cuda`` do so wherever :func:`d2r.cuda.is_available` is False. It is not a GPU emulator:
timings, memory limits and kernel-level behaviour (warps, shared memory) are not modelled."""
from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Iterator, TypeVar

import numpy as np

import d2r._native as _native

if TYPE_CHECKING:
    from d2r._native import _IndexContent

_T = TypeVar("_T")

__all__ = ["DeviceArray", "GpuInvertedFile", "GpuQuantizer", "activate", "active", "cuda_compiled",
           "cuda_device_count", "cuda_device_name", "cuda_memory_info", "cuda_runtime_info", "deactivate",
           "gpu_aggregate", "gpu_kmeans", "is_active"]

_DEVICE_NAME = "d2r CPU stand-in (no GPU)"


# ---- device memory, emulated on the host ----------------------------------------------------------
class DeviceArray:
    """An array in "device" memory (host memory here), wrapped without a copy through
    ``__cuda_array_interface__`` (version 3) or DLPack; ``numpy()`` copies it to a numpy array."""

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray):
        self._a = np.ascontiguousarray(a)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._a.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._a.dtype

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self._a.dtype.str, "data": (int(self._a.ctypes.data), False),
                "version": 3, "strides": None}

    def __dlpack__(self, stream: Any = None) -> Any:
        return self._a.__dlpack__()

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._a.__dlpack_device__()

    def numpy(self) -> np.ndarray:
        return self._a.copy()

    def __getitem__(self, key: Any) -> "DeviceArray":
        """Row slices, as CuPy and PyTorch arrays have (a view when the rows are contiguous)."""
        return DeviceArray(self._a[key])

    def __len__(self) -> int:
        return int(self._a.shape[0]) if self._a.ndim else 0

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self._a.dtype}, stand-in)"


def _read(ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A copy of the memory at `ptr` (host memory: a numpy buffer or a stand-in DeviceArray)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) if shape else 1
    if n == 0:
        return np.zeros(shape, dt)
    if not ptr:
        raise ValueError("null pointer")
    buf = (ctypes.c_char * (n * dt.itemsize)).from_address(int(ptr))
    return np.frombuffer(buf, dtype=dt).reshape(shape).copy()


def _host(a: Any) -> Any:
    """A numpy copy of an array given through __cuda_array_interface__; other arguments as they are."""
    if isinstance(a, DeviceArray):
        return a.numpy()
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        return a
    shape = tuple(int(s) for s in cai["shape"])
    dt = np.dtype(cai["typestr"])
    strides = cai.get("strides")
    if strides is not None:
        expect, acc = [], dt.itemsize
        for s in reversed(shape):
            expect.append(acc)
            acc *= s
        if tuple(reversed(expect)) != tuple(strides) and int(np.prod(shape)) != 0:
            raise ValueError("device arrays must be C-contiguous")
    return _read(cai["data"][0], shape, dt)



# ---- the real binding's argument checks (d2r_native/cuda_bindings.cpp: array_arg, batch_arg, check_codes_arg)
def _array_arg(o: Any, name: str) -> tuple[np.ndarray, bool]:
    """(host copy of the array, on_device) of a numpy array or a __cuda_array_interface__ array."""
    cai = getattr(o, "__cuda_array_interface__", None)
    if cai is not None:
        if cai.get("mask") is not None:
            raise TypeError(f"{name}: masked CUDA arrays are not supported")
        try:
            return _host(o), True
        except ValueError:
            raise TypeError(f"{name} must be a C-contiguous CUDA array") from None
    if not isinstance(o, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a CUDA array")
    if not o.flags.c_contiguous:
        raise TypeError(f"{name} must be C-contiguous")
    return o, False


def _int64_arg(o: Any, name: str) -> np.ndarray:
    a = np.asarray(o)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _check_codes_arg(f: "GpuInvertedFile", a: np.ndarray, n_entries: int, name: str, flat_ok: bool) -> None:
    u8, f32 = a.dtype == np.uint8, a.dtype == np.float32
    if not u8 and not (f32 and not f.binary):
        want = "uint8 (packed bits)" if f.binary else "float32 (or their raw bytes as uint8)"
        raise TypeError(f"{name} has dtype {a.dtype}, expected {want}")
    width = f.code_bytes if u8 else f.dim
    ok2 = a.ndim == 2 and a.shape[0] == n_entries and a.shape[1] == width
    ok1 = flat_ok and u8 and a.ndim == 1 and a.shape[0] == n_entries * f.code_bytes
    if not ok2 and not ok1:
        raise ValueError(f"{name} must have shape ({n_entries}, {width}), got {tuple(a.shape)}")


def _batch_arg(f: "GpuInvertedFile", off_o: Any, words_o: Any, codes_o: Any, prefix: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, words, codes as uint8 rows) of one batch, checked as the real binding and index do."""
    off = _int64_arg(off_o, prefix + "word_offsets")
    if off.ndim != 1 or off.size < 1:
        raise ValueError(prefix + "word_offsets must be 1-D and non-empty")
    e = int(off[-1])
    if off[0] != 0:
        raise ValueError(prefix + "word_offsets must start at 0")
    if e < 0:
        raise ValueError(prefix + "word_offsets must be non-decreasing")
    words, _ = _array_arg(words_o, prefix + "words")
    if words.dtype != np.int32:
        raise TypeError(f"{prefix}words have dtype {words.dtype}, expected int32")
    if words.ndim != 1 or words.shape[0] != e:
        raise ValueError(f"{prefix}words must be 1-D with word_offsets[-1] = {e} entries, got {tuple(words.shape)}")
    codes, _ = _array_arg(codes_o, prefix + "codes")
    _check_codes_arg(f, codes, e, prefix + "codes", False)
    if np.any(off[1:] < off[:-1]):
        raise ValueError(prefix + " word offsets must be non-decreasing")
    if words.size and (words.min() < 0 or words.max() >= f.n_words):
        raise ValueError("visual word id out of range [0, n_words)")
    for i in range(off.size - 1):
        seg = words[off[i]:off[i + 1]]
        if seg.size > 1 and np.any(seg[1:] <= seg[:-1]):
            raise ValueError("the words of an image must be strictly ascending (sorted, no duplicates)")
    if codes.dtype == np.float32:
        if not np.all(np.isfinite(codes)):
            raise ValueError(prefix + "codes contain NaN or Inf")
        codes = np.ascontiguousarray(codes).view(np.uint8).reshape(e, f.code_bytes)
    return off, np.ascontiguousarray(words), np.ascontiguousarray(codes)


_MAX_ID = 1 << 62


def _check_new_ids(f: "GpuInvertedFile", ids_o: Any, n: int) -> np.ndarray | None:
    if ids_o is None:
        if int(f._ivf.next_id) > _MAX_ID - n:
            raise ValueError("image ids exhausted (ids stay below 2^62)")
        return None
    ids = _int64_arg(ids_o, "image_ids")
    if ids.ndim != 1 or ids.size != n:
        raise ValueError(f"one image id per image is required ({n})")
    seen: set[int] = set()
    for i in ids.tolist():
        if not 0 <= i < _MAX_ID:
            raise ValueError(f"image ids must be in [0, 2^62), got {i}")
        if f._ivf.contains(i):
            raise ValueError(f"image id {i} is already in the index")
        if i in seen:
            raise ValueError(f"duplicate image id {i} in one add")
        seen.add(i)
    return ids


# ---- the binding surface ---------------------------------------------------------------------------
def cuda_compiled() -> bool:
    return True


def cuda_device_count() -> int:
    return 1


def cuda_device_name(device: int = 0) -> str:
    if device != 0:
        raise ValueError(f"no CUDA device {device} (1 device)")
    return _DEVICE_NAME


def cuda_runtime_info() -> dict[str, Any]:
    return {"runtime": 0, "driver": 0, "standin": True}


def cuda_memory_info() -> tuple[int, int]:
    """(free, total) bytes: the host's available and total memory."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0]) * 1024
    except OSError:  # pragma: no cover - non-Linux hosts
        return (0, 0)
    return (info.get("MemAvailable", 0), info.get("MemTotal", 0))


def cuda_alloc_test(nbytes: int) -> None:
    """The out-of-memory path: raises MemoryError (the real CudaMemoryError's base) past the host's memory."""
    if int(nbytes) > cuda_memory_info()[1]:
        from d2r.cuda import CudaMemoryError

        raise CudaMemoryError(f"out of device memory allocating {int(nbytes)} bytes (stand-in)")


class GpuQuantizer:
    """Exact m-nearest-word quantisation (the CPU quantiser: the same answers as the GPU's)."""

    def __init__(self, centroids: Any):
        c = np.asarray(centroids)
        if c.dtype != np.float32 or c.ndim != 2 or not c.flags.c_contiguous:
            raise TypeError("centroids must be a C-contiguous float32 (n_words, dim) array")
        self._q = _native.Quantizer(c)
        self._centroids = c.copy()
        self.n_words, self.dim = int(c.shape[0]), int(c.shape[1])
        self.last_fallback_rows = 0

    def search(self, x_ptr: int, on_device: bool, n: int, m: int) -> tuple[DeviceArray, DeviceArray]:
        if n < 0 or m < 1 or m > self.n_words:
            raise ValueError(f"invalid quantisation arguments n={n}, m={m}")
        x = _read(x_ptr, (int(n), self.dim), np.float32)
        ids, dist = self._q.search(x, int(m))
        return DeviceArray(ids), DeviceArray(dist)


def gpu_aggregate(quantizer: GpuQuantizer, x_ptr: int, x_on_device: bool, n_desc: int, assign_ptr: int,
                  assign_on_device: bool, m: int, image_regions: np.ndarray, region_members: np.ndarray,
                  members: np.ndarray | None, binary: bool) -> tuple[np.ndarray, DeviceArray, DeviceArray]:
    """ASMK / R-ASMK (binary: ASMK* / R-ASMK*) aggregation: (offsets, words, codes) as the GPU returns them."""
    x = _read(x_ptr, (int(n_desc), quantizer.dim), np.float32)
    if assign_ptr:
        assign = _read(assign_ptr, (int(n_desc), int(m)), np.int32)
        if assign.size and (assign.min() < 0 or assign.max() >= quantizer.n_words):
            raise ValueError(f"assignments hold word ids outside [0, {quantizer.n_words})")
    else:
        assign = np.asarray(quantizer.search(x.ctypes.data, False, int(n_desc), int(m))[0].numpy())
    offs, words, codes = _native.aggregate(x, assign, quantizer._centroids, image_regions, region_members, members, kind=0,
                                           binary=bool(binary))
    return np.asarray(offs), DeviceArray(np.asarray(words)), DeviceArray(np.asarray(codes))


def _max_norm(code_rows: np.ndarray, dim: int) -> float:
    """The largest L2 norm of float codes given as their raw bytes (rows of dim float32)."""
    x = np.ascontiguousarray(code_rows).view(np.float32).reshape(-1, dim).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt((x * x).sum(1))
    norms = norms[~np.isnan(norms)]   # as std::max(bound, nan) on the GPU: a NaN norm is passed over
    return float(norms.max()) if norms.size else 0.0


class GpuInvertedFile:
    """The device inverted file's binding, over a CPU InvertedFile: the same operations, checks, atomicity
    and answers (scores in the same 64-bit fixed point). One operation at a time, as on the GPU."""

    def __init__(self, n_words: int, dim: int, binary: bool):
        if n_words < 1 or dim < 1:
            raise ValueError("n_words and dim must be >= 1")
        self._ivf = _native.InvertedFile(int(n_words), int(dim), bool(binary))
        self._lock = threading.Lock()
        self._fail_at = 0
        self._budget = 0
        self._max_norm = 0.0   # largest L2 norm of the float codes stored (the fixed-point bound's)
        self.n_words, self.dim, self.binary = int(n_words), int(dim), bool(binary)
        self.code_bytes = int(self._ivf.code_bytes)

    # properties read under the lock, as the real binding does
    n_images = property(lambda self: self._locked(lambda: int(self._ivf.n_images)))
    n_entries = property(lambda self: self._locked(lambda: int(self._ivf.n_entries)))
    next_id = property(lambda self: self._locked(lambda: int(self._ivf.next_id)))
    memory_bytes = property(lambda self: self._locked(lambda: int(self._ivf.memory_bytes)))
    n_parts = property(lambda self: 1)

    def _locked(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            return fn()

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        """One operation under the lock; the allocation-failure hook applies to it alone."""
        with self._lock:
            self._budget, self._fail_at = self._fail_at, 0
            try:
                yield
            finally:
                self._budget = 0

    def _allocate(self, k: int = 1) -> None:
        """Counts the running operation's device allocations; the test hook makes the n-th one fail."""
        if self._budget:
            self._budget -= k
            if self._budget <= 0:
                self._budget = 0
                from d2r.cuda import CudaMemoryError

                raise CudaMemoryError("out of device memory (stand-in: injected allocation failure)")

    def _codes(self, codes: Any) -> np.ndarray:
        c = np.asarray(_host(codes))
        if c.dtype == np.float32:
            c = np.ascontiguousarray(c).view(np.uint8).reshape(c.shape[0], c.shape[1] * 4)
        return np.ascontiguousarray(c)

    def contains(self, image_id: int) -> bool:
        return self._locked(lambda: bool(self._ivf.contains(int(image_id))))

    def image_ids(self) -> np.ndarray:
        return self._locked(lambda: np.asarray(self._ivf.image_ids()))

    def word_counts(self) -> np.ndarray:
        return self._locked(lambda: np.asarray(self._ivf.word_counts()))

    def add(self, word_offsets: Any, words: Any, codes: Any, image_ids: Any = None) -> np.ndarray:
        return self.add_batches([(word_offsets, words, codes)], image_ids)

    def add_batches(self, batches: Any, image_ids: Any = None) -> np.ndarray:
        args = []
        for i, t in enumerate(batches):
            if not isinstance(t, tuple) or len(t) != 3:
                raise TypeError("add_batches takes (word_offsets, words, codes) tuples")
            args.append(_batch_arg(self, *t, prefix="" if len(batches) == 1 else f"batch {i}: "))
        n = sum(o.size - 1 for o, _, _ in args)
        with self._operation():
            ids = _check_new_ids(self, image_ids, n)
            self._allocate(3 * max(1, len(args)))
            joined = np.zeros(1, np.int64)
            for o, _, _ in args:
                joined = np.concatenate([joined, o[1:] + joined[-1]])
            w = np.concatenate([a[1] for a in args]) if args else np.zeros(0, np.int32)
            c = np.concatenate([a[2] for a in args]) if args else np.zeros((0, self.code_bytes), np.uint8)
            out = np.asarray(self._ivf.add(joined, w, c, ids))
            if not self.binary and c.size:
                self._max_norm = max(self._max_norm, _max_norm(c, self.dim))
            return out

    def remove(self, image_ids: np.ndarray) -> int:
        with self._operation():
            self._allocate()
            return int(self._ivf.remove(image_ids))

    def merge(self) -> None:
        with self._operation():
            self._allocate()

    def _query(self, word_offsets: Any, words: Any, codes: Any, alpha: float, tau: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        off, w, c = _batch_arg(self, word_offsets, words, codes, "query ")
        if not self.binary:   # the GPU's fixed-point bound (cuda/ivf.cu), checked per call
            qn = _max_norm(c, self.dim)
            if not np.isfinite(qn):
                raise ValueError("query codes contain NaN or Inf")
            u = self._max_norm * qn * (1.0 + self.dim * 2.0 ** -23)
            if alpha >= 0.0:
                s = u ** float(alpha)
            else:
                s = tau ** float(alpha) if tau > 0.0 else float("inf")
            s *= 1.0 + 2.0 ** -20
            nq = max(1, int(np.diff(off).max()) if off.size > 1 else 1)
            if not s * nq < 2147483648.0:
                raise ValueError(f"score contribution out of the fixed-point range: contributions up to {s} for {nq} "
                                 "query words could overflow the 64-bit accumulators (|sigma| * query words must "
                                 "stay below 2^31; are the codes normalised?)")
        return off, w, c

    def search(self, word_offsets: Any, words: Any, codes: Any, k: int, alpha: float = 3.0, tau: float = 0.0,
               normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        with self._operation():
            off, w, c = self._query(word_offsets, words, codes, alpha, tau)
            self._allocate()
            return self._ivf.search(off, w, c, int(k), float(alpha), float(tau), bool(normalize))

    def score_all(self, word_offsets: Any, words: Any, codes: Any, alpha: float = 3.0, tau: float = 0.0,
                  normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        with self._operation():
            off, w, c = self._query(word_offsets, words, codes, alpha, tau)
            self._allocate()
            return self._ivf.score_all(off, w, c, float(alpha), float(tau), bool(normalize))

    def export(self) -> _IndexContent:
        with self._operation():   # downloads only: allocates nothing on the device
            return self._ivf.export()

    def set_content(self, offsets: Any, slots: Any, codes: Any, image_ids: Any, word_counts: Any, next_id: int,
                    owner: Any = None) -> None:
        c, _ = _array_arg(codes, "codes")
        if c.dtype == np.uint8 and c.ndim == 1:
            c = c.reshape(-1, self.code_bytes) if self.code_bytes else c
        c = self._codes(c)
        with self._operation():
            self._allocate(3)
            self._ivf.set_content(offsets, slots, c, image_ids, word_counts, int(next_id))
            if not self.binary:
                self._max_norm = _max_norm(c, self.dim) if c.size else 0.0

    def _fail_after_allocations(self, n: int) -> None:
        self._fail_at = int(n)


def gpu_kmeans(x_ptr: int, on_device: bool, n: int, dim: int, k: int, niter: int, seed: int
               ) -> tuple[np.ndarray, list[float]]:
    """The GPU's Lloyd k-means (random initialisation from `seed`, exact assignment, float64 update,
    empty clusters split), computed on the host."""
    x = _read(x_ptr, (int(n), int(dim)), np.float32).astype(np.float64)
    rng = np.random.RandomState(int(seed))
    c = x[np.sort(rng.choice(x.shape[0], int(k), replace=False))].copy()
    objective = []
    for _ in range(int(niter)):
        d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
        a = d.argmin(1)          # exact assignment, ties to the lower word id
        objective.append(float(np.maximum(d[np.arange(x.shape[0]), a], 0).sum()))
        counts = np.bincount(a, minlength=int(k))
        sums = np.zeros_like(c)
        np.add.at(sums, a, x)
        nonempty = counts > 0
        c[nonempty] = sums[nonempty] / counts[nonempty, None]
        for e in np.nonzero(~nonempty)[0]:   # split the largest cluster (faiss's rule, simplified)
            big = int(counts.argmax())
            c[e] = c[big] * (1 + 1e-7)
            c[big] = c[big] * (1 - 1e-7)
            counts[e] = counts[big] // 2
            counts[big] -= counts[e]
    return c.astype(np.float32), objective


# ---- switching -----------------------------------------------------------------------------------------
_previous: list[Any] = []


def activate() -> None:
    """Makes d2r.cuda compute through this stand-in (until :func:`deactivate`)."""
    import sys

    from d2r.cuda import _surface

    _previous.append(_surface.set_surface(sys.modules[__name__]))


def deactivate() -> None:
    """Restores the binding surface that was active before the last :func:`activate`."""
    from d2r.cuda import _surface

    _surface.set_surface(_previous.pop() if _previous else None)


def is_active() -> bool:
    import sys

    from d2r.cuda import _surface

    return _surface.surface() is sys.modules[__name__]


@contextlib.contextmanager
def active() -> Iterator[None]:
    """``with d2r.cuda.standin.active(): ...`` runs the block against the stand-in."""
    activate()
    try:
        yield
    finally:
        deactivate()
