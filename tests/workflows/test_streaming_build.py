"""Streaming, resumable index builds (d2r.build.build_index, `d2r index`) and the compressed,
memory-mapped index at scale: the streamed index equals the in-memory one (same scores and rankings,
the same postings bytes), a build killed mid-way and run again equals an uninterrupted one, a base
index is extended without being modified, regions stream too, removal leaves tombstones, and a
memory-mapped load reads only what it uses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r.core import index_io
from d2r.workflows.build import build_index, names_file
from d2r.extract import Features
from d2r.extract.store import save_features

from support import World

DIM = 32


@pytest.fixture(scope="module")
def world():
    return World(seed=11, dim=DIM, n_objects=12, words_per_object=6)


def _features(x):
    n = x.shape[0]
    return Features(x, np.zeros((n, 2), np.float32), np.ones(n, np.float32), np.ones(n, np.float32))


@pytest.fixture(scope="module")
def store(world, tmp_path_factory):
    """A feature-store folder of 7 shards (53 images, one of them empty), with regions."""
    folder = tmp_path_factory.mktemp("store") / "s"
    folder.mkdir()
    rng = np.random.default_rng(3)
    images, names = [], []
    k = 0
    for shard, size in enumerate([8, 8, 8, 5, 8, 8, 8]):
        xs = [world.image() for _ in range(size)]
        if shard == 2:
            xs[1] = np.zeros((0, DIM), np.float32)
        ns = [f"/photos/img{k + i:03d}.jpg" for i in range(size)]
        regs = []
        for x in xs:
            m = x.shape[0]
            crops = [_features(x[rng.permutation(m)[:max(1, m // 2)]]) for _ in range(2)] if m else []
            regs.append((np.tile([[0, 0, 10, 10]], (len(crops), 1)).astype(np.float64), crops))
        save_features(folder / f"shard-{shard:05d}.npz", ns, [_features(x) for x in xs], regs,
                      extractor={"name": "Synthetic", "params": {}, "fingerprint": "00112233aabbccdd"})
        images += list(zip(xs, regs))
        names += ns
        k += size
    return folder, images, names


def _postings(path):
    meta, sec, _ = index_io.read_index_file(path)
    return sec["postings"].tobytes(), sec["word_offsets"].copy(), sec["image_ids"].copy()


def _same(a, b, queries):
    for k in (None, 5):
        sa, ia = a.search(queries, k=k)
        sb, ib = b.search(queries, k=k)
        np.testing.assert_array_equal(ia, ib)
        assert sa.tobytes() == sb.tobytes()


def test_streamed_index_equals_in_memory(world, store, tmp_path):
    folder, images, names = store
    out = tmp_path / "db.d2r"
    idx = build_index(folder, out, world.codebook, batch_images=10, progress=False)
    ref = d2r.Index(world.codebook, "asmk*")
    ref.add([x for x, _ in images])
    ref.save(tmp_path / "ref.d2r")
    assert len(idx) == len(images) == len(ref)
    queries = [world.image() for _ in range(6)]
    _same(idx, ref, queries)
    p1, w1, i1 = _postings(out)
    p2, w2, i2 = _postings(tmp_path / "ref.d2r")
    assert p1 == p2 and np.array_equal(w1, w2) and np.array_equal(i1, i2)
    assert names_file(out).read_text().splitlines() == names
    assert idx.extractor["fingerprint"] == "00112233aabbccdd"
    assert not Path(str(out) + ".build").exists()           # the work folder is gone


def test_killed_build_resumes_to_the_same_index(world, store, tmp_path):
    """A build SIGKILLed after its third part, run again, equals an uninterrupted build; the parts
    written before the kill are reused, not rebuilt."""
    folder, images, names = store
    out = tmp_path / "db.d2r"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import d2r.workflows.build as b
        from support import World
        real = b._write_journal
        def write(work, journal):
            real(work, journal)
            if len(journal["parts"]) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        b._write_journal = write
        b.build_index({str(folder)!r}, {str(out)!r}, World(seed=11, dim={DIM}, n_objects=12,
                      words_per_object=6).codebook, batch_images=10, progress=False)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(d2r.__file__).parent.parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    work = Path(str(out) + ".build")
    journal = json.loads((work / "journal.json").read_text())
    assert len(journal["parts"]) == 3 and not out.exists()
    mtimes = {p["file"]: (work / p["file"]).stat().st_mtime_ns for p in journal["parts"]}
    seen = []
    import d2r.workflows.build as b
    real = b.Index.save

    def save(self, path):
        seen.append(Path(path).name)
        return real(self, path)

    b.Index.save = save
    try:
        idx = build_index(folder, out, world.codebook, batch_images=10, progress=False, keep_parts=True)
    finally:
        b.Index.save = real
    assert not set(seen) & set(mtimes), f"parts rebuilt after the restart: {seen}"
    assert all((work / f).stat().st_mtime_ns == t for f, t in mtimes.items())
    whole = build_index(folder, tmp_path / "whole.d2r", world.codebook, batch_images=10, progress=False)
    _same(idx, whole, [world.image() for _ in range(5)])
    assert _postings(out)[0] == _postings(tmp_path / "whole.d2r")[0]
    assert names_file(out).read_text() == names_file(tmp_path / "whole.d2r").read_text()


def test_other_settings_refuse_an_interrupted_build(world, store, tmp_path):
    folder, _, _ = store
    out = tmp_path / "db.d2r"
    work = Path(str(out) + ".build")
    work.mkdir()
    (work / "journal.json").write_text(json.dumps({"key": "0" * 16, "parts": []}))
    with pytest.raises(ValueError, match="interrupted build with other settings"):
        build_index(folder, out, world.codebook, progress=False)


def test_base_index_is_extended_not_modified(world, store, tmp_path):
    folder, images, names = store
    base_imgs = [world.image() for _ in range(9)]
    base = d2r.Index(world.codebook, "asmk*")
    base.add(base_imgs, image_ids=np.arange(100, 109))
    base.remove([103])
    base.save(tmp_path / "base.d2r")
    names_file(tmp_path / "base.d2r").write_text("".join(f"d{i}\n" for i in range(109)))
    before = (tmp_path / "base.d2r").read_bytes()
    idx = build_index(folder, tmp_path / "all.d2r", world.codebook, base=tmp_path / "base.d2r", batch_images=20,
                      progress=False)
    assert (tmp_path / "base.d2r").read_bytes() == before
    ref = d2r.Index(world.codebook, "asmk*")
    ref.add(base_imgs, image_ids=np.arange(100, 109))
    ref.remove([103])
    ref.add([x for x, _ in images], image_ids=109 + np.arange(len(images)))
    _same(idx, ref, [world.image() for _ in range(5)])
    assert names_file(tmp_path / "all.d2r").read_text().splitlines() == [f"d{i}" for i in range(109)] + names
    other = d2r.Index(world.codebook, "asmk")
    other.save(tmp_path / "other.d2r")
    with pytest.raises(ValueError, match="kernel"):
        build_index(folder, tmp_path / "x.d2r", world.codebook, base=tmp_path / "other.d2r", progress=False)


@pytest.mark.parametrize("kernel", ["rasmk*", "naive-rasmk"])
def test_regions_stream_the_same_way(world, store, tmp_path, kernel):
    folder, images, _ = store
    idx = build_index(folder, tmp_path / "r.d2r", world.codebook, kernel=kernel, batch_images=12, progress=False)
    ref = d2r.Index(world.codebook, kernel)
    ref.add_regions_many([[x] + [c.descriptors for c in crops] for x, (_, crops) in images])
    _same(idx, ref, [world.image() for _ in range(5)])


def test_regional_kernel_needs_a_store_with_regions(world, tmp_path):
    save_features(tmp_path / "plain.npz", ["a.jpg"], [_features(world.image())])
    with pytest.raises(ValueError, match="holds no regions"):
        build_index(tmp_path / "plain.npz", tmp_path / "r.d2r", world.codebook, kernel="rasmk*", progress=False)
    with pytest.raises(ValueError, match="-D descriptors"):
        build_index(tmp_path / "plain.npz", tmp_path / "r.d2r", d2r.Codebook(np.eye(8, dtype=np.float32)),
                    progress=False)


def test_cli_index_streams_and_resumes(world, store, tmp_path):
    folder, images, names = store
    np.save(tmp_path / "cb.npy", world.codebook.centroids)
    cmd = [sys.executable, "-m", "d2r.cli", "index", str(folder), "--codebook", str(tmp_path / "cb.npy"), "--out",
           str(tmp_path / "db.d2r"), "--batch-images", "16", "--json", "-q"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(d2r.__file__).parent.parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["images"] == len(images) and out["file_bytes"] == (tmp_path / "db.d2r").stat().st_size
    idx = d2r.Index.load(tmp_path / "db.d2r", mmap=True)
    ref = d2r.Index(world.codebook, "asmk*")
    ref.add([x for x, _ in images])
    _same(idx, ref, [world.image() for _ in range(4)])


# ---- tombstones and compaction ----------------------------------------------------------------


def test_remove_leaves_tombstones_until_compact_or_save(world, tmp_path):
    imgs = [world.image() for _ in range(30)]
    idx = d2r.Index(world.codebook, "asmk*")
    idx.add(imgs)
    postings = idx.stats()["postings"]
    stored = idx._ivf.memory_bytes
    gone = [2, 5, 6, 29]
    assert idx.remove(gone) == 4
    assert idx.stats()["removed_pending"] == 4 and idx._ivf.memory_bytes >= stored - 1024
    kept = [i for i in range(30) if i not in gone]
    ref = d2r.Index(world.codebook, "asmk*")
    ref.add([imgs[i] for i in kept], image_ids=kept)
    queries = [world.image() for _ in range(5)]
    _same(idx, ref, queries)
    s, ids = idx.score_all(queries)
    s2, ids2 = ref.score_all(queries)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(s, s2)
    assert idx.stats()["postings"] == postings - sum(len(np.unique(world.codebook.quantize(imgs[i])[0])) for i in gone)
    idx.add([imgs[5]], image_ids=[5])                       # a removed id may come back
    ref.add([imgs[5]], image_ids=[5])
    _same(idx, ref, queries)
    dropped = idx.compact()
    assert dropped > 0 and idx.stats()["removed_pending"] == 0
    _same(idx, ref, queries)
    idx.remove([7])
    idx.save(tmp_path / "t.d2r")
    ref.remove([7])
    back = d2r.Index.load(tmp_path / "t.d2r", mmap=True)
    _same(back, ref, queries)
    assert back.stats()["removed_pending"] == 0


def test_regional_search_index_tombstones(world):
    imgs = [world.image() for _ in range(12)]
    r = d2r.RegionalSearchIndex(world.codebook, "asmk*")
    r.add_regions_many([[x, x[:4]] for x in imgs])
    r.remove([3, 4])
    ref = d2r.RegionalSearchIndex(world.codebook, "asmk*")
    keep = [i for i in range(12) if i not in (3, 4)]
    ref.add_regions_many([[imgs[i], imgs[i][:4]] for i in keep], image_ids=keep)
    q = [world.image() for _ in range(4)]
    for k in (None, 3):
        s1, i1 = r.search(q, k=k)
        s2, i2 = ref.search(q, k=k)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)
    r.add_regions_many([[imgs[3], imgs[3][:4]]], image_ids=[3])
    ref.add_regions_many([[imgs[3], imgs[3][:4]]], image_ids=[3])
    np.testing.assert_array_equal(r.search(q, k=None)[1], ref.search(q, k=None)[1])


# ---- the memory-mapped index reads only what it uses ------------------------------------------


def _read_bytes() -> int:
    """Bytes this process has read from storage (/proc/self/io), page faults of its maps included."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise OSError("no read_bytes in /proc/self/io")


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not Path("/proc/self/io").exists() or not hasattr(os, "posix_fadvise"),
                    reason="needs Linux /proc/self/io and posix_fadvise")
