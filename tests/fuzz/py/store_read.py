"""atheris target: the feature-store reader (python/d2r/extract/store.py: read_shard, read_npz,
scan_store, load_features) on arbitrary shard contents.

    python tests/fuzz/py/store_read.py WORK_CORPUS tests/fuzz/corpus/store_read -max_total_time=60

Input: byte 0 picks the mode, the rest is the shard (a .npz: a zip of .npy arrays). Mode bit 0: fix
the zip's CRC-32 fields after mutation (every stored member's, in its local header and in the
central directory), so that mutations of the arrays reach numpy's and d2r's checks instead of
stopping at zipfile's "Bad CRC-32".

Allowed: ValueError (d2r.extract.store.StoreMismatchError included) whose message names the shard
(d2r's "PATH: not a d2r feature file or corrupt (...)"). Anything else (KeyError, zipfile.BadZipFile,
EOFError, MemoryError, a ValueError that does not name the file, a crash) is a bug; so is a store
whose readers disagree on its images (see TestOneInput).
"""
from __future__ import annotations

import io
import shutil
import struct
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SCRATCH, debug, instrumented_imports, run  # noqa: E402


def _import() -> None:
    global np, store
    import numpy as np

    import d2r.extract.store as store


instrumented_imports(__name__ == "__main__", ["d2r", "numpy.lib", "zipfile"], _import)


def fix_zip_crcs(data: bytes) -> bytes:
    """`data` with the CRC-32 of every stored (uncompressed) zip member recomputed, in its local
    header and its central directory entry, where the zip's directory can be read (else unchanged)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos, start_dir = z.infolist(), z.start_dir
    except Exception:  # any unreadable zip: left as it is (the target then sees it)
        return data
    buf = bytearray(data)
    p = start_dir
    for info in infos:
        o = info.header_offset
        if buf[o:o + 4] != b"PK\x03\x04" or buf[p:p + 4] != b"PK\x01\x02" or info.compress_type != zipfile.ZIP_STORED:
            return data
        n_name, n_extra = struct.unpack_from("<HH", buf, o + 26)
        start = o + 30 + n_name + n_extra
        crc = struct.pack("<I", zlib.crc32(bytes(buf[start:start + info.compress_size])))
        buf[o + 14:o + 18] = crc
        buf[p + 16:p + 20] = crc
        c_name, c_extra, c_comment = struct.unpack_from("<HHH", buf, p + 28)
        p += 46 + c_name + c_extra + c_comment
    return bytes(buf)


def _names_file(exc: ValueError, path: Path) -> bool:
    return str(path) in str(exc) or str(path.parent) in str(exc)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        body = fix_zip_crcs(body)
    folder = SCRATCH / "store"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    shard = folder / "shard-00000.npz"
    shard.write_bytes(body)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FormatWarning: a store without an extractor record
        try:
            names, feats, regions = store.read_shard(shard)
        except ValueError as exc:
            if not _names_file(exc, shard):
                raise
            debug(exc)
            names = None
        if names is not None:
            assert len(names) == len(feats) == len(regions)
            for f in feats:
                n = len(f.descriptors)
                assert f.locations.shape[0] == f.scales.shape[0] == f.scores.shape[0] == n
            for boxes, crops in regions:
                assert len(boxes) == len(crops)
        for what, call in (("read_npz", lambda: store.read_npz(shard)), ("scan_store", lambda: store.scan_store(folder)),
                           ("load_features", lambda: store.load_features(folder, regions=True))):
            try:
                out = call()
            except ValueError as exc:
                if not _names_file(exc, shard):
                    raise
                debug(exc)
                continue
            # The readers agree on the images (when read_shard could read them).
            if what == "scan_store" and names is not None:
                assert out[1] == [str(n) for n in names], (out[1], names)
            if what == "load_features" and names is not None:
                assert len(out[0]) == len(names)

if __name__ == "__main__":
    run(TestOneInput)
