"""Sharded indexes: the manifest and its routing, the parallel build (:func:`build_sharded_index`)
and the split of an index file (:func:`shard_index`), the shard actors with their write-ahead logs,
and :class:`ShardedIndex`, the fan-out search with an exact merge (see :mod:`d2r.distributed`)."""
from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from d2r.core.atomic import atomic_write
from d2r.core.checks import as_ids, check_k, check_positive_int
from d2r.core.progress import bar as _bar
from d2r.core.aggregate import AggregatedBatch, Regions
from d2r.core.codebook import Codebook
from d2r.core.index import Index, RegionalSearchIndex
from d2r.core.kernels import code_bytes
from d2r.distributed.cluster import _ray, _require_connected

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "d2r-sharded-index"
MANIFEST_VERSION = 1
NAMES = "names.txt"
_SHARD_FILE = "shard-{:05d}.d2r"



def _manifest_names(manifest: dict) -> list[str]:
    """The image names a sharded index's manifest points at (empty when the file is absent)."""
    names = Path(manifest["folder"]) / manifest["names"]
    return names.read_text("utf-8").splitlines() if names.exists() else []

class ShardUnavailableError(RuntimeError):
    """A shard did not answer after the bounded retries (its actor is dead, restarts exhausted, or
    did not come back in time). `shards`: the shard numbers; `paths`: their files."""

    def __init__(self, message, shards=(), paths=()):
        super().__init__(message)
        self.shards = list(shards)
        self.paths = list(paths)


# ---- manifest and routing ----------------------------------------------------------------------------
def read_manifest(path) -> dict:
    """The manifest of a sharded index (its folder or its manifest.json), checked; the shard paths
    resolved against the folder (``"paths"``)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such sharded-index manifest (build one with `d2r index --shards N`)")
    try:
        m = json.loads(path.read_text("utf-8"))
        if m.get("format") != MANIFEST_FORMAT:
            raise ValueError("not a d2r sharded-index manifest")
        if m.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {m.get('version')} (this d2r reads {MANIFEST_VERSION}): upgrade d2r")
        n = len(m["shards"])
        r = m["routing"]
        if n < 1 or r["modulo"] != n or len(r["bounds"]) != n + 1 or np.any(np.diff(r["bounds"]) < 0):
            raise ValueError("inconsistent shards and routing")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: corrupt or foreign manifest ({exc})") from None
    m["paths"] = [str(path.parent / s["file"]) for s in m["shards"]]
    m["folder"] = str(path.parent)
    return m


def route(manifest: dict, image_ids) -> np.ndarray:
    """The shard of each image id: the shard whose build block holds it, or id % n_shards for ids at or
    after the build's last (images added later)."""
    ids = np.asarray(image_ids, np.int64)
    bounds = np.asarray(manifest["routing"]["bounds"], np.int64)
    n = len(bounds) - 1
    in_blocks = np.clip(np.searchsorted(bounds, ids, side="right") - 1, 0, n - 1)
    return np.where(ids < bounds[-1], in_blocks, ids % n).astype(np.int64)


def _store_shard_sizes(store: Path):
    from d2r.extract.store import read_npz, shard_files

    files = shard_files(store) if store.is_dir() else [store]
    return files, [len(read_npz(f, {"names"})["names"]) for f in files]


def _split(sizes, n):
    """Contiguous groups of store shards, n of them, balanced by image count: group boundaries."""
    cum = np.concatenate([[0], np.cumsum(sizes)])
    total = cum[-1]
    cuts = [0]
    for s in range(1, n):
        cuts.append(max(cuts[-1], int(np.searchsorted(cum, total * s / n, side="left"))))
    cuts.append(len(sizes))
    return [min(c, len(sizes)) for c in cuts]


def _build_one(store, files, out, centroids, kernel, pooling, params, first_id, batch_images):
    """One shard: a streaming build of its store files (for regional search, an in-memory build);
    returns (images, names)."""
    from d2r.workflows.build import build_index, build_regional_search_index
    from d2r.extract.store import read_npz, store_info

    codebook = Codebook(centroids)
    store, out = Path(store), Path(out)
    if not files:   # an empty shard: it receives images added later
        idx = RegionalSearchIndex(codebook, kernel, pooling, **params) if pooling else Index(codebook, kernel, **params)
        idx.extractor = store_info(store)["extractor"]
        idx.save(out)
        return 0, []
    if pooling:
        idx = build_regional_search_index(store, out, codebook, pooling, kernel, progress=False, store_files=files,
                                          first_id=first_id, write_names=False, **params)
    else:
        idx = build_index(store, out, codebook, kernel, progress=False, batch_images=batch_images, store_files=files,
                          first_id=first_id, write_names=False, **params)
    names = [str(n) for f in files for n in read_npz(store / f if store.is_dir() else store, {"names"})["names"]]
    return len(idx), names


