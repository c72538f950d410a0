"""The saved-index file format (version 4; files of versions 1 to 3 still load).

Layout::

    bytes 0-7    magic b"D2RINDEX"
    bytes 8-11   format version (uint32 little endian)
    bytes 12-15  header length H (uint32)
    bytes 16-19  CRC-32 of the header bytes (uint32)
    bytes 20..   header: UTF-8 JSON (kernel, alpha, tau, normalize, m_db, m_query, dim, n_words,
                 next_id, codebook_fingerprint, optionally extractor, sections); each section:
                 name, dtype, shape, offset, nbytes, crc32
    ...          sections, each starting at a multiple of 64 bytes (so they can be memory-mapped)

Files are written to a temporary file in the same folder, fsync'ed and renamed over the target, so a
crash never leaves a half-written index. Loading checks the magic, the version, the header checksum,
every section's name, dtype, shape and bounds and (unless verify=False) every section's CRC-32;
`validate_meta` and `check_structure` check the header fields and the sections' consistency.

Version 4 stores the posting lists compressed (csrc/postings.h: per word, blocks of up to 128
postings, each a header with the block's first slot and a bit width, the slot gaps bit-packed in a
vertical 4-lane layout that vector instructions decode, and the codes), as the
sections `word_offsets` (uint64, n_words + 1 byte offsets of each word's list), `postings` (the byte
stream, written last among the large sections, streamed from the index without a second copy) and
`page_crc` (uint32, the CRC-32 of each `page_bytes`-long page of `postings`), beside `image_ids`
and `word_counts` per entry; the header adds `n_entries` and `page_bytes`. The postings' own
section checksum is checked only when a whole-file verification is asked for (`verify=True`);
a memory-mapped load checks each page when it is first read (`verify="lazy"`), so opening a
million-image index reads only its header, image table and word table.

Version 3 had the same sections with the slot gaps Golomb-Rice coded (csrc/postings_v3.h); its
files load, their postings converted to the layout of version 4 in memory as they load (mmap then
reads them whole; saving such an index again writes version 4, which maps).

Version 2 added `codebook_fingerprint` (``Codebook.fingerprint`` of the embedded codebook, checked at
load) and the optional `extractor` (``d2r.extract.describe`` of the extractor the database features
came from). Version 1 files load with a :class:`FormatWarning`; files of versions 1 and 2 (plain
posting arrays) are compressed in memory as they load.
"""
from __future__ import annotations

import errno
import json
import math
import mmap as _mmap
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np
from numpy.typing import ArrayLike, NDArray

import d2r._native as _native
from d2r.core.atomic import atomic_write
from d2r.core.checks import (MAX_ID, check_alpha, check_bool, check_choice, check_positive_int, check_tau)
from d2r.core.kernels import KERNELS, kernel_spec

MAGIC = b"D2RINDEX"
FORMAT_VERSION = 4
#: Page size of the checksums of the postings (bytes).
PAGE_BYTES = 1 << 16
_ALIGN = 64
_PREFIX = struct.Struct("<8sIII")

#: A file name (str or path).
PathArg = str | os.PathLike[str]
#: write_index_file's `stream`: (section name, its uint8 chunks, finish() -> (trailing sections, meta additions)).
Stream = tuple[str, Iterable[NDArray[np.uint8]], Callable[[], tuple[Mapping[str, ArrayLike], dict[str, Any]]]]

# The dtype (as numpy's dtype.str) each known section may have; any other name or dtype is an error.
SECTION_DTYPES = {
    "centroids": ("<f4",),
    "image_ids": ("<i8",),
    "word_counts": ("<i4",),
    "offsets": ("<i8",),
    "slots": ("<u4",),
    "codes": ("|u1", "<f4"),
    "region_image": ("<i8",),
    "word_offsets": ("<u8",),
    "postings": ("|u1",),
    "page_crc": ("<u4",),
}
# Sections of each layout (formats 3 and 4 compressed; formats 1 and 2 plain).
COMPRESSED = ("centroids", "image_ids", "word_counts", "word_offsets", "postings", "page_crc")
PLAIN = ("centroids", "image_ids", "word_counts", "offsets", "slots", "codes")
KINDS = ("Index", "RegionalSearchIndex")


class IndexFileError(ValueError):
    """A file that is not a d2r index, is corrupt or truncated, or was written by a newer d2r."""


class FormatWarning(UserWarning):
    """A file written by an older d2r: it is used, but lacks a check newer files have (e.g. the
    codebook or extractor fingerprint); saving it again upgrades it."""


