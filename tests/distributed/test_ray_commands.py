"""The Ray commands as a user runs them, each in a process of its own (a fresh interpreter, a local
cluster it starts and must stop):

- quiet: Ray's own messages (its token-authentication warning, its C++ core's ``E ... core_worker.cc``
  lines, Ray Data's and Serve's logs, the raylet's reports) go to ``ray.log`` in the store or index
  folder; with ``-q`` a Ray command writes nothing at all on stderr;
- ``connect("local")`` starts a cluster of its own whatever ``RAY_ADDRESS`` says, and an address that
  does not answer is a clear error within the timeout (Ray itself retried for minutes);
- SIGTERM (``kill PID`` from a script that started ``d2r serve ... &``, as the README shows) and SIGINT
  stop ``d2r serve`` and ``d2r extract --ray`` with exit status 143 and 130, no stack frames printed,
  and no process of theirs left (every process carrying the test's environment marker, found in
  /proc, is gone);
- ``d2r search FOLDER`` checks the manifest first and searches the shards in process, without
  importing Ray, with the single index's answer.

Each test that starts Ray starts it once (about 15-30 s on a loaded 2-core machine)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import d2r

ROOT = Path(d2r.__file__).resolve().parent.parent   # the d2r these tests import, for the subprocesses
# what Ray writes when it is not kept quiet (none may reach stderr: with -q nothing does at all)
RAY_NOISE = ("Token authentication", "core_worker.cc", "(raylet)", "(pid=", "*** SIGTERM", "Traceback",
             "Started a local Ray instance", "Started Serve", "-- ")


def _env(mark, **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["D2R_TEST_MARK"] = mark   # inherited by every process Ray starts for the command
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _marked(mark):
    """The processes (pid, command line) whose environment holds D2R_TEST_MARK=mark."""
    want = f"D2R_TEST_MARK={mark}".encode()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if want in (p / "environ").read_bytes().split(b"\0"):
                found.append((int(p.name), (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return found


def _left_behind(mark, wait=30.0):
    """The marked processes still alive after up to `wait` seconds (killed afterwards, so that a
    failing test leaves nothing running either)."""
    deadline = time.monotonic() + wait
    left = _marked(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _marked(mark)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def _d2r(*args):
    return [sys.executable, "-m", "d2r.cli", *map(str, args)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """12 synthetic photos (blurred noise: plenty of SIFT blobs), their store, a codebook, one index
    file and a 2-shard index split from it: all made without Ray."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'd2r[ray]'); the Ray command tests need it")
    import cv2

    from d2r.distributed import shard_index
    from d2r.extract import RootSIFT
    from d2r.workflows.build import build_index
    from d2r.workflows.pipeline import train_codebook

    tmp = tmp_path_factory.mktemp("raycmd")
    rng = np.random.default_rng(3)
    (tmp / "images").mkdir()
    paths = []
    for i in range(12):
        img = cv2.GaussianBlur(rng.integers(0, 256, (160, 200, 3)).astype(np.uint8), (0, 0), 2.5)
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)
        paths.append(tmp / "images" / f"img{i:02d}.png")
        cv2.imwrite(str(paths[-1]), img)
    d2r.extract_dataset([str(p) for p in paths], tmp / "store", RootSIFT(max_features=200), progress=False)
    _, feats = d2r.load_features(tmp / "store")
    cb = train_codebook(feats, 32, seed=0, progress=False)
    cb.save(tmp / "cb.npy")
    build_index(tmp / "store", tmp / "one.d2r", cb, progress=False)
    shard_index(tmp / "one.d2r", tmp / "sh", 2, progress=False)
    return tmp, paths