def build_sharded_index(store, out, codebook, shards: int, kernel: str = "asmk*", *, regional_search: str | None = None,
                        alpha: float = 3.0, tau: float = 0.0, normalize: bool = True, m_db: int = 1, m_query: int = 1,
                        batch_images: int = 10_000, cpus_per_task: float = 1.0, progress: bool = True) -> dict:
    """Build a sharded index of the feature store `store` in the folder `out`, one Ray task per shard
    (run in parallel as the cluster's CPUs allow), and return its manifest.

    shards: the number of shards; each gets a contiguous block of the store's shards (balanced by
    images), so each task reads only its part of the store. kernel: as for ``d2r index`` ("asmk*",
    "asmk", or a regional kernel over stored regions); regional_search="max" | "mean": a
    RegionalSearchIndex per shard instead (each region its own entry; built in memory per shard).
    Resumable: shards already built (recorded in ``out/build.json``) are kept when run again with the
    same arguments, and each shard's own build resumes as :func:`d2r.build.build_index` does. The
    manifest is written last, atomically: a folder without one is an unfinished build."""
    ray = _require_connected()
    from d2r.extract.store import store_info

    store, out = Path(store).resolve(), Path(out)
    shards = check_positive_int(shards, "shards")
    if not isinstance(codebook, Codebook):
        codebook = Codebook.load(codebook)
    info = store_info(store)
    if info["images"] == 0:
        raise ValueError(f"{store}: the feature store holds no images; extract some with `d2r extract`")
    params: dict = {"alpha": alpha, "tau": tau, "normalize": normalize, "m_db": m_db, "m_query": m_query}
    probe = (RegionalSearchIndex(codebook, kernel, regional_search, **params) if regional_search
             else Index(codebook, kernel, **params))   # checks the kernel and parameters here, before any task
    if (probe.spec.regional or regional_search) and not info["regions"]:
        what = "regional search" if regional_search else f"kernel {kernel!r}"
        raise ValueError(f"{store}: the store holds no regions, which {what} needs; extract with regions "
                         "(`d2r extract ... --regions grid:3`, or another source) or use kernel 'asmk*'")
    files, sizes = _store_shard_sizes(store)
    cuts = _split(sizes, shards)
    cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    bounds = [int(cum[c]) for c in cuts]
    groups = [[f.name for f in files[cuts[s]:cuts[s + 1]]] for s in range(shards)]
    out.mkdir(parents=True, exist_ok=True)
    key = {"store": str(store), "files": [f.name for f in files], "codebook": codebook.fingerprint,
           "meta": {k: v for k, v in probe._meta().items() if k != "extractor"}, "shards": shards,
           "batch_images": batch_images}
    record_path = out / "build.json"
    record = {"key": key, "done": {}}
    if record_path.exists():
        old = json.loads(record_path.read_text("utf-8"))
        if old.get("key") == key:
            record = old
    remote = ray.remote(num_cpus=cpus_per_task)(_build_one)
    cref = ray.put(codebook.centroids)
    pending = {}
    for s in range(shards):
        name = _SHARD_FILE.format(s)
        if str(s) in record["done"] and (out / name).exists():
            continue
        pending[remote.remote(str(store), groups[s], str(out / name), cref, probe.kernel, regional_search, params,
                              bounds[s], batch_images)] = s
    bar = _bar(shards, "build shards", progress, unit="shard", leave=True)
    if bar is not None:
        bar.update(shards - len(pending))
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            s = pending.pop(ready[0])
            n, names = ray.get(ready[0])
            record["done"][str(s)] = {"images": n, "names": names}
            with atomic_write(record_path) as f:
                f.write(json.dumps(record).encode("utf-8"))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    with atomic_write(out / NAMES) as f:
        names = [n for s in range(shards) for n in record["done"][str(s)]["names"]]
        f.write(("\n".join(names) + "\n").encode("utf-8"))
    return _write_manifest(out, probe, [record["done"][str(s)]["images"] for s in range(shards)], bounds,
                           info["extractor"], source={"store": str(store)})


def _write_manifest(out: Path, probe, sizes, bounds, extractor, source) -> dict:
    """Write out/manifest.json atomically (last: a folder without one is an unfinished build)."""
    n = len(sizes)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                "shards": [{"file": _SHARD_FILE.format(s), "images": int(sizes[s]), "ids": [bounds[s], bounds[s + 1]]}
                           for s in range(n)],
                "routing": {"bounds": [int(b) for b in bounds], "modulo": n,
                            "rule": "an id in [bounds[s], bounds[s+1]) belongs to shard s; an id >= bounds[-1] to "
                                    "shard id % modulo"},
                "kind": type(probe).__name__, "kernel": probe.kernel, "pooling": getattr(probe, "pooling", None),
                "params": {"alpha": probe.alpha, "tau": probe.tau, "normalize": probe.normalize, "m_db": probe.m_db,
                           "m_query": probe.m_query},
                "codebook_fingerprint": probe.codebook.fingerprint, "extractor": extractor, "names": NAMES,
                "images": int(sum(sizes)), **source}
    with atomic_write(out / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=1).encode("utf-8"))
    return read_manifest(out)


