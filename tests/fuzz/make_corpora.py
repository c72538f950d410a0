"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/) from small indexes and
feature stores that d2r builds; run from the repository root once the seeds need to change:

    PYTHONPATH=python python tests/fuzz/make_corpora.py

index_load       a mode byte and an index file: format 4 (asmk*, asmk, a RegionalSearchIndex, one with a removed image),
                 format 3 (postings re-coded as Golomb-Rice) and format 2 (plain posting arrays)
index_segments   the same indexes in the input layout of tests/fuzz/native/index_segments.cpp
postings         single posting lists (format 4 and 3) in the layout of tests/fuzz/native/postings.cpp
store_read       feature-store shards (.npz) with and without regions, and one without an extractor record
"""
from __future__ import annotations

import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

import d2r
from d2r.core.index_io import read_index_file, write_index_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from crafted import read_varint, varint  # noqa: E402  (tests/crafted.py: the varints of csrc/postings.h)
from d2r.extract import Features
from d2r.extract.store import save_features

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"


# ---- posting lists in Python (for the format-3 seeds): the layouts of csrc/postings.h and postings_v3.h
def decode_v4(buf: bytes, cb: int) -> tuple[list[int], bytes]:
    """(slots, codes) of a format-4 list."""
    n, p = read_varint(buf, 0)
    slots: list[int] = []
    codes = bytearray()
    while len(slots) < n:
        m = min(128, n - len(slots))
        first, b = struct.unpack_from("<IB", buf, p)
        p += 5
        words = ((m + 3) // 4 * b + 31) // 32
        gaps = buf[p:p + 16 * words]
        p += 16 * words
        s = first
        slots.append(s)
        for i in range(1, m):
            if b == 0:
                s += 1
                slots.append(s)
                continue
            lane, bit = i & 3, (i >> 2) * b
            t, sh = bit >> 5, bit & 31
            x = struct.unpack_from("<I", gaps, 16 * t + 4 * lane)[0]
            if sh + b > 32:
                x |= struct.unpack_from("<I", gaps, 16 * (t + 1) + 4 * lane)[0] << 32
            s += ((x >> sh) & ((1 << b) - 1)) + 1
            slots.append(s)
        codes += buf[p:p + m * cb]
        p += m * cb
    assert p == len(buf)
    return slots, bytes(codes)


def encode_v3(slots: list[int], codes: bytes, cb: int) -> bytes:
    """A format-3 list (blocks of 256, Golomb-Rice gaps with the best k of each block)."""
    if not slots:
        return b""
    out = bytearray(varint(len(slots)))
    for b0 in range(0, len(slots), 256):
        s = slots[b0:b0 + 256]
        gaps = [s[i] - s[i - 1] - 1 for i in range(1, len(s))]
        k = max(0, int(np.log2(np.mean(gaps) + 1))) if gaps else 0
        low = 0
        for i, g in enumerate(gaps):
            low |= (g & ((1 << k) - 1)) << (i * k)
        low_bytes = (len(gaps) * k + 7) // 8
        unary, pos = 0, 0
        for g in gaps:
            pos += g >> k
            unary |= 1 << pos
            pos += 1
        unary_bytes = (pos + 7) // 8
        out += struct.pack("<IBH", s[0], k, unary_bytes)
        out += low.to_bytes(low_bytes, "little") + unary.to_bytes(unary_bytes, "little")
        out += codes[b0 * cb:(b0 + len(s)) * cb]
    return bytes(out)


def to_v3(sec: dict, n_words: int, cb: int) -> tuple[np.ndarray, np.ndarray]:
    """(word_offsets, postings) of the format-4 sections re-coded in format 3."""
    wo, post = sec["word_offsets"], sec["postings"].tobytes()
    lists = [encode_v3(*decode_v4(post[wo[w]:wo[w + 1]], cb), cb) if wo[w] != wo[w + 1] else b""
             for w in range(n_words)]
    offs = np.zeros(n_words + 1, np.uint64)
    offs[1:] = np.cumsum([len(x) for x in lists])
    return offs, np.frombuffer(b"".join(lists), np.uint8)


def page_crcs(post: bytes, page: int) -> np.ndarray:
    return np.array([zlib.crc32(post[i:i + page]) for i in range(0, len(post), page)], np.uint32)


# ---- the seeds ----------------------------------------------------------------------------------
def indexes(tmp: Path) -> dict[str, Path]:
    """Small index files of several kinds, saved by d2r."""
    rng = np.random.default_rng(24)
    out = {}
    cb = d2r.Codebook(rng.standard_normal((16, 128)).astype(np.float32))
    imgs = [rng.standard_normal((int(rng.integers(3, 12)), 128)).astype(np.float32) for _ in range(24)]
    idx = d2r.Index(cb, "asmk*")
    idx.add(imgs, image_ids=np.arange(100, 124))
    idx.save(out.setdefault("asmk_star", tmp / "asmk_star.d2r"))
    idx.remove([105, 117])
    idx.save(out.setdefault("asmk_star_removed", tmp / "asmk_star_removed.d2r"))
    cb8 = d2r.Codebook(rng.standard_normal((8, 8)).astype(np.float32))
    fidx = d2r.Index(cb8, "asmk")
    fidx.add([rng.standard_normal((5, 8)).astype(np.float32) for _ in range(10)])
    fidx.save(out.setdefault("asmk_float", tmp / "asmk_float.d2r"))
    reg = d2r.RegionalSearchIndex(cb, "asmk*")
    reg.add_regions_many([[x, x[:2]] for x in imgs[:8]], image_ids=np.arange(8))
    reg.save(out.setdefault("regional", tmp / "regional.d2r"))
    # One image with many postings per word: lists of more than one block (128 postings).
    big = d2r.Index(d2r.Codebook(rng.standard_normal((4, 128)).astype(np.float32)), "asmk*")
    big.add([rng.standard_normal((6, 128)).astype(np.float32) for _ in range(150)])
    big.save(out.setdefault("multiblock", tmp / "multiblock.d2r"))
    return out


def rewrite(path: Path, dest: Path, version: int) -> None:
    """The index file at `path` written again in format 3 (Golomb-Rice postings) or 2 (plain arrays)."""
    meta, sec, _ = read_index_file(path)
    meta.pop("format_version")
    binary = meta["kernel"].endswith("*")
    cb = (meta["dim"] + 7) // 8 if binary else 4 * meta["dim"]
    n_words = meta["n_words"]
    sec = dict(sec)
    if version == 3:
        wo, post = to_v3(sec, n_words, cb)
        sec.update(word_offsets=wo, postings=post, page_crc=page_crcs(post.tobytes(), meta["page_bytes"]))
    else:
        wo, post = sec.pop("word_offsets"), sec.pop("postings").tobytes()
        sec.pop("page_crc")
        slots, codes, offs = [], b"", [0]
        for w in range(n_words):
            s, c = decode_v4(post[wo[w]:wo[w + 1]], cb) if wo[w] != wo[w + 1] else ([], b"")
            slots += s
            codes += c
            offs.append(len(slots))
        for k in ("n_entries", "page_bytes"):
            meta.pop(k)
        sec.update(offsets=np.array(offs, np.int64), slots=np.array(slots, np.uint32),
                   codes=np.frombuffer(codes, np.uint8).reshape(len(slots), cb) if binary else
                   np.frombuffer(codes, np.float32).reshape(len(slots), meta["dim"]))
    write_index_file(dest, meta, sec, version=version)


def segments_input(path: Path) -> bytes:
    """The index file's core content in the layout of tests/fuzz/native/index_segments.cpp."""
    meta, sec, _ = read_index_file(path)
    binary = meta["kernel"].endswith("*")
    dims = (128, 64, 24, 256) if binary else (1, 2, 4, 8)
    flags = (binary * 1 | (meta["kind"] == "RegionalSearchIndex") * 2 | (meta["format_version"] == 3) * 4 | 8
             | dims.index(meta["dim"]) << 4)
    ids = sec["image_ids"]
    crc = sec["page_crc"]
    return (struct.pack("<BBHqII", flags, meta["n_words"] - 1, ids.shape[0], meta["next_id"], meta["page_bytes"],
                        meta["n_entries"])
            + sec["word_offsets"].tobytes() + ids.tobytes() + sec["word_counts"].tobytes()
            + struct.pack("<I", crc.shape[0]) + crc.tobytes() + sec["postings"].tobytes())


