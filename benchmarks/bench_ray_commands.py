"""What a Ray command costs a user in wall time, each run a fresh `d2r` process as on the command line:
`d2r search FOLDER` of a sharded index in process (every shard memory-mapped, no Ray) against the
same search with `--ray local` (a local cluster started and stopped around it) and against the
single index file; and how long `d2r serve` takes to stop after SIGTERM. The three searches are
interleaved, `--repeat` rounds, so that the machine's load falls on each alike.

    python benchmarks/bench_ray_commands.py --images 40 --repeat 3 --json benchmarks/results/ray_commands.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40, help="realmix photos indexed")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import d2r
    from d2r.datasets.realmix import find_realmix
    from d2r.distributed import shard_index
    from d2r.extract import RootSIFT
    from d2r.workflows.build import build_index
    from d2r.workflows.pipeline import train_codebook

    root = find_realmix()
    if root is None:
        raise SystemExit("needs ../shared/data/realmix (set D2R_SHARED_DATA)")
    photos = [str(p) for p in sorted((Path(root) / "images").rglob("*.jpg"))[:: 4][: args.images]]
    tmp = Path(tempfile.mkdtemp(prefix="d2r-bench-ray-"))
    d2r.extract_dataset(photos, tmp / "store", RootSIFT(max_features=1000), progress=False)
    _, feats = d2r.load_features(tmp / "store")
    cb = train_codebook(feats, 256, seed=0, progress=False)
    build_index(tmp / "store", tmp / "one.d2r", cb, progress=False)
    shard_index(tmp / "one.d2r", tmp / "sh", args.shards, progress=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(d2r.__file__).resolve().parent.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(
            os.pathsep) if p]))
    env.pop("RAY_ADDRESS", None)
    d2r_cmd = [sys.executable, "-m", "d2r.cli"]
    runs: dict = {"in_process": [], "ray_local": [], "single_file": []}
    answers = {}
    for _ in range(args.repeat):
        for name, extra in (("in_process", [str(tmp / "sh")]), ("ray_local", [str(tmp / "sh"), "--ray", "local"]),
                            ("single_file", [str(tmp / "one.d2r")])):
            t = time.perf_counter()
            r = subprocess.run(d2r_cmd + ["search", extra[0], photos[3], "-k", "10", "--json", "-q"] + extra[1:],
                               env=env, capture_output=True, text=True, check=True)
            runs[name].append(time.perf_counter() - t)
            answers[name] = json.loads(r.stdout)["queries"][0]["results"]
    assert answers["in_process"] == answers["ray_local"] == answers["single_file"], "the three answers differ"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen(d2r_cmd + ["serve", str(tmp / "sh"), "--port", str(port), "-q"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    t = time.perf_counter()
    assert serve.stdout is not None
    line = serve.stdout.readline()
    started = time.perf_counter() - t
    assert "on http" in line, line
    t = time.perf_counter()
    serve.send_signal(signal.SIGTERM)
    rc = serve.wait(timeout=120)
    stopped = time.perf_counter() - t

    out = {"machine": cpu_model(), "cores": os.cpu_count(), "images": len(photos), "shards": args.shards,
           "repeat": args.repeat, "note": "a shared, loaded 2-core machine; wall seconds of whole d2r processes",
           "search_wall_s": runs, "search_median_s": {k: statistics.median(v) for k, v in runs.items()},
           "serve_start_s": started, "serve_stop_after_sigterm_s": stopped, "serve_exit_status": rc}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
