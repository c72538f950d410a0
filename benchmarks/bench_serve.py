"""A bounded load test of ``d2r serve`` on loopback: real photos posted by 1, 4 and 8 concurrent clients.

An index of realmix photos (RootSIFT, ``--features`` per image, a ``--words`` codebook; built here in a
temporary folder by ``d2r.extract_dataset``, ``train_codebook`` and ``build_index``) is served by
``d2r.distributed.serve.run`` on a local Ray cluster (2 CPUs). Each client is a thread with its own
kept-alive HTTP connection posting photos (raw JPEG bytes, ``k=10``) one after another,
``--requests`` each; a prober asks ``GET /health`` every 0.2 s meanwhile. Reported per level:
throughput (requests/s over the level's wall time), p50/p99 latency, the statuses, and /health's
p50/max latency under that load. The photos are the collection's own images (each is found at rank
1, checked).

The service of whichever d2r is imported runs (only the options its ``run`` accepts are passed), so the
same script measures an older commit: ``PYTHONPATH=/path/to/old/python python benchmarks/bench_serve.py``.

Usage:
  python benchmarks/bench_serve.py --json benchmarks/results/serve.json
Skips (exit 0, saying why) when the realmix photos (../shared/data/realmix/images) are absent.
"""
from __future__ import annotations

import argparse
import http.client
import inspect
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model  # noqa: E402


def _photos(n: int):
    from d2r.datasets.realmix import find_realmix

    root = find_realmix()
    if root is None or not (Path(root) / "images").is_dir():
        return None
    return sorted((Path(root) / "images").rglob("*.jpg"))[:: 3][:n]


def _level(port: int, clients: int, per_client: int, photos, names) -> dict:
    lat, statuses, wrong = [], {}, []
    lock = threading.Lock()
    stop = threading.Event()
    health = []

    def client(c: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for r in range(per_client):
            p = photos[(c * per_client + r) % len(photos)]
            body = p.read_bytes()
            t = time.perf_counter()
            conn.request("POST", "/search?k=10", body=body, headers={"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200 and doc["results"][0]["name"] != str(p):
                    wrong.append(str(p))
        conn.close()

    def prober():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while not stop.is_set():
            t = time.perf_counter()
            conn.request("GET", "/health")
            conn.getresponse().read()
            health.append(time.perf_counter() - t)
            stop.wait(0.2)
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    pr = threading.Thread(target=prober)
    t0 = time.perf_counter()
    pr.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    stop.set()
    pr.join()
    a = np.asarray(lat)
    h = np.asarray(health) * 1000
    return {"clients": clients, "requests": int(a.size), "wall_s": round(wall, 2),
            "throughput_rps": round(a.size / wall, 2), "p50_s": round(float(np.percentile(a, 50)), 3),
            "p99_s": round(float(np.percentile(a, 99)), 3), "mean_s": round(float(a.mean()), 3),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "not_found_first": wrong,
            "health_p50_ms": round(float(np.percentile(h, 50)), 1) if h.size else None,
            "health_max_ms": round(float(h.max()), 1) if h.size else None, "health_probes": int(h.size)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=40, help="realmix photos indexed (and posted)")
    ap.add_argument("--features", type=int, default=1000, help="RootSIFT features per image")
    ap.add_argument("--words", type=int, default=256, help="codebook size")
    ap.add_argument("--requests", type=int, default=8, help="requests per client at each level")
    ap.add_argument("--levels", default="1,4,8", help="concurrent clients, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="the service's query threads (--threads)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    photos = _photos(args.photos)
    if not photos:
        print("bench_serve: skipped: the realmix photos (../shared/data/realmix/images, or $D2R_SHARED_DATA) are "
              "absent", flush=True)
        return 0
    import d2r
    from d2r import distributed
    from d2r.distributed import serve as d2r_serve
    from d2r.extract import RootSIFT
    from d2r.workflows.build import build_index
    from d2r.workflows.pipeline import train_codebook
    from ray import serve

    print(f"d2r from {Path(d2r.__file__).parent}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    t = time.perf_counter()
    d2r.extract_dataset([str(p) for p in photos], tmp / "store", RootSIFT(max_features=args.features), progress=False)
    names, feats = d2r.load_features(tmp / "store")
    cb = train_codebook(feats, args.words, seed=0, progress=False)
    build_index(tmp / "store", tmp / "idx.d2r", cb, progress=False)
    print(f"index of {len(names)} photos built in {time.perf_counter() - t:.1f} s", flush=True)

    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(d2r.__file__).resolve().parent.parent)]
                                               + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    distributed.connect("local", num_cpus=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accepted = inspect.signature(d2r_serve.run).parameters
    opts = {k: v for k, v in {"threads": args.threads}.items() if k in accepted}
    d2r_serve.run(tmp / "idx.d2r", port=port, k=10, blocking=False, **opts)
    out = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                       "load_avg_at_start": os.getloadavg()},
           "d2r": str(Path(d2r.__file__).parent), "service_options": opts,
           "photos": len(names), "features": args.features, "words": args.words,
           "mean_photo_bytes": int(np.mean([p.stat().st_size for p in photos])), "levels": []}
    try:
        _level(port, 1, 2, photos, names)   # warm-up: the replica's first extraction
        for c in (int(x) for x in args.levels.split(",")):
            r = _level(port, c, args.requests, photos, names)
            print(json.dumps(r), flush=True)
            out["levels"].append(r)
    finally:
        serve.shutdown()
    out["machine"]["load_avg_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
