"""Hostile files and arguments: every problem raises a clear, typed error (IndexFileError naming the
path and what is wrong, TypeError / ValueError naming the argument), never KeyError, a pybind11
"incompatible function arguments", a hang or a crash. Cases that could crash or block run in a child
process with a timeout."""
import json
import math
import mmap
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

import d2r
import d2r.core.checks as checks
import d2r.core.index_io as index_io
from d2r.core.atomic import atomic_write

from support import World

DIM = 32
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX processes, FIFOs and signals")


@pytest.fixture(scope="module")
def world():
    return World(seed=5, dim=DIM, n_objects=10, words_per_object=5)


@pytest.fixture(scope="module")
def imgs(world):
    return [world.image() for _ in range(12)]


@pytest.fixture(scope="module")
def index(world, imgs):
    idx = d2r.Index(world.codebook, kernel="asmk")
    idx.add(imgs, image_ids=np.arange(100, 100 + len(imgs)))
    return idx


@pytest.fixture(scope="module")
def regional(world, imgs):
    r = d2r.RegionalSearchIndex(world.codebook, kernel="asmk*")
    r.add_regions_many([[x, x[:4]] for x in imgs[:6]], image_ids=np.arange(10, 16))
    return r


@pytest.fixture(scope="module")
def saved(tmp_path_factory, index):
    path = tmp_path_factory.mktemp("saved") / "index.d2r"
    index.save(path)
    return path


@pytest.fixture(scope="module")
def saved_regional(tmp_path_factory, regional):
    path = tmp_path_factory.mktemp("saved") / "regional.d2r"
    regional.save(path)
    return path


def _plain(index, path, version=2):
    """`index` saved in the plain layout of format `version` (1 or 2: posting arrays, not
    compressed); returns (meta, sections)."""
    ex = index._ivf.export()
    meta, sections = dict(index._meta(), next_id=int(ex["next_id"])), {
        "centroids": index.codebook.centroids, "image_ids": ex["image_ids"], "word_counts": ex["word_counts"],
        "offsets": ex["offsets"], "slots": ex["slots"], "codes": ex["codes"]}
    index_io.write_index_file(path, meta, sections, version=version)
    return meta, sections


@pytest.fixture(scope="module")
def saved_v2(tmp_path_factory, index):
    """`index` as d2r wrote it before format 3 (plain posting arrays)."""
    path = tmp_path_factory.mktemp("saved") / "index-v2.d2r"
    _plain(index, path)
    return path


@pytest.fixture(scope="module")
def saved_regional_v01(tmp_path_factory, regional):
    """The regional index as d2r <= 0.1 wrote it: region entry ids in image_ids, each entry's image id
    in region_image (a removed entry: -1), and next_region."""
    path = tmp_path_factory.mktemp("saved") / "regional-v01.d2r"
    meta, sections = _plain(regional, path, version=1)
    meta.pop("codebook_fingerprint")
    owners = sections["image_ids"]
    n = owners.size
    region_image = np.concatenate([owners, [-1]]).astype(np.int64)    # one removed entry at the end
    sections = dict(sections, image_ids=np.arange(n, dtype=np.int64), region_image=region_image)
    index_io.write_index_file(path, dict(meta, next_region=n + 1), sections, version=1)
    return path


# ---- crafting files ------------------------------------------------------------------------------


def _header(path):
    b = Path(path).read_bytes()
    _, _, hlen, _ = struct.unpack("<8sIII", b[:20])
    return json.loads(b[20:20 + hlen])


def _write_header(src, dst, header_bytes):
    """dst: src with its header replaced by `header_bytes` (and a correct header CRC); the sections
    stay at their offsets (the gap after the header is padding)."""
    b = Path(src).read_bytes()
    first = min(s["offset"] for s in _header(src)["sections"])
    assert 20 + len(header_bytes) <= first, "crafted header too long"
    prefix = struct.pack("<8sIII", b"D2RINDEX", 1, len(header_bytes), zlib.crc32(header_bytes))
    Path(dst).write_bytes(prefix + header_bytes + b"\0" * (first - 20 - len(header_bytes)) + b[first:])
    return Path(dst)