def shard_index(index, out, shards: int, progress: bool = True) -> dict:
    """Split an existing index file into a sharded index in the folder `out` (no Ray needed): shard s
    gets the s-th block of the ids in ascending order (balanced by images), written by loading the
    file memory-mapped, marking the other images removed and saving (which streams, leaving them
    out). The names file beside the index (INDEX.names.txt) is copied to out/names.txt. Returns the
    manifest. Reads the index once per shard."""
    from d2r.workflows.build import _read_names

    path, out = Path(index), Path(out)
    shards = check_positive_int(shards, "shards")
    src = Index.load(path, mmap=True)
    ids = np.sort(src.ids)
    n = ids.size
    cuts = [int(round(n * s / shards)) for s in range(shards + 1)]
    bounds = [0] + [int(ids[c]) if c < n else src._next_id for c in cuts[1:-1]] + [max(src._next_id, 0)]
    bounds = np.maximum.accumulate(bounds).tolist()
    out.mkdir(parents=True, exist_ok=True)
    sizes = []
    bar = _bar(shards, "shard", progress, unit="shard", leave=True)
    for s in range(shards):
        part = Index.load(path, mmap=True)
        drop = ids[(ids < bounds[s]) | (ids >= bounds[s + 1])]
        if drop.size:
            part.remove(drop)
        part.save(out / _SHARD_FILE.format(s))
        sizes.append(len(part))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    names = _read_names(path)
    with atomic_write(out / NAMES) as f:
        f.write(("\n".join(names) + "\n" if names else "").encode("utf-8"))
    return _write_manifest(out, src, sizes, bounds, src.extractor, source={"index": str(path.resolve())})


# ---- the shard log -----------------------------------------------------------------------------------
_LOG_MAGIC = b"D2RL"
_LOG_HEAD = struct.Struct("<4sBQI")   # magic, op (1 add, 2 remove), payload bytes, crc32 of the payload
_ADD, _REMOVE = 1, 2


def _log_record(op: int, **arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    return _LOG_HEAD.pack(_LOG_MAGIC, op, len(payload), zlib.crc32(payload)) + payload


def _read_log(path: Path):
    """[(op, arrays)] of the complete records, and the byte length they cover (a torn tail, from a
    crash while appending a record that was never acknowledged, is past it)."""
    data = path.read_bytes() if path.exists() else b""
    pos, out = 0, []
    while pos + _LOG_HEAD.size <= len(data):
        magic, op, n, crc = _LOG_HEAD.unpack_from(data, pos)
        end = pos + _LOG_HEAD.size + n
        if magic != _LOG_MAGIC or op not in (_ADD, _REMOVE) or end > len(data):
            break
        payload = data[pos + _LOG_HEAD.size:end]
        if zlib.crc32(payload) != crc:
            break
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            out.append((op, {k: z[k] for k in z.files}))
        pos = end
    return out, pos, len(data)


def _entries_subset(offsets, words, codes, entry_ids, keep):
    """The entries of a CSR batch where `keep` (per entry) holds."""
    sel = np.flatnonzero(keep)
    lens = np.diff(offsets)[sel]
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in sel]) if sel.size else np.zeros(0, np.int64)
    new_off = np.zeros(sel.size + 1, np.int64)
    new_off[1:] = np.cumsum(lens)
    return new_off, np.ascontiguousarray(words[rows]), np.ascontiguousarray(codes[rows]), entry_ids[sel]


