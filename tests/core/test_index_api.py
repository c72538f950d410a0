"""The Index API: adding and removing images, ids, persistence (atomic saves, corrupt / truncated /
foreign / newer files), and input validation. Nothing here may crash the interpreter."""
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

import d2r
import d2r.core.index_io

from support import World

DIM = 32
STATS_KEYS = {"kernel", "images", "entries", "postings", "words_per_image", "code_bytes", "bytes",
              "bytes_per_image"}


@pytest.fixture(scope="module")
def world():
    return World(seed=5, dim=DIM, n_objects=10, words_per_object=5)


@pytest.fixture(scope="module")
def data(world):
    w = world
    imgs = [w.image() for _ in range(40)]
    imgs[7] = np.zeros((0, DIM), np.float32)  # an empty image among the others
    ids = np.random.default_rng(1).choice(10**6, size=len(imgs), replace=False).astype(np.int64)
    queries = [w.image(objects=[o, o + 1]) for o in range(0, 8, 2)]
    return imgs, ids, queries


def by_id(scores, ids):
    return {int(i): float(s) for s, i in zip(scores, ids)}


def assert_same_results(a, b, queries, exact=False):
    """Two indexes give the same full rankings and the same scores per id."""
    assert len(a) == len(b)
    assert set(a.ids.tolist()) == set(b.ids.tolist())
    sa, ia = a.search(queries, k=None)
    sb, ib = b.search(queries, k=None)
    np.testing.assert_array_equal(ia, ib)
    if exact:
        np.testing.assert_array_equal(sa, sb)
    else:
        np.testing.assert_allclose(sa, sb, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# add / remove


@pytest.mark.parametrize("kernel", ["asmk", "asmk*", "rasmk*"])
def test_incremental_add_remove_equals_fresh_build(world, data, kernel):
    imgs, ids, queries = data
    cb = world.codebook

    def add(idx, sel):
        sel = list(sel)
        if kernel == "rasmk*":
            idx.add_regions_many([[imgs[i], imgs[i][:4]] for i in sel], image_ids=ids[sel])
        else:
            idx.add([imgs[i] for i in sel], image_ids=ids[sel])

    inc = d2r.Index(cb, kernel=kernel)
    add(inc, range(0, 15))
    add(inc, range(15, 30))
    assert inc.remove(ids[[2, 17, 5]]) == 3
    add(inc, range(30, 40))
    assert inc.remove([ids[31], ids[0], ids[7]]) == 3
    inc.remove(np.array([], np.int64))
    removed = {2, 17, 5, 31, 0, 7}
    keep = [i for i in range(40) if i not in removed]
    fresh = d2r.Index(cb, kernel=kernel)
    add(fresh, keep)
    assert len(inc) == len(fresh) == len(keep)
    assert inc.stats()["postings"] == fresh.stats()["postings"]
    for i in removed:
        assert ids[i] not in inc
    assert_same_results(inc, fresh, queries)
    s_inc, i_inc = inc.score_all(queries)
    s_fr, i_fr = fresh.score_all(queries)
    for q in range(len(queries)):
        assert by_id(s_inc[q], i_inc) == pytest.approx(by_id(s_fr[q], i_fr), rel=1e-6, abs=1e-7)
    # a removed id can be used again
    add(inc, [2])
    assert ids[2] in inc and len(inc) == len(keep) + 1
    # removing everything leaves an empty, searchable index
    inc.remove(inc.ids)
    assert len(inc) == 0 and inc.stats()["postings"] == 0
    s, i = inc.search(queries[0], k=None)
    assert s.shape == (0,) and i.shape == (0,)


def test_add_forms_are_equal(world, data):
    imgs, ids, queries = data
    imgs = [x for x in imgs if len(x)]  # an empty image added on its own: see test_zero_descriptor_image_added_alone
    cb = world.codebook
    as_list = d2r.Index(cb, kernel="asmk")
    as_list.add(imgs)
    with_offsets = d2r.Index(cb, kernel="asmk")
    offsets = np.cumsum([0] + [len(x) for x in imgs])
    with_offsets.add(np.concatenate(imgs), offsets=offsets)
    one_by_one = d2r.Index(cb, kernel="asmk")
    got_ids = [int(one_by_one.add(x)[0]) for x in imgs[:7]]
    got_ids += [int(one_by_one.add([x])[0]) for x in imgs[7:]]
    aggregated = d2r.Index(cb, kernel="asmk")
    aggregated.add_aggregated([aggregated.aggregate(x) for x in imgs])
    assert got_ids == list(range(len(imgs)))
    for other in (with_offsets, one_by_one, aggregated):
        np.testing.assert_array_equal(other.ids, as_list.ids)
        assert_same_results(as_list, other, queries, exact=True)
        s1, _ = as_list.score_all(queries)
        s2, _ = other.score_all(queries)
        np.testing.assert_array_equal(s1, s2)


def test_ids_default_and_custom(world, data):
    imgs, ids, queries = data
    idx = d2r.Index(world.codebook)
    got = idx.add(imgs[:3])
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [0, 1, 2])
    np.testing.assert_array_equal(idx.add(imgs[3]), [3])
    big = np.array([2**40, 7], dtype=np.int64)
    np.testing.assert_array_equal(idx.add(imgs[4:6], image_ids=big), big)
    np.testing.assert_array_equal(idx.add(imgs[6]), [2**40 + 1])   # after the largest id so far
    np.testing.assert_array_equal(idx.add(imgs[8:10], image_ids=np.array([11, 12], np.int32)), [11, 12])
    assert len(idx) == 9
    np.testing.assert_array_equal(idx.ids, [0, 1, 2, 3, 2**40, 7, 2**40 + 1, 11, 12])
    s, i = idx.search(imgs[4], k=1)
    assert i.dtype == np.int64 and i[0] == 2**40
    assert 2**40 in idx and 5 not in idx


