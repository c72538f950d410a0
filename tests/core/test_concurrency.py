"""Threads on one index: searches, scores, saves and the accessors (len, `in`, ids) run while other
threads add and remove images. Nothing may crash or hang, every intermediate result must be well
formed and be the answer of one consistent state of the index (an add or remove is all or nothing, an
add that returned before a search began is visible to it), every saved file must load, and the final
index must answer exactly as a fresh one built with the same content.

The threaded work runs in subprocesses (this file run as a script) under a timeout, so a deadlock
fails the test instead of hanging the run; results come back as JSON. Run this file with `-s` to see
the operation counts of the stress test."""
from __future__ import annotations

import faulthandler
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import d2r

TESTS = Path(__file__).resolve().parents[1]   # tests/: support.py, reference.py
TIMEOUT_S = 120
DIM = 32


def _env(timeout=TIMEOUT_S):
    env = dict(os.environ)
    env["D2R_TEST_HANG_S"] = str(timeout - 10)  # the child dumps its threads' stacks and exits then
    # the d2r this test process imported (installed, or python/ of the repository), and tests/
    paths = [os.path.dirname(os.path.dirname(d2r.__file__)), str(TESTS)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_child(mode: str, tmp_path: Path, *args, timeout: int = TIMEOUT_S) -> dict:
    """Runs this file as a script in `mode`; returns the JSON it wrote. A hang fails: 10 s before
    `timeout` the child prints every thread's stack (faulthandler) and exits."""
    out = tmp_path / f"{mode}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, str(out), str(tmp_path), *map(str, args)]
    try:
        p = subprocess.run(cmd, env=_env(timeout), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"{mode}: no result after {timeout} s (deadlock?)\n{err[-6000:]}")
    if "Timeout (" in p.stderr:
        pytest.fail(f"{mode}: hung for {timeout - 10} s (deadlock?); the threads' stacks:\n{p.stderr[-8000:]}")
    assert p.returncode == 0, (f"{mode}: exit code {p.returncode}\nstdout:\n{p.stdout[-4000:]}\n"
                               f"stderr:\n{p.stderr[-6000:]}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------
# tests


def test_stress_readers_writers_savers(tmp_path):
    r = run_child("stress", tmp_path)
    print("\nconcurrency stress:", json.dumps(r["ops"]), f"{r['seconds']:.1f} s")
    assert not r["errors"], "\n".join(r["errors"][:20])
    ops = r["ops"]
    assert ops["reads_during_writes"] > 0, "the readers never overlapped the writers"
    assert ops["adds"] > 0 and ops["removes"] > 0 and ops["saves"] > 0 and ops["loads"] > 0


def test_concurrent_default_ids_never_collide(tmp_path):
    r = run_child("default_ids", tmp_path, timeout=60)
    assert not r["errors"], "\n".join(r["errors"][:20])
    for kind in ("Index", "RegionalSearchIndex"):
        ids = r[kind]["ids"]
        assert len(ids) == len(set(ids)) == r[kind]["expected"], kind
        assert r[kind]["len"] == r[kind]["expected"] and sorted(r[kind]["index_ids"]) == sorted(ids), kind


@pytest.mark.parametrize("mmap", [False, True])
def test_len_while_adding_to_loaded_index(tmp_path, mmap):
    # A loaded index: one thread calls len(index) while another adds (this deadlocked before).
    r = run_child("len_while_adding", tmp_path, int(mmap), timeout=60)
    assert not r["errors"], "\n".join(r["errors"][:20])
    assert r["len_calls"] > 0 and r["final_len"] == r["expected_len"]


def test_daemon_thread_inside_search_at_exit(tmp_path):
    # The interpreter exits while a daemon thread is inside a long native search (and another inside add
    # or remove): exit code 0, no abort.
    out = tmp_path / "daemon.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "daemon_exit", str(out), str(tmp_path)]
    try:
        p = subprocess.run(cmd, env=_env(60), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter did not exit within 60 s while a daemon thread searched")
    assert p.returncode == 0, f"exit code {p.returncode}\nstderr:\n{p.stderr[-4000:]}"
    assert "Fatal" not in p.stderr and "terminate" not in p.stderr, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["searching"], "the daemon thread had not entered search when the interpreter exited"


# ------------------------------------------------------------------------------------------------
# the child processes


def _world():
    from support import World

    return World(seed=41, dim=DIM, n_objects=12, words_per_object=8)


class History:
    """Image batches numbered in the order the single adder adds them; target[b] >= 0: the removal
    index of batch b (the single remover removes targets in order). Per index, counters of adds and
    removes started and done; a call bracketed by counter reads `before` and `after` must see batch b
      present if its add was done before the call began and its removal had not begun when it ended,
      absent if its add had not begun when the call ended or its removal was done before it began,
    and never part of a batch."""

    def __init__(self, batch_ids, target):
        self.batch_ids = [list(map(int, b)) for b in batch_ids]
        self.target = target
        self.batch_of = {i: b for b, ids in enumerate(self.batch_ids) for i in ids}

    @staticmethod
    def view(c):
        return (c["as"], c["ad"], c["rs"], c["rd"])

    def must_present(self, b, before, after):
        return b < before[1] and not (self.target[b] >= 0 and self.target[b] < after[2])

    def must_absent(self, b, before, after):
        return b >= after[0] or (self.target[b] >= 0 and self.target[b] < before[3])

    def check_set(self, ids, before, after) -> str:
        ids = [int(i) for i in ids]
        if len(set(ids)) != len(ids):
            return "an id appears twice"
        seen = {}
        for i in ids:
            b = self.batch_of.get(i)
            if b is None:
                return f"id {i} was never added"
            seen[b] = seen.get(b, 0) + 1
        for b, want in enumerate(self.batch_ids):
            n = seen.get(b, 0)
            if n not in (0, len(want)):
                return f"batch {b} partly present ({n} of {len(want)})"
            if n == 0 and self.must_present(b, before, after):
                return f"batch {b} missing"
            if n and self.must_absent(b, before, after):
                return f"batch {b} present"
        return ""

    def size_bounds(self, before, after):
        lo = sum(len(ids) for b, ids in enumerate(self.batch_ids) if self.must_present(b, before, after))
        hi = sum(len(ids) for b, ids in enumerate(self.batch_ids) if not self.must_absent(b, before, after))
        return lo, hi


def child_stress(out: Path, tmp: Path):
    t_start = time.perf_counter()
    w = _world()
    cb = w.codebook
    rng = np.random.default_rng(7)
    n_batches, per, preload = 60, 6, 8
    images, batch_ids = [], []
    for b in range(n_batches):
        imgs = [w.image() for _ in range(per)]
        if b % 5 == 3:
            imgs[2] = np.zeros((0, DIM), np.float32)            # an image without descriptors
        if b > 0:
            imgs[1] = images[b - 1][0].copy()                    # equal content: tied scores
        images.append(imgs)
        batch_ids.append(10_000 + 131 * b + 17 * np.arange(per))  # explicit, sparse ids
    target, n_targets = [], 0
    for b in range(n_batches):                                   # batch 0 is never removed
        target.append(n_targets if b % 3 == 1 else -1)
        n_targets += b % 3 == 1
    targets = [b for b in range(n_batches) if target[b] >= 0]
    h = History(batch_ids, target)
    queries = [w.image(objects=[o, o + 1]) for o in range(0, 10, 2)] + [w.image() for _ in range(3)]
    regions = lambda im: [im, im[: max(1, len(im) // 2)]] if len(im) else [im]  # noqa: E731

    # Reference scores: the score of a (query, image) pair does not depend on the other images (no
    # idf; sums in fixed point), so every result must carry exactly these.
    all_imgs = [im for imgs in images for im in imgs]
    all_ids = np.concatenate(batch_ids)
    ref_idx = d2r.Index(cb)
    ref_idx.add(all_imgs, image_ids=all_ids)
    s, i = ref_idx.score_all(queries)
    ref = [dict(zip(i.tolist(), s[q].tolist())) for q in range(len(queries))]
    ref_reg_idx = d2r.RegionalSearchIndex(cb, "asmk*", pooling="max")
    ref_reg_idx.add_regions_many([regions(im) for im in all_imgs], image_ids=all_ids)
    s, i = ref_reg_idx.search(queries, k=None)
    ref_reg = [dict(zip(i[q].tolist(), s[q].tolist())) for q in range(len(queries))]

    # The three indexes: fresh, memory-mapped (loaded from a file), regional. Same batches in each.
    fresh = d2r.Index(cb)
    reg = d2r.RegionalSearchIndex(cb, "asmk*", pooling="max")
    for b in range(preload):
        fresh.add(images[b], image_ids=batch_ids[b])
        reg.add_regions_many([regions(im) for im in images[b]], image_ids=batch_ids[b])
    base = tmp / "base.d2r"
    fresh.save(base)
    mm = d2r.Index.load(base, mmap=True)
    indexes = {"fresh": fresh, "mmap": mm, "regional": reg}
    counters = {name: {"as": preload, "ad": preload, "rs": 0, "rd": 0} for name in indexes}
    refs = {"fresh": ref, "mmap": ref, "regional": ref_reg}
    sure = [int(i) for b in range(preload) if target[b] < 0 for i in batch_ids[b]]  # always present

    errors: list[str] = []
    ops = {k: 0 for k in ("search_one_k5", "search_many_all", "score_all", "regional_search", "len", "contains",
                          "ids", "adds", "failed_adds", "removes", "failed_removes", "saves", "loads",
                          "reads_during_writes")}
    ops_lock = threading.Lock()

    def count(key, n=1):
        with ops_lock:
            ops[key] += n

    def err(msg):
        if len(errors) < 200:
            errors.append(msg)

    writers_done = threading.Event()
    state = {"adder_failed": False}

    def writing():
        return not writers_done.is_set()

    def check_ranking(name, scores, ids, q_list, k, before, after, what):
        scores, ids = np.atleast_2d(scores), np.atleast_2d(ids)
        if scores.shape != ids.shape or scores.shape[0] != len(q_list):
            return err(f"{name} {what}: shapes {scores.shape} {ids.shape}")
        if ids.dtype != np.int64 or scores.dtype != np.float32:
            return err(f"{name} {what}: dtypes {scores.dtype} {ids.dtype}")
        if not np.all(np.isfinite(scores)):
            return err(f"{name} {what}: non-finite scores")
        lo, hi = h.size_bounds(before, after)
        n = scores.shape[1]
        if k is None and not lo <= n <= hi:
            return err(f"{name} {what}: {n} results, the index held between {lo} and {hi} images")
        if k is not None and n != k:
            return err(f"{name} {what}: {n} results for k={k}")
        first = None
        for row, q in enumerate(q_list):
            s, i = scores[row], ids[row]
            order_ok = np.all((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (i[:-1] < i[1:])))
            if not order_ok:
                return err(f"{name} {what}: not sorted by score desc, id asc")
            rq = refs[name][q]
            if any(rq.get(int(a), math.nan) != float(b) for a, b in zip(i, s)):
                return err(f"{name} {what}: a score differs from the image's score alone (or an unknown id)")
            if k is None:
                bad = h.check_set(i, before, after)
                if bad:
                    return err(f"{name} {what}: {bad}")
                if first is None:
                    first = set(i.tolist())
                elif set(i.tolist()) != first:
                    return err(f"{name} {what}: rows rank different image sets")
            else:
                if len(set(i.tolist())) != len(i):
                    return err(f"{name} {what}: an id twice")
                top = set(i.tolist())
                if any(rq[x] > s[-1] and x not in top for x in sure):
                    return err(f"{name} {what}: an image scoring above the k-th is missing")

    def reader(t):
        r = np.random.default_rng(100 + t)
        names = list(indexes)
        i = 0
        while (i < 300 or writing()) and i < 5000:
            name = names[(i + t) % 3]
            idx, c = indexes[name], counters[name]
            op = (i // 3 + t) % 5
            i += 1
            if writing():
                count("reads_during_writes")
            before = h.view(c)
            try:
                if op == 0:
                    q = int(r.integers(len(queries)))
                    s, ids = idx.search(queries[q], k=5)
                    if s.ndim != 1 or ids.ndim != 1:
                        err(f"{name} search(one query): {s.ndim}-D results")
                    check_ranking(name, s, ids, [q], 5, before, h.view(c), "search(one query, k=5)")
                    count("search_one_k5" if name != "regional" else "regional_search")
                elif op in (1, 2) and name == "regional":
                    s, ids = idx.search(queries, k=None)
                    check_ranking(name, s, ids, range(len(queries)), None, before, h.view(c), "search(k=None)")
                    count("regional_search")
                elif op == 1:
                    s, ids = idx.search(queries, k=None)
                    check_ranking(name, s, ids, range(len(queries)), None, before, h.view(c), "search(k=None)")
                    count("search_many_all")
                elif op == 2:
                    s, ids = idx.score_all(queries)
                    after = h.view(c)
                    if s.shape != (len(queries), len(ids)):
                        err(f"{name} score_all: scores {s.shape} for {len(ids)} ids")
                    elif not np.all(np.isfinite(s)):
                        err(f"{name} score_all: non-finite scores")
                    else:
                        bad = h.check_set(ids, before, after)
                        if bad:
                            err(f"{name} score_all: {bad}")
                        elif any(ref[q][int(a)] != float(b) for q in range(len(queries)) for a, b in zip(ids, s[q])):
                            err(f"{name} score_all: a score differs from the image's score alone")
                    count("score_all")
                elif op == 3:
                    n = len(idx)
                    lo, hi = h.size_bounds(before, h.view(c))
                    if not lo <= n <= hi:
                        err(f"{name} len {n} outside [{lo}, {hi}]")
                    count("len")
                    x = int(all_ids[r.integers(len(all_ids))])
                    before = h.view(c)
                    has = x in idx
                    after = h.view(c)
                    b = h.batch_of[x]
                    if has and h.must_absent(b, before, after) or not has and h.must_present(b, before, after):
                        err(f"{name}: ({x} in index) is {has}")
                    count("contains")
                else:
                    ids = idx.ids
                    bad = h.check_set(ids, before, h.view(c))
                    if ids.dtype != np.int64 or bad:
                        err(f"{name} ids: {bad or ids.dtype}")
                    count("ids")
            except Exception as exc:  # noqa: BLE001
                err(f"{name} reader op {op}: {type(exc).__name__}: {exc}")

    def adder():
        try:
            for b in range(preload, n_batches):
                for name, idx in indexes.items():
                    c = counters[name]
                    if b % 6 == 0:
                        # one id already present: refused, nothing added
                        bad_ids = [900_000 + b * 10, 900_001 + b * 10, int(batch_ids[0][0])]
                        try:
                            if name == "regional":
                                idx.add_regions_many([regions(im) for im in images[b][:3]], image_ids=bad_ids)
                            else:
                                idx.add(images[b][:3], image_ids=bad_ids)
                            err(f"{name}: add with a present id did not raise")
                        except ValueError:
                            pass
                        if bad_ids[0] in idx or bad_ids[1] in idx:
                            err(f"{name}: a refused add left images behind")
                        count("failed_adds")
                    c["as"] = b + 1
                    if name == "regional":
                        got = idx.add_regions_many([regions(im) for im in images[b]], image_ids=batch_ids[b])
                    else:
                        got = idx.add(images[b], image_ids=batch_ids[b])
                    c["ad"] = b + 1
                    if not np.array_equal(got, batch_ids[b]):
                        err(f"{name}: add returned {got}")
                    count("adds")
                time.sleep(0.002)
        except Exception as exc:  # noqa: BLE001
            state["adder_failed"] = True
            err(f"adder: {type(exc).__name__}: {exc}")

    def remover():
        try:
            for t, b in enumerate(targets):
                for name, idx in indexes.items():
                    c = counters[name]
                    while c["ad"] <= b:
                        if state["adder_failed"]:
                            return
                        time.sleep(0.001)
                    if t % 4 == 3:
                        pair = [int(batch_ids[0][1]), int(batch_ids[targets[t - 1]][0])]  # kept + removed
                        try:
                            idx.remove(pair)
                            err(f"{name}: remove of an absent id did not raise")
                        except KeyError:
                            pass
                        if pair[0] not in idx:
                            err(f"{name}: a refused remove removed an image")
                        count("failed_removes")
                    c["rs"] = t + 1
                    n = idx.remove(batch_ids[b])
                    c["rd"] = t + 1
                    if n != per:
                        err(f"{name}: remove returned {n}")
                    count("removes")
                time.sleep(0.003)
        except Exception as exc:  # noqa: BLE001
            err(f"remover: {type(exc).__name__}: {exc}")

    def saver():
        keep = []  # loaded (memory-mapped) copies kept alive while their file is replaced
        i = 0
        while (i < 20 or writing()) and i < 300:
            for name, idx in indexes.items():
                path = tmp / f"save_{name}_{i % 3}.d2r"
                c = counters[name]
                try:
                    before = h.view(c)
                    idx.save(path)
                    after = h.view(c)
                    count("saves")
                    cls = d2r.RegionalSearchIndex if name == "regional" else d2r.Index
                    loaded = cls.load(path, mmap=i % 2 == 1, verify=True)
                    count("loads")
                    bad = h.check_set(loaded.ids, before, after)
                    if bad:
                        err(f"{name} saved file {path.name}: {bad}")
                    s, ids = loaded.search(queries[0], k=None)
                    if any(refs[name][0][int(a)] != float(b) for a, b in zip(ids, s)):
                        err(f"{name} saved file {path.name}: a score differs")
                    keep = (keep + [loaded])[-4:]
                except Exception as exc:  # noqa: BLE001
                    err(f"saver {name}: {type(exc).__name__}: {exc}")
            i += 1

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
    threads += [threading.Thread(target=saver)]
    writers = [threading.Thread(target=adder), threading.Thread(target=remover)]
    for th in threads + writers:
        th.start()
    for th in writers:
        th.join()
    writers_done.set()
    for th in threads:
        th.join()

    # Every file still in the rotation loads (verified), and the final indexes equal fresh builds.
    for p in sorted(tmp.glob("save_*.d2r")):
        try:
            cls = d2r.RegionalSearchIndex if "regional" in p.name else d2r.Index
            cls.load(p, verify=True)
        except Exception as exc:  # noqa: BLE001
            err(f"{p.name} does not load: {exc}")
    final = [b for b in range(n_batches) if target[b] < 0]
    want_ids = np.concatenate([batch_ids[b] for b in final])
    for name, idx in indexes.items():
        if name == "regional":
            built = d2r.RegionalSearchIndex(cb, "asmk*", pooling="max")
            built.add_regions_many([regions(im) for b in final for im in images[b]], image_ids=want_ids)
        else:
            built = d2r.Index(cb)
            built.add([im for b in final for im in images[b]], image_ids=want_ids)
        if len(idx) != len(built) or not np.array_equal(idx.ids, want_ids) or not np.array_equal(built.ids, want_ids):
            err(f"{name} final: ids differ from the fresh build")
        for k in (None, 5):
            a, b = idx.search(queries, k=k), built.search(queries, k=k)
            if not (np.array_equal(a[1], b[1]) and a[0].tobytes() == b[0].tobytes()):
                err(f"{name} final: search(k={k}) differs from the fresh build")
        if name != "regional":
            a, b = idx.score_all(queries), built.score_all(queries)
            if not (np.array_equal(a[1], b[1]) and a[0].tobytes() == b[0].tobytes()):
                err(f"{name} final: score_all differs from the fresh build")
        for x in batch_ids[0]:
            if int(x) not in idx:
                err(f"{name} final: {x} missing")
    out.write_text(json.dumps({"errors": errors, "ops": ops, "seconds": time.perf_counter() - t_start}))


def child_default_ids(out: Path, tmp: Path):
    w = _world()
    errors = []
    res = {"errors": errors}
    imgs = [w.image() for _ in range(3)]
    for kind in ("Index", "RegionalSearchIndex"):
        idx = d2r.Index(w.codebook) if kind == "Index" else d2r.RegionalSearchIndex(w.codebook)
        got = [[], []]

        def add(t):
            try:
                for _ in range(40):
                    got[t].extend(int(i) for i in idx.add(imgs))
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{kind} adder {t}: {type(exc).__name__}: {exc}")

        th = [threading.Thread(target=add, args=(t,)) for t in range(2)]
        for x in th:
            x.start()
        for x in th:
            x.join()
        res[kind] = {"ids": got[0] + got[1], "expected": 2 * 40 * len(imgs), "len": len(idx),
                     "index_ids": [int(i) for i in idx.ids]}
    out.write_text(json.dumps(res))


def child_len_while_adding(out: Path, tmp: Path, mmap: str):
    # Each round loads the file afresh and adds until the loaded arrays are merged away (releasing
    # what held them): the moment the old build deadlocked, when len() waited for the adder's lock
    # while holding the GIL and the adder needed the GIL to release the loaded arrays.
    w = _world()
    idx = d2r.Index(w.codebook)
    idx.add([w.image() for _ in range(50)])
    idx.save(tmp / "loaded.d2r")
    batches = [[w.image() for _ in range(4)] for _ in range(20)]
    errors = []
    calls = [0]
    rounds, expected = 25, 50 + 4 * 20
    sys.setswitchinterval(0.0005)  # the spinning len() thread hands the GIL back to the adder sooner
    final = []
    for _ in range(rounds):
        idx = d2r.Index.load(tmp / "loaded.d2r", mmap=mmap == "1")
        done = threading.Event()

        def lengths():
            try:
                while not done.is_set():
                    n = len(idx)
                    if not 50 <= n <= expected:
                        errors.append(f"len {n}")
                    calls[0] += 1
            except Exception as exc:  # noqa: BLE001
                errors.append(f"len: {type(exc).__name__}: {exc}")

        def adds():
            try:
                for b in batches:
                    idx.add(b)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"add: {type(exc).__name__}: {exc}")
            finally:
                done.set()

        th = [threading.Thread(target=lengths), threading.Thread(target=adds)]
        for x in th:
            x.start()
        for x in th:
            x.join()
        final.append(len(idx))
    out.write_text(json.dumps({"errors": errors[:50], "len_calls": calls[0], "final_len": final,
                               "expected_len": [expected] * rounds}))


def child_daemon_exit(out: Path, tmp: Path):
    w = _world()
    idx = d2r.Index(w.codebook, kernel="asmk")
    idx.add([w.image(lo=20, hi=60) for _ in range(3000)])
    queries = [w.image() for _ in range(300)]
    entered = threading.Event()

    def search_forever():
        while True:
            entered.set()
            idx.search(queries, k=None)

    batch = [w.image() for _ in range(200)]

    def write_forever():  # a daemon writer too: inside add or remove at exit
        while True:
            idx.remove(idx.add(batch))

    threading.Thread(target=search_forever, daemon=True).start()
    threading.Thread(target=write_forever, daemon=True).start()
    entered.wait(30)
    time.sleep(0.05)  # inside a search now (each takes far longer than this)
    out.write_text(json.dumps({"searching": entered.is_set()}))
    # the interpreter exits here, the daemon thread still inside the native search


if __name__ == "__main__":
    faulthandler.enable()
    # a hang: every thread's stack, then exit
    faulthandler.dump_traceback_later(float(os.environ.get("D2R_TEST_HANG_S", TIMEOUT_S - 10)), exit=True)
    mode, out_path, tmp_dir = sys.argv[1:4]
    {"stress": child_stress, "default_ids": child_default_ids, "len_while_adding": child_len_while_adding,
     "daemon_exit": child_daemon_exit}[mode](Path(out_path), Path(tmp_dir), *sys.argv[4:])