class _ShardActor:
    """One shard, memory-mapped, in a Ray actor. Restarted by Ray after a crash: __init__ runs again,
    maps the shard file and replays its log. Searches may run concurrently (max_concurrency); adds,
    removes and checkpoints take the actor's write lock, so the log's order is the order applied."""

    def __init__(self, number: int, path: str, verify, threads=None, readonly: bool = False):
        if threads is not None:   # Ray sets OMP_NUM_THREADS from the actor's CPUs (1 for a fraction)
            from d2r.core.runtime import set_num_threads

            set_num_threads(int(threads))
        self.number = number
        self.path = Path(path)
        self.log_path = Path(path + ".log")
        self.verify_mode = verify
        self.lock = threading.Lock()
        self.index = Index.load(self.path, mmap=True, verify=verify)
        self.readonly = bool(readonly)   # searched in place (LocalShardedIndex): the log is read, never written
        self.replayed = self._replay()
        self.log: Any = None if self.readonly else open(self.log_path, "ab")

    # idempotent application: an add skips ids already present, a remove ids already absent, so
    # replaying a log over a file that already holds some of it (a crash between a checkpoint's save
    # and the log's truncation) gives the same state.
    def _apply_add(self, offsets, words, codes, entry_ids):
        present = self._contains(entry_ids)
        if present.any():
            offsets, words, codes, entry_ids = _entries_subset(offsets, words, codes, entry_ids, ~present)
        if entry_ids.size:
            self.index._ivf.add(offsets, words, code_bytes(codes), entry_ids)
        return int(np.unique(entry_ids).size)

    def _apply_remove(self, ids):
        ids = ids[self._contains(ids)]
        return int(self.index._ivf.remove(ids)) if ids.size else 0

    def _contains(self, ids):
        return np.fromiter((int(i) in self.index for i in ids), bool, count=len(ids))

    def _replay(self) -> int:
        records, good, size = _read_log(self.log_path)
        for op, a in records:
            if op == _ADD:
                self._apply_add(a["offsets"], a["words"], a["codes"], a["ids"])
            else:
                self._apply_remove(a["ids"])
        if good < size:
            warnings.warn(f"{self.log_path}: {'ignored' if self.readonly else 'dropped'} a torn record at byte {good} "
                          "(a write that was never acknowledged)", RuntimeWarning)
            if not self.readonly:
                with open(self.log_path, "r+b") as f:
                    f.truncate(good)
        return len(records)

    def _append(self, record: bytes):
        """Write a record and fsync it; returns the log's length before, to undo with."""
        start = self.log.tell()
        self.log.write(record)
        self.log.flush()
        os.fsync(self.log.fileno())
        return start

    def _undo(self, start: int):
        self.log.truncate(start)
        self.log.seek(start)
        self.log.flush()
        os.fsync(self.log.fileno())

    def hold(self, seconds: float):
        """Keep this actor busy for `seconds` (fault injection: with max_concurrency=1, calls queue behind
        it, so a kill meanwhile fails them in flight)."""
        time.sleep(float(seconds))
        return True

    def ping(self):
        return {"shard": self.number, "pid": os.getpid(), "replayed": self.replayed}

    def search(self, batch, k):
        offsets, words, codes, fp = batch
        idx = self.index
        return idx.search_aggregated(AggregatedBatch(offsets, words, codes, fp), None if k < 0 else k)

    def contains(self, ids):
        return self._contains(np.asarray(ids, np.int64))

    def entry_codes(self, ids, words):
        """InvertedFile.entry_codes of those of `ids` this shard holds ("image" indexes `ids`), for
        query expansion over the shards (d2r.core.expand)."""
        ids = np.asarray(ids, np.int64)
        pos = np.flatnonzero(self._contains(ids))
        got = dict(self.index._ivf.entry_codes(np.ascontiguousarray(ids[pos]), words))
        got["image"] = pos[np.asarray(got["image"], np.int64)]
        return got

    def next_id(self):
        return self.index._next_id

    def add(self, offsets, words, codes, fp, entry_ids, retry: bool):
        """Add entries (an image's entries share its id); durable before it returns. retry: ids
        already present are taken as added by the failed attempt being retried."""
        with self.lock:
            self.index._check_aggregated(AggregatedBatch(offsets, words, codes, fp), "added")
            present = self._contains(entry_ids)
            if present.any():
                if not retry:
                    raise ValueError(f"shard {self.number}: image ids already indexed: "
                                     f"{sorted(set(entry_ids[present].tolist()))[:5]}")
                offsets, words, codes, entry_ids = _entries_subset(offsets, words, codes, entry_ids, ~present)
                if not entry_ids.size:
                    return 0
            start = self._append(_log_record(_ADD, offsets=offsets, words=words, codes=codes, ids=entry_ids))
            try:
                return self._apply_add(offsets, words, codes, entry_ids)
            except BaseException:
                self._undo(start)   # not applied: not in the log either (the shard is as it was)
                raise

    def remove(self, ids, retry: bool):
        with self.lock:
            ids = np.asarray(ids, np.int64)
            absent = ~self._contains(ids)
            if absent.any() and not retry:
                raise KeyError(f"shard {self.number}: image ids not indexed: {ids[absent][:5].tolist()}")
            ids = ids[~absent]
            if not ids.size:
                return 0
            start = self._append(_log_record(_REMOVE, ids=ids))
            try:
                return self._apply_remove(ids)
            except BaseException:
                self._undo(start)
                raise

    def checkpoint(self):
        """Save the shard (adds and removes included) over its file, atomically, then empty the log
        and map the new file."""
        with self.lock:
            self.index.save(self.path)
            self.log.truncate(0)
            self.log.seek(0)
            self.log.flush()
            os.fsync(self.log.fileno())
            self.index = Index.load(self.path, mmap=True, verify=self.verify_mode)
            return len(self.index)

    def stats(self):
        st = self.index.stats()
        st["shard"] = self.number
        st["file_bytes"] = self.path.stat().st_size
        st["log_bytes"] = self.log_path.stat().st_size if self.log_path.exists() else 0
        st["next_id"] = self.index._next_id
        return st


