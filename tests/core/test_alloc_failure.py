"""Allocation failures: with the address space capped (RLIMIT_AS) just above what the process uses,
operations that must allocate more than the margin (a large add, add_aggregated, compact, a full
ranking of many queries, score_all, loading a big file, a large regional add) raise MemoryError
instead of crashing, and leave the index exactly as it was: after the cap is lifted it answers as
before (same length, same ids, same rankings and scores). Two sweeps put the cap at a series of
margins around the size of an add's and a search's result, so that the failure falls at every stage
in turn (inside the core, while the bindings hand the result to Python, in the Python layer): each
must end in MemoryError (or succeed). A memory-mapped load may also raise OSError(ENOMEM).

Runs in a subprocess (the cap applies to the whole process; the normal build has no ASan). Before
each capped call the freed memory malloc still holds is taken (_fill_heap), so that the call's large
allocations need new address space; glibc's malloc is set up through the environment (_env)."""
from __future__ import annotations

import errno
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import d2r

TESTS = Path(__file__).resolve().parents[1]   # tests/: support.py, reference.py
MARGIN = 16 << 20  # bytes of address space allowed above the current use; every operation needs more

OPERATIONS = ["add", "add_aggregated", "remove", "compact", "search_all", "score_all", "load", "load_mmap",
              "regional_add", "regional_remove", "regional_compact", "add_sweep", "search_sweep"]


def _env():
    env = dict(os.environ)
    paths = [os.path.dirname(os.path.dirname(d2r.__file__)), str(TESTS)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # glibc malloc: every block above 64 KiB its own mapping, returned at once when freed, and one
    # arena (no 64 MiB per-thread reservations): the address space then tracks what is allocated, and
    # a cap of "current use + MARGIN" fails exactly the allocations beyond the margin
    env.update({"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    return env


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < (8 << 30):
        pytest.skip(f"RLIMIT_AS hard limit is {hard} bytes: too low to run the test under a cap")
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc/self/status (not Linux): the address space in use cannot be measured")
    if "fsanitize=address" in d2r.build_info().get("flags", ""):
        pytest.skip("an AddressSanitizer build reserves terabytes of address space: RLIMIT_AS cannot cap it")
    tmp = tmp_path_factory.mktemp("alloc")
    out = tmp / "result.json"
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out), str(tmp)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"the child died (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    r = json.loads(out.read_text())
    if r.get("skip"):
        pytest.skip(r["skip"])
    return r


@pytest.mark.parametrize("op", OPERATIONS)
def test_operation_raises_memory_error_and_leaves_index_unchanged(result, op):
    bad = []
    for r in result["ops"][op]:
        under = (f"under a cap of {r['margin_mb']:.1f} MiB above the current use (it needs about "
                 f"{r['needs_mb']:.0f} MiB)")
        if r["raised"] not in ("MemoryError", None) or (r["raised"] is None and r["must_fail"]):
            bad.append(f"{op} {under}: {r['raised'] or 'no exception'} ({r['message']})")
        elif not r["unchanged"]:
            bad.append(f"after the failed {op} {under} the index answers differently: {r['diff']}")
    assert not bad, "\n".join(bad)


def test_index_still_usable_after_the_failures(result):
    assert result["after"]["ok"], result["after"]["message"]


# ------------------------------------------------------------------------------------------------
# the child


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def _libc():
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    return libc


def _fill_heap(libc, hard):
    """Takes every free block of 64 KiB or more that malloc already holds (with the address space
    capped at its current size, so nothing new is mapped), so that an operation's large allocations
    need new address space (which the cap then refuses) instead of reusing freed heap memory."""
    blocks = [None] * 200_000
    n = 0
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size(), hard))
    try:
        for size in (16 << 20, 1 << 20, 64 << 10):
            while n < len(blocks):
                p = libc.malloc(size)
                if not p:
                    break
                blocks[n] = p
                n += 1
    except MemoryError:
        pass
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    return blocks[:n]


