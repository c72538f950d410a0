"""The inverted-file index over aggregated images (ASMK, ASMK*, R-ASMK, R-ASMK*, Naive-R-ASMK), and
regional search (one entry per region, pooled per image)."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from numpy.typing import ArrayLike, NDArray

import d2r._native as _native
from d2r.core.backend import CPU, Backend, get_backend
from d2r.core.progress import bar as _bar
from d2r.core.checks import (as_descriptors, as_ids, as_image_id, as_offsets, check_k, check_positive_int,
                      check_score_params)
from d2r.core.aggregate import (Aggregated, AggregatedBatch, Regions, aggregate_images, aggregate_regions_batch,
                              as_assignments, check_fingerprint, kernel_spec, _concat_images, RegionsLike)
from d2r.core.codebook import Codebook
from d2r.core.expand import Expansion, as_expansion, expand_query, search_expanded
from d2r.core.index_io import (FORMAT_VERSION, PAGE_BYTES, FormatWarning, IndexFileError, PathArg, check_structure,
                       read_index_file, validate_meta, write_index_file)

if TYPE_CHECKING:
    from d2r._native import _SegmentPart

#: Aggregated images as add_aggregated / search_aggregated take them.
AggregatedLike = Aggregated | AggregatedBatch | Iterable[Aggregated]
#: (scores float32, image ids int64) of a search: 1-D for one query, 2-D (n_queries, k) for several.
SearchResult = tuple[NDArray[np.float32], NDArray[np.int64]]

# Work is split into chunks of this many descriptors (bounds memory, drives the progress bar).
_CHUNK_DESCRIPTORS = 1 << 20
# The application metadata keys the index file holds (d2r.core.index_io validates them on load).
_METADATA_KEYS = ("extractor", "region_source")
# save() streams the compressed postings in chunks of at least this many bytes.
_SAVE_CHUNK_BYTES = 64 << 20


class _IndexBase:
    """What Index and RegionalSearchIndex share: the codebook, the kernel and its parameters,
    aggregation in bounded chunks, and the file format.

    Concurrency (both classes): any number of threads may search, score, save and read the
    properties while other threads add and remove images; writers run one at a time and readers never
    wait for them. Every call works on one consistent state (a snapshot of the inverted file) and every
    add or remove is atomic: it completes, or raises and leaves the index exactly as it was (also on
    MemoryError). The parameters (codebook, kernel, alpha, tau, normalize, m_db, m_query) are fixed at
    construction."""

    _ivf: Any   # the inverted file: the backend's (the native InvertedFile's interface)
    _source: Path | None = None   # the file a memory-mapped index reads its postings from (named in errors)

    def __init__(self, codebook: Codebook, kernel: str, alpha: float, tau: float, normalize: bool,
                 m_db: int, m_query: int) -> None:
        if not isinstance(codebook, Codebook):
            codebook = Codebook(codebook)
        self.codebook = codebook
        self.spec = kernel_spec(kernel)
        self.kernel = self.spec.name
        self.alpha, self.tau, self.normalize = check_score_params(alpha, tau, normalize)
        self.m_db = check_positive_int(m_db, "m_db")
        self.m_query = check_positive_int(m_query, "m_query")
        for m in (self.m_db, self.m_query):
            if m > codebook.n_words:
                raise ValueError(f"multiple assignment m={m} exceeds the number of words ({codebook.n_words})")
        self._backend: Backend = CPU
        #: Application metadata saved with the index and given back by `load`, opaque to the engine:
        #: ``"extractor"`` (``d2r.extract.describe`` of the extractor the database features came from;
        #: ``d2r search`` extracts queries the same way) and ``"region_source"`` (the name of the
        #: database regions' source, e.g. "grid:3") are the keys d2r's applications write.
        self.metadata: dict[str, Any] = {}

    # ---- properties ---------------------------------------------------------------------------
    @property
    def extractor(self) -> dict[str, Any] | None:
        """``metadata["extractor"]``: the extractor the database features came from, or None."""
        return self.metadata.get("extractor")

    @extractor.setter
    def extractor(self, value: dict[str, Any] | None) -> None:
        self._set_metadata("extractor", value)

    @property
    def region_source(self) -> str | None:
        """``metadata["region_source"]``: the database regions' source, or None."""
        return self.metadata.get("region_source")

    @region_source.setter
    def region_source(self, value: str | None) -> None:
        self._set_metadata("region_source", value)

    def _set_metadata(self, key: str, value: Any) -> None:
        if value is None:
            self.metadata.pop(key, None)
        else:
            self.metadata[key] = value

    @property
    def device(self) -> str:
        """Where the index lives and computes: "cpu", or "cuda" (the backend's name)."""
        return str(self._backend.name)

    @property
    def backend(self) -> Backend:
        """The backend object (d2r.core.backend) the index computes with, chosen at construction or by `to`."""
        return self._backend

    def __len__(self) -> int:
        n: int = self._ivf.n_images
        return n

    def __contains__(self, image_id: object) -> bool:
        i = as_image_id(image_id)
        found: bool = i is not None and self._ivf.contains(i)
        return found

    @property
    def ids(self) -> NDArray[np.int64]:
        """The indexed image ids, in insertion order."""
        ids: NDArray[np.int64] = self._ivf.image_ids()
        return ids

    @property
    def _next_id(self) -> int:
        return int(self._ivf.next_id)

    # ---- aggregation --------------------------------------------------------------------------
    def _aggregate_chunks(self, x: Any, offsets: NDArray[np.int64], kernel: str, m: int, progress: bool | None,
                          assignments: Any = None, fingerprint: str | None = None, desc: str = "aggregate"
                          ) -> Iterator[tuple[int, Any]]:
        """Yields (first image, AggregatedBatch) over chunks of about _CHUNK_DESCRIPTORS descriptors
        (x: numpy, or an array of the device backend, which yields its own batches)."""
        n_img = offsets.shape[0] - 1
        backend = self._backend
        if assignments is not None:
            check_fingerprint(fingerprint, self.codebook.fingerprint, "the assignments")
        if assignments is not None and not backend.owns(assignments):
            assignments = as_assignments(assignments, x.shape[0], m, self.codebook.n_words)
        bar = _bar(n_img, desc, progress if progress is not None else n_img >= 2000)
        # with a progress bar, chunks of at most 1 % of the images, so that the bar moves smoothly
        chunk = _CHUNK_DESCRIPTORS if bar is None else max(1, min(_CHUNK_DESCRIPTORS, int(offsets[-1]) // 100))
        i = 0
        while i < n_img:
            j = int(np.searchsorted(offsets, offsets[i] + chunk, side="right")) - 1
            j = min(max(j, i + 1), n_img)
            sub = offsets[i:j + 1] - offsets[i]
            a = None if assignments is None else assignments[offsets[i]:offsets[j]]
            yield i, backend.aggregate_images(self.codebook, x[offsets[i]:offsets[j]], sub, kernel, m, a)
            if bar is not None:
                bar.update(j - i)
            i = j
        if bar is not None:
            bar.close()

    def _as_images(self, descriptors: Any, offsets: Any) -> tuple[Any, NDArray[np.int64], bool]:
        """(concatenated descriptors, offsets, single) from an array, an array + offsets or a list."""
        if isinstance(descriptors, (list, tuple)):
            if offsets is not None:
                raise ValueError("offsets are only used with one concatenated descriptor array")
            if len(descriptors) == 0:
                raise ValueError("no images given (empty list)")
            if self._backend.owns(descriptors[0]):
                return self._backend.concat(descriptors, self.codebook.dim)
            x, offs = _concat_images(descriptors, self.codebook.dim)
            return x, offs, False
        if self._backend.owns(descriptors):
            x = self._backend.as_matrix(descriptors, self.codebook.dim)
            n = x.shape[0]
            if offsets is None:
                return x, np.array([0, n], np.int64), True
            return x, as_offsets(offsets, n, "offsets"), False
        x = as_descriptors(descriptors, self.codebook.dim)
        if offsets is None:
            return x, np.array([0, x.shape[0]], np.int64), True
        return x, as_offsets(offsets, x.shape[0], "offsets"), False

    def _query_batches(self, queries: Any, progress: bool | None, assignments: Any, fingerprint: str | None = None
                       ) -> tuple[list[Any], bool]:
        """(batches of aggregated queries, single) for search."""
        single = isinstance(queries, np.ndarray) or not isinstance(queries, (list, tuple))
        x, offs, _ = self._as_images(queries if single else list(queries), None)
        batches = [b for _, b in self._aggregate_chunks(x, offs, self.spec.query_kernel, self.m_query, progress,
                                                        assignments, fingerprint, "aggregate queries")]
        return batches, single

    def _check_aggregated(self, batch: AggregatedBatch, what: str) -> None:
        check_fingerprint(batch.fingerprint, self.codebook.fingerprint, f"the {what} images")
        want = np.uint8 if self.spec.binary else np.float32
        width = (self.codebook.dim + 7) // 8 if self.spec.binary else self.codebook.dim
        if batch.codes.dtype != want or batch.codes.shape[1] != width:
            raise ValueError(f"{what} codes are {batch.codes.dtype} x {batch.codes.shape[1]}, the {self.kernel!r} "
                             f"index needs {np.dtype(want)} x {width}")
        if batch.words.size and (batch.words.min() < 0 or batch.words.max() >= self.codebook.n_words):
            raise ValueError(f"{what} word ids out of range [0, {self.codebook.n_words})")

    def _as_batch(self, aggregated: AggregatedLike) -> tuple[AggregatedBatch, bool]:
        if isinstance(aggregated, AggregatedBatch):
            return aggregated, False
        if isinstance(aggregated, Aggregated):
            return AggregatedBatch.from_list([aggregated]), True
        return AggregatedBatch.from_list(aggregated), False

    def _expanded(self, batch: AggregatedBatch, expand: Any) -> AggregatedBatch:
        """The batch's queries expanded (d2r.core.expand): a first search for the top results, then
        each query rebuilt from its codes and theirs. The batch itself when expand is None."""
        expansion = as_expansion(expand)
        if expansion is None:
            return batch
        if self._backend is not CPU:
            raise NotImplementedError("query expansion runs on the CPU index: it reads the stored codes of the "
                                      "top results, which the GPU inverted file does not expose; use "
                                      "index.to('cpu')")
        _, ids = self._first_search(batch, expansion.top)
        return AggregatedBatch.from_list([expand_query(self, batch[i], ids[i], expansion) for i in range(len(batch))])

    def _first_search(self, batch: AggregatedBatch, kk: int) -> SearchResult:
        raise NotImplementedError

    # ---- persistence --------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "kernel": self.kernel, "alpha": self.alpha, "tau": self.tau,
                "normalize": self.normalize, "m_db": self.m_db, "m_query": self.m_query,
                "dim": self.codebook.dim, "n_words": self.codebook.n_words, "d2r_format": FORMAT_VERSION,
                "codebook_fingerprint": self.codebook.fingerprint,
                **{k: v for k, v in self.metadata.items() if k in _METADATA_KEYS}}

    def save(self, path: PathArg) -> None:
        """Write the index (with its codebook) to one file, atomically. Safe beside concurrent adds
        and removes: the file holds one consistent state. The postings are streamed to the file
        compressed, a few tens of MB at a time (never a second copy of the index in memory);
        removed images' postings are left out."""
        ivf = self._backend.host_inverted_file(self._ivf)   # a device index: compressed by a CPU one
        w = ivf.writer(PAGE_BYTES)

        def chunks() -> Iterator[NDArray[np.uint8]]:
            while not w.done:
                yield w.next(_SAVE_CHUNK_BYTES)

        def finish() -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
            return ({"word_offsets": w.word_offsets(), "page_crc": w.page_crc()},
                    {"n_entries": int(w.n_entries), "page_bytes": int(w.page_bytes)})

        sections = {"centroids": self.codebook.centroids, "image_ids": w.image_ids(), "word_counts": w.word_counts()}
        write_index_file(path, {**self._meta(), "next_id": int(w.next_id)}, sections,
                         stream=("postings", chunks(), finish))

    @classmethod
    def load(cls, path: PathArg, mmap: bool = False, verify: bool | str | None = None,
             device: str | Backend = "cpu") -> Any:
        """Load an index saved by `save`.

        mmap=True maps the file instead of reading it: opening reads the header, the codebook, the
        image table and the word table, and a posting list is read from disk when a search first
        needs it, so a million-image index opens in a fraction of a second and uses memory only
        for what its searches touch.

        verify: what is checked against the file's checksums. True: everything, at load (reads the
        whole file, and decodes every posting list: each image's postings must match its word
        count). "lazy" (the default with mmap=True): everything but the postings at load, and
        each 64 KiB page of postings when a search first reads it (a mismatch raises IndexFileError
        from that search); ``index.verify()`` checks every page at once (it releases the GIL, so it
        can run in a background thread beside searches). False: no checksums (the structure is
        still checked, also as lists are decoded; damage that keeps the structure valid, e.g. in
        the codes, goes unnoticed: README, "Index files: what is checked"). Default: True, or
        "lazy" with mmap=True.

        A memory-mapped file truncated by another process while mapped does not end the process:
        every later operation on the index raises IndexFileError (README, "Concurrency and
        failures").

        Files of format 1 and 2 (plain posting arrays) are compressed in memory as they load, and
        the postings of format 3 files (Golomb-Rice coded) are converted to format 4 in memory (mmap
        then reads them whole; save them again to map them). device="cuda" then moves the index to
        the GPU.

        Returns an Index or a RegionalSearchIndex, whichever the file holds (Index.load takes both; typed
        Any so that callers that know which they load need no cast)."""
        if verify is None:
            verify = "lazy" if mmap else True
        idx, part, ids, counts, plain, next_id = cls._read(path, mmap, verify)
        try:
            if plain is not None:
                idx._ivf.set_content(plain["offsets"], plain["slots"], plain["codes"], ids, counts, next_id)
            else:
                idx._ivf.set_segments([part], ids, counts, next_id)
                if verify is True:
                    idx._ivf.verify()
        except (TypeError, ValueError) as exc:
            if isinstance(exc, IndexFileError):
                raise IndexFileError(f"{path}: {exc}") from None
            raise IndexFileError(f"{path}: corrupt index file ({exc})") from exc
        if mmap:
            idx._source = Path(path)
        return idx.to(device)

    @contextlib.contextmanager
    def _naming_file(self) -> Iterator[None]:
        """An IndexFileError from postings read later from the mapped file (a lazily verified page)
        names that file."""
        try:
            yield
        except IndexFileError as exc:
            src = self._source
            if src is None or str(exc).startswith(str(src)):
                raise
            raise IndexFileError(f"{src}: {exc}") from None

    @classmethod
    def _read(cls, path: PathArg, mmap: bool, verify: bool | str
              ) -> tuple[Index | RegionalSearchIndex, _SegmentPart | None, NDArray[np.int64], NDArray[np.int32],
                         dict[str, NDArray[Any]] | None, int]:
        """(an empty index with the file's parameters, its compressed segment (the 8-tuple of
        InvertedFile.set_segments) or None, image ids, word counts, plain posting arrays of a format 1
        or 2 file or None, next_id), checked (header, structure, codebook fingerprint)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such index file")
        if verify not in (True, False, "lazy"):
            raise ValueError(f"verify must be True, False or 'lazy', got {verify!r}")
        meta, sec, owner = read_index_file(path, mmap=mmap, verify=verify)
        meta = validate_meta(meta, path)
        check_structure(meta, sec, path)
        target: type[Index] | type[RegionalSearchIndex] = (RegionalSearchIndex if meta["kind"] == "RegionalSearchIndex"
                                                           else Index)
        if cls is not Index and target is not cls:
            raise IndexFileError(f"{path}: holds a {meta['kind']}, not a {cls.__name__}")
        centroids = np.array(sec["centroids"])
        if centroids.shape != (meta["n_words"], meta["dim"]):
            raise IndexFileError(f"{path}: codebook shape does not match the header")
        try:
            codebook = Codebook(centroids)
        except (TypeError, ValueError) as exc:   # non-finite or overflowing centroids (also found by fuzzing)
            raise IndexFileError(f"{path}: corrupt index file: invalid embedded codebook ({exc})") from None
        if meta["codebook_fingerprint"] is None:
            warnings.warn(f"{path}: written by an older d2r (index format {meta['format_version']}), without a "
                          "codebook fingerprint; it loads, and saving it again upgrades it", FormatWarning,
                          stacklevel=3)
        elif meta["codebook_fingerprint"] != codebook.fingerprint:
            raise IndexFileError(f"{path}: corrupt index file (the embedded codebook is {codebook.fingerprint}, the "
                                 f"header says {meta['codebook_fingerprint']})")
        idx = target._from_meta(meta, codebook)
        idx.extractor = meta.get("extractor")
        rs = meta.get("region_source")
        idx.region_source = rs if isinstance(rs, str) else None   # the metadata keys the file format holds
        ids = sec["image_ids"]
        if "region_image" in sec:  # files of d2r <= 0.1: region entry ids and an entry -> image table
            ids = np.ascontiguousarray(sec["region_image"][ids])
        if "postings" in sec:
            part = (int(ids.shape[0]), meta["n_entries"], sec["word_offsets"], sec["postings"],
                    sec["page_crc"] if verify else None, meta["page_bytes"], owner, meta["format_version"])
            return idx, part, ids, sec["word_counts"], None, meta["next_id"]
        codes = sec["codes"]
        codes = codes.reshape(codes.shape[0], -1).view(np.uint8) if codes.dtype != np.uint8 else codes
        plain = {"offsets": sec["offsets"], "slots": sec["slots"], "codes": codes}
        return idx, None, ids, sec["word_counts"], plain, meta["next_id"]

    def verify(self) -> int:
        """Check every page of a memory-mapped index's postings against its checksums now (the
        pages a search reads are checked anyway when first read), then decode every posting list
        and check its structure, the posting count and each image's word count. Releases the GIL: may run in a
        background thread beside searches, adds and removes. Returns the bytes verified; a mismatch
        raises IndexFileError."""
        with self._naming_file():
            return int(self._ivf.verify())

    def compact(self) -> int:
        """Rewrite the postings without those of removed images (which `remove` only marks) and
        merge the segments, in memory. Returns the number of postings dropped. For an index too large
        to hold in memory, `save` it instead: the file leaves removed images out."""
        with self._naming_file():
            return int(self._ivf.compact())


class Index(_IndexBase):
    """Inverted-file index of aggregated images.

    kernel: "asmk*" (binary codes, Hamming similarity; the default), "asmk" (float codes, dot
    product), "rasmk*" / "rasmk" (database images aggregated from regions, METHOD.md section 3),
    "naive-rasmk" (the paper's strawman). Queries are always aggregated as one region (ASMK or ASMK*).
    alpha, tau: the selectivity sigma(u) = sign(u)|u|^alpha if u > tau else 0 (alpha in (0, 64],
    tau in [-1, 1)).
    normalize: gamma normalisation, ``S = sum_k sigma(u_k) / sqrt(|W_q| |W_x|)`` (on by default, as the
    paper writes the kernel; the official D2R run uses normalize=False).
    m_db, m_query: multiple assignment (the m nearest words) for database images and queries.
    device: "cpu" (the default) or "cuda": the inverted file lives in GPU memory, and adding and searching
    with descriptors quantise, aggregate, score and select the top k on the GPU (same results as the
    CPU; descriptors may be numpy, CuPy or PyTorch CUDA arrays). `to(device)` moves an index.

    Thread safety: see the README ("Concurrency"): searches, saves and reads run concurrently with
    each other and with adds and removes; every add and remove is atomic. `to()` is not: call it
    while no other thread uses the index.
    """

    def __init__(self, codebook: Codebook, kernel: str = "asmk*", alpha: float = 3.0, tau: float = 0.0,
                 normalize: bool = True, m_db: int = 1, m_query: int = 1, device: str | Backend = "cpu") -> None:
        super().__init__(codebook, kernel, alpha, tau, normalize, m_db, m_query)
        self._backend = get_backend(device)
        self._backend.require()
        self._ivf = self._backend.inverted_file(self.codebook.n_words, self.codebook.dim, self.spec.binary)

    def to(self, device: str | Backend) -> "Index":
        """Move the index to "cuda" (GPU memory) or "cpu", in place; returns the index. The conversion
        is done by the device side's backend (d2r.cuda), as faiss's GpuCloner does."""
        target = get_backend(device)
        target.require()
        if target is self._backend:
            return self
        mover = target if target.is_device else self._backend
        new = mover.move(self._ivf, target, self.codebook.n_words, self.codebook.dim, self.spec.binary)
        self._ivf, self._backend = new, target
        return self

    def __repr__(self) -> str:
        return (f"Index(kernel={self.kernel!r}, images={len(self)}, n_words={self.codebook.n_words}, "
                f"dim={self.codebook.dim}, alpha={self.alpha}, tau={self.tau}, normalize={self.normalize})")

    @property
    def word_counts(self) -> NDArray[np.int32]:
        """Number of stored words of each indexed entry, in insertion order (as `ids`)."""
        counts: NDArray[np.int32] = self._ivf.word_counts()
        return counts

    def stats(self) -> dict[str, Any]:
        n = len(self)
        entries = self._ivf.n_entries
        b = self._ivf.memory_bytes
        return {
            "kernel": self.kernel,
            "images": n,
            "entries": n,  # one inverted-file entry (a set of words) per image
            "postings": entries,
            "words_per_image": entries / n if n else 0.0,
            "code_bytes": self._ivf.code_bytes,
            "bytes": b,
            "bytes_per_image": b / n if n else 0.0,
            "bytes_per_posting": b / entries if entries else 0.0,
            "removed_pending": int(getattr(self._ivf, "dead_images", 0)),  # tombstones until compact/save
            "segments": int(getattr(self._ivf, "n_segments", 1)),
        }

    def aggregate(self, descriptors: Any, query: bool = False) -> Aggregated:
        """Aggregate one image as this index stores it (query=True: as a query is aggregated). For a
        regional kernel a database image may be given as a region list."""
        m = self.m_query if query else self.m_db
        if not query and self.spec.regional and not isinstance(descriptors, np.ndarray):
            return aggregate_regions_batch(self.codebook, [descriptors], self.kernel, m)[0]
        x = as_descriptors(descriptors, self.codebook.dim)
        kern = self.spec.query_kernel if (query or not self.spec.regional) else self.kernel
        return aggregate_images(self.codebook, x, np.array([0, x.shape[0]], np.int64), kern, m)[0]  # carries the fingerprint

    # ---- adding and removing ------------------------------------------------------------------
    def _insert(self, batches: list[Any], ids: NDArray[np.int64] | None) -> np.ndarray:
        """Inserts aggregated batches in one atomic native call; ids None: allocated natively."""
        return self._backend.insert(self._ivf, batches, ids)

    def add(self, descriptors: Any, image_ids: ArrayLike | None = None, offsets: ArrayLike | None = None,
            progress: bool | None = None, assignments: Any = None, fingerprint: str | None = None) -> np.ndarray:
        """Index one image (an (n, D) array), or many (a list of arrays, or one array with per-image
        `offsets`). Returns the image ids (default: consecutive after the largest id so far). Ids
        are integers in [0, 2**62); an id outside, or a default id that would reach 2**62, raises
        ValueError.
        `assignments`: optional precomputed word ids (n_descriptors, m_db) of the concatenated
        descriptors (e.g. from codebook.quantize), to quantise once and index many times;
        `fingerprint`: the fingerprint of the codebook that made them (``codebook.fingerprint``), checked
        against the index's when given. Atomic: all the images are indexed, or none (an error leaves the
        index unchanged)."""
        batches, n = self._db_batches(descriptors, offsets, progress, assignments, fingerprint)
        ids = None if image_ids is None else as_ids(image_ids, n)
        return self._insert(batches, ids)

    def _db_batches(self, descriptors: Any, offsets: ArrayLike | None = None, progress: bool | None = None,
                    assignments: Any = None, fingerprint: str | None = None) -> tuple[list[Any], int]:
        """(aggregated batches, number of images) of images to add, as `add` aggregates them."""
        x, offs, _ = self._as_images(descriptors, offsets)
        kern = self.kernel if self.spec.regional else self.spec.query_kernel
        batches = [b for _, b in self._aggregate_chunks(x, offs, kern, self.m_db, progress, assignments,
                                                        fingerprint, "index")]
        return batches, offs.shape[0] - 1

    def add_regions(self, regions: RegionsLike, image_id: Any = None) -> int:
        """Index one database image given by its regions (a list of arrays with region 0 the whole
        image, (descriptors, offsets, n_regions), (descriptors, offsets, members) or d2r.Regions)."""
        ids = self.add_regions_many([regions], None if image_id is None else [image_id])
        return int(ids[0])

    def add_regions_many(self, regions_list: Iterable[RegionsLike], image_ids: ArrayLike | None = None,
                         progress: bool | None = None, batch_size: int = 512, assignments: Sequence[Any] | None = None,
                         fingerprint: str | None = None) -> np.ndarray:
        """Index many images, each given by its regions, in batched native calls. `assignments`:
        optional precomputed word ids, one (n_i, m_db) array per image aligned with its descriptors
        (for a region list: the regions' arrays concatenated in order), made by the codebook with
        `fingerprint` (checked when given). Atomic."""
        regions_list = list(regions_list)
        ids = None if image_ids is None else as_ids(image_ids, len(regions_list))
        return self._insert(self._region_batches(regions_list, progress, batch_size, assignments, fingerprint), ids)

    def _region_batches(self, regions_list: list[RegionsLike], progress: bool | None = None, batch_size: int = 512,
                        assignments: Sequence[Any] | None = None, fingerprint: str | None = None) -> list[Any]:
        """The aggregated batches of images given by their regions, as `add_regions_many` makes them."""
        if not self.spec.regional:
            raise ValueError(f"kernel {self.kernel!r} is not regional; use 'rasmk*', 'rasmk' or "
                             "'naive-rasmk', or RegionalSearchIndex")
        if assignments is not None and len(assignments) != len(regions_list):
            raise ValueError(f"{len(assignments)} assignment arrays given for {len(regions_list)} images")
        if not regions_list:
            raise ValueError("no images given (empty list)")
        batch_size = check_positive_int(batch_size, "batch_size")
        bar = _bar(len(regions_list), "aggregate regions",
                   progress if progress is not None else len(regions_list) >= 2000)
        batches: list[Any] = []
        for s in range(0, len(regions_list), batch_size):
            chunk = regions_list[s:s + batch_size]
            a = None if assignments is None else assignments[s:s + batch_size]
            batches.append(self._backend.aggregate_regions(self.codebook, chunk, self.kernel, self.m_db, a, fingerprint))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return batches

    def add_aggregated(self, aggregated: AggregatedLike, image_ids: ArrayLike | None = None) -> np.ndarray:
        """Index images aggregated earlier (Aggregated, a list of them, or an AggregatedBatch).
        image_ids: as for `add` (integers in [0, 2**62))."""
        batch, _ = self._as_batch(aggregated)
        self._check_aggregated(batch, "aggregated")
        ids = None if image_ids is None else as_ids(image_ids, len(batch))
        return self._insert([batch], ids)

    def remove(self, image_ids: ArrayLike) -> int:
        """Remove images by id (every id must be indexed, else KeyError and nothing is removed).
        Returns the number removed. Removed images become tombstones (O(images), the postings are not
        rewritten): searches skip them at once; `compact()`, `save` and later merges drop their
        postings."""
        ids = as_ids(image_ids)
        return int(self._ivf.remove(ids)) if ids.size else 0

    # ---- search -------------------------------------------------------------------------------
    def search(self, queries: Any, k: int | None = 10, progress: bool | None = None, assignments: Any = None,
               fingerprint: str | None = None, expand: str | Expansion | None = None) -> SearchResult:
        """Search with one query (an (n, D) array: 1-D results) or many (a list of arrays: 2-D results
        (n_queries, k)). Returns (scores float32, image ids int64), score descending, ties by id
        ascending; k=None gives the full ranking. k larger than the index gives every image.
        `assignments`: optional precomputed word ids (n_descriptors, m_query) of the queries'
        concatenated descriptors, made by the codebook with `fingerprint` (checked when given).
        `expand`: query expansion, None (the default), "hqe" (Hamming query expansion), "aqe"
        (alpha-QE), or d2r.HQE / d2r.AlphaQE parameters (d2r.core.expand): a first search, then a
        search with the expanded query, whose scores are returned. CPU indexes only."""
        kk = check_k(k)
        batches, single = self._query_batches(queries, progress, assignments, fingerprint)
        batches = self._backend.join(batches)  # the CPU: one call, one snapshot for every query
        expansion = as_expansion(expand)
        if expansion is not None:
            parts = [search_expanded(self._search_batch, lambda b: self._expanded(b, expansion), b, kk, expansion)
                     for b in batches]
        else:
            parts = [self._search_batch(b, kk) for b in batches]
        scores, ids = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return (scores[0], ids[0]) if single else (scores, ids)

    def _first_search(self, batch: AggregatedBatch, kk: int) -> SearchResult:
        return self._search_batch(batch, kk)

    def _search_batch(self, batch: Any, kk: int) -> SearchResult:
        """Searches one batch (an AggregatedBatch, or the device backend's batch)."""
        with self._naming_file():
            found: SearchResult = self._ivf.search(batch.offsets, batch.words, batch.code_bytes, kk, self.alpha,
                                                   self.tau, self.normalize)
        return found

    def search_aggregated(self, aggregated: AggregatedLike, k: int | None = 10,
                          expand: str | Expansion | None = None) -> SearchResult:
        """Search with queries aggregated earlier (Aggregated: 1-D results; a list: 2-D); `expand` as
        for `search`."""
        kk = check_k(k)
        batch, single = self._as_batch(aggregated)
        self._check_aggregated(batch, "query")
        expansion = as_expansion(expand)
        if expansion is not None:
            s, i = search_expanded(self._search_batch, lambda b: self._expanded(b, expansion), batch, kk, expansion)
        else:
            s, i = self._search_batch(batch, kk)
        return (s[0], i[0]) if single else (s, i)

    def score_all(self, queries: Any) -> tuple[np.ndarray, np.ndarray]:
        """Scores of every indexed image for each query: (scores (n_queries, n_images), ids (n_images,))
        in insertion order, both from one state of the index."""
        single = isinstance(queries, np.ndarray)
        x, offs, _ = self._as_images([queries] if single else list(queries), None)
        batch = aggregate_images(self.codebook, x, offs, self.spec.query_kernel, self.m_query)
        with self._naming_file():
            s, ids = self._ivf.score_all(batch.offsets, batch.words, batch.code_bytes, self.alpha, self.tau,
                                         self.normalize)
        return (s[0] if single else s), ids

    def normalized_scores(self, queries: Any, scores: ArrayLike, ids: ArrayLike) -> NDArray[np.float64]:
        """Scores a person can read: each raw score of a search divided by the query's own
        self-similarity, so that 1.0 is the query's image itself (every word of the query found with
        an identical code), and an image sharing no word with the query scores 0.

        For query X and database image Y (METHOD.md section 4), the raw score is
        ``S(X, Y) = gamma(X) gamma(Y) sum_k sigma(u_k)`` over the shared words; the normalised score is
        ``sum_k sigma(u_k) / sum_{k in W_X} sigma(u_kk)``: the shared words' selective similarity as a
        share of the query's similarity to itself, both without gamma. (With gamma on, ``S(X, X)`` is
        already 1, so dividing the raw score by it would change nothing: what keeps true matches'
        raw scores small is ``gamma(Y)``, an image with many words (a large photo, many regions)
        scoring low even when it holds the whole query. The normalised score does not depend on the
        database image's size, so it reads the same with gamma on and off.) It is a share of the
        query, not a symmetric similarity: an image that contains the query's object among much else
        can score near 1. Equal to 1 for the query image itself when the database image was aggregated
        as the query is (whole-image kernels with m_db == m_query); regional kernels aggregate a
        database image from its regions, so an identical image scores near 1, and Naive-R-ASMK's
        unnormalised sums can exceed 1. A raw score of -1 (no features on either side) stays -1.

        queries: what was searched: one (n, D) descriptor array or Aggregated (then `scores` and `ids`
        are 1-D, as ``search`` returns them for one query), or a list of them (2-D, one row per query).
        scores, ids: the search's results, e.g. ``index.normalized_scores(q, *index.search(q, k=10))``
        (scores and ids in that order, as search returns them). Ids no longer in the index give NaN."""
        single = isinstance(queries, (np.ndarray, Aggregated))
        qs = [queries] if single else list(queries)
        raw = np.asarray(scores, np.float64)
        idv = np.asarray(ids, np.int64)
        if single:
            raw, idv = raw[None], idv[None]
        if raw.shape != idv.shape or raw.ndim != 2 or raw.shape[0] != len(qs):
            raise ValueError(f"scores {np.shape(scores)} and ids {np.shape(ids)} must be a search's results for the "
                             f"{len(qs)} quer{'y' if len(qs) == 1 else 'ies'} given (same shape, one row per query)")
        aggs = [q if isinstance(q, Aggregated) else self.aggregate(q, query=True) for q in qs]
        for a in aggs:
            check_fingerprint(a.fingerprint, self.codebook.fingerprint, "the query")
        out = np.full(raw.shape, np.nan)
        if self.normalize:   # undo gamma(X) gamma(Y): the database images' stored word counts, by id
            all_ids, counts = self.ids, self.word_counts.astype(np.float64)
            order = np.argsort(all_ids, kind="stable")
            sorted_ids = all_ids[order]
            pos = np.clip(np.searchsorted(sorted_ids, idv), 0, max(len(sorted_ids) - 1, 0))
            known = (sorted_ids[pos] == idv) if len(sorted_ids) else np.zeros(idv.shape, bool)
            w_db = np.where(known, counts[order][pos] if len(sorted_ids) else 0.0, np.nan)
        for r, a in enumerate(aggs):
            own = self._self_sum(a)
            if own <= 0:
                out[r] = np.where(raw[r] == -1.0, -1.0, np.nan)
                continue
            if self.normalize:
                out[r] = raw[r] * np.sqrt(float(len(a.words)) * w_db[r]) / own
            else:
                out[r] = np.where(np.isin(idv[r], self.ids), raw[r] / own, np.nan)
            out[r] = np.where(raw[r] == -1.0, -1.0, out[r])
        return out[0] if single else out

    def _self_sum(self, agg: Aggregated) -> float:
        """sum_k sigma(u_kk) over the query's words: its similarity to itself without gamma."""
        if agg.codes.dtype == np.uint8:   # binary: u = 1 for every word
            return float(len(agg.words)) if 1.0 > self.tau else 0.0
        c = np.asarray(agg.codes, np.float64)
        u = np.einsum("ij,ij->i", c, c)
        return float(np.sum(np.where(u > self.tau, np.sign(u) * np.abs(u) ** self.alpha, 0.0)))

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], codebook: Codebook) -> Index:
        return cls(codebook, kernel=meta["kernel"], alpha=meta["alpha"], tau=meta["tau"],
                   normalize=meta["normalize"], m_db=meta["m_db"], m_query=meta["m_query"])


