"""Crafted index files with valid checksums (issue 24): files built by d2r (format 4, a regional
format-4 file, and the format-3 file of tests/data), edited structurally with every page, section and
header checksum recomputed (tests/crafted.py). Each is loaded in every mode (in memory and mapped;
verify True, False and "lazy") and every reading operation runs on it (search, batched search,
score_all or pooled regional search, with one and two threads; export, save, verify, compact; merge):
each outcome must be IndexFileError, never a different answer, another exception or a crash. The
operations run in a child process, so that a crash fails this test instead of ending pytest.

The exceptions are documented (README, "Index files: what is checked"): an image table whose word
counts do not match the postings, though they add up to the file's posting count, is found by a full
verification (`verify=True` at load, or `index.verify()`) only; with verify=False or "lazy" such a
file gives other scores (the word counts normalise them) until verified.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r.workflows.synthetic import zipf_images

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
import crafted  # noqa: E402
from support import World  # noqa: E402

DATA = TESTS / "data"
# Mutations that break no structure a reader sees, only the agreement of the image table's word
# counts with the postings: found by a full verification only.
FULL_ONLY = {
    "image table: a word count moved to another image",
    "image table: n_entries and a word count one higher",
    "image table: one image more than the lists use",
}


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8) if a.dtype.kind == "f"
                                                                        else a, b.view(np.uint8)
                                                                        if b.dtype.kind == "f" else b)


def _child(kind, other, tmp, paths):
    """Runs crafted.py on `paths` in a child process; returns {path: {op: outcome}} for the files it
    finished and the child's return code."""
    out = Path(tmp) / f"outcomes-{os.getpid()}-{len(paths)}.pkl"
    if out.exists():
        out.unlink()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(d2r.__file__).parents[1]), str(TESTS)]))
    proc = subprocess.run([sys.executable, str(TESTS / "crafted.py"), str(out), kind, str(other), str(tmp),
                           *map(str, paths)], env=env, capture_output=True, text=True, timeout=900)
    res = pickle.loads(out.read_bytes()) if out.exists() else {}
    return res, proc.returncode, proc.stderr[-2000:]


def run_all(kind, other, tmp, paths):
    """{path: {op: outcome}} with a dead child's files rerun one by one; a file whose own child dies
    gets {"crash": return code}."""
    res, rc, err = _child(kind, other, tmp, paths)
    for p in paths:
        if str(p) in res:
            continue   # finished (before the crash, if the child died)
        one, rc1, err1 = _child(kind, other, tmp, [p])
        res[str(p)] = one.get(str(p)) if rc1 == 0 else {"crash": ("crash", rc1, err1)}
    return res


def classify(name, outcomes, reference):
    """Counter of outcome classes: error (IndexFileError), same (the reference's answer), wrong
    (another answer), other (another exception), crash; and the list of unacceptable ones."""
    counts, bad = Counter(), []
    for op, out in outcomes.items():
        if out[0] == "crash":
            counts["crash"] += 1
            bad.append((op, "crash", str(out[1:])[:200]))
            continue
        if out[0] == "error":
            cls = "error" if out[1] == "IndexFileError" else "other"
        elif op.endswith(" load"):
            continue   # a load that succeeds is judged by the operations after it
        elif op.endswith(" verify"):
            cls = "verify passed"   # verify() vouched for a broken file
        else:
            cls = "same" if _same(out[1], reference[op][1]) else "wrong"
        if cls == "wrong" and name in FULL_ONLY and "verify=True" not in op:
            cls = "wrong (documented: word counts, found by a full verification)"
        counts[cls] += 1
        allowed = cls in ("error", "same") or cls.startswith("wrong (documented")
        if not allowed:
            bad.append((op, cls, "" if out[0] == "ok" else f"{out[1]}: {out[2][-100:]}"))
    return counts, bad


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """kind -> (original file, file to merge with, mutations)."""
    tmp = tmp_path_factory.mktemp("crafted")
    cb = d2r.Codebook(np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32))
    idx = d2r.Index(cb, "asmk*")
    idx.add_aggregated(zipf_images(3000, 32, 20, 0.3, seed=6, fingerprint=cb.fingerprint))
    idx.remove(np.arange(0, 3000, 97))
    idx.save(tmp / "f4.d2r")
    other = d2r.Index(cb, "asmk*")
    other.add_aggregated(zipf_images(300, 32, 20, 0.3, seed=7, fingerprint=cb.fingerprint),
                         image_ids=np.arange(10**6, 10**6 + 300))
    other.save(tmp / "f4-other.d2r")

    world = World(seed=3, dim=64, n_objects=6, words_per_object=3)
    reg = d2r.RegionalSearchIndex(world.codebook, kernel="asmk*")
    reg.add_regions_many([[x, x[: len(x) // 2]] for x in (world.image(lo=20, hi=60) for _ in range(400))])
    reg.save(tmp / "reg.d2r")
    reg2 = d2r.RegionalSearchIndex(world.codebook, kernel="asmk*")
    reg2.add_regions_many([[world.image()] for _ in range(20)], image_ids=np.arange(10**6, 10**6 + 20))
    reg2.save(tmp / "reg-other.d2r")

    v3 = d2r.Index.load(DATA / "format3.d2r")
    other3 = d2r.Index(v3.codebook, "asmk*")
    other3.add_aggregated(zipf_images(50, v3.codebook.n_words, 80, 0.6, seed=12, fingerprint=v3.codebook.fingerprint),
                          image_ids=np.arange(10**6, 10**6 + 50))
    other3.save(tmp / "f3-other.d2r")
    return tmp, {"format4": (tmp / "f4.d2r", tmp / "f4-other.d2r", crafted.FORMAT4),
                 "regional": (tmp / "reg.d2r", tmp / "reg-other.d2r", crafted.FORMAT4),
                 "format3": (DATA / "format3.d2r", tmp / "f3-other.d2r", crafted.FORMAT3)}


TOTALS: dict = {}


@pytest.mark.parametrize("kind", ["format4", "regional", "format3"])
def test_crafted_files_raise(files, kind, tmp_path):
    tmp, table = files
    src, other, mutations = table[kind]
    paths = {}
    for i, name in enumerate(mutations):
        dst = tmp_path / f"m{i:02d}.d2r"
        crafted.craft(src, dst, name, mutations)
        assert dst.read_bytes() != src.read_bytes()
        paths[name] = dst
    ref = run_all(kind, other, tmp_path, [src])[str(src)]
    assert all(o[0] == "ok" for o in ref.values()), {k: v for k, v in ref.items() if v[0] != "ok"}
    res = run_all(kind, other, tmp_path, list(paths.values()))
    total, failures = Counter(), {}
    for name, p in paths.items():
        counts, bad = classify(name, res[str(p)], ref)
        total += counts
        if bad:
            failures[name] = bad
        # verify=True verifies everything at load: every crafted file is refused there.
        for mode in ("mmap=False verify=True load", "mmap=True verify=True load"):
            out = res[str(p)].get(mode)
            if out is not None and not (out[0] == "error" and out[1] == "IndexFileError"):
                total["load with verify=True accepted"] += 1
                failures.setdefault(name, []).append((mode, "loads", ""))
    TOTALS[kind] = (len(paths), dict(total))
    print(f"\n{kind}: {len(paths)} crafted files, outcomes {dict(total)}")
    report = "\n".join(f"{k}: {len(v)} bad, e.g. {v[:2]}" for k, v in failures.items())
    print(report)
    assert not failures, report