def child(out: Path, tmp: Path):
    from d2r.core.aggregate import AggregatedBatch, aggregate_images
    from support import World

    res = {"ops": {}}
    try:
        soft0, hard0 = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (hard0, hard0))
    except (ValueError, OSError) as exc:
        out.write_text(json.dumps({"skip": f"cannot set RLIMIT_AS: {exc}"}))
        return

    rng = np.random.default_rng(0)
    dim = 32
    w = World(seed=3, dim=dim, n_objects=12, words_per_object=8)
    cb = w.codebook
    n_words = cb.n_words

    def images(n, per, objects=4):
        """n images of `per` descriptors around `objects` random centres each, as (x, offsets)."""
        obj = rng.integers(0, w.n_objects, size=(n, objects))
        which = obj[np.arange(n)[:, None], rng.integers(0, objects, size=(n, per))].reshape(-1)
        x = w.centres[which] + w.desc_spread / np.sqrt(dim) * rng.standard_normal((n * per, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.arange(0, n * per + 1, per)

    def aggregated(n, per=24):
        """n synthetic ASMK images (float codes): `per` distinct sorted words each, unit codes (no
        quantisation: fast to make in bulk)."""
        words = np.sort(np.argsort(rng.random((n, n_words)), axis=1)[:, :per], axis=1).astype(np.int32)
        codes = rng.standard_normal((n * per, dim)).astype(np.float32)
        codes /= np.linalg.norm(codes, axis=1, keepdims=True)
        return AggregatedBatch(np.arange(0, n * per + 1, per, dtype=np.int64), words.reshape(-1), codes)

    # The index: ASMK float codes, 132 bytes a posting: 20,000 images of 24 words, about 60 MiB.
    n_db = 20_000
    idx = d2r.Index(cb, kernel="asmk")
    idx.add_aggregated(aggregated(n_db), image_ids=np.arange(n_db) * 2 + 5)
    reg = d2r.RegionalSearchIndex(cb, "asmk")
    xr, offr = images(12_000, per=40)
    reg.add_regions_many([[xr[a:b], xr[a:a + 16]] for a, b in zip(offr[:-1], offr[1:])], progress=False)
    del xr
    qx, qoff = images(500, per=24)
    queries = [qx[a:b] for a, b in zip(qoff[:-1], qoff[1:])]
    few = queries[:5]
    big_file, reg_file = tmp / "big.d2r", tmp / "regional.d2r"
    # tombstones for compact() to drop (the saved files leave them out: a reload answers the same)
    idx.remove(idx.ids[1::7])
    reg.remove(reg.ids[1::7])
    idx.save(big_file)
    reg.save(reg_file)
    # inputs of the operations, made before the cap
    x_add, off_add = images(16_000, per=32)
    agg_add = aggregated(10_000)
    reg_add = [[x_add[a:b], x_add[a:a + 16]] for a, b in zip(off_add[:-1], off_add[1:])]
    remove_ids = idx.ids[::3].copy()
    reg_remove_ids = reg.ids[::3].copy()
    # warm-up: the OpenMP threads (stacks, malloc arenas) exist before the cap
    for _ in range(2):
        idx.search(few, k=None)
        idx.search(few[0], k=3)
        idx.score_all(few)
        reg.search(few, k=None)
        reg.search(few[0], k=3)

    def state():
        return {"len": len(idx), "ids": idx.ids.copy(), "search": idx.search(few, k=None),
                "score_all": idx.score_all(few[:2]), "next_id": idx._next_id, "reg_len": len(reg),
                "reg_ids": reg.ids.copy(), "reg_search": reg.search(few, k=None), "reg_next_id": reg._next_id}

    def changed(a, b):
        diff = []
        for k in a:
            va, vb = a[k], b[k]
            if isinstance(va, tuple):
                ok = all(p.shape == q.shape and p.tobytes() == q.tobytes() for p, q in zip(va, vb))
            elif isinstance(va, np.ndarray):
                ok = np.array_equal(va, vb)
            else:
                ok = va == vb
            if not ok:
                diff.append(k)
        return diff

    postings = idx.stats()["bytes"]
    a_add = cb.quantize(x_add, 1)[0]
    agg_bytes = aggregate_images(cb, x_add, off_add, "asmk", 1, a_add).codes.nbytes
    fixed = [1 << 20, MARGIN]  # margins under which the operation must fail
    sweep = lambda n, fs: [int(f * n) for f in fs]  # noqa: E731
    ops = {  # operation, about how many bytes it must allocate, margins, must it fail under all of them
        "add": (lambda: idx.add(x_add, offsets=off_add, progress=False), agg_bytes, fixed, True),
        "add_aggregated": (lambda: idx.add_aggregated(agg_add), agg_add.codes.nbytes, fixed, True),
        # remove only marks tombstones (O(images)): it may succeed under the cap; compact rewrites
        "remove": (lambda: idx.remove(remove_ids), len(idx) * 30, fixed, False),
        "compact": (lambda: idx.compact(), postings, fixed, True),
        "search_all": (lambda: idx.search(queries, k=None), len(queries) * n_db * 12, fixed, True),
        "score_all": (lambda: idx.score_all(queries), len(queries) * n_db * 4, fixed, True),
        "load": (lambda: d2r.Index.load(big_file), big_file.stat().st_size, fixed, True),
        "load_mmap": (lambda: d2r.Index.load(big_file, mmap=True, verify=False), big_file.stat().st_size, fixed,
                      True),
        "regional_add": (lambda: reg.add_regions_many(reg_add, progress=False), 16_000 * 24 * (4 * dim + 4), fixed,
                         True),
        "regional_remove": (lambda: reg.remove(reg_remove_ids), len(reg) * 60, fixed, False),
        "regional_compact": (lambda: reg.compact(), reg.stats()["bytes"], fixed, True),
        # margins around the size of the result, so that the failure falls at every stage in turn
        # (inside the native code, while handing the result to Python, in the Python layer, ...);
        # each must end in MemoryError with the index unchanged, or succeed
        "add_sweep": (lambda: idx.add(x_add, offsets=off_add, assignments=a_add, progress=False), agg_bytes,
                      sweep(agg_bytes, (0.2, 0.5, 0.8, 1.0, 1.2, 1.4, 1.7, 2.0, 2.4, 3.0, 4.0)), False),
        "search_sweep": (lambda: idx.search(queries, k=None), len(queries) * n_db * 12,
                         sweep(len(queries) * n_db * 12, (0.2, 0.5, 0.9, 1.1, 1.5, 2.0, 3.0)), False),
    }
    assert list(ops) == OPERATIONS
    before = state()
    libc = _libc()
    for name, (fn, needs, margins, must_fail) in ops.items():
        res["ops"][name] = []
        for margin in margins:
            r = {"raised": None, "message": "", "needs_mb": needs / 2**20, "margin_mb": margin / 2**20,
                 "must_fail": must_fail}
            gc.collect()  # what the last failure's traceback held is freed now, not during this operation
            held = _fill_heap(libc, hard0)
            try:
                resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + margin, hard0))
                try:
                    fn()
                finally:
                    resource.setrlimit(resource.RLIMIT_AS, (hard0, hard0))
                    for p in held:
                        libc.free(p)
            except MemoryError as exc:
                r["raised"], r["message"] = "MemoryError", str(exc)[:300]
            except OSError as exc:
                r["raised"] = "MemoryError" if exc.errno == errno.ENOMEM and name == "load_mmap" else "OSError"
                r["message"] = str(exc)[:300]
            except Exception as exc:  # noqa: BLE001
                r["raised"], r["message"] = type(exc).__name__, str(exc)[:300]
            if r["raised"] is None:  # it fitted: back to the saved state for what follows
                idx = d2r.Index.load(big_file)
                reg = d2r.RegionalSearchIndex.load(reg_file)
                r["unchanged"], r["diff"] = True, []
            else:
                diff = changed(before, state())
                r["unchanged"], r["diff"] = not diff, diff
            res["ops"][name].append(r)
    # Afterwards the index works as usual (the failed calls left nothing half done).
    try:
        ids = idx.add(x_add[:off_add[10]], offsets=off_add[:11])
        assert len(idx) == before["len"] + 10, "add after the failures"
        assert idx.remove(ids) == 10 and np.array_equal(idx.ids, before["ids"]), "remove after the failures"
        diff = [k for k in changed(before, state()) if k != "next_id"]  # next_id grew: ids are not reused
        assert not diff, f"{diff} after an add and a remove"
        res["after"] = {"ok": True, "message": ""}
    except Exception as exc:  # noqa: BLE001
        res["after"] = {"ok": False, "message": f"{type(exc).__name__}: {exc}"}
    resource.setrlimit(resource.RLIMIT_AS, (soft0, hard0))
    out.write_text(json.dumps(res))


if __name__ == "__main__":
    child(Path(sys.argv[1]), Path(sys.argv[2]))