def test_unreachable_address_is_a_clear_error_within_the_timeout(folders):
    """RAY_ADDRESS pointing at nothing: connect("auto") and connect(ADDRESS) raise
    ClusterUnreachableError within the timeout (Ray alone was still retrying after 100 s), and the
    command line says so in one line with exit status 2. No cluster starts."""
    tmp, paths = folders
    code = """
import time
from d2r.distributed import ClusterUnreachableError, connect
for address in ("auto", "127.0.0.1:1"):
    t = time.monotonic()
    try:
        connect(address, timeout=5)
    except ClusterUnreachableError as exc:
        assert exc.address == "127.0.0.1:1" and exc.timeout == 5, (exc.address, exc.timeout)
        print("unreachable", address, round(time.monotonic() - t, 1), str(exc))
    else:
        raise SystemExit("connected?")
try:
    connect("127.0.0.1:1", timeout=-1)
except ValueError as exc:
    print("bad timeout:", exc)
"""
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], env=_env("none", RAY_ADDRESS="127.0.0.1:1"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines[:2]] == [["unreachable", "auto"], ["unreachable", "127.0.0.1:1"]]
    assert all(float(ln.split()[2]) < 10 for ln in lines[:2]), lines
    assert "no Ray cluster answered at 127.0.0.1:1 within 5 s" in lines[0]
    assert lines[2].startswith("bad timeout: the connect timeout must be a positive number")
    r = subprocess.run(_d2r("search", tmp / "sh", paths[0], "--ray", "127.0.0.1:1", "-q"), capture_output=True,
                       text=True, env=_env("none", D2R_RAY_CONNECT_TIMEOUT="5"), timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("d2r search: error: no Ray cluster answered at 127.0.0.1:1 within 5 s")
    assert len(r.stderr.splitlines()) == 1
    assert time.monotonic() - t < 60


def test_search_folder_checks_the_manifest_and_searches_in_process(folders):
    """`d2r search FOLDER` without --ray: a folder without manifest.json is a usage error before
    anything starts; a sharded folder is searched in this process (Ray is not even imported) and gives
    the single index's results, scores included."""
    tmp, paths = folders
    (tmp / "not-sharded").mkdir(exist_ok=True)
    code = f"""
import json, sys, io, contextlib
from d2r.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["search", {str(tmp / 'not-sharded')!r}, {str(paths[0])!r}])
print(json.dumps({{"rc": rc, "err": err.getvalue()}}))
for extra in ([], ["--expand", "aqe"]):
    for index in ({str(tmp / 'sh')!r}, {str(tmp / 'one.d2r')!r}):
        assert main(["search", index, {str(paths[0])!r}, {str(paths[5])!r}, "-k", "12", "--json", "-q"] + extra) == 0
print(json.dumps({{"ray_imported": "ray" in sys.modules}}))
"""
    r = subprocess.run([sys.executable, "-c", code], env=_env("none"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    first = json.loads(out[0])
    assert first["rc"] == 2 and "not-sharded: a folder without manifest.json" in first["err"]
    docs = []
    dec = json.JSONDecoder()
    rest = "\n".join(out[1:])
    while rest.strip():
        doc, end = dec.raw_decode(rest.lstrip())
        docs.append(doc)
        rest = rest.lstrip()[end:]
    sharded, single, sharded_aqe, single_aqe, flag = docs
    assert flag == {"ray_imported": False}
    # query expansion over the shards: the single file's expanded answer
    assert sharded_aqe["expand"] == single_aqe["expand"] == "aqe"
    assert [q["results"] for q in sharded_aqe["queries"]] == [q["results"] for q in single_aqe["queries"]]
    # the same results; normalised scores come from a single index file only (README: Reading scores)
    for q in sharded["queries"]:
        assert all(r.pop("normalized") is None for r in q["results"])
    for q in single["queries"]:
        for r in q["results"]:
            r.pop("normalized")
    assert [q["results"] for q in sharded["queries"]] == [q["results"] for q in single["queries"]]
    assert sharded["queries"][0]["results"][0]["name"] == str(paths[0])
    assert len(sharded["queries"][1]["results"]) == 12


def test_quiet_ray_command_starts_its_own_cluster_and_leaves_nothing(folders):
    """`d2r index --shards 2 -q` with RAY_ADDRESS naming nothing: it starts a local cluster of its own
    (before, it tried to join RAY_ADDRESS for minutes), writes nothing on stderr (Ray's messages are in
    ray.log), and no process of its cluster outlives it."""
    tmp, paths = folders
    mark = uuid.uuid4().hex
    out = tmp / "sh-ray"
    try:
        r = subprocess.run(_d2r("index", tmp / "store", "--codebook", tmp / "cb.npy", "--out", out, "--shards", "2",
                                "-q"), env=_env(mark, RAY_ADDRESS="127.0.0.1:1"), capture_output=True, text=True,
                           timeout=300)
    finally:
        left = _left_behind(mark)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr   # -q: nothing of Ray's, nothing at all
    assert r.stdout.startswith("12 images in 2 shards")
    log = (out / "ray.log").read_text()
    assert "d2r: Ray's output" in log and "Started a local Ray instance" in log
    assert left == [], left


def test_serve_started_from_a_script_stops_on_sigterm(folders):
    """The README's shape: a script starts `d2r serve FOLDER --port P &`, waits for /health, then
    `kill $PID`: the service answers, stops with status 143, prints only its own lines (no stack
    frames, nothing of Ray's, the log file named once), and leaves no process behind."""
    tmp, paths = folders
    mark = uuid.uuid4().hex
    port = _free_port()
    health = (f"{sys.executable} -c \"import urllib.request as u; "
              f"print(u.urlopen('http://127.0.0.1:{port}/health').read().decode())\"")
    script = f"""
{' '.join(_d2r('serve', tmp / 'sh', '--port', port))} > {tmp / 'serve.out'} 2> {tmp / 'serve.err'} &
PID=$!
for i in $(seq 480); do grep -q "on http" {tmp / 'serve.out'} && break; sleep 0.5; done   # it says when it answers
{health}
kill $PID
wait $PID
echo "status $?"
"""
    try:
        r = subprocess.run(["bash", "-c", script], env=_env(mark), capture_output=True, text=True, timeout=400)
    finally:
        left = _left_behind(mark)
    health, status = r.stdout.strip().splitlines()[-2:]
    assert json.loads(health) == {"status": "ok", "images": 12, "shards": 2}
    assert status == "status 143", r.stdout + r.stderr
    err = (tmp / "serve.err").read_text()
    out = (tmp / "serve.out").read_text()
    assert out.startswith(f"d2r serve: {tmp / 'sh'} on http://127.0.0.1:{port}") and len(out.splitlines()) == 1
    assert err.splitlines() == [f"d2r serve: Ray's own messages go to {tmp / 'sh' / 'ray.log'}", "d2r serve: stopped"]
    assert not [n for n in RAY_NOISE if n in err + out]
    assert left == [], left
    assert "Started Serve" in (tmp / "sh" / "ray.log").read_text()


def test_extract_on_ray_stops_on_sigint(folders):
    """SIGINT to `d2r extract --ray local` while it runs: status 130, the one-line interruption
    message, no traceback, and no process of its cluster left."""
    tmp, paths = folders
    mark = uuid.uuid4().hex
    listing = tmp / "many.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    err_path = tmp / "extract.err"
    with open(err_path, "w") as err, open(tmp / "extract.out", "w") as out:
        proc = subprocess.Popen(_d2r("extract", listing, "--out", tmp / "ray-store", "--ray", "local",
                                     "--max-features", "200"), env=_env(mark), stdout=out, stderr=err,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "Ray's own messages go to" not in err_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err_path.read_text()
            time.sleep(0.2)
        time.sleep(1.0)   # inside the Ray Data pipeline
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        left = _left_behind(mark)
    err = err_path.read_text()
    assert rc == 130, err
    assert "d2r extract: interrupted" in err
    assert not [n for n in RAY_NOISE if n in err], err
    assert left == [], left


def test_address_parsing_and_timeout_setting(monkeypatch):
    """What the probe reads from an address (no Ray needed), and the timeout's sources."""
    from d2r.distributed.cluster import DEFAULT_CONNECT_TIMEOUT, _host_port, _timeout

    assert _host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert _host_port("ray://head.example:10001") == ("head.example", 10001)
    assert _host_port("[::1]:6379") == ("::1", 6379)
    assert _host_port("head.example") is None and _host_port("ray://head:port") is None
    monkeypatch.delenv("D2R_RAY_CONNECT_TIMEOUT", raising=False)
    assert _timeout(None) == DEFAULT_CONNECT_TIMEOUT == 30.0 and _timeout(2) == 2.0
    monkeypatch.setenv("D2R_RAY_CONNECT_TIMEOUT", "7.5")
    assert _timeout(None) == 7.5 and _timeout(3) == 3.0
    monkeypatch.setenv("D2R_RAY_CONNECT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="D2R_RAY_CONNECT_TIMEOUT='soon'"):
        _timeout(None)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number of seconds"):
            _timeout(bad)
