"""Aggregation of local descriptors into (visual word, code) sets: ASMK, ASMK*, R-ASMK, R-ASMK*,
Naive-R-ASMK, and dense VLAD / R-VLAD (METHOD.md section 3). The arithmetic runs in the native core."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

import d2r._native as _native
from d2r.core.checks import as_descriptors, as_offsets, check_positive_int
from d2r.core.codebook import Codebook
# Re-exported (the "X as X" form marks them as such for the type checker).
from d2r.core.kernels import KERNELS as KERNELS
from d2r.core.kernels import Aggregated as Aggregated
from d2r.core.kernels import AggregatedBatch as AggregatedBatch
from d2r.core.kernels import KernelSpec as KernelSpec
from d2r.core.kernels import check_fingerprint as check_fingerprint
from d2r.core.kernels import code_bytes as code_bytes
from d2r.core.kernels import kernel_spec as kernel_spec

# A database image given by its regions: Regions, a list of arrays, (descriptors, offsets, n_regions)
# or (descriptors, offsets, members) (see Regions.coerce, which checks it at run time).
RegionsLike = Any


# --------------------------------------------------------------------------------------------------
# Regions


class Regions:
    """The regions of one image as descriptors plus a CSR membership: region r holds
    descriptors[members[offsets[r]:offsets[r+1]]] (members None: the contiguous rows
    offsets[r]:offsets[r+1]). Region 0 is the whole image by convention; empty regions are allowed
    and count in R."""

    __slots__ = ("descriptors", "offsets", "members")
    descriptors: NDArray[np.float32]
    offsets: NDArray[np.int64]
    members: NDArray[np.int64] | None

    def __init__(self, descriptors: Any, offsets: Any, members: Any = None, dim: int | None = None) -> None:
        self.descriptors = as_descriptors(descriptors, dim)
        n = self.descriptors.shape[0]
        if members is None:
            self.offsets = as_offsets(offsets, n, "region offsets")
            self.members = None
        else:
            mem = np.asarray(members)
            if not np.issubdtype(mem.dtype, np.integer) or mem.ndim != 1:
                raise TypeError("region members must be a 1-D integer array")
            mem = np.ascontiguousarray(mem, dtype=np.int64)
            if mem.size and (mem.min() < 0 or mem.max() >= n):
                raise ValueError(f"region member index out of range [0, {n})")
            self.offsets = as_offsets(offsets, mem.shape[0], "region offsets")
            self.members = mem
        if self.n_regions < 1:
            raise ValueError("an image needs at least one region (region 0: the whole image)")

    @property
    def n_regions(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @classmethod
    def from_list(cls, arrays: Iterable[Any], dim: int | None = None) -> "Regions":
        arrays = [as_descriptors(a, dim, name=f"region {i} descriptors") for i, a in enumerate(arrays)]
        if not arrays:
            raise ValueError("an image needs at least one region (region 0: the whole image)")
        dims = {a.shape[1] for a in arrays}
        if len(dims) != 1:
            raise ValueError(f"regions have different descriptor dimensions {sorted(dims)}")
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([a.shape[0] for a in arrays])
        return cls(np.concatenate(arrays, axis=0), offsets)

    @classmethod
    def from_labels(cls, descriptors: Any, region_ids: ArrayLike, n_regions: int) -> "Regions":
        """One region id per descriptor (each descriptor in exactly one region)."""
        n_regions = check_positive_int(n_regions, "n_regions")
        x = as_descriptors(descriptors)
        rid = np.asarray(region_ids)
        if not np.issubdtype(rid.dtype, np.integer) or rid.shape != (x.shape[0],):
            raise ValueError("region_ids must be integers, one per descriptor")
        if rid.size and (rid.min() < 0 or rid.max() >= n_regions):
            raise ValueError(f"region id out of range [0, {n_regions})")
        order = np.argsort(rid, kind="stable").astype(np.int64)
        offsets = np.zeros(n_regions + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(rid, minlength=n_regions))
        return cls(x, offsets, order)

    @classmethod
    def coerce(cls, regions: RegionsLike, dim: int | None = None) -> "Regions":
        """Accepts Regions, a list of arrays, (descriptors, offsets, n_regions) with contiguous regions,
        or (descriptors, offsets, members) with a CSR membership."""
        if isinstance(regions, Regions):
            if dim is not None and regions.descriptors.shape[1] != dim:
                raise ValueError(f"region descriptors have dimension {regions.descriptors.shape[1]}, expected {dim}")
            return regions
        if (isinstance(regions, tuple) and len(regions) == 3 and np.ndim(regions[1]) == 1
                and np.asarray(regions[1]).dtype.kind in "iu"):
            desc, offsets, third = regions
            if isinstance(third, (int, np.integer)) and not isinstance(third, bool):
                r = cls(desc, offsets, None, dim)
                if r.n_regions != int(third):
                    raise ValueError(f"n_regions={third} but offsets describe {r.n_regions} regions")
                return r
            return cls(desc, offsets, third, dim)
        if isinstance(regions, (list, tuple)):
            return cls.from_list(regions, dim)
        raise TypeError("regions must be a list of arrays, (descriptors, offsets, n_regions), "
                        "(descriptors, offsets, members) or d2r.Regions")


# --------------------------------------------------------------------------------------------------
# Batched native calls


def _concat_images(images: Iterable[Any], dim: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """List of (n_i, D) arrays -> (descriptors, image offsets)."""
    arrays = [as_descriptors(a, dim, name=f"image {i} descriptors") for i, a in enumerate(images)]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.shape[0] for a in arrays])
    x = np.concatenate(arrays, axis=0) if arrays else np.zeros((0, dim), np.float32)
    return np.ascontiguousarray(x), offsets


def as_assignments(assignments: Any, n: int, m: int, n_words: int) -> NDArray[np.int32]:
    """Precomputed word assignments: int (n, m) with ids in [0, n_words)."""
    a = np.asarray(assignments)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"assignments must be integers, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a.reshape(-1, 1)
    if a.shape != (n, m):
        raise ValueError(f"assignments must have shape ({n}, {m}) (one row of m words per descriptor), got {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= n_words):
        raise ValueError(f"assignments out of range [0, {n_words})")
    return np.ascontiguousarray(a, dtype=np.int32)


def aggregate_images(codebook: Codebook, descriptors: np.ndarray, image_offsets: np.ndarray, kernel: str,
                     m: int = 1, assignments: Any = None, fingerprint: str | None = None) -> AggregatedBatch:
    """Plain (one region per image) aggregation of many images given concatenated descriptors
    (and, optionally, their precomputed word assignments, made by the codebook with `fingerprint`)."""
    spec = kernel_spec(kernel)
    if assignments is None:
        assign, _ = codebook.quantize(descriptors, m)
    else:
        check_fingerprint(fingerprint, codebook.fingerprint, "the assignments")
        assign = as_assignments(assignments, descriptors.shape[0], m, codebook.n_words)
    n_img = image_offsets.shape[0] - 1
    image_regions = np.arange(n_img + 1, dtype=np.int64)
    offs, words, codes = _native.aggregate(descriptors, assign, codebook.centroids, image_regions,
                                           image_offsets, None, kind=0, binary=spec.binary)
    return AggregatedBatch(offs, words, codes, codebook.fingerprint)


def regions_layout(codebook: Codebook, regions_list: Iterable[RegionsLike], m: int = 1,
                   assignments: Iterable[Any] | None = None, fingerprint: str | None = None
                   ) -> tuple[NDArray[np.float32], NDArray[np.int32] | None, NDArray[np.int64], NDArray[np.int64],
                              NDArray[np.int64]]:
    """The aggregation layout of many images given by their regions (anything Regions.coerce takes):
    (descriptors (n, D) float32 concatenated, assignments (n, m) int32 or None when not given,
    image_regions, region_members, members) as the native kernels take them, on the CPU
    (``_native.aggregate``) and on the GPU (``d2r.cuda.aggregate``): image i owns regions
    image_regions[i]:image_regions[i+1], region r the descriptors members[region_members[r]:region_members[r+1]]."""
    regs = [Regions.coerce(r, codebook.dim) for r in regions_list]
    desc_off = np.cumsum([0] + [r.descriptors.shape[0] for r in regs]).astype(np.int64)
    x = (np.concatenate([r.descriptors for r in regs], axis=0) if regs
         else np.zeros((0, codebook.dim), np.float32))
    image_regions = np.zeros(len(regs) + 1, dtype=np.int64)
    image_regions[1:] = np.cumsum([r.n_regions for r in regs])
    member_parts: list[NDArray[np.int64]] = []
    region_sizes: list[NDArray[np.int64]] = []
    for r, base in zip(regs, desc_off[:-1]):
        if r.members is None:
            member_parts.append(np.arange(r.descriptors.shape[0], dtype=np.int64) + base)
        else:
            member_parts.append(r.members + base)
        region_sizes.append(np.diff(r.offsets))
    members = np.concatenate(member_parts) if member_parts else np.zeros(0, np.int64)
    region_members = np.zeros(int(image_regions[-1]) + 1, dtype=np.int64)
    if region_sizes:
        region_members[1:] = np.cumsum(np.concatenate(region_sizes))
    assign = None
    if assignments is not None:
        check_fingerprint(fingerprint, codebook.fingerprint, "the assignments")
        assignments = list(assignments)
        if len(assignments) != len(regs):
            raise ValueError(f"{len(assignments)} assignment arrays given for {len(regs)} images")
        assign = np.concatenate([as_assignments(a, r.descriptors.shape[0], m, codebook.n_words)
                                 for a, r in zip(assignments, regs)]) if regs else np.zeros((0, m), np.int32)
    return np.ascontiguousarray(x), assign, image_regions, region_members, np.ascontiguousarray(members)


def aggregate_regions_batch(codebook: Codebook, regions_list: Iterable[RegionsLike], kernel: str, m: int = 1,
                            assignments: Iterable[Any] | None = None, fingerprint: str | None = None
                            ) -> AggregatedBatch:
    """Regional aggregation of many images, each given as Regions (or anything Regions.coerce takes).
    `assignments`: optional list of precomputed word ids, one (n_i, m) array per image aligned with
    its Regions.descriptors."""
    spec = kernel_spec(kernel)
    x, assign, image_regions, region_members, members = regions_layout(codebook, regions_list, m, assignments,
                                                                       fingerprint)
    if assign is None:
        assign, _ = codebook.quantize(x, m)
    kind = spec.native_kind if spec.regional else 0
    offs, words, codes = _native.aggregate(x, assign, codebook.centroids, image_regions, region_members, members,
                                           kind=kind, binary=spec.binary)
    return AggregatedBatch(offs, words, codes, codebook.fingerprint)


def aggregate(descriptors: Any, codebook: Codebook, kernel: str = "asmk*", m: int = 1) -> Aggregated:
    """Aggregate one image. For the regional kernels, `descriptors` is a region list (see Regions);
    for ASMK / ASMK* an (n, D) array."""
    spec = kernel_spec(kernel)
    m = check_positive_int(m, "m")
    if spec.regional:
        return aggregate_regions_batch(codebook, [descriptors], kernel, m)[0]
    x = as_descriptors(descriptors, codebook.dim)
    offsets = np.array([0, x.shape[0]], dtype=np.int64)
    return aggregate_images(codebook, x, offsets, kernel, m)[0]


def vlad(descriptors: Any, codebook: Codebook, m: int = 1, l2: bool = True) -> NDArray[np.float32]:
    """Dense VLAD (C*D floats) of one image; with a region list, R-VLAD: each region's VLAD
    l2-normalised, summed, divided by R (or l2-normalised when l2=True)."""
    m = check_positive_int(m, "m")
    if isinstance(descriptors, np.ndarray):
        regs = Regions(as_descriptors(descriptors, codebook.dim), np.array([0, len(descriptors)], np.int64))
    else:
        regs = Regions.coerce(descriptors, codebook.dim)
    assign, _ = codebook.quantize(regs.descriptors, m)
    members = regs.members if regs.members is not None else np.arange(regs.descriptors.shape[0], dtype=np.int64)
    out = _native.vlad(regs.descriptors, assign, codebook.centroids, np.array([0, regs.n_regions], np.int64),
                       regs.offsets, members, l2=bool(l2))
    first: NDArray[np.float32] = out[0]
    return first
