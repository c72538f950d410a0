"""Crafted index files with valid checksums (tests/core/test_crafted_index.py): d2r-built index files
edited structurally, every checksum (postings pages, sections, header) recomputed, so that only the
structural checks of the reader stand between the edit and an answer.

A file is edited as (meta, sections): `read` parses it without verifying anything, a mutation edits
the posting lists (parsed per word into blocks of format 4, csrc/postings.h, or format 3,
csrc/postings_v3.h), the word table or the image table, and `write` writes it again through
d2r.core.index_io.write_index_file (which computes every section's CRC-32 and the header's) after
recomputing the page checksums of the postings. Independent of the C++ reader: the layouts are parsed
here from their documentation.

Run as a script (``python crafted.py OUT.pkl KIND PATH [PATH ...]``), it loads each file in every mode
and runs every reading operation on it, writing {path: {operation: outcome}} (an outcome: ("ok",
result arrays) or ("error", exception class name, message)); the test runs it in a child process, so a
crash is seen as a dead child, not a dead pytest.
"""
from __future__ import annotations

import pickle
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# ---- reading and writing files ------------------------------------------------------------------


def read(path):
    """(meta, sections as writable arrays, format version) of an index file, nothing verified."""
    from d2r.core import index_io
    meta, sec, _ = index_io.read_index_file(path, mmap=False, verify=False)
    version = meta.pop("format_version")
    return meta, {k: np.array(v) for k, v in sec.items()}, version


def page_crcs(postings, page_bytes):
    raw = np.ascontiguousarray(postings, np.uint8).tobytes()
    return np.array([zlib.crc32(raw[i:i + page_bytes]) & 0xFFFFFFFF for i in range(0, len(raw), page_bytes)],
                    np.uint32)


def write(path, meta, sec, version):
    """Writes (meta, sections) as an index file of `version`, every checksum recomputed: the page
    CRCs of the postings here, the sections' and the header's by write_index_file."""
    from d2r.core import index_io
    sec = dict(sec)
    if "postings" in sec:
        sec["page_crc"] = page_crcs(sec["postings"], meta["page_bytes"])
    index_io.write_index_file(path, dict(meta), sec, version=version)


# ---- the posting lists --------------------------------------------------------------------------


def varint(v):
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v >= 0x80 else 0))
        if v < 0x80:
            return bytes(out)
        v >>= 7


def read_varint(raw, p):
    v, shift = 0, 0
    while True:
        byte = raw[p]
        p += 1
        v |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return v, p


@dataclass
class Block:
    at: int          # offset in the list's bytes
    size: int
    n: int
    first: int
    width: int       # format 4: gap bit width; format 3: Rice parameter
    slots: list = field(default_factory=list)