def _craft(src, dst, edit):
    """dst: src with edit(header) applied to its JSON header (a dict, edited in place)."""
    h = _header(src)
    edit(h)
    return _write_header(src, dst, json.dumps(h, sort_keys=True, separators=(",", ":")).encode())


def _section(h, name):
    return next(s for s in h["sections"] if s["name"] == name)


_MISSING = object()   # _set_field(name, _MISSING) deletes the field


def _set_field(field, value):
    def edit(h):
        if value is _MISSING:
            del h[field]
        else:
            h[field] = value
    return edit


def _expect_file_error(path, *words, call=None, **kw):
    with pytest.raises(d2r.IndexFileError) as err:
        (call or index_io.read_index_file)(path, **kw)
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def _run_child(script, timeout=60):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(d2r.__file__).parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"child exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


# ---- 1. read_index_file: section table ----------------------------------------------------------


@pytest.mark.parametrize("section,dtype", [("centroids", ">f4"), ("centroids", "<f8"), ("centroids", "<i4"),
                                           ("image_ids", "<M8"), ("image_ids", "|V8"), ("image_ids", "<c8"),
                                           ("postings", "|S1"), ("page_crc", "u4"), ("page_crc", None),
                                           ("page_crc", ["<u4"]), ("word_offsets", "<i8"),
                                           ("word_counts", 4)])
@pytest.mark.parametrize("mmap_", [False, True])
def test_section_dtype_must_be_the_allowed_one(tmp_path, saved, section, dtype, mmap_):
    path = _craft(saved, tmp_path / "dtype.d2r", lambda h: _section(h, section).update(dtype=dtype))
    _expect_file_error(path, section, "dtype", mmap=mmap_, verify=False)


def test_object_dtype_never_reaches_numpy(tmp_path, saved):
    """A '|O' section (nbytes consistent) would build object arrays over file bytes: a segfault."""
    path = _craft(saved, tmp_path / "object.d2r", lambda h: _section(h, "image_ids").update(dtype="|O"))
    out = _run_child(f"""
        import d2r, d2r.core.index_io as io
        path = {str(path)!r}
        n = 0
        for mmap in (False, True):
            for verify in (False, True):
                for load in (io.read_index_file, d2r.Index.load):
                    try:
                        load(path, mmap=mmap, verify=verify)
                    except d2r.IndexFileError as exc:
                        assert path in str(exc) and "'|O'" in str(exc) and "image_ids" in str(exc), str(exc)
                        n += 1
        print("rejected", n)
    """)
    assert out.split() == ["rejected", "8"]


def test_unknown_and_duplicate_sections(tmp_path, saved):
    path = _craft(saved, tmp_path / "evil.d2r", lambda h: _section(h, "page_crc").update(name="evil"))
    _expect_file_error(path, "evil", "unknown section")
    path = _craft(saved, tmp_path / "twice.d2r", lambda h: h["sections"].append(dict(_section(h, "word_offsets"))))
    _expect_file_error(path, "word_offsets", "twice")
    # a caller may allow other sections (and dtypes)
    allowed = dict(index_io.SECTION_DTYPES, evil=("<u4",))
    _, sections, _ = index_io.read_index_file(tmp_path / "evil.d2r", dtypes=allowed)
    assert "evil" in sections and "page_crc" not in sections


@pytest.mark.parametrize("field,value,words", [
    ("shape", [-1], ["shape"]), ("shape", ["3"], ["shape"]), ("shape", [1.5], ["shape"]), ("shape", None, ["shape"]),
    ("shape", [True], ["shape"]), ("shape", 7, ["shape"]), ("shape", [2**40, 2**40], ["nbytes"]),
    ("offset", 1.5, ["offset"]), ("offset", -64, ["offset"]), ("offset", "64", ["offset"]), ("offset", 0, ["offset"]),
    ("nbytes", True, ["nbytes"]), ("nbytes", None, ["nbytes"]), ("nbytes", 3, ["nbytes"]),
    ("crc32", "x", ["crc32"]), ("crc32", 2**40, ["crc32"]), ("name", None, ["unknown section"]),
    ("name", ["postings"], ["unknown section"]),
])
def test_bad_section_fields(tmp_path, saved, field, value, words):
    path = _craft(saved, tmp_path / "field.d2r", lambda h: _section(h, "postings").update({field: value}))
    for mmap_ in (False, True):
        _expect_file_error(path, *words, mmap=mmap_, verify=False)


