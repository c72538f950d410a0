"""The posting scan (csrc/scan.h, index format 4): every kernel variant the CPU runs gives scores
bit-identical to the scalar reference (tombstones, several segments, slot tiles, pooled regional
search, batched and single queries, one or two threads); format-3 files load with the scores d2r
gave them; structural corruption of format-4 postings raises IndexFileError even when the checksums
are not consulted."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r import _native
from d2r.core import index_io
from d2r.workflows.synthetic import zipf_images

DATA = Path(__file__).resolve().parents[1] / "data"
VARIANTS = _native.scan_variants()


@pytest.fixture(autouse=True)
def _restore_variant():
    before, threads = _native.scan_variant(), d2r.get_num_threads()
    yield
    _native.set_scan_variant(before)
    d2r.set_num_threads(threads)


def _batch(rng, n, n_words, per, code_bytes, p=None):
    """(offsets, words, codes): n images of up to `per` distinct words (some with none)."""
    p = np.full(n_words, 1.0 / n_words) if p is None else p
    draws = np.sort(rng.choice(n_words, size=(n, per), p=p), axis=1)
    keep = np.ones(draws.shape, bool)
    keep[:, 1:] = draws[:, 1:] != draws[:, :-1]
    keep &= np.arange(per)[None, :] < rng.integers(0, per + 1, size=(n, 1))
    words = draws[keep].astype(np.int32)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum(keep.sum(axis=1))
    codes = rng.integers(0, 256, size=(words.size, code_bytes), dtype=np.uint8)
    return offsets, words, codes


def _zipf(n_words, s=0.9):
    p = np.arange(1, n_words + 1, dtype=np.float64) ** -s
    return p / p.sum()


def _all_variants(fn):
    """fn() under every scan variant and 1 and 2 threads; asserts every result equals the scalar
    one at one thread (arrays compared exactly, float bits included)."""
    out = {}
    for threads in (1, 2):
        d2r.set_num_threads(threads)
        for v in VARIANTS:
            _native.set_scan_variant(v)
            out[(v, threads)] = fn()
    ref = out[("scalar", 1)]
    for key, got in out.items():
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"{key} differs from scalar"
    return ref


def _queries(rng, n, n_words, code_bytes, p=None):
    off, w, c = _batch(rng, n, n_words, 12, code_bytes, p)
    return off, w, c


@pytest.mark.parametrize("dim", [128, 64])
def test_variants_identical_with_segments_and_tombstones(dim):
    rng = np.random.default_rng(1)
    n_words, cb = 48, dim // 8
    p = _zipf(n_words)
    ivf = _native.InvertedFile(n_words, dim, True)
    for n in (1500, 700, 300, 40):   # several segments (geometric sizes keep some apart)
        ivf.add(*_batch(rng, n, n_words, 14, cb, p))
    ivf.remove(np.array([0, 5, 17, 1600, 2100, 2539], np.int64))
    assert ivf.n_segments >= 2
    qo, qw, qc = _queries(rng, 11, n_words, cb, p)

    def run():
        r = [*ivf.search(qo, qw, qc, k=-1), *ivf.search(qo, qw, qc, k=7), *ivf.score_all(qo, qw, qc)]
        for i in range(3):   # one query at a time: split by slot range across the threads
            sub = (qo[i:i + 2] - qo[i], qw[qo[i]:qo[i + 1]], qc[qo[i]:qo[i + 1]])
            r += [*ivf.search(*sub, k=-1), *ivf.search(*sub, k=3, normalize=False)]
        return r

    _all_variants(run)
    ivf.compact()
    _all_variants(run)


def test_variants_identical_across_slot_tiles():
    """More than 65,536 images: the scan runs in several slot tiles, blocks straddle tiles."""
    rng = np.random.default_rng(2)
    n_words = 24
    ivf = _native.InvertedFile(n_words, 128, True)
    ivf.add(*_batch(rng, 70_000, n_words, 4, 16, _zipf(n_words)))
    ivf.add(*_batch(rng, 9_000, n_words, 4, 16, _zipf(n_words)))
    ivf.remove(np.arange(60_000, 66_000, 7, dtype=np.int64))
    qo, qw, qc = _queries(rng, 3, n_words, 16)

    def run():
        r = list(ivf.search(qo, qw, qc, k=50))
        sub = (qo[:2], qw[:qo[1]], qc[:qo[1]])
        return r + list(ivf.search(*sub, k=-1))

    _all_variants(run)


def test_variants_identical_pooled_regional():
    rng = np.random.default_rng(3)
    n_words = 40
    ivf = _native.InvertedFile(n_words, 128, True, True)
    for n in (900, 300):
        off, w, c = _batch(rng, n, n_words, 10, 16, _zipf(n_words))
        auto = np.repeat(np.arange(n // 3), 3).astype(np.int64)   # 3 regions per image
        ivf.add(off, w, c, auto_index=auto)
    ivf.remove(ivf.image_ids()[:4])
    qo, qw, qc = _queries(rng, 5, n_words, 16)
    _all_variants(lambda: [*ivf.search_pooled(qo, qw, qc, mean=False, k=-1),
                           *ivf.search_pooled(qo, qw, qc, mean=True, k=9)])


def test_variants_identical_through_saved_and_mapped_index(tmp_path):
    """The public API: an index saved (format 4) and memory-mapped ranks like the in-memory one,
    under every variant, batched and one query at a time."""
    cb = d2r.Codebook(np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32))
    idx = d2r.Index(cb, "asmk*")
    idx.add_aggregated(zipf_images(1200, 256, 60, 0.5, seed=4, fingerprint=cb.fingerprint))
    idx.save(tmp_path / "i.d2r")
    assert struct.unpack_from("<I", (tmp_path / "i.d2r").read_bytes(), 8)[0] == 4 == index_io.FORMAT_VERSION
    mapped = d2r.Index.load(tmp_path / "i.d2r", mmap=True)
    qs = list(zipf_images(9, 256, 60, 0.5, seed=5, fingerprint=cb.fingerprint))

    def run():
        r = [*mapped.search_aggregated(qs, k=None), *idx.search_aggregated(qs, k=20)]
        return r + [*mapped.search_aggregated(qs[0], k=None)]

    ref = _all_variants(run)
    mem = idx.search_aggregated(qs, k=None)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mem, ref[:2]))


def test_format3_file_loads_with_its_scores():
    """tests/data/format3.d2r was written by d2r at commit 125be59 (index format 3, Golomb-Rice
    coded gaps) with the results that version gave (format3_expected.npz, made by
    tests/data/make_format3.py): the postings are converted to format 4 as the file loads and give
    the same scores, under every variant; saving writes format 4."""
    exp = np.load(DATA / "format3_expected.npz")
    assert struct.unpack_from("<I", (DATA / "format3.d2r").read_bytes(), 8)[0] == 3
    cb = None
    for mmap in (False, True):
        idx = d2r.Index.load(DATA / "format3.d2r", mmap=mmap)
        cb = idx.codebook
        qs = list(zipf_images(6, cb.n_words, 80, 0.6, seed=11, fingerprint=cb.fingerprint))

        def run():
            return list(idx.search_aggregated(qs, k=None))

        got = _all_variants(run)
        ids_first = np.asarray(got[0]).dtype.kind in "iu"
        ids, scores = (got[0], got[1]) if ids_first else (got[1], got[0])
        assert np.array_equal(np.asarray(ids), exp["ids"])
        assert np.array_equal(np.asarray(scores).view(np.uint32), exp["scores"].view(np.uint32))


# ---- structural corruption of format-4 postings -------------------------------------------------

def _lists(path):
    """(raw file bytes, offset of the postings section, word_offsets, n_slots)."""
    raw = bytearray(Path(path).read_bytes())
    meta, sec, _ = index_io.read_index_file(path, mmap=False, verify=False)
    _, _, hlen, _ = struct.unpack_from("<8sIII", raw, 0)
    import json
    header = json.loads(raw[20:20 + hlen])
    post = next(s for s in header["sections"] if s["name"] == "postings")
    return raw, post["offset"], np.asarray(sec["word_offsets"], np.int64), int(sec["image_ids"].shape[0])


def _blocks(raw, base, wo, w, cb=16):
    """[(offset of the block in raw, n, first, width)] of word w's list, and the list's count offset."""
    p = base + int(wo[w])
    count, shift, start = 0, 0, p
    while True:
        byte = raw[p]
        p += 1
        count |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    out, left = [], count
    while left > 0:
        n = min(128, left)
        first, b = struct.unpack_from("<IB", raw, p)
        out.append((p, n, first, b))
        p += 5 + 16 * ((((n + 3) // 4) * b + 31) // 32) + n * cb
        left -= n
    assert p == base + int(wo[w + 1])
    return out, start


@pytest.fixture(scope="module")
def saved4(tmp_path_factory):
    cb = d2r.Codebook(np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32))
    idx = d2r.Index(cb, "asmk*")
    idx.add_aggregated(zipf_images(3000, 32, 20, 0.3, seed=6, fingerprint=cb.fingerprint))
    path = tmp_path_factory.mktemp("scan") / "c.d2r"
    idx.save(path)
    return path


def _corrupt(saved4, tmp_path, mutate):
    raw, base, wo, n_slots = _lists(saved4)
    sizes = np.diff(wo)
    w = int(np.argmax(sizes))
    blocks, count_at = _blocks(raw, base, wo, w)
    assert len(blocks) >= 4
    mutate(raw, blocks, count_at, n_slots)
    out = tmp_path / "bad.d2r"
    out.write_bytes(bytes(raw))
    return out, w


def _set_first(i, value):
    def m(raw, blocks, count_at, n_slots):
        struct.pack_into("<I", raw, blocks[i][0], value(blocks, n_slots))
    return m


MUTATIONS = {
    "width above 32": lambda raw, bl, c, n: raw.__setitem__(bl[1][0] + 4, 33),
    "first slot outside the segment": _set_first(0, lambda bl, n: n + 5),
    "blocks not ascending": _set_first(2, lambda bl, n: bl[1][2]),
    "next block inside a skipped block": _set_first(2, lambda bl, n: bl[1][2] + 1),
    "last block past the segment": lambda raw, bl, c, n: raw.__setitem__(
        slice(bl[-2][0] + 5, bl[-2][0] + 5 + 16 * ((32 * bl[-2][3] + 31) // 32)),
        b"\xff" * (16 * ((32 * bl[-2][3] + 31) // 32))),
    "count one more": lambda raw, bl, c, n: raw.__setitem__(c, raw[c] + 1 if raw[c] & 0x7F != 0x7F else raw[c]),
    "count one less": lambda raw, bl, c, n: raw.__setitem__(c, raw[c] - 1 if raw[c] & 0x7F else raw[c]),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
@pytest.mark.parametrize("mmap", [False, True])
def test_structural_corruption_raises(saved4, tmp_path, name, mmap):
    """With the checksums not consulted (verify=False), a list whose structure is wrong raises
    IndexFileError from the load or from the first search that reads it, under every variant,
    one or two threads (two: the second thread skips blocks below its slot range), never an answer."""
    path, w = _corrupt(saved4, tmp_path, MUTATIONS[name])
    cb = d2r.Index.load(saved4).codebook
    q = d2r.AggregatedBatch(np.array([0, 1], np.int64), np.array([w], np.int32),
                            np.zeros((1, 16), np.uint8), fingerprint=cb.fingerprint)
    for threads in (1, 2):
        d2r.set_num_threads(threads)
        for v in VARIANTS:
            _native.set_scan_variant(v)
            with pytest.raises(d2r.IndexFileError):
                idx = d2r.Index.load(path, mmap=mmap, verify=False)
                idx.search_aggregated(q, k=None)
