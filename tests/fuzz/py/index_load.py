"""atheris target: d2r's index loader (d2r.Index.load, python/d2r/core/index_io.py and the native
checks below it) on arbitrary file contents, then every read of the loaded index.

    python tests/fuzz/py/index_load.py WORK_CORPUS tests/fuzz/corpus/index_load -max_total_time=60

Input: byte 0 picks the mode, the rest is the file. Mode bits: 0 fix the checksums after mutation
(the header's, every section's and the postings' page checksums recomputed, so that the input
reaches the structural checks below them; most random damage otherwise stops at a checksum), 1 load
with mmap=True, 2-3 verify (True, "lazy", False, False).

Allowed: d2r.IndexFileError (a ValueError naming the file and what is wrong), from the load and
from any read of the loaded index (a page checksum verified lazily, a corrupt list found while it is
decoded); and from a search, the ValueError "score contribution out of the fixed-point range" of
float codes far from unit length (the load does not read every code; the search refuses to give a
wrong sum). Anything else (another exception, a crash, a hang) is a bug; so is an index that loads
but whose full verification or reads then disagree (see _use).
"""
from __future__ import annotations

import json
import struct
import sys
import warnings
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SCRATCH, debug, instrumented_imports, run  # noqa: E402


def _import() -> None:
    global np, d2r, IndexFileError
    import numpy as np

    import d2r
    from d2r.core.index_io import IndexFileError


instrumented_imports(__name__ == "__main__", ["d2r"], _import)

_PREFIX = struct.Struct("<8sIII")
_VERIFY = (True, "lazy", False, False)


def fix_checksums(data: bytes) -> bytes:
    """`data` with every checksum a d2r index file holds recomputed from the content, where the file
    is well-formed enough to find them (else unchanged): each section's crc32 in the header, the page
    checksums of the postings, then the header's checksum. The header keeps its length (rewritten
    compactly and padded with blanks; left alone when that does not fit)."""
    if len(data) < _PREFIX.size:
        return data
    magic, version, hlen, _ = _PREFIX.unpack_from(data)
    if _PREFIX.size + hlen > len(data):   # a header longer than the file: nothing to fix
        return data
    header = data[_PREFIX.size:_PREFIX.size + hlen]
    buf = bytearray(data)
    try:
        meta = json.loads(header.decode("utf-8"))
        sections = meta["sections"]
        by_name = {e["name"]: e for e in sections}
        page = meta.get("page_bytes")
        post, crcs = by_name.get("postings"), by_name.get("page_crc")
        if post and crcs and isinstance(page, int) and page > 0:
            p0, pn = post["offset"], post["nbytes"]
            c0, cn = crcs["offset"], crcs["nbytes"]
            stream = bytes(buf[p0:p0 + pn])
            pages = [zlib.crc32(stream[i:i + page]) for i in range(0, len(stream), page)]
            if cn == 4 * len(pages) and c0 + cn <= len(buf):
                buf[c0:c0 + cn] = struct.pack(f"<{len(pages)}I", *pages)
        for e in sections:
            o, n = e["offset"], e["nbytes"]
            if isinstance(o, int) and isinstance(n, int) and 0 <= o and o + n <= len(buf):
                e["crc32"] = zlib.crc32(bytes(buf[o:o + n]))
        new = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
        return data
    if len(new) > hlen:
        return data
    new += b" " * (hlen - len(new))
    buf[:_PREFIX.size] = _PREFIX.pack(magic, version, hlen, zlib.crc32(new))
    buf[_PREFIX.size:_PREFIX.size + hlen] = new
    return bytes(buf)


def _use(idx, path: Path) -> None:
    """Every read of a loaded index. Each may raise IndexFileError (a lazily checked page, a corrupt
    list): then the loaded index was corrupt, which is allowed; anything else is a bug."""
    n = len(idx)
    ids = idx.ids
    assert ids.shape == (n,), (ids.shape, n)
    idx.stats()
    dim = idx.codebook.centroids.shape[1]
    rng = np.random.default_rng(len(ids))
    q = rng.standard_normal((5, dim)).astype(np.float32)
    kind = type(idx).__name__
    if kind == "RegionalSearchIndex":
        res = idx.search([q, q[:2]], k=None)
    else:
        res = idx.search([q, q[:1]], k=3)
        scores, all_ids = idx.score_all([q])
        assert scores.shape == (1, all_ids.shape[0]), (scores.shape, all_ids.shape)
    del res
    idx.verify()
    idx.compact()


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        body = fix_checksums(body)
    mmap, verify = bool(mode & 2), _VERIFY[(mode >> 2) & 3]
    path = SCRATCH / "index.d2r"
    path.write_bytes(body)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FormatWarning (an older format), numpy's overflow warnings
            try:
                idx = d2r.Index.load(path, mmap=mmap, verify=verify)
            except IndexFileError as exc:
                debug(exc)
                return
            try:
                _use(idx, path)
            except ValueError as exc:   # IndexFileError included
                if not isinstance(exc, IndexFileError) and "fixed-point range" not in str(exc):
                    raise
                debug(exc)
                return
            finally:
                del idx
    finally:
        path.unlink()


if __name__ == "__main__":
    run(TestOneInput)