def _merge_topk(parts, k):
    """Merge per-shard (scores, ids) 2-D results: score descending, id ascending, the first k."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((ids, -scores), axis=-1)
    if k >= 0:
        order = order[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _adopt_prototype(obj: Any, first: Index) -> None:
    """obj's prototype (an empty index with the shards' codebook and parameters, which aggregates queries
    and added images once, in this process) and its public codebook / kernel / normalize / extractor,
    from the first shard's index."""
    obj._proto = type(first)._from_meta(first._meta(), first.codebook)
    obj._proto.extractor = first.extractor
    obj.codebook = first.codebook
    obj.kernel = first.kernel
    obj.normalize = first.normalize
    obj.extractor = first.extractor


def _merge_entry_codes(parts: list, code_bytes_: int) -> dict:
    """The shards' entry_codes answers as one (InvertedFile.entry_codes's layout), entries ordered by
    the position of their image in the ids asked for (each shard keeps its own order within an image)."""
    parts = [p for p in parts if len(p["image"])]
    if not parts:
        return {"image": np.zeros(0, np.int64), "word_counts": np.zeros(0, np.int32),
                "offsets": np.zeros(1, np.int64), "words": np.zeros(0, np.int32),
                "codes": np.zeros((0, code_bytes_), np.uint8)}
    entries: list[tuple[int, int, int]] = []   # (image position, part, entry)
    for pi, p in enumerate(parts):
        entries.extend((int(img), pi, e) for e, img in enumerate(p["image"]))
    entries.sort()
    image: list[int] = []
    counts: list[int] = []
    offsets = [0]
    words: list[Any] = []
    codes: list[Any] = []
    for img, pi, e in entries:
        p = parts[pi]
        b, t = int(p["offsets"][e]), int(p["offsets"][e + 1])
        image.append(img)
        counts.append(int(p["word_counts"][e]))
        words.append(np.asarray(p["words"][b:t]))
        codes.append(np.asarray(p["codes"][b:t]))
        offsets.append(offsets[-1] + t - b)
    return {"image": np.asarray(image, np.int64), "word_counts": np.asarray(counts, np.int32),
            "offsets": np.asarray(offsets, np.int64), "words": np.concatenate(words).astype(np.int32),
            "codes": np.concatenate(codes)}


class _ShardedCodes:
    """What d2r.core.expand.expand_query reads of an index (its inverted file's entry_codes, the spec,
    codebook and kernel parameters), over the shards: `ask(ids, words)` returns the shards' answers."""

    def __init__(self, proto, ask):
        self._ivf = self
        self._ask = ask
        self.spec, self.codebook, self.alpha, self.tau = proto.spec, proto.codebook, proto.alpha, proto.tau
        self.device = "cpu"
        self._code_bytes = int(proto._ivf.code_bytes)

    def entry_codes(self, ids, words=None):
        return _merge_entry_codes(self._ask(np.asarray(ids, np.int64), words), self._code_bytes)


def _expand_batch(proto, batch, first_ids, expansion, ask):
    """The batch's queries expanded over a sharded index: first_ids (one row of top ids per query, the
    first search's merged answer)."""
    from d2r.core.expand import expand_query

    view = _ShardedCodes(proto, ask)
    return AggregatedBatch.from_list([expand_query(view, batch[i], np.asarray(first_ids[i]), expansion)
                                      for i in range(len(batch))])


