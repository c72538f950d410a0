"""Kernel specifications and aggregated types: the leaf of d2r's Python modules (numpy only), shared
by the CPU side (d2r.aggregate, d2r.index) and the GPU side (d2r.cuda), which depends on the CPU side
and never the reverse."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray


@dataclass(frozen=True)
class KernelSpec:
    name: str
    binary: bool      # codes are packed sign bits (Hamming similarity)
    regional: bool    # database images are aggregated from several regions
    native_kind: int  # 0: ASMK / R-ASMK, 1: Naive-R-ASMK
    query_kernel: str  # how queries (one region) are aggregated
    label: str = ""   # the name people read (the paper's and the docs': "R-ASMK*" for "rasmk*")


#: The kernels by name ("asmk*", "asmk", "rasmk*", "rasmk", "naive-rasmk") and their KernelSpec.
KERNELS = {
    "asmk": KernelSpec("asmk", False, False, 0, "asmk", "ASMK"),
    "asmk*": KernelSpec("asmk*", True, False, 0, "asmk*", "ASMK*"),
    "rasmk": KernelSpec("rasmk", False, True, 0, "asmk", "R-ASMK"),
    "rasmk*": KernelSpec("rasmk*", True, True, 0, "asmk*", "R-ASMK*"),
    "naive-rasmk": KernelSpec("naive-rasmk", False, True, 1, "asmk", "Naive-R-ASMK"),
}


def kernel_label(kernel: str) -> str:
    """The name a person reads for a kernel, as the paper and d2r's docs write it: "R-ASMK*" for
    "rasmk*", "Naive-R-ASMK" for "naive-rasmk"."""
    return kernel_spec(kernel).label


def kernel_spec(kernel: str) -> KernelSpec:
    if not isinstance(kernel, str) or kernel.lower() not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {sorted(KERNELS)}")
    return KERNELS[kernel.lower()]


def check_fingerprint(given: str | None, expected: str, what: str) -> None:
    """Raises ValueError naming both when `given` (a codebook fingerprint or None: not known) is not
    `expected`."""
    if given is not None and given != expected:
        raise ValueError(f"{what} were made with codebook {given}, but this index uses codebook {expected}: "
                         "aggregate (or quantise) with the index's codebook (index.codebook)")


def common_fingerprint(items: Iterable[Aggregated | AggregatedBatch]) -> str | None:
    """The one codebook fingerprint of several aggregated objects (None where none is known)."""
    known = {x.fingerprint for x in items if x.fingerprint is not None}
    if len(known) > 1:
        raise ValueError(f"aggregated images from different codebooks ({', '.join(sorted(known))}) cannot be mixed")
    return known.pop() if known else None


class Aggregated:
    """One image's aggregated representation: ascending word ids (int32) and their codes, float32
    (n, D) unit vectors for ASMK-type kernels, or packed sign bits uint8 (n, ceil(D/8)) for the
    binary (*) kernels. `fingerprint`: the codebook's (``Codebook.fingerprint``), None when unknown;
    an index refuses aggregated data whose fingerprint is not its codebook's."""

    __slots__ = ("words", "codes", "fingerprint")

    words: NDArray[np.int32]
    codes: NDArray[np.float32] | NDArray[np.uint8]
    fingerprint: str | None

    def __init__(self, words: ArrayLike, codes: ArrayLike, fingerprint: str | None = None) -> None:
        words = np.ascontiguousarray(words, dtype=np.int32)
        codes = np.ascontiguousarray(codes)
        if words.ndim != 1 or codes.ndim != 2 or codes.shape[0] != words.shape[0]:
            raise ValueError("Aggregated needs 1-D words and 2-D codes with one row per word")
        if codes.dtype not in (np.float32, np.uint8):
            raise TypeError(f"codes must be float32 or uint8 (packed bits), got {codes.dtype}")
        if words.size and np.any(np.diff(words) <= 0):
            raise ValueError("words must be strictly ascending")
        if codes.dtype == np.float32 and codes.size and not np.isfinite(codes).all():
            raise ValueError("codes contain NaN or Inf")
        self.words = words
        self.codes = codes
        self.fingerprint = fingerprint

    @property
    def binary(self) -> bool:
        return bool(self.codes.dtype == np.uint8)

    def __len__(self) -> int:
        return int(self.words.shape[0])

    def __repr__(self) -> str:
        kind = "binary" if self.binary else "float"
        return f"Aggregated({len(self)} words, {kind} codes {self.codes.shape[1:]})"


def code_bytes(codes: np.ndarray) -> np.ndarray:
    """float32 (n, D) or uint8 (n, B) codes viewed as C-contiguous bytes (n, bytes per code)."""
    codes = np.ascontiguousarray(codes)
    return codes.view(np.uint8).reshape(codes.shape[0], codes.shape[1] * codes.itemsize)


class AggregatedBatch:
    """Many aggregated images in CSR form: image i owns rows offsets[i]:offsets[i+1]; `fingerprint`:
    the codebook's, None when unknown."""

    __slots__ = ("offsets", "words", "codes", "fingerprint")

    offsets: NDArray[np.int64]
    words: NDArray[np.int32]
    codes: NDArray[np.float32] | NDArray[np.uint8]
    fingerprint: str | None

    def __init__(self, offsets: NDArray[np.int64], words: NDArray[np.int32],
                 codes: NDArray[np.float32] | NDArray[np.uint8], fingerprint: str | None = None) -> None:
        self.offsets = offsets
        self.words = words
        self.codes = codes
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def code_bytes(self) -> np.ndarray:
        """The codes as raw bytes (n, bytes per code), the form the native inverted file takes."""
        return code_bytes(self.codes)

    def __getitem__(self, i: int) -> Aggregated:
        b, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return Aggregated(self.words[b:e], self.codes[b:e], self.fingerprint)

    def __iter__(self) -> Iterator[Aggregated]:
        return (self[i] for i in range(len(self)))

    @classmethod
    def from_list(cls, items: Iterable[Aggregated]) -> "AggregatedBatch":
        items = list(items)
        if not items:
            raise ValueError("no aggregated images given")
        for a in items:
            if not isinstance(a, Aggregated):
                raise TypeError(f"expected Aggregated, got {type(a).__name__}")
        kinds = {(a.codes.dtype, a.codes.shape[1]) for a in items}
        if len(kinds) != 1:
            raise ValueError("aggregated images mix code types or dimensions")
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in items])
        words = np.concatenate([a.words for a in items]).astype(np.int32, copy=False)
        codes = np.concatenate([a.codes for a in items], axis=0)
        return cls(offsets, np.ascontiguousarray(words), np.ascontiguousarray(codes), common_fingerprint(items))


    @classmethod
    def concat(cls, batches: Iterable[AggregatedBatch]) -> "AggregatedBatch":
        """One batch holding the images of several host batches, in order."""
        batches = list(batches)
        if len(batches) == 1:
            return batches[0]
        fingerprint = common_fingerprint(batches)
        offsets = np.zeros(sum(len(b) for b in batches) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.concatenate([np.diff(b.offsets) for b in batches]))
        words = np.concatenate([b.words for b in batches])
        codes = np.concatenate([b.codes for b in batches], axis=0)
        return cls(offsets, np.ascontiguousarray(words), np.ascontiguousarray(codes), fingerprint)