def test_mmap_load_reads_only_what_it_uses(tmp_path):
    """An index of 5,000 synthetic images (about 30 MB of postings), dropped from the page cache: a
    memory-mapped load reads from disk only the header, codebook, image table and word table, and
    one query with 20 words reads about its 20 lists (rounded out to their 64 KiB checksum pages),
    counted by the kernel's per-process I/O accounting (/proc/self/io)."""
    from d2r.workflows.synthetic import zipf_images

    rng = np.random.default_rng(0)
    n_words, dim = 4096, 128
    cb = d2r.Codebook(rng.standard_normal((n_words, dim)).astype(np.float32))
    idx = d2r.Index(cb, "asmk*")
    idx.add_aggregated(zipf_images(5000, n_words, 600, exponent=0.9, seed=1, fingerprint=cb.fingerprint))
    path = tmp_path / "big.d2r"
    idx.save(path)
    size = path.stat().st_size
    meta, sec, _ = index_io.read_index_file(path, mmap=True, verify=False)
    small = sum(sec[n].nbytes for n in ("centroids", "image_ids", "word_counts", "word_offsets", "page_crc"))
    wo = sec["word_offsets"].copy()
    del sec
    _evict(path)
    if not _probe_io_accounting(path):
        pytest.skip("this kernel does not account page-cache reads in /proc/self/io")
    _evict(path)
    r0 = _read_bytes()
    loaded = d2r.Index.load(path, mmap=True)
    at_load = _read_bytes() - r0
    assert at_load <= small + (1 << 20), f"the load read {at_load} bytes; the small sections are {small}"
    assert at_load < size / 8
    words = np.sort(rng.choice(n_words, 20, replace=False)).astype(np.int32)
    lists = int(sum(wo[w + 1] - wo[w] for w in words))
    q = d2r.AggregatedBatch(np.array([0, 20], np.int64), words,
                            np.packbits(rng.random((20, dim)) > 0.5, axis=1), fingerprint=cb.fingerprint)
    r1 = _read_bytes()
    loaded.search_aggregated(q, k=10)
    by_query = _read_bytes() - r1
    pages = 20 * 2 * index_io.PAGE_BYTES
    assert lists <= by_query <= lists + pages, (by_query, lists)
    assert by_query < size / 8