class ShardedIndex:
    """A sharded index on Ray: one actor per shard (each memory-maps its shard file), fan-out
    search with an exact merge, adds and removes routed to the owning shard.

    manifest: the folder of :func:`build_sharded_index` or its manifest.json. max_restarts: restarts
    of each shard actor after a crash (it reloads its file and replays its log). retries: attempts
    after the first for a call that meets a dead or restarting shard (waiting retry_wait, doubled
    each time). cpus_per_shard: the CPUs Ray reserves for each actor (fractions let several shards
    share a CPU); max_concurrency: searches one actor runs at once; threads_per_shard: the native
    threads of each actor's searches (default: Ray's, OMP_NUM_THREADS = the actor's whole CPUs, 1 for
    a fraction).

    Concurrency: any number of threads may search at once; adds, removes and checkpoints run one at a
    time (a lock in this object). Open one ShardedIndex per manifest for writing: two writers would
    allocate the same new ids (a shard refuses a duplicate id, so nothing is silently overwritten)."""

    # set by _adopt_prototype from the first shard
    _proto: Index
    codebook: Codebook
    kernel: str
    normalize: bool
    extractor: Any

    def __init__(self, manifest, *, max_restarts: int = 3, retries: int = 3, retry_wait: float = 0.5,
                 cpus_per_shard: float = 0.25, max_concurrency: int = 2, threads_per_shard: int | None = None,
                 verify="lazy"):
        ray = _require_connected()
        self.manifest = read_manifest(manifest)
        self.retries = int(retries)
        self.retry_wait = float(retry_wait)
        m = self.manifest
        # the prototype: an empty index with the shards' codebook and parameters, which aggregates
        # queries and added images once, here
        first = Index.load(m["paths"][0], mmap=True)
        if first.codebook.fingerprint != m["codebook_fingerprint"]:
            raise ValueError(f"{m['paths'][0]}: its codebook ({first.codebook.fingerprint}) is not the manifest's "
                             f"({m['codebook_fingerprint']})")
        _adopt_prototype(self, first)
        del first
        actor_cls = ray.remote(_ShardActor).options(num_cpus=cpus_per_shard, max_restarts=int(max_restarts),
                                                    max_concurrency=int(max_concurrency))
        self.actors = [actor_cls.remote(s, p, verify, threads_per_shard) for s, p in enumerate(m["paths"])]
        self._write_lock = threading.Lock()
        next_ids = self._call("next_id", range(len(self.actors)))
        self._next = max([m["routing"]["bounds"][-1]] + [int(next_ids[s]) for s in next_ids])
        self.names = _manifest_names(m)

    @property
    def n_shards(self) -> int:
        return len(self.actors)

    def __repr__(self) -> str:
        return f"ShardedIndex({self.manifest['folder']!r}, shards={self.n_shards}, kernel={self.kernel!r})"

    # ---- calls with bounded retries ---------------------------------------------------------------
    def _call(self, method, shards, *args, allow_partial=False, retry_args=None):
        """{shard: result} of actor method calls; a shard whose actor is dead or restarting is called
        again up to `retries` times (retry_args: the arguments for those retries, default the same)."""
        ray = _ray()
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        shards = list(shards)
        refs = {s: getattr(self.actors[s], method).remote(*args) for s in shards}
        last = {}
        try:   # the common case, every shard answers: one wait for all
            out = dict(zip(refs, ray.get(list(refs.values()))))
            return out
        except (RayActorError, ActorUnavailableError, GetTimeoutError):
            out = {}
        for attempt in range(self.retries + 1):
            for s, ref in list(refs.items()):
                try:
                    out[s] = ray.get(ref)
                    del refs[s]
                except (RayActorError, ActorUnavailableError, GetTimeoutError) as exc:
                    last[s] = exc
            if not refs or attempt == self.retries:
                break
            time.sleep(self.retry_wait * 2 ** attempt)
            a = retry_args if retry_args is not None else args
            refs = {s: getattr(self.actors[s], method).remote(*a) for s in refs}
        if refs and not allow_partial:
            missing = sorted(refs)
            paths = [self.manifest["paths"][s] for s in missing]
            raise ShardUnavailableError(
                f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} ({', '.join(paths)}) did not "
                f"answer after {self.retries} retries: {type(last[missing[0]]).__name__}: "
                f"{str(last[missing[0]]).splitlines()[0] if str(last[missing[0]]) else ''}; pass allow_partial=True "
                "for the other shards' results", missing, paths)
        return out

    # ---- search -----------------------------------------------------------------------------------
    def search(self, queries, k: int | None = 10, allow_partial: bool = False, progress=None, expand=None):
        """As Index.search (one query: 1-D results; a list: 2-D), over every shard: the query is
        aggregated once here, each shard returns its top k, and the lists are merged (score
        descending, id ascending), exactly the single index's answer. allow_partial=True: a shard
        that does not answer is left out instead of raising, and the result gains a third element,
        ``{"answered": [shards], "missing": [shards]}``. `expand`: query expansion as in Index.search
        (a first search over every shard, the top results' stored codes fetched from the shards that
        hold them, then the expanded search): the same answer as the single index's."""
        kk = check_k(k)
        batches, single = self._proto._query_batches(queries, progress, None)
        return self._search_maybe_expanded(AggregatedBatch.concat(batches), kk, single, allow_partial, expand)

    def search_aggregated(self, aggregated, k: int | None = 10, allow_partial: bool = False, expand=None):
        """As Index.search_aggregated, over every shard (`expand` as in `search`)."""
        kk = check_k(k)
        batch, single = self._proto._as_batch(aggregated)
        self._proto._check_aggregated(batch, "query")
        return self._search_maybe_expanded(batch, kk, single, allow_partial, expand)

    def _search_maybe_expanded(self, batch, kk, single, allow_partial, expand):
        from d2r.core.expand import as_expansion, search_expanded

        expansion = as_expansion(expand)
        if expansion is None:
            return self._search(batch, kk, single, allow_partial)
        answered: set = set(range(self.n_shards))

        def search(b, k):   # 2-D; the shards that answered every call so far
            got = self._search(b, k, False, allow_partial)
            if allow_partial:
                answered.intersection_update(got[2]["answered"])
            return got[0], got[1]

        def ask(ids, words):
            got = self._call("entry_codes", range(self.n_shards), ids, words, allow_partial=allow_partial)
            answered.intersection_update(got)
            return [got[s] for s in sorted(got)]

        def expanded(b):
            return _expand_batch(self._proto, b, search(b, expansion.top)[1], expansion, ask)

        s, i = search_expanded(search, expanded, batch, kk, expansion)
        res = (s[0], i[0]) if single else (s, i)
        if allow_partial:
            return (*res, {"answered": sorted(answered), "missing": sorted(set(range(self.n_shards)) - answered)})
        return res

    def _search(self, batch, kk, single, allow_partial):
        ray = _ray()
        payload = (batch.offsets, batch.words, batch.codes, batch.fingerprint)
        if batch.codes.nbytes + batch.words.nbytes > 1 << 20 and self.n_shards > 1:
            payload = ray.put(payload)   # large: stored once, read by every shard
        got = self._call("search", range(self.n_shards), payload, kk, allow_partial=allow_partial)
        if not got:
            raise ShardUnavailableError("no shard answered", list(range(self.n_shards)), self.manifest["paths"])
        s, i = _merge_topk([got[x] for x in sorted(got)], kk)
        res = (s[0], i[0]) if single else (s, i)
        if allow_partial:
            return (*res, {"answered": sorted(got), "missing": sorted(set(range(self.n_shards)) - set(got))})
        return res

    # ---- adding and removing ----------------------------------------------------------------------
    def add(self, descriptors, image_ids=None, offsets=None, progress=None) -> np.ndarray:
        """Add images (as Index.add; for a RegionalSearchIndex each image is one region), aggregated
        here and routed to their shards. Returns their ids (default: consecutive after the largest id
        so far). Acknowledged (returns) only once every shard involved has the images in its log on
        disk. An image id already indexed raises ValueError and nothing is added."""
        if isinstance(self._proto, RegionalSearchIndex):
            x, offs, _ = self._proto._as_images(descriptors, offsets)
            regions = [Regions(x[offs[i]:offs[i + 1]], np.array([0, offs[i + 1] - offs[i]], np.int64))
                       for i in range(offs.shape[0] - 1)]
            return self.add_regions_many(regions, image_ids, progress)
        batches, n = self._proto._db_batches(descriptors, offsets, progress)
        return self._add_entries(AggregatedBatch.concat(batches), np.arange(n, dtype=np.int64), n, image_ids)

    def add_regions_many(self, regions_list, image_ids=None, progress=None) -> np.ndarray:
        """Add images given by their regions (as Index / RegionalSearchIndex.add_regions_many)."""
        regions_list = list(regions_list)
        if isinstance(self._proto, RegionalSearchIndex):
            batch, owner = self._proto._region_entries(regions_list, progress)
        else:
            batch = AggregatedBatch.concat(self._proto._region_batches(regions_list, progress))
            owner = np.arange(len(regions_list), dtype=np.int64)
        return self._add_entries(batch, owner, len(regions_list), image_ids)

    def _add_entries(self, batch, owner, n, image_ids):
        with self._write_lock:
            ids = (np.arange(self._next, self._next + n, dtype=np.int64) if image_ids is None
                   else as_ids(image_ids, n))
            shard_of = route(self.manifest, ids)
            targets = sorted(set(shard_of.tolist()))
            present = self._call("contains", targets, ids)   # each shard answers for its own ids
            dup = [int(i) for s in targets for i, p, o in zip(ids, present[s], shard_of) if p and o == s]
            if dup:
                raise ValueError(f"image ids already indexed: {dup[:5]}")
            entry_ids = ids[owner]
            done = []
            try:
                for s in targets:
                    sel = shard_of[owner] == s
                    o, w, c, e = _entries_subset(batch.offsets, batch.words, batch.codes, entry_ids, sel)
                    args = (o, w, c, batch.fingerprint, e)
                    self._call("add", [s], *args, False, retry_args=(*args, True))
                    done.append((s, np.unique(e)))
            except BaseException:
                for s, e in done:   # roll back the shards that took their part (best effort)
                    try:
                        self._call("remove", [s], e, True)
                    except Exception:   # noqa: BLE001 - the original error is the one to report
                        pass
                raise
            self._next = max(self._next, int(ids.max()) + 1)
            return ids

    def remove(self, image_ids) -> int:
        """Remove images by id from their shards (KeyError, and nothing removed, if one is absent)."""
        ids = as_ids(image_ids)
        if not ids.size:
            return 0
        with self._write_lock:
            shard_of = route(self.manifest, ids)
            targets = sorted(set(shard_of.tolist()))
            present = self._call("contains", targets, ids)
            missing = [int(i) for i, o, j in zip(ids, shard_of, range(len(ids))) if not present[o][j]]
            if missing:
                raise KeyError(f"image ids not indexed: {missing[:5]}")
            n = 0
            for s in targets:
                sub = ids[shard_of == s]
                n += self._call("remove", [s], sub, False, retry_args=(sub, True))[s]
            return n

    def checkpoint(self) -> None:
        """Save every shard's adds and removes into its file (atomically) and empty the logs."""
        with self._write_lock:
            self._call("checkpoint", range(self.n_shards))

    # ---- state ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """{"shards": [per-shard stats], "images": total, "next_id": ...}."""
        per = self._call("stats", range(self.n_shards))
        shards = [per[s] for s in sorted(per)]
        return {"shards": shards, "images": sum(s["images"] for s in shards), "n_shards": self.n_shards,
                "kernel": self.kernel, "next_id": self._next}

    def __len__(self) -> int:
        return int(self.stats()["images"])

    def name(self, image_id: int):
        """The image name of an id (the store's path), or None for images without one (added later)."""
        return self.names[image_id] if 0 <= image_id < len(self.names) else None

    def close(self) -> None:
        """Stop the shard actors (the files and logs stay)."""
        ray = _ray()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalShardedIndex:
    """A sharded index searched in this process, without Ray: every shard file memory-mapped (its log
    of adds and removes replayed, read-only), a query quantised and aggregated once, each shard's top
    k merged as :class:`ShardedIndex` merges them (score descending, id ascending), so the answer is
    exactly the single index's and the Ray path's. For one machine (``d2r search FOLDER`` without
    ``--ray``); read-only: adds and removes go through a :class:`ShardedIndex`.

    manifest: the folder of :func:`build_sharded_index` or its manifest.json. verify: as for
    :meth:`d2r.Index.load`."""

    # set by _adopt_prototype from the first shard
    _proto: Index
    codebook: Codebook
    kernel: str
    normalize: bool
    extractor: Any

    def __init__(self, manifest, *, verify="lazy"):
        self.manifest = read_manifest(manifest)
        m = self.manifest
        self.shards = [_ShardActor(s, p, verify, readonly=True) for s, p in enumerate(m["paths"])]
        first = self.shards[0].index
        for s, sh in enumerate(self.shards):
            if sh.index.codebook.fingerprint != m["codebook_fingerprint"]:
                raise ValueError(f"{m['paths'][s]}: its codebook ({sh.index.codebook.fingerprint}) is not the "
                                 f"manifest's ({m['codebook_fingerprint']})")
        _adopt_prototype(self, first)
        self.names = _manifest_names(m)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def __repr__(self) -> str:
        return f"LocalShardedIndex({self.manifest['folder']!r}, shards={self.n_shards}, kernel={self.kernel!r})"

    def search(self, queries, k: int | None = 10, progress=None, expand=None):
        """As Index.search (one query: 1-D results; a list: 2-D), over every shard, merged exactly;
        `expand` as in ShardedIndex.search."""
        kk = check_k(k)
        batches, single = self._proto._query_batches(queries, progress, None)
        return self._search_maybe_expanded(AggregatedBatch.concat(batches), kk, single, expand)

    def search_aggregated(self, aggregated, k: int | None = 10, expand=None):
        """As Index.search_aggregated, over every shard (`expand` as in `search`)."""
        kk = check_k(k)
        batch, single = self._proto._as_batch(aggregated)
        self._proto._check_aggregated(batch, "query")
        return self._search_maybe_expanded(batch, kk, single, expand)

    def _search_maybe_expanded(self, batch, kk, single, expand):
        from d2r.core.expand import as_expansion, search_expanded

        expansion = as_expansion(expand)
        if expansion is None:
            return self._search(batch, kk, single)

        def search(b, k):
            return self._search(b, k, False)

        def expanded(b):
            return _expand_batch(self._proto, b, search(b, expansion.top)[1], expansion,
                                 lambda ids, words: [sh.entry_codes(ids, words) for sh in self.shards])

        s, i = search_expanded(search, expanded, batch, kk, expansion)
        return (s[0], i[0]) if single else (s, i)

    def _search(self, batch, kk, single):
        payload = (batch.offsets, batch.words, batch.codes, batch.fingerprint)
        s, i = _merge_topk([sh.search(payload, kk) for sh in self.shards], kk)
        return (s[0], i[0]) if single else (s, i)

    def stats(self) -> dict:
        """{"shards": [per-shard stats], "images": total, ...} as :meth:`ShardedIndex.stats`."""
        shards = [sh.stats() for sh in self.shards]
        next_id = max([self.manifest["routing"]["bounds"][-1]] + [int(sh.next_id()) for sh in self.shards])
        return {"shards": shards, "images": sum(s["images"] for s in shards), "n_shards": self.n_shards,
                "kernel": self.kernel, "next_id": next_id}

    def __len__(self) -> int:
        return sum(len(sh.index) for sh in self.shards)

    def name(self, image_id: int):
        """The image name of an id (the store's path), or None for images without one."""
        return self.names[image_id] if 0 <= image_id < len(self.names) else None

    def close(self) -> None:
        """Unmap the shards."""
        self.shards = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_index(path, **kwargs):
    """A sharded index (its folder or manifest.json: a ShardedIndex, on the connected cluster) or a
    single index file (d2r.Index.load, memory-mapped)."""
    p = Path(path)
    if p.is_dir() or p.name == MANIFEST:
        return ShardedIndex(p, **kwargs)
    return Index.load(p, mmap=True)
