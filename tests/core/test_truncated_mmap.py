"""A memory-mapped index whose file is truncated by another process (csrc/map_guard.h): reads past the
new end would raise SIGBUS and end the process; d2r's SIGBUS handler maps zero pages there instead
and flags the mapping, and every operation on the index raises IndexFileError ("... was truncated
while memory-mapped") from then on, until the file is loaded again. Each case runs in a child
process (with Python's faulthandler on, as under pytest), so that a SIGBUS fails the test instead of
ending pytest."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r.workflows.synthetic import zipf_images

pytestmark = pytest.mark.skipif(os.name != "posix" or sys.platform == "darwin",
                                reason="SIGBUS on a truncated MAP_SHARED file (Linux)")

CHILD = textwrap.dedent("""
    import os, subprocess, sys, json
    import numpy as np
    import d2r
    path, verify, cut = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    idx = d2r.Index.load(path, mmap=True, verify=verify)
    cb = idx.codebook
    n = cb.n_words
    q = d2r.AggregatedBatch(np.array([0, n], np.int64), np.arange(n, dtype=np.int32),
                            np.random.default_rng(0).integers(0, 256, (n, 16), dtype=np.uint8),
                            fingerprint=cb.fingerprint)
    q3 = d2r.AggregatedBatch(np.array([0, n, 2 * n, 3 * n], np.int64), np.tile(np.arange(n, dtype=np.int32), 3),
                             np.random.default_rng(1).integers(0, 256, (3 * n, 16), dtype=np.uint8),
                             fingerprint=cb.fingerprint)
    before = idx.search_aggregated(q, k=None)
    size = os.path.getsize(path)
    raw = open(path, "rb").read()
    header = json.loads(raw[20:20 + int.from_bytes(raw[12:16], "little")])
    post = next(s for s in header["sections"] if s["name"] == "postings")
    new_size = {"postings": post["offset"] + post["nbytes"] // 2, "all": 0}[cut]
    # truncated by another process
    subprocess.run([sys.executable, "-c", f"import os; os.truncate({path!r}, {new_size})"], check=True)
    ops = {
        "search": lambda: idx.search_aggregated(q, k=None),
        "batched": lambda: idx.search_aggregated(q3, k=None),
        "score_all": lambda: idx._ivf.score_all(q.offsets, q.words, q.code_bytes, idx.alpha, idx.tau, idx.normalize),
        "export": lambda: idx._ivf.export(),
        "verify": lambda: idx.verify(),
        "save": lambda: idx.save(path + ".resaved"),
        "compact": lambda: idx.compact(),
        "search_again": lambda: idx.search_aggregated(q, k=None),
        "add": lambda: idx.add_aggregated(q, image_ids=[10**9]),
    }
    for name, op in ops.items():
        try:
            r = op()
            same = name == "search" and all(np.array_equal(a, b) for a, b in zip(r, before))
            print(name, "ANSWER", "same" if same else "different", flush=True)
        except d2r.IndexFileError as exc:
            print(name, "ERROR", "truncated while memory-mapped" in str(exc), str(exc)[:120], flush=True)
    print("ALIVE", flush=True)
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cb = d2r.Codebook(np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32))
    idx = d2r.Index(cb, "asmk*")
    idx.add_aggregated(zipf_images(4000, 64, 40, 0.5, seed=1, fingerprint=cb.fingerprint))
    path = tmp_path_factory.mktemp("trunc") / "i.d2r"
    idx.save(path)
    return path


def _run(path, verify, cut):
    env = dict(os.environ, PYTHONPATH=str(Path(d2r.__file__).parents[1]))
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, str(path), verify, cut],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("verify", ['"lazy"', "false"])
@pytest.mark.parametrize("cut", ["postings", "all"])
def test_truncated_mapped_file_raises_and_the_process_lives(saved, tmp_path, verify, cut):
    path = tmp_path / "i.d2r"
    path.write_bytes(saved.read_bytes())
    proc = _run(path, verify, cut)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-1500:]}"
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert "ALIVE" in proc.stdout
    for op in ("search", "batched", "score_all", "export", "verify", "save", "compact", "search_again", "add"):
        assert lines[op].startswith("ERROR True"), (op, lines[op], proc.stdout)
    # Loaded again, the truncated file is refused as such.
    with pytest.raises(d2r.IndexFileError):
        d2r.Index.load(path, mmap=True).search_aggregated(
            d2r.AggregatedBatch(np.array([0, 1], np.int64), np.array([0], np.int32), np.zeros((1, 16), np.uint8),
                                fingerprint=d2r.Index.load(saved).codebook.fingerprint), k=None)
