"""The bugs the fuzz targets found (README.md, "Fuzzing"), each as a plain test that fails before its
fix: the feature-store reader leaking zipfile's and numpy's own exceptions (and allocating what a
crafted .npy header declares), an index file whose per-image word counts do not match its postings
loading with verify=True, and non-finite centroids raising a bare ValueError. (The encoder's
out-of-bounds access with gap width 0 is tests/cpp/test_core.cpp test_encode_width_zero_stays_inside.)"""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r.core.index_io import IndexFileError, read_index_file, write_index_file
from d2r.extract import Features
from d2r.extract.store import read_npz, read_shard, save_features, scan_store


def _shard(path: Path) -> Path:
    rng = np.random.default_rng(0)
    f = Features(rng.standard_normal((3, 8)).astype(np.float32), rng.random((3, 2)).astype(np.float32),
                 np.ones(3, np.float32), np.ones(3, np.float32))
    save_features(path, ["/a.jpg"], [f], extractor={"name": "t", "params": {}, "fingerprint": "0" * 16})
    return path


def _member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """{member name: (local header offset, data offset)} of a stored zip."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            n, e = struct.unpack_from("<HH", data, info.header_offset + 26)
            out[info.filename] = (info.header_offset, info.header_offset + 30 + n + e)
    return out


def _replace_member(data: bytes, name: str, payload: bytes) -> bytes:
    """The zip with member `name`'s stored bytes replaced by `payload` (same length), its CRCs fixed."""
    buf = bytearray(data)
    import zlib
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(name)
        start = z.start_dir
        infos = z.infolist()
    head, at = _member_offsets(data)[name]
    assert len(payload) == info.compress_size
    buf[at:at + len(payload)] = payload
    crc = struct.pack("<I", zlib.crc32(payload))
    buf[head + 14:head + 18] = crc
    p = start
    for i in infos:
        if i.filename == name:
            buf[p + 16:p + 20] = crc
        a, b, c = struct.unpack_from("<HHH", buf, p + 28)
        p += 46 + a + b + c
    return bytes(buf)


def test_shard_with_a_broken_member_header_is_a_value_error(tmp_path):
    """Found by tests/fuzz/py/store_read.py: zipfile.BadZipFile escaped read_shard."""
    p = _shard(tmp_path / "shard-00000.npz")
    data = bytearray(p.read_bytes())
    head, _ = _member_offsets(bytes(data))["descriptors.npy"]
    assert head > 0                  # (a zip not starting with its magic is read as a pickle: refused)
    data[head:head + 4] = b"XXXX"   # the member's local header magic
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00000.npz"):
        read_shard(p)
    with pytest.raises(ValueError, match="shard-00000.npz"):
        scan_store(tmp_path)


def test_shard_with_a_garbled_npy_header_is_a_value_error(tmp_path):
    """Found by tests/fuzz/py/store_read.py: numpy's header parser raised tokenize.TokenError."""
    p = _shard(tmp_path / "shard-00000.npz")
    data = p.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        member = z.read("descriptors.npy")
    bad = member.replace(b"'shape': (", b"'shape': ((", 1)[:len(member)]   # an unclosed parenthesis
    p.write_bytes(_replace_member(data, "descriptors.npy", bad))
    with pytest.raises(ValueError, match="shard-00000.npz.*descriptors.npy"):
        read_shard(p)


def test_shard_whose_header_declares_a_huge_array_is_a_value_error(tmp_path):
    """A .npy header of the shard that declares 10^11 rows: refused from the member's size before
    numpy allocates it (before: MemoryError, or gigabytes allocated for a 2 KB file)."""
    p = _shard(tmp_path / "shard-00000.npz")
    data = p.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        member = z.read("descriptors.npy")
    old = b"'shape': (3, 8)"
    assert old in member
    new = b"'shape': (99999999999, 8)"
    bad = member.replace(old + b", }", new + b"}") if old + b", }" in member else None
    if bad is None or len(bad) != len(member):   # keep the header's length: eat blanks of its padding
        i = member.index(old)
        pad = len(new) - len(old)
        rest = member[i + len(old):]
        j = rest.index(b" " * pad)
        bad = member[:i] + new + rest[:j] + rest[j + pad:]
    assert len(bad) == len(member)
    p.write_bytes(_replace_member(data, "descriptors.npy", bad))
    with pytest.raises(ValueError, match=r"shard-00000.npz.*99999999999"):
        read_shard(p)
    with pytest.raises(ValueError, match="shard-00000.npz"):
        read_npz(p)


