"""``d2r serve`` under the bad requests of issue 24: each kind's status and time, /health's latency while a
slow query (a 6-megapixel image) runs, and the replica's RSS before and after rounds of bad requests.

The service runs on a local Ray cluster (2 CPUs) in front of a RootSIFT index of 12 synthetic textures
(built in ``FOLDER``). The bad requests are ``BAD_REQUESTS`` of ``tests/distributed/test_serve.py``, read
from that file's text (not imported), so that an older d2r can be measured with the same requests:
``PYTHONPATH=/path/to/old/python python benchmarks/bench_serve_bad.py ...``. RSS is read from /proc
(Linux): fresh (no request yet), before the rounds (after one request of each kind and the slow
query), after them, and 5 s later.

Usage:
  python benchmarks/bench_serve_bad.py /tmp/serve-bad --rounds 200 --json benchmarks/results/serve_bad.json
  (an old d2r, whose bombs take tens of seconds and GBs each:)
  PYTHONPATH=OLD/python python benchmarks/bench_serve_bad.py /tmp/serve-bad-old --rounds 3 \\
      --skip-status image_bomb,image_bomb_24mp --json benchmarks/results/serve_bad_old.json
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the kinds sent in rounds (the memory batch)
ROUND_KINDS = ("multipart_no_boundary", "multipart_garbage", "json_infinity", "json_deep", "npy_huge_shape", "k_float",
               "descriptors_numeric_strings", "image_bomb_24mp")


def bad_requests() -> dict:
    src = (ROOT / "tests" / "distributed" / "test_serve.py").read_text()
    a, b = src.index("def _npy("), src.index("# ---- the parser, without Ray")
    ns: dict = {}
    exec("import io, json, struct, zlib\nimport numpy as np\nDIM = 128\n" + src[a:b], ns)   # noqa: S102
    return ns["BAD_REQUESTS"]


def replica_rss_mb():
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if b"ServeReplica:d2r:D2RService" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
            except OSError:
                pass
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="work folder (the index is built there once)")
    ap.add_argument("--rounds", type=int, default=200, help="rounds of ROUND_KINDS, one request of each per round")
    ap.add_argument("--skip-status", default="", help="kinds not sent in the status pass (comma-separated)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import cv2
    import d2r
    from d2r import distributed
    from d2r.distributed import serve as d2r_serve
    from d2r.extract import RootSIFT
    from d2r.workflows.build import build_index
    from d2r.workflows.pipeline import train_codebook
    from ray import serve

    bad = bad_requests()
    print("d2r from", Path(d2r.__file__).parent, flush=True)
    tmp = Path(args.folder)
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)

    def texture(h, w):
        x = rng.random((h // 8, w // 8)).astype(np.float32)
        img = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
        img = (255 * (img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.uint8)
        return np.dstack([img, img[:, ::-1], img[::-1]])
    paths = []
    for i in range(12):
        p = tmp / f"tex{i:02d}.png"
        cv2.imwrite(str(p), texture(240, 320))
        paths.append(str(p))
    if not (tmp / "idx.d2r").exists():
        d2r.extract_dataset(paths, tmp / "store", RootSIFT(max_features=200), progress=False)
        names, feats = d2r.load_features(tmp / "store")
        build_index(tmp / "store", tmp / "idx.d2r", train_codebook(feats, 32, seed=0, progress=False), progress=False)
    cv2.imwrite(str(tmp / "big.jpg"), texture(2000, 3000), [cv2.IMWRITE_JPEG_QUALITY, 80])
    os.environ["PYTHONPATH"] = str(Path(d2r.__file__).resolve().parent.parent)
    distributed.connect("local", num_cpus=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d2r_serve.run(tmp / "idx.d2r", port=port, k=5, blocking=False)

    def url(q):
        return "/search" + ("?" + "&".join(f"{k}={v}" for k, v in q.items()) if q else "")
    state = {"conn": http.client.HTTPConnection("127.0.0.1", port, timeout=600)}

    def post(path, body, ct):
        t = time.perf_counter()
        try:
            state["conn"].request("POST", path, body=body, headers={"Content-Type": ct})
            r = state["conn"].getresponse()
            raw = r.read()
        except (OSError, http.client.HTTPException) as exc:
            state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            return "exception " + type(exc).__name__, time.perf_counter() - t, b""
        return r.status, time.perf_counter() - t, raw[:100]

    out: dict = {"d2r": str(Path(d2r.__file__).parent), "statuses": {}, "rss_fresh_mb": replica_rss_mb()}
    try:
        skip = set(args.skip_status.split(","))
        for kind, (ct, body, q, want) in sorted(bad.items()):
            if kind in skip:
                continue
            st, dt, raw = post(url(q), body, ct)
            out["statuses"][kind] = {"status": st, "want": want, "seconds": round(dt, 3)}
            print(f"{kind:30s} {st} (want {want}) {dt:.2f}s {raw[:70]!r}", flush=True)
        done: dict = {}

        def slow():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            t = time.perf_counter()
            c.request("POST", "/search", body=(tmp / "big.jpg").read_bytes(), headers={"Content-Type": "image/jpeg"})
            done["status"] = c.getresponse().status
            done["seconds"] = round(time.perf_counter() - t, 2)
        th = threading.Thread(target=slow)
        th.start()
        time.sleep(0.5)
        waits = []
        while th.is_alive():
            t = time.perf_counter()
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=600).read()
            waits.append((round(time.perf_counter() - t, 3), th.is_alive()))
            time.sleep(0.2)
        th.join()
        out["slow_query"] = done
        out["health_seconds_during_slow_query"] = [w for w, alive in waits if alive]
        out["health_seconds_all"] = [w for w, _ in waits]
        print("slow query", done, "/health", waits, flush=True)
        out["rss_before_rounds_mb"] = replica_rss_mb()
        t0 = time.perf_counter()
        per: dict = {}
        for _ in range(args.rounds):
            for kind in ROUND_KINDS:
                ct, body, q, want = bad[kind]
                st = str(post(url(q), body, ct)[0])
                per.setdefault(kind, {}).setdefault(st, 0)
                per[kind][st] += 1
        out.update(rounds=args.rounds, round_kinds=list(ROUND_KINDS), rss_after_rounds_mb=replica_rss_mb(),
                   rounds_seconds=round(time.perf_counter() - t0, 1), round_statuses=per)
        time.sleep(5)
        out["rss_5s_later_mb"] = replica_rss_mb()
    finally:
        serve.shutdown()
    print(json.dumps({k: v for k, v in out.items() if k != "statuses"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