def test_bad_ids_raise_and_leave_index_unchanged(world, data):
    imgs, ids, queries = data
    idx = d2r.Index(world.codebook)
    idx.add(imgs[:4], image_ids=[10, 11, 12, 13])
    before = idx.search(queries, k=None)
    with pytest.raises(ValueError):
        idx.add(imgs[4:6], image_ids=[20, 20])         # duplicate within the call
    with pytest.raises(ValueError):
        idx.add(imgs[4:6], image_ids=[21, 11])         # already indexed
    with pytest.raises(ValueError):
        idx.add(imgs[4:6], image_ids=[22, -1])         # negative
    with pytest.raises(ValueError):
        idx.add(imgs[4:6], image_ids=[23])             # wrong count
    with pytest.raises(ValueError):
        idx.add_aggregated([idx.aggregate(imgs[4])], image_ids=[-5])
    with pytest.raises(TypeError):
        idx.add(imgs[4:6], image_ids=[1.5, 2.5])
    with pytest.raises(KeyError):
        idx.remove([999])
    with pytest.raises(KeyError):
        idx.remove([10, 999])                          # nothing removed when one id is unknown
    assert len(idx) == 4
    after = idx.search(queries, k=None)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize("cls", ["Index", "RegionalSearchIndex"])
def test_add_is_atomic_across_aggregation_chunks(world, data, monkeypatch, cls):
    """An add whose aggregation fails in a later internal chunk indexes nothing (before, the first
    chunk stayed indexed)."""
    imgs, ids, queries = data
    idx = getattr(d2r, cls)(world.codebook)
    idx.add(imgs[:5])
    before = idx.search(queries, k=None)
    monkeypatch.setattr(d2r.core.index, "_CHUNK_DESCRIPTORS", 64)   # several chunks for the next add
    real, calls = d2r.core.aggregate.aggregate_images, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("injected in the third chunk")
        return real(*args, **kwargs)

    monkeypatch.setattr(d2r.core.aggregate, "aggregate_images", failing)   # what the CPU backend calls
    with pytest.raises(MemoryError):
        idx.add(imgs[5:30])
    assert len(calls) == 3 and len(idx) == 5 and idx._next_id == 5
    after = idx.search(queries, k=None)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    monkeypatch.setattr(d2r.core.aggregate, "aggregate_images", real)
    assert idx.add(imgs[5:7]).tolist() == [5, 6]