def test_index_whose_word_counts_do_not_match_its_postings_fails_verification(tmp_path):
    """Found by tests/fuzz/native/index_segments.cpp: a file with valid checksums whose per-image word
    counts are swapped between two images loaded with verify=True and scored with the wrong
    normalisation. verify() now counts every image's postings."""
    rng = np.random.default_rng(1)
    cb = d2r.Codebook(rng.standard_normal((16, 32)).astype(np.float32))
    idx = d2r.Index(cb, "asmk*")
    idx.add([rng.standard_normal((n, 32)).astype(np.float32) for n in (2, 9, 5)])
    good = tmp_path / "good.d2r"
    idx.save(good)
    meta, sec, _ = read_index_file(good)
    counts = sec["word_counts"].copy()
    assert counts[0] != counts[1]
    counts[[0, 1]] = counts[[1, 0]]
    meta.pop("format_version")
    bad = tmp_path / "bad.d2r"
    write_index_file(bad, meta, {**sec, "word_counts": counts})   # every checksum valid
    d2r.Index.load(good)
    with pytest.raises(IndexFileError, match="words in the image table but|word count of image"):
        d2r.Index.load(bad)                  # verify=True: everything checked at load
    lazy = d2r.Index.load(bad, mmap=True)    # lazy: the counts are checked by verify()
    with pytest.raises(IndexFileError, match="words in the image table but|word count of image"):
        lazy.verify()


def test_index_with_non_finite_centroids_is_an_index_file_error(tmp_path):
    """Found by tests/fuzz/py/index_load.py: a codebook section holding NaN (with verify=False, or
    valid checksums) raised Codebook's ValueError without the file's name, not IndexFileError."""
    rng = np.random.default_rng(2)
    cb = d2r.Codebook(rng.standard_normal((8, 16)).astype(np.float32))
    idx = d2r.Index(cb, "asmk*")
    idx.add([rng.standard_normal((4, 16)).astype(np.float32)])
    good = tmp_path / "good.d2r"
    idx.save(good)
    meta, sec, _ = read_index_file(good)
    centroids = sec["centroids"].copy()
    centroids[3, 5] = np.nan
    meta.pop("format_version")
    bad = tmp_path / "bad.d2r"
    write_index_file(bad, meta, {**sec, "centroids": centroids})
    for mmap in (False, True):
        with pytest.raises(IndexFileError, match=r"bad\.d2r.*codebook"):
            d2r.Index.load(bad, mmap=mmap)


def test_index_with_postings_but_no_entries_is_refused(tmp_path):
    """Found by tests/fuzz/native/index_segments.cpp: a file whose header says n_entries = 0 (and its
    word counts 0: consistent, checksums valid) while a word's list holds a posting loaded; a search
    skips a segment without entries, so the image scored -1 ("no features") instead of matching."""
    rng = np.random.default_rng(3)
    cb = d2r.Codebook(rng.standard_normal((16, 32)).astype(np.float32))
    idx = d2r.Index(cb, "asmk*")
    x = rng.standard_normal((1, 32)).astype(np.float32)   # one descriptor: one posting
    idx.add([x], image_ids=[7])
    good = tmp_path / "good.d2r"
    idx.save(good)
    meta, sec, _ = read_index_file(good)
    assert meta["n_entries"] == 1
    meta.pop("format_version")
    meta["n_entries"] = 0
    bad = tmp_path / "bad.d2r"
    write_index_file(bad, meta, {**sec, "word_counts": np.zeros_like(sec["word_counts"])})
    scores, ids = d2r.Index.load(good).search([x], k=1)
    assert ids[0][0] == 7 and scores[0][0] > 0.9
    for mmap, verify in ((False, True), (True, "lazy"), (False, False)):
        with pytest.raises(IndexFileError, match="more non-empty posting lists than postings"):
            d2r.Index.load(bad, mmap=mmap, verify=verify)