def test_misaligned_and_out_of_bounds_offsets(tmp_path, saved):
    h = _header(saved)
    off = _section(h, "postings")["offset"]
    path = _craft(saved, tmp_path / "align.d2r", lambda h: _section(h, "postings").update(offset=off + 8))
    _expect_file_error(path, "postings", "offset")
    size = saved.stat().st_size
    path = _craft(saved, tmp_path / "far.d2r", lambda h: _section(h, "postings").update(offset=(size // 64 + 1) * 64))
    _expect_file_error(path, "postings", "truncated", mmap=True, verify=False)


@pytest.mark.parametrize("header", [b"[1, 2]", b"42", b'"text"', b"null", b'{"sections": 5}', b'{"sections": {}}',
                                    b'{"kind": "Index"}', b'{"sections": [1]}', b'{"sections": [null]}',
                                    b"[" * 200000 + b"]" * 200000, b"\xff\xfe{}"])
def test_bad_header_structure(tmp_path, saved, header):
    path = tmp_path / "header.d2r"
    b = saved.read_bytes()
    path.write_bytes(struct.pack("<8sIII", b"D2RINDEX", 1, len(header), zlib.crc32(header)) + header + b[20:])
    for mmap_ in (False, True):
        _expect_file_error(path, "header", mmap=mmap_)


# ---- 1. read_index_file: what is opened --------------------------------------------------------


@posix_only
def test_fifo_is_rejected_without_blocking(tmp_path):
    fifo = tmp_path / "index.d2r"
    os.mkfifo(fifo)
    out = _run_child(f"""
        import d2r, d2r.core.index_io as io
        path = {str(fifo)!r}
        n = 0
        for load in (io.read_index_file, d2r.Index.load):
            for mmap in (False, True):
                try:
                    load(path, mmap=mmap)
                except d2r.IndexFileError as exc:
                    assert path in str(exc) and "regular file" in str(exc), str(exc)
                    n += 1
        print("rejected", n)
    """, timeout=30)
    assert out.split() == ["rejected", "4"]


def test_folders_devices_and_missing_files(tmp_path):
    for mmap_ in (False, True):
        with pytest.raises(IsADirectoryError) as err:
            index_io.read_index_file(tmp_path, mmap=mmap_)
        assert err.value.filename == str(tmp_path)
        with pytest.raises(FileNotFoundError):
            index_io.read_index_file(tmp_path / "missing.d2r", mmap=mmap_)
        if os.path.exists("/dev/null"):
            _expect_file_error("/dev/null", "regular file", mmap=mmap_)
        empty = tmp_path / "empty.d2r"
        empty.write_bytes(b"")
        _expect_file_error(empty, "not a d2r index", mmap=mmap_)


@pytest.mark.parametrize("native", [True, False])
def test_mmap_returns_the_buffer_owner(saved, monkeypatch, native):
    if not native:
        monkeypatch.setattr(d2r._native, "MappedFile", None, raising=False)
    elif getattr(d2r._native, "MappedFile", None) is None:
        pytest.skip("the native core has no MappedFile yet")
    meta, plain, owner = index_io.read_index_file(saved)
    assert owner is None
    meta_m, mapped, owner = index_io.read_index_file(saved, mmap=True)
    assert meta_m == meta and "sections" not in meta
    if not native:
        assert isinstance(owner, mmap.mmap)
    whole = np.frombuffer(owner, np.uint8)
    assert whole.size == saved.stat().st_size
    assert set(mapped) == set(plain) == set(index_io.COMPRESSED)
    for name, arr in mapped.items():
        assert not arr.flags.writeable
        assert np.shares_memory(arr, whole), name
        assert arr.dtype.str in index_io.SECTION_DTYPES[name]
        np.testing.assert_array_equal(arr, plain[name])


# ---- 1. validate_meta / check_structure --------------------------------------------------------


def _meta(path):
    meta, sections, _ = index_io.read_index_file(path)
    return meta, {k: np.array(v) for k, v in sections.items()}


BAD_FIELDS = [
    ("kind", "Foo"), ("kind", _MISSING), ("kind", 1), ("kernel", "nope"), ("kernel", 5), ("kernel", _MISSING),
    ("alpha", 1e39), ("alpha", 0), ("alpha", -1.0), ("alpha", 64.5), ("alpha", True), ("alpha", "3"), ("alpha", None),
    ("alpha", _MISSING), ("tau", 1.0), ("tau", 5), ("tau", -1.5), ("tau", "0"), ("tau", False),
    ("normalize", "false"), ("normalize", 0), ("normalize", None), ("normalize", _MISSING),
    ("m_db", 0), ("m_db", 51), ("m_db", 1.0), ("m_query", -1), ("m_query", True), ("dim", 0), ("dim", "32"),
    ("n_words", 0), ("n_words", [50]), ("next_id", -1), ("next_id", 1.5), ("next_id", 2**62 + 1), ("next_id", _MISSING),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_validate_meta_names_the_field(saved, field, value):
    meta, _ = _meta(saved)
    _set_field(field, value)(meta)
    with pytest.raises(d2r.IndexFileError) as err:
        index_io.validate_meta(meta, saved)
    assert str(saved) in str(err.value) and repr(field) in str(err.value), str(err.value)


@pytest.mark.parametrize("field,value", [("pooling", "median"), ("pooling", _MISSING), ("pooling", None),
                                         ("next_region", -1), ("next_region", "6"), ("kernel", "rasmk*")])
def test_validate_meta_regional_fields(saved_regional, field, value):
    meta, _ = _meta(saved_regional)
    _set_field(field, value)(meta)
    with pytest.raises(d2r.IndexFileError) as err:
        index_io.validate_meta(meta, saved_regional)
    assert str(saved_regional) in str(err.value) and repr(field) in str(err.value), str(err.value)


def test_validate_meta_normalises(saved, saved_regional, saved_regional_v01):
    meta, _ = _meta(saved)
    meta.update(kernel="ASMK", alpha=2, tau=np.float64(0.25))
    out = index_io.validate_meta(meta, saved)
    assert out is not meta and meta["alpha"] == 2
    assert out["kernel"] == "asmk" and out["kind"] == "Index"
    assert type(out["alpha"]) is float and out["alpha"] == 2.0 and type(out["tau"]) is float
    assert out["normalize"] is True and out["next_id"] == 112
    out = index_io.validate_meta(_meta(saved_regional)[0], saved_regional)
    assert out["pooling"] == "max" and out["next_id"] == 16 and "next_region" not in out
    out = index_io.validate_meta(_meta(saved_regional_v01)[0], saved_regional_v01)
    assert out["next_region"] == 13


def _mutations():
    """(name, function(meta, sections)) of structural corruptions of the saved 'asmk' index."""
    def setitem(section, i, value):
        def f(m, s):
            s[section][i] = value
        return f

    def swap_first(section, value):
        def f(m, s):
            s[section] = value(s[section])
        return f

    return [
        ("negative image id", setitem("image_ids", 0, -5)),
        ("image id >= next_id", setitem("image_ids", 3, 112)),
        ("huge image id", setitem("image_ids", 3, 2**62)),
        ("next_id too small", lambda m, s: m.update(next_id=105)),
        ("duplicate image ids", setitem("image_ids", 1, 100)),
        ("negative word count", setitem("word_counts", 0, -1)),
        ("word counts off by one", setitem("word_counts", 2, 1)),
        ("fewer word counts", swap_first("word_counts", lambda a: a[:-1])),
        ("decreasing word table", setitem("word_offsets", 5, 10**6)),
        ("word table not from 0", setitem("word_offsets", 0, 1)),
        ("word table too short", swap_first("word_offsets", lambda a: a[:-1])),
        ("word table past the postings", swap_first("postings", lambda a: a[:-1])),
        ("fewer page checksums", swap_first("page_crc", lambda a: a[:-1])),
        ("more postings than bytes", lambda m, s: m.update(n_entries=m["n_entries"] * 100)),
        ("centroids wrong shape", swap_first("centroids", lambda a: a[:-1])),
        ("2-D image ids", swap_first("image_ids", lambda a: a.reshape(-1, 1))),
        ("2-D postings", swap_first("postings", lambda a: a.reshape(1, -1))),
        ("missing postings", lambda m, s: s.pop("postings")),
        ("image_ids beyond region_image", lambda m, s: s.update(region_image=np.arange(100, 105))),
    ]


def _mutations_v2():
    """Structural corruptions of the plain posting arrays of format 2."""
    def swap(section, value):
        def f(m, s):
            s[section] = value(s[section])
        return f

    def setitem(section, i, value):
        def f(m, s):
            s[section][i] = value
        return f

    return [
        ("decreasing offsets", setitem("offsets", 5, 10**6)),
        ("offsets not from 0", setitem("offsets", 0, 1)),
        ("offsets too short", swap("offsets", lambda a: a[:-1])),
        ("fewer slots", swap("slots", lambda a: a[:-1])),
        ("codes too narrow", swap("codes", lambda a: a[:, :-4])),
        ("codes 1-D", swap("codes", lambda a: a.reshape(-1))),
        ("missing slots", lambda m, s: s.pop("slots")),
        ("word counts off by one", setitem("word_counts", 2, 1)),
    ]


@pytest.mark.parametrize("name,mutate", _mutations(), ids=[n for n, _ in _mutations()])
def test_check_structure(saved, name, mutate):
    _check_mutated(saved, mutate)


@pytest.mark.parametrize("name,mutate", _mutations_v2(), ids=[n for n, _ in _mutations_v2()])
def test_check_structure_v2(saved_v2, name, mutate):
    _check_mutated(saved_v2, mutate)


def _check_mutated(path, mutate):
    meta, sections = _meta(path)
    meta = index_io.validate_meta(meta, path)
    index_io.check_structure(meta, sections, path)          # the intact file passes
    mutate(meta, sections)
    with pytest.raises(d2r.IndexFileError) as err:
        index_io.check_structure(meta, sections, path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name,mutate", [
    ("image id >= next_id", lambda m, s: s["image_ids"].__setitem__(0, 16)),
    ("negative image id", lambda m, s: s["image_ids"].__setitem__(3, -1)),
    ("next_id too small", lambda m, s: m.update(next_id=15)),
])
def test_check_structure_regional(saved_regional, name, mutate):
    """Every region of an image is an entry with the image's id: repeated ids are fine."""
    _check_mutated(saved_regional, mutate)


@pytest.mark.parametrize("name,mutate", [
    ("entry id beyond region_image", lambda m, s: s["image_ids"].__setitem__(0, 13)),
    ("negative entry id", lambda m, s: s["image_ids"].__setitem__(0, -1)),
    ("duplicate entry ids", lambda m, s: s["image_ids"].__setitem__(1, 0)),
    ("region_image too short", lambda m, s: s.update(region_image=s["region_image"][:-2])),
    ("region owner >= next_id", lambda m, s: s["region_image"].__setitem__(0, 16)),
    ("region_image below -1", lambda m, s: s["region_image"].__setitem__(12, -2)),
    ("live region without owner", lambda m, s: s["region_image"].__setitem__(4, -1)),
])
def test_check_structure_regional_v01(saved_regional_v01, name, mutate):
    _check_mutated(saved_regional_v01, mutate)


def test_check_structure_accepts_float_codes(saved_v2):
    """The codes of a float kernel may be stored as <f4 (n, dim) as well as |u1 (n, 4 dim) (format 2)."""
    meta, sections = _meta(saved_v2)
    meta = index_io.validate_meta(meta, saved_v2)
    sections["codes"] = sections["codes"].view(np.float32)
    assert sections["codes"].shape[1] == DIM
    index_io.check_structure(meta, sections, saved_v2)


# ---- 1. through d2r.Index.load (needs Index.load to call validate_meta and check_structure) -------


@pytest.mark.parametrize("field,value", [("alpha", 1e39), ("tau", 1.0), ("normalize", "false"), ("m_db", 51),
                                         ("kind", "Foo"), ("kernel", 5), ("next_id", 105), ("dim", 31),
                                         ("alpha", _MISSING)])
def test_load_rejects_bad_header_fields(tmp_path, saved, field, value):
    path = _craft(saved, tmp_path / "field.d2r", _set_field(field, value))
    for mmap_ in (False, True):
        for verify in (False, True):
            _expect_file_error(path, call=d2r.Index.load, mmap=mmap_, verify=verify)


@pytest.mark.parametrize("value", [-7, 2**61, 100])   # negative, >= next_id, a duplicate of the first id
@pytest.mark.parametrize("mmap_", [False, True])
def test_load_without_verify_checks_image_ids(tmp_path, saved, value, mmap_):
    b = bytearray(saved.read_bytes())
    s = _section(_header(saved), "image_ids")
    b[s["offset"] + 8:s["offset"] + 16] = struct.pack("<q", value)    # the second image's id
    path = tmp_path / "ids.d2r"
    path.write_bytes(bytes(b))
    _expect_file_error(path, "checksum", call=d2r.Index.load, mmap=mmap_, verify=True)
    _expect_file_error(path, call=d2r.Index.load, mmap=mmap_, verify=False)


def test_load_regional_rejects_bad_pooling(tmp_path, saved_regional):
    path = _craft(saved_regional, tmp_path / "pool.d2r", _set_field("pooling", "median"))
    msg = _expect_file_error(path, "pooling", call=d2r.Index.load)
    assert "median" in msg


@pytest.mark.parametrize("mmap_", [False, True])
def test_load_regional_v01_files(tmp_path, regional, imgs, saved_regional_v01, mmap_):
    got = d2r.RegionalSearchIndex.load(saved_regional_v01, mmap=mmap_, verify=False)
    np.testing.assert_array_equal(got.search(imgs[:3], k=None)[1], regional.search(imgs[:3], k=None)[1])
    b = bytearray(saved_regional_v01.read_bytes())
    s = _section(_header(saved_regional_v01), "image_ids")
    b[s["offset"]:s["offset"] + 8] = struct.pack("<q", 12)      # the removed entry (region_image -1)
    path = tmp_path / "v01.d2r"
    path.write_bytes(bytes(b))
    _expect_file_error(path, "image ids", call=d2r.Index.load, mmap=mmap_, verify=False)


# ---- 2. atomic_write --------------------------------------------------------------------------


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_name(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_write(target) as f:
        f.write(b"data")
        names = os.listdir(tmp_path)
    assert len(names) == 1 and re.fullmatch(rf"\.out\.bin\.{os.getpid()}\.[0-9a-f]+\.tmp", names[0]), names
    assert os.listdir(tmp_path) == ["out.bin"] and target.read_bytes() == b"data"
    if os.name == "posix":
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


@posix_only
def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, index):
    target = tmp_path / "index.d2r"
    dead = _dead_pid()
    stale = tmp_path / f".index.d2r.{dead}.0badc0de.tmp"
    stale.write_bytes(b"\0" * (1 << 20))
    live = tmp_path / f".index.d2r.{os.getpid()}.12345678.tmp"        # a save in progress (this process)
    other = tmp_path / f".other.d2r.{dead}.0badc0de.tmp"              # another target's
    odd = tmp_path / ".index.d2r.notapid.tmp"
    for p in (live, other, odd):
        p.write_bytes(b"x")
    index.save(target)
    assert sorted(os.listdir(tmp_path)) == sorted(["index.d2r", live.name, other.name, odd.name])
    assert index_io.read_index_file(target)[1]["image_ids"].size == len(index)


@posix_only
def test_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path, index):
    target = tmp_path / "index.d2r"
    script = textwrap.dedent(f"""
        import sys, time
        from d2r.core.atomic import atomic_write
        with atomic_write({str(target)!r}) as f:
            f.write(b"\\0" * (4 << 20))
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(d2r.__file__).parent.parent), env.get("PYTHONPATH", "")])
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".index.d2r.{child.pid}."), left
    assert (tmp_path / left[0]).stat().st_size == 4 << 20
    index.save(target)
    assert os.listdir(tmp_path) == ["index.d2r"]


def test_save_into_a_missing_folder_names_the_target(tmp_path, index):
    target = tmp_path / "no" / "such" / "index.d2r"
    for save in (index.save, lambda p: atomic_write(p).__enter__()):
        with pytest.raises(FileNotFoundError) as err:
            save(target)
        assert err.value.filename == str(target)
        assert str(target) in str(err.value) and ".tmp" not in str(err.value)
    assert not (tmp_path / "no").exists()


# ---- 3. argument checks ------------------------------------------------------------------------


def test_check_k():
    assert checks.check_k(None) == -1
    assert checks.check_k(5) == 5 and checks.check_k(np.int32(3)) == 3
    assert checks.check_k(2**63) == checks.check_k(10**30) == 2**62
    for bad in (True, 1.5, "3", 3.0, [3]):
        with pytest.raises(TypeError, match="k"):
            checks.check_k(bad)
    for bad in (0, -1, -2**70):
        with pytest.raises(ValueError, match="k"):
            checks.check_k(bad)


def test_search_k_types(index, imgs):
    q = imgs[0]
    for bad in (True, 1.5, "3"):
        with pytest.raises(TypeError):
            index.search(q, k=bad)
    with pytest.raises(ValueError):
        index.search(q, k=0)


def test_search_huge_k(index, imgs):
    """Needs Index._check_k = check_k (no pybind11 overflow error)."""
    s, i = index.search(imgs[0], k=2**63)
    s_all, i_all = index.search(imgs[0], k=None)
    np.testing.assert_array_equal(i, i_all)
    assert index.search_aggregated(index.aggregate(imgs[0], query=True), k=2**70)[1].shape == (len(index),)


def test_as_image_id():
    assert checks.as_image_id(5) == 5 and checks.as_image_id(np.int64(7)) == 7 and checks.as_image_id(np.uint8(3)) == 3
    for x in (1.5, 1.0, "1", b"1", True, np.True_, None, [1], -1, 2**62, 2**70, np.uint64(2**63)):
        assert checks.as_image_id(x) is None, x


def test_contains_non_integers(index, regional):
    """Needs Index.__contains__ / RegionalSearchIndex.__contains__ to use as_image_id."""
    for idx, first in ((index, 100), (regional, 10)):
        assert first in idx and np.int64(first) in idx
        for x in (float(first), str(first), first + 0.5, True, None, -1, 2**70, np.uint64(2**64 - 1)):
            assert (x in idx) is False, x


def test_check_score_params():
    assert checks.check_score_params(3, np.float32(0.5), np.True_) == (3.0, 0.5, True)
    assert checks.check_score_params(64, -1, False) == (64.0, -1.0, False)
    bad = [(1e39, 0, True, ValueError, "alpha"), (0, 0, True, ValueError, "alpha"),
           (math.inf, 0, True, ValueError, "alpha"), (10**400, 0, True, ValueError, "alpha"),
           (True, 0, True, TypeError, "alpha"), ("3", 0, True, TypeError, "alpha"),
           (3, 1.0, True, ValueError, "tau"), (3, -1.01, True, ValueError, "tau"),
           (3, math.nan, True, ValueError, "tau"), (3, None, True, TypeError, "tau"),
           (3, 0, "no", TypeError, "normalize"), (3, 0, 1, TypeError, "normalize"),
           (3, 0, None, TypeError, "normalize")]
    for alpha, tau, normalize, exc, word in bad:
        with pytest.raises(exc, match=word):
            checks.check_score_params(alpha, tau, normalize)


def test_index_rejects_bad_score_params(world):
    """Needs Index.__init__ to use check_score_params."""
    for cls in (d2r.Index, d2r.RegionalSearchIndex):
        for kw, exc in [({"alpha": 1e39}, ValueError), ({"alpha": 65}, ValueError), ({"tau": 1.0}, ValueError),
                        ({"tau": -2}, ValueError), ({"normalize": "no"}, TypeError),
                        ({"normalize": "false"}, TypeError), ({"alpha": True}, TypeError)]:
            with pytest.raises(exc):
                cls(world.codebook, **kw)
        idx = cls(world.codebook, alpha=64, tau=-1, normalize=np.False_)
        assert (idx.alpha, idx.tau, idx.normalize) == (64.0, -1.0, False)


def test_as_ids_rejects_ids_beyond_2_62(world, imgs):
    for bad in ([2**62], np.array([2**63], np.uint64), [0, 2**62 + 5]):
        with pytest.raises(ValueError, match="2\\*\\*62"):
            checks.as_ids(bad)
    assert checks.as_ids([2**62 - 1])[0] == 2**62 - 1
    idx = d2r.Index(world.codebook)
    idx.add(imgs[:2])
    with pytest.raises(ValueError):
        idx.add(imgs[2], image_ids=[2**62])
    with pytest.raises(ValueError):
        idx.remove(np.array([2**63], np.uint64))
    assert len(idx) == 2


# ---- 4. set_num_threads -------------------------------------------------------------------------


def test_set_num_threads_bounds():
    before = d2r.get_num_threads()
    try:
        for bad in (2**31, 2**63, 2**100, d2r.MAX_THREADS + 1, 0, -1, True, False, 1.5, "2", None):
            with pytest.raises(ValueError, match="threads"):
                d2r.set_num_threads(bad)
            assert d2r.get_num_threads() == before
        d2r.set_num_threads(np.int64(1))
        assert d2r.get_num_threads() == 1
    finally:
        d2r.set_num_threads(before)
    assert d2r.get_num_threads() == before


# ---- 5. feature stores --------------------------------------------------------------------------


def test_extract_dataset_rejects_one_path(tmp_path):
    from d2r.workflows.collection import extract_dataset

    store = tmp_path / "store"
    for images in ("a/path", tmp_path / "img.jpg", b"a/path"):
        with pytest.raises(TypeError, match="list"):
            extract_dataset(images, store, extractor=lambda p: None, progress=False)
    assert not store.exists()


def _features(rng, n):
    from d2r.extract import Features

    d = rng.standard_normal((n, 8)).astype(np.float32)
    return Features(d, rng.random((n, 2)).astype(np.float32), np.ones(n, np.float32), np.ones(n, np.float32))


@pytest.mark.parametrize("key,value", [
    ("offsets", [0, 3, 7, 100]), ("offsets", [0, -1, 7, 12]), ("offsets", [0, 9, 4, 12]), ("offsets", [0, 3, 12]),
    ("offsets", [1, 3, 7, 12]), ("offsets", [0.0, 3.0, 7.0, 12.0]), ("offsets", [[0, 3, 7, 12]]),
    ("names", ["a", "b"]), ("scales", np.ones(11, np.float32)), ("locations", np.zeros((12, 3), np.float32)),
    ("region_image_offsets", [0, 1, 2, 9]), ("region_image_offsets", [0, 2, 1, 3]),
    ("region_offsets", [0, 2, 4, 50]),
])
def test_load_features_rejects_inconsistent_stores(tmp_path, key, value):
    from d2r.extract.store import load_features, save_features

    rng = np.random.default_rng(0)
    feats = [_features(rng, n) for n in (3, 4, 5)]
    regions = [(np.zeros((1, 4)), [_features(rng, 2)]) for _ in range(3)]
    good = tmp_path / "good.npz"
    save_features(good, ["a", "b", "c"], feats, regions)
    names, got, regs = load_features(good, regions=True)
    assert names == ["a", "b", "c"] and [len(f.descriptors) for f in got] == [3, 4, 5] and len(regs) == 3
    with np.load(good) as z:
        arrays = dict(z)
    arrays[key] = np.asarray(value)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError) as err:
        load_features(bad, regions=True)
    assert str(bad) in str(err.value)