class RegionalSearchIndex(_IndexBase):
    """Regional search (paper section 4.2): every region of a database image is indexed as its own
    ASMK / ASMK* entry; an image's score is the max (or the mean over all its regions) of its regions'
    scores, and top-k runs over images. The index grows with the number of regions. It holds its
    entries in a multi-entry inverted file (an image's regions under the image's id), so adds and
    removes are atomic and searches see whole images; it runs on the CPU only and has no
    `add_aggregated` or `score_all` (use `search(queries, k=None)` for the full pooled ranking)."""

    def __init__(self, codebook: Codebook, kernel: str = "asmk*", pooling: str = "max", alpha: float = 3.0,
                 tau: float = 0.0, normalize: bool = True, m_db: int = 1, m_query: int = 1) -> None:
        if kernel_spec(kernel).regional:
            raise ValueError("RegionalSearchIndex indexes each region with a plain kernel: use 'asmk*' or 'asmk'")
        if pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', got {pooling!r}")
        super().__init__(codebook, kernel, alpha, tau, normalize, m_db, m_query)
        self.pooling = pooling
        self._ivf = _native.InvertedFile(self.codebook.n_words, self.codebook.dim, self.spec.binary, True)

    def __repr__(self) -> str:
        return (f"RegionalSearchIndex(kernel={self.kernel!r}, pooling={self.pooling!r}, images={len(self)}, "
                f"n_words={self.codebook.n_words})")

    def to(self, device: str | Backend) -> "RegionalSearchIndex":
        if get_backend(device) is not CPU:
            raise ValueError("RegionalSearchIndex (pooled regional search) runs on the CPU; use Index with "
                             "kernel='rasmk*' for GPU regional aggregation")
        return self

    def stats(self) -> dict[str, Any]:
        n = len(self)
        entries = int(self._ivf.entry_ids().shape[0])
        postings = self._ivf.n_entries
        b = self._ivf.memory_bytes
        return {"kernel": f"regional-{self.kernel}-{self.pooling}", "images": n, "entries": entries,
                "postings": postings, "words_per_image": postings / n if n else 0.0,
                "code_bytes": self._ivf.code_bytes, "bytes": b, "bytes_per_image": b / n if n else 0.0}

    def add(self, descriptors: Any, image_ids: ArrayLike | None = None, offsets: ArrayLike | None = None,
            progress: bool | None = None) -> np.ndarray:
        """Plain images: each image is one region (equals Index.search with the same kernel)."""
        x, offs, _ = self._as_images(descriptors, offsets)
        regions = [Regions(x[offs[i]:offs[i + 1]], np.array([0, offs[i + 1] - offs[i]], np.int64))
                   for i in range(offs.shape[0] - 1)]
        return self.add_regions_many(regions, image_ids, progress)

    def add_regions(self, regions: RegionsLike, image_id: Any = None) -> int:
        ids = self.add_regions_many([regions], None if image_id is None else [image_id])
        return int(ids[0])

    def add_regions_many(self, regions_list: Iterable[RegionsLike], image_ids: ArrayLike | None = None,
                         progress: bool | None = None, batch_size: int = 512, assignments: Sequence[Any] | None = None,
                         fingerprint: str | None = None) -> np.ndarray:
        """Index many images given by their regions (each region one entry). `assignments` and
        `fingerprint` as for Index.add_regions_many; ids integers in [0, 2**62). Atomic."""
        regions_list = list(regions_list)
        ids = None if image_ids is None else as_ids(image_ids, len(regions_list))
        b, owner = self._region_entries(regions_list, progress, assignments, fingerprint)
        if ids is None:
            entry_ids = self._ivf.add(b.offsets, b.words, b.code_bytes, None, owner)
        else:
            entry_ids = self._ivf.add(b.offsets, b.words, b.code_bytes, np.ascontiguousarray(ids[owner]))
        first = np.searchsorted(owner, np.arange(len(regions_list)))
        ids_of_images: NDArray[np.int64] = entry_ids[first]
        return ids_of_images

    def _region_entries(self, regions_list: list[RegionsLike], progress: bool | None = None,
                        assignments: Sequence[Any] | None = None, fingerprint: str | None = None
                        ) -> tuple[AggregatedBatch, NDArray[np.int64]]:
        """(AggregatedBatch of the entries, entry -> image position int64) of images given by their
        regions: one entry per region."""
        if assignments is not None:
            check_fingerprint(fingerprint, self.codebook.fingerprint, "the assignments")
        regions_list = [Regions.coerce(r, self.codebook.dim) for r in regions_list]
        if not regions_list:
            raise ValueError("no images given (empty list)")
        if assignments is not None and len(assignments) != len(regions_list):
            raise ValueError(f"{len(assignments)} assignment arrays given for {len(regions_list)} images")
        # Every region becomes one entry: a plain image made of that region's descriptors.
        flat: list[NDArray[np.float32]] = []
        flat_assign: list[NDArray[np.int32]] = []
        owner: list[int] = []
        for k, r in enumerate(regions_list):
            a = None if assignments is None else as_assignments(assignments[k], r.descriptors.shape[0], self.m_db,
                                                                self.codebook.n_words)
            for j in range(r.n_regions):
                rows = (r.members[r.offsets[j]:r.offsets[j + 1]] if r.members is not None
                        else np.arange(r.offsets[j], r.offsets[j + 1]))
                flat.append(r.descriptors[rows])
                if a is not None:
                    flat_assign.append(a[rows])
                owner.append(k)
        x, offs = _concat_images(flat, self.codebook.dim)
        joined = np.concatenate(flat_assign) if assignments is not None else None
        batches = [b for _, b in self._aggregate_chunks(x, offs, self.kernel, self.m_db, progress, joined,
                                                        desc="index regions")]
        return AggregatedBatch.concat(batches), np.asarray(owner, np.int64)

    def add_aggregated(self, aggregated: object, image_ids: object = None) -> NoReturn:
        raise NotImplementedError("RegionalSearchIndex indexes regions: use add_regions / add_regions_many")

    def score_all(self, queries: object) -> NoReturn:
        raise NotImplementedError("use search(queries, k=None) for the full pooled ranking")

    def remove(self, image_ids: ArrayLike) -> int:
        """Remove images (all their regions) by id; KeyError (and nothing removed) if one is absent."""
        ids = as_ids(image_ids)
        return int(self._ivf.remove(ids)) if ids.size else 0

    def search(self, queries: Any, k: int | None = 10, progress: bool | None = None, assignments: Any = None,
               fingerprint: str | None = None, expand: str | Expansion | None = None) -> SearchResult:
        """As Index.search, with each image's score pooled over its regions (`expand`: each expansion
        image contributes its region most similar to the query, d2r.core.expand)."""
        kk = check_k(k)
        batches, single = self._query_batches(queries, progress, assignments, fingerprint)
        return self._search_pooled_expanded(AggregatedBatch.concat(batches), kk, single, expand)

    def search_aggregated(self, aggregated: AggregatedLike, k: int | None = 10,
                          expand: str | Expansion | None = None) -> SearchResult:
        kk = check_k(k)
        batch, single = self._as_batch(aggregated)
        self._check_aggregated(batch, "query")
        return self._search_pooled_expanded(batch, kk, single, expand)

    def _search_pooled_expanded(self, batch: AggregatedBatch, kk: int, single: bool, expand: Any) -> SearchResult:
        expansion = as_expansion(expand)
        if expansion is None:
            return self._search_pooled(batch, kk, single)
        s, i = search_expanded(lambda b, k: self._search_pooled(b, k, False),
                               lambda b: self._expanded(b, expansion), batch, kk, expansion)
        return (s[0], i[0]) if single else (s, i)

    def _first_search(self, batch: AggregatedBatch, kk: int) -> SearchResult:
        found: SearchResult = self._ivf.search_pooled(batch.offsets, batch.words, batch.code_bytes,
                                                      self.pooling == "mean", kk, self.alpha, self.tau, self.normalize)
        return found

    def _search_pooled(self, batch: AggregatedBatch, kk: int, single: bool) -> SearchResult:
        """Scores every region entry and pools them per image (max or mean) in the native core."""
        with self._naming_file():
            s, i = self._ivf.search_pooled(batch.offsets, batch.words, batch.code_bytes, self.pooling == "mean", kk,
                                           self.alpha, self.tau, self.normalize)
        return (s[0], i[0]) if single else (s, i)

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "pooling": self.pooling}

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], codebook: Codebook) -> RegionalSearchIndex:
        return cls(codebook, kernel=meta["kernel"], pooling=meta["pooling"], alpha=meta["alpha"], tau=meta["tau"],
                   normalize=meta["normalize"], m_db=meta["m_db"], m_query=meta["m_query"])