def _bytes(arr: np.ndarray) -> memoryview:
    """The array's bytes, C order, as a flat memoryview (also for arrays with a zero dimension)."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)


def _crc(arr: np.ndarray) -> int:
    view = _bytes(arr)
    crc = 0
    step = 1 << 26
    for i in range(0, len(view), step):
        crc = zlib.crc32(view[i:i + step], crc)
    return crc & 0xFFFFFFFF


def write_index_file(path: PathArg, meta: dict[str, Any], sections: Mapping[str, ArrayLike],
                     stream: Stream | None = None, version: int = FORMAT_VERSION) -> None:
    """Atomically write `meta` (JSON-serialisable) and the named numpy arrays in `sections`.
    `version` is the format number written in the prefix (an older one only to write files of an
    older layout, e.g. in tests of their loading).

    stream: optional (name, chunks, finish): the section `name` is written after the others from
    the uint8 arrays that the iterable `chunks` yields (never held whole in memory); then finish()
    returns (trailing sections, meta additions), written after it. The header, whose length is not
    known until then, is written last into space reserved at the start (padded with blanks)."""
    path = Path(path)
    entries: list[dict[str, Any]] = []
    arrays: list[NDArray[Any]] = []
    for name, arr in sections.items():
        arr = np.ascontiguousarray(arr)
        entries.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                        "nbytes": int(arr.nbytes), "crc32": _crc(arr)})
        arrays.append(arr)
    if stream is None:
        _write_plain(path, meta, entries, arrays, version)
        return
    name, chunks, finish = stream
    big = 1 << 62
    probe = [{**e, "offset": big} for e in entries] + [
        {"name": n, "dtype": "<u8", "shape": [big], "nbytes": big, "crc32": 0xFFFFFFFF, "offset": big}
        for n in (name, "trailing-0", "trailing-1", "trailing-2")]
    reserve = len(json.dumps({**meta, "sections": probe, "n_entries": big, "page_bytes": big, "next_id": big},
                             sort_keys=True).encode("utf-8")) + 4096
    with atomic_write(path) as f:
        f.write(b"\0" * (_PREFIX.size + reserve))
        pos = _PREFIX.size + reserve
        for e, arr in zip(entries, arrays):
            pos = _pad_to(f, pos)
            e["offset"] = pos
            f.write(_bytes(arr))
            pos += e["nbytes"]
        pos = _pad_to(f, pos)
        entry: dict[str, Any] = {"name": name, "dtype": "|u1", "offset": pos, "crc32": 0}
        n = 0
        for chunk in chunks:
            view = _bytes(chunk)
            entry["crc32"] = zlib.crc32(view, entry["crc32"])
            f.write(view)
            n += len(view)
        entry.update(nbytes=n, shape=[n], crc32=entry["crc32"] & 0xFFFFFFFF)
        entries.append(entry)
        pos += n
        trailing, extra = finish()
        for tname, arr in trailing.items():
            arr = np.ascontiguousarray(arr)
            pos = _pad_to(f, pos)
            entries.append({"name": tname, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": pos,
                            "nbytes": int(arr.nbytes), "crc32": _crc(arr)})
            f.write(_bytes(arr))
            pos += arr.nbytes
        header = json.dumps({**meta, **extra, "sections": entries}, sort_keys=True).encode("utf-8")
        if len(header) > reserve:
            raise RuntimeError(f"index header of {len(header)} bytes exceeds its reserved {reserve} bytes (a bug)")
        header += b" " * (reserve - len(header))   # JSON allows trailing blanks
        f.seek(0)
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header) & 0xFFFFFFFF))
        f.write(header)


def _pad_to(f: BinaryIO, pos: int) -> int:
    """Writes zeros up to the next multiple of _ALIGN after pos; returns the new position."""
    new = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
    f.write(b"\0" * (new - pos))
    return new


def _write_plain(path: Path, meta: dict[str, Any], entries: list[dict[str, Any]], arrays: list[NDArray[Any]],
                 version: int) -> None:
    # Offsets depend on the header length, which depends on the offsets' digits: iterate to a fixpoint.
    offsets = [0] * len(entries)
    while True:
        for e, o in zip(entries, offsets):
            e["offset"] = o
        header = json.dumps({**meta, "sections": entries}, sort_keys=True).encode("utf-8")
        pos = _PREFIX.size + len(header)
        new: list[int] = []
        for e in entries:
            pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
            new.append(pos)
            pos += e["nbytes"]
        if new == offsets:
            break
        offsets = new
    with atomic_write(path) as f:
        f.write(_PREFIX.pack(MAGIC, version, len(header), zlib.crc32(header) & 0xFFFFFFFF))
        f.write(header)
        for e, arr in zip(entries, arrays):
            f.write(b"\0" * (e["offset"] - f.tell()))
            f.write(_bytes(arr))


def _open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, which must be a regular file (opened without blocking, so a
    FIFO is rejected instead of waiting for a writer)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder, not an index file", str(path))
        if not stat.S_ISREG(mode):
            raise IndexFileError(f"{path}: not a regular file (a FIFO, socket or device), not a d2r index file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map_file(path: Path) -> Any:
    """A read-only memory map of the whole regular file `path`, as a buffer object:
    d2r._native.MappedFile when the native core has it, else mmap.mmap. (Typed Any: the stub of
    MappedFile does not declare its buffer protocol, which memoryview() uses.)"""
    fd = _open_regular(path)
    try:
        if os.fstat(fd).st_size == 0:
            raise IndexFileError(f"{path}: not a d2r index file (empty file)")
        native = getattr(_native, "MappedFile", None)
        return native(str(path)) if native is not None else _mmap.mmap(fd, 0, access=_mmap.ACCESS_READ)
    finally:
        os.close(fd)


def read_index_file(path: PathArg, mmap: bool = False, verify: bool | str = True,
                    dtypes: Mapping[str, tuple[str, ...]] | None = None
                    ) -> tuple[dict[str, Any], dict[str, NDArray[Any]], Any]:
    """Returns (meta, sections, owner): the header without its section table, the named sections as
    read-only numpy arrays, and the buffer object (see `_map_file`) the sections view when mmap=True
    (None otherwise). verify: True checks every section's checksum, "lazy" every one but the
    postings' (checked page by page as they are used), False none. `dtypes` maps each allowed
    section name to its allowed dtypes (default SECTION_DTYPES). Every problem with the file raises
    IndexFileError naming the path."""
    path = Path(path)
    dtypes = SECTION_DTYPES if dtypes is None else dtypes
    if mmap:
        owner = _map_file(path)
        view = memoryview(owner).cast("B")
        return (*_parse(path, view.nbytes, lambda off, n: view[off:off + n], verify, dtypes), owner)
    with os.fdopen(_open_regular(path), "rb") as f:
        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)

        return (*_parse(path, os.fstat(f.fileno()).st_size, read, verify, dtypes), None)


def _parse(path: Path, size: int, read: Callable[[int, int], bytes | memoryview], verify: bool | str,
           dtypes: Mapping[str, tuple[str, ...]]) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
    """(meta, sections) of a file of `size` bytes; read(offset, n) returns (at most) n bytes."""
    prefix = read(0, _PREFIX.size)
    if len(prefix) < _PREFIX.size or bytes(prefix[:8]) != MAGIC:
        raise IndexFileError(f"{path}: not a d2r index file (bad magic)")
    _, version, hlen, hcrc = _PREFIX.unpack(prefix)
    if version > FORMAT_VERSION:
        raise IndexFileError(f"{path}: index format version {version} is newer than this d2r supports "
                             f"({FORMAT_VERSION}); upgrade d2r")
    if version < 1:
        raise IndexFileError(f"{path}: invalid index format version {version}")
    if _PREFIX.size + hlen > size:
        raise IndexFileError(f"{path}: truncated index file (header)")
    header = bytes(read(_PREFIX.size, hlen))
    if zlib.crc32(header) & 0xFFFFFFFF != hcrc:
        raise IndexFileError(f"{path}: corrupt index file (header checksum mismatch)")
    try:
        meta = json.loads(header.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise IndexFileError(f"{path}: corrupt index header ({exc})") from exc
    if not isinstance(meta, dict):
        raise IndexFileError(f"{path}: corrupt index header (a JSON {type(meta).__name__}, not an object)")
    meta["format_version"] = version
    entries = meta.pop("sections", None)
    if not isinstance(entries, list):
        raise IndexFileError(f"{path}: corrupt index header ('sections' must be a list, got {entries!r:.80})")
    sections: dict[str, NDArray[Any]] = {}
    for i, e in enumerate(entries):
        name, dtype, shape, offset, nbytes, crc = _check_entry(path, i, e, dtypes, _PREFIX.size + hlen, size)
        if name in sections:
            raise IndexFileError(f"{path}: corrupt index header (section {name!r} appears twice)")
        buf = read(offset, nbytes)
        if len(buf) != nbytes:
            raise IndexFileError(f"{path}: truncated index file (section {name!r})")
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        if (verify is True or (verify and name != "postings")) and _crc(arr) != crc:
            raise IndexFileError(f"{path}: corrupt index file (checksum mismatch in section {name!r})")
        sections[name] = arr
    return meta, sections


def _check_entry(path: Path, i: int, e: Any, dtypes: Mapping[str, tuple[str, ...]], data_start: int, size: int
                 ) -> tuple[str, np.dtype[Any], tuple[int, ...], int, int, int]:
    """(name, dtype, shape, offset, nbytes, crc32) of section table entry i, checked before any array
    is built: a known name, its dtype, non-negative integer fields, in bounds of the file."""
    def bad(what: str) -> IndexFileError:
        return IndexFileError(f"{path}: corrupt index header (section {i}"
                              f"{'' if name is None else f' {name!r}'}: {what})")

    name: str | None = None
    if not isinstance(e, dict):
        raise bad(f"a JSON {type(e).__name__}, not an object")
    name = e.get("name")
    if not isinstance(name, str) or name not in dtypes:
        raise bad(f"unknown section name; expected one of {sorted(dtypes)}")
    dt = e.get("dtype")
    if dt not in dtypes[name]:
        raise bad(f"dtype {dt!r} is not allowed; expected {' or '.join(map(repr, dtypes[name]))}")
    dtype = np.dtype(dt)
    if dtype.kind not in "biuf" or dtype.byteorder == ">":
        raise bad(f"dtype {dt!r} is not a plain little-endian number")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r:.80}")
    for field in ("offset", "nbytes", "crc32"):
        if not _is_count(e.get(field)):
            raise bad(f"{field} must be a non-negative integer, got {e.get(field)!r:.80}")
    offset, nbytes, crc = e["offset"], e["nbytes"], e["crc32"]
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise bad(f"nbytes {nbytes} does not match shape {shape} of {dt}")
    if offset % _ALIGN or offset < data_start or crc > 0xFFFFFFFF:
        raise bad(f"offset {offset} or crc32 {crc} is invalid")
    if offset + nbytes > size:
        raise IndexFileError(f"{path}: truncated or corrupt index file (section {name!r} ends at byte "
                             f"{offset + nbytes}, the file has {size})")
    return name, dtype, tuple(shape), offset, nbytes, crc


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def validate_meta(meta: dict[str, Any], path: PathArg) -> dict[str, Any]:
    """The header fields d2r.Index.load uses, checked and normalised (a copy of `meta`); any missing or
    invalid field raises IndexFileError naming the path and the field."""
    def field(name: str, check: Callable[..., Any], *args: Any) -> Any:
        if name not in meta:
            raise IndexFileError(f"{path}: invalid index header (field {name!r} is missing)")
        try:
            return check(meta[name], *args)
        except (TypeError, ValueError) as exc:
            raise IndexFileError(f"{path}: invalid index header field {name!r} ({exc})") from None

    out = dict(meta)
    kind = out["kind"] = field("kind", check_choice, "kind", KINDS)
    kernel = out["kernel"] = field("kernel", lambda v: kernel_spec(v).name)
    out["alpha"] = field("alpha", check_alpha)
    out["tau"] = field("tau", check_tau)
    out["normalize"] = field("normalize", check_bool, "normalize")
    n_words = out["n_words"] = field("n_words", check_positive_int, "n_words")
    out["dim"] = field("dim", check_positive_int, "dim")
    for m in ("m_db", "m_query"):
        out[m] = field(m, check_positive_int, m, 1, n_words)
    out["next_id"] = field("next_id", check_positive_int, "next_id", 0, MAX_ID)
    if kind == "RegionalSearchIndex":
        if KERNELS[kernel].regional:
            raise IndexFileError(f"{path}: invalid index header field 'kernel' (a RegionalSearchIndex "
                                 f"indexes regions with 'asmk*' or 'asmk', got {kernel!r})")
        out["pooling"] = field("pooling", check_choice, "pooling", ("max", "mean"))
    if "next_region" in meta:   # files of d2r <= 0.1
        out["next_region"] = field("next_region", check_positive_int, "next_region", 0, MAX_ID)
    if out.get("format_version", FORMAT_VERSION) >= 2:
        out["codebook_fingerprint"] = field("codebook_fingerprint", _check_hex16)
    else:
        out["codebook_fingerprint"] = None
    if out.get("extractor") is not None:
        out["extractor"] = field("extractor", _check_extractor)
    if out.get("format_version", FORMAT_VERSION) >= 3:
        out["n_entries"] = field("n_entries", check_positive_int, "n_entries", 0, MAX_ID)
        out["page_bytes"] = field("page_bytes", check_positive_int, "page_bytes", 1, 1 << 40)
    return out


def _check_hex16(v: Any) -> str:
    if not (isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v)):
        raise ValueError(f"expected 16 hexadecimal digits, got {v!r:.40}")
    return v


def _check_extractor(v: Any) -> dict[str, Any]:
    if not (isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("params", {}), dict)):
        raise ValueError("expected an object with a 'name' and 'params'")
    if "fingerprint" in v:
        _check_hex16(v["fingerprint"])
    return v


def check_structure(meta: dict[str, Any], sections: Mapping[str, NDArray[Any]], path: PathArg) -> None:
    """Cheap (O(images + words)) consistency checks of the sections of an index with header `meta`
    (as returned by validate_meta), run even when the checksums are not verified: the sections are
    present with the shapes the header implies, posting offsets are monotone and match the postings,
    word counts add up, image ids lie in [0, next_id) and (for an Index) are unique. Files of
    d2r <= 0.1 hold region entry ids in image_ids and each entry's image id (-1: removed) in
    region_image. Raises IndexFileError."""
    def bad(what: str) -> NoReturn:
        raise IndexFileError(f"{path}: corrupt index file ({what})")

    compressed = meta.get("format_version", FORMAT_VERSION) >= 3
    missing = [n for n in (COMPRESSED if compressed else PLAIN) if n not in sections]
    if missing:
        bad(f"missing section(s) {', '.join(missing)}")
    n_words, dim = meta["n_words"], meta["dim"]
    if sections["centroids"].shape != (n_words, dim):
        bad(f"centroids have shape {sections['centroids'].shape}, the header says ({n_words}, {dim})")
    for name in ("image_ids", "word_counts", "offsets", "slots", "region_image", "word_offsets", "postings",
                 "page_crc"):
        if name in sections and sections[name].ndim != 1:
            bad(f"section {name!r} must be 1-D, got shape {sections[name].shape}")
    ids, counts = sections["image_ids"], sections["word_counts"]
    binary = KERNELS[meta["kernel"]].binary
    width = (dim + 7) // 8 if binary else 4 * dim        # bytes per code
    if compressed:
        wo, post, crc = sections["word_offsets"], sections["postings"], sections["page_crc"]
        n_post = meta["n_entries"]
        if wo.shape[0] != n_words + 1 or wo[0] != 0 or np.any(wo[1:] < wo[:-1]) or int(wo[-1]) != post.shape[0]:
            bad(f"the word table must be {n_words + 1} non-decreasing byte offsets from 0 to the "
                f"{post.shape[0]} bytes of postings")
        if crc.shape[0] != -(-post.shape[0] // meta["page_bytes"]):
            bad(f"{crc.shape[0]} page checksums for {post.shape[0]} bytes of postings in pages of "
                f"{meta['page_bytes']}")
        if post.shape[0] < n_post * width:
            bad(f"{post.shape[0]} bytes of postings cannot hold {n_post} postings of {width}-byte codes")
    else:
        offs, slots, codes = sections["offsets"], sections["slots"], sections["codes"]
        if offs.shape[0] != n_words + 1 or offs[0] != 0 or np.any(offs[1:] < offs[:-1]):
            bad(f"posting offsets must be {n_words + 1} non-decreasing values from 0")
        n_post = int(offs[-1])
        if (slots.shape[0] != n_post or codes.ndim != 2 or codes.shape[0] != n_post
                or codes.shape[1] * codes.itemsize != width or (binary and codes.dtype != np.uint8)):
            bad(f"posting sections do not match: {n_post} postings, slots {slots.shape}, codes {codes.dtype} "
                f"{codes.shape} ({width} bytes per {meta['kernel']!r} code)")
    if ids.shape[0] != counts.shape[0]:
        bad(f"{ids.shape[0]} image ids but {counts.shape[0]} word counts")
    if counts.size and (counts.min() < 0 or counts.sum(dtype=np.int64) != n_post):
        bad(f"word counts must be non-negative and add up to the {n_post} postings")
    if "region_image" in sections:
        owner = sections["region_image"]
        if ids.size and (ids.min() < 0 or ids.max() >= owner.shape[0] or np.unique(ids).size != ids.size):
            bad(f"region entry ids must be unique and lie in [0, {owner.shape[0]}) (the region_image entries)")
        if owner.size and owner.min() < -1:
            bad("region_image entries must be image ids or -1")
        ids = owner[ids]
    if ids.size and (ids.min() < 0 or ids.max() >= meta["next_id"]):
        bad(f"image ids must lie in [0, next_id = {meta['next_id']})")
    if meta["kind"] == "Index" and np.unique(ids).size != ids.size:
        bad("duplicate image ids")