@pytest.mark.parametrize("cls,kernel", [("Index", "asmk*"), ("Index", "asmk"), ("RegionalSearchIndex", "asmk*")])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_empty_index(tmp_path, world, cls, kernel, mmap):
    idx = getattr(d2r, cls)(world.codebook, kernel=kernel)
    idx.save(tmp_path / "empty.d2r")
    got = d2r.Index.load(tmp_path / "empty.d2r", mmap=mmap)
    assert type(got).__name__ == cls and len(got) == 0 and got.ids.size == 0
    s, i = got.search(world.image(), k=None)
    assert s.size == 0 and i.size == 0
    assert got.add([world.image()]).tolist() == [0]


def test_len_and_stats(world, data):
    imgs, ids, queries = data
    for kernel in ("asmk", "asmk*", "rasmk"):
        idx = d2r.Index(world.codebook, kernel=kernel)
        assert len(idx) == 0
        st = idx.stats()
        assert STATS_KEYS <= set(st)
        assert st["images"] == 0 and st["postings"] == 0
        idx.add(imgs[:10])
        st = idx.stats()
        assert len(idx) == 10 and st["images"] == 10
        n_words = sum(len(idx.aggregate(x)) for x in imgs[:10])
        assert st["postings"] == n_words
        assert st["words_per_image"] == pytest.approx(n_words / 10)
        assert st["code_bytes"] == (DIM // 8 if kernel.endswith("*") else 4 * DIM)
        assert st["bytes"] > 0 and st["bytes_per_image"] == pytest.approx(st["bytes"] / 10)
    r = d2r.RegionalSearchIndex(world.codebook, kernel="asmk")
    r.add_regions_many([[x, x[:3]] for x in imgs[:5]])
    st = r.stats()
    assert STATS_KEYS <= set(st)
    assert len(r) == 5 and st["images"] == 5 and st["entries"] == 10


# ------------------------------------------------------------------------------------------------
# zero-descriptor images (METHOD.md section 4: an image with no words scores -1)


@pytest.mark.parametrize("kernel", ["asmk", "asmk*"])
def test_zero_descriptor_image_in_a_batch(world, data, kernel):
    imgs, ids, queries = data
    idx = d2r.Index(world.codebook, kernel=kernel)
    idx.add([imgs[0], np.zeros((0, DIM), np.float32), imgs[1]])
    s, i = idx.score_all(queries[0])
    assert s[1] == -1.0


@pytest.mark.parametrize("kernel", ["asmk", "asmk*"])
def test_zero_descriptor_image_added_alone(world, data, kernel):
    """A batch in which no image has a word (here: one empty image) must be accepted."""
    imgs, ids, queries = data
    idx = d2r.Index(world.codebook, kernel=kernel)
    idx.add(imgs[:3])
    new = idx.add(np.zeros((0, DIM), np.float32))
    assert len(idx) == 4
    s, i = idx.search(queries[0], k=None)
    assert i[-1] == new[0] and s[-1] == -1.0
    idx.add_aggregated(idx.aggregate(np.zeros((0, DIM), np.float32)))
    assert len(idx) == 5


@pytest.mark.parametrize("kernel", ["asmk", "asmk*"])
def test_zero_descriptor_query_scores_minus_one(world, data, kernel):
    """A query with no words scores -1 against every image; the full ranking is then by id."""
    imgs, ids, queries = data
    idx = d2r.Index(world.codebook, kernel=kernel)
    idx.add(imgs[:5], image_ids=[9, 3, 7, 1, 5])
    empty = np.zeros((0, DIM), np.float32)
    s, i = idx.search(empty, k=None)
    np.testing.assert_array_equal(s, -1.0)
    np.testing.assert_array_equal(i, [1, 3, 5, 7, 9])
    s_all, _ = idx.score_all(empty)
    np.testing.assert_array_equal(s_all, -1.0)


def test_zero_descriptor_query_in_a_list(world, data):
    imgs, ids, queries = data
    idx = d2r.Index(world.codebook, kernel="asmk*")
    idx.add(imgs[:5], image_ids=[9, 3, 7, 1, 5])
    s, i = idx.search([np.zeros((0, DIM), np.float32), queries[0]], k=None)
    np.testing.assert_array_equal(s[0], -1.0)
    np.testing.assert_array_equal(i[0], [1, 3, 5, 7, 9])


# ------------------------------------------------------------------------------------------------
# RegionalSearchIndex bookkeeping


def test_regional_search_index_remove_updates_len_and_ids(world, data):
    imgs, ids, queries = data
    r = d2r.RegionalSearchIndex(world.codebook, kernel="asmk")
    r.add_regions_many([[x, x[:3]] for x in imgs[:4]], image_ids=[0, 1, 2, 3])
    r.remove([1])
    assert 1 not in r
    assert -1 not in r
    np.testing.assert_array_equal(np.sort(r.ids), [0, 2, 3])
    assert len(r) == 3
    assert r.stats()["images"] == 3
    s, i = r.search(queries[0], k=None)
    np.testing.assert_array_equal(np.sort(i), [0, 2, 3])


def test_regional_search_index_default_ids_consecutive(world, data):
    imgs, ids, queries = data
    r = d2r.RegionalSearchIndex(world.codebook, kernel="asmk")
    np.testing.assert_array_equal(r.add_regions_many([[x, x[:3]] for x in imgs[:4]]), [0, 1, 2, 3])
    np.testing.assert_array_equal(r.add(imgs[4]), [4])


# ------------------------------------------------------------------------------------------------
# save / load


def _build(world, data, kernel="asmk*", **kw):
    imgs, ids, queries = data
    idx = d2r.Index(world.codebook, kernel=kernel, **kw)
    if d2r.KERNELS[kernel].regional:
        idx.add_regions_many([[x, x[:5]] for x in imgs], image_ids=ids)
    else:
        idx.add(imgs, image_ids=ids)
    idx.remove(ids[[3, 4]])
    return idx


@pytest.mark.parametrize("kernel,kw", [("asmk*", {}), ("asmk", {"alpha": 1.5, "tau": 0.1, "normalize": False}),
                                       ("rasmk*", {"normalize": False}), ("naive-rasmk", {"m_db": 2})])
def test_save_load_round_trip(tmp_path, world, data, kernel, kw):
    imgs, ids, queries = data
    idx = _build(world, data, kernel, **kw)
    path = tmp_path / "index.d2r"
    idx.save(path)
    assert os.listdir(tmp_path) == ["index.d2r"]      # no temporary files left
    want_s, want_i = idx.search(queries, k=None)
    want_all, want_ids = idx.score_all(queries)
    for mmap in (False, True):
        for verify in (False, True):
            got = d2r.Index.load(path, mmap=mmap, verify=verify)
            assert type(got) is d2r.Index
            assert (got.kernel, got.alpha, got.tau, got.normalize, got.m_db, got.m_query) == \
                   (idx.kernel, idx.alpha, idx.tau, idx.normalize, idx.m_db, idx.m_query)
            assert len(got) == len(idx)
            np.testing.assert_array_equal(got.codebook.centroids, idx.codebook.centroids)
            s, i = got.search(queries, k=None)
            np.testing.assert_array_equal(i, want_i)
            np.testing.assert_array_equal(s, want_s)
            s_all, i_all = got.score_all(queries)
            np.testing.assert_array_equal(i_all, want_ids)
            np.testing.assert_array_equal(s_all, want_all)
            del got
    # a loaded (memory-mapped) index stays usable: add, remove, default ids continue
    got = d2r.Index.load(path, mmap=True)
    new = got.add(imgs[3])
    assert new[0] == ids.max() + 1
    got.remove(ids[[0]])
    assert len(got) == len(idx)


def test_save_load_regional_search_index(tmp_path, world, data):
    imgs, ids, queries = data
    r = d2r.RegionalSearchIndex(world.codebook, kernel="asmk*", pooling="mean", tau=0.05)
    r.add_regions_many([[x, x[:5]] for x in imgs[:10]], image_ids=ids[:10])
    path = tmp_path / "regional.d2r"
    r.save(path)
    for loader in (d2r.Index.load, d2r.RegionalSearchIndex.load):
        got = loader(path, mmap=True)
        assert type(got) is d2r.RegionalSearchIndex and got.pooling == "mean"
        s, i = got.search(queries, k=None)
        s0, i0 = r.search(queries, k=None)
        np.testing.assert_array_equal(i, i0)
        np.testing.assert_array_equal(s, s0)
    plain = tmp_path / "plain.d2r"
    _build(world, data).save(plain)
    with pytest.raises(d2r.IndexFileError):
        d2r.RegionalSearchIndex.load(plain)


def test_save_overwrites_atomically(tmp_path, world, data):
    imgs, ids, queries = data
    path = tmp_path / "index.d2r"
    small = d2r.Index(world.codebook)
    small.add(imgs[:3])
    small.save(path)
    mapped = d2r.Index.load(path, mmap=True)          # a memory-mapped reader of the old file ...
    big = _build(world, data)
    big.save(path)                                     # ... while the file is replaced
    assert os.listdir(tmp_path) == ["index.d2r"]
    assert len(d2r.Index.load(path)) == len(big)
    assert len(mapped) == 3                            # the old mapping still reads the old content
    s, i = mapped.search(queries[0], k=None)
    s0, i0 = small.search(queries[0], k=None)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(i, i0)


class _FailingWrites:
    """A file object whose third write raises (a disk filling up midway)."""

    def __init__(self, f):
        self._f = f
        self._n = 0

    def write(self, data):
        self._n += 1
        if self._n >= 3:
            raise OSError(28, "No space left on device (simulated)")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


@pytest.mark.parametrize("failure", ["write", "fsync", "replace"])
def test_failed_save_keeps_old_file(tmp_path, world, data, monkeypatch, failure):
    imgs, ids, queries = data
    path = tmp_path / "index.d2r"
    old = d2r.Index(world.codebook)
    old.add(imgs[:5])
    old.save(path)
    old_bytes = path.read_bytes()
    new = _build(world, data)
    import d2r.core.atomic as atomic  # every file d2r writes goes through atomic_write

    if failure == "write":
        real_fdopen = atomic.os.fdopen

        def failing_fdopen(fd, mode="r", *a, **k):
            f = real_fdopen(fd, mode, *a, **k)
            return _FailingWrites(f) if "w" in mode else f

        monkeypatch.setattr(atomic.os, "fdopen", failing_fdopen)
    elif failure == "fsync":
        def boom(fd):
            raise OSError(5, "I/O error (simulated)")
        monkeypatch.setattr(atomic.os, "fsync", boom)
    else:
        def boom(src, dst):
            raise OSError(5, "rename failed (simulated)")
        monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        new.save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["index.d2r"]       # the temporary file was cleaned up
    assert path.read_bytes() == old_bytes
    got = d2r.Index.load(path)
    assert len(got) == 5
    s, i = got.search(queries[0], k=None)
    s0, i0 = old.search(queries[0], k=None)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(i, i0)


# ---- corrupt files -------------------------------------------------------------------------------


def _layout(path):
    b = Path(path).read_bytes()
    _, version, hlen, _ = struct.unpack("<8sIII", b[:20])
    header = json.loads(b[20:20 + hlen])
    return b, hlen, {s["name"]: s for s in header["sections"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, world, data):
    path = tmp_path_factory.mktemp("saved") / "index.d2r"
    _build(world, data, "asmk").save(path)
    return path


def _expect_file_error(path, *words, **kw):
    with pytest.raises(d2r.IndexFileError) as err:
        d2r.Index.load(path, **kw)
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert str(path) in msg
    assert any(wd in msg.lower() for wd in words), msg
    return msg


@pytest.mark.parametrize("section", ["centroids", "image_ids", "word_counts", "word_offsets", "postings", "page_crc"])
@pytest.mark.parametrize("mmap", [False, True])
def test_flipped_byte_in_section_detected(tmp_path, saved, section, mmap):
    b, hlen, sec = _layout(saved)
    b = bytearray(b)
    s = sec[section]
    pos = s["offset"] + s["nbytes"] // 2
    b[pos] ^= 0x10
    path = tmp_path / "flipped.d2r"
    path.write_bytes(bytes(b))
    msg = _expect_file_error(path, "checksum", "corrupt", mmap=mmap, verify=True)
    assert section in msg


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_flipped_posting_byte_found_lazily(tmp_path, saved, data, where):
    """A memory-mapped load checks the postings page by page as searches read them (verify="lazy",
    its default): the load succeeds without reading them, the first search that reads the damaged
    page raises IndexFileError naming the page, and verify() finds it without a search."""
    b, hlen, sec = _layout(saved)
    b = bytearray(b)
    s = sec["postings"]
    b[s["offset"] + int(s["nbytes"] * where)] ^= 0x01
    path = tmp_path / "lazy.d2r"
    path.write_bytes(bytes(b))
    idx = d2r.Index.load(path, mmap=True)            # verify="lazy": loads
    with pytest.raises(d2r.IndexFileError, match="checksum mismatch in postings page") as err:
        idx.verify()
    assert str(err.value).startswith(f"{path}: "), err.value   # the error names the file (issue 26)
    idx = d2r.Index.load(path, mmap=True)
    with pytest.raises(d2r.IndexFileError, match="postings page") as err:
        idx.search(data[0], k=None)                  # the database images as queries read every list
    assert str(err.value).startswith(f"{path}: "), err.value
    clean = d2r.Index.load(saved, mmap=True)
    assert clean.verify() == s["nbytes"]


def test_flipped_byte_in_header_detected(tmp_path, saved):
    b = bytearray(saved.read_bytes())
    b[30] ^= 0x01
    path = tmp_path / "h.d2r"
    path.write_bytes(bytes(b))
    _expect_file_error(path, "checksum", "corrupt")
    _expect_file_error(path, "checksum", "corrupt", verify=False)
    b = bytearray(saved.read_bytes())
    b[2] ^= 0x01                                        # the magic
    path.write_bytes(bytes(b))
    _expect_file_error(path, "not a d2r index")


def test_truncated_files(tmp_path, saved):
    b, hlen, sec = _layout(saved)
    last = max(sec.values(), key=lambda s: s["offset"])
    cuts = [0, 5, 12, 19, 20 + hlen // 2, last["offset"] + 1, len(b) - 1]
    for n in cuts:
        path = tmp_path / f"cut{n}.d2r"
        path.write_bytes(b[:n])
        for mmap in (False, True):
            for verify in (False, True):
                _expect_file_error(path, "truncated", "not a d2r index", "corrupt", mmap=mmap, verify=verify)


def test_foreign_files(tmp_path):
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    npy = tmp_path / "array.npy"
    np.save(npy, np.arange(100, dtype=np.float32).reshape(10, 10))
    text = tmp_path / "notes.txt"
    text.write_text("D2R is not this file\n" * 10)
    for path in (rnd, npy, text):
        _expect_file_error(path, "not a d2r index")
    with pytest.raises(FileNotFoundError):
        d2r.Index.load(tmp_path / "missing.d2r")


def test_newer_format_version(tmp_path, saved):
    b = bytearray(saved.read_bytes())
    b[8:12] = struct.pack("<I", d2r.core.index_io.FORMAT_VERSION + 1)
    path = tmp_path / "newer.d2r"
    path.write_bytes(bytes(b))
    msg = _expect_file_error(path, "newer")
    assert "upgrade" in msg.lower() or "version" in msg.lower()


def test_corrupt_files_never_crash(tmp_path, saved):
    """verify=False skips the checksums: flipped bytes in the posting structures and crafted but
    self-consistent headers must raise IndexFileError (at load, or from the first operation that
    decodes a damaged list) or load into a usable index, never crash.
    Run in a child process so that a crash shows up as a test failure."""
    script = textwrap.dedent(f"""
        import json, struct, zlib, sys
        import numpy as np
        import d2r
        src = {str(saved)!r}
        b0 = open(src, "rb").read()
        _, ver, hlen, _ = struct.unpack("<8sIII", b0[:20])
        header = json.loads(b0[20:20 + hlen])
        rng = np.random.default_rng(0)
        q = rng.standard_normal((20, {DIM})).astype(np.float32)
        out = {str(tmp_path / "c.d2r")!r}
        n_loaded = n_err = n_late = 0

        def attempt(data):
            global n_loaded, n_err, n_late
            open(out, "wb").write(data)
            try:
                idx = d2r.Index.load(out, verify=False)
            except d2r.IndexFileError:
                n_err += 1
                return
            n_loaded += 1
            try:   # a damaged posting list is found when it is decoded
                idx.search(q, k=None)
                idx.score_all(q)
                idx.add(q)
                idx.remove(idx.ids[:2])
                idx.search(q, k=3)
                idx.compact()
                idx.search(q, k=3)
            except d2r.IndexFileError:
                n_late += 1

        for s in header["sections"]:
            if s["nbytes"] == 0:
                continue
            for _ in range(12):
                b = bytearray(b0)
                pos = s["offset"] + int(rng.integers(0, s["nbytes"]))
                b[pos] ^= int(rng.integers(1, 256))
                attempt(bytes(b))
            # extreme values in the integer sections
            if s["name"] in ("word_offsets", "word_counts", "image_ids", "page_crc"):
                dt = np.dtype(s["dtype"])
                for val in (np.iinfo(dt).max, np.iinfo(dt).min, 0, 1):
                    arr = np.frombuffer(b0[s["offset"]:s["offset"] + s["nbytes"]], dt).copy()
                    arr[int(rng.integers(0, arr.size))] = val
                    b = bytearray(b0)
                    b[s["offset"]:s["offset"] + s["nbytes"]] = arr.tobytes()
                    attempt(bytes(b))

        # crafted headers with a valid checksum: sections made shorter (nbytes consistent)
        for name in ("image_ids", "word_counts", "word_offsets", "postings", "page_crc"):
            h = json.loads(b0[20:20 + hlen])
            for s in h["sections"]:
                if s["name"] == name and s["shape"][0] > 1:
                    s["shape"][0] -= 1
                    s["nbytes"] = int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize
            hb = json.dumps(h, sort_keys=True).encode()
            hb = hb + b" " * (hlen - len(hb)) if len(hb) <= hlen else None
            if hb is not None:
                attempt(struct.pack("<8sIII", b"D2RINDEX", ver, hlen, zlib.crc32(hb)) + hb + b0[20 + hlen:])
        print("loaded", n_loaded, "errors", n_err, "late", n_late)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(d2r.__file__).parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"child exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    loaded, errors = int(proc.stdout.split()[1]), int(proc.stdout.split()[3])
    assert errors > 30, proc.stdout   # most corruptions are detected at load time


# ------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_descriptor_inputs(world, data):
    imgs, ids, queries = data
    cb = world.codebook
    idx = d2r.Index(cb, kernel="asmk*")
    idx.add(imgs[:5])
    good = imgs[0]
    ints = (good * 100).astype(np.int32)
    wrong_dim = np.zeros((4, DIM + 1), np.float32)
    three_d = np.zeros((2, 3, DIM), np.float32)
    nan = good.copy()
    nan[1, 3] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    calls = {
        "add": lambda x: idx.add(x),
        "add list": lambda x: idx.add([good, x]),
        "search": lambda x: idx.search(x),
        "search list": lambda x: idx.search([good, x]),
        "score_all": lambda x: idx.score_all(x),
        "aggregate": lambda x: d2r.aggregate(x, cb, "asmk"),
        "regions": lambda x: d2r.aggregate([good, x], cb, "rasmk"),
        "vlad": lambda x: d2r.vlad(x, cb),
        "quantize": lambda x: cb.quantize(x),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError):
            call(ints)
        with pytest.raises(TypeError):
            call(good.astype(np.float16))
        for bad in (wrong_dim, three_d, nan, inf):
            with pytest.raises(ValueError):
                call(bad)
    assert len(idx) == 5
    with pytest.raises(TypeError):
        d2r.Codebook(np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError):
        d2r.Codebook(np.full((4, 4), np.nan, np.float32))


@pytest.mark.parametrize("kernel", ["asmk", "asmk*"])
def test_float64_equals_float32(world, data, kernel):
    imgs, ids, queries = data
    a = d2r.Index(world.codebook, kernel=kernel)
    a.add(imgs)
    b = d2r.Index(world.codebook, kernel=kernel)
    b.add([x.astype(np.float64) for x in imgs])
    assert_same_results(a, b, queries, exact=True)
    s1, i1 = a.search([q.astype(np.float64) for q in queries], k=None)
    s2, i2 = a.search(queries, k=None)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(i1, i2)
    # a float64 codebook is the float32 codebook
    c64 = d2r.Codebook(world.centroids.astype(np.float64))
    np.testing.assert_array_equal(c64.centroids, world.codebook.centroids)


def test_bad_k_and_empty_lists(world, data):
    imgs, ids, queries = data
    idx = d2r.Index(world.codebook)
    idx.add(imgs[:5])
    for k in (0, -1):
        with pytest.raises(ValueError):
            idx.search(queries[0], k=k)
        with pytest.raises(ValueError):
            idx.search_aggregated(idx.aggregate(queries[0], query=True), k=k)
    for call in (lambda: idx.add([]), lambda: idx.search([]), lambda: idx.score_all([]),
                 lambda: idx.add_aggregated([])):
        with pytest.raises(ValueError):
            call()
    r = d2r.Index(world.codebook, kernel="rasmk*")
    with pytest.raises(ValueError):
        r.add_regions_many([])
    with pytest.raises(ValueError):
        r.add_regions([])                           # an image needs at least one region
    assert len(idx) == 5 and len(r) == 0


def test_m_larger_than_n_words(world, data):
    imgs, ids, queries = data
    small = d2r.Codebook(world.centroids[:4])
    x = imgs[0]
    with pytest.raises(ValueError):
        d2r.Index(small, m_db=5)
    with pytest.raises(ValueError):
        d2r.Index(small, m_query=5)
    with pytest.raises(ValueError):
        small.quantize(x, m=5)
    with pytest.raises(ValueError):
        d2r.aggregate(x, small, "asmk", m=5)
    with pytest.raises(ValueError):
        d2r.aggregate([x, x[:3]], small, "rasmk", m=5)
    with pytest.raises(ValueError):
        d2r.vlad(x, small, m=5)
    for m in (0, -2):
        with pytest.raises(ValueError):
            small.quantize(x, m=m)
    ids4, _ = small.quantize(x, m=4)                  # m = n_words is fine: every word, sorted
    assert sorted(ids4[0].tolist()) == [0, 1, 2, 3]


def test_bad_regions(world, data):
    imgs, ids, queries = data
    cb = world.codebook
    x = imgs[0]
    n = len(x)
    with pytest.raises(ValueError):
        d2r.Regions(x, np.array([0, 3, n + 1]))                         # offsets past the end
    with pytest.raises(ValueError):
        d2r.Regions(x, np.array([0, 5, 3, n]))                          # decreasing
    with pytest.raises(ValueError):
        d2r.Regions(x, np.array([0, 2]), np.array([0, n]))              # member out of range
    with pytest.raises(ValueError):
        d2r.Regions(x, np.array([0, 2]), np.array([-1, 0]))
    with pytest.raises(ValueError):
        d2r.aggregate((x, np.array([0, 3, n]), 3), cb, "rasmk")         # n_regions mismatch
    with pytest.raises(ValueError):
        d2r.Index(cb, kernel="asmk").add_regions([x])                   # not a regional kernel
    idx = d2r.Index(cb, kernel="asmk")
    with pytest.raises(ValueError):
        idx.add_aggregated(d2r.aggregate(x, cb, "asmk*"))               # binary codes in a float index
    with pytest.raises(ValueError):
        d2r.Index(cb, kernel="nope")
    with pytest.raises(ValueError):
        d2r.Index(cb, alpha=0)
    with pytest.raises(ValueError):
        d2r.Index(cb, tau=float("nan"))
    with pytest.raises(ValueError):
        d2r.set_num_threads(0)