def _probe_io_accounting(path) -> bool:
    r0 = _read_bytes()
    with open(path, "rb") as f:
        f.read(1 << 20)
    return _read_bytes() > r0


# ---- scoring in slot tiles -----------------------------------------------------------------------


def test_scores_across_slot_tiles_equal_the_reference(world):
    """More images than one scoring tile (65,536 slots) in several segments, split across threads by
    slot range, with tombstones: every image's score equals the plain reference (tests/reference.py),
    single queries, batches and the top-k alike."""
    import reference as ref
    from d2r.workflows.synthetic import zipf_images

    n, n_words, dim = 140_000, 64, 128
    rng = np.random.default_rng(4)
    cb = d2r.Codebook(rng.standard_normal((n_words, dim)).astype(np.float32))
    db = zipf_images(n, n_words, 6, exponent=0.5, seed=5, fingerprint=cb.fingerprint)
    idx = d2r.Index(cb, "asmk*")
    idx.add_aggregated(d2r.AggregatedBatch(db.offsets[:120_001], db.words[:db.offsets[120_000]],
                                           db.codes[:db.offsets[120_000]], fingerprint=cb.fingerprint))
    rest = db.offsets[120_000:] - db.offsets[120_000]
    idx.add_aggregated(d2r.AggregatedBatch(rest, db.words[db.offsets[120_000]:], db.codes[db.offsets[120_000]:],
                                           fingerprint=cb.fingerprint))
    assert idx.stats()["segments"] >= 2
    gone = np.arange(70_000, 70_100)
    idx.remove(gone)
    qbatch = zipf_images(3, n_words, 12, exponent=0.5, seed=6, fingerprint=cb.fingerprint)
    queries = list(qbatch)
    keep = np.setdiff1d(np.arange(n), gone)
    database = [(db[i].words.astype(np.int64), db[i].codes) for i in keep]
    s_all, ids_all = idx._ivf.score_all(qbatch.offsets, qbatch.words, qbatch.code_bytes, 3.0, 0.0, True)
    np.testing.assert_array_equal(ids_all, keep)
    for qi, a in enumerate(queries):
        want = ref.score_all((a.words.astype(np.int64), a.codes), database, keep, dim)
        got = dict(zip(ids_all.tolist(), s_all[qi].tolist()))
        worst = max(abs(got[i] - want[i]) for i in keep.tolist())
        assert worst <= 1e-5, worst
        s1, i1 = idx.search_aggregated(a, k=20)
        np.testing.assert_allclose(s1, np.sort(s_all[qi])[::-1][:20], atol=1e-6)
    sb, ib = idx.search_aggregated(queries, k=20)       # the batched path (queries grouped per thread)
    for qi, a in enumerate(queries):
        s1, i1 = idx.search_aggregated(a, k=20)
        np.testing.assert_array_equal(ib[qi], i1)
        np.testing.assert_array_equal(sb[qi], s1)
