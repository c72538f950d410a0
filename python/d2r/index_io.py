"""The saved-index file format (version 1).

Layout::

    bytes 0-7    magic b"D2RINDEX"
    bytes 8-11   format version (uint32 little endian)
    bytes 12-15  header length H (uint32)
    bytes 16-19  CRC-32 of the header bytes (uint32)
    bytes 20..   header: UTF-8 JSON (kernel, alpha, tau, normalize, m_db, m_query, dim, n_words,
                 next_id, sections); each section: name, dtype, shape, offset, nbytes, crc32
    ...          sections, each starting at a multiple of 64 bytes (so they can be memory-mapped)

Files are written to a temporary file in the same folder, fsync'ed and renamed over the target, so a
crash never leaves a half-written index. Loading checks the magic, the version, the header checksum,
every section's bounds and (unless verify=False) every section's CRC-32.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from ._atomic import atomic_write

MAGIC = b"D2RINDEX"
FORMAT_VERSION = 1
_ALIGN = 64
_PREFIX = struct.Struct("<8sIII")


class IndexFileError(ValueError):
    """A file that is not a d2r index, is corrupt or truncated, or was written by a newer d2r."""


def _crc(arr: np.ndarray) -> int:
    view = memoryview(np.ascontiguousarray(arr)).cast("B")
    crc = 0
    step = 1 << 26
    for i in range(0, len(view), step):
        crc = zlib.crc32(view[i:i + step], crc)
    return crc & 0xFFFFFFFF


def write_index_file(path, meta: dict, sections: dict) -> None:
    """Atomically write `meta` (JSON-serialisable) and the named numpy arrays in `sections`."""
    path = Path(path)
    entries = []
    arrays = []
    for name, arr in sections.items():
        arr = np.ascontiguousarray(arr)
        entries.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                        "nbytes": int(arr.nbytes), "crc32": _crc(arr)})
        arrays.append(arr)
    # Offsets depend on the header length, which depends on the offsets' digits: iterate to a fixpoint.
    offsets = [0] * len(entries)
    while True:
        for e, o in zip(entries, offsets):
            e["offset"] = o
        header = json.dumps({**meta, "sections": entries}, sort_keys=True).encode("utf-8")
        pos = _PREFIX.size + len(header)
        new = []
        for e in entries:
            pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
            new.append(pos)
            pos += e["nbytes"]
        if new == offsets:
            break
        offsets = new
    with atomic_write(path) as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header) & 0xFFFFFFFF))
        f.write(header)
        for e, arr in zip(entries, arrays):
            f.write(b"\0" * (e["offset"] - f.tell()))
            f.write(memoryview(arr).cast("B"))


def read_index_file(path, mmap: bool = False, verify: bool = True):
    """Returns (meta, sections) with sections as numpy arrays (read-only memory maps when mmap)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
            raise IndexFileError(f"{path}: not a d2r index file (bad magic)")
        _, version, hlen, hcrc = _PREFIX.unpack(prefix)
        if version > FORMAT_VERSION:
            raise IndexFileError(f"{path}: index format version {version} is newer than this d2r supports "
                                 f"({FORMAT_VERSION}); upgrade d2r")
        if version < 1:
            raise IndexFileError(f"{path}: invalid index format version {version}")
        header = f.read(hlen)
        if len(header) < hlen:
            raise IndexFileError(f"{path}: truncated index file (header)")
        if zlib.crc32(header) & 0xFFFFFFFF != hcrc:
            raise IndexFileError(f"{path}: corrupt index file (header checksum mismatch)")
        try:
            meta = json.loads(header.decode("utf-8"))
        except ValueError as exc:
            raise IndexFileError(f"{path}: corrupt index header ({exc})") from exc
        entries = meta.pop("sections")
        sections = {}
        for e in entries:
            dtype = np.dtype(e["dtype"])
            shape = tuple(int(s) for s in e["shape"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes != e["nbytes"] or e["offset"] < 0 or e["offset"] + nbytes > size:
                raise IndexFileError(f"{path}: truncated or corrupt index file (section {e['name']!r})")
            if mmap and nbytes > 0:
                arr = np.memmap(path, dtype=dtype, mode="r", offset=e["offset"], shape=shape)
            else:
                f.seek(e["offset"])
                buf = f.read(nbytes)
                if len(buf) != nbytes:
                    raise IndexFileError(f"{path}: truncated index file (section {e['name']!r})")
                arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
            if verify and _crc(arr) != e["crc32"]:
                raise IndexFileError(f"{path}: corrupt index file (checksum mismatch in section {e['name']!r})")
            sections[e["name"]] = arr
    return meta, sections
