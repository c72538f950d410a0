"""Streaming index builds: from a feature store to an index file with memory bounded by one batch,
resumable after an interruption.

:func:`build_index` reads the store shard by shard, quantises and aggregates a batch of images at a
time (``batch_images``) into a small in-memory index, and saves it as a *part* file (a normal d2r
index file) in the work folder ``OUT.build/``, recording it in ``journal.json`` there (both written
atomically). A killed build run again with the same arguments skips the parts the journal lists and
goes on from the next batch. When every batch is done, the parts (and an optional *base* index,
e.g. the R1M distractors built once) are memory-mapped side by side and streamed into ``OUT``,
list by list, without a second copy of the postings in memory; then the work folder is deleted.

Image ids: a base index keeps its ids; the store's images get consecutive ids after the base's
``next_id`` (from 0 without a base), in the store's order. The image names (the store's absolute
paths) are written beside the index, one per line, in ``OUT.names.txt`` (the base's names first),
the file ``d2r search`` reads.

Peak memory: one store shard's descriptors plus one batch's compressed postings (about 17 bytes per
posting for ASMK*, so about 170 MB per 10,000 images of 1,000 descriptors) plus the page cache of
the parts while they are merged. Disk: the parts and the final file coexist during the merge (about
twice the index's size).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from typing import Any
from pathlib import Path

import numpy as np

from d2r.core.atomic import atomic_write
from d2r.core.checks import check_positive_int
from d2r.core.progress import bar as _bar
from d2r.core.codebook import Codebook
from d2r.extract.store import read_shard, shard_files, store_info
from d2r.core.index import Index, RegionalSearchIndex, _IndexBase
from d2r.core.index_io import IndexFileError

__all__ = ["build_index", "build_regional_search_index", "merge_index_files", "names_file"]

JOURNAL = "journal.json"


def names_file(index_path) -> Path:
    """The file of image names (one per line, by id) kept beside an index file."""
    return Path(str(index_path) + ".names.txt")


def _read_names(index_path) -> list:
    path = names_file(index_path)
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8").splitlines()


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_index(store, out, codebook, kernel: str = "asmk*", *, base=None, alpha: float = 3.0, tau: float = 0.0,
                normalize: bool = True, m_db: int = 1, m_query: int = 1, batch_images: int = 10_000,
                progress: bool = True, keep_parts: bool = False, store_files=None, first_id: int | None = None,
                write_names: bool = True):
    """Build the index file `out` from the feature store `store` (a folder or .npz made by
    ``d2r extract`` / ``extract_dataset``), streaming; returns the index, memory-mapped.

    codebook: a Codebook or a path to a saved one. kernel: "asmk*" / "asmk" index the whole-image
    features; "rasmk*" / "rasmk" / "naive-rasmk" aggregate each image from its stored regions (the
    whole image plus the crops a detector or proposals gave; a store without regions is refused).
    base: an index file whose images come first (its codebook, kernel and parameters must match);
    it is read, never modified. batch_images: images per part (memory is bounded by one part).
    Resumable: run again with the same arguments after an interruption.

    For the shards of a sharded index (``d2r.distributed``): store_files, the store's shard files to
    index (a subset, in store order; default all); first_id, the id of their first image (default
    the base's next id, or 0); write_names=False leaves out OUT.names.txt."""
    store, out = Path(store), Path(out)
    if not isinstance(codebook, Codebook):
        codebook = Codebook.load(codebook)
    batch_images = check_positive_int(batch_images, "batch_images")
    info = store_info(store)
    if info["images"] == 0:
        raise ValueError(f"{store}: the feature store holds no images; extract some with `d2r extract`")
    probe = Index(codebook, kernel=kernel, alpha=alpha, tau=tau, normalize=normalize, m_db=m_db, m_query=m_query)
    if probe.spec.regional and not info["regions"]:
        raise ValueError(f"{store}: the store holds no regions, which kernel {kernel!r} aggregates; extract with "
                         "regions (`d2r extract ... --regions grid:3`, or another source) or use kernel 'asmk*'")
    probe.extractor = info["extractor"]
    probe.region_source = info["region_source"] if probe.spec.regional else None
    shards = shard_files(store) if store.is_dir() else [store]
    if store_files is not None:
        known = {p.name: p for p in shards}
        missing = [str(f) for f in store_files if Path(f).name not in known]
        if missing or not store_files:
            raise ValueError(f"{store}: store_files must name shards of the store (not found: {missing[:3]})")
        shards = [known[Path(f).name] for f in store_files]
    first = read_shard(shards[0])   # checked before any work; used again by the first batch
    dims = {f.descriptors.shape[1] for f in first[1] if f.descriptors.ndim == 2}
    if dims and dims != {codebook.dim}:
        raise ValueError(f"{store} holds {'- and '.join(map(str, sorted(dims)))}-D descriptors but the codebook has {codebook.dim}-D words; "
                         "train the codebook on features of the same extractor")
    base_idx = None
    if base is not None:
        base = Path(base)
        base_idx = Index.load(base, mmap=True)
        _check_same(base_idx, probe, base)
        first_id_base = base_idx._next_id
    else:
        first_id_base = 0
    if first_id is None:
        first_id = first_id_base
    elif base is not None or int(first_id) < 0:
        raise ValueError("first_id is for builds without a base, and at least 0")
    first_id = int(first_id)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {out.parent} does not exist")
    work = Path(str(out) + ".build")
    settings = {"store": str(store.resolve()), "codebook": codebook.fingerprint, "meta": _settings(probe),
                "batch_images": batch_images, "base": None if base is None else _file_key(base),
                "shards": [p.name for p in shards], "first_id": first_id}
    journal = _open_journal(work, settings)
    if journal["next_shard"] > 0:   # resumed past the first shard
        first = None
    total = info["images"]
    done_images = sum(p["n"] for p in journal["parts"])
    bar = _bar(total, "index", progress, leave=True)
    if bar is not None and done_images:
        bar.update(done_images)
    next_shard = journal["next_shard"]
    names = list(journal["names"])
    try:
        while next_shard < len(shards):
            part = Index(codebook, kernel=kernel, alpha=alpha, tau=tau, normalize=normalize, m_db=m_db,
                         m_query=m_query)
            part.extractor = info["extractor"]
            part.region_source = probe.region_source
            part_names: list = []
            n_shards = 0
            while next_shard + n_shards < len(shards) and len(part_names) < batch_images:
                shard = shards[next_shard + n_shards]
                shard_names, feats, regs = first if shard == shards[0] else read_shard(shard)
                if shard == shards[0]:
                    first = None
                if feats:
                    ids = first_id + done_images + len(part_names) + np.arange(len(feats), dtype=np.int64)
                    _add_shard(part, feats, regs, ids, shard)
                part_names += [str(n) for n in shard_names]
                n_shards += 1
                if bar is not None:
                    bar.update(len(feats))
            name = f"part-{len(journal['parts']):05d}.d2r"
            part.save(work / name)
            journal["parts"].append({"file": name, "n": len(part_names), "shards": n_shards})
            next_shard += n_shards
            done_images += len(part_names)
            names += part_names
            journal["next_shard"] = next_shard
            journal["names"] = names
            _write_journal(work, journal)
    finally:
        if bar is not None:
            bar.close()
    index = _merge(out, [work / p["file"] for p in journal["parts"]], base, base_idx, probe, progress)
    if write_names:
        with atomic_write(names_file(out)) as f:
            all_names = (_read_names(base) if base is not None else []) + names
            f.write(("\n".join(all_names) + "\n").encode("utf-8"))
    if not keep_parts:
        shutil.rmtree(work, ignore_errors=True)
    return index


def build_regional_search_index(store, out, codebook, pooling: str = "max", kernel: str = "asmk*", *,
                                alpha: float = 3.0, tau: float = 0.0, normalize: bool = True, m_db: int = 1,
                                m_query: int = 1, progress: bool = True, store_files=None, first_id: int = 0,
                                write_names: bool = True) -> RegionalSearchIndex:
    """Build a RegionalSearchIndex file `out` from the regions of a feature store (every region,
    the whole image included, one entry; an image's score pooled over its regions, `pooling` "max"
    or "mean") and return it. Built in memory (no streaming build for regional search yet): memory
    grows with the store. store_files, first_id and write_names as for :func:`build_index`."""
    store, out = Path(store), Path(out)
    if not isinstance(codebook, Codebook):
        codebook = Codebook.load(codebook)
    info = store_info(store)
    if not info["regions"]:
        raise ValueError(f"{store}: the store holds no regions for regional search; extract with regions "
                         "(`d2r extract ... --regions grid:3`, or another source)")
    idx = RegionalSearchIndex(codebook, kernel, pooling, alpha=alpha, tau=tau, normalize=normalize, m_db=m_db,
                              m_query=m_query)
    idx.extractor = info["extractor"]
    idx.region_source = info["region_source"]
    files = shard_files(store) if store.is_dir() else [store]
    if store_files is not None:
        files = [store / Path(f).name if store.is_dir() else store for f in store_files]
    names: list = []
    bar = _bar(info["images"] if store_files is None else None, "index regions", progress, leave=True)
    for f in files:
        shard_names, feats, regs = read_shard(f)
        if feats:
            ids = int(first_id) + len(names) + np.arange(len(feats), dtype=np.int64)
            regions = [[fe.descriptors] + [c.descriptors for c in crops] for fe, (_, crops) in zip(feats, regs)]
            idx.add_regions_many(regions, image_ids=ids, progress=False)
        names += [str(n) for n in shard_names]
        if bar is not None:
            bar.update(len(shard_names))
    if bar is not None:
        bar.close()
    idx.save(out)
    if write_names:
        with atomic_write(names_file(out)) as fh:
            fh.write(("\n".join(names) + "\n").encode("utf-8"))
    return idx


def _settings(idx: _IndexBase) -> dict:
    return {k: v for k, v in idx._meta().items() if k not in ("extractor", "region_source")}


def _check_same(base: _IndexBase, probe: _IndexBase, path: Path) -> None:
    a, b = _settings(base), _settings(probe)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise ValueError(f"{path}: the base index differs from this build in {', '.join(diff)} "
                         f"({', '.join(f'{k}={a.get(k)!r} vs {b.get(k)!r}' for k in diff)}); build with the same "
                         "codebook and settings")
    if base.extractor and probe.extractor and base.extractor.get("fingerprint") != probe.extractor.get("fingerprint"):
        raise ValueError(f"{path}: the base index holds features of another extractor than the store; extract "
                         "both with the same settings")


def _open_journal(work: Path, settings: dict) -> dict:
    """The journal of an interrupted build with the same settings, or a fresh one (an interrupted build
    with other settings: error, naming the folder to delete)."""
    path = work / JOURNAL
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if path.exists():
        try:
            journal = json.loads(path.read_text("utf-8"))
        except ValueError:
            journal = None
        if not journal or journal.get("key") != key:
            raise ValueError(f"{work} holds an interrupted build with other settings (store, codebook, kernel, "
                             "parameters, batch size or base); delete the folder to start again")
        missing = [p["file"] for p in journal["parts"] if not (work / p["file"]).is_file()]
        if missing:
            raise ValueError(f"{work}: the journal lists parts that are missing ({', '.join(missing[:3])}); delete "
                             "the folder to start again")
        return journal
    work.mkdir(parents=True, exist_ok=True)
    journal = {"key": key, "settings": settings, "parts": [], "next_shard": 0, "names": []}
    _write_journal(work, journal)
    return journal


def _write_journal(work: Path, journal: dict) -> None:
    with atomic_write(work / JOURNAL) as f:
        f.write(json.dumps(journal).encode("utf-8"))


def _add_shard(part: Index, feats, regs, ids, shard) -> None:
    if part.spec.regional:
        regions = []
        for f, (boxes, crops) in zip(feats, regs):
            regions.append([f.descriptors] + [c.descriptors for c in crops])
        part.add_regions_many(regions, image_ids=ids, progress=False)
    else:
        part.add([f.descriptors for f in feats], image_ids=ids, progress=False)


def _merge(out: Path, parts, base, base_idx, probe, progress) -> Index:
    sources = ([base] if base is not None else []) + list(parts)
    extractor = base_idx.extractor if base_idx is not None and base_idx.extractor is not None else probe.extractor
    return merge_index_files(sources, out, extractor=extractor)


def merge_index_files(paths, out, extractor=None) -> Index:
    """Stream the index files `paths` (same codebook, kernel and parameters; disjoint image ids) into
    one index file `out`, list by list: the inputs are memory-mapped side by side and the output
    written as it is encoded, so memory stays bounded by the longest posting list. Image ids are
    kept; removed images are left out. Returns `out` loaded memory-mapped. Files of format 1 or 2
    are converted first. `extractor`: the record to store (default: the first file's)."""
    out = Path(out)
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no index files to merge")
    converted = Path(str(out) + ".v3.tmp")
    pieces: list = []
    ids: list = []
    counts: list = []
    next_ids = [0]
    first: Any = None
    for path in paths:
        idx, seg, pid, pcounts, plain, next_id = Index._read(path, True, "lazy")
        if plain is not None:   # format 1 or 2: saved in the current format first, to be mapped
            Index.load(path).save(converted)
            idx, seg, pid, pcounts, _, next_id = Index._read(converted, True, "lazy")
        if first is None:
            first = idx
        else:
            _check_same(idx, first, path)
        pieces.append(seg)
        ids.append(np.asarray(pid))
        counts.append(np.asarray(pcounts))
        next_ids.append(next_id)
    merged = type(first)._from_meta({**first._meta(), "next_id": 0}, first.codebook)
    merged.extractor = extractor if extractor is not None else first.extractor
    merged.region_source = first.region_source
    all_ids = np.concatenate(ids)
    distinct = [np.unique(i) for i in ids]   # (a regional file repeats an image's id per region)
    if np.unique(np.concatenate(distinct)).size != sum(d.size for d in distinct):
        raise ValueError(f"cannot merge {', '.join(map(str, paths))}: some image ids are in more than one file")
    next_id = max(next_ids)
    try:
        merged._ivf.set_segments(pieces, all_ids, np.concatenate(counts), next_id)
    except ValueError as exc:
        kind = IndexFileError if isinstance(exc, IndexFileError) else ValueError
        raise kind(f"cannot merge {', '.join(map(str, paths))}: {exc}") from None
    merged.save(out)
    del merged, pieces
    if converted.exists():
        converted.unlink()
    return Index.load(out, mmap=True)