def posting_inputs(path: Path) -> list[bytes]:
    """A few of the index's lists (and their format-3 versions) in the layout of tests/fuzz/native/postings.cpp."""
    meta, sec, _ = read_index_file(path)
    cb = (meta["dim"] + 7) // 8
    wo, post = sec["word_offsets"], sec["postings"].tobytes()
    n_slots = sec["image_ids"].shape[0]
    q = bytes(range(16))
    code_sel = {1: 0, 2: 1, 4: 2, 8: 3, 16: 4, 32: 6, 64: 7}[cb]
    lens = [(wo[w + 1] - wo[w], w) for w in range(meta["n_words"]) if wo[w + 1] > wo[w]]
    lens.sort()
    out = []
    for _, w in (lens[0], lens[len(lens) // 2], lens[-1]):
        lst = post[wo[w]:wo[w + 1]]
        head = struct.pack("<I", n_slots) + q
        out.append(bytes([code_sel << 1]) + head + lst)
        out.append(bytes([code_sel << 1 | 1]) + head + encode_v3(*decode_v4(lst, cb), cb))
    return out


def stores(dest: Path) -> None:
    rng = np.random.default_rng(7)

    def feats(n: int, dim: int = 8) -> Features:
        return Features(rng.standard_normal((n, dim)).astype(np.float32), rng.random((n, 2)).astype(np.float32) * 100,
                        rng.random(n).astype(np.float32) + 1, rng.random(n).astype(np.float32))

    extractor = {"name": "fuzz", "params": {"dim": 8}, "fingerprint": "0123456789abcdef"}
    save_features(dest / "plain.npz", ["/a.jpg", "/b.jpg"], [feats(3), feats(2)], extractor=extractor)
    save_features(dest / "regions.npz", ["/a.jpg", "/b.jpg"], [feats(2), feats(1)],
                  regions=[(np.array([[0, 0, 5, 5]]), [feats(2)]), (np.zeros((0, 4)), [])], extractor=extractor,
                  errors=[("/c.jpg", "unreadable")], region_source="grid:3")
    save_features(dest / "no_record.npz", ["/a.jpg"], [feats(1)])
    save_features(dest / "empty.npz", [], [], extractor=extractor)
    # The inputs of tests/fuzz/py/store_read.py: a mode byte (bit 0: fix the zip's CRCs) and the shard.
    for i, p in enumerate(sorted(dest.glob("*.npz"))):
        p.with_suffix(".bin").write_bytes(bytes([1 - i % 2]) + p.read_bytes())
        p.unlink()


def main() -> int:
    for t in ("index_load", "index_segments", "postings", "store_read"):
        shutil.rmtree(CORPUS / t, ignore_errors=True)
        (CORPUS / t).mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = indexes(Path(tmp))
        rewrite(files["asmk_star"], Path(tmp) / "asmk_star_v3.d2r", 3)
        rewrite(files["multiblock"], Path(tmp) / "multiblock_v3.d2r", 3)
        rewrite(files["asmk_star"], Path(tmp) / "asmk_star_v2.d2r", 2)
        for name in ("asmk_star_v3", "multiblock_v3", "asmk_star_v2"):
            files[name] = Path(tmp) / f"{name}.d2r"
        # index_load's inputs: a mode byte (tests/fuzz/py/index_load.py: bit 0 fix the checksums, bit 1
        # mmap, bits 2-3 verify) and the file; the seeds cover the modes.
        modes = {"asmk_star": 0x01, "asmk_star_removed": 0x03, "asmk_float": 0x05, "regional": 0x07,
                 "multiblock": 0x09, "asmk_star_v3": 0x0B, "multiblock_v3": 0x00, "asmk_star_v2": 0x06}
        for name, path in files.items():
            (CORPUS / "index_load" / f"{name}.bin").write_bytes(bytes([modes[name]]) + path.read_bytes())
            if not name.endswith("_v2"):
                (CORPUS / "index_segments" / f"{name}.bin").write_bytes(segments_input(path))
        for name in ("asmk_star", "multiblock"):
            for i, b in enumerate(posting_inputs(files[name])):
                (CORPUS / "postings" / f"{name}_{i}.bin").write_bytes(b)
    stores(CORPUS / "store_read")
    for t in sorted(CORPUS.iterdir()):
        sizes = [p.stat().st_size for p in t.iterdir()]
        print(f"{t.name}: {len(sizes)} files, {sum(sizes)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