def gap_bytes4(n, b):
    return 16 * ((((n + 3) // 4) * b + 31) // 32)


def decode4(raw, at, n, b):
    """Slots of the format-4 block at raw[at:] (first slot, width, vertical 4-lane bit-packed gaps)."""
    first = struct.unpack_from("<I", raw, at)[0]
    gaps = at + 5
    out, s = [first], first
    mask = (1 << b) - 1
    for i in range(1, n):
        lane, bit = i & 3, (i >> 2) * b
        t, sh = bit >> 5, bit & 31
        x = struct.unpack_from("<I", raw, gaps + 16 * t + 4 * lane)[0]
        if sh + b > 32:
            x |= struct.unpack_from("<I", raw, gaps + 16 * (t + 1) + 4 * lane)[0] << 32
        s += ((x >> sh) & mask) + 1 if b else 1
        out.append(s)
    return out


def encode_block4(slots, codes, width=None):
    """A format-4 block of these slots (first slot, then gaps v_i = s_i - s_{i-1} - 1, which may be
    anything representable in `width` bits: the slots need not be valid) and codes (bytes)."""
    n = len(slots)
    gaps = [0] + [slots[i] - slots[i - 1] - 1 for i in range(1, n)]
    b = width if width is not None else max(g.bit_length() for g in gaps)
    words = bytearray(gap_bytes4(n, b))
    for i in range(1, n):
        v = gaps[i] & ((1 << b) - 1) if b else 0
        lane, bit = i & 3, (i >> 2) * b
        t, sh = bit >> 5, bit & 31
        w = struct.unpack_from("<I", words, 16 * t + 4 * lane)[0] | ((v << sh) & 0xFFFFFFFF)
        struct.pack_into("<I", words, 16 * t + 4 * lane, w)
        if sh + b > 32:
            w = struct.unpack_from("<I", words, 16 * (t + 1) + 4 * lane)[0] | (v >> (32 - sh))
            struct.pack_into("<I", words, 16 * (t + 1) + 4 * lane, w)
    return struct.pack("<IB", slots[0] & 0xFFFFFFFF, b) + bytes(words) + bytes(codes)


def decode3(raw, at, n):
    """(slots, size without codes) of the format-3 block at raw[at:] (first, Rice k, unary bytes)."""
    first, k, u = struct.unpack_from("<IBH", raw, at)
    low_at = at + 7
    low_bytes = ((n - 1) * k + 7) // 8
    unary_at = low_at + low_bytes
    bits = int.from_bytes(raw[low_at:low_at + low_bytes], "little")
    ubits = int.from_bytes(raw[unary_at:unary_at + u], "little")
    out, s, pos, last = [first], first, 0, -1
    for i in range(n - 1):
        while not (ubits >> pos) & 1:
            pos += 1
        q = pos - last - 1
        last = pos
        pos += 1
        s += ((q << k) | ((bits >> (i * k)) & ((1 << k) - 1))) + 1
        out.append(s)
    return out, 7 + low_bytes + u


def parse_list(raw, version, cb):
    """(count, [Block]) of one list's bytes (b"" for an empty list)."""
    if not raw:
        return 0, []
    count, p = read_varint(raw, 0)
    per = 128 if version >= 4 else 256
    blocks, left = [], count
    while left > 0:
        n = min(per, left)
        if version >= 4:
            first, b = struct.unpack_from("<IB", raw, p)
            size = 5 + gap_bytes4(n, b) + n * cb
            slots = decode4(raw, p, n, b)
        else:
            first, b = struct.unpack_from("<IB", raw, p)
            slots, head = decode3(raw, p, n)
            size = head + n * cb
        blocks.append(Block(p, size, n, first, b, slots))
        p += size
        left -= n
    assert p == len(raw), "a d2r-written list parses exactly"
    return count, blocks


class Lists:
    """The posting lists of (meta, sections) as editable byte strings, written back by `store`."""

    def __init__(self, meta, sec, version, cb):
        self.meta, self.sec, self.version, self.cb = meta, sec, version, cb
        wo = sec["word_offsets"].astype(np.int64)
        post = sec["postings"].tobytes()
        self.raw = [bytearray(post[wo[w]:wo[w + 1]]) for w in range(len(wo) - 1)]

    def parse(self, w):
        return parse_list(bytes(self.raw[w]), self.version, self.cb)

    def longest(self):
        """The word with the most blocks (at least 4 in format 4, 2 in format 3)."""
        sizes = [len(r) for r in self.raw]
        w = int(np.argmax(sizes))
        assert len(self.parse(w)[1]) >= (4 if self.version >= 4 else 2), "the fixture needs longer lists"
        return w

    def store(self):
        wo = np.zeros(len(self.raw) + 1, np.uint64)
        wo[1:] = np.cumsum([len(r) for r in self.raw])
        self.sec["word_offsets"] = wo
        self.sec["postings"] = np.frombuffer(b"".join(bytes(r) for r in self.raw), np.uint8).copy()


# ---- the mutations ------------------------------------------------------------------------------
# Each takes (meta, sections, version, code bytes) and edits them in place; every one leaves a
# structure that is wrong (never a valid index with other content), so every reader must refuse it.


def _set_first(block_index, value):
    """Sets the first slot of a block of the longest list (index clamped to the list's blocks, so
    that the shorter lists of format 3 have the edit too) to value(blocks, index, n_slots)."""
    def m(L):
        w = L.longest()
        _, bl = L.parse(w)
        i = block_index if block_index < 0 else min(block_index, len(bl) - 1)
        struct.pack_into("<I", L.raw[w], bl[i].at, value(bl, i, L.n_slots) & 0xFFFFFFFF)
    return m


def _count(delta):
    def m(L):
        w = L.longest()
        count, p = read_varint(L.raw[w], 0)
        L.raw[w][:p] = varint(max(count + delta, 0))
    return m


def _set_width(block_index, value):
    def m(L):
        w = L.longest()
        _, bl = L.parse(w)
        blk = bl[min(block_index, len(bl) - 1)]
        L.raw[w][blk.at + 4] = value(blk.width) & 0xFF
    return m


def _reencode(block_index, edit, width=None):
    """Re-encodes a format-4 block of the longest list with edited slots (same codes)."""
    def m(L):
        w = L.longest()
        _, bl = L.parse(w)
        blk = bl[block_index if block_index >= 0 else len(bl) + block_index]
        slots = edit(list(blk.slots), bl, L)
        codes = L.raw[w][blk.at + blk.size - blk.n * L.cb:blk.at + blk.size]
        L.raw[w][blk.at:blk.at + blk.size] = encode_block4(slots, codes, width)
    return m


def _straddler(L):
    """(word, index of a block) whose slots straddle the middle slot (where two threads split a
    single query's slot range), with a block after it, in a list of at least 4 blocks."""
    mid = L.n_slots // 2
    for w in np.argsort([-len(r) for r in L.raw]):
        _, bl = L.parse(int(w))
        for i in range(len(bl) - 1):
            if bl[i].slots[0] < mid <= bl[i].slots[-1] and bl[i].slots[0] + bl[i].n <= mid:
                return int(w), i, bl
    raise AssertionError("no block straddles the middle slot")


def _straddle_next(value):
    def m(L):
        w, i, bl = _straddler(L)
        struct.pack_into("<I", L.raw[w], bl[i + 1].at, value(bl[i]) & 0xFFFFFFFF)
    return m


def _word_table(edit):
    def m(L):
        # two consecutive non-empty lists
        w = next(w for w in range(len(L.raw) - 1) if len(L.raw[w]) and len(L.raw[w + 1]))
        L.store()
        wo = L.sec["word_offsets"].astype(np.int64)
        edit(wo, w)
        L.sec["word_offsets"] = wo.astype(np.uint64)
        L.stored = True
    return m


def _image_table(edit):
    def m(L):
        edit(L.meta, L.sec)
    return m


def _shift_count(meta, sec):
    c = sec["word_counts"]
    i = int(np.argmax(c))
    j = int(np.argmin(np.where(np.arange(c.size) == i, 1 << 30, c)))
    c[i] -= 1
    c[j] += 1


def _entries_plus(meta, sec):
    meta["n_entries"] += 1
    sec["word_counts"][0] += 1


def _no_entries(meta, sec):
    meta["n_entries"] = 0
    sec["word_counts"][:] = 0


def _drop_last_image(meta, sec):
    c = int(sec["word_counts"][-1])
    sec["image_ids"] = sec["image_ids"][:-1].copy()
    sec["word_counts"] = sec["word_counts"][:-1].copy()
    meta["n_entries"] -= c


def _dup_id(meta, sec):
    sec["image_ids"][-1] = sec["image_ids"][0]


def _id_next(meta, sec):
    sec["image_ids"][0] = meta["next_id"]


def _neg_count(meta, sec):
    c = sec["word_counts"]
    c[0], c[1] = -1, c[1] + c[0] + 1


def _extra_image(meta, sec):
    """An image table one longer than the slots the lists use, with the last image's count moved
    to the new one (the sums still match)."""
    sec["image_ids"] = np.append(sec["image_ids"], meta["next_id"]).astype(np.int64)
    meta["next_id"] += 1
    c = sec["word_counts"]
    sec["word_counts"] = np.append(c, c[-1]).astype(np.int32)
    sec["word_counts"][-2] = 0


COMMON = {
    "first slot 0xFFFFFFFF (block 0)": _set_first(0, lambda bl, i, n: 0xFFFFFFFF),
    "first slot 0xFFFFFFFF (block 2)": _set_first(2, lambda bl, i, n: 0xFFFFFFFF),
    "first slot 0xFFFFFFFF (last block)": _set_first(-1, lambda bl, i, n: 0xFFFFFFFF),
    "first slot = n_slots (last block)": _set_first(-1, lambda bl, i, n: n),
    "count one lower": _count(-1),
    "count one higher": _count(+1),
    "count zero": _count(-(1 << 40)),
    "block 2 starts at block 1's first slot": _set_first(2, lambda bl, i, n: bl[i - 1].first),
    "block 2 starts at block 1's last slot": _set_first(2, lambda bl, i, n: bl[i - 1].slots[-1]),
    "block 2 starts inside block 1": _set_first(2, lambda bl, i, n: bl[i - 1].first + bl[i - 1].n),
    "block 2 starts below block 1": _set_first(2, lambda bl, i, n: max(bl[i - 1].first - 1, 0)),
    "word table: list w merged into w+1": _word_table(lambda wo, w: wo.__setitem__(w + 1, wo[w])),
    "word table: list w+1 merged into w": _word_table(lambda wo, w: wo.__setitem__(w + 1, wo[w + 2])),
    "word table: boundary one byte later": _word_table(lambda wo, w: wo.__setitem__(w + 1, wo[w + 1] + 1)),
    "word table: boundary one byte earlier": _word_table(lambda wo, w: wo.__setitem__(w + 1, wo[w + 1] - 1)),
    "image table: a word count moved to another image": _image_table(_shift_count),
    "image table: n_entries and a word count one higher": _image_table(_entries_plus),
    "image table: no entries, word counts zero": _image_table(_no_entries),
    "image table: last image dropped": _image_table(_drop_last_image),
    "image table: duplicate id": _image_table(_dup_id),
    "image table: id = next_id": _image_table(_id_next),
    "image table: negative word count": _image_table(_neg_count),
    "image table: one image more than the lists use": _image_table(_extra_image),
}

FORMAT4 = {
    **COMMON,
    "next block inside a straddling block (= first + n)": _straddle_next(lambda b: b.first + b.n),
    "next block inside a straddling block (= its last)": _straddle_next(lambda b: b.slots[-1]),
    "count 128 lower": _count(-128),
    "count 128 higher": _count(+128),
    "gap width 33": _set_width(1, lambda b: 33),
    "gap width 255": _set_width(1, lambda b: 255),
    "gap width one more (full block)": _set_width(1, lambda b: b + 1),
    "gap width one less (full block)": _set_width(1, lambda b: b - 1),
    "gaps wrap past 2^32": _reencode(1, lambda s, bl, L: [s[0]] + [s[0] + (i << 31) for i in range(1, len(s))], 32),
    "last slot past the segment": _reencode(-1, lambda s, bl, L: s[:-1] + [L.n_slots]),
    "block 1's slots run into block 2": _reencode(1, lambda s, bl, L: s[:-1] + [bl[2].first]),
    "straddling block's slots run past the next block": lambda L: _reencode_straddler(L),
}


def _reencode_straddler(L):
    w, i, bl = _straddler(L)
    blk = bl[i]
    slots = blk.slots[:-1] + [bl[i + 1].first + 1]
    codes = L.raw[w][blk.at + blk.size - blk.n * L.cb:blk.at + blk.size]
    L.raw[w][blk.at:blk.at + blk.size] = encode_block4(slots, codes)


FORMAT3 = {
    **COMMON,
    "count 256 lower": _count(-256),
    "count 256 higher": _count(+256),
    "Rice parameter 32": _set_width(1, lambda b: 32),
    "Rice parameter 255": _set_width(1, lambda b: 255),
    "unary bytes one more": lambda L: _unary(L, +1),
    "unary bytes one less": lambda L: _unary(L, -1),
}


def _unary(L, delta):
    w = L.longest()
    _, bl = L.parse(w)
    u = struct.unpack_from("<H", L.raw[w], bl[0].at + 5)[0]
    struct.pack_into("<H", L.raw[w], bl[0].at + 5, max(u + delta, 0))


# Format 3's fixture has shorter lists (blocks of 256): its mutations pick blocks 0..2 where they exist.
def craft(src, dst, name, mutations):
    meta, sec, version = read(src)
    cb = _code_bytes(meta)
    L = Lists(meta, sec, version, cb)
    L.n_slots = int(sec["image_ids"].shape[0])
    L.stored = False
    mutations[name](L)
    if not L.stored:
        L.store()
    write(dst, L.meta, L.sec, version)


def _code_bytes(meta):
    from d2r.core.kernels import KERNELS
    return (meta["dim"] + 7) // 8 if KERNELS[meta["kernel"]].binary else 4 * meta["dim"]


# ---- the operations -----------------------------------------------------------------------------

LOADS = [(False, True), (False, False), (True, True), (True, False), (True, "lazy")]


def queries(cb, kind, seed=0):
    """One query holding every word (every list is read), and a batch of three such."""
    import d2r
    rng = np.random.default_rng(seed)
    n = cb.n_words

    def batch(q):
        offsets = np.arange(q + 1, dtype=np.int64) * n
        words = np.tile(np.arange(n, dtype=np.int32), q)
        return d2r.AggregatedBatch(offsets, words, rng.integers(0, 256, (q * n, (cb.dim + 7) // 8), dtype=np.uint8),
                                   fingerprint=cb.fingerprint)
    return batch(1), batch(3)


def _result(x):
    if isinstance(x, dict):
        return {k: np.asarray(v).copy() for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(np.asarray(v).copy() for v in x)
    return np.asarray(x).copy()


def _outcome(f):
    import d2r
    try:
        return ("ok", _result(f()))
    except d2r.IndexFileError as exc:
        return ("error", "IndexFileError", str(exc))
    except Exception as exc:  # noqa: BLE001 - any other exception is an outcome to report
        return ("error", type(exc).__name__, str(exc))


def run_ops(path, kind, other, tmp):
    """{operation: outcome} of every reading operation on the index file `path` in every load mode;
    `other`: an index file to merge it with (disjoint ids)."""
    import d2r
    from d2r.workflows.build import merge_index_files
    out = {}
    cls = d2r.RegionalSearchIndex if kind == "regional" else d2r.Index
    cb = d2r.Index.load(other).codebook
    one, three = queries(cb, kind)
    for mmap, verify in LOADS:
        tag = f"mmap={mmap} verify={verify}"
        holder = {}

        def load():
            holder["idx"] = cls.load(path, mmap=mmap, verify=verify)
            return np.asarray(holder["idx"].ids)
        out[f"{tag} load"] = _outcome(load)
        if "idx" not in holder:
            continue
        idx = holder["idx"]
        for threads in (1, 2):
            d2r.set_num_threads(threads)
            out[f"{tag} search t{threads}"] = _outcome(lambda: idx.search_aggregated(one, k=None))
            out[f"{tag} batched t{threads}"] = _outcome(lambda: idx.search_aggregated(three, k=None))
            if kind != "regional":
                out[f"{tag} score_all t{threads}"] = _outcome(
                    lambda: idx._ivf.score_all(one.offsets, one.words, one.code_bytes, idx.alpha, idx.tau,
                                               idx.normalize))
        d2r.set_num_threads(2)
        out[f"{tag} export"] = _outcome(lambda: idx._ivf.export())

        def save():
            p = Path(tmp) / "resaved.d2r"
            idx.save(p)
            return cls.load(p).search_aggregated(three, k=None)
        out[f"{tag} save"] = _outcome(save)
        out[f"{tag} verify"] = _outcome(lambda: idx.verify())
        out[f"{tag} compact"] = _outcome(lambda: (idx.compact(), *idx.search_aggregated(three, k=None)))
    d2r.set_num_threads(2)

    def merge():
        merged = merge_index_files([path, other], Path(tmp) / "merged.d2r")
        return merged.search_aggregated(three, k=None)
    out["merge"] = _outcome(merge)
    return out


def main(argv):
    out_path, kind, other, tmp, *paths = argv
    results = {}
    for p in paths:
        results[p] = run_ops(p, kind, other, tmp)
        Path(out_path).write_bytes(pickle.dumps(results))   # what is done survives a crash
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
